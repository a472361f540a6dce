"""Hybrid tree attention behind one function, with a backend switch.

A block of T new query rows (pending tokens + tree nodes) attends to
  * a prefix of P cached positions, all visible (no mask needed), and
  * the block's own T keys, under a boolean mask (causal, or the tree mask).
Each part gives an output `o` and a log-sum-exp `lse`; they merge exactly (LongSpec,
arXiv 2502.17421, docs/LONGSPEC.md section 3):

    w = sigmoid(lse_prefix - lse_block);   o = w * o_prefix + (1 - w) * o_block

Backends
  "torch"  : the split + merge above in plain PyTorch (the readable reference path)
  "sdpa"   : one `scaled_dot_product_attention` call with a dense [T, P+T] bool mask
  "triton" : `longspec_lab.kernels.tree_attention` (split-KV, GQA-shared tiles, one pass)
and, inside batch-invariant decoding only, "ordered": `longspec_lab.kernels.ordered_attention`, which
sums every row's keys in one canonical order (prefix, then its visible block keys), so a token's output
does not depend on whether its ancestors are tree keys or committed prefix keys.

Taught in: notebooks/04_hybrid_tree_attention_and_the_triton_kernel.ipynb.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from longspec_lab.ops.switches import HAS_TRITON, checked

BACKENDS = ("torch", "sdpa", "triton")
# How `masked_sdpa` (the draft's window attention) computes:
#   "auto" (default)  "triton" on CUDA, "sdpa" elsewhere (the CPU, or no Triton);
#   "sdpa"            one scaled_dot_product_attention call, which on the H200 picks cuDNN (12.8 us for a
#                     16-row tree level, profile_ab_base_h200.json);
#   "efficient"       the same call held to SDPA's memory-efficient kernel (math where that is missing, as on
#                     the CPU);
#   "math"            the grouped softmax written out (`_part`), which torch.compile fuses around two small
#                     matmuls; on CUDA in half precision the matmuls run on the tensor cores with float32
#                     outputs (`_mm_f32`), as a flash kernel does;
#   "triton"          one launch of `longspec_lab.kernels.masked_attention` (the keys split over programs, the GQA
#                     heads stacked in one row tile, the last program merges) on CUDA or under TRITON_INTERPRET=1;
#                     "math" elsewhere.
# Measured on the H200 (2026-12-04, e2e_ab_*_h200.json, AR + chain gamma 5 + the default tree, each A/B in one
# call): a tree level took 82.1 us with "sdpa", 75.4 with "math", 100.2 with "efficient"; a chain level 63.8,
# 66.6 and 84.2. Then "triton" against "math" for tree levels and "sdpa" for one row (the previous "auto"): tree
# level 72.3 against 77.9 us (29 -> 25 kernels), chain level 57.8 against 61.1, chain gamma 5 9,956 against
# 9,565 tokens/s, the default tree 9,007 against 8,833 (e2e_ab_masked_triton_h200.json). Alone, over a ring of
# 586 keys, the kernel takes 6.9-8.2 us where the compiled "math" form takes 12.3-13.5 and SDPA 14.9-24.1
# (masked_attention_split_h200.json). A first "math" with float32 matmuls took 92.3 and 75.4: cuBLAS ran them on
# the FP32 units (an sm80 FFMA GEMM of 14.9 us, profile_ab_masked_math_h200.json).
MASKED_CHOICES = ("auto", "sdpa", "efficient", "math", "triton")
MASKED_ATTN = os.environ.get("LONGSPEC_MASKED_ATTN", "auto")


def default_backend(device) -> str:
    return "triton" if torch.device(device).type == "cuda" else "torch"


def check_backend(backend: str, device=None) -> str:
    """`backend` if it is known and can run on `device`, else a ValueError naming the fix."""
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend={backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if backend == "triton" and device is not None and torch.device(device).type != "cuda" and not _interpreting():
        raise ValueError(
            "attention_backend='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for the slow CPU interpreter); "
            "use 'torch' or 'sdpa' on this device"
        )
    return backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(backend: str, q: torch.Tensor) -> bool:
    """The Triton kernel runs on CUDA, or on the CPU under the Triton interpreter (tests)."""
    return backend == "triton" and (q.device.type == "cuda" or _interpreting())


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] with a float32 result. Half-precision inputs stay in their dtype and, on
    CUDA, the matrix unit accumulates in float32 (aten's bmm with out_dtype; the CPU, which lacks that form,
    multiplies them in float32). Other dtypes go to float32 first."""
    if not (a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)):
        return torch.matmul(a.float(), b.float())
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:])  # [batch, M, K]
    b3 = b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])  # [batch, K, N]
    c = torch.bmm(a3, b3, out_dtype=torch.float32) if a.is_cuda else torch.bmm(a3.float(), b3.float())
    return c.reshape(*lead, a.shape[-2], b.shape[-1])  # [..., M, N] fp32


def _part(qg, k, v, mask, scale, tensor_cores: bool = False):
    """Softmax attention of grouped queries over one key range.
    qg [B, Hkv, G*T, D], k/v [B, Hkv, N, D], mask [G*T, N] bool or None -> o (fp32), lse (fp32).
    tensor_cores: the two matmuls through `_mm_f32` (half-precision inputs, probabilities rounded to v's dtype
    as flash kernels do); otherwise in float32, the definition."""
    if tensor_cores:
        s = _mm_f32(qg, k.to(qg.dtype).transpose(-1, -2)) * scale  # [B, Hkv, G*T, N] fp32
    else:
        s = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale  # [B, Hkv, G*T, N]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # [B, Hkv, G*T, 1] row max
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows with no visible key
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    pv = _mm_f32(p.to(qg.dtype), v.to(qg.dtype)) if tensor_cores else torch.matmul(p, v.float())
    o = pv / denom.clamp_min(torch.finfo(torch.float32).tiny)
    lse = (m + torch.log(denom)).squeeze(-1)  # [B, Hkv, G*T]; -inf where nothing is visible
    return o, lse


def hybrid_torch(q, k, v, prefix_len: int, block_len: int, block_mask, scale):
    """Plain-PyTorch hybrid attention. Returns o [B, Hq, T, D] (fp32) and lse [B, Hq, T] (fp32)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * T, D)  # query head h uses kv head h // G
    parts = []
    if prefix_len > 0:
        parts.append(_part(qg, k[:, :, :prefix_len], v[:, :, :prefix_len], None, scale))
    if block_len > 0:
        kb = k[:, :, prefix_len : prefix_len + block_len]
        vb = v[:, :, prefix_len : prefix_len + block_len]
        m = block_mask.to(q.device).repeat(G, 1) if block_mask is not None else None  # [G*T, Tb]
        parts.append(_part(qg, kb, vb, m, scale))
    if len(parts) == 1:
        o, lse = parts[0]
    else:
        (o_p, lse_p), (o_t, lse_t) = parts
        w = torch.sigmoid(lse_p - lse_t)[..., None]  # share of the prefix in the softmax mass
        o = w * o_p + (1 - w) * o_t
        lse = torch.logaddexp(lse_p, lse_t)
    return o.reshape(B, Hq, T, D), lse.reshape(B, Hq, T)


def _dense_mask(prefix_len, block_len, block_mask, T, device):
    full = torch.ones(T, prefix_len + block_len, dtype=torch.bool, device=device)
    if block_len:
        full[:, prefix_len:] = block_mask
    return full


def masked_sdpa(q, k, v, mask, tail_mask=None):
    """Attention of q [B, Hq, T, D] over k, v [B, Hkv, S, D] under a bool mask [T, S] (True = visible), or, with
    tail_mask [T, S_tail], under cat([mask, tail_mask], 1) with mask [T or 1, S - S_tail]: the "triton" form reads
    the two parts where they lie, the others concatenate them.
    The KV heads are expanded to the query heads: SDPA's memory-efficient kernel takes a boolean
    mask but not `enable_gqa`, and its fallback costs a dozen launches. Every row needs >= 1 key.
    With MASKED_ATTN "math" the same attention is written out over the grouped heads (no expansion); with
    "efficient" SDPA may use only its memory-efficient kernel (or math); with "triton" (and "auto" on CUDA) it is
    one kernel launch (CUDA, or the CPU interpreter; "math" where neither runs)."""
    G = q.shape[1] // k.shape[1]
    form = checked("LONGSPEC_MASKED_ATTN", MASKED_ATTN, MASKED_CHOICES)
    if form == "auto":
        form = "triton" if q.is_cuda and HAS_TRITON else "sdpa"
    if form == "triton":
        D = q.shape[-1]
        if (q.is_cuda or _interpreting()) and D >= 16 and not D & (D - 1):
            from longspec_lab.kernels.masked_attention import masked_attention

            return masked_attention(q, k.to(q.dtype), v.to(q.dtype), mask, tail_mask=tail_mask)
        form = "math"
    if tail_mask is not None:  # [T, S]: the window part for every row, then the tail
        mask = torch.cat([mask.expand(tail_mask.shape[0], -1), tail_mask], 1)
    if form == "math":
        B, Hq, T, D = q.shape
        rows = mask.repeat(G, 1) if mask.shape[0] == T and G > 1 else mask  # [G*T or 1, S]
        o, _ = _part(q.reshape(B, k.shape[1], G * T, D), k, v, rows, D**-0.5, tensor_cores=True)  # [B,Hkv,G*T,D]
        return o.reshape(B, Hq, T, D).to(q.dtype)
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    if form == "efficient":
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)


def prefix_attention(q, k, v, prefix_len: torch.Tensor, backend: str = "torch"):
    """Attention of q [B, Hq, T, D] over the first prefix_len [1] (a device tensor, >= 1) of the S slots
    of k, v [B, Hkv, S, D], all visible: the draft's cross-attention to the target's cache. With the
    "triton" backend on CUDA this is the tree kernel's split-KV prefix alone (its prefix-only mode: no block keys,
    so no mask to build or pack)."""
    T, S = q.shape[2], k.shape[2]
    if _use_triton(backend, q) and q.shape[-1] in (64, 128):
        from longspec_lab.kernels.tree_attention import tree_attention

        return tree_attention(q, k.to(q.dtype), v.to(q.dtype), prefix_len, None, max_prefix=S - T, prefix_only=True)
    vis = (torch.arange(S, device=q.device) < prefix_len)[None]  # [1, S]
    return masked_sdpa(q, k, v, vis)


def block_mask_words(block_mask, backend: str, device) -> torch.Tensor | None:
    """The block mask [T, T] bool as the Triton tree kernel reads it, bit-packed (int32 [1, T, W]), or None where
    that kernel does not serve `backend` on `device` (or there is no mask). A model makes it once per pass and
    hands it to every layer's `attend(..., mask_words=)`: compiled, each layer's own packing was a kernel."""
    if block_mask is None or backend != "triton" or not (torch.device(device).type == "cuda" or _interpreting()):
        return None
    from longspec_lab.kernels.tree_attention import pack_block_mask

    return pack_block_mask(block_mask)


def attend_static(q, k, v, prefix_len: torch.Tensor, block_mask, backend: str, block_len: int, mask_words=None):
    """The same attention with the prefix length in a device tensor [1] and shapes that do not
    depend on it (CUDA graphs, torch.compile): keys are all S cache slots, hidden by a mask built on
    the device. The "triton" backend reads only [0, prefix_len + T) whatever S is, and reads the mask as
    `mask_words` (`block_mask_words(block_mask, ...)`) where the caller made them."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    if backend == "ordered":  # batch-invariant decoding: one key order per row, whatever the pass
        from longspec_lab.kernels.ordered_attention import ordered_attention

        return ordered_attention(q, k, v, prefix_len, block_mask)
    if _use_triton(backend, q) and block_len == T:
        from longspec_lab.kernels.tree_attention import tree_attention

        return tree_attention(q, k, v, prefix_len, block_mask, max_prefix=S - T, packed_mask=mask_words)
    j = torch.arange(S, device=q.device)
    vis = (j < prefix_len)[None].expand(T, S)  # [T, S] the prefix, all visible
    if block_len:
        if block_mask is None:
            block_mask = torch.ones(T, block_len, dtype=torch.bool, device=q.device).tril(block_len - T)
        rel = j - prefix_len  # slot -> index inside the block
        inside = (rel >= 0) & (rel < block_len)
        vis = vis | (block_mask[:, rel.clamp(0, block_len - 1)] & inside)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=D**-0.5, enable_gqa=True)


def attend(
    q, k, v, prefix_len: int, block_mask=None, backend: str = "torch", block_len=None, return_lse: bool = False,
    mask_words=None,
):  # fmt: skip
    """Attention of q [B, Hq, T, D] over cache slots [0, prefix_len) (all visible) plus the
    block of `block_len` (default T) keys at [prefix_len, prefix_len + block_len) under
    `block_mask` [T, block_len] (True = visible; None = causal). Returns [B, Hq, T, D] in q.dtype.
    `mask_words`: `block_mask_words(block_mask, backend, device)`, made once for the layers of a pass."""
    B, Hq, T, D = q.shape
    block_len = T if block_len is None else block_len
    if isinstance(prefix_len, torch.Tensor):
        return attend_static(q, k, v, prefix_len, block_mask, backend, block_len, mask_words)
    scale = D**-0.5
    if backend == "triton" and block_len == T:
        from longspec_lab.kernels.tree_attention import tree_attention

        # block_mask None = causal, handled inside the kernel without a mask tensor
        return tree_attention(q, k, v, prefix_len, block_mask, scale=scale, return_lse=return_lse,
                              packed_mask=mask_words)  # fmt: skip
    if block_mask is None and prefix_len == 0 and block_len == T and not return_lse:
        # causal prefill: SDPA's causal kernels need no mask tensor at all
        return F.scaled_dot_product_attention(q, k[:, :, :T], v[:, :, :T], is_causal=True, scale=scale, enable_gqa=True)
    if block_mask is None and block_len:
        block_mask = torch.ones(T, block_len, dtype=torch.bool, device=q.device).tril(block_len - T)
    # a block with no prefix (prefill) has nothing to merge: one fused call does the same maths
    if (backend == "sdpa" or prefix_len == 0) and not return_lse and block_len > 0:
        n = prefix_len + block_len
        mask = _dense_mask(prefix_len, block_len, block_mask, T, q.device)
        return F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], attn_mask=mask, scale=scale, enable_gqa=True)
    if backend not in BACKENDS:
        check_backend(backend)
    o, lse = hybrid_torch(q, k, v, prefix_len, block_len, block_mask, scale)
    return (o.to(q.dtype), lse) if return_lse else o.to(q.dtype)
