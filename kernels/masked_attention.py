"""Masked attention over a short cache in one kernel: the draft's sliding-window self-attention.

The GliDe draft (LongSpec, arXiv 2502.17421; `models/glide.py`) attends, at every tree level, from a few
query rows to its constant-size ring cache: W window slots, the pending block and the tree's scratch slots,
a few hundred keys in all, under a boolean mask built on the device (which ring slots are in a row's
window, which scratch slots are its ancestors). Written out in PyTorch (`ops/attention.py: _part`) that is
two small matmuls and a softmax between them; on the H200 cuBLAS runs the second one (K = the whole ring,
about 600, and only a few output tiles) as a 6-7 us GEMM, and the three launches cost more than the
arithmetic (data/results/profile_h200.json, a tree level's `top_kernels`).

Here one program owns BLOCK_M query rows of one KV head and walks the keys in tiles of BLOCK_N, with the
online softmax of flash attention (scores in log2 units, exp2):

    s = (q @ k^T) * scale * log2(e),  hidden where mask[t, n] is False
    m' = max(m, rowmax(s));  p = exp2(s - m');  l = l * exp2(m - m') + rowsum(p)
    acc = acc * exp2(m - m') + p @ v;  at the end o = acc / l

A single program walking a 600-key ring tile after tile is latency-bound (each 64-key tile costs about a
microsecond of dependent loads and reductions on the H200), so the keys are split over SPLITS programs, as
flash-decoding does: each stores its rows' normalised output and log-sum-exp, and the last program of a row
tile to arrive (an arrival ticket, acquire/release) merges them, in the same launch.

The mask may come in two parts (`tail_mask`): a tree level's nodes all sit at one position, so one row says which
window slots they see, and the tree mask's rows say which scratch slots (their ancestors) they see. Reading both
where they lie saves the launch that would concatenate them into one [T, S] mask at every level.

GQA without copies: the G query heads that share a KV head are stacked as G * T rows of one tile (row
r = g * T + t is query head hk * G + g at position t), so each K/V tile is read once per program. A row
that sees no key gets o = 0 (as `_part`). The two matmuls run on the tensor cores with float32
accumulation; float32 inputs use full-precision dots.

`masked_attention_reference` is the definition in float64 (the tests' reference). `masked_attention`
checks its inputs and calls the registered op `torch.ops.longspec.masked_attention`, which
torch.compile(fullgraph=True) keeps as one opaque op. `main` times it against PyTorch ops doing the same work
(compiled) and SDPA on the draft's shapes (the recorded runs compared the decoder's own written-out form,
`ops/attention.py: _part`, as `math_compiled`):

    python -m longspec_lab.kernels.masked_attention --rows 1,4,16 --keys 586

Taught in: notebooks/05_the_glide_draft.ipynb
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from longspec_lab.kernels.launch import TICKET_SLOTS, launch_args, tickets
from longspec_lab.kernels.tree_attention import _max, _sum

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when the kernel below is defined
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _mask_tile(M, t, row_ok, cols, col_ok, stride_row, ONE_ROW: tl.constexpr):
    """uint8 [BLOCK_M, BLOCK_N] visibility of the rows t at columns cols of the mask M (0 where not ok). ONE_ROW: M is
    one row for every query row, read once as a vector (rows past the query rows then see it too: never stored)."""
    if ONE_ROW:
        v = tl.load(M + cols, mask=col_ok, other=0)  # [BLOCK_N]
        return tl.broadcast_to(v[None, :], (t.shape[0], cols.shape[0]))
    return tl.load(M + t[:, None] * stride_row + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0)


@triton.jit
def _masked_attn_kernel(
    Q,  # [B, Hq, T, D] queries
    K,  # [B, Hkv, S, D] keys
    V,  # [B, Hkv, S, D] values
    MASK,  # uint8 [T or 1, S] (TAIL: [T or 1, S_HEAD]): 1 = row t may see key n (one row serves every row)
    MASK_TAIL,  # uint8 [T, S - S_HEAD], unit column stride: the mask of keys S_HEAD.. (read only if TAIL)
    O,  # [B, Hq, T, D] output, q's dtype
    O_PART,  # fp32 [B * Hkv, row tiles, SPLITS, BLOCK_M, D] each split's normalised output (SPLITS > 1)
    LSE_PART,  # fp32 [B * Hkv, row tiles, SPLITS, BLOCK_M] each split's log2-sum-exp2 of its scores (SPLITS > 1)
    TICKETS,  # int32 [>= B * Hkv * row tiles] arrival tickets, zero between launches (SPLITS > 1)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mt,  # row stride of MASK: S, or 0 when one mask row serves every query row
    stride_tt,  # row stride of MASK_TAIL (TAIL)
    S_HEAD,  # keys whose visibility MASK holds; MASK_TAIL holds the rest (TAIL)
    T,  # query rows per head
    S,  # keys
    Hkv,  # KV heads
    keys_per_split,  # keys each split walks, a multiple of BLOCK_N (S when SPLITS == 1)
    qk_scale,  # softmax scale x log2(e)
    G: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,  # D, a power of two >= 16
    BLOCK_M: tl.constexpr,  # stacked query rows (g * T + t) per program
    BLOCK_N: tl.constexpr,  # keys per tile
    IEEE: tl.constexpr,  # float32 inputs: full-precision dots instead of TF32
    SPLITS: tl.constexpr,  # programs per (row tile, KV head) along the keys, a power of two; grid axis 2
    TAIL: tl.constexpr,  # the mask comes in two parts: MASK for keys < S_HEAD, MASK_TAIL for the others
    ONE_ROW: tl.constexpr,  # MASK is one row shared by every query row: a [BLOCK_N] load, broadcast
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
):  # fmt: skip
    if USE_PDL:  # before any other memory access, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)  # b * Hkv + hk
    pid_s = tl.program_id(2)
    b = bh // Hkv
    hk = bh % Hkv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] stacked rows g * T + t
    row_ok = rows < G * T
    g = rows // T
    t = rows % T
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    head = (hk * G + g)[:, None]  # [BLOCK_M, 1] query head of each stacked row
    q_ptrs = Q + b * stride_qb + head * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, S)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n  # [BLOCK_N] key indices
        n_ok = n < hi
        k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=n_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        else:
            s = tl.dot(q, tl.trans(k))
        if TAIL:  # e.g. a tree level: its window rows (one row for the level), then its ancestors' scratch keys
            if start + BLOCK_N <= S_HEAD:  # a tile of the first part only: one load
                vis = _mask_tile(MASK, t, row_ok, n, n < S_HEAD, stride_mt, ONE_ROW)
            elif start >= S_HEAD:  # of the tail only
                vis = _mask_tile(MASK_TAIL, t, row_ok, n - S_HEAD, n_ok, stride_tt, False)
            else:  # the tile that straddles them
                vis_h = _mask_tile(MASK, t, row_ok, n, n < S_HEAD, stride_mt, ONE_ROW)
                vis = vis_h | _mask_tile(MASK_TAIL, t, row_ok, n - S_HEAD, n_ok & (n >= S_HEAD), stride_tt, False)
        else:
            vis = _mask_tile(MASK, t, row_ok, n, n_ok, stride_mt, ONE_ROW)
        s = tl.where(vis != 0, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, _max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay 0
        p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + _sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=n_ok[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # probabilities in v's dtype, as flash kernels
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that saw nothing: acc = 0, o = 0
    o_ptrs = O + b * stride_ob + head * stride_oh + t[:, None] * stride_ot + offs_d[None, :] * stride_od
    if SPLITS == 1:
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        # Flash-decoding: every split stores its rows' output and log2-sum-exp2; the last split to arrive
        # (an arrival ticket per row tile and KV head, acquire/release) merges them and resets the ticket.
        tile = bh * tl.num_programs(0) + pid_m  # this (KV head, row tile)
        local = tl.arange(0, BLOCK_M)
        part = (tile * SPLITS + pid_s) * BLOCK_M + local  # [BLOCK_M]
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], o)
        tl.store(LSE_PART + part, lse)
        tl.debug_barrier()  # every store of this program is issued before its ticket moves
        arrived = tl.atomic_add(TICKETS + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            first = tile * SPLITS * BLOCK_M + local  # split 0 of each row
            splits = tl.arange(0, SPLITS)
            lses = tl.load(LSE_PART + first[None, :] + splits[:, None] * BLOCK_M, cache_modifier=".cg")  # [SPLITS, M]
            top = _max(lses, 0)  # [BLOCK_M]
            top = tl.where(top == float("-inf"), 0.0, top)
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            merged = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            for sp in tl.static_range(SPLITS):
                w = tl.exp2(tl.load(LSE_PART + first + sp * BLOCK_M, cache_modifier=".cg") - top)  # [BLOCK_M]
                o_s = tl.load(
                    O_PART + (first + sp * BLOCK_M)[:, None] * HEAD_DIM + offs_d[None, :], cache_modifier=".cg"
                )
                total += w
                merged += w[:, None] * o_s
            merged = merged / tl.where(total > 0, total, 1.0)[:, None]
            tl.store(o_ptrs, merged.to(O.dtype.element_ty), mask=row_ok[:, None])
            tl.atomic_xchg(TICKETS + tile, 0)


def _torch_version(q, k, v, mask):
    """The same work as PyTorch ops, for the benchmark: the grouped heads' two matmuls in q's dtype with a float32
    softmax between them (what torch.compile fuses around two cuBLAS calls)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    s = (q.reshape(B, Hkv, G * T, D) @ k.transpose(-1, -2)).float() * D**-0.5  # [B, Hkv, G * T, S]
    rows = mask.repeat(G, 1) if mask.shape[0] > 1 else mask  # [G * T or 1, S]
    p = torch.softmax(s.masked_fill(~rows, float("-inf")), -1)
    return (p.to(v.dtype) @ v).reshape(B, Hq, T, D)


def masked_attention_reference(q, k, v, mask, scale=None, dtype=torch.float64):
    """The definition: softmax(q k^T * scale, hidden where mask is False) v, per query head over its KV head
    h // G. q [B, Hq, T, D]; k, v [B, Hkv, S, D]; mask [T or 1, S] bool. A row that sees no key gives 0.
    Returns [B, Hq, T, D] in `dtype`."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    kk = k.to(dtype).repeat_interleave(G, 1)  # [B, Hq, S, D]
    vv = v.to(dtype).repeat_interleave(G, 1)
    s = torch.matmul(q.to(dtype), kk.transpose(-1, -2)) * scale  # [B, Hq, T, S]
    s = s.masked_fill(~mask.to(q.device), float("-inf"))
    seen = mask.to(q.device).any(-1)  # [T or 1]
    p = torch.softmax(s.masked_fill(~seen[:, None], 0.0), -1)  # rows with nothing visible: any finite row
    return (p @ vv).masked_fill(~seen[:, None], 0.0)


# the largest row tile (LONGSPEC_MASKED_TILE_ROWS): 16 since 2026-12-06. A 16-parent level's 32 stacked rows in two
# tiles of 16 took 6.7 us alone on an H100 against 7.7 in one tile of 32 (data/results/masked_attention_rows_h100.json;
# 1 and 4 parents already used 16); 64 was the cap before.
TILE_ROWS = os.environ.get("LONGSPEC_MASKED_TILE_ROWS", "16")


def _tile_rows() -> int:
    """TILE_ROWS checked: 16, 32 or 64."""
    if str(TILE_ROWS).strip() not in ("16", "32", "64"):
        raise ValueError(f"LONGSPEC_MASKED_TILE_ROWS={TILE_ROWS!r} is not 16, 32 or 64; unset it (default 16)")
    return int(TILE_ROWS)


def launch_config(rows: int, keys: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, SPLITS) for `rows` = G * T stacked query rows over `keys` keys:
    row tiles of at most TILE_ROWS rows (more programs, each with fewer rows, pay better than fewer larger ones on a
    draft level's shapes), and about two 64-key tiles per split."""
    block_m = min(_tile_rows(), max(16, triton.next_power_of_2(rows)))
    splits = min(8, triton.next_power_of_2(triton.cdiv(keys, 128)))  # about two key tiles per split
    return block_m, 64, 4, 2, splits


def _launch(q, k, v, mask_u8, scale, config=None, tail_u8=None):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    block_m, block_n, warps, stages, splits = config or launch_config(G * T, S)
    if _INTERPRET:
        block_n = min(block_n, 32)
    row_tiles = triton.cdiv(G * T, block_m)
    per_split = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n  # whole key tiles per split
    out = torch.empty_like(q)
    if splits > 1:
        if B * Hkv * row_tiles > TICKET_SLOTS:
            raise ValueError(f"masked_attention: {B * Hkv * row_tiles} row tiles exceed the tickets; use splits=1")
        o_part = torch.empty(B * Hkv * row_tiles * splits * block_m, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B * Hkv * row_tiles * splits * block_m, dtype=torch.float32, device=q.device)
        arrivals = tickets(q.device)
    else:
        o_part = lse_part = arrivals = out  # never read
    _masked_attn_kernel[(row_tiles, B * Hkv, splits)](
        q, k, v, mask_u8, mask_u8 if tail_u8 is None else tail_u8, out, o_part, lse_part, arrivals,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        mask_u8.stride(0) if mask_u8.shape[0] > 1 else 0, 0 if tail_u8 is None else tail_u8.stride(0),
        S - (0 if tail_u8 is None else tail_u8.shape[1]), T, S, Hkv, per_split, scale * _LOG2E,
        G=G, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=q.dtype == torch.float32, SPLITS=splits,
        TAIL=tail_u8 is not None, ONE_ROW=mask_u8.shape[0] == 1, num_warps=warps, num_stages=stages,
        **launch_args(q.device),
    )  # fmt: skip
    return out


@torch.library.custom_op("longspec::masked_attention", mutates_args=())
def _masked_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
    tail_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:  # fmt: skip
    tail = None if tail_mask is None else tail_mask.view(torch.uint8)
    return _launch(q, k, v, mask.view(torch.uint8), scale, tail_u8=tail)  # Triton reads the bool masks as bytes


@_masked_attention_op.register_fake
def _(q, k, v, mask, scale, tail_mask=None):
    return torch.empty_like(q)


def _check(q, k, v, mask, tail_mask=None):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"masked_attention: {name} must be a 4-D tensor [B, heads, rows, D], got {got}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"masked_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B={B}, Hkv, S, D={D}]"
        )
    if k.shape[1] < 1 or Hq % k.shape[1]:
        raise ValueError(f"masked_attention: {Hq} query heads do not form whole groups over {k.shape[1]} KV heads")
    if D < 16 or D & (D - 1):
        raise ValueError(f"masked_attention: the head dim must be a power of two >= 16, got {D}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"masked_attention: q, k, v must share one of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, "
            f"{v.dtype} (cast k and v to q's dtype)"
        )
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"masked_attention: mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    S_tail = 0
    if tail_mask is not None:
        if not isinstance(tail_mask, torch.Tensor) or tail_mask.dtype != torch.bool or tail_mask.dim() != 2:
            raise ValueError("masked_attention: tail_mask must be a 2-D bool tensor [query rows, last keys]")
        S_tail = tail_mask.shape[1]
        if tail_mask.shape[0] != T or not 0 < S_tail <= k.shape[2]:
            raise ValueError(
                f"masked_attention: tail_mask shape {tuple(tail_mask.shape)} must be [{T}, S_tail] with "
                f"0 < S_tail <= {k.shape[2]} keys"
            )
        if tail_mask.device != q.device:
            raise ValueError("masked_attention: q, k, v and tail_mask must be on one device")
    S_head = k.shape[2] - S_tail
    if mask.dim() != 2 or mask.shape[0] not in (1, T) or mask.shape[1] != S_head:
        what = f"the first {S_head} keys; tail_mask covers the rest" if S_tail else "keys"
        raise ValueError(
            f"masked_attention: mask shape {tuple(mask.shape)} must be [{T} or 1, {S_head}] (query rows, {what})"
        )
    if not (q.device == k.device == v.device == mask.device):
        raise ValueError("masked_attention: q, k, v and mask must be on one device")


def _unit_columns(m: torch.Tensor) -> torch.Tensor:
    """m itself when its columns are adjacent (any row stride: a slice of a larger mask costs no copy)."""
    return m if m.stride(-1) == 1 else m.contiguous()


def masked_attention(q, k, v, mask, scale=None, tail_mask=None):
    """Attention of q [B, Hq, T, D] over k, v [B, Hkv, S, D] under a bool mask [T or 1, S] (True = visible),
    as `masked_attention_reference`, in one kernel launch (CUDA, or the CPU under TRITON_INTERPRET=1).
    With tail_mask [T, S_tail] the mask comes in two parts: `mask` [T or 1, S - S_tail] for the first keys and
    tail_mask for the last S_tail, as if concatenated, so neither is copied into one (a draft tree level: one
    window row for all its nodes, then rows of the tree mask). Returns [B, Hq, T, D] in q's dtype."""
    _check(q, k, v, mask, tail_mask)
    if not (q.is_cuda or _INTERPRET):
        raise ValueError(
            "the masked-attention kernel needs a CUDA GPU (or TRITON_INTERPRET=1); on the CPU use "
            "masked_attention_reference or ops.attention.masked_sdpa"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tail = None if tail_mask is None else _unit_columns(tail_mask)
    return _masked_attention_op(q, k, v, _unit_columns(mask), scale, tail)


def main(argv=None) -> int:
    """Time the kernel against the PyTorch forms on the draft's window-attention shapes (CUDA)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.kernels.masked_attention",
        description=(
            "Time the one-kernel masked attention against the same work as PyTorch ops (two matmuls and a "
            "softmax, compiled as the decoder compiles its stages) and one SDPA call, on the draft's window "
            "attention: a few query rows over its ring of about 600 keys under a random mask. Prints medians "
            "(us) replayed from CUDA graphs, each form first checked against the float64 definition."
        ),
    )
    ap.add_argument("--rows", default="1,4,16", help="comma-separated query rows T per head (tree level widths)")
    ap.add_argument("--keys", type=int, default=586, help="keys S (the ring: window + pending + scratch slots)")
    ap.add_argument("--heads", default="4,2,64", help="query heads, KV heads, head dim (default: the embedded draft)")
    ap.add_argument(
        "--configs",
        default="",
        help="extra launch configs to time, 'BLOCK_M:BLOCK_N:warps:stages:splits' separated by commas "
        "(e.g. 16:64:4:2:8; splits > 1 walk the keys in that many programs and the last one merges)",
    )
    ap.add_argument("--out", help="also write the medians, with the environment, to this JSON file (must not exist)")
    a = ap.parse_args(argv)
    try:
        rows = [int(r) for r in a.rows.split(",")]
        Hq, Hkv, D = (int(x) for x in a.heads.split(","))
        extra = [tuple(int(x) for x in c.split(":")) for c in a.configs.split(",") if c]
    except ValueError:
        ap.error("--rows, --heads and --configs take comma-separated integers (configs: M:N:warps:stages:splits)")
    if any(len(c) != 5 or c[4] < 1 or c[4] & (c[4] - 1) for c in extra):
        ap.error("--configs entries are BLOCK_M:BLOCK_N:warps:stages:splits, splits a power of two")
    if a.out and os.path.exists(a.out):
        ap.exit(2, f"error: {a.out} exists; pick another --out or remove it first\n")
    if not torch.cuda.is_available():
        ap.exit(
            2,
            "error: the benchmark needs a CUDA GPU; on the CPU the tests run the kernel in Triton's interpreter "
            "(.venv/bin/pytest tests/unit/kernels/test_masked_attention.py)\n",
        )
    from triton.testing import do_bench_cudagraph

    def sdpa_form(q, k, v, mask):
        G = Hq // Hkv
        kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

    torch_compiled = torch.compile(_torch_version, fullgraph=True, dynamic=False)
    report = {"heads": [Hq, Hkv, D], "keys": a.keys, "dtype": "bfloat16", "cases": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    for T in rows:
        q = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, Hkv, a.keys, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        mask = torch.rand(T, a.keys, device="cuda", generator=g) < 0.7
        mask[:, 0] = True
        want = masked_attention_reference(q, k, v, mask)
        forms = {
            "kernel": lambda: masked_attention(q, k, v, mask),
            "torch_compiled": lambda: torch_compiled(q, k, v, mask),
            "sdpa": lambda: sdpa_form(q, k, v, mask),
        }
        for c in extra:
            forms["kernel_" + ":".join(map(str, c))] = lambda c=c: _launch(q, k, v, mask.view(torch.uint8), D**-0.5, c)
        case = {"rows": T, "config": list(launch_config(Hq // Hkv * T, a.keys)), "us": {}, "max_abs_err": {}}
        for name, fn in forms.items():
            err = (fn().double() - want).abs().max().item()
            case["max_abs_err"][name] = err
            if err > 2e-2:
                print(f"T={T} {name}: max abs error {err:.3g} against float64 -- not timed")
                continue
            case["us"][name] = do_bench_cudagraph(fn, return_mode="median") * 1e3
        report["cases"].append(case)
        print(f"T={T} S={a.keys}: " + ", ".join(f"{n} {us:.1f} us" for n, us in case["us"].items()))
    if a.out:
        from longspec_lab.provenance import stamp, write_new_json

        write_new_json(a.out, stamp(report, torch.device("cuda"), torch.bfloat16))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
