"""Tree-verification attention for LongSpec (arXiv 2502.17421, section 3: hybrid tree attention).

One verification step feeds T new query rows (the pending tokens, then the tree nodes) per sequence.
Each row attends to the whole committed prefix, slots [0, P), with no mask, and to the T new keys at
slots [P, P + T) through the tree mask. With P in the tens of thousands and T ~ 72 the prefix part is
almost all of the work, and it needs no mask at all.

How the kernel is laid out (Hopper-class, H100/H200):
- GQA packing: the G = Hq / Hkv query heads of one kv head and the T rows are flattened into one row
  axis, r = g * T + t (ROWS = G * T = 288 for Llama-3-8B and a 72-row verify), and cut into BLOCK_M row
  tiles, so every K/V tile is loaded once for all the heads that share it and feeds a tall matrix product.
- Split-KV (flash-decoding): the prefix is cut into `n_splits` chunks of `split_len` keys, planned from
  the SM count so that (row tiles x splits x batch x kv heads) programs fill whole waves. A program owns
  (row tile, split, batch x kv head).
- The tree part is fused into the last non-empty split of each sequence: after its share of the prefix
  that program also runs the T tree keys under the mask, so the tree costs no extra program and no
  extra partial. With one split the program writes the final output itself (no merge launch).
- K/V tiles stream through a software pipeline (`tl.range(..., num_stages)`); with `USE_TMA` they are read
  through tensor descriptors (TMA on Hopper), zero-filled past the sequence's last key.
- Online softmax in fp32 with exp2 (the scale folded into log2 units); the P.V product accumulates into
  the running output in place (`tl.dot(p, v, acc)`). Each split writes a normalised partial output and
  its natural-log LSE to fp32 scratch. Two experimental forms of the prefix loop, off by default, ask the compiler
  for FlashAttention-3's overlap of one tile's softmax with the tensor cores' next product: `WARP_SPECIALIZE`
  (Triton's automatic warp specialization) and `OVERLAP` (LONGSPEC_TREE_OVERLAP=1: the loop rotated so the next
  tile's Q.K^T is issued before this tile's softmax; the same computation, bit for bit). On Hopper, Triton 3.6 and
  3.9 give neither: `python -m longspec_lab.kernels.compile_check --warp-specialize` reads what they compile.
- The partials are merged by log-sum-exp: lse = log(sum_s e^lse_s), o = sum_s e^(lse_s - lse) o_s, the
  paper's prefix/tree merge generalised to many parts. A second, small launch merges them, in one of two
  forms (`merge_plan`): it reads all the splits of a few rows as one tile, so its cost does not grow with
  the split count (one row tile, many splits: decode), or it walks the splits of 16 rows one at a time
  (several row tiles, at most 8 splits: a verification pass at a short prefix). An alternative,
  `FUSED_MERGE` (LONGSPEC_FUSED_MERGE=1), lets the last split program to finish merge (an arrival ticket
  per row tile) and saves that launch; on the H200 it measured slower on every shape of a decoding step
  (`_launch` cites the figures), so it is off by default and kept, tested, for other GPUs. Empty splits
  of shorter (ragged) sequences are skipped, never read.
- The tree mask is bit-packed on the host (int32 words): a key tile reads BLOCK_N / 32 words per row
  instead of gathering BLOCK_M x BLOCK_N bytes.
- The tree's own programs (LONGSPEC_TREE_SPLIT, `tree_split_applies`): when the rows need several row tiles (a
  verification pass) the tree keys get one more split index instead, so the last prefix split no longer runs its
  share of the prefix and then the whole tree; their partial is written right after the sequence's prefix
  partials and merged with them. H200, the embedded model's 69-node verify: 6.5-6.7 us a layer against 9.5-10.5.
- Prefix-only mode (`prefix_only=True`, the draft's cross-attention to the target's cache): the same split-KV
  pass without the tree keys, so no mask is built, packed or read.
- A row that sees no key at all (P = 0 and an all-False mask row) gets o = 0 and lse = -inf.

Roofline: per key and kv head, QK^T + PV cost 4 * ROWS * D FLOP for 4 * D bytes of fp16 K/V, i.e. ROWS
FLOP per byte; ROWS = 288 is above the H200's ridge (~790 TFLOP/s / 4.3 TB/s ~ 185), so this tree is
tensor-core bound and the benchmark reports the compute floor beside the bandwidth floor.
Tile sizes: BLOCK_M is chosen on the host (`_pick_block_m`, least padding); BLOCK_N, warps, stages and TMA
are autotuned per (rows, head dim, dtype, BLOCK_M, split-length bucket), and the benchmark records the
config chosen for each prefix.

`tree_attention_reference` is the plain PyTorch (float64) version written as the paper states it, and
`longspec_lab.kernels.bench_tree_attention` is the benchmark.

Taught in: notebooks/04_hybrid_tree_attention_and_the_triton_kernel.ipynb
"""

import math
import numbers
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from longspec_lab.kernels.launch import TICKET_SLOTS, launch_args, tickets

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when the kernels below are defined
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
SUPPORTED_HEAD_DIMS = (64, 128)


# Reductions along one axis. On the GPU: tl.max / tl.sum. Under the interpreter: tl.reduce with the
# standard library's combine functions, which the interpreter maps to numpy by identity, never calling
# them: tl.max itself is an @jit function of Triton's library, compiled rather than interpreted when triton
# was imported before TRITON_INTERPRET=1 was set (then an importlib.reload of this module still works).
if _INTERPRET:

    @triton.jit
    def _max(x, AXIS: tl.constexpr):
        return tl.reduce(x, AXIS, tl.standard._elementwise_max)

    @triton.jit
    def _sum(x, AXIS: tl.constexpr):
        return tl.reduce(x, AXIS, tl.standard._sum_combine)
else:

    @triton.jit
    def _max(x, AXIS: tl.constexpr):
        return tl.max(x, AXIS)

    @triton.jit
    def _sum(x, AXIS: tl.constexpr):
        return tl.sum(x, AXIS)


@triton.jit
def _load_keys(X, x_desc, start, n, n_ok, offs_d, stride_n, stride_d, CHECK: tl.constexpr, USE_TMA: tl.constexpr,
               ZERO_PAST: tl.constexpr):  # fmt: skip
    # [BLOCK_N, D] rows [start, start + BLOCK_N) of K or V (n: their slots, n_ok: those before the range's end).
    # Through a descriptor (USE_TMA) rows past the sequence's last key read as 0; with CHECK, ZERO_PAST also zeroes
    # the rows past the range's end, which may be stale slots (a V tile: p is 0 there, and 0 * NaN must not reach acc)
    if USE_TMA:
        x = x_desc.load([start, 0])
        if CHECK and ZERO_PAST:
            x = tl.where(n_ok[:, None], x, 0.0)
    elif CHECK:
        x = tl.load(X + n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=n_ok[:, None], other=0.0)
    else:
        x = tl.load(X + n[:, None] * stride_n + offs_d[None, :] * stride_d)
    return x


@triton.jit
def _scores(q, k, qk_scale, IEEE: tl.constexpr):
    # q [BLOCK_M, D] . k [BLOCK_N, D]^T, scaled: [BLOCK_M, BLOCK_N] in log2 units
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, tl.trans(k)) * qk_scale
    return s


@triton.jit
def _softmax_step(acc, m_i, l_i, s):
    # The online softmax over one tile's scores s [BLOCK_M, BLOCK_N] (masked entries -inf): the new running max
    # m [BLOCK_M], the denominator l, acc rescaled to it, and the tile's weights p [BLOCK_M, BLOCK_N] for P.V
    m_new = tl.maximum(m_i, _max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked rows stay 0
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + _sum(p, 1)
    acc = acc * alpha[:, None]
    return acc, m_new, l_i, p


@triton.jit
def _accumulate(acc, p, v, IEEE: tl.constexpr):
    # acc [BLOCK_M, D] += p [BLOCK_M, BLOCK_N] . v [BLOCK_N, D], in place (the wgmma's C operand)
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc


@triton.jit
def _attend_range(
    acc,
    m_i,
    l_i,
    q,
    K,
    V,
    k_desc,
    v_desc,
    lo,
    hi,
    key0,
    offs_t,
    row_ok,
    MASK,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mq,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHECK: tl.constexpr,
    TREE: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    USE_TMA: tl.constexpr,
    STAGES: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    # Keys [lo, hi) in BLOCK_N steps, one online-softmax step each (keys < hi only, if CHECK). The long unmasked
    # prefix loop (CHECK False) is software-pipelined STAGES deep; the tail (<= 1 step) and the tree block (a few
    # steps, a gathered mask) run unpipelined, which keeps their buffers out of registers and shared memory.
    # WARP_SPECIALIZE asks the compiler to split the loop between load and compute warps (`compile_check
    # --warp-specialize` shows what Triton makes of it).
    # acc [BLOCK_M, HEAD_DIM] fp32, m_i / l_i [BLOCK_M] running max (log2 units) and denominator;
    # q [BLOCK_M, HEAD_DIM]; K/V point at this (batch, kv head), k_desc/v_desc are its descriptors (USE_TMA);
    # key0: slot of tree key 0 (TREE only); offs_t [BLOCK_M] token index of each row; MASK: this sequence's
    # bit-packed mask, int32 [T, n_words] (bit j % 32 of word j // 32 of row t = row t may see tree key j).
    for start in tl.range(lo, hi, BLOCK_N, num_stages=1 if CHECK else STAGES, warp_specialize=WARP_SPECIALIZE):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        n = start + offs_n  # [BLOCK_N] key slots
        n_ok = n < hi
        k = _load_keys(K, k_desc, start, n, n_ok, offs_d, stride_kn, stride_kd, CHECK, USE_TMA, False)
        s = _scores(q, k, qk_scale, IEEE)  # [BLOCK_M, BLOCK_N] log2 units
        if TREE:
            j = n - key0  # tree key index
            if CAUSAL:
                ok = (j[None, :] <= offs_t[:, None]) & n_ok[None, :]
            else:  # BLOCK_N // 32 word loads of [BLOCK_M] (a [BLOCK_M, BLOCK_N] byte gather spills registers)
                ok = (offs_t[:, None] < 0) & (offs_n[None, :] < 0)  # all False [BLOCK_M, BLOCK_N]
                for w in tl.static_range(BLOCK_N // 32):
                    widx = (start - key0) // 32 + w
                    word = tl.load(MASK + offs_t * stride_mq + widx, mask=row_ok, other=0)  # W % 4 == 0
                    bit = (word[:, None] >> (offs_n % 32)[None, :]) & 1
                    ok = ok | (((offs_n // 32) == w)[None, :] & (bit != 0))
                ok = ok & n_ok[None, :]
            s = tl.where(ok, s, float("-inf"))
        elif CHECK:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        acc, m_i, l_i, p = _softmax_step(acc, m_i, l_i, s)
        v = _load_keys(V, v_desc, start, n, n_ok, offs_d, stride_vn, stride_vd, CHECK, USE_TMA, True)
        acc = _accumulate(acc, p, v, IEEE)
    return acc, m_i, l_i


@triton.jit
def _attend_prefix_overlapped(acc, m_i, l_i, q, K, V, k_desc, v_desc, lo, hi, stride_kn, stride_kd, stride_vn,
                              stride_vd, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                              USE_TMA: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    # The unmasked prefix keys [lo, hi) (hi - lo a multiple of BLOCK_N), as _attend_range takes them, with the loop
    # rotated by half a step (OVERLAP): each iteration issues the next tile's Q.K^T before it runs the softmax of the
    # tile in hand, so that the tensor cores could work on the one while the softmax of the other runs
    # (FlashAttention-3's overlap within a warp group, arXiv 2407.08608). The same tiles, in the same order, as
    # _attend_range. Whether it overlaps is the compiler's choice: Triton 3.6 and 3.9 wait for that product at once
    # on sm_90 (`compile_check --warp-specialize` reads it), so it stays off.
    if hi > lo:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        n = lo + offs_n
        k = _load_keys(K, k_desc, lo, n, n < hi, offs_d, stride_kn, stride_kd, False, USE_TMA, False)
        s = _scores(q, k, qk_scale, IEEE)  # the first tile's scores [BLOCK_M, BLOCK_N]
        for start in tl.range(lo + BLOCK_N, hi, BLOCK_N, num_stages=STAGES):
            n = start + offs_n
            k = _load_keys(K, k_desc, start, n, n < hi, offs_d, stride_kn, stride_kd, False, USE_TMA, False)
            s_next = _scores(q, k, qk_scale, IEEE)  # issued before the softmax below, needed only by the next one
            acc, m_i, l_i, p = _softmax_step(acc, m_i, l_i, s)  # the tile before: keys [start - BLOCK_N, start)
            n = n - BLOCK_N
            v = _load_keys(V, v_desc, start - BLOCK_N, n, n < hi, offs_d, stride_vn, stride_vd, False, USE_TMA, False)
            acc = _accumulate(acc, p, v, IEEE)
            s = s_next
        acc, m_i, l_i, p = _softmax_step(acc, m_i, l_i, s)  # the last tile: keys [hi - BLOCK_N, hi)
        n = hi - BLOCK_N + offs_n
        v = _load_keys(V, v_desc, hi - BLOCK_N, n, n < hi, offs_d, stride_vn, stride_vd, False, USE_TMA, False)
        acc = _accumulate(acc, p, v, IEEE)
    return acc, m_i, l_i


@triton.jit
def _tree_attn_split_kernel(
    Q,
    K,
    V,  # q [B, Hq, T, D]; k, v [B, Hkv, S, D] (any strides; unit last stride for TMA)
    PREFIX,  # int32 [B] prefix lengths (read only if RAGGED)
    MASK,  # int32 [B or 1, T, n_words] bit-packed tree mask (unused if CAUSAL or PREFIX_ONLY)
    O_PART,
    LSE_PART,  # fp32 scratch [B*Hkv, n_splits, ROWS, D] and [B*Hkv, n_splits, ROWS] (unused if DIRECT)
    OUT,  # [B, Hq, T, D] output (written here only if DIRECT)
    LSE_OUT,  # fp32 [B, Hq, T] (written here only if DIRECT and WRITE_LSE, or by the merging program)
    TICKETS,  # int32 [B*Hkv * row tiles] arrival tickets, zero between launches (read only if FUSED_MERGE)
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_lb,
    stride_lh,
    stride_lt,
    stride_mb,
    stride_mq,
    prefix_len,  # common prefix length (if not RAGGED)
    split_len,  # keys per prefix split
    n_splits,  # partials per row: the prefix splits (>= 1), plus one for the tree with TREE_SPLIT
    T,  # new rows (= new keys) per sequence
    ROWS,  # G * T query rows per kv head
    H_KV,  # kv heads
    qk_scale,  # softmax scale * log2(e)
    split_bucket,  # split_len.bit_length(): unused in the body, an autotune key only
    GROUP: tl.constexpr,  # Hq // Hkv
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_M: tl.constexpr,  # flattened (head, row) query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    RAGGED: tl.constexpr,
    CAUSAL: tl.constexpr,
    PREFIX_ONLY: tl.constexpr,  # the T keys after the prefix are never read (the draft's cross-attention)
    TREE_SPLIT: tl.constexpr,  # the tree keys get programs of their own (split n_splits - 1), beside the prefix's
    IEEE: tl.constexpr,
    DIRECT: tl.constexpr,  # n_splits == 1: write the final output, no merge launch
    FUSED_MERGE: tl.constexpr,  # several splits: the last one to finish merges them (no merge launch)
    WRITE_LSE: tl.constexpr,
    MERGE_S: tl.constexpr,  # power of two >= n_splits: the merge reads every split's partial at once
    MERGE_R: tl.constexpr,  # rows the fused merge handles at a time ([MERGE_S, MERGE_R, HEAD_DIM] in registers)
    USE_TMA: tl.constexpr,
    STAGES: tl.constexpr,
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
    WARP_SPECIALIZE: tl.constexpr = False,  # the prefix loop's automatic warp specialization (a compiler probe)
    OVERLAP: tl.constexpr = False,  # the prefix loop rotated: each tile's Q.K^T issued before the tile before it
    # is softmaxed (_attend_prefix_overlapped; LONGSPEC_TREE_OVERLAP)
):
    if USE_PDL:  # before any other memory access, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H_KV).to(tl.int64)
    h = (pid_bh % H_KV).to(tl.int64)
    if RAGGED:
        P = tl.load(PREFIX + b).to(tl.int32)  # int32 or int64 lengths; tensor descriptors take int32 shapes
    else:
        P = prefix_len
    n_used = (P + split_len - 1) // split_len  # non-empty prefix splits of this sequence
    last = tl.maximum(n_used - 1, 0)  # the split that also runs the tree keys (without TREE_SPLIT)
    if TREE_SPLIT:  # program n_splits - 1 runs the tree alone and writes its partial right after the prefix's
        is_tree = pid_s == n_splits - 1
        runs = (pid_s < n_used) | is_tree
        part_s = tl.where(is_tree, n_used, pid_s)
    else:
        is_tree = pid_s == last
        runs = pid_s <= last
        part_s = pid_s
    if runs:
        lo = pid_s * split_len
        hi = tl.minimum(lo + split_len, P)
        if TREE_SPLIT:
            lo = tl.where(is_tree, P, lo)  # the tree's program reads no prefix key
            hi = tl.where(is_tree, P, hi)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        row_ok = rows < ROWS
        g = rows // T
        t = rows % T
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = (
            Q + b * stride_qb + ((h * GROUP + g) * stride_qh + t * stride_qt)[:, None] + offs_d[None, :] * stride_qd
        )
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
        Kb = K + b * stride_kb + h * stride_kh
        Vb = V + b * stride_vb + h * stride_vh
        if USE_TMA:  # this (batch, kv head)'s keys [0, P + T): loads past them come back as zeros
            k_desc = tl.make_tensor_descriptor(Kb, [P + T, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM])
            v_desc = tl.make_tensor_descriptor(Vb, [P + T, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM])
        else:
            k_desc = Kb
            v_desc = Vb
        acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        full = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N  # unmasked whole tiles, then the tail
        if OVERLAP:
            acc, m_i, l_i = _attend_prefix_overlapped(acc, m_i, l_i, q, Kb, Vb, k_desc, v_desc, lo, full, stride_kn,
                                                      stride_kd, stride_vn, stride_vd, qk_scale, HEAD_DIM, BLOCK_N,
                                                      IEEE, USE_TMA, STAGES)  # fmt: skip
        else:
            acc, m_i, l_i = _attend_range(
                acc, m_i, l_i, q, Kb, Vb, k_desc, v_desc, lo, full, 0, t, row_ok, MASK, stride_kn, stride_kd,
                stride_vn, stride_vd, stride_mq, qk_scale, HEAD_DIM, BLOCK_N, CHECK=False, TREE=False, CAUSAL=CAUSAL,
                IEEE=IEEE, USE_TMA=USE_TMA, STAGES=STAGES, WARP_SPECIALIZE=WARP_SPECIALIZE,
            )  # fmt: skip
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, Kb, Vb, k_desc, v_desc, full, hi, 0, t, row_ok, MASK, stride_kn, stride_kd,
            stride_vn, stride_vd, stride_mq, qk_scale, HEAD_DIM, BLOCK_N, CHECK=True, TREE=False, CAUSAL=CAUSAL,
            IEEE=IEEE, USE_TMA=USE_TMA, STAGES=STAGES, WARP_SPECIALIZE=False,
        )  # fmt: skip
        if is_tree and (not PREFIX_ONLY):  # the tree keys [P, P + T): in the last prefix split, or alone
            acc, m_i, l_i = _attend_range(
                acc, m_i, l_i, q, Kb, Vb, k_desc, v_desc, P, P + T, P, t, row_ok, MASK + b * stride_mb, stride_kn,
                stride_kd, stride_vn, stride_vd, stride_mq, qk_scale, HEAD_DIM, BLOCK_N, CHECK=True, TREE=True,
                CAUSAL=CAUSAL, IEEE=IEEE, USE_TMA=USE_TMA, STAGES=STAGES, WARP_SPECIALIZE=False,
            )  # fmt: skip
        empty = l_i == 0.0
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        if DIRECT:
            _store_rows(OUT, LSE_OUT, o, lse, b, h * GROUP + g, t, row_ok, offs_d,
                        stride_ob, stride_oh, stride_ot, stride_od, stride_lb, stride_lh, stride_lt,
                        WRITE_LSE)  # fmt: skip
        else:
            part = (pid_bh.to(tl.int64) * n_splits + part_s) * ROWS + rows  # [BLOCK_M]
            tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_ok[:, None])
            tl.store(LSE_PART + part, lse, mask=row_ok)
            if FUSED_MERGE:
                # Arrival ticket per (batch x kv head, row tile): splits 0..last take part, and the one that
                # arrives last has seen every other partial (acquire/release on the ticket), so it merges them
                # and puts the ticket back to 0 for the next launch (or CUDA-graph replay).
                tl.debug_barrier()  # all of this program's partial stores are issued before the ticket moves
                ticket = TICKETS + pid_bh * tl.num_programs(0) + pid_m
                arrived = tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu")
                if arrived == last:  # one row tile holds every row (pid_m == 0): merge them MERGE_R at a time
                    for r0 in range(0, ROWS, MERGE_R):
                        mrows = r0 + tl.arange(0, MERGE_R)  # [MERGE_R]
                        mrow_ok = mrows < ROWS
                        base = pid_bh.to(tl.int64) * n_splits * ROWS + mrows  # split 0 of each row
                        mo, mlse = _merge_partials(O_PART, LSE_PART, base, mrow_ok, last + 1, ROWS, HEAD_DIM,
                                                   MERGE_R, MERGE_S)  # fmt: skip
                        _store_rows(OUT, LSE_OUT, mo, mlse, b, h * GROUP + mrows // T, mrows % T, mrow_ok, offs_d,
                                    stride_ob, stride_oh, stride_ot, stride_od, stride_lb, stride_lh, stride_lt,
                                    WRITE_LSE)  # fmt: skip
                    tl.atomic_xchg(ticket, 0)


@triton.jit
def _store_rows(
    OUT, LSE_OUT, o, lse, b, head, t, row_ok, offs_d,
    stride_ob, stride_oh, stride_ot, stride_od, stride_lb, stride_lh, stride_lt,
    WRITE_LSE: tl.constexpr,
):  # fmt: skip
    """Write finished rows: o [rows, D] (fp32, cast to OUT's dtype) at OUT[b, head, t, :], and the natural-log
    lse [rows] at LSE_OUT[b, head, t] when WRITE_LSE. head, t: [rows] query head and block row of each row."""
    out_rows = b * stride_ob + head * stride_oh + t * stride_ot
    tl.store(OUT + out_rows[:, None] + offs_d[None, :] * stride_od, o.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    if WRITE_LSE:
        tl.store(LSE_OUT + b * stride_lb + head * stride_lh + t * stride_lt, lse, mask=row_ok)


@triton.jit
def _merge_partials(
    O_PART, LSE_PART, base, row_ok, n_used, ROWS, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, MERGE_S: tl.constexpr
):
    """LSE merge of splits 0..n_used-1 for BLOCK_R rows: lse = log(sum_s e^lse_s), o = sum_s e^(lse_s - lse) o_s.
    All splits are read at once, as one [MERGE_S, BLOCK_R] tile of LSEs and one [MERGE_S, BLOCK_R, HEAD_DIM] tile
    of partial outputs (MERGE_S >= n_used, a power of two), so the merge costs one round trip to L2 however
    many splits there are; a loop over the splits would wait for each load in turn (H200: ~0.6 us a split).
    base [BLOCK_R]: each row's index in split 0 of the fp32 scratch. Loads bypass L1 (`.cg`): the partials
    were written by other programs. Returns (o [BLOCK_R, HEAD_DIM] fp32, natural-log lse [BLOCK_R])."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, MERGE_S)
    ok = (offs_s < n_used)[:, None] & row_ok[None, :]  # [MERGE_S, BLOCK_R]
    idx = base[None, :] + offs_s[:, None] * ROWS  # [MERGE_S, BLOCK_R] scratch row of (split, row)
    lse_s = tl.load(LSE_PART + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
    o_ptrs = O_PART + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :]  # [MERGE_S, BLOCK_R, HEAD_DIM]
    o_s = tl.load(o_ptrs, mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
    m = _max(lse_s, 0)  # [BLOCK_R]
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a row no split saw: every weight is 0
    w = tl.exp(lse_s - m_safe[None, :])  # [MERGE_S, BLOCK_R]
    den = _sum(w, 0)
    empty = den == 0.0
    o = _sum(w[:, :, None] * o_s, 0) / tl.where(empty, 1.0, den)[:, None]  # [BLOCK_R, HEAD_DIM]
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, den)))
    return o, lse


@triton.jit
def _merge_partials_loop(O_PART, LSE_PART, base, row_ok, n_used, ROWS, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """The same merge as `_merge_partials`, one split at a time with a running maximum (online rescaling): one
    L2 round trip per split, but a [BLOCK_R, HEAD_DIM] tile where the vector form holds every split at once.
    With several row tiles and few splits this is the faster form (`merge_plan` cites the measurement)."""
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    den = tl.full([BLOCK_R], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_R, HEAD_DIM], 0.0, dtype=tl.float32)
    o_ptrs = O_PART + base[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_R, HEAD_DIM] split 0
    for s in range(0, n_used):
        lse_s = tl.load(LSE_PART + base + s * ROWS, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        o_s = tl.load(o_ptrs + s * ROWS * HEAD_DIM, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no part seen yet: the weights stay 0
        alpha = tl.exp(m - m_safe)  # rescales what was summed under the old maximum
        w = tl.exp(lse_s - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        den = den * alpha + w
        m = m_new
    empty = den == 0.0
    o = acc / tl.where(empty, 1.0, den)[:, None]
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, den)))
    return o, lse


@triton.jit
def _tree_attn_merge_kernel(
    O_PART,
    LSE_PART,  # fp32 scratch written by the split kernel
    PREFIX,  # int32 [B] (if RAGGED)
    OUT,  # [B, Hq, T, D] output, q's dtype
    LSE_OUT,  # fp32 [B, Hq, T] (if WRITE_LSE)
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_lb,
    stride_lh,
    stride_lt,
    prefix_len,
    split_len,
    n_splits,
    T,
    ROWS,
    H_KV,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,  # query rows per program
    MERGE_S: tl.constexpr,  # power of two >= n_splits (vector form)
    LOOP: tl.constexpr,  # merge split by split (`_merge_partials_loop`) instead of all at once
    RAGGED: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    TREE_SPLIT: tl.constexpr,  # one more partial, the tree's, right after the prefix splits
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
):
    if USE_PDL:  # before any other memory access, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    h = (pid_bh % H_KV).to(tl.int64)
    if RAGGED:
        P = tl.load(PREFIX + b).to(tl.int32)
    else:
        P = prefix_len
    if TREE_SPLIT:
        n_used = (P + split_len - 1) // split_len + 1  # the prefix splits written, then the tree's
    else:
        n_used = tl.maximum((P + split_len - 1) // split_len, 1)  # splits written (the tree is in the last)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < ROWS
    base = pid_bh.to(tl.int64) * n_splits * ROWS + rows  # [BLOCK_R] split 0 of each row
    if LOOP:
        o, lse = _merge_partials_loop(O_PART, LSE_PART, base, row_ok, n_used, ROWS, HEAD_DIM, BLOCK_R)
    else:
        o, lse = _merge_partials(O_PART, LSE_PART, base, row_ok, n_used, ROWS, HEAD_DIM, BLOCK_R, MERGE_S)
    _store_rows(OUT, LSE_OUT, o, lse, b, h * GROUP + rows // T, rows % T, row_ok, tl.arange(0, HEAD_DIM),
                stride_ob, stride_oh, stride_ot, stride_od, stride_lb, stride_lh, stride_lt, WRITE_LSE)  # fmt: skip


# Hopper configurations (H100/H200), autotuned per (rows, head dim, dtypes, BLOCK_M, causal, ieee, power-of-two
# bucket of split_len), so a growing prefix retunes at most ~10 times, not every step. BLOCK_M comes from the
# host (it fixes the split plan); the configs choose the key tile, warps, pipeline depth and TMA or plain loads.
# Autotuning runs on the first call of each key: warm up before capturing a CUDA graph.
def _cfg(bn, warps, stages, tma):
    return triton.Config({"BLOCK_N": bn, "STAGES": stages, "USE_TMA": tma}, num_warps=warps, num_stages=stages)


_HOPPER_CONFIGS = [
    _cfg(64, 4, 3, False),  # the old kernel's most frequent pick
    _cfg(64, 4, 3, True),
    _cfg(64, 4, 4, True),
    _cfg(128, 4, 2, True),
    _cfg(128, 4, 3, False),
    _cfg(128, 8, 2, False),
    _cfg(128, 8, 3, False),
    _cfg(128, 8, 2, True),
    _cfg(128, 8, 3, True),
    _cfg(64, 8, 3, True),
]
_TUNE_KEY = ["ROWS", "HEAD_DIM", "BLOCK_M", "CAUSAL", "PREFIX_ONLY", "TREE_SPLIT", "IEEE", "OVERLAP", "split_bucket"]


_SHORT_SPLIT = 256  # keys: at or below this split length, 128-key tiles are not tried


def _prune(configs, named_args, **kwargs):
    # 8 warps only for 128-row tiles (a 64 x BLOCK_N tile leaves too little work per warp)
    keep = [c for c in configs if not (kwargs.get("BLOCK_M") == 64 and c.num_warps == 8)]
    # No 128-key tiles for short splits: a program then runs one or two latency-bound steps, and timing ~20 us
    # kernels while autotuning is noisy enough to pick them. H200, Llama-3-8B 72-row verify (4.2k cache, P = 1k),
    # bf16, graph-captured, 192-key splits: 64-key tiles 22.3 us, 128-key tiles 30.2 us
    # (tree_attention_sweep_small_h200.json).
    split_len = named_args.get("split_len")
    if split_len is not None and split_len <= _SHORT_SPLIT:
        keep = [c for c in keep if c.kwargs["BLOCK_N"] < 128] or keep
    return keep or configs[:1]


def _autotuned(configs):
    return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})(
        _tree_attn_split_kernel
    )


if _INTERPRET:  # autotune bypassed: tiles chosen in _launch
    _split_kernel = _split_kernel_plain = _tree_attn_split_kernel
elif os.environ.get("LONGSPEC_AUTOTUNE", "1") == "0":
    # one fixed Hopper config: no tuning compiles, for runs that meet many distinct tree sizes
    _split_kernel = _split_kernel_plain = _autotuned(_HOPPER_CONFIGS[:1])
else:
    _split_kernel = _autotuned(_HOPPER_CONFIGS)  # TMA and plain-load configs
    _split_kernel_plain = _autotuned([c for c in _HOPPER_CONFIGS if not c.kwargs["USE_TMA"]])  # unaligned views


# ----------------------------------------------------------------------------------------------
# Host side: checks, split planning, launch.

_SPLIT_OVERHEAD_KEYS = 256  # cost of writing + merging one partial, in "keys of work" (H200 estimate)
_SLOTS_PER_SM = 2  # programs the planner counts as resident on one SM
# The plan depends on how many row tiles a call has. With one (decode, draft levels: a few rows) a partial is a
# few rows, cheap to write and to merge, and each 64-key step of a program waits ~0.9 us on its loads, so many
# short splits win: up to 64 splits of 64-key granularity. H200, bf16, graph-captured
# (data/results/tree_attention_sweep_small_h200.json): the embedded model's 1-row decode at 2.7k of a 4.2k
# cache, 12 splits 7.7 us, 34 splits 6.1 us; the draft's 32-row cross-attention 9.6 -> 7.6 us; Llama-3-8B
# decode at 32k 40.6 -> 38.8 us (at 4k this cost model plans 23 splits, 12.0 us, where 34 took 10.4 us: it
# counts 34 x 8 programs as two waves). With several row tiles (verification) every split writes and merges
# ROWS x D fp32 partials: at most 16 splits of 128-key granularity. Llama-3-8B 72-row verify at 16k, fp16:
# 6 splits 60.6 us against 13 shorter ones 63.9 us; the embedded model's verify: 11 splits 10.3 us against
# 33 splits 10.7 us (tree_attention_h200_vector_merge*.json, the sweep).
_SPLIT_PLANS = {"one_tile": (64, 64), "row_tiles": (128, 16)}  # (key granularity, most splits)
# LONGSPEC_ROW_TILE_SPLITS: the most splits of a pass with several row tiles (a verification pass or a prefill; 16
# above unless set). With 32 the embedded model's verify at a 2.7k prefix gets 22 splits of 128 keys instead of 11
# of 256: 9.5 against 10.3 us alone on the H200 at 0e06c7e, with BLOCK_N 32 (LONGSPEC_ROW_TILE_CONFIG=32:4:2)
# 8.8 us (tree_attention_sweep_small_h200.json, before the tree's own programs). In the decoder it did not pay (H200,
# 2026-12-06: the default tree's verify 172.7 -> 173.8 us, and 198.4 us with the 32-key tiles;
# e2e_ab_row_tile_h200.log): both stay unset.
ROW_TILE_SPLITS = os.environ.get("LONGSPEC_ROW_TILE_SPLITS", "")
# LONGSPEC_ROW_TILE_CONFIG="BLOCK_N:warps:stages": one fixed split-kernel config (plain loads) for passes with
# several row tiles (verification passes and the prefill; decode and draft levels keep theirs), in place of the
# tuned or fixed one
ROW_TILE_CONFIG = os.environ.get("LONGSPEC_ROW_TILE_CONFIG", "")


def _row_tile_splits() -> int:
    """The most splits of a pass with several row tiles: LONGSPEC_ROW_TILE_SPLITS checked, else the table's."""
    if not str(ROW_TILE_SPLITS).strip():
        return _SPLIT_PLANS["row_tiles"][1]
    try:
        most = int(ROW_TILE_SPLITS)
    except ValueError:
        most = 0
    if not 1 <= most <= 64:
        raise ValueError(f"LONGSPEC_ROW_TILE_SPLITS={ROW_TILE_SPLITS!r} is not a count from 1 to 64; unset it (16)")
    return most


_ROW_TILE_KERNELS: dict = {}


def _row_tile_kernel(spec: str):
    """The split kernel fixed to LONGSPEC_ROW_TILE_CONFIG's "BLOCK_N:warps:stages" (plain loads), built once."""
    if spec not in _ROW_TILE_KERNELS:
        try:
            bn, warps, stages = (int(x) for x in spec.split(":"))
        except ValueError:
            bn = warps = stages = 0
        if bn not in (16, 32, 64, 128) or warps not in (1, 2, 4, 8) or not 1 <= stages <= 5:
            raise ValueError(
                f"LONGSPEC_ROW_TILE_CONFIG={spec!r} is not BLOCK_N:warps:stages (BLOCK_N 16/32/64/128, warps "
                "1/2/4/8, stages 1-5), e.g. 32:4:2; unset it to keep the split kernel's own config"
            )
        _ROW_TILE_KERNELS[spec] = _autotuned([_cfg(bn, warps, stages, False)])
    return _ROW_TILE_KERNELS[spec]


_ALLOCATOR_SET = False


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: few, large programs
    return _sm_count_cuda(device.index if device.index is not None else torch.cuda.current_device())


_SM_CACHE: dict = {}


def _sm_count_cuda(index: int) -> int:
    if index not in _SM_CACHE:
        _SM_CACHE[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_CACHE[index]


_BLOCK_M_CHOICES = (64, 128)
FORCED_BLOCK_MS = (16, 32, 64, 128)  # the row tiles LONGSPEC_BLOCK_M may force (16: the matrix unit's smallest)
# Timed on an H100 on 2026-12-07 (e2e_ab_block_m_*_h100.json): forcing 32 or 16 made the default tree's verify
# (144 packed rows) 170 -> 186 / 180 us, as every row tile reads the prefix's K and V again; AR and chains did not move.
SMALL_TILE_ROWS = _BLOCK_M_CHOICES[0]  # packed rows that always take one tile of their own size (bench.tune reads it)


# LONGSPEC_ROW_TILE_RULE: how a pass of SMALL_TILE_ROWS + 1 .. 2 * SMALL_TILE_ROWS packed rows (a verification of a
# tree of 33-64 nodes) is tiled. "small" (the default since 2026-12-06): two row tiles of 64, so the pass has several
# row tiles and its tree keys get programs of their own (LONGSPEC_TREE_SPLIT=auto). "padding" (before): the least
# padding, one tile of 128, whose tree keys run in the last prefix split. H100, two calls on one machine
# (e2e_ab_wide_{base,block_m_64,tree_split}_h100.json): the verify of 35 / 38 / 53 nodes took 170.2 / 171.4 /
# 181.5 us in one tile of 128 and 155.0 / 154.7 / 164.1 in two of 64 (LONGSPEC_BLOCK_M=64), the trees 1-6% faster;
# passes of up to 64 rows (AR, chains, narrow trees) and past 128 (the default tree) do not change. The rule also
# tiles a draft level of 33-64 parents (its cross-attention) as two tiles: untimed, as no default, recorded or probed
# shape has such a level (the tuner's probe stops at 32 parents, 64 rows).
ROW_TILE_RULE = os.environ.get("LONGSPEC_ROW_TILE_RULE", "small")
_ROW_TILE_RULES = ("small", "padding")


def _pick_block_m(rows: int) -> int:
    """Row tile for ROWS = G * T packed rows: up to 2 * SMALL_TILE_ROWS rows, tiles of SMALL_TILE_ROWS (under
    LONGSPEC_ROW_TILE_RULE=small); past that, the candidate with the least padding (ties: the larger tile, which reads
    each K/V tile for more rows). LONGSPEC_BLOCK_M overrides it (benchmark sweeps)."""
    forced = os.environ.get("LONGSPEC_BLOCK_M")
    if forced:
        if forced not in {str(bm) for bm in FORCED_BLOCK_MS}:
            raise ValueError(f"LONGSPEC_BLOCK_M={forced!r} is not a row tile {FORCED_BLOCK_MS}; unset it or pick one")
        return int(forced)
    if ROW_TILE_RULE not in _ROW_TILE_RULES:
        raise ValueError(f"LONGSPEC_ROW_TILE_RULE={ROW_TILE_RULE!r} is not one of small, padding; unset it or pick one")
    if _INTERPRET:
        return min(128, max(16, triton.next_power_of_2(rows)))
    if rows <= SMALL_TILE_ROWS or (ROW_TILE_RULE == "small" and rows <= 2 * SMALL_TILE_ROWS):
        return SMALL_TILE_ROWS
    return min(_BLOCK_M_CHOICES, key=lambda bm: (_cdiv(rows, bm) * bm, -bm))


def plan_splits(max_prefix: int, rows: int, batch_kv_heads: int, device, num_splits=None, block_m=None):
    """(n_splits, split_len) for the prefix, n_splits >= 1. Default: minimise waves * (split_len + overhead),
    waves = ceil(n_splits * programs_per_split / SMs) with programs_per_split = row tiles * batch * kv heads,
    so P = 1k still fills the GPU and long prefixes get whole waves. `num_splits` forces a count (the result
    may be lower after rounding)."""
    bm = block_m or _pick_block_m(rows)
    align, most = _SPLIT_PLANS["one_tile"] if rows <= bm else (_SPLIT_PLANS["row_tiles"][0], _row_tile_splits())
    align = 16 if _INTERPRET else int(os.environ.get("LONGSPEC_SPLIT_ALIGN", align))
    if max_prefix <= 0:
        return 1, align
    if num_splits is None:
        # resident programs per SM (_SLOTS_PER_SM): more than one hides a program's softmax and load waits behind
        # another's. H200, Llama-3-8B verify shape, fp16: planning one per SM gave 3 splits (120 programs) at a
        # 16k prefix and 64 us; two per SM gave 6 splits (240 programs) and 55 us (tree_attention_h200*.json).
        slots = _SLOTS_PER_SM * _sm_count(torch.device(device))
        base = batch_kv_heads * _cdiv(rows, bm)
        best = None
        for s in range(1, min(_cdiv(max_prefix, align), 16 * slots // base + 2, most) + 1):
            cost = _cdiv(s * base, slots) * (_cdiv(_cdiv(max_prefix, s), align) * align + _SPLIT_OVERHEAD_KEYS)
            if best is None or cost < best[0]:
                best = (cost, s)
        num_splits = best[1]
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}; pass None to let the planner choose")
    split_len = _cdiv(_cdiv(max_prefix, num_splits), align) * align
    return _cdiv(max_prefix, split_len), split_len


# fp32 partial-output elements one merging program holds at once (16 registers a thread). The H200 sweep of
# 2026-12-04 (tree_attention_sweep_merge_h200.json) timed 2,048 against 8,192 on the planner's own plans:
# Llama verify at 1k 25.1 against 26.8 us, embedded verify 9.5 against 10.3, embedded decode 6.27 against 6.28:
# more, smaller merging programs spread the merge over more SMs.
_MERGE_ELEMS = 2048


def merge_tile(n_splits: int, rows: int, head_dim: int) -> tuple[int, int]:
    """(MERGE_S, MERGE_R): the merge reads all n_splits partials of MERGE_R rows as one tile, MERGE_S the
    power of two >= n_splits, MERGE_R a power of two in [2, 16] that keeps the tile at _MERGE_ELEMS or less."""
    merge_s = triton.next_power_of_2(max(n_splits, 1))
    fit = max(2, _MERGE_ELEMS // (merge_s * head_dim))
    return merge_s, max(2, min(16, triton.next_power_of_2(rows), 1 << (fit.bit_length() - 1)))


# The merge's form. A pass with several row tiles (verification) and few splits merges split by split, 16 rows a
# program; otherwise all splits at once in `merge_tile`'s tile. H200, Llama-3-8B verify at P = 1k (288 rows, 4
# splits of 256 keys, the same split-kernel config), fp16, graph-captured: 16.1 us a call with the loop merge
# against 21.1 us with the vector merge (tree_attention_h200_merge_bisect.json). Where the vector form paid off
# is one row tile and many splits (decode: 34 splits, tree_attention_sweep_small_h200.json). The sweep of both forms
# on the planner's plans (tree_attention_sweep_loop_h200.json) puts the bound between 6 splits (Llama verify at 1k,
# 5 row tiles: loop 19.4, vector 24.8 us) and 11 (embedded verify, 3 row tiles: loop 12.1, vector 9.5 us); 8 is
# inside that range, not pinned down. LONGSPEC_LOOP_MERGE=0/1 forces one form.
_LOOP_MERGE_MAX_SPLITS = 8
_LOOP_MERGE_ROWS = 16
LOOP_MERGE = os.environ.get("LONGSPEC_LOOP_MERGE", "auto")  # "auto", "0" (vector always) or "1" (loop always)


def merge_plan(n_splits: int, rows: int, head_dim: int, row_tiles: int, fused: bool = False) -> tuple[bool, int, int]:
    """(loop, MERGE_S, MERGE_R) of the merge: loop merges split by split, MERGE_R rows a program; otherwise the
    vector form reads MERGE_S x MERGE_R partials at once (`merge_tile`), which is also the fused merge's form."""
    if LOOP_MERGE not in ("auto", "0", "1"):
        raise ValueError(f"LONGSPEC_LOOP_MERGE={LOOP_MERGE!r} is not one of auto, 0, 1; unset it or pick one")
    auto = row_tiles > 1 and n_splits <= _LOOP_MERGE_MAX_SPLITS
    loop = not fused and (LOOP_MERGE == "1" or (LOOP_MERGE == "auto" and auto))
    if loop:
        return True, 1, min(_LOOP_MERGE_ROWS, triton.next_power_of_2(rows))
    return (False, *merge_tile(n_splits, rows, head_dim))


def _prefix_list(prefix_lens, B: int) -> list:
    if isinstance(prefix_lens, numbers.Integral) and not isinstance(prefix_lens, bool):
        return [int(prefix_lens)] * B
    if (
        isinstance(prefix_lens, torch.Tensor)
        and prefix_lens.dim() == 1
        and not prefix_lens.is_floating_point()
        and prefix_lens.dtype != torch.bool
        and prefix_lens.numel() == B
    ):
        return [int(p) for p in prefix_lens.tolist()]  # CUDA tensor: one host sync
    raise ValueError(
        f"prefix_lens must be an int or an integer tensor of shape [B]={B}, got {prefix_lens!r}; "
        "pass one committed length per sequence"
    )


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q, k, v, prefix_lens, block_mask, dtypes=_KERNEL_DTYPES):
    """Validate shapes/dtypes/devices; returns (B, Hq, Hkv, T, S, D, prefix list)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-D tensor ([B, H, T or S, D]), got "
                f"{getattr(x, 'shape', type(x))}; reshape it to [batch, heads, length, head_dim]"
            )
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B={B}, Hkv, S, D={D}]; "
            "pass the cache tensors of the same layer and batch as q"
        )
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype among {[str(d) for d in dtypes]}, got {q.dtype}, {k.dtype}, "
            f"{v.dtype}; cast them with .to(q.dtype)"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; move them with .to()")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv} (GQA); check the head counts")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported (supported: {SUPPORTED_HEAD_DIMS}); use backend 'torch'")
    if T < 1:
        raise ValueError("q has no query rows (T = 0); call attention only with at least one new token")
    plist = _prefix_list(prefix_lens, B)
    for b, p in enumerate(plist):
        if p < 0 or p + T > S:
            raise ValueError(
                f"prefix_lens[{b}] + T = {p} + {T} must lie in [T, S={S}]: the block's keys live at slots "
                "[P, P+T) of the cache; grow the cache or pass the right prefix length"
            )
    if block_mask is not None:
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise ValueError(
                f"block_mask must be a bool tensor (True = may attend), got "
                f"{getattr(block_mask, 'dtype', type(block_mask))}; convert with mask.bool()"
            )
        if tuple(block_mask.shape) not in ((T, T), (B, T, T)):
            raise ValueError(
                f"block_mask shape {tuple(block_mask.shape)} must be [T, T] or [B, T, T] with T={T}, "
                f"B={B}; build it for the T new rows"
            )
        if block_mask.device != q.device:
            raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}; move it with .to(q.device)")
    return B, Hq, Hkv, T, S, D, plist


def _check_buffer(name, x, shape, dtype, device):
    if x is not None and (tuple(x.shape) != tuple(shape) or x.dtype != dtype or x.device != device):
        raise ValueError(
            f"{name} must be {dtype} of shape {list(shape)} on {device}, got {x.dtype} "
            f"{list(x.shape)} on {x.device}; allocate it like that (or pass None)"
        )


_PACKED = {"mask": None, "version": -1, "packed": None}  # last mask packed: one verify step, all layers


def _pack_bits(block_mask: torch.Tensor) -> torch.Tensor:
    """bool [T, T] or [B, T, T] -> int32 [B or 1, T, W] with W = 4 * ceil(T / 128). Plain tensor code
    (no cache), so torch.compile can trace it. Inductor does not merge the identical packs of a pass's layers
    (it made three kernels of eight packs), so a model packs its mask once per pass (`pack_block_mask`) and
    hands the words to every layer (`tree_attention(..., packed_mask=)`)."""
    m = block_mask if block_mask.dim() == 3 else block_mask[None]
    T = m.shape[-1]
    W = 4 * _cdiv(T, 128)
    bits = torch.nn.functional.pad(m.to(torch.int64), (0, W * 32 - T)).view(m.shape[0], m.shape[1], W, 32)
    words = (bits << torch.arange(32, device=m.device)).sum(-1)  # [B, T, W] in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def pack_block_mask(block_mask: torch.Tensor) -> torch.Tensor:
    """bool [T, T] or [B, T, T] -> int32 [B or 1, T, W]: bit j % 32 of word j // 32 of row t is mask[t, j];
    W = 4 * ceil(T / 128), so a key tile of BLOCK_N <= 128 never reads past a row. Outside torch.compile the
    last mask is cached by identity and version, so the layers of one eager step pack it once."""
    if torch.compiler.is_compiling():  # traced: the packing ops themselves (the caller packs once per pass)
        return _pack_bits(block_mask)
    # inference tensors carry no version counter: pack them every call (a few tiny ops per layer)
    version = None if block_mask.is_inference() else block_mask._version
    if version is not None and _PACKED["mask"] is block_mask and _PACKED["version"] == version:
        return _PACKED["packed"]
    packed = _pack_bits(block_mask)
    if version is not None:
        _PACKED.update(mask=block_mask, version=version, packed=packed)
    return packed


def make_scratch(q, k, prefix_lens, num_splits=None):
    """Allocate the fp32 partial buffers (o [B*Hkv, n, G*T, D], lse [B*Hkv, n, G*T]) that
    `tree_attention(..., scratch=...)` uses for these inputs (n = the planned split count)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    p = max(_prefix_list(prefix_lens, B))
    rows = Hq // Hkv * T
    n, _ = plan_splits(p, rows, B * Hkv, q.device, num_splits)
    n += tree_split_applies(rows, _pick_block_m(rows), False)
    o_part = torch.empty(B * Hkv, n, rows, D, dtype=torch.float32, device=q.device)
    return o_part, torch.empty(o_part.shape[:3], dtype=torch.float32, device=q.device)


def _device_prefix(prefix_lens: torch.Tensor, B: int) -> torch.Tensor:
    """[B] lengths the kernel reads (int32 or int64): the caller's tensor itself when it already has B
    contiguous integer entries, so a captured step launches no cast kernel per attention call."""
    flat = prefix_lens.reshape(-1)
    if flat.numel() == B and flat.dtype in (torch.int32, torch.int64) and flat.is_contiguous():
        return flat
    return flat.expand(B).to(torch.int32)


def tree_attention(
    q,
    k,
    v,
    prefix_lens,
    block_mask=None,
    scale=None,
    return_lse=False,
    *,
    out=None,
    lse_out=None,
    num_splits=None,
    scratch=None,
    max_prefix=None,
    prefix_only=False,
    packed_mask=None,
):
    """Attention of q [B, Hq, T, D] to cache slots [0, P_b) (all visible) and [P_b, P_b+T) (block_mask,
    True = may attend; None = causal). Returns o [B, Hq, T, D] (q.dtype) and, if return_lse, the natural
    log-sum-exp [B, Hq, T] float32 of the scaled scores. Rows that see no key: o = 0, lse = -inf.

    `prefix_only`: the rows see the prefix [0, P_b) alone, as with an all-False block_mask (which must then be
    None), but the block's keys are never read and no mask is made or packed: the draft's cross-attention.

    `max_prefix`: with `prefix_lens` an integer tensor on the device, plan the splits for this upper
    bound and read the lengths only inside the kernel, so the call never waits on the host (CUDA-graph
    capture). The caller guarantees prefix_lens[b] <= max_prefix. Under torch.compile this form goes
    through the registered op `torch.ops.longspec.tree_attention_packed` (see `tree_attention_packed`),
    so Dynamo traces it with fullgraph=True; `scratch` and `num_splits` are then ignored.

    `packed_mask`: `pack_block_mask(block_mask)`, made once by a caller whose layers share one mask (a model's
    pass); block_mask is then still passed, for the shape checks, and is not packed again."""
    if prefix_only and block_mask is not None:
        raise ValueError("prefix_only=True attends to the prefix alone: pass block_mask=None with it")
    if packed_mask is not None and block_mask is None:
        raise ValueError("packed_mask is block_mask's packed words: pass the bool block_mask with it")
    device_lens = max_prefix is not None
    if device_lens:
        if not isinstance(prefix_lens, torch.Tensor) or prefix_lens.is_floating_point():
            raise ValueError(
                "max_prefix needs prefix_lens as an integer tensor [B] on the device; "
                "pass an int prefix without max_prefix otherwise"
            )
        B = q.shape[0]
        B, Hq, Hkv, T, S, D, plist = _check(q, k, v, int(max_prefix), block_mask)
        if torch.compiler.is_compiling():
            packed = packed_mask if packed_mask is not None or block_mask is None else pack_block_mask(block_mask)
            o, lse = torch.ops.longspec.tree_attention_packed(
                q, k, v, prefix_lens, packed, int(max_prefix), None if scale is None else float(scale), prefix_only
            )
            if out is not None:
                _check_buffer("out", out, (B, Hq, T, D), q.dtype, q.device)
                o = out.copy_(o)
            if lse_out is not None:
                _check_buffer("lse_out", lse_out, (B, Hq, T), torch.float32, q.device)
                lse = lse_out.copy_(lse)
            return (o, lse) if return_lse else o
        pref = _device_prefix(prefix_lens, B)
    else:
        B, Hq, Hkv, T, S, D, plist = _check(q, k, v, prefix_lens, block_mask)
        ragged = isinstance(prefix_lens, torch.Tensor) and len(set(plist)) > 1
        pref = torch.tensor(plist, dtype=torch.int32, device=q.device) if ragged else None
    packed = packed_mask if packed_mask is not None or block_mask is None else pack_block_mask(block_mask)
    if packed_mask is not None:
        _check_packed(packed_mask, B, T, q.device)
    return _launch(q, k, v, plist, pref, packed, scale, return_lse, out, lse_out, num_splits, scratch, prefix_only)


def _tma_ok(*xs) -> bool:
    """Tensor descriptors need a unit last stride and 16-byte aligned bases and strides."""
    for x in xs:
        es = x.element_size()
        if x.stride(3) != 1 or x.data_ptr() % 16 or any(st * es % 16 for st in x.stride()[:3]):
            return False
    return True


def _ensure_allocator():
    # device-side tensor descriptors (tl.make_tensor_descriptor) need a little global scratch per launch
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


# read K/V through tensor descriptors when the views allow it (tests and the benchmark flip it; LONGSPEC_TMA=0: off)
USE_TMA_LOADS = os.environ.get("LONGSPEC_TMA", "1") != "0"
# Several splits: a second launch merges the partials. LONGSPEC_FUSED_MERGE=1 lets the last split program to
# finish merge them instead (one launch per call; tests and the benchmarks flip it).
FUSED_MERGE = os.environ.get("LONGSPEC_FUSED_MERGE", "0") == "1"
# LONGSPEC_TREE_OVERLAP=1: the prefix loop rotated by half a step (_attend_prefix_overlapped), each tile's Q.K^T issued
# before the softmax of the tile before it. Off until timed on a GPU (`bench_tree_attention`'s triton_overlap);
# tests and the benchmark flip it.
OVERLAP = os.environ.get("LONGSPEC_TREE_OVERLAP", "0") == "1"
LAST_LAUNCH: dict = {}  # the latest launch's plan and tile choice (the benchmark records it)

# LONGSPEC_TREE_SPLIT: where the tree keys are attended. "auto" (the default): by programs of their own, one per row
# tile, beside the prefix splits (one more partial to merge), whenever the rows need several row tiles (a
# verification pass): the last prefix split then no longer runs its share of the prefix AND the whole tree one after
# the other. With one row tile (decode, the draft's levels) the tree stays in the last split. "on": always (the
# tests run it on the interpreter's single row tiles); "off": never, the tree in the last prefix split.
# "wide": as auto, and also for one row tile of more than WIDE_TREE_ROWS packed rows: under
# LONGSPEC_ROW_TILE_RULE=padding a tree of 33-64 nodes packs 66-128 rows into ONE tile of 128, whose tree keys auto
# leaves in the last prefix split. Timed on an H100 (2026-12-06, e2e_ab_wide_*_h100.json), "wide" and two tiles of
# 64 both took the 35-53-node verifies from 170-182 us to 154-166; the row-tile rule (two tiles, `_pick_block_m`) is
# the default since, and "wide" stays for a forced tile of 128 (LONGSPEC_BLOCK_M=128).
TREE_SPLIT = os.environ.get("LONGSPEC_TREE_SPLIT", "auto")
_TREE_SPLIT_CHOICES = ("auto", "wide", "on", "off")
WIDE_TREE_ROWS = SMALL_TILE_ROWS  # "wide": one row tile of more packed rows than this gives the tree its programs


def tree_split_applies(rows: int, block_m: int, prefix_only: bool) -> bool:
    """Whether the tree keys get programs of their own (LONGSPEC_TREE_SPLIT, above) for `rows` packed query rows."""
    if TREE_SPLIT not in _TREE_SPLIT_CHOICES:
        raise ValueError(f"LONGSPEC_TREE_SPLIT={TREE_SPLIT!r} is not one of auto, wide, on, off; unset it or pick one")
    if prefix_only or TREE_SPLIT == "off":
        return False
    return TREE_SPLIT == "on" or rows > block_m or (TREE_SPLIT == "wide" and rows > WIDE_TREE_ROWS)


def _launch(q, k, v, plist, pref, packed, scale, return_lse, out, lse_out, num_splits, scratch, prefix_only=False):
    """Run the split (and, with several splits, merge) kernels on checked inputs. plist: prefix lengths
    (host ints, or the upper bound for every sequence when `pref` is given); pref: int32/int64 [B] device lengths
    read by the kernel (ragged / CUDA-graph mode) or None (all sequences have plist[0]); packed: int32
    [B or 1, T, W] bit-packed tree mask or None (causal); prefix_only: no block keys at all (packed is None)."""
    if prefix_only and packed is not None:
        raise ValueError("prefix_only=True attends to the prefix alone: pass block_mask=None with it")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if q.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            "tree_attention runs Triton kernels: on CPU set TRITON_INTERPRET=1 before importing "
            "longspec_lab.kernels.tree_attention, or use attention backend 'torch'"
        )
    G, rows = Hq // Hkv, Hq // Hkv * T
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_m = _pick_block_m(rows)
    n_splits, split_len = plan_splits(max(plist), rows, B * Hkv, q.device, num_splits, block_m)
    tree_split = tree_split_applies(rows, block_m, prefix_only)
    n_parts = n_splits + tree_split  # partials per row: the tree's comes after the prefix splits
    _check_buffer("out", out, (B, Hq, T, D), q.dtype, q.device)
    _check_buffer("lse_out", lse_out, (B, Hq, T), torch.float32, q.device)
    # [B, Hq, T, D] view of [B, T, Hq, D] memory: the output projection reads it as [B, T, Hq * D] with no copy
    o = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2) if out is None else out
    lse = None
    if return_lse or lse_out is not None:
        lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device) if lse_out is None else lse_out
    direct = n_parts == 1  # (never with a tree split: two partials at least)
    grid = (triton.cdiv(rows, block_m), n_parts, B * Hkv)
    # Fused (when asked) only when one row tile holds every row. With several row tiles the merging program's
    # tail costs more than the launch: H200, Llama-3-8B verify shape (288 rows), fp16: 19.9 / 62.2 / 219.7 us fused
    # against 16.2 / 58.7 / 208.0 us with the merge launch at P = 1k / 16k / 64k (tree_attention_h200_fused_merge.json).
    # With one row tile it still lost once the merge read all splits at once: embedded model, bf16, graph-captured,
    # 1-row decode 8.0 against 7.7 us, the draft's 32-row cross-attention 16.5 against 9.6 us
    # (tree_attention_sweep_small_h200.json).
    fused = not direct and FUSED_MERGE and grid[0] == 1 and grid[2] <= TICKET_SLOTS and not tree_split
    loop_merge, merge_s, merge_r = merge_plan(n_parts, rows, D, grid[0], fused)
    arrivals = tickets(q.device) if fused else q
    if scratch is None:
        if direct:  # never written: the split kernel stores the output itself
            o_part = lse_part = o
        else:
            o_part = torch.empty(B * Hkv, n_parts, rows, D, dtype=torch.float32, device=q.device)
            lse_part = torch.empty(B * Hkv, n_parts, rows, dtype=torch.float32, device=q.device)
    else:
        o_part, lse_part = scratch
        _check_buffer("scratch[0]", o_part, (B * Hkv, n_parts, rows, D), torch.float32, q.device)
        _check_buffer("scratch[1]", lse_part, (B * Hkv, n_parts, rows), torch.float32, q.device)
        if not (o_part.is_contiguous() and lse_part.is_contiguous()):
            raise ValueError("scratch tensors must be contiguous; allocate them with make_scratch()")
    ragged = pref is not None
    if not ragged:
        pref = q
    causal = packed is None
    mask = q if causal else packed
    sm_b = 0 if causal or mask.shape[0] == 1 else mask.stride(0)
    sm_q = 0 if causal else mask.stride(1)
    ieee = q.dtype == torch.float32
    lse_arg = lse if lse is not None else o
    lse_strides = lse.stride() if lse is not None else (0, 0, 0)
    args = (
        q,
        k,
        v,
        pref,
        mask,
        o_part,
        lse_part,
        o,
        lse_arg,
        arrivals,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *o.stride(),
        *lse_strides,
        sm_b,
        sm_q,
        plist[0],
        split_len,
        n_parts,
        T,
        rows,
        Hkv,
        scale * _LOG2E,
        split_len.bit_length(),
    )
    consts = dict(
        GROUP=G,
        HEAD_DIM=D,
        BLOCK_M=block_m,
        RAGGED=ragged,
        CAUSAL=causal,
        PREFIX_ONLY=bool(prefix_only),
        TREE_SPLIT=tree_split,
        IEEE=ieee,
        DIRECT=direct,
        FUSED_MERGE=fused,
        OVERLAP=OVERLAP,
        WRITE_LSE=lse is not None,
        MERGE_S=merge_s,
        MERGE_R=merge_r,
    )
    tma = _tma_ok(k, v)
    if _INTERPRET:
        use_tma = tma and USE_TMA_LOADS
        _split_kernel[grid](*args, **consts, BLOCK_N=64, USE_TMA=use_tma, STAGES=1, **launch_args(q.device))
        kern = None
    else:
        use_tma = tma and USE_TMA_LOADS
        kern = _split_kernel if use_tma else _split_kernel_plain
        if ROW_TILE_CONFIG and grid[0] > 1:  # several row tiles: the fixed config asked for (plain loads)
            use_tma, kern = False, _row_tile_kernel(ROW_TILE_CONFIG)
        if use_tma:
            _ensure_allocator()
        n_tuned = len(getattr(kern, "cache", ()))
        kern[grid](*args, **consts, **launch_args(q.device))
    LAST_LAUNCH.update(
        n_splits=n_splits,
        split_len=split_len,
        BLOCK_M=block_m,
        grid=grid,
        tma_ok=tma,
        tma_allowed=use_tma,
        kernel=kern,
        tuned_now=kern is not None and len(getattr(kern, "cache", ())) > n_tuned,  # configs_timings are ours
        fused_merge=fused,
        overlap=OVERLAP,
        tree_split=tree_split,
        merge_tile=(merge_s, merge_r),
        loop_merge=loop_merge and not direct,
    )
    if not direct and not fused:
        block_r = merge_r
        _tree_attn_merge_kernel[(triton.cdiv(rows, block_r), B * Hkv)](
            o_part,
            lse_part,
            pref,
            o,
            lse_arg,
            *o.stride(),
            *lse_strides,
            plist[0],
            split_len,
            n_parts,
            T,
            rows,
            Hkv,
            GROUP=G,
            HEAD_DIM=D,
            BLOCK_R=block_r,
            MERGE_S=merge_s,
            LOOP=loop_merge,
            RAGGED=ragged,
            WRITE_LSE=lse is not None,
            TREE_SPLIT=tree_split,
            num_warps=4,
            **launch_args(q.device),
        )
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------------------
# The registered op: what torch.compile sees. Dynamo cannot trace a Triton launch through autotune and
# host-side planning, so the CUDA-graph entry point (device prefix lengths, `max_prefix`) is one opaque
# op with a fake (meta) version that only states the output shapes. The mask arrives bit-packed: the
# caller packs it with plain tensor code (`_pack_bits`), which Inductor fuses; a model packs it once per
# pass and hands the same words to each layer (`packed_mask`), as Inductor does not share the packs itself.


def _check_packed(packed_mask, B: int, T: int, device):
    if packed_mask is None:
        return
    W = 4 * _cdiv(T, 128)
    if (
        packed_mask.dtype != torch.int32
        or packed_mask.dim() != 3
        or packed_mask.shape[0] not in (1, B)
        or tuple(packed_mask.shape[1:]) != (T, W)
        or packed_mask.device != device
        or packed_mask.stride(2) != 1
    ):
        raise ValueError(
            f"packed_mask must be int32 [1 or B={B}, T={T}, {W}] on {device} with unit last stride, got "
            f"{packed_mask.dtype} {list(packed_mask.shape)} on {packed_mask.device}; build it with "
            "_pack_bits(block_mask) (or pass None for a causal block)"
        )


@torch.library.custom_op("longspec::tree_attention_packed", mutates_args=())
def tree_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_lens: torch.Tensor,
    packed_mask: Optional[torch.Tensor],
    max_prefix: int,
    scale: Optional[float] = None,
    prefix_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.ops.longspec.tree_attention_packed`: tree attention with device prefix lengths, as
    `tree_attention(q, k, v, prefix_lens, block_mask, scale, return_lse=True, max_prefix=max_prefix)`.
    prefix_lens: integer tensor [1] or [B] on q's device, each <= max_prefix; packed_mask: `_pack_bits(mask)`
    (int32 [1 or B, T, W]) or None (causal block, or no block at all with prefix_only). Returns o [B, Hq, T, D]
    (q.dtype) and lse [B, Hq, T] fp32."""
    B, Hq, Hkv, T, S, D, plist = _check(q, k, v, max_prefix, None)
    _check_packed(packed_mask, B, T, q.device)
    if prefix_lens.is_floating_point() or prefix_lens.numel() not in (1, B):
        raise ValueError(
            f"prefix_lens must be an integer tensor with 1 or B={B} elements, got {prefix_lens.dtype} "
            f"{list(prefix_lens.shape)}; pass the committed length(s) as a device tensor"
        )
    pref = _device_prefix(prefix_lens, B)
    return _launch(q, k, v, plist, pref, packed_mask, scale, True, None, None, None, None, prefix_only)


@tree_attention_packed.register_fake
def _tree_attention_packed_fake(q, k, v, prefix_lens, packed_mask, max_prefix, scale=None, prefix_only=False):
    B, Hq, T, D = q.shape
    _check_packed(packed_mask, B, T, q.device)
    return q.new_empty(B, T, Hq, D).transpose(1, 2), q.new_empty(B, Hq, T, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Reference (the paper's section 3): prefix part, tree part, sigmoid merge, in float64.


def _softmax_part(q, k, v, allowed, scale):
    # q [H, T, D], k/v [H, N, D], allowed [T, N] bool or None -> o [H, T, D], lse [H, T]
    s = q @ k.transpose(-1, -2) * scale  # [H, T, N]
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1) if s.shape[-1] else s.new_full(s.shape[:-1], float("-inf"))
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(s - finite[..., None]) @ v, lse


def tree_attention_reference(
    q, k, v, prefix_lens, block_mask=None, scale=None, return_lse=False, *, compute_dtype=torch.float64, out_dtype=None
):
    """Plain PyTorch version of tree_attention (same arguments). Computes in `compute_dtype`; returns o in
    `out_dtype` (default q.dtype) and lse float32. Any device; used by the tests and the benchmark."""
    B, Hq, Hkv, T, S, D, plist = _check(q, k, v, prefix_lens, block_mask, _KERNEL_DTYPES + (torch.float64,))
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if block_mask is None:
        block_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = block_mask.expand(B, T, T)
    outs, lses = [], []
    for b, P in enumerate(plist):
        qb = q[b].to(compute_dtype)  # [Hq, T, D]
        kb = k[b, :, : P + T].to(compute_dtype).repeat_interleave(G, 0)  # [Hq, P+T, D]
        vb = v[b, :, : P + T].to(compute_dtype).repeat_interleave(G, 0)
        o_p, lse_p = _softmax_part(qb, kb[:, :P], vb[:, :P], None, scale)
        o_t, lse_t = _softmax_part(qb, kb[:, P:], vb[:, P:], mask[b], scale)
        w = torch.sigmoid(lse_p - lse_t)  # = e^lse_p / (e^lse_p + e^lse_t)
        w = torch.where(torch.isinf(lse_p) & torch.isinf(lse_t), torch.zeros_like(w), w)[..., None]
        outs.append(w * o_p + (1 - w) * o_t)
        lses.append(torch.logaddexp(lse_p, lse_t))
    o = torch.stack(outs).to(out_dtype or q.dtype)
    return (o, torch.stack(lses).float()) if return_lse else o
