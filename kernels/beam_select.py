"""A beam level's whole selection in one launch: log-softmax, parent scores, top-k of every chunk, then the top-w.

A beam level of the draft tree (LongSpec, arXiv 2502.17421; `spec/draft.py: beam_level`) keeps the w best
(parent, token) pairs of n parents x V tokens, scored by the parent's cumulative log-probability plus the
draft's log-probability of the token:

    score[i, v] = parent[i] + log_softmax(logits[i])[v]          (float32)
    key[i, v]   = order_key(score[i, v]) << 32  |  (n V - 1 - (i V + v))
    the w largest keys, descending

`order_key` maps float32 bits to integers of the same order, and the low 32 bits name the pair, lower flat
index first among equal scores (`spec/draft.py: _order_key`). Compiled, that definition is three launches
per level: Inductor's kernel for the log-softmax and the keys (it writes n x V int64 keys, 512 KiB for a
16 x 4,096 level), then `flat_topk`'s two passes (each chunk's top-w, then the top-w of those). On the H200
they took 3.0 + 4.7 + 4.5 us for a 16-parent level of the default tree (data/results/profile_h200.json),
about a quarter of the level, and most of what a tree level costs beyond a chain level's.

Here one program owns one chunk of BLOCK_V tokens of one parent row:

    1. the row's log-sum-exp, over the whole row in blocks of BLOCK_L (online maximum and sum; every chunk
       program of a row computes it: V floats from L2, cheaper than a launch to share it)
    2. its chunk's keys, from (logit - max) - log(sum) as torch's log_softmax does, in registers only
    3. the chunk's K = min(w, V) largest keys, stored to a small scratch ([n, n_chunks * K] int64)
    4. an arrival ticket (acquire/release): the last program to arrive has seen every other chunk's keys, so
       it selects the w largest of all n * n_chunks * K candidates, writes them, and puts the ticket back to 0
       for the next launch or CUDA-graph replay (the pattern of kernels/masked_attention.py)

With INTO (`beam_select_into`, the switch LONGSPEC_BEAM_WRITE) the last program goes on to write the level into
the tree's buffers, as spec/draft.py's _decode_keys and TreeBuffers.add_level do: each key's token, its parent's node
id and its score, and each new node's mask row (its parent's row plus itself). Compiled, add_level is two more
launches a level (bench.fusion_proxy: a level's generated kernels 3 -> 1).

So a level's selection is one launch and one scratch round trip, and the n x V keys are never written. The
selections in steps 3 and 4 are `row_topk`'s (`_store_topk`: K repeated maxima, or the bitonic network with
LONGSPEC_TOPK_ALGO=bitonic).

A second form (`_beam_select_logits_kernel`, the switch LONGSPEC_BEAM_CHUNK_KEYS) leaves the log-sum-exp to the
last program. Within one row the parent's score and the log-sum-exp are one constant, so the row's best scores are
its best logits:

    1'. each chunk program reads only its chunk: it stores the chunk's maximum and sum of exp(logit - maximum), and
        its K largest logits as keys (a 16-bit logit's bits and the reversed column in one int32, half the width
        of a score key through the selection network; float32 logits keep int64 keys)
    2'. the last program folds each row's chunk sums into its log-sum-exp, scores every kept logit as step 2 does,
        and selects the W largest keys; with "logits_rows" it first keeps each row's K best (the bitonic network
        over [n, chunks x K], then the W best of n x K, not of n x chunks x K). There the fold needs only the row,
        so the rows' partials and parents' scores come in the same round trip as the candidates, and the kept keys
        are scored where the row's selection leaves them. The chunk programs store their K keys in alternating runs
        (odd chunks ascending), so the row's K best come from the bitonic top-k step on sorted runs without the
        sorting rounds tl.topk would spend on them again (`_row_top_of_runs`). With the round trips below, for sm_90
        the 16-parent last program's PTX went from 2,395 to 1,751 lines (shuffles 112 -> 72, barriers 19 -> 10,
        global loads 13 -> 5) and the kernel from 64 to 40 registers a thread. Timed on an H100 against that form
        (data/results/beam_select_last*_h100.json, one call): a 16 x 16 level 6.8 -> 5.2 us alone, 4 x 16
        6.3 -> 4.8; in the decoder the default tree 16,012 -> 16,406 tokens/s with the same tokens
        (e2e_ab_beam_last_*_h100.json)

Where the level's W keys end as one register vector (the bitonic network, or a width of 1's maximum), the last
program writes the level from those registers (`_select_level`); only K repeated maxima read them back from OUT.

The pairs are the same as the first form's; the row's sum is folded in another order, so the scores can differ in
their last bits, as above.

The log-sum-exp is summed in another order than torch's, so a score can differ from the reference's in its last
bits: pairs whose scores tie to within a few ulps may come out in the other order. The greedy output never
depends on it (the draft only proposes; verification keeps the target's tokens), and the tests compare the
selected pairs with float64 scores where the top w are separated.

`beam_select_reference` is the definition in PyTorch (what the decoder runs with the switch off).
`beam_select` checks its inputs and calls the registered op `torch.ops.longspec.beam_select`, which
torch.compile(fullgraph=True) keeps as one opaque op. The switch that sends the decoder here is
LONGSPEC_BEAM_SELECT (`ops/topk.py`). `main` times the kernel against the compiled definition on a level's
shape:

    python -m longspec_lab.kernels.beam_select --rows 1,4,16 --vocab 4096 --width 4,16,16

With --phases it also times each form stopped early (`phase_probe`, the kernel's PHASES: after the log-sum-exp walk,
after the chunk's top-k), so that the parts of a level's selection come out by difference.

Taught in: notebooks/02_tree_shapes.ipynb
"""

import os

import torch
import triton
import triton.language as tl

from longspec_lab.kernels.launch import launch_args, tickets
from longspec_lab.kernels.row_topk import _algo, _block_v, _flat_first_block, _store_topk, _vec_max
from longspec_lab.kernels.tree_attention import _max, _sum

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when the kernel below is defined
_MIN_KEY_INT = -(2**63)
_MIN_KEY = tl.constexpr(_MIN_KEY_INT)  # below every key: the padding of masked columns and of unused candidates
_MIN_KEY32 = tl.constexpr(-(2**31))  # the same for the int32 keys of 16-bit logits (`_half_key`)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_VOCAB = 16384  # each chunk program reads its whole row for the log-sum-exp; beyond this, the two-step path
MAX_CANDIDATES = 4096  # the last program holds every candidate in registers: 4,096 int64 over 4 or 8 warps
BLOCK_L = 1024  # tokens per warp in one step of the log-sum-exp walk: 32 float32 registers a thread
NUM_WARPS = os.environ.get("LONGSPEC_BEAM_WARPS", "8")  # every program's warps: 1, 2, 4, 8 or auto (`_num_warps`)
AUTO_NARROW = 4  # LONGSPEC_BEAM_WARPS=auto: levels of at most this many parents run 4 warps, wider ones 8
# how a chunk program ranks its tokens (`_chunk_form`): "scores" (each program walks its row's log-sum-exp and ranks
# int64 score keys, `_beam_select_kernel`; the default before 2026-12-06), "logits" (each program ranks its chunk's
# logits, 32-bit keys for 16-bit logits, and keeps its chunk's maximum and sum; the last program folds them,
# `_beam_select_logits_kernel`), or "logits_rows" (the default: as "logits", and the last program keeps each row's
# best before the best of all; bitonic only). H100, 2026-12-06, one call, the same tokens on every side
# (data/results/e2e_ab_beam_chunk_*_h100.json): a 16-parent level's selection 11.2 -> 9.4 us of the step (12.2 with
# "logits"), the default tree 15,729 -> 15,995 tokens/s; alone 8.0 -> 6.8 us (beam_select_chunk_keys_h100.json)
CHUNK_KEYS = os.environ.get("LONGSPEC_BEAM_CHUNK_KEYS", "logits_rows")
CHUNK_FORMS = ("scores", "logits", "logits_rows")
MAX_PARTIAL_TILE = 16384  # "logits": the last program's [candidates, chunks] tile of chunk partials (fp32, twice)


@triton.jit
def _order_bits(f):
    """float32 -> int32 of the same order (negative floats' bits flipped), as spec/draft.py's _order_key."""
    bits = f.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _select_level(OUT, final, TOKENS, PARENTS, TREE_SCORES, ANC, lo, plo, N, n_rows, V, W: tl.constexpr,
                  BITONIC: tl.constexpr, W_POW2: tl.constexpr, INTO: tl.constexpr, W_TILE: tl.constexpr,
                  N_TILE: tl.constexpr):  # fmt: skip
    """The last program's end: the W largest keys of the 1-D block `final` stored at OUT, best first, and with INTO
    written into the tree's buffers. Where the keys are one register vector (the bitonic network's [W_POW2], or a
    width of 1's maximum) they go to `_write_level` as they are; K repeated maxima store them one by one, so the
    level reads them back from OUT (a barrier and a round trip through the cache)."""
    if BITONIC and W_POW2 > 1:
        best = tl.topk(final, W_POW2)  # [W_POW2] the level's keys, best first (W_TILE == W_POW2 with INTO)
        offs = tl.arange(0, W_POW2)
        tl.store(OUT + offs, best, mask=offs < W)
        if INTO:
            _write_level(best, TOKENS, PARENTS, TREE_SCORES, ANC, lo, plo, N, n_rows, V, W, W_TILE, N_TILE)
    elif W == 1:
        top = _vec_max(final)  # the one key
        tl.store(OUT, top)
        if INTO:
            best = tl.zeros([W_TILE], dtype=top.dtype) + top  # [1]
            _write_level(best, TOKENS, PARENTS, TREE_SCORES, ANC, lo, plo, N, n_rows, V, W, W_TILE, N_TILE)
    else:
        _store_topk(OUT, final, _MIN_KEY, W, BITONIC, W_POW2)
        if INTO:
            tl.debug_barrier()  # the keys this program's threads just stored are visible to all of them
            offs_w = tl.arange(0, W_TILE)
            best = tl.load(OUT + offs_w, mask=offs_w < W, other=0)  # [W_TILE]
            _write_level(best, TOKENS, PARENTS, TREE_SCORES, ANC, lo, plo, N, n_rows, V, W, W_TILE, N_TILE)


@triton.jit
def _write_level(best, TOKENS, PARENTS, TREE_SCORES, ANC, lo, plo, N, n_rows, V, W: tl.constexpr,
                 W_TILE: tl.constexpr, N_TILE: tl.constexpr):  # fmt: skip
    """The level's W keys `best` ([W_TILE], best first, in registers) written into the tree's buffers (`INTO`: the
    last program only)."""
    offs_w = tl.arange(0, W_TILE)
    w_ok = offs_w < W
    flat = (n_rows * V - 1) - (best & 0xFFFFFFFF)  # the low 32 bits: the reversed flat index
    node = lo + offs_w
    parent = plo + flat // V
    bits = (best >> 32).to(tl.int32)  # the high 32 bits: the score's order bits
    level_score = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)
    tl.store(TOKENS + node, flat % V, mask=w_ok)
    tl.store(PARENTS + node, parent, mask=w_ok)
    tl.store(TREE_SCORES + node, level_score, mask=w_ok)
    cols = tl.arange(0, N_TILE)
    both = w_ok[:, None] & (cols < N)[None, :]
    up = tl.load(ANC + parent[:, None] * N + cols[None, :], mask=both, other=0)  # [W_TILE, N_TILE] the parents' rows
    own = (up != 0) | (cols[None, :] == node[:, None])  # [W_TILE, N_TILE] each node's own mask row
    tl.store(ANC + node[:, None] * N + cols[None, :], own.to(tl.uint8), mask=both)


@triton.jit
def _beam_select_kernel(
    LOGITS,  # [n, V] the draft's logits at each parent (fp16, bf16 or fp32), unit column stride
    SCORES,  # [n] fp32 the parents' cumulative log-probabilities
    CAND,  # [n * n_chunks * K] int64 scratch: chunk c of row i keeps its K largest keys at (i * n_chunks + c) * K
    OUT,  # [W] int64 the level's W largest keys, descending
    TICKET,  # int32 [1] arrival ticket, zero between launches
    V,  # tokens per row
    stride_l,  # row stride of LOGITS, in elements
    n_chunks,  # chunks per row (grid axis 1)
    K: tl.constexpr,  # keys each chunk keeps: min(W, V)
    W: tl.constexpr,  # the level's width
    BLOCK_V: tl.constexpr,  # tokens per chunk (a power of two >= K)
    BLOCK_L: tl.constexpr,  # tokens per step of the log-sum-exp walk (a power of two; 32 per thread)
    CAND_PAD: tl.constexpr,  # a power of two >= n * n_chunks * K: the last program's candidate block
    BITONIC: tl.constexpr,  # select with the bitonic network (row_topk's TOPK_ALGO)
    K_POW2: tl.constexpr,  # power of two >= K (bitonic)
    W_POW2: tl.constexpr,  # power of two >= W (bitonic)
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
    TOKENS=None,  # with INTO: [N] int64 the tree's tokens; the level's nodes lo .. lo + W - 1 are written
    PARENTS=None,  # with INTO: [N] int64 the tree's parents (node ids)
    TREE_SCORES=None,  # with INTO: [N] fp32 the tree's cumulative scores
    ANC=None,  # with INTO: [N, N] uint8 the tree mask; the level's rows are its parents' rows plus the node itself
    lo=0,  # with INTO: the level's first node
    plo=0,  # with INTO: the parents' level's first node (row 0 of LOGITS is node plo)
    N=1,  # with INTO: the tree's nodes (the mask's row length)
    INTO: tl.constexpr = False,  # also write the level into the tree buffers (LONGSPEC_BEAM_WRITE)
    W_TILE: tl.constexpr = 1,  # with INTO: a power of two >= W
    N_TILE: tl.constexpr = 1,  # with INTO: a power of two >= N
    PHASES: tl.constexpr = 3,  # a timing probe stops early: 1 after the log-sum-exp, 2 after the chunk's top-k
):
    if USE_PDL:  # before any other memory access, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    n_rows = tl.num_programs(0)
    base = LOGITS + row.to(tl.int64) * stride_l
    # 1. the row's maximum and sum of exp(logit - maximum), block by block (one block for the embedded draft),
    #    each block's (maximum, sum) folded into the running pair: registers for one block of logits only
    offs_l = tl.arange(0, BLOCK_L)
    row_max = float("-inf")
    row_sum = 0.0
    for v0 in range(0, V, BLOCK_L):
        x = tl.load(base + v0 + offs_l, mask=v0 + offs_l < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, _max(x, 0))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # no finite logit yet (masked tokens): the sum stays 0
        row_sum = row_sum * tl.exp(row_max - safe) + _sum(tl.exp(x - safe), 0)
        row_max = new_max
    log_sum = tl.log(row_sum)
    if PHASES == 1:  # the timing probe (`main --phases`): the log-sum-exp walk alone, its result kept
        lse = (row_max + log_sum).to(tl.int32, bitcast=True).to(tl.int64)  # the float's bits
        tl.store(CAND + (row * n_chunks + chunk).to(tl.int64) * K, lse)
    else:
        # 2. this chunk's keys
        offs = chunk * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V] token ids
        ok = offs < V
        x = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
        score = tl.load(SCORES + row) + ((x - row_max) - log_sum)  # parent + log_softmax, in float32
        order = _order_bits(score).to(tl.int64)  # same order as the floats
        rev = (n_rows * V - 1 - (row * V + offs)).to(tl.int64)  # lower flat index -> larger key
        key = tl.where(ok, (order << 32) + rev, _MIN_KEY)
        # 3. the chunk's K largest keys into the scratch
        _store_topk(CAND + (row * n_chunks + chunk).to(tl.int64) * K, key, _MIN_KEY, K, BITONIC, K_POW2)
        if PHASES >= 3:  # (the probe's PHASES 2 stops after the chunk's top-k)
            # 4. the last program to arrive selects the W largest of every chunk's keys
            tl.debug_barrier()  # every store of this program is issued before its ticket moves
            arrived = tl.atomic_add(TICKET, 1, sem="acq_rel", scope="gpu")
            total = n_rows * n_chunks
            if arrived == total - 1:
                offs_c = tl.arange(0, CAND_PAD)
                cand = tl.load(CAND + offs_c, mask=offs_c < total * K, other=_MIN_KEY, cache_modifier=".cg")
                # with INTO, 5. the level itself, as spec/draft.py's _decode_keys and TreeBuffers.add_level make it
                _select_level(OUT, cand, TOKENS, PARENTS, TREE_SCORES, ANC, lo, plo, N, n_rows, V, W, BITONIC, W_POW2,
                              INTO, W_TILE, N_TILE)  # fmt: skip
                tl.atomic_xchg(TICKET, 0)


@triton.jit
def _half_key(raw, col):
    """int32 key of a 16-bit float logit raw (bf16 or fp16 bits) at column col < 65,536: the float's order in the high
    16 bits (negative floats' bits flipped), the reversed column in the low 16 (lower column first among ties)."""
    bits = raw.to(tl.int16, bitcast=True).to(tl.int32)
    order = tl.where(bits < 0, bits ^ 0x7FFF, bits)
    return (order << 16) | (0xFFFF - col)


@triton.jit
def _half_value(key, IS_BF16: tl.constexpr):
    """The float32 logit and the column that `_half_key` packed into key (int32)."""
    order = key >> 16  # arithmetic: the signed order
    bits = tl.where(order < 0, order ^ 0x7FFF, order).to(tl.int16)
    if IS_BF16:
        x = bits.to(tl.bfloat16, bitcast=True).to(tl.float32)
    else:
        x = bits.to(tl.float16, bitcast=True).to(tl.float32)
    return x, 0xFFFF - (key & 0xFFFF)


@triton.jit
def _store_run(out, key, K: tl.constexpr, ASCENDING):
    """The K largest of the 1-D block `key` at out[0:K] (K a power of two > 1): descending, or ascending where
    ASCENDING (an odd chunk of the row merge, so that the row's chunks alternate, `_row_top_of_runs`)."""
    top = tl.topk(key, K)  # [K] descending
    offs = tl.arange(0, K)
    tl.store(out + tl.where(ASCENDING, K - 1 - offs, offs), top)


@triton.jit
def _row_top_of_runs(x, ROWS: tl.constexpr, RUNS: tl.constexpr, K: tl.constexpr):
    """Each row's K largest keys [ROWS, K], in no set order, from x [ROWS, RUNS * K] whose rows hold RUNS (1, 2 or 4)
    sorted runs of K, even runs descending and odd runs ascending, as the chunk programs stored them.

    The elementwise maximum of a descending and an ascending run of K holds the K largest of both, as a bitonic
    sequence (the bitonic top-k step); one bitonic merge (log2 K rounds) sorts it where a next step needs sorted
    runs. The final selection over every row's keys sorts them itself, so the rows' keys stay unsorted, and none of
    the rounds tl.topk would spend sorting the runs again (1 + 2 + ... + log2 K) is run."""
    if RUNS == 1:
        top = x  # the row's one run: its K best
    elif RUNS == 2:
        r0, r1 = tl.split(tl.permute(tl.reshape(x, [ROWS, 2, K]), [0, 2, 1]))  # [ROWS, K] runs 0 and 1
        top = tl.maximum(r0, r1)
    else:
        # runs (0, 1) and (2, 3) paired: their two bitonic maxima, merged in opposite orders, are again a pair
        m0, m1 = tl.split(tl.permute(tl.reshape(x, [ROWS, 2, 2, K]), [0, 1, 3, 2]))  # [ROWS, 2, K] runs 0, 2; 1, 3
        p0, p1 = tl.split(tl.permute(tl.maximum(m0, m1), [0, 2, 1]))  # [ROWS, K] best of runs 0-1, of runs 2-3
        top = tl.maximum(tl.bitonic_merge(p0, descending=True), tl.bitonic_merge(p1, descending=False))
    return top


@triton.jit
def _logit_of_key(ck, HALF: tl.constexpr, IS_BF16: tl.constexpr):
    """The float32 logit and the column of a chunk's key: `_half_key`'s int32, or the float32 bits' order over the
    reversed column (int64)."""
    if HALF:
        val, col = _half_value(ck, IS_BF16)
    else:
        o = (ck >> 32).to(tl.int32)
        val = tl.where(o < 0, o ^ 0x7FFFFFFF, o).to(tl.float32, bitcast=True)
        col = 0x7FFFFFFF - (ck & 0xFFFFFFFF)
    return val, col


@triton.jit
def _beam_select_logits_kernel(
    LOGITS,  # [n, V] logits, one row per parent (16-bit or fp32), columns contiguous
    SCORES,  # [n] fp32 each parent's cumulative score
    CAND,  # [n * n_chunks * K] scratch of logit keys (int32 for 16-bit logits, int64 for fp32): as _beam_select_kernel
    PART,  # fp32 [2, n * n_chunks] scratch: each chunk's maximum logit, then its sum of exp(logit - maximum)
    OUT,  # [W] int64 output: the level's keys, best first
    TICKET,  # int32 [1] the last program's ticket (0 before and after a launch)
    V,  # vocabulary size (the row length)
    stride_l,  # elements between two rows of LOGITS
    n_chunks,  # programs per row, grid axis 1
    K: tl.constexpr,  # logits kept per chunk, min(W, V)
    W: tl.constexpr,  # keys selected for the level
    BLOCK_V: tl.constexpr,  # a chunk's tokens, a power of two >= K
    CAND_PAD: tl.constexpr,  # flat merge: a power of two >= n * n_chunks * K, the last program's candidate block
    CHUNKS_POW2: tl.constexpr,  # a power of two >= n_chunks
    ROWS_POW2: tl.constexpr,  # ROW_MERGE: a power of two >= n
    RC_POW2: tl.constexpr,  # ROW_MERGE: a power of two >= n_chunks * K, a row's candidates
    HALF: tl.constexpr,  # 16-bit logits: int32 keys (`_half_key`); else int64 keys of the float32 bits
    IS_BF16: tl.constexpr,  # HALF: bf16 (else fp16)
    ROW_MERGE: tl.constexpr,  # the last program keeps each row's K best before the W best of all (BITONIC only)
    BITONIC: tl.constexpr,  # select with the bitonic network (row_topk's TOPK_ALGO)
    K_POW2: tl.constexpr,  # power of two >= K (bitonic)
    W_POW2: tl.constexpr,  # power of two >= W (bitonic)
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
    ALT_RUNS: tl.constexpr = False,  # ROW_MERGE, K = K_POW2, RC_POW2 / K in (1, 2, 4): odd chunks store ascending
    TOKENS=None,  # with INTO: as _beam_select_kernel
    PARENTS=None,
    TREE_SCORES=None,
    ANC=None,
    lo=0,
    plo=0,
    N=1,
    INTO: tl.constexpr = False,
    W_TILE: tl.constexpr = 1,
    N_TILE: tl.constexpr = 1,
    PHASES: tl.constexpr = 3,  # a timing probe stops early: 1 after the chunk's maximum and sum, 2 after its top-k
):
    if USE_PDL:  # before any other memory access, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    n_rows = tl.num_programs(0)
    prog = row * n_chunks + chunk
    # 1. this chunk only: its maximum and sum of exp (the row's log-sum-exp waits for the last program), and its
    #    K largest logits as keys. Within a row the parent's score and the log-sum-exp are one constant, so the
    #    row's best logits are its best scores.
    offs = chunk * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V] token ids
    ok = offs < V
    raw = tl.load(LOGITS + row.to(tl.int64) * stride_l + offs, mask=ok, other=float("-inf"))
    x = raw.to(tl.float32)
    c_max = _max(x, 0)
    c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)  # no finite logit in the chunk: its sum is 0
    tl.store(PART + prog, c_max)
    tl.store(PART + n_rows * n_chunks + prog, _sum(tl.exp(x - c_safe), 0))
    if PHASES >= 2:  # (the probe's PHASES 1 stops after the chunk's maximum and sum)
        if HALF:
            key = tl.where(ok, _half_key(raw, offs), _MIN_KEY32)
        else:
            bits = x.to(tl.int32, bitcast=True)
            order = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
            key = tl.where(ok, (order << 32) | (0x7FFFFFFF - offs).to(tl.int64), _MIN_KEY)
        if ALT_RUNS:  # the row's chunks alternate: descending, ascending, ... (`_row_top_of_runs`)
            _store_run(CAND + prog.to(tl.int64) * K, key, K, chunk % 2 == 1)
        else:
            _store_topk(CAND + prog.to(tl.int64) * K, key, _MIN_KEY32 if HALF else _MIN_KEY, K, BITONIC, K_POW2)
    # 2. the last program to arrive folds each row's chunk sums into its log-sum-exp, scores every kept logit as
    #    _beam_select_kernel does (parent + (logit - maximum) - log(sum), float32) and selects the W largest keys
    if PHASES >= 3:
        _logits_last_program(SCORES, CAND, PART, OUT, TICKET, V, n_chunks, n_rows, K, W, CAND_PAD, CHUNKS_POW2,
                             ROWS_POW2, RC_POW2, HALF, IS_BF16, ROW_MERGE, BITONIC, K_POW2, W_POW2, TOKENS, PARENTS,
                             TREE_SCORES, ANC, lo, plo, N, INTO, W_TILE, N_TILE, ALT_RUNS)  # fmt: skip


@triton.jit
def _logits_last_program(SCORES, CAND, PART, OUT, TICKET, V, n_chunks, n_rows, K: tl.constexpr, W: tl.constexpr,
                         CAND_PAD: tl.constexpr, CHUNKS_POW2: tl.constexpr, ROWS_POW2: tl.constexpr,
                         RC_POW2: tl.constexpr, HALF: tl.constexpr, IS_BF16: tl.constexpr, ROW_MERGE: tl.constexpr,
                         BITONIC: tl.constexpr, K_POW2: tl.constexpr, W_POW2: tl.constexpr, TOKENS, PARENTS,
                         TREE_SCORES, ANC, lo, plo, N, INTO: tl.constexpr, W_TILE: tl.constexpr,
                         N_TILE: tl.constexpr, ALT_RUNS: tl.constexpr):  # fmt: skip
    """`_beam_select_logits_kernel`'s step 2: the arrival ticket, and in the last program to arrive the fold, the
    scores and the selection (and with INTO the level written)."""
    tl.debug_barrier()  # every store of this program is issued before its ticket moves
    arrived = tl.atomic_add(TICKET, 1, sem="acq_rel", scope="gpu")
    if arrived == n_rows * n_chunks - 1:
        offs_j = tl.arange(0, CHUNKS_POW2)
        if ROW_MERGE:
            # the candidates, the rows' chunk partials and their parents' scores in one round trip: the fold needs
            # only the row, so it runs before the row's selection, and the kept keys are scored in place
            rows = tl.arange(0, ROWS_POW2)  # [R]
            r_ok = rows < n_rows
            rc = tl.arange(0, RC_POW2)  # [RC] a row's candidates, chunk by chunk
            both = r_ok[:, None] & (rc < n_chunks * K)[None, :]
            ck = tl.load(CAND + rows[:, None] * (n_chunks * K) + rc[None, :], mask=both, cache_modifier=".cg")
            pj = rows[:, None] * n_chunks + offs_j[None, :]  # [R, CHUNKS_POW2] the row's chunk partials
            p_ok = r_ok[:, None] & (offs_j < n_chunks)[None, :]
            pm = tl.load(PART + pj, mask=p_ok, other=float("-inf"), cache_modifier=".cg")
            ps = tl.load(PART + n_rows * n_chunks + pj, mask=p_ok, other=0.0, cache_modifier=".cg")
            parent = tl.load(SCORES + rows, mask=r_ok, other=0.0)  # [R]
            row_max = _max(pm, 1)  # [R]
            safe = tl.where(row_max == float("-inf"), 0.0, row_max)
            log_sum = tl.log(tl.where(r_ok, _sum(ps * tl.exp(pm - safe[:, None]), 1), 1.0))  # (padding: no log 0)
            ck = tl.where(both, ck, _MIN_KEY32 if HALF else _MIN_KEY)  # [R, RC]
            if ALT_RUNS:  # [R, K_POW2] each row's best logits (in no set order: the selection below sorts)
                ck = _row_top_of_runs(ck, ROWS_POW2, RC_POW2 // K_POW2, K_POW2)
            else:
                ck = tl.topk(ck, K_POW2)
            slot_ok = r_ok[:, None] & (ck != (_MIN_KEY32 if HALF else _MIN_KEY))
            val, col = _logit_of_key(ck, HALF, IS_BF16)
            score = parent[:, None] + ((val - row_max[:, None]) - log_sum[:, None])
            rev = (n_rows * V - 1 - (rows[:, None] * V + col)).to(tl.int64)
            final = tl.where(slot_ok, (_order_bits(score).to(tl.int64) << 32) + rev, _MIN_KEY)
            final = tl.reshape(final, [ROWS_POW2 * K_POW2])
        else:
            slots = tl.arange(0, CAND_PAD)
            in_range = slots < n_rows * n_chunks * K
            ck = tl.load(CAND + slots, mask=in_range, cache_modifier=".cg")
            ck = tl.where(in_range, ck, _MIN_KEY32 if HALF else _MIN_KEY)  # [CAND_PAD]
            slot_row = (slots // K) // n_chunks
            slot_ok = in_range & (ck != (_MIN_KEY32 if HALF else _MIN_KEY))
            pj = slot_row[:, None] * n_chunks + offs_j[None, :]  # [C, CHUNKS_POW2] the slot's row's chunk partials
            p_ok = slot_ok[:, None] & (offs_j < n_chunks)[None, :]
            pm = tl.load(PART + pj, mask=p_ok, other=float("-inf"), cache_modifier=".cg")
            ps = tl.load(PART + n_rows * n_chunks + pj, mask=p_ok, other=0.0, cache_modifier=".cg")
            row_max = _max(pm, 1)  # [C]
            safe = tl.where(row_max == float("-inf"), 0.0, row_max)
            log_sum = tl.log(tl.where(slot_ok, _sum(ps * tl.exp(pm - safe[:, None]), 1), 1.0))  # (padding: no log 0)
            val, col = _logit_of_key(ck, HALF, IS_BF16)
            score = tl.load(SCORES + slot_row, mask=slot_ok, other=0.0) + ((val - row_max) - log_sum)
            rev = (n_rows * V - 1 - (slot_row * V + col)).to(tl.int64)
            final = tl.where(slot_ok, (_order_bits(score).to(tl.int64) << 32) + rev, _MIN_KEY)
        # with INTO, 3. the level itself, as _beam_select_kernel
        _select_level(OUT, final, TOKENS, PARENTS, TREE_SCORES, ANC, lo, plo, N, n_rows, V, W, BITONIC, W_POW2, INTO,
                      W_TILE, N_TILE)  # fmt: skip
        tl.atomic_xchg(TICKET, 0)


def beam_keys_reference(logits: torch.Tensor, parent_scores: torch.Tensor) -> torch.Tensor:
    """Every pair's key, [n, V] int64: parent_scores[i] + log_softmax(logits[i].float())[v] as `spec/draft.py:
    beam_level` builds them (score bits, then the reversed flat index)."""
    n, V = logits.shape
    flat = (parent_scores.float()[:, None] + torch.log_softmax(logits.float(), dim=-1)).flatten()  # [n * V]
    bits = flat.view(torch.int32).to(torch.int64)
    order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    rev = (n * V - 1) - torch.arange(n * V, device=logits.device)
    return ((order << 32) + rev).view(n, V)


def beam_select_reference(logits: torch.Tensor, parent_scores: torch.Tensor, width: int) -> torch.Tensor:
    """The definition: the `width` largest keys of `beam_keys_reference`. [n, V], [n] -> [width]."""
    return torch.topk(beam_keys_reference(logits, parent_scores).flatten(), width).values


def _num_warps(n: int | None = None) -> int:
    """NUM_WARPS (from LONGSPEC_BEAM_WARPS, or assigned at run time) checked: the warps of every program, whose last
    one holds up to MAX_CANDIDATES keys; "auto" gives a level of n <= AUTO_NARROW parents 4 and a wider one 8. 8 by
    default: on the H200 a default-tree level's selection (16 x 4,096, w 16, 1,024-token chunks) took 7.9 us with 8
    warps against 9.1 with 4 (data/results/beam_select_warps_h200.json; 4 was the fastest of 1, 2, 4 in
    beam_select_h200.json), and the default tree's level 44.9 us against 46.1 in the decoder, with the same tokens
    (e2e_ab2_beam_warps_8_h200.json against the record of the same session). Alone on an H100 with the logit keys'
    row merge, the narrow levels took 0.4-0.5 us less with 4 (data/results/beam_select_chunk_blocks_h100.json);
    "auto" in the decoder moved the trees within one call's spread and chain gamma 5 by +0.8%, so it is not the
    default (data/results/e2e_ab_beam_last_warps_auto_h100.json)."""
    if isinstance(NUM_WARPS, str) and NUM_WARPS.strip() == "auto":
        return 4 if n is not None and n <= AUTO_NARROW else 8
    warps = int(NUM_WARPS) if isinstance(NUM_WARPS, str) and NUM_WARPS.strip().isdigit() else NUM_WARPS
    if isinstance(warps, bool) or warps not in (1, 2, 4, 8):
        raise ValueError(
            f"LONGSPEC_BEAM_WARPS={NUM_WARPS!r} is not 1, 2, 4, 8 or auto; unset it (default 8) or pick one of those"
        )
    return warps


def lse_block(V: int, num_warps: int) -> int:
    """The kernel's BLOCK_L for a row of V tokens: BLOCK_L tokens a warp, at most the row (a power of two)."""
    return min(BLOCK_L * num_warps, triton.next_power_of_2(V))


def plan(n: int, V: int, width: int, block_v: int | None = None) -> dict:
    """The launch's shape for n parents x V tokens and a level of `width`: chunk width, chunks per row, keys kept
    per chunk, the candidate block. `fits` says whether the kernel takes it (V <= MAX_VOCAB, candidates <=
    MAX_CANDIDATES); the decoder's switch falls back to the definition when it does not."""
    kept = min(width, V)
    block = _block_v(V, kept, _flat_first_block() if block_v is None else block_v)
    n_chunks = triton.cdiv(V, block)
    cand = n * n_chunks * kept
    return dict(
        block_v=block, n_chunks=n_chunks, kept=kept, candidates=cand, cand_pad=triton.next_power_of_2(cand),
        fits=V <= MAX_VOCAB and cand <= MAX_CANDIDATES,
    )  # fmt: skip


def _chunk_form(n: int, V: int, width: int, block_v: int | None = None, p: dict | None = None) -> str:
    """The form CHUNK_KEYS (LONGSPEC_BEAM_CHUNK_KEYS) gives this level: the switch's, checked, or the one it falls
    back to where its tiles would not fit ("logits_rows" -> "logits" without the bitonic network or for a width
    of 1; "logits" -> "scores" past MAX_PARTIAL_TILE). p: the level's `plan`, where the caller has it."""
    if CHUNK_KEYS not in CHUNK_FORMS:
        raise ValueError(
            f"LONGSPEC_BEAM_CHUNK_KEYS={CHUNK_KEYS!r} is not one of {', '.join(CHUNK_FORMS)}; unset it (logits_rows) "
            "or pick one"
        )
    if CHUNK_KEYS == "scores":
        return "scores"
    p, pow2 = p or plan(n, V, width, block_v), triton.next_power_of_2
    if CHUNK_KEYS == "logits_rows" and _algo() == "bitonic" and pow2(p["kept"]) > 1:
        if pow2(n) * pow2(p["n_chunks"] * p["kept"]) <= MAX_CANDIDATES:
            return "logits_rows"
    return "logits" if p["cand_pad"] * pow2(p["n_chunks"]) <= MAX_PARTIAL_TILE else "scores"


def _launch(logits, parent_scores, width: int, block_v: int, num_warps: int, phases=3, cand=None, **into):
    """One launch of the selection kernel (checked inputs), with `into` the INTO form's arguments: [width] keys.
    `phases` < 3 and `cand`: the timing probe (`phase_probe`)."""
    n, V = logits.shape
    p = plan(n, V, width, block_v)
    form = "scores" if cand is not None else _chunk_form(n, V, width, block_v, p)  # the probe times the first form
    if form != "scores":
        return _launch_logits(logits, parent_scores, width, p, num_warps, form == "logits_rows", **into)
    if cand is None:
        cand = torch.empty(p["candidates"], dtype=torch.int64, device=logits.device)
    out = torch.empty(width, dtype=torch.int64, device=logits.device)
    bitonic = _algo() == "bitonic"
    pow2 = triton.next_power_of_2
    _beam_select_kernel[(n, p["n_chunks"])](
        logits, parent_scores, cand, out, tickets(logits.device), V, logits.stride(0), p["n_chunks"],
        K=p["kept"], W=width, BLOCK_V=p["block_v"], BLOCK_L=lse_block(V, num_warps),
        CAND_PAD=p["cand_pad"], BITONIC=bitonic, K_POW2=pow2(p["kept"]) if bitonic else 1,
        W_POW2=pow2(width) if bitonic else 1, num_warps=num_warps, **launch_args(logits.device), PHASES=phases,
        **into,
    )  # fmt: skip
    return out


def alternating_runs(p: dict, row_merge: bool = True, bitonic: bool = True) -> bool:
    """Whether the row merge's chunks store alternating runs (`_row_top_of_runs`) for a level's `plan` p: only with the
    row merge and the bitonic network, where each chunk keeps a power of two above 1 and a row holds 1, 2 or 4 runs
    (the default tree's 16-parent level: 4 chunks of 16). Elsewhere the last program runs tl.topk over each row."""
    k, rc = p["kept"], triton.next_power_of_2(p["n_chunks"] * p["kept"])
    return bool(row_merge and bitonic) and k > 1 and k & (k - 1) == 0 and rc // k in (1, 2, 4)


def _launch_logits(logits, parent_scores, width: int, p: dict, num_warps: int, row_merge: bool, phases=3, cand=None,
                   part=None, **into):  # fmt: skip
    """One launch of `_beam_select_logits_kernel` (CHUNK_KEYS "logits" or "logits_rows"): [width] keys. `phases` < 3
    with `cand` and `part`: the timing probe (`logits_phase_probe`)."""
    n, V = logits.shape
    half = logits.dtype in (torch.float16, torch.bfloat16)
    if cand is None:
        cand = torch.empty(p["candidates"], dtype=torch.int32 if half else torch.int64, device=logits.device)
        part = torch.empty(2 * n * p["n_chunks"], dtype=torch.float32, device=logits.device)
    out = torch.empty(width, dtype=torch.int64, device=logits.device)
    bitonic = _algo() == "bitonic"
    pow2 = triton.next_power_of_2
    _beam_select_logits_kernel[(n, p["n_chunks"])](
        logits, parent_scores, cand, part, out, tickets(logits.device), V, logits.stride(0), p["n_chunks"],
        K=p["kept"], W=width, BLOCK_V=p["block_v"], CAND_PAD=p["cand_pad"], CHUNKS_POW2=pow2(p["n_chunks"]),
        ROWS_POW2=pow2(n), RC_POW2=pow2(p["n_chunks"] * p["kept"]), HALF=half, IS_BF16=logits.dtype == torch.bfloat16,
        ROW_MERGE=row_merge, BITONIC=bitonic, K_POW2=pow2(p["kept"]) if bitonic else 1,
        W_POW2=pow2(width) if bitonic else 1, num_warps=num_warps, **launch_args(logits.device), PHASES=phases,
        ALT_RUNS=alternating_runs(p, row_merge, bitonic), **into,
    )  # fmt: skip
    return out


PHASES = {1: "the log-sum-exp walk", 2: "the walk, the chunk's keys and its top-k", 3: "the whole selection"}


def phase_probe(logits, parent_scores, width: int, phases: int, block_v=None, num_warps=None) -> torch.Tensor:
    """A timing probe, not for decoding: one launch of the kernel that stops after `phases` (PHASES: 1, 2 or 3),
    so that `main --phases` can time each part of the selection by difference. It runs the first form (score keys,
    LONGSPEC_BEAM_CHUNK_KEYS=scores), whatever the switch says. Returns the launch's scratch
    [n * n_chunks * K] int64: with 1, each chunk's first slot holds its row's log-sum-exp (float32 bits); with 2 or
    3, each chunk's K largest keys, descending. Checked as `beam_select`."""
    if phases not in PHASES:
        raise ValueError(f"phases must be one of {sorted(PHASES)} ({'; '.join(PHASES.values())}), got {phases!r}")
    logits, parent_scores, p, num_warps = _checked(logits, parent_scores, width, block_v, num_warps)
    cand = torch.full((p["candidates"],), _MIN_KEY_INT, dtype=torch.int64, device=logits.device)
    _launch(logits, parent_scores, width, p["block_v"], num_warps, phases=phases, cand=cand)
    return cand


LOGITS_PHASES = {
    1: "the chunk's maximum and sum",
    2: "those and the chunk's top-k of logit keys",
    3: "the whole selection",
}


def logits_phase_probe(logits, parent_scores, width: int, phases: int, block_v=None, num_warps=None,
                       row_merge: bool = True) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`phase_probe` for the logit-key form (LONGSPEC_BEAM_CHUNK_KEYS "logits_rows", or "logits" with row_merge
    False): one launch that stops after `phases` (LOGITS_PHASES). Returns its scratch (cand, part): cand [n * n_chunks
    * K] the chunks' K largest logit keys, descending (ascending in a row merge's odd chunks where `alternating_runs`;
    int32 for 16-bit logits, int64 for fp32; phases >= 2), and part
    [2, n * n_chunks] fp32 each chunk's maximum logit and sum of exp(logit - maximum). Checked as `beam_select`."""
    if phases not in LOGITS_PHASES:
        raise ValueError(f"phases must be one of {sorted(LOGITS_PHASES)} ({'; '.join(LOGITS_PHASES.values())}), "
                         f"got {phases!r}")  # fmt: skip
    logits, parent_scores, p, num_warps = _checked(logits, parent_scores, width, block_v, num_warps)
    half = logits.dtype in (torch.float16, torch.bfloat16)
    n, device = logits.shape[0], logits.device
    key_min, key_dtype = (-(2**31), torch.int32) if half else (_MIN_KEY_INT, torch.int64)
    cand = torch.full((p["candidates"],), key_min, dtype=key_dtype, device=device)
    part = torch.full((2, n * p["n_chunks"]), float("nan"), dtype=torch.float32, device=device)
    if row_merge and not (_algo() == "bitonic" and triton.next_power_of_2(p["kept"]) > 1):
        row_merge = False  # as _chunk_form: the row merge needs the bitonic network and more than one key a chunk
    _launch_logits(logits, parent_scores, width, p, num_warps, row_merge, phases=phases, cand=cand, part=part)
    return cand, part


@torch.library.custom_op("longspec::beam_select", mutates_args=())
def _beam_select_op(
    logits: torch.Tensor, parent_scores: torch.Tensor, width: int, block_v: int, num_warps: int
) -> torch.Tensor:
    """`torch.ops.longspec.beam_select`: logits [n, V], parent_scores [n] fp32 (checked by `beam_select`) ->
    [width] int64 keys, descending."""
    return _launch(logits, parent_scores, width, block_v, num_warps)


@_beam_select_op.register_fake
def _(logits, parent_scores, width, block_v, num_warps):
    return logits.new_empty(width, dtype=torch.int64)


MAX_WRITE_TILE = 16384  # the level's rows of the mask the last program writes at once: W_TILE x N_TILE


def write_fits(width: int, N: int) -> bool:
    """Whether the last program can also write a level of `width` nodes into a tree of N nodes."""
    pow2 = triton.next_power_of_2
    return pow2(width) * pow2(N) <= MAX_WRITE_TILE


@torch.library.custom_op("longspec::beam_select_into", mutates_args=("tokens", "parents", "scores", "anc"))
def _beam_select_into_op(
    logits: torch.Tensor, parent_scores: torch.Tensor, width: int, block_v: int, num_warps: int, tokens: torch.Tensor,
    parents: torch.Tensor, scores: torch.Tensor, anc: torch.Tensor, lo: int, plo: int,
) -> None:  # fmt: skip
    """`torch.ops.longspec.beam_select_into`: the selection of `beam_select`, then the level written into the tree
    buffers tokens, parents [N] int64, scores [N] fp32 and anc [N, N] bool at nodes lo .. lo + width - 1, whose
    parents are nodes plo .. plo + n - 1 (checked by `beam_select_into`)."""
    N, pow2 = tokens.shape[0], triton.next_power_of_2
    into = dict(TOKENS=tokens, PARENTS=parents, TREE_SCORES=scores, ANC=anc.view(torch.uint8), lo=lo, plo=plo, N=N)
    _launch(logits, parent_scores, width, block_v, num_warps, **into, INTO=True, W_TILE=pow2(width), N_TILE=pow2(N))


@_beam_select_into_op.register_fake
def _(logits, parent_scores, width, block_v, num_warps, tokens, parents, scores, anc, lo, plo):
    return None


def check_level(name: str, source: str, parent_scores, n: int, V: int, width) -> None:
    """The checks a beam level's kernel makes of its scores and width (`beam_select`, kernels/head_select.py): a
    ValueError naming `name`, the problem and the fix."""
    if not isinstance(parent_scores, torch.Tensor) or parent_scores.shape != (n,):
        got = tuple(parent_scores.shape) if isinstance(parent_scores, torch.Tensor) else type(parent_scores).__name__
        raise ValueError(f"{name} needs parent_scores [n] = [{n}] to match {source}, got {got}")
    if parent_scores.dtype != torch.float32:
        raise ValueError(f"{name} needs float32 parent_scores, got {parent_scores.dtype}; pass .float()")
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= n * V:
        raise ValueError(f"{name} needs an integer width in [1, n * V] = [1, {n * V}], got {width!r}")


def beam_select(logits, parent_scores, width: int, block_v: int | None = None, num_warps: int | None = None):
    """The `width` largest beam keys of one level, descending: [width] int64, as `beam_select_reference` (module
    docstring: equal up to the last bits of the log-sum-exp). logits [n, V] fp16/bf16/fp32 and parent_scores [n]
    float32 on CUDA (or on the CPU under TRITON_INTERPRET=1). block_v: the chunk width, a power of two (default:
    flat_topk's first-pass width, LONGSPEC_TOPK_FIRST_BLOCK); num_warps: every program's (default 8, or the
    switch LONGSPEC_BEAM_WARPS)."""
    logits, parent_scores, p, num_warps = _checked(logits, parent_scores, width, block_v, num_warps)
    return _beam_select_op(logits, parent_scores, width, p["block_v"], num_warps)


def _checked(logits, parent_scores, width, block_v, num_warps):
    """`beam_select`'s arguments checked (a ValueError naming the problem and the fix), as the kernel reads them:
    (logits with unit column stride, contiguous parent_scores, the launch's `plan`, the warps)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype not in _DTYPES:
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"beam_select needs logits [n, V] in float16, bfloat16 or float32, got {got}")
    n, V = logits.shape
    check_level("beam_select", "the logits", parent_scores, n, V, width)
    if block_v is not None and (isinstance(block_v, bool) or not isinstance(block_v, int) or block_v & (block_v - 1)
                                or block_v < 1):  # fmt: skip
        raise ValueError(f"block_v must be a power of two >= 1, got {block_v!r}; e.g. 512")
    num_warps = _num_warps(logits.shape[0]) if num_warps is None else num_warps
    if num_warps not in (1, 2, 4, 8):
        raise ValueError(f"num_warps must be 1, 2, 4 or 8, got {num_warps!r}")
    if not (logits.is_cuda or _INTERPRET):
        raise ValueError(
            f"beam_select runs a Triton kernel and got a tensor on {logits.device}; pass CUDA tensors, or set "
            "TRITON_INTERPRET=1 before importing longspec_lab.kernels.beam_select (on the CPU, "
            "beam_select_reference gives the same keys)"
        )
    if logits.device != parent_scores.device:
        raise ValueError(f"logits on {logits.device} and parent_scores on {parent_scores.device}: use one device")
    p = plan(n, V, width, block_v)
    if not p["fits"]:
        raise ValueError(
            f"beam_select takes V <= {MAX_VOCAB} and at most {MAX_CANDIDATES} candidates, got V = {V} and "
            f"{p['candidates']} ({n} rows x {p['n_chunks']} chunks x {p['kept']}); use beam_select_reference "
            "(ops.topk.beam_keys falls back to it by itself)"
        )
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return logits, parent_scores.contiguous(), p, num_warps  # the kernel reads SCORES[row] at unit stride


def beam_select_into(logits, parent_scores, width: int, tree: dict, lo: int, plo: int, block_v: int | None = None,
                     num_warps: int | None = None) -> None:  # fmt: skip
    """A beam level's selection (`beam_select`) and the level itself in one launch: the `width` best (parent, token)
    pairs written into the tree buffers of `tree` (keys `tokens`, `parents` [N] int64, `scores` [N] float32, `anc`
    [N, N] bool) at nodes lo .. lo + width - 1, as spec/draft.py's TreeBuffers.add_level writes them (node = lo + its
    rank in the level, parent = plo + the pair's parent row, score, mask row = the parent's row plus the node)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("beam_select_into needs logits [n, V]; see beam_select")
    n, V = logits.shape
    if not isinstance(tree, dict) or sorted(tree) != ["anc", "parents", "scores", "tokens"]:
        raise ValueError("beam_select_into needs tree = {'tokens', 'parents', 'scores', 'anc'} (the tree's buffers)")
    N = tree["tokens"].shape[0] if isinstance(tree["tokens"], torch.Tensor) else 0
    want = {"tokens": ((N,), torch.long), "parents": ((N,), torch.long), "scores": ((N,), torch.float32),
            "anc": ((N, N), torch.bool)}  # fmt: skip
    for name, (shape, dtype) in want.items():
        t = tree[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"beam_select_into needs a contiguous {name} {list(shape)} {dtype}, got {got}")
        if t.device != logits.device:
            raise ValueError(f"{name} on {t.device} and logits on {logits.device}: use one device")
    if not (0 <= plo and plo + n <= lo and lo + width <= N):
        raise ValueError(
            f"beam_select_into needs the parents' nodes [{plo}, {plo + n}) before the level's [{lo}, {lo + width}), "
            f"inside the tree's {N} nodes"
        )
    if not write_fits(width, N):
        raise ValueError(
            f"beam_select_into writes at most {MAX_WRITE_TILE} mask entries at once (width x nodes, "
            f"each a power of two), got {width} x {N}; use beam_select and TreeBuffers.add_level"
        )
    logits, parent_scores, p, num_warps = _checked(logits, parent_scores, width, block_v, num_warps)
    _beam_select_into_op(logits, parent_scores, width, p["block_v"], num_warps, tree["tokens"], tree["parents"],
                         tree["scores"], tree["anc"], lo, plo)  # fmt: skip


def add_level_args(ap, block_v: str, warps: str) -> None:
    """The level shapes a benchmark of a beam level times (this module's `main`, kernels/head_select.py's):
    --rows, --width, --vocab, --block-v, --warps, --out."""
    ap.add_argument("--rows", default="1,4,16", help="comma-separated parents per level (default %(default)s)")
    ap.add_argument("--width", default="4,16,16", help="comma-separated level widths, one per --rows entry")
    ap.add_argument("--vocab", type=int, default=4096, help="tokens V (default: the embedded draft's 4096)")
    ap.add_argument("--block-v", default=block_v, help="comma-separated chunk widths to time (powers of two)")
    ap.add_argument("--warps", default=warps, help="comma-separated warps per program to time (1, 2, 4, 8)")
    ap.add_argument("--out", help="also write the medians, with the environment, to this JSON file (must not exist)")


def parse_level_args(ap, a, test_file: str) -> tuple[list, list, list, list]:
    """`add_level_args`' values checked, as (rows, widths, chunk widths, warps); exits with status 2 naming the
    problem, when --out exists, and without a CUDA GPU (naming the test file that runs the kernel on the CPU)."""
    try:
        rows = [int(r) for r in a.rows.split(",")]
        widths = [int(w) for w in a.width.split(",")]
        blocks = [int(b) for b in a.block_v.split(",")]
        warps = [int(x) for x in a.warps.split(",")]
    except ValueError:
        ap.error("--rows, --width, --block-v and --warps take comma-separated integers")
    if any(x not in (1, 2, 4, 8) for x in warps):
        ap.error("--warps takes 1, 2, 4 and/or 8")
    if len(rows) != len(widths) or any(r < 1 or not 1 <= w <= r * a.vocab for r, w in zip(rows, widths)):
        ap.error("--rows and --width need one width per row count, each in [1, rows * vocab]")
    if any(b < 1 or b & (b - 1) for b in blocks):
        ap.error("--block-v takes powers of two")
    if a.out and os.path.exists(a.out):
        ap.exit(2, f"error: {a.out} exists; pick another --out or remove it first\n")
    if not torch.cuda.is_available():
        ap.exit(
            2,
            "error: the benchmark needs a CUDA GPU; on the CPU the tests run the kernel in Triton's interpreter "
            f"(.venv/bin/pytest {test_file})\n",
        )
    return rows, widths, blocks, warps


def time_level_forms(forms: dict, exact: torch.Tensor, want: torch.Tensor, atol: float) -> dict:
    """Median microseconds, replayed from CUDA graphs, of each form (name -> fn() -> [w] keys) of a level's selection
    that picks the pairs float64 picks: exact [n V] float64 scores, want [w] their w largest (pairs tied within
    `atol` may come in either order). A form that picks others is reported and left out."""
    from triton.testing import do_bench_cudagraph

    us = {}
    for name, fn in forms.items():
        got = fn()
        picked = exact[(exact.numel() - 1) - (got & 0xFFFFFFFF)]  # the float64 scores of the pairs it chose
        if not torch.allclose(picked.sort(descending=True).values, want, rtol=0, atol=atol):
            print(f"{name}: selects other pairs than float64 -- not timed")
            continue
        us[name] = do_bench_cudagraph(fn, return_mode="median") * 1e3
    return us


def add_case(report: dict, case: dict, base: str, label: str, launch_us: float, header: str) -> None:
    """Append a timed level (`case["us"]`) to report["cases"] with its ratios to the form `base` (as
    `vs_<label>`) and to one launch's floor, and print it on one line."""
    ref = case["us"].get(base)
    case[f"vs_{label}"] = {k: v / ref for k, v in case["us"].items()} if ref else {}
    case["vs_launch_floor"] = {k: v / launch_us for k, v in case["us"].items()}
    report["cases"].append(case)
    print(f"{header} (one launch: {launch_us:.2f} us): " + ", ".join(
        f"{k} {v:.1f} us ({case[f'vs_{label}'].get(k, float('nan')):.2f}x the {label.replace('_', ' ')})"
        for k, v in case["us"].items()))  # fmt: skip


def main(argv=None) -> int:
    """Time the one-launch selection against the compiled definition on a beam level's shapes (CUDA)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.kernels.beam_select",
        description=(
            "Time a beam level's whole selection as one launch (log-softmax, parent scores, every chunk's top-k, "
            "the last program's top-w) against the same definition as the decoder runs it with the switch off: "
            "the log-softmax and the keys compiled by torch.compile (one Inductor kernel) and flat_topk's two "
            "passes. Random bf16 logits of the draft's vocabulary; each form is first checked to select the "
            "same pairs as float64. Prints medians (us) replayed from CUDA graphs, as ratios to the definition "
            "and to the floor of one launch (the smallest kernel's boundary, kernels/launch.py)."
        ),
    )
    add_level_args(ap, block_v="1024", warps="8")  # the decoder's chunk width and warps
    ap.add_argument("--algo", default="bitonic", help="comma-separated selections: max and/or bitonic (default "
                    "%(default)s, the decoder's on a GPU)")  # fmt: skip
    ap.add_argument(
        "--chunk-keys", default="scores,logits_rows",
        help="comma-separated forms of the chunk programs (LONGSPEC_BEAM_CHUNK_KEYS): scores, logits, logits_rows "
        "(default %(default)s: the form before and the decoder's); a form other than scores is named in the results "
        "by its suffix, and a form that falls back to another on a shape (logits_rows needs the bitonic network and "
        "a width above 1) is left out there",
    )  # fmt: skip
    ap.add_argument(
        "--phases", action="store_true",
        help="also time each kernel form stopped after its log-sum-exp walk (_phase1; the logit-key forms: after the "
        "chunk's maximum and sum) and after its chunk's top-k "
        "(_phase2): the parts of a selection by difference (probes: their outputs are partial, not checked)",
    )  # fmt: skip
    a = ap.parse_args(argv)
    algos = a.algo.split(",")
    if any(x not in ("max", "bitonic") for x in algos):
        ap.error("--algo takes the choices max and bitonic")
    chunk_forms = a.chunk_keys.split(",")
    if any(f not in CHUNK_FORMS for f in chunk_forms):
        ap.error(f"--chunk-keys takes the choices {', '.join(CHUNK_FORMS)}")
    rows, widths, blocks, warps = parse_level_args(ap, a, "tests/unit/kernels/test_beam_select.py")
    if "bitonic" in algos and not hasattr(tl, "topk"):
        print(f"skipping bitonic: Triton {triton.__version__} has no tl.topk")
        algos = [x for x in algos if x != "bitonic"] or ["max"]
    from longspec_lab.kernels import row_topk
    from longspec_lab.kernels.launch import boundary_cost_us

    keys_compiled = torch.compile(beam_keys_reference, fullgraph=True, dynamic=False)  # beam_level's keys
    launch_us = boundary_cost_us()["unit_us"]  # the floor of any one launch here: the smallest kernel's boundary
    report = {"vocab": a.vocab, "dtype": "bfloat16", "launch_floor_us": launch_us, "cases": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, w in zip(rows, widths):
        logits = (torch.randn(n, a.vocab, device="cuda", generator=g) * 3).to(torch.bfloat16)
        scores = -torch.rand(n, device="cuda", generator=g).sort(descending=True).values * 4
        exact = (scores.double()[:, None] + torch.log_softmax(logits.double(), -1)).flatten()
        want = torch.topk(exact, w).values  # [w] float64: pairs tied in bf16 may come in either order
        forms = {"definition_compiled": lambda: row_topk.flat_topk(keys_compiled(logits, scores), w)}
        for b, al, nw, ck in [(b, al, nw, ck) for b in blocks for al in algos for nw in warps for ck in chunk_forms]:
            suffix = "" if ck == "scores" else "_" + ck
            runs_as = _with_algo(al, lambda: _chunk_form(n, a.vocab, w, b), ck)  # noqa: B023 (called at once)
            if runs_as != ck:
                print(f"kernel_{b}_{al}_{nw}w{suffix}: runs as {runs_as} on this level -- left out")
                continue
            forms[f"kernel_{b}_{al}_{nw}w{suffix}"] = lambda b=b, al=al, nw=nw, ck=ck: _with_algo(
                al, lambda: beam_select(logits, scores, w, b, nw), ck
            )
        case = {"rows": n, "width": w, "us": time_level_forms(forms, exact, want, 1e-5), "plan": plan(n, a.vocab, w)}
        if a.phases:
            from triton.testing import do_bench_cudagraph

            for b, al, nw, ck in [
                (b, al, nw, ck) for b in blocks for al in algos for nw in warps for ck in chunk_forms
            ]:
                name = f"kernel_{b}_{al}_{nw}w" + ("" if ck == "scores" else "_" + ck)
                if name not in forms:  # left out above (the form falls back on this level)
                    continue
                for ph in (1, 2):
                    if ck == "scores":
                        probe = lambda b=b, nw=nw, ph=ph: phase_probe(logits, scores, w, ph, b, nw)  # noqa: E731
                    else:
                        probe = lambda b=b, nw=nw, ph=ph, ck=ck: logits_phase_probe(  # noqa: E731
                            logits, scores, w, ph, b, nw, row_merge=ck == "logits_rows"
                        )
                    run = lambda al=al, probe=probe: _with_algo(al, probe)  # noqa: E731
                    run()
                    case["us"][f"{name}_phase{ph}"] = do_bench_cudagraph(run, return_mode="median") * 1e3
        add_case(report, case, "definition_compiled", "definition", launch_us, f"n={n} w={w} V={a.vocab}")
    if a.out:
        from longspec_lab.provenance import stamp, write_new_json

        write_new_json(a.out, stamp(report, torch.device("cuda"), torch.bfloat16))
    return 0


def _with_algo(algo: str, fn, chunk_keys: str | None = None):
    """fn() with row_topk's TOPK_ALGO set to algo (the switch both selections read), and CHUNK_KEYS to chunk_keys
    where given, restored after."""
    global CHUNK_KEYS
    from longspec_lab.kernels import row_topk

    old, row_topk.TOPK_ALGO = row_topk.TOPK_ALGO, algo
    old_keys, CHUNK_KEYS = CHUNK_KEYS, chunk_keys or CHUNK_KEYS
    try:
        return fn()
    finally:
        row_topk.TOPK_ALGO, CHUNK_KEYS = old, old_keys


if __name__ == "__main__":
    raise SystemExit(main())
