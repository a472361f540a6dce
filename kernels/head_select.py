"""A beam level's LM head and its whole selection in one launch: logits, log-softmax, parent scores, top-w.

A beam level of the draft tree (LongSpec, arXiv 2502.17421; `spec/draft.py: beam_level`) ends with two steps
that each cost a launch on the GPU: the LM head turns the draft's last hidden rows into logits,

    logits[i, v] = h[i] . head[v]                               [n, V], rounded to h's dtype

and the selection keeps the w best (parent, token) pairs by

    score[i, v] = parent[i] + log_softmax(logits[i])[v]         (float32)

(`kernels/beam_select.py` does the second step in one launch). On the H200 the two took 2.5 + 4 to 10 us of a
45 us default-tree level (data/results/profile_h200.json). Here they are one launch, and the n x V logits are
never written.

One program owns BLOCK_V tokens (a vocabulary chunk) of every row:

    1. its logits tile [N_PAD, BLOCK_V] = h @ head[chunk]^T in float32, rounded to h's dtype as the LM head
       rounds its output (the head's tile is read before the programmatic-dependent-launch wait: it is a
       parameter, so its load overlaps the kernel before this one)
    2. each row's partial log-sum-exp over the chunk, (maximum, sum of exp(logit - maximum)), into a scratch
    3. each row's KC = min(w, BLOCK_V) largest logits of the chunk, as keys (the logit's order bits, then the
       reversed token id: the lower id first among equal logits), into a scratch
    4. an arrival ticket: the last program to arrive folds every chunk's partials into each row's log-sum-exp,
       keeps each row's w largest logit keys of all chunks, scores those (parent + (logit - maximum) -
       log(sum), as `beam_select` does), and selects the w largest scores of all rows as `beam_select`'s keys

Step 3 is exact because a row's score is a non-decreasing function of its logit: a row's w best tokens by
score are its w largest logits, and no row gives more than w pairs to the top-w. Only where two different
logits of a row round to the same float32 score could the kept pair be the other one of the tie (the larger
logit here, the lower flat index in the definition); with bf16 logits that needs logits within a few float32
ulps of zero. The log-sum-exp is summed in another order than torch's, so scores can differ from the
definition's in their last bits, as in `beam_select`. The greedy output never depends on either: the draft only
proposes, and verification keeps the target's tokens.

Measured on the H200 (2026-12-05, data/results/head_select_h200.json, head_select_blocks_h200.json,
head_select_max_h200.json, e2e_ab3_head_select_h200.json): it pays only for a chain. One parent and w = 1 took 4.3
us on a step's time line against 2.0 + 3.0 for the two launches; 16 parents and w = 16 took 45-115 us alone
against 10 us for the two launches, at every chunk width (128 to 1,024 tokens) and warp count, 28-43 us with
repeated maxima. Each of the 32 programs sorts 16 rows x 128 keys and the last holds 16 x 512 candidates, where
the two launches spread the head over 256 programs and the selection over 64 programs of one row each, whose last
program holds 1,024. So LONGSPEC_HEAD_SELECT stays off; the kernel stays as the tested form of the idea and its
benchmark, for a vocabulary or a split of the work where it pays.

`head_select_reference` is the definition in PyTorch: `beam_select_reference(h @ head^T, parent_scores, w)`.
`head_select` checks its inputs and calls the registered op `torch.ops.longspec.head_select` (opaque to
torch.compile, with a fake version). The decoder's switch is LONGSPEC_HEAD_SELECT (`ops/topk.py`). `main` times
the kernel against the two launches it replaces (the LM head through `norm_linear`, then `beam_select`) and
against the compiled definition:

    python -m longspec_lab.kernels.head_select --rows 1,4,16 --width 4,16,16

Taught in: notebooks/02_tree_shapes.ipynb
"""

import os

import torch
import triton
import triton.language as tl

from longspec_lab.kernels.beam_select import (
    _DTYPES,
    _MIN_KEY,
    _order_bits,
    add_level_args,
    beam_select_reference,
    check_level,
    parse_level_args,
)
from longspec_lab.kernels.launch import launch_args, tickets
from longspec_lab.kernels.row_topk import _algo, _store_topk
from longspec_lab.kernels.tree_attention import _max, _sum

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when the kernel below is defined
MAX_ROWS = 64  # parents per level: the logits tile holds every row ([N_PAD, BLOCK_V] float32 in registers)
MAX_FEATURES = 256  # hidden size: one K step, the head's tile read whole before the wait (the embedded draft: 256)
MAX_CANDIDATES = 8192  # N_PAD x n_chunks x KC keys, held by the last program (8,192 int64 over 8 warps: 64 a thread)
BLOCK_V = int(os.environ.get("LONGSPEC_HEAD_SELECT_BLOCK", "128"))  # tokens per program (a power of two)
NUM_WARPS = 8


@triton.jit
def _rows_topk(x, MIN: tl.constexpr, K: tl.constexpr, BITONIC: tl.constexpr, K_POW2: tl.constexpr):
    """The K largest keys of every row of the 2-D block x [R, C] (distinct within a row, padded with MIN):
    [R, K_POW2], descending, columns from K on MIN. The bitonic network for K_POW2 > 1 (tl.topk sorts along the
    last axis; Triton 3.6 fails to compile it for k = 1), else K repeated row maxima."""
    offs = tl.arange(0, K_POW2)
    if BITONIC and K_POW2 > 1:
        top = tl.topk(x, K_POW2)  # [R, K_POW2]
        return tl.where(offs[None, :] < K, top, MIN)
    out = tl.full([x.shape[0], K_POW2], MIN, tl.int64)
    for i in range(K):
        m = _max(x, 1)  # [R] each row's largest key not yet taken
        out = tl.where(offs[None, :] == i, m[:, None], out)
        x = tl.where(x == m[:, None], MIN, x)
    return out


@triton.jit
def _head_select_kernel(
    H,  # [n, K] the draft's last hidden rows (fp16, bf16 or fp32), unit column stride
    HEAD,  # [V, K] the LM head in nn.Linear layout, unit column stride, H's dtype
    SCORES,  # [n] fp32 the parents' cumulative log-probabilities
    PART,  # [2, n_chunks, N_PAD] fp32 scratch: each chunk's row maxima, then its sums of exp(logit - maximum)
    CAND,  # [N_PAD, n_chunks * KC] int64 scratch: row r's KC largest logit keys of chunk c at r * CAND_W + c * KC
    OUT,  # [W] int64 the level's W largest beam keys, descending (beam_select's keys)
    TICKET,  # int32 [1] arrival ticket, zero between launches
    n,  # rows (parents)
    V,  # tokens
    K,  # hidden features (<= BLOCK_K)
    stride_h,  # row stride of H, in elements
    stride_w,  # row stride of HEAD, in elements
    n_chunks,  # programs: vocabulary chunks of BLOCK_V
    N_PAD: tl.constexpr,  # a power of two >= n, >= 16 (the matrix unit's smallest row tile)
    BLOCK_V: tl.constexpr,  # tokens per program (a power of two >= KC)
    BLOCK_K: tl.constexpr,  # a power of two >= K: the whole hidden size in one step
    KC: tl.constexpr,  # keys each chunk keeps per row: min(W, BLOCK_V)
    W: tl.constexpr,  # the level's width
    WR: tl.constexpr,  # keys the last program keeps per row: min(W, CAND_W) (no row gives more than W pairs)
    CAND_W: tl.constexpr,  # n_chunks * KC: one row's candidates
    CAND_W_POW2: tl.constexpr,  # a power of two >= CAND_W
    CHUNKS_POW2: tl.constexpr,  # a power of two >= n_chunks
    BITONIC: tl.constexpr,  # select with the bitonic network (row_topk's TOPK_ALGO)
    KC_POW2: tl.constexpr,  # a power of two >= KC
    W_POW2: tl.constexpr,  # a power of two >= W
    WR_POW2: tl.constexpr,  # a power of two >= WR
    IEEE: tl.constexpr,  # float32 inputs: exact float32 products in tl.dot
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
):
    c = tl.program_id(0)
    cols = c * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V] token ids
    col_ok = cols < V
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    # 1. the head's tile first: a parameter that no kernel of a step writes, so it may load before the wait
    w = tl.load(HEAD + cols.to(tl.int64)[:, None] * stride_w + offs_k[None, :],
                mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_V, BLOCK_K]  # fmt: skip
    if USE_PDL:  # before any access to what another kernel writes, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    rows = tl.arange(0, N_PAD)
    row_ok = rows < n
    x = tl.load(H + rows.to(tl.int64)[:, None] * stride_h + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                other=0.0)  # [N_PAD, BLOCK_K]  # fmt: skip
    if IEEE:
        acc = tl.dot(x, tl.trans(w), input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w))  # [N_PAD, BLOCK_V] float32
    logit = acc.to(H.dtype.element_ty).to(tl.float32)  # rounded as the LM head's output
    ok = row_ok[:, None] & col_ok[None, :]
    logit = tl.where(ok, logit, float("-inf"))
    # 2. each row's partial log-sum-exp over this chunk
    m = _max(logit, 1)  # [N_PAD]
    safe = tl.where(m == float("-inf"), 0.0, m)  # a padded row, or only masked tokens: the sum stays 0
    s = _sum(tl.exp(logit - safe[:, None]), 1)  # [N_PAD]
    tl.store(PART + c * N_PAD + rows, m)
    tl.store(PART + (n_chunks + c) * N_PAD + rows, s)
    # 3. each row's KC largest logits of the chunk, as keys: order bits, then the reversed token id
    rev = (V - 1 - cols).to(tl.int64)  # lower token id -> larger key among equal logits
    key = tl.where(ok, (_order_bits(logit).to(tl.int64) << 32) + rev[None, :], _MIN_KEY)  # [N_PAD, BLOCK_V]
    top = _rows_topk(key, _MIN_KEY, KC, BITONIC, KC_POW2)  # [N_PAD, KC_POW2]
    offs_kc = tl.arange(0, KC_POW2)
    tl.store(CAND + rows[:, None] * CAND_W + c * KC + offs_kc[None, :], top, mask=(offs_kc < KC)[None, :])
    # 4. the last program to arrive selects the level
    tl.debug_barrier()  # every store of this program is issued before its ticket moves
    arrived = tl.atomic_add(TICKET, 1, sem="acq_rel", scope="gpu")
    if arrived == n_chunks - 1:
        offs_c = tl.arange(0, CHUNKS_POW2)
        c_ok = (offs_c < n_chunks)[:, None]
        pm = tl.load(PART + offs_c[:, None] * N_PAD + rows[None, :], mask=c_ok, other=float("-inf"),
                     cache_modifier=".cg")  # [CHUNKS_POW2, N_PAD]  # fmt: skip
        ps = tl.load(PART + (n_chunks + offs_c[:, None]) * N_PAD + rows[None, :], mask=c_ok, other=0.0,
                     cache_modifier=".cg")  # fmt: skip
        row_max = _max(pm, 0)  # [N_PAD]
        safe = tl.where(row_max == float("-inf"), 0.0, row_max)
        total = _sum(ps * tl.exp(pm - safe[None, :]), 0)  # [N_PAD]; 0 for a padded row
        log_sum = tl.log(tl.where(total > 0.0, total, 1.0))  # a padded row's candidates are all masked below
        offs_w = tl.arange(0, CAND_W_POW2)
        cand = tl.load(CAND + rows[:, None] * CAND_W + offs_w[None, :], mask=(offs_w < CAND_W)[None, :],
                       other=_MIN_KEY, cache_modifier=".cg")  # [N_PAD, CAND_W_POW2]  # fmt: skip
        best = _rows_topk(cand, _MIN_KEY, WR, BITONIC, WR_POW2)  # [N_PAD, WR_POW2] each row's WR largest logits
        hi = (best >> 32).to(tl.int32)
        lg = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(tl.float32, bitcast=True)  # the logit back from its bits
        tok = (V - 1) - (best & 0xFFFFFFFF)  # [N_PAD, WR_POW2] int64 token ids
        parent = tl.load(SCORES + rows, mask=row_ok, other=0.0)
        score = parent[:, None] + ((lg - row_max[:, None]) - log_sum[:, None])  # as beam_select scores
        flat = rows.to(tl.int64)[:, None] * V + tok
        beam = (_order_bits(score).to(tl.int64) << 32) + (n * V - 1 - flat)
        beam = tl.where(best == _MIN_KEY, _MIN_KEY, beam)
        _store_topk(OUT, tl.reshape(beam, [N_PAD * WR_POW2]), _MIN_KEY, W, BITONIC, W_POW2)
        tl.atomic_xchg(TICKET, 0)


def head_select_reference(h: torch.Tensor, head: torch.Tensor, parent_scores: torch.Tensor, width: int):
    """The definition: the `width` largest beam keys of the logits h @ head^T (rounded to h's dtype, as the LM
    head), `beam_select_reference`'s keys. h [n, K], head [V, K], parent_scores [n] -> [width] int64."""
    return beam_select_reference(h @ head.T, parent_scores, width)


def plan(n: int, V: int, K: int, width: int, block_v: int | None = None) -> dict:
    """The launch's shape: tokens per program, programs, keys kept per chunk and row, the candidates the last
    program holds. `fits` says whether the kernel takes the level (n <= MAX_ROWS, K <= MAX_FEATURES, candidates
    <= MAX_CANDIDATES); the decoder falls back to the two launches when it does not."""
    block = min(triton.next_power_of_2(max(1, block_v or BLOCK_V)), max(16, triton.next_power_of_2(V)))
    kept = min(width, block)
    n_chunks = triton.cdiv(V, block)
    n_pad = max(16, triton.next_power_of_2(n))
    cand = n_pad * n_chunks * kept
    return dict(
        block_v=block, n_chunks=n_chunks, kept=kept, n_pad=n_pad, candidates=cand,
        fits=n <= MAX_ROWS and K <= MAX_FEATURES and cand <= MAX_CANDIDATES and width <= n * V,
    )  # fmt: skip


def launch_constants(p: dict, width: int, K: int, bitonic: bool, ieee: bool) -> dict:
    """The kernel's constexprs for a `plan` p, a level of `width`, K features and the selection (the op launches
    with them; kernels/compile_check.py compiles with them)."""
    pow2 = triton.next_power_of_2
    cand_w = p["n_chunks"] * p["kept"]
    wr = min(width, cand_w)
    return dict(
        N_PAD=p["n_pad"], BLOCK_V=p["block_v"], BLOCK_K=max(16, pow2(K)), KC=p["kept"], W=width, WR=wr,
        CAND_W=cand_w, CAND_W_POW2=pow2(cand_w), CHUNKS_POW2=pow2(p["n_chunks"]), BITONIC=bitonic,
        KC_POW2=pow2(p["kept"]), W_POW2=pow2(width), WR_POW2=pow2(wr), IEEE=ieee,
    )  # fmt: skip


@torch.library.custom_op("longspec::head_select", mutates_args=())
def _head_select_op(
    h: torch.Tensor, head: torch.Tensor, parent_scores: torch.Tensor, width: int, block_v: int, num_warps: int
) -> torch.Tensor:
    """`torch.ops.longspec.head_select`: h [n, K], head [V, K], parent_scores [n] fp32 (checked by `head_select`)
    -> [width] int64 keys, descending."""
    n, K = h.shape
    V = head.shape[0]
    p = plan(n, V, K, width, block_v)
    part = torch.empty(2, p["n_chunks"], p["n_pad"], dtype=torch.float32, device=h.device)
    cand = torch.empty(p["n_pad"], p["n_chunks"] * p["kept"], dtype=torch.int64, device=h.device)
    out = torch.empty(width, dtype=torch.int64, device=h.device)
    consts = launch_constants(p, width, K, _algo() == "bitonic", h.dtype == torch.float32)
    _head_select_kernel[(p["n_chunks"],)](
        h, head, parent_scores, part, cand, out, tickets(h.device), n, V, K, h.stride(0), head.stride(0),
        p["n_chunks"], num_warps=num_warps, **consts, **launch_args(h.device),
    )  # fmt: skip
    return out


@_head_select_op.register_fake
def _(h, head, parent_scores, width, block_v, num_warps):
    return h.new_empty(width, dtype=torch.int64)


def head_select(h, head, parent_scores, width: int, block_v: int | None = None, num_warps: int | None = None):
    """The `width` largest beam keys of the level whose logits are h @ head^T: [width] int64, descending, as
    `head_select_reference` (module docstring for where scores may differ in their last bits). h [n, K] (the
    draft's last hidden rows), head [V, K] (its LM head), parent_scores [n] float32."""
    if not (isinstance(h, torch.Tensor) and h.dim() == 2 and h.dtype in _DTYPES):
        got = f"{tuple(h.shape)} {h.dtype}" if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"head_select needs hidden rows h [n, K] in float16, bfloat16 or float32, got {got}")
    n, K = h.shape
    if not (isinstance(head, torch.Tensor) and head.dim() == 2 and head.shape[1] == K and head.dtype == h.dtype):
        got = f"{tuple(head.shape)} {head.dtype}" if isinstance(head, torch.Tensor) else type(head).__name__
        raise ValueError(f"head_select needs the LM head [V, {K}] in h's dtype {h.dtype}, got {got}")
    V = head.shape[0]
    check_level("head_select", "h", parent_scores, n, V, width)
    if len({t.device for t in (h, head, parent_scores)}) > 1:
        raise ValueError("head_select needs h, head and parent_scores on one device")
    if not h.is_cuda and not _INTERPRET:
        raise RuntimeError(
            f"head_select runs a Triton kernel and got a tensor on {h.device}; pass CUDA tensors, or set "
            "TRITON_INTERPRET=1 before importing longspec_lab.kernels.head_select (on the CPU, "
            "head_select_reference gives the same keys)"
        )
    p = plan(n, V, K, width, block_v)
    if not p["fits"]:
        raise ValueError(
            f"head_select takes at most {MAX_ROWS} rows, {MAX_FEATURES} features and {MAX_CANDIDATES} candidates, "
            f"got n = {n}, K = {K} and {p['candidates']} ({p['n_pad']} rows x {p['n_chunks']} chunks x "
            f"{p['kept']}); use head_select_reference, or beam_select on the logits"
        )
    if h.stride(1) != 1:
        h = h.contiguous()
    if head.stride(1) != 1:
        head = head.contiguous()
    warps = NUM_WARPS if num_warps is None else num_warps
    if warps not in (1, 2, 4, 8):
        raise ValueError(f"head_select takes 1, 2, 4 or 8 warps, got {warps!r}")
    return _head_select_op(h, head, parent_scores, width, p["block_v"], warps)


def main(argv=None) -> int:
    """Time the one-launch head and selection against the two launches it replaces and the compiled definition."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.kernels.head_select",
        description=(
            "Time a beam level's LM head and selection as one launch against what it replaces in the decoder: the "
            "LM head through norm_linear then beam_select's one launch (two launches), and the definition "
            "compiled by torch.compile (the head's matmul, the log-softmax and keys, flat_topk). Random bf16 "
            "hidden rows and head of the embedded draft's shapes; each form is first checked to select the same "
            "pairs as float64 on the same rounded logits. Prints medians (us) replayed from CUDA graphs."
        ),
    )
    add_level_args(ap, block_v="64,128,256", warps="4,8")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size K (default: the embedded draft's 256)")
    a = ap.parse_args(argv)
    rows, widths, blocks, warps = parse_level_args(ap, a, "tests/unit/kernels/test_head_select.py")
    from longspec_lab.kernels import row_topk
    from longspec_lab.kernels.beam_select import add_case, beam_keys_reference, beam_select, time_level_forms
    from longspec_lab.kernels.launch import boundary_cost_us
    from longspec_lab.kernels.norm_linear import norm_linear

    keys_compiled = torch.compile(
        lambda h, head, s: beam_keys_reference(h @ head.T, s), fullgraph=True, dynamic=False
    )  # the definition's head and keys
    launch_us = boundary_cost_us()["unit_us"]
    report = {"vocab": a.vocab, "hidden": a.hidden, "dtype": "bfloat16", "launch_floor_us": launch_us, "cases": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    head = (torch.randn(a.vocab, a.hidden, device="cuda", generator=g) * a.hidden**-0.5).to(torch.bfloat16)
    for n, w in zip(rows, widths):
        h = (torch.randn(n, a.hidden, device="cuda", generator=g) * 3).to(torch.bfloat16)
        scores = -torch.rand(n, device="cuda", generator=g).sort(descending=True).values * 4
        logits = h @ head.T  # [n, V] bf16, the rounded logits every form scores
        exact = (scores.double()[:, None] + torch.log_softmax(logits.double(), -1)).flatten()
        want = torch.topk(exact, w).values
        forms = {
            "definition_compiled": lambda: row_topk.flat_topk(keys_compiled(h, head, scores), w),
            "two_launches": lambda: beam_select(norm_linear(h, head), scores, w),
        }
        for b, nw in [(b, nw) for b in blocks for nw in warps]:
            if plan(n, a.vocab, a.hidden, w, b)["fits"]:
                forms[f"kernel_{b}_{nw}w"] = lambda b=b, nw=nw: head_select(h, head, scores, w, b, nw)
        us = time_level_forms(forms, exact, want, 1e-4)
        case = {"rows": n, "width": w, "us": us, "plan": plan(n, a.vocab, a.hidden, w)}
        add_case(report, case, "two_launches", "two_launches", launch_us, f"n={n} w={w} V={a.vocab} K={a.hidden}")
    if a.out:
        from longspec_lab.provenance import stamp, write_new_json

        write_new_json(a.out, stamp(report, torch.device("cuda"), torch.bfloat16))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
