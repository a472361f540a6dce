"""Position-ordered attention: the batch-invariant attention of `--batch-invariant` decoding.

Why it exists. In bf16 a greedy tree run can part from a plain AR run at a near-tied logit although
both compute "the same" logits: a token's keys are summed in a different order. In an AR step the
token's ancestors are already in the committed prefix, slots [0, P_ar); in a verification pass they
are tree keys in the block after the prefix, and the hybrid kernel sums prefix and tree separately,
with a split-KV plan that depends on P. Padding every pass to one row count (the decoder's
batch-invariant mode) fixes the matmuls, not this.

The fix is to give every query row one canonical key sequence and one fixed reduction order:

    virtual key v of row i  =  slot v                      for v < P (the committed prefix)
                               slot P + c_i[v - P]         for P <= v < P + n_i (its visible block keys,
                                                           in slot order: pending tokens, then ancestors)

and to reduce over v in tiles [0, BLOCK_N), [BLOCK_N, 2 BLOCK_N), ... with an online softmax, one
program per (row, query head), nothing shared between rows. A token at depth d of a tree and the same
token decoded by AR then see the same keys at the same virtual positions, and their outputs are
bit-identical whatever P, the number of rows or the tree around them. Not fast (every program streams
its whole prefix; the block mask is gathered per row); it is an option that buys exactness.

`ordered_attention_reference` is the same definition in PyTorch (a gather into the virtual order, then
dense softmax), used on the CPU and by the tests in float64. `main` times it against the tree kernel.

    python -m longspec_lab.kernels.ordered_attention --prefix 2048 --rows 128

Taught in: notebooks/04_hybrid_tree_attention_and_the_triton_kernel.ipynb
"""

import os

import torch
import triton
import triton.language as tl

from longspec_lab.kernels.launch import launch_args
from longspec_lab.kernels.tree_attention import _max, _sum

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634


@triton.jit
def _ordered_attn_kernel(
    Q,  # [B, Hq, T, D] queries
    K,  # [B, Hkv, S, D] key cache; the block's keys sit at slots [P, P + T)
    V,  # [B, Hkv, S, D] value cache, same layout
    O,  # [B, Hq, T, D] output, q's dtype
    P_ptr,  # [1] int64: the committed prefix length P (a device tensor: static shapes)
    COLS,  # [T, T] int64: row i's visible block columns in ascending order, then padding
    COUNT,  # [T] int64: how many block columns row i sees (n_i)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    T,  # block rows
    Hq,  # query heads
    qk_scale,  # softmax scale x log2(e): scores in log2 units for exp2
    G: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,  # D, a power of two
    BLOCK_N: tl.constexpr,  # keys per tile; tile boundaries sit at multiples of BLOCK_N of the virtual order
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
):  # fmt: skip
    if USE_PDL:  # before any other memory access, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    row = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    P = tl.load(P_ptr)
    n_i = tl.load(COUNT + row)
    L = P + n_i  # the row's virtual sequence length
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + h * stride_qh + row * stride_qt + offs_d * stride_qd).to(tl.float32)
    q = q[None, :]  # [1, D]
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.full([1], 0.0, dtype=tl.float32)
    acc = tl.full([HEAD_DIM], 0.0, dtype=tl.float32)
    L = tl.where(n_i > 0, L, 0)  # a row that sees no block key is padding: no work, output 0
    for start in range(0, L, BLOCK_N):
        v_idx = start + offs_n  # [BLOCK_N] virtual positions
        valid = v_idx < L
        in_prefix = v_idx < P
        r = v_idx - P
        col = tl.load(COLS + row * T + r, mask=valid & (r >= 0), other=0)
        slot = tl.where(in_prefix, v_idx, P + col)
        k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=valid[:, None], other=0.0)
        s = _sum(k.to(tl.float32) * q, 1) * qk_scale  # [BLOCK_N]
        s = tl.where(valid, s, float("-inf"))[None, :]  # [1, BLOCK_N]
        m_new = tl.maximum(m_i, _max(s, 1))  # [1]
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [1, BLOCK_N]
        l_i = l_i * alpha + _sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=valid[:, None], other=0.0)
        acc = acc * alpha + _sum(tl.trans(v.to(tl.float32)) * p, 1)  # [D]
        m_i = m_new
    o = tl.where(l_i > 0, acc / l_i, 0.0)
    tl.store(O + b * stride_ob + h * stride_oh + row * stride_ot + offs_d * stride_od, o.to(O.dtype.element_ty))


def block_order(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols [T, T], count [T]): each row's visible block columns in ascending order (then padding)."""
    T = block_mask.shape[0]
    ar = torch.arange(T, device=block_mask.device)
    cols = torch.sort(torch.where(block_mask, ar, T + ar), dim=1).values  # visible columns first, in order
    return cols.clamp(max=T - 1), block_mask.sum(1)


def virtual_slots(prefix_len: torch.Tensor, block_mask: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot [T, S], valid [T, S]): the cache slot of each row's virtual key v, and whether v < P + n_i."""
    cols, count = block_order(block_mask)
    T = block_mask.shape[0]
    v = torch.arange(S, device=block_mask.device)
    P = prefix_len.reshape(()) if isinstance(prefix_len, torch.Tensor) else torch.tensor(prefix_len)
    r = v - P  # [S] index into the block
    in_prefix = (r < 0)[None].expand(T, S)
    col = cols[:, r.clamp(0, T - 1)]  # [T, S]
    valid = in_prefix | (r[None] < count[:, None])
    slot = torch.where(in_prefix, v[None].expand(T, S), P + col)
    return torch.where(valid, slot, torch.zeros_like(slot)).clamp(max=S - 1), valid


def ordered_attention_reference(q, k, v, prefix_len, block_mask, scale=None, dtype=torch.float64):
    """The definition in PyTorch: gather every row's keys into its virtual order, then softmax.
    q [B, Hq, T, D], k/v [B, Hkv, S, D], prefix_len int or [1] tensor, block_mask [T, T] bool.
    Every op is per row with shapes independent of the row's content, so it is batch-invariant too.
    Rows with an all-False mask row are padding and give 0. Returns [B, Hq, T, D] in `dtype`."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    slot, valid = virtual_slots(prefix_len, block_mask.to(q.device), S)  # [T, S]
    kg = k.to(dtype)[:, :, slot]  # [B, Hkv, T, S, D]
    vg = v.to(dtype)[:, :, slot]
    qg = q.to(dtype).reshape(B, Hkv, G, T, D).transpose(2, 3)  # [B, Hkv, T, G, D]
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # [B, Hkv, T, G, S]
    s = s.masked_fill(~valid[None, None, :, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, vg)  # [B, Hkv, T, G, D]
    padding = ~block_mask.to(q.device).any(1)  # [T] rows that see no block key: output 0
    o = o.masked_fill(padding[None, None, :, None, None], 0.0)
    return o.transpose(2, 3).reshape(B, Hq, T, D)


def as_ar_step(q, k, v, prefix_len: int, block_mask, row: int):
    """Row `row` of a verification block laid out as an AR step sees the same token: its visible block
    keys (pending tokens, ancestors) moved into the committed prefix, the token itself the first row of
    a block whose other rows see only themselves. Returns (q, k, v, prefix_len, block_mask) of that step;
    position-ordered attention gives that row the same bits as `row` of the original block."""
    T = block_mask.shape[0]
    anc = [j for j in range(T) if bool(block_mask[row, j]) and j != row]
    order = list(range(prefix_len)) + [prefix_len + j for j in anc]
    P2 = len(order)
    B, Hkv, _, D = k.shape
    k2 = torch.zeros(B, Hkv, P2 + T, D, dtype=k.dtype, device=k.device)  # [B, Hkv, P2 + T, D]
    v2 = torch.zeros_like(k2)
    k2[:, :, :P2], v2[:, :, :P2] = k[:, :, order], v[:, :, order]
    k2[:, :, P2], v2[:, :, P2] = k[:, :, prefix_len + row], v[:, :, prefix_len + row]
    q2 = torch.zeros_like(q)
    q2[:, :, 0] = q[:, :, row]
    return q2, k2, v2, P2, torch.eye(T, dtype=torch.bool, device=block_mask.device)


def _launch(q, k, v, P, cols, count, scale, block_n):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q)
    _ordered_attn_kernel[(T, B * Hq)](
        q, k, v, out, P, cols.contiguous(), count.contiguous(),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        T, Hq, scale * _LOG2E,
        G=Hq // Hkv, HEAD_DIM=D, BLOCK_N=block_n, **launch_args(q.device),
    )  # fmt: skip
    return out


# The block order (a sort of the mask's rows) is an input, not computed inside the op: a compiled pass
# then builds it once from the one block mask and shares it across the layers, where the op would sort
# the same mask again in every layer.
@torch.library.custom_op("longspec::ordered_attention", mutates_args=())
def _ordered_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: torch.Tensor,
    cols: torch.Tensor,
    count: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return _launch(q, k, v, prefix_len, cols, count, scale, 16 if _INTERPRET else 64)


@_ordered_attention_op.register_fake
def _(q, k, v, prefix_len, cols, count, scale):
    return torch.empty_like(q)


def ordered_attention(q, k, v, prefix_len, block_mask, scale=None, kernel: bool | None = None):
    """Position-ordered, batch-invariant attention (module docstring). q [B, Hq, T, D]; k, v [B, Hkv, S, D]
    with the block already written at [P, P + T); prefix_len int or [1] device tensor; block_mask [T, T]
    bool. A row that sees no block key (an all-False mask row) is padding: it costs nothing and its
    output is 0; a real row sees at least itself. kernel None: the Triton kernel on CUDA, the PyTorch definition
    in float32 on the CPU; True: the kernel (CUDA, or the CPU interpreter under TRITON_INTERPRET=1).
    Returns [B, Hq, T, D] in q's dtype."""
    D = q.shape[-1]
    if D & (D - 1):
        raise ValueError(f"ordered_attention needs a power-of-two head dim, got {D}")
    scale = D**-0.5 if scale is None else float(scale)
    kernel = q.is_cuda if kernel is None else kernel
    if kernel and not (q.is_cuda or _INTERPRET):
        raise ValueError("the ordered-attention kernel needs a CUDA GPU or TRITON_INTERPRET=1; pass kernel=None")
    if kernel:
        P = prefix_len if isinstance(prefix_len, torch.Tensor) else torch.tensor([prefix_len], device=q.device)
        cols, count = block_order(block_mask)  # [T, T], [T]
        return _ordered_attention_op(q, k, v, P.reshape(1).to(torch.int64), cols, count, scale)
    return ordered_attention_reference(q, k, v, prefix_len, block_mask, scale, torch.float32).to(q.dtype)


def main(argv=None) -> int:
    """Time the ordered kernel against the tree kernel on one batch-invariant pass (CUDA)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.kernels.ordered_attention",
        description="Time position-ordered (batch-invariant) attention against the hybrid tree kernel.",
    )
    ap.add_argument("--prefix", type=int, default=2048, help="committed prefix length P")
    ap.add_argument("--rows", type=int, default=128, help="rows of the padded pass")
    ap.add_argument("--heads", default="4,2,64", help="query heads, kv heads, head dim")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.exit(2, "error: the benchmark needs a CUDA GPU; the tests run the kernel on the CPU interpreter\n")
    from triton.testing import do_bench

    from longspec_lab.kernels.tree_attention import tree_attention

    Hq, Hkv, D = (int(x) for x in a.heads.split(","))
    T, P = a.rows, a.prefix
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, Hkv, P + T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    mask = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
    pl = torch.tensor([P], device="cuda")
    ours = do_bench(lambda: ordered_attention(q, k, v, pl, mask), return_mode="median") * 1e3
    tree = do_bench(lambda: tree_attention(q, k, v, pl, mask, max_prefix=P), return_mode="median") * 1e3
    print(f"P={P} rows={T}: ordered {ours:.1f} us, tree kernel {tree:.1f} us, ratio {ours / tree:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
