"""The projections of a Llama layer with what surrounds them: RMSNorm before, SiLU product and residual after.

One definition, two implementations behind one switch (nanoGPT's rule: a readable fallback next to each
fast path). `norm_linear` is

    y = linear(rms_norm(x) if norm else x, W, b);  y = silu(gate) * up if gated;  y = residual + y

written as PyTorch ops, which is what runs on the CPU. On CUDA a call can go instead to
`kernels/norm_linear.py`, one Triton kernel for all of it, so a decoding step launches one kernel per
projection instead of up to three (Inductor keeps each matmul as an extern call and cannot fuse the norm
into it). LONGSPEC_NORM_LINEAR picks:

    auto (default)  the kernel on CUDA for weights of at most AUTO_MAX_WEIGHT elements, PyTorch otherwise
    on              the kernel for every projection it can serve (also under TRITON_INTERPRET=1 on the CPU,
                    which is how the tests run it against the PyTorch ops)
    off             PyTorch ops everywhere

Why the size rule (H200, bf16, 2026-12-04, data/results/norm_linear_h200.log and e2e_h200*.json): on the
embedded model's projections (weights of 0.1-0.4M elements) the kernel takes 0.27-0.71x the time of the
PyTorch ops, and a decoding step goes from 94 to 71 kernels, 210.5 -> 184.1 us per AR step in one session.
On Llama-3-8B's (25M and 117M elements) it takes 1.78x and 1.01x: there cuBLAS's matmul is what counts.

`rms_norm` is the models' RMSNorm (models/layers.py calls it), here so that both implementations share it.

Taught in: notebooks/03_one_step_slowly.ipynb
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from longspec_lab.ops.attention import _interpreting
from longspec_lab.ops.switches import HAS_TRITON, checked

CHOICES = ("auto", "off", "on")
NORM_LINEAR = os.environ.get("LONGSPEC_NORM_LINEAR", "auto")  # one of CHOICES (module docstring)
# "auto": largest weight [N, K] (elements) that goes to the kernel, whose tiles are tuned for weights up to the
# same bound (kernels/norm_linear.py: SMALL_WEIGHT; this module does not import Triton at start-up)
AUTO_MAX_WEIGHT = 1 << 20
# LONGSPEC_QKV_ROPE: the q/k/v projection, RoPE and the cache write in the same kernel (`qkv_rope_cache`), which
# saves the two RoPE kernels per layer that Inductor leaves (profile_h200.json: 18 us of an AR step's kernel time,
# plus their launches). "auto" (the default) uses it on CUDA for weights up to AUTO_MAX_WEIGHT elements (an 8B
# model's q/k/v stays on cuBLAS), "on" for every weight, on CUDA or under the CPU interpreter (tests), "off" never.
# Timed in one H200 call against the separate ops (2026-12-04, e2e_ab_qkv_rope_h200.json against
# e2e_ab_base_h200.json, with the swept projection tiles): the AR step 171.5 -> 169.6 us (71 -> 66 kernels), a
# chain's 6-row verify 210.4 -> 205.4 us, the 72-row tree verify 259.7 -> 250.5 us (86 -> 81 kernels). An
# earlier A/B with the old tiles had found it neutral (183.1 -> 179.9 us and 294.6 -> 296.0 us). The draft's
# self-attention uses it too (models/glide.py: the ring as a one-layer cache). Off against on in one call
# (2026-12-04, e2e_ab_qkv_rope_off_h200.json against e2e_ab_base_rope_h200.json, with the one-launch RoPE tables):
# AR step 171.2 -> 157.5 us (72 -> 56 kernels), tree verify 260.5 -> 235.5 us, one draft level 69.3 -> 66.5 us
# (24 -> 22 kernels), the default tree 9,710 -> 10,385 tokens/s.
QKV_ROPE = os.environ.get("LONGSPEC_QKV_ROPE", "auto")
# LONGSPEC_FUSE_RESIDUAL: a layer's o_proj (with its residual) and the next norm + gate/up in one launch
# (`residual_norm_linear`, kernels/norm_linear.py's prologue), one launch less per layer. "auto": on CUDA for small
# weights and hidden sizes up to the kernel's MAX_PRE_K; "on": also under the CPU interpreter (tests); "off", the
# default, because it measured slower on the H200 (2026-12-04, one call): alone 5.5 / 5.7 / 6.2 us at 1 / 16 / 72
# rows against 4.9 / 5.3 / 5.8 us for the two launches (norm_linear_residual_h200.json: every column tile redoes
# the o_proj of its rows), and in the decoder the AR step 168.5 -> 176.6 us with 8 fewer kernels, the default
# tree 9,582 -> 9,600 tokens/s (e2e_ab_fuse_residual_h200.json against e2e_ab_base_step_h200.json).
FUSE_RESIDUAL = os.environ.get("LONGSPEC_FUSE_RESIDUAL", "off")
# LONGSPEC_LM_HEAD: the LM head (with the target's final norm) as one more `norm_linear` projection ("auto", the
# default: the kernel where LONGSPEC_NORM_LINEAR's rule serves it, the embedded model's 4,096 x 256 head on CUDA),
# or the norm and `F.linear` apart ("torch": on the H200 cuBLAS's matmul, launched without PDL, plus Inductor's
# norm kernel before it). Neutral on the H200 in one call (2026-12-04, e2e_h200.json against
# e2e_ab_lm_head_torch_h200.json): AR 7,588 against 7,545 tokens/s, the default tree 12,558 against 12,646, one
# kernel fewer in an AR step (56 -> 55) and a verify.
# Under "auto" an LM head larger than AUTO_MAX_WEIGHT (an 8B model's 128,256 x 4,096) also takes the kernel when the
# call has at most HEAD_KERNEL_ROWS rows (a decode step, a draft level): alone, in captured graphs on an H100
# (2026-12-05, profile_8b_stream_on_h100.json and profile_8b_unfused_h100.json), it read the 1.05 GB head at
# 1.00-1.03x the copy-bandwidth floor (347-361 us) where cuBLAS took 1.04-1.12x (360-390 us) at 1 and 16 rows; at 72
# rows (a verify) it took 2.0x and cuBLAS 1.07-1.12x, so a verify keeps cuBLAS. Not yet timed inside the decoder.
HEAD_KERNEL_ROWS = 16
LM_HEAD = os.environ.get("LONGSPEC_LM_HEAD", "auto")
# LONGSPEC_STREAM_LINEAR: projections of at most STREAM_MAX_ROWS rows (a decode, a draft level) through large
# weights go to `kernels/stream_linear.py` (split-K, the weight read before the PDL wait, the norm and epilogue
# fused) instead of cuBLAS. "auto": on CUDA for weights of more than AUTO_MAX_WEIGHT elements (an 8B model's; the
# embedded model keeps `norm_linear`); "on": for every weight, on CUDA or under the CPU interpreter (tests); "off":
# never. Not used with a bias.
STREAM_LINEAR = os.environ.get("LONGSPEC_STREAM_LINEAR", "off")
STREAM_MAX_ROWS = 16  # kernels/stream_linear.py's MAX_ROWS (this module does not import Triton at start-up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)): normalised in float32 (float64 stays float64), as the reference implementations
    do, rounded back to x's dtype, then times the weight; one fused kernel (torch.rms_norm)."""
    xf = F.rms_norm(x if x.dtype == torch.float64 else x.float(), (x.shape[-1],), eps=eps)
    return weight * xf.to(x.dtype)


def _inference_operands(x, weight, bias, norm, residual) -> bool:
    """A kernel's precondition: no operand needs a gradient (the kernels have no backward: training keeps the
    PyTorch ops) and every operand has x's dtype."""
    tensors = [t for t in (x, weight, None if norm is None else norm[0], residual, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.dtype == x.dtype for t in tensors)


def _stream_path(x: torch.Tensor, weight: torch.Tensor, bias, norm, residual=None) -> bool:
    if checked("LONGSPEC_STREAM_LINEAR", STREAM_LINEAR, CHOICES) == "off" or not HAS_TRITON or bias is not None:
        return False
    if x.numel() > STREAM_MAX_ROWS * x.shape[-1] or not _inference_operands(x, weight, bias, norm, residual):
        return False
    if STREAM_LINEAR == "auto":
        return x.is_cuda and weight.numel() > AUTO_MAX_WEIGHT
    return x.is_cuda or _interpreting()


def _kernel_path(x: torch.Tensor, weight: torch.Tensor, bias, norm, residual=None) -> bool:
    if checked("LONGSPEC_NORM_LINEAR", NORM_LINEAR, CHOICES) == "off" or not HAS_TRITON:
        return False
    if not _inference_operands(x, weight, bias, norm, residual):
        return False
    if NORM_LINEAR == "auto":
        return x.is_cuda and weight.numel() <= AUTO_MAX_WEIGHT
    return x.is_cuda or _interpreting()


def qkv_rope_path(x: torch.Tensor, weight: torch.Tensor, bias, head_dim: int, cache_dtype) -> bool:
    """Whether `qkv_rope_cache` serves this projection: the switch is not off, a power-of-two head dim >= 32,
    one dtype for x, weight, bias (if any) and cache, no gradients, CUDA (or, with "on", the interpreter)."""
    if checked("LONGSPEC_QKV_ROPE", QKV_ROPE, CHOICES) == "off" or not HAS_TRITON:
        return False
    if head_dim < 32 or head_dim & (head_dim - 1) or not (x.dtype == weight.dtype == cache_dtype):
        return False
    if bias is not None and (bias.dtype != x.dtype or (torch.is_grad_enabled() and bias.requires_grad)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if QKV_ROPE == "auto":  # the kernel's tiles are tuned for small weights, as norm_linear's "auto"
        return x.is_cuda and weight.numel() <= AUTO_MAX_WEIGHT
    return x.is_cuda or _interpreting()


def qkv_rope_cache(x, weight, norm, cos, sin, k_cache, v_cache, layer: int, slots, num_heads, num_kv_heads, bias=None):
    """x [B, T, K] -> q [B, Hq, T, D] with RoPE, k (with RoPE) and v written to the caches [L, B, Hkv, S, D] at
    `layer`, slots [T]: one Triton kernel (`kernels/norm_linear.py`). Call it where `qkv_rope_path` says so."""
    from longspec_lab.kernels.norm_linear import qkv_rope_cache as fused

    nw, eps = norm if norm is not None else (None, 1e-6)
    return fused(x, weight, nw, eps, cos, sin, k_cache, v_cache, layer, slots, num_heads, num_kv_heads, bias)


def linear_rope_path(x: torch.Tensor, weight: torch.Tensor, bias, norm, cos, num_heads: int) -> bool:
    """Whether `linear_rope` serves a query projection with RoPE (weight [Hq D, K], norm (weight, eps) or None):
    as `qkv_rope_path` (the switch LONGSPEC_QKV_ROPE), with the norm weight and the tables in x's dtype."""
    D = weight.shape[0] // num_heads
    same = (norm is None or norm[0].dtype == x.dtype) and cos.dtype == x.dtype
    return same and qkv_rope_path(x, weight, bias, D, x.dtype)


def linear_rope(x, weight, norm, cos, sin, num_heads: int, bias=None):
    """x [B, T, K] -> [B, Hq, T, D]: `norm_linear(x, weight, bias, norm)` split into heads, with RoPE (tables cos,
    sin [B, 1, T, D]) on every head, in one Triton kernel (`kernels/norm_linear.py: linear_rope`): the GliDe
    draft's cross-attention query. Call it where `linear_rope_path` says so; the readable form is the projection
    then `models.layers.apply_rope`."""
    from longspec_lab.kernels.norm_linear import linear_rope as fused

    nw, eps = norm if norm is not None else (None, 1e-6)
    return fused(x, weight, nw, eps, cos, sin, num_heads, bias)


def norm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """x [..., K] -> [..., N]. norm: (RMSNorm weight [K], eps) applied to x first; weight [N, K] (gated: the
    gate rows then the up rows, [2N, K], and the output is silu(gate) * up); residual [..., N] added last."""
    if _stream_path(x, weight, bias, norm, residual):
        from longspec_lab.kernels.stream_linear import stream_linear

        nw, eps = norm if norm is not None else (None, 1e-6)
        return stream_linear(x, weight, nw, eps, residual, gated)
    if _kernel_path(x, weight, bias, norm, residual):
        from longspec_lab.kernels.norm_linear import norm_linear as fused

        nw, eps = norm if norm is not None else (None, 1e-6)
        return fused(x, weight, nw, eps, residual, gated, bias)
    h = x if norm is None else rms_norm(x, *norm)
    y = F.linear(h, weight, bias)
    if gated:
        gate, up = y.chunk(2, dim=-1)  # [..., N] each
        y = F.silu(gate) * up
    return y if residual is None else residual + y


def lm_head(x: torch.Tensor, weight: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Logits [..., V] of hidden states x [..., K]: linear(rms_norm(x) if norm else x, weight [V, K]). Through
    `norm_linear` (LONGSPEC_LM_HEAD=auto; a large head with at most HEAD_KERNEL_ROWS rows on CUDA goes to its kernel
    whatever the size rule), or as the norm and `F.linear` apart ("torch"); the same ops on the CPU."""
    if checked("LONGSPEC_LM_HEAD", LM_HEAD, ("auto", "torch")) == "auto":
        if _large_head_kernel(x, weight, norm):
            from longspec_lab.kernels.norm_linear import norm_linear as fused

            nw, eps = norm if norm is not None else (None, 1e-6)
            return fused(x, weight, nw, eps, None, False, None)
        return norm_linear(x, weight, norm=norm)
    return F.linear(x if norm is None else rms_norm(x, *norm), weight)


def _large_head_kernel(x: torch.Tensor, weight: torch.Tensor, norm, on_gpu: bool | None = None) -> bool:
    """Whether `lm_head` sends a head that LONGSPEC_NORM_LINEAR=auto leaves to cuBLAS (more than AUTO_MAX_WEIGHT
    elements) to the kernel anyway: at most HEAD_KERNEL_ROWS rows, on CUDA (on_gpu: x.is_cuda unless given), the
    switch not off (see LM_HEAD)."""
    on_gpu = x.is_cuda if on_gpu is None else on_gpu
    if checked("LONGSPEC_NORM_LINEAR", NORM_LINEAR, CHOICES) == "off" or not HAS_TRITON or not on_gpu:
        return False
    if weight.numel() <= AUTO_MAX_WEIGHT or x.numel() > HEAD_KERNEL_ROWS * x.shape[-1]:
        return False  # a small head takes the kernel by norm_linear's own rule; a verify's rows keep cuBLAS
    return _inference_operands(x, weight, None, norm, None)


def residual_norm_linear(a, w_pre, b_pre, residual, weight, bias=None, norm=None, gated: bool = False):
    """x = residual + a @ w_pre^T (+ b_pre), then y = norm_linear(x, weight, bias, norm, gated=gated): (x, y).
    The readable path is those two `norm_linear` calls; with LONGSPEC_FUSE_RESIDUAL they are one kernel launch
    where it serves (no biases, small weights, a hidden size the kernel holds in registers), same rounding."""
    switch = checked("LONGSPEC_FUSE_RESIDUAL", FUSE_RESIDUAL, CHOICES)
    if switch != "off" and b_pre is None and _fused_residual_serves(a, w_pre, residual, weight, bias, norm, switch):
        from longspec_lab.kernels.norm_linear import residual_norm_linear as fused

        nw, eps = norm if norm is not None else (None, 1e-6)
        return fused(a, w_pre, residual, weight, nw, eps, gated)
    x = norm_linear(a, w_pre, b_pre, residual=residual)
    return x, norm_linear(x, weight, bias, norm, gated=gated)


def _fused_residual_serves(a, w_pre, residual, weight, bias, norm, switch: str) -> bool:
    from longspec_lab.kernels.norm_linear import MAX_PRE_K  # only reached when the switch is not off

    if bias is not None or not HAS_TRITON or w_pre.shape[0] > MAX_PRE_K:
        return False
    tensors = [t for t in (a, w_pre, residual, weight, None if norm is None else norm[0]) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if any(t.dtype != a.dtype for t in tensors):
        return False
    if switch == "auto":
        return a.is_cuda and max(w_pre.numel(), weight.numel()) <= AUTO_MAX_WEIGHT
    return a.is_cuda or _interpreting()
