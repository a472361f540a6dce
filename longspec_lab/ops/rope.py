"""RoPE tables for explicit positions, and the cache slots of a static-shape step: one definition, two paths.

Llama's rotary embedding (RoFormer, arXiv 2104.09864) rotates query/key pairs by p * inv_freq[i] at position p.
`rope_tables` builds, for positions [B, T],

    freqs = float32(p) * inv_freq;  cos, sin = cos(cat(freqs, freqs)), sin(...)   # [B, T, D] in the model's dtype
    slots = start + arange(T)        # only with a device-tensor start: the cache rows the step writes

as PyTorch ops (the readable path; what `models/layers.py: Rotary` computes), or, for a static-shape step of the
target (a start on the device, every layer reading the tables), as one kernel launch
(`kernels/rope.py`). A compiled step otherwise gets one table kernel per layer: Inductor recomputes the inputs
of each layer's fused projection op for that op alone (kernels/rope.py's docstring has the measurement).
LONGSPEC_ROPE_TABLES picks:

    auto (default)  the kernel on CUDA (float32 frequencies, a float16/bfloat16/float32 table), PyTorch otherwise
    on              the kernel wherever it runs (also under TRITON_INTERPRET=1 on the CPU: how the tests run it)
    off             PyTorch ops everywhere

Both paths give the same bits on CUDA (`python -m longspec_lab.kernels.rope` checks it): float32 products, the
same float32 cos/sin, one rounding to the table's dtype. Measured on the H200 (2026-12-04, one call,
e2e_ab_base_rope_h200.json against e2e_ab_rope_tables_off_h200.json): the AR step 168.2 -> 157.5 us (66 -> 56
kernels), the default tree's verify 244.0 -> 235.5 us (74 -> 65 kernels), the tree 10,276 -> 10,385 tokens/s;
alone, 1.6-1.7 us against 2.3 us for the compiled PyTorch ops (rope_tables_h200.json).

Taught in: notebooks/07_timing_real_gpu_runs.ipynb
"""

from __future__ import annotations

import os

import torch

from longspec_lab.ops.attention import _interpreting
from longspec_lab.ops.switches import HAS_TRITON, checked

CHOICES = ("auto", "off", "on")
ROPE_TABLES = os.environ.get("LONGSPEC_ROPE_TABLES", "auto")  # one of CHOICES (module docstring)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_path(positions: torch.Tensor, inv_freq: torch.Tensor, dtype, start) -> bool:
    if checked("LONGSPEC_ROPE_TABLES", ROPE_TABLES, CHOICES) == "off" or not HAS_TRITON or start is None:
        return False
    if inv_freq.dtype != torch.float32 or dtype not in _KERNEL_DTYPES or positions.dtype != torch.int64:
        return False  # float64 frequencies (float64 models) keep the readable path
    if not isinstance(start, torch.Tensor) or start.shape != (1,) or start.dtype != torch.int64:
        return False
    return positions.is_cuda or (ROPE_TABLES == "on" and _interpreting())


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, start=None):
    """positions [B, T] -> cos, sin [B, 1, T, D] in dtype, and slots = start + arange(T) [T] when start is a
    device tensor [1] (None for an int start or none). With a tensor start the kernel may serve (module docstring)."""
    if _kernel_path(positions, inv_freq, dtype, start):
        from longspec_lab.kernels.rope import rope_tables as fused

        cos, sin, slots = fused(positions, inv_freq, dtype, start)
        return cos[:, None], sin[:, None], slots
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, D]
    slots = start + torch.arange(positions.shape[-1], device=positions.device) if torch.is_tensor(start) else None
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None], slots
