"""Compile every Triton kernel of the package for a Hopper GPU on a machine that has none.

The CPU tests run the kernels in Triton's interpreter, which executes them with numpy and never
type-checks them the way the GPU compiler does. A kernel can therefore pass every interpreter test
and still fail to compile on the GPU: on the H200 the tree kernel once met int64 context lengths
(a device tensor from the decoder) where its tensor descriptors take int32 shapes, and every
TMA configuration failed. This module compiles each kernel ahead of time, through `triton.compile`
with an explicit target (`GPUTarget("cuda", 90, 32)` by default), down to PTX and a cubin, for the
argument types and constexpr choices the library launches it with (the launch's own specialisations: aligned
pointers and strides, unit strides as the constant 1, defaults). No GPU is touched. Each variant's line gives its
shared memory, its loads issued ahead through shared memory (software pipelining) and its registers a thread and
spills (read by cuobjdump from the cubin).

    python -m longspec_lab.kernels.compile_check [--arch 90] [--quick] [--only "beam select"]
    python -m longspec_lab.kernels.compile_check --warp-specialize [--out F]

The second form is a probe of FlashAttention-3's overlap of the softmax with the tensor cores' next product in the
tree kernel's key loop: it compiles the Llama-3-8B verify variant with Triton's warp specialization asked for and
with the loop rotated (`OVERLAP`), and reads from the GPU IR what the compiler made of each.

It must run without TRITON_INTERPRET=1 (under the interpreter `@triton.jit` gives functions that
cannot be compiled); the test runs it in a subprocess.

Taught in: notebooks/04_hybrid_tree_attention_and_the_triton_kernel.ipynb
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

# Shared memory one block may use (bytes), the opt-in maximum per compute capability (CUDA's guide, "Technical
# Specifications"): 227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_86/89.
SHARED_LIMIT = {90: 232448, 80: 166912, 86: 101376, 89: 101376, 100: 232448}


# Integer arguments that are multiples of 16 at every launch of the library (feature counts and row strides of
# power-of-two models); a launch specialises them as such, and so does the compile here.
ALIGNED = {"K", "N", "KP", "stride_xm", "stride_wn", "stride_ym", "stride_am", "stride_wpn", "stride_rpm", "stride_xom"}
# The attention kernels' strides over batch, head and row of q, k, v and the output: multiples of the head dim
# (64 or 128) for every view the library passes (contiguous caches, q/k/v sliced from a fused projection).
ALIGNED |= {f"stride_{t}{d}" for t in "qkvo" for d in "bhtn"}
# Integer arguments that are 1 at every launch (the unit stride of a tensor's last dimension). A launch compiles an
# int equal to 1 as the constant 1 (Triton's specialize_impl), which decides whether a row's loads are contiguous,
# hence vectorised and software-pipelined through shared memory. Compiled as a plain i32 instead, the tree kernel's
# key loop ran unpipelined here (32 KiB of shared memory, where the launch's form takes 112 KiB).
UNIT = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_lt"}


def _signature(fn, pointers: dict, floats=(), consts: dict | None = None, ints=()) -> tuple[dict, dict]:
    """Triton signature for fn: pointers maps argument -> element type ("bf16", "i64", ...), `floats`
    names fp32 scalars, `consts` gives the constexprs (USE_PDL True unless given: every variant is compiled with the
    programmatic-dependent-launch gate a Hopper launch has; the UNIT strides 1; a constexpr with a default, its
    default); every other argument is an i32 scalar."""
    consts = dict(consts or {})
    if "USE_PDL" in fn.arg_names:
        consts.setdefault("USE_PDL", True)  # as launched on a Hopper GPU (kernels/launch.py)
    for name in UNIT & set(fn.arg_names):
        consts.setdefault(name, 1)  # as a launch specialises it
    # an argument the launches leave at its default (the constexpr WARP_SPECIALIZE) is compiled at its default
    for name, param in inspect.signature(getattr(fn, "fn", fn)).parameters.items():  # (interpreted or compiled)
        given = name in pointers or name in floats or name in ints  # a launch passes it (`ints`: i32 scalars)
        if name not in consts and param.default is not inspect.Parameter.empty and not given:
            consts[name] = param.default
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, {(fn.arg_names.index(k),): v for k, v in consts.items()}


def variants(quick: bool = False) -> list[tuple[str, object, dict, dict, dict]]:
    """(label, kernel, signature, constexprs, options) for each variant to compile."""
    import triton
    import triton.language as tl

    from longspec_lab.kernels import ordered_attention as oa
    from longspec_lab.kernels import row_topk as rt
    from longspec_lab.kernels import tree_attention as ta

    out = []
    split = ta._tree_attn_split_kernel
    # (prefix dtype, TMA loads, DIRECT, FUSED_MERGE, CAUSAL): the paths the decoder and the benchmark take
    cases = [
        ("i64", True, False, True, False),  # device lengths, TMA, merge in the last program (LONGSPEC_FUSED_MERGE=1)
        ("i32", True, False, False, False),  # the default: a merge launch
        ("i64", False, True, False, True),  # one split, causal block, plain loads
        ("i32", False, False, True, False),
    ]
    for pdt, tma, direct, fused, causal in cases[:2] if quick else cases:
        consts = dict(
            GROUP=4, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64, RAGGED=True, CAUSAL=causal, PREFIX_ONLY=False,
            TREE_SPLIT=False, IEEE=False,
            DIRECT=direct, FUSED_MERGE=fused, WRITE_LSE=True, USE_TMA=tma, STAGES=3,
            MERGE_S=16, MERGE_R=ta.merge_tile(16, 4, 128)[1],
        )  # fmt: skip
        ptrs = dict(Q="bf16", K="bf16", V="bf16", OUT="bf16", PREFIX=pdt, MASK="i32", TICKETS="i32")
        ptrs.update(O_PART="fp32", LSE_PART="fp32", LSE_OUT="fp32")
        sig, cx = _signature(split, ptrs, ("qk_scale",), consts)
        label = f"tree split: lengths {pdt}, {'TMA' if tma else 'plain'} loads, direct={direct} fused={fused}"
        out.append((label, split, sig, cx, dict(num_warps=4, num_stages=3)))
    # the embedded model's decode (2 packed rows of head dim 64, 16 splits merged 2 rows at a time), the draft's
    # cross-attention (prefix only: no tree keys), and its verify's tree in programs of its own (device lengths)
    for label, prefix_only, fused, own in (("embedded decode, fused merge", False, True, False),
                                             ("prefix only", True, False, False),
                                             ("tree in programs of its own", False, False, True)):  # fmt: skip
        if quick:
            break
        consts = dict(
            GROUP=2, HEAD_DIM=64, BLOCK_M=64, BLOCK_N=64, RAGGED=True, CAUSAL=not own, PREFIX_ONLY=prefix_only,
            TREE_SPLIT=own, IEEE=False, DIRECT=False, FUSED_MERGE=fused, WRITE_LSE=True, USE_TMA=not fused,
            STAGES=3, MERGE_S=16, MERGE_R=ta.merge_tile(16, 2, 64)[1],
        )  # fmt: skip
        ptrs = dict(Q="bf16", K="bf16", V="bf16", OUT="bf16", PREFIX="i64", MASK="i32", TICKETS="i32")
        ptrs.update(O_PART="fp32", LSE_PART="fp32", LSE_OUT="fp32")
        sig, cx = _signature(split, ptrs, ("qk_scale",), consts)
        out.append((f"tree split: {label}", split, sig, cx, dict(num_warps=4, num_stages=3)))
    # the embedded verify's tree in programs of its own in two more plans: one row tile of 128 (a 33-64-node tree
    # under LONGSPEC_TREE_SPLIT=wide; TMA loads) and 32-key tiles, 2 stages (LONGSPEC_ROW_TILE_CONFIG=32:4:2; plain)
    plans = (  # label, BLOCK_M, BLOCK_N, TMA, stages, splits (the tree's included), packed rows
        ("one 128-row tile, the tree in programs of its own (LONGSPEC_TREE_SPLIT=wide)", 128, 64, True, 3, 12, 76),
        ("the tree in programs of its own, 32-key tiles, 2 stages (LONGSPEC_ROW_TILE_CONFIG)",
         64, 32, False, 2, 23, 144),
        ("row tiles of 32, the tree in programs of its own (LONGSPEC_BLOCK_M=32)", 32, 64, True, 3, 12, 144),
        ("row tiles of 16, the tree in programs of its own (LONGSPEC_BLOCK_M=16)", 16, 64, True, 3, 12, 144),
    )  # fmt: skip
    for label, block_m, block_n, tma, stages, n_splits, rows in () if quick else plans:
        consts = dict(
            GROUP=2, HEAD_DIM=64, BLOCK_M=block_m, BLOCK_N=block_n, RAGGED=True, CAUSAL=False, PREFIX_ONLY=False,
            TREE_SPLIT=True, IEEE=False, DIRECT=False, FUSED_MERGE=False, WRITE_LSE=True, USE_TMA=tma,
            STAGES=stages, MERGE_S=triton.next_power_of_2(n_splits), MERGE_R=ta.merge_tile(n_splits, rows, 64)[1],
        )  # fmt: skip
        ptrs = dict(Q="bf16", K="bf16", V="bf16", OUT="bf16", PREFIX="i64", MASK="i32", TICKETS="i32")
        ptrs.update(O_PART="fp32", LSE_PART="fp32", LSE_OUT="fp32")
        sig, cx = _signature(split, ptrs, ("qk_scale",), consts)
        out.append((f"tree split: {label}", split, sig, cx, dict(num_warps=4, num_stages=stages)))
    merge = ta._tree_attn_merge_kernel
    merge_s, merge_r = ta.merge_tile(16, 288, 128)
    ptrs = dict(O_PART="fp32", LSE_PART="fp32", PREFIX="i64", OUT="bf16", LSE_OUT="fp32")
    consts = dict(GROUP=4, HEAD_DIM=128, BLOCK_R=merge_r, MERGE_S=merge_s, LOOP=False, RAGGED=True, WRITE_LSE=True,
                  TREE_SPLIT=False)  # fmt: skip
    sig, cx = _signature(merge, ptrs, (), consts)
    out.append(("tree merge: lengths i64", merge, sig, cx, dict(num_warps=4)))
    loop, merge_s, merge_r = ta.merge_plan(4, 288, 128, row_tiles=5)  # Llama verify at 1k: split by split
    consts = dict(GROUP=4, HEAD_DIM=128, BLOCK_R=merge_r, MERGE_S=merge_s, LOOP=loop, RAGGED=False, WRITE_LSE=False,
                  TREE_SPLIT=True)  # fmt: skip
    sig, cx = _signature(merge, ptrs, (), consts)
    out.append(("tree merge: split by split", merge, sig, cx, dict(num_warps=4)))
    maxima = dict(BITONIC=False, K_POW2=1)
    for dt, lo in (("i64", -(2**63)), ("fp32", float("-inf"))):
        consts = dict(MIN=lo, K=16, BLOCK_V=4096, **maxima)
        sig, cx = _signature(rt._row_topk_kernel, dict(X=dt, OUT=dt), (), consts)
        out.append((f"row top-k: {dt}", rt._row_topk_kernel, sig, cx, dict(num_warps=8)))
    consts = dict(MIN=-(2**63), K=16, BLOCK_V=512, **maxima)
    sig, cx = _signature(rt._row_topk_kernel, dict(X="i64", OUT="i64"), (), consts)
    out.append(("flat top-k first pass: 512 columns, one warp", rt._row_topk_kernel, sig, cx, dict(num_warps=1)))
    if hasattr(tl, "topk"):  # LONGSPEC_TOPK_ALGO=bitonic: a tree level's two passes, and a width of 6 (K_POW2 8)
        for k, block, warps, what in ((16, 512, 1, "first pass"), (16, 2048, 4, "second pass"), (6, 512, 1, "k=6")):
            consts = dict(MIN=-(2**63), K=k, BLOCK_V=block, BITONIC=True, K_POW2=triton.next_power_of_2(k))
            sig, cx = _signature(rt._row_topk_kernel, dict(X="i64", OUT="i64"), (), consts)
            label = f"flat top-k {what}, bitonic: {block} columns, {warps} warp(s)"
            out.append((label, rt._row_topk_kernel, sig, cx, dict(num_warps=warps)))
    from longspec_lab.kernels import beam_select as bsel

    # a default-tree level (16 x 4096, w 16) as the decoder launches it (the default chunk, the log-sum-exp's
    # block of `lse_block`, its warps), and the bitonic form with 4 warps (LONGSPEC_BEAM_WARPS=4, the default before)
    forms = [("max", bsel._num_warps()), ("bitonic", bsel._num_warps()), ("bitonic", 4)]
    for algo, warps in forms if hasattr(tl, "topk") else forms[:1]:
        p = bsel.plan(16, 4096, 16)
        bit = algo == "bitonic"
        pow2 = 16 if bit else 1
        consts = dict(K=16, W=16, BLOCK_V=p["block_v"], BLOCK_L=bsel.lse_block(4096, warps),
                      CAND_PAD=p["cand_pad"], BITONIC=bit, K_POW2=pow2, W_POW2=pow2)  # fmt: skip
        ptrs = dict(LOGITS="bf16", SCORES="fp32", CAND="i64", OUT="i64", TICKET="i32")
        sig, cx = _signature(bsel._beam_select_kernel, ptrs, (), consts)
        label = f"beam select: 16 x 4096 bf16 logits, width 16, {algo}, {p['block_v']}-token chunks, {warps} warps"
        out.append((label, bsel._beam_select_kernel, sig, cx, dict(num_warps=warps)))
    # the same launch writing the level into the default tree's buffers too (LONGSPEC_BEAM_WRITE): 69 nodes
    algo = "bitonic" if hasattr(tl, "topk") else "max"
    p, bit, warps = bsel.plan(16, 4096, 16), algo == "bitonic", bsel._num_warps()
    consts = dict(K=16, W=16, BLOCK_V=p["block_v"], BLOCK_L=bsel.lse_block(4096, warps), CAND_PAD=p["cand_pad"],
                  BITONIC=bit, K_POW2=16 if bit else 1, W_POW2=16 if bit else 1)  # fmt: skip
    consts.update(INTO=True, W_TILE=16, N_TILE=128)
    ptrs = dict(LOGITS="bf16", SCORES="fp32", CAND="i64", OUT="i64", TICKET="i32", TOKENS="i64", PARENTS="i64",
                TREE_SCORES="fp32", ANC="u8")  # fmt: skip
    sig, cx = _signature(bsel._beam_select_kernel, ptrs, (), consts, ints=("lo", "plo", "N"))
    label = f"beam select writing the level: 16 x 4096 bf16, width 16 into 69 nodes, {algo}, {warps} warps"
    out.append((label, bsel._beam_select_kernel, sig, cx, dict(num_warps=warps)))
    # the chunk programs' logit keys (LONGSPEC_BEAM_CHUNK_KEYS): the flat last program and the row merge, writing the
    # default tree's level
    for row_merge in (False, True):
        if row_merge and not hasattr(tl, "topk"):
            continue
        consts = dict(K=16, W=16, BLOCK_V=p["block_v"], CAND_PAD=p["cand_pad"], CHUNKS_POW2=p["n_chunks"],
                      ROWS_POW2=16, RC_POW2=p["n_chunks"] * 16, HALF=True, IS_BF16=True, ROW_MERGE=row_merge,
                      BITONIC=bit, K_POW2=16 if bit else 1, W_POW2=16 if bit else 1, INTO=True, W_TILE=16,
                      N_TILE=128, ALT_RUNS=bsel.alternating_runs(p, row_merge, bit))  # fmt: skip
        ptrs = dict(LOGITS="bf16", SCORES="fp32", CAND="i32", PART="fp32", OUT="i64", TICKET="i32", TOKENS="i64",
                    PARENTS="i64", TREE_SCORES="fp32", ANC="u8")  # fmt: skip
        sig, cx = _signature(bsel._beam_select_logits_kernel, ptrs, (), consts, ints=("lo", "plo", "N"))
        label = (f"beam select, logit keys{' and row merge' if row_merge else ''}: 16 x 4096 bf16, width 16 into "
                 f"69 nodes, {algo}, {warps} warps")  # fmt: skip
        out.append((label, bsel._beam_select_logits_kernel, sig, cx, dict(num_warps=warps)))
    # a chain's level (one row, width 1: the logit keys' flat last program, its one maximum written as the level)
    p1 = bsel.plan(1, 4096, 1)
    consts = dict(K=1, W=1, BLOCK_V=p1["block_v"], CAND_PAD=p1["cand_pad"], CHUNKS_POW2=p1["n_chunks"], ROWS_POW2=1,
                  RC_POW2=p1["n_chunks"], HALF=True, IS_BF16=True, ROW_MERGE=False, BITONIC=bit, K_POW2=1, W_POW2=1,
                  INTO=True, W_TILE=1, N_TILE=8)  # fmt: skip
    sig, cx = _signature(bsel._beam_select_logits_kernel, ptrs, (), consts, ints=("lo", "plo", "N"))
    label = f"beam select, logit keys: 1 x 4096 bf16, width 1 into a chain of 6 nodes, {algo}, {warps} warps"
    out.append((label, bsel._beam_select_logits_kernel, sig, cx, dict(num_warps=warps)))
    from longspec_lab.kernels import head_select as hsel

    # the LM head and the selection in one launch (LONGSPEC_HEAD_SELECT): a default-tree level (16 x 256 -> 4096,
    # w 16) in both selections, and a chain level (one row, w 1: repeated maxima whatever the switch says)
    for n, w, algo in [(16, 16, "max"), (16, 16, "bitonic"), (1, 1, "bitonic")]:
        if algo == "bitonic" and not hasattr(tl, "topk"):
            continue
        p = hsel.plan(n, 4096, 256, w)
        consts = hsel.launch_constants(p, w, 256, algo == "bitonic", ieee=False)
        ptrs = dict(H="bf16", HEAD="bf16", SCORES="fp32", PART="fp32", CAND="i64", OUT="i64", TICKET="i32")
        sig, cx = _signature(hsel._head_select_kernel, ptrs, (), consts)
        label = f"head select: {n} x 256 -> 4096 bf16, width {w}, {algo}, {p['block_v']}-token chunks"
        out.append((label, hsel._head_select_kernel, sig, cx, dict(num_warps=hsel.NUM_WARPS)))
    from longspec_lab.kernels import greedy_accept as gacc

    # a verification pass's greedy tail (LONGSPEC_GREEDY_ACCEPT): the default tree's 69 nodes (D 5, R 16) and a
    # chain of 5 (D 5, R 1), over the embedded model's 4,096-token vocabulary in bf16
    for N, D, R, walk in [(69, 5, 16, False), (69, 5, 16, True), (6, 5, 1, False)]:
        pow2 = triton.next_power_of_2
        consts = dict(D=D, R=R, BLOCK_V=gacc.BLOCK_V, N_PAD=pow2(N), D_PAD=pow2(D + 1), K_PAD=pow2(2 * D + 2 * R),
                      WALK=walk)  # fmt: skip
        ptrs = dict(LOGITS="bf16", TOKENS="i64", PARENTS="i64", DEPTHS="i64", ANC="u8", PREDS="i64", VERIFIED="u8",
                    ACCEPTED="u8", PATH="i64", N_ACC="i64", EMITTED="i64", STATS="i64", TICKET="i32")  # fmt: skip
        sig, cx = _signature(gacc._greedy_accept_kernel, ptrs, (), consts)
        label = f"greedy accept: {N} nodes, depth {D}, widest level {R}, 4096 bf16 logits, {'walk' if walk else 'tile'}"
        out.append((label, gacc._greedy_accept_kernel, sig, cx, dict(num_warps=gacc.NUM_WARPS)))
    consts = dict(K=16, MIN=-(2**63), BLOCK_I=rt.RANK_BLOCK_I, BLOCK_J=rt.RANK_BLOCK_J)
    sig, cx = _signature(rt._rank_select_kernel, dict(X="i64", OUT="i64"), (), consts)
    out.append(("flat top-k second pass: rank by counting", rt._rank_select_kernel, sig, cx, dict(num_warps=4)))
    from longspec_lab.kernels import rope

    consts = dict(HALF=32, BLOCK_H=32, BLOCK_N=rope.BLOCK_N, HAS_SLOTS=True)  # head dim 64, a step's slots
    ptrs = dict(POS="i64", INV_FREQ="fp32", COS="bf16", SIN="bf16", START="i64", SLOTS="i64")
    sig, cx = _signature(rope._rope_tables_kernel, ptrs, (), consts)
    out.append(("RoPE tables and slots: head dim 64, bf16", rope._rope_tables_kernel, sig, cx, dict(num_warps=4)))
    from longspec_lab.kernels import norm_linear as nl

    nl_ptrs = dict(X="bf16", W="bf16", NW="bf16", R="bf16", Y="bf16", COS="bf16", SIN="bf16", KC="bf16", VC="bf16",
                   SLOTS="i64", A="bf16", WP="bf16", RP="bf16", XO="bf16", BIAS="bf16")  # fmt: skip
    # (rows, K, N, norm, residual, gated, bias): the embedded model's norm + qkv at one row, its gated MLP, the
    # 8B shape's down projection with the residual at a 72-row verify, the draft's biased q/k/v at a 16-node level,
    # an 8B q/k/v with its norm, the embedded LM head at 72 rows. One K step compiles the weight-first form (ONE_K,
    # LONGSPEC_WEIGHT_FIRST=on), whatever the switch says; the 8B shapes compile the K loop
    for M, K, N, norm, res, gated, bias in [
        (1, 256, 512, True, False, False, False), (1, 256, 768, True, False, True, False),
        (72, 14336, 4096, False, True, False, False), (16, 256, 512, True, False, False, True),
        (1, 4096, 6144, True, False, False, False),  # a norm over several K steps (LONGSPEC_NORM_LINEAR=on at 8B)
        (72, 256, 4096, True, False, False, False),  # the embedded LM head at a verify: 32 x 128 tiles (HEAD_TILES)
    ][: 1 if quick else 6]:  # fmt: skip
        bm, bn, bk = nl.tiles(M, N, K)
        consts = dict(HAS_NORM=norm, HAS_RES=res, GATED=gated, ROPE=False, IEEE=False, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_K=bk, PRE=False, BLOCK_KP=16, HAS_BIAS=bias, ONE_K=K <= bk)  # fmt: skip
        sig, cx = _signature(nl._norm_linear_kernel, nl_ptrs, ("eps",), consts)
        label = f"norm_linear: {M} x {K} -> {N}, norm={norm} residual={res} gated={gated} bias={bias}"
        out.append((label, nl._norm_linear_kernel, sig, cx, dict(num_warps=4, num_stages=3)))
    if not quick:  # LONGSPEC_WEIGHT_FIRST=wide: the embedded model's down_proj (768 inputs) at a 72-row verify, as
        # one padded step of 1,024 with its residual, weight first
        bm, bn, _ = nl.tiles(72, 256, 768)
        consts = dict(HAS_NORM=False, HAS_RES=True, GATED=False, ROPE=False, IEEE=False, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_K=1024, PRE=False, BLOCK_KP=16, HAS_BIAS=False, ONE_K=True)  # fmt: skip
        sig, cx = _signature(nl._norm_linear_kernel, nl_ptrs, ("eps",), consts)
        out.append(("norm_linear, weight first wide: 72 x 768 (one step of 1024) -> 256, residual",
                    nl._norm_linear_kernel, sig, cx, dict(num_warps=4, num_stages=3)))  # fmt: skip
    # q/k/v + RoPE + cache write: the embedded model's heads (4 + 2 + 2 of 64) at one row and at a 72-row verify
    for M in (1, 72)[: 1 if quick else 2]:
        bm, _, bk = nl.tiles(M, 512, 256)
        consts = dict(HAS_NORM=True, HAS_RES=False, GATED=False, ROPE=True, IEEE=False, BLOCK_M=bm, BLOCK_N=32,
                      BLOCK_K=bk, PRE=False, BLOCK_KP=16, HAS_BIAS=False, ONE_K=256 <= bk)  # fmt: skip
        sig, cx = _signature(nl._norm_linear_kernel, nl_ptrs, ("eps",), consts)
        out.append((f"qkv_rope_cache: {M} x 256, 4 + 2 + 2 heads of 64", nl._norm_linear_kernel, sig, cx,
                    dict(num_warps=4, num_stages=3)))  # fmt: skip
    # the same kernel with no key or value heads (linear_rope): the draft's biased cross-attention query, 16 rows
    if not quick:
        bm, _, bk = nl.tiles(16, 256, 256)
        consts = dict(HAS_NORM=True, HAS_RES=False, GATED=False, ROPE=True, IEEE=False, BLOCK_M=bm, BLOCK_N=32,
                      BLOCK_K=bk, PRE=False, BLOCK_KP=16, HAS_BIAS=True, ONE_K=256 <= bk)  # fmt: skip
        sig, cx = _signature(nl._norm_linear_kernel, nl_ptrs, ("eps",), consts)
        out.append(("linear_rope: 16 x 256, 4 heads of 64, bias", nl._norm_linear_kernel, sig, cx,
                    dict(num_warps=4, num_stages=3)))  # fmt: skip
    # o_proj + residual, then the norm and gate/up, in one launch (residual_norm_linear): the embedded model's
    # layer at one row and at a 72-row verify
    for M in (1, 72)[: 1 if quick else 2]:
        bm, bn, bk = nl.tiles(M, 768, 256)
        consts = dict(HAS_NORM=True, HAS_RES=False, GATED=True, ROPE=False, IEEE=False, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_K=max(bk, 256), PRE=True, BLOCK_KP=nl.PRE_BLOCK_KP, HAS_BIAS=False, ONE_K=True)  # fmt: skip
        sig, cx = _signature(nl._norm_linear_kernel, nl_ptrs, ("eps",), consts)
        out.append((f"residual_norm_linear: {M} x 256 -> 256, then norm + gate/up -> 768", nl._norm_linear_kernel,
                    sig, cx, dict(num_warps=4, num_stages=3)))  # fmt: skip
    from longspec_lab.kernels import stream_linear as sl

    # an 8B decode's projections (one row, 132 SMs): q/k/v with its norm (split), gate/up with its norm and SiLU
    # product, down_proj with its residual (split), and the LM head (one split)
    cases = [("qkv", True, False, False), ("gate_up", True, False, True), ("down", False, True, False),
             ("lm_head", True, False, False)]  # fmt: skip
    for name, norm, res, gated in cases[:2] if quick else cases:
        N, K, _ = sl.LLAMA_8B[name]
        bn, bk, split, _, warps = sl.plan(1, N // 2 if gated else N, K, gated, 132)
        consts = dict(HAS_NORM=norm, HAS_RES=res, GATED=gated, IEEE=False, ONE_SPLIT=split == 1, BLOCK_M=sl.MAX_ROWS,
                      BLOCK_N=bn, BLOCK_K=bk)  # fmt: skip
        ptrs = dict(X="bf16", W="bf16", NW="bf16", R="bf16", Y="bf16", PART="fp32", SS="fp32", TICKET="i32")
        sig, cx = _signature(sl._stream_linear_kernel, ptrs, ("eps",), consts)
        out.append((f"stream_linear: 1 x {K} -> {N}, {split} split(s), norm={norm} residual={res} gated={gated}",
                    sl._stream_linear_kernel, sig, cx, dict(num_warps=warps, num_stages=3)))  # fmt: skip
    from longspec_lab.kernels import masked_attention as ma

    # the draft's window attention over a ring of 586 keys: a 16-row tree level (G * T = 32 stacked rows), split,
    # with its mask in two parts (a window row, then tree-mask rows); and, in float32 and in one program, a chain
    # level's one row with one mask
    for rows, dt, one in ((32, "bf16", False), (2, "fp32", True))[: 1 if quick else 2]:
        bm, bn, warps, stages, splits = ma.launch_config(rows, 586)
        ptrs = dict(Q=dt, K=dt, V=dt, MASK="u8", MASK_TAIL="u8", O=dt, O_PART="fp32", LSE_PART="fp32", TICKETS="i32")
        consts = dict(G=2, HEAD_DIM=64, BLOCK_M=bm, BLOCK_N=bn, IEEE=dt == "fp32", SPLITS=1 if one else splits,
                      TAIL=not one, ONE_ROW=not one)  # fmt: skip
        sig, cx = _signature(ma._masked_attn_kernel, ptrs, ("qk_scale",), consts)
        out.append((f"masked attention: {rows} rows, {dt}{'' if one else ', two-part mask'}", ma._masked_attn_kernel,
                    sig, cx, dict(num_warps=warps, num_stages=stages)))  # fmt: skip
    if not quick:
        ptrs = dict(Q="bf16", K="bf16", V="bf16", O="bf16", P_ptr="i64", COLS="i64", COUNT="i64")
        sig, cx = _signature(oa._ordered_attn_kernel, ptrs, ("qk_scale",), dict(G=2, HEAD_DIM=64, BLOCK_N=64))
        out.append(("ordered attention", oa._ordered_attn_kernel, sig, cx, dict(num_warps=4)))
    from longspec_lab.kernels import launch

    sig, cx = _signature(launch._tick_kernel, dict(X="i32"), (), {})  # the unit of a kernel boundary's cost
    out.append(("tick (one boundary's cost)", launch._tick_kernel, sig, cx, dict(num_warps=1)))
    for sync, what in ((launch.SYNC_BARRIER, "grid barriers"), (launch.SYNC_FLAG, "per-producer flags")):
        consts = dict(N_PHASES=64, SYNC=sync, SPIN_LIMIT=launch.SPIN_LIMIT, MAX_PROGRAMS=launch.MAX_PROGRAMS)
        ptrs = dict(X="i32", COUNT="i32", DONE="i32", ERR="i32", FLAGS="i32")
        sig, cx = _signature(launch._phases_kernel, ptrs, (), consts)
        out.append((f"phases with {what} (one wait's cost)", launch._phases_kernel, sig, cx, dict(num_warps=4)))
    return out


def _aligned_attrs(sig: dict) -> dict:
    """The divisibility a launch from PyTorch specialises: every pointer 16-byte aligned, and the ALIGNED integers
    multiples of 16. It is what lets the compiler vectorise loads and pipeline them through shared memory (without
    it the shared-memory check undercounts)."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, (n, t) in enumerate(sig.items())
        if t.startswith("*") or (t == "i32" and n in ALIGNED)
    }


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread, and the stack frame and local memory per thread (where registers spill: a kernel that
    needs more than 255 registers a thread puts the rest there), of a compiled kernel, read by CUDA's cuobjdump from
    its cubin (Triton ships the tool; {} when it is missing or cannot read the cubin). On a Hopper SM, 65,536
    registers: a program of W warps using R registers a thread leaves room for 65536 // (32 * W * R) programs."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        r = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", r.stdout)
    if m is None:
        return {}
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2)), "local_bytes": int(m.group(3))}


def _compile(fn, sig: dict, cx: dict, opts: dict, arch: int):
    """fn compiled for sm_<arch> as a launch would compile it: the signature and constexprs of `_signature`, the
    launch's alignment (`_aligned_attrs`), the options given and the PDL launch of a Hopper GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=_aligned_attrs(sig))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={**opts, "launch_pdl": True})


def compile_all(arch: int = 90, quick: bool = False, progress=print, only: str | None = None) -> list[dict]:
    """Compile each variant for sm_<arch> (those whose label contains `only`, when given); returns one record per
    variant (label, ok, seconds, error)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "compile_check cannot run under TRITON_INTERPRET=1 (the interpreter's kernels do not compile); "
            "unset it, or run `python -m longspec_lab.kernels.compile_check` in a fresh process"
        )
    limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[90])
    records = []
    for label, fn, sig, cx, opts in variants(quick):
        if only is not None and only not in label:
            continue
        t0 = time.perf_counter()
        rec = {"label": label, "arch": arch}
        try:
            kernel = _compile(fn, sig, cx, opts, arch)
            shared = int(kernel.metadata.shared)
            rec.update(ok=shared <= limit, stages=sorted(kernel.asm), shared_bytes=shared)
            if shared > limit:  # compiles, but the launch fails with OutOfResources
                rec["error"] = f"needs {shared} bytes of shared memory, over sm_{arch}'s {limit}"
            rec["async_loads"] = warp_specialization_of(kernel.asm)["async_loads"]  # software pipelining
            rec.update(resource_usage(kernel.asm.get("cubin", b"")))  # registers and spills, if cuobjdump is there
            ptx = kernel.asm.get("ptx", "")
            rec["pdl_gate"] = "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
            if not rec["pdl_gate"]:  # launched with launch_pdl, it would start early and race (kernels/launch.py)
                rec.update(ok=False, error="no griddepcontrol.wait / launch_dependents in the PTX: open the kernel "
                           "with the USE_PDL gate of kernels/launch.py")  # fmt: skip

        except Exception as e:  # noqa: BLE001 - the failure is the result
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:800]}")
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        records.append(rec)
        if progress:
            what = (
                f"{rec['shared_bytes'] / 1024:4.0f} KiB shared, {rec['async_loads']:2d} async loads"
                + (f", {rec['registers']:3d} regs" if "registers" in rec else "")
                + (
                    f", {rec['stack_bytes'] + rec['local_bytes']} B spilled"
                    if rec.get("stack_bytes", 0) + rec.get("local_bytes", 0)
                    else ""
                )
                if "shared_bytes" in rec
                else ""
            )
            progress(f"{'ok  ' if rec['ok'] else 'FAIL'} {rec['seconds']:5.1f} s  {what:46s} {label}")
    return records


# The tree kernel's Llama-3-8B verify launch (288 packed rows, head dim 128) in the row tiles, key tiles and warps a
# warp-specialised form could take: FlashAttention-3's overlap of one tile's softmax with the next tile's matmuls
# needs the loop split between load and compute warps, and Triton's `tl.range(warp_specialize=True)` is what asks
# the compiler for that. (label of the base variant, BLOCK_M, BLOCK_N, warps)
WS_CASES = [
    (label, bm, bn, warps)
    for label in ("tree split: lengths i32, TMA loads, direct=False fused=False",
                  "tree split: lengths i32, plain loads, direct=False fused=True")
    for bm, bn, warps in ((64, 64, 4), (128, 64, 8), (128, 128, 8))
]  # fmt: skip


def _ws_compile(label: str, block_m: int, block_n: int, warps: int, arch: int, form: str) -> dict:
    """Compile one WS_CASES case in one form (in this process: the compiler may abort it): "warp_specialize", the
    key loop with WARP_SPECIALIZE on, or "rotated", the loop rotated by half a step (OVERLAP on)."""
    ((fn, sig, cx, opts),) = [(f, s, c, o) for lab, f, s, c, o in variants() if lab == label]
    cx = dict(cx)
    switch = {"warp_specialize": "WARP_SPECIALIZE", "rotated": "OVERLAP"}[form]
    for name, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n), (switch, True)):
        cx[(fn.arg_names.index(name),)] = value
    k = _compile(fn, sig, cx, {**opts, "num_warps": warps}, arch)
    usage = resource_usage(k.asm.get("cubin", b""))  # registers a thread and spills, where cuobjdump reads them
    if form == "rotated":
        rotated = {f"rotated_{name}": value for name, value in usage.items()}
        return {"rotated_softmax_under_next_qk": softmax_under_first_dot(k.asm["ttgir"]),
                "rotated_shared_bytes": int(k.metadata.shared), **rotated}  # fmt: skip
    return {**warp_specialization_of(k.asm), "shared_bytes": int(k.metadata.shared), **usage}


def softmax_under_first_dot(ttgir: str) -> bool | None:
    """In the software-pipelined loop of a compiled kernel's GPU IR (the scf.for marked tt.num_stages > 1): does an
    exp2 (a softmax) come after the loop body's first wgmma (ttng.warp_group_dot) and before the wait that completes
    it (a ttng.warp_group_dot_wait whose `pendings` no longer covers it)? True: the tensor cores still work on that
    product while the softmax runs; False: the compiler waits for it first; None: no such loop, or no wgmma in it."""
    import re

    lines = ttgir.splitlines()
    end = next((i for i, line in enumerate(lines) if re.search(r"\}.*tt\.num_stages = ([2-9]|\d\d)", line)), None)
    if end is None:
        return None
    depth, start = 0, None
    for i in range(end, -1, -1):  # back to the scf.for that this closing brace ends
        depth += lines[i].count("}") - lines[i].count("{")
        if depth == 0 and "scf.for" in lines[i]:
            start = i
            break
    if start is None:
        return None
    body = lines[start + 1 : end]
    dot = next((i for i, line in enumerate(body) if "ttng.warp_group_dot " in line), None)
    if dot is None:
        return None
    later = 0  # wgmmas issued after it: a wait {pendings = k} leaves the k most recent in flight
    for line in body[dot + 1 :]:
        if "ttng.warp_group_dot_wait" in line:
            pendings = re.search(r"pendings = (\d+)", line)
            if pendings is None or int(pendings.group(1)) <= later:
                return False
        elif "ttng.warp_group_dot " in line:
            later += 1
        elif "math.exp2" in line:
            return True
    return True  # still in flight at the end of the body: it overlaps what the next iteration does first


def warp_specialization_of(asm: dict) -> dict:
    """From a compiled kernel's `asm`: `asked`, a loop carries the request into the compiler (tt.warp_specialize in
    the Triton IR); `specialised`, the GPU IR holds a ttg.warp_specialize op (the loop's partitions); `async_loads`,
    the loads issued ahead through shared memory (cp.async and TMA copies)."""
    ttgir = asm["ttgir"]
    return {
        "asked": "tt.warp_specialize" in asm["ttir"],
        "specialised": "ttg.warp_specialize" in ttgir,
        "async_loads": ttgir.count("ttg.async_copy_global_to_local") + ttgir.count("async_tma_copy_global"),
    }


def warp_specialize_probe(arch: int = 90, progress=print, timeout_s: float = 300) -> list[dict]:
    """What the installed Triton makes of the tree kernel's key loop on sm_<arch>, one record per WS_CASES case,
    each compiled twice in child processes. With warp specialization asked for: `outcome` "specialised" (the loop is
    split into warp partitions), "not specialised" (it compiles as the plain pipelined loop) or "compiler aborted"
    (the compiler killed the process, as an assertion does; its last message in `error`). With the loop rotated
    (OVERLAP): `rotated_softmax_under_next_qk` (softmax_under_first_dot). Both forms' shared memory and registers."""
    import json
    import subprocess

    import triton

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    records = []
    for label, bm, bn, warps in WS_CASES:
        rec = {"base_variant": label, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "arch": arch,
               "loads": "TMA" if "TMA" in label else "plain", "triton": triton.__version__}  # fmt: skip
        for form in ("rotated", "warp_specialize"):
            cmd = [sys.executable, "-m", "longspec_lab.kernels.compile_check", "--ws-case", label, str(bm), str(bn),
                   str(warps), form, "--arch", str(arch)]  # fmt: skip
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                rec.update(outcome="timed out", error=f"{form}: no answer in {timeout_s:.0f} s")
                continue
            last = [line for line in r.stdout.splitlines() if line.startswith("{")]
            if r.returncode == 0 and last:
                rec.update(json.loads(last[-1]))
                if form == "warp_specialize":
                    rec["outcome"] = "specialised" if rec["specialised"] else "not specialised"
            else:
                why = [line for line in r.stderr.splitlines() if "ssert" in line or "rror" in line]
                aborted = r.returncode < 0 or "LLVM ERROR" in r.stderr or "Assertion" in r.stderr
                rec.update(outcome="compiler aborted" if aborted else "failed", returncode=r.returncode,
                           error=f"{form}: " + (why or r.stderr.splitlines()[-1:] or [""])[0][:400])  # fmt: skip
        records.append(rec)
        if progress:
            under = {True: "softmax under the next Q.K^T", False: "Q.K^T waited for at once", None: "no reading"}
            progress(f"{rec.get('outcome', '?'):17s} {rec['loads']:5s} loads, {bm}-row x {bn}-key tiles, {warps} "
                     f"warps; rotated loop: {under[rec.get('rotated_softmax_under_next_qk')]}"
                     + (f": {rec['error']}" if rec.get("error") else ""))  # fmt: skip
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.kernels.compile_check",
        description="Compile every Triton kernel of longspec_lab for a GPU architecture, without a GPU "
        "(catches what the CPU interpreter cannot: types, layouts, TMA descriptors).",
    )
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default: %(default)s, Hopper)")
    ap.add_argument("--quick", action="store_true", help="the decoder's variants only")
    ap.add_argument("--only", metavar="TEXT", help="only the variants whose label contains TEXT, e.g. 'beam select'")
    ap.add_argument("--warp-specialize", action="store_true",
                    help="instead: compile the tree kernel's Llama-3-8B verify variants twice, with automatic warp "
                    "specialization asked for and with the key loop rotated (two routes to FlashAttention-3's overlap "
                    "of softmax and matmuls), and say whether this Triton splits the loop and whether the rotated "
                    "loop's softmax runs while the next product is in flight")  # fmt: skip
    ap.add_argument("--out", metavar="F", help="with --warp-specialize: also write the records as JSON to F (new)")
    ap.add_argument(
        "--ws-case", nargs=5, metavar=("LABEL", "BLOCK_M", "BLOCK_N", "WARPS", "FORM"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.ws_case:  # one probe case, in the child process warp_specialize_probe starts
        import json

        label, bm, bn, warps, form = args.ws_case
        print(json.dumps(_ws_compile(label, int(bm), int(bn), int(warps), args.arch, form)))
        return 0
    if args.out and not args.warp_specialize:
        print("error: --out writes the --warp-specialize probe's records; add --warp-specialize, or drop --out (the "
              "compile check prints its results)", file=sys.stderr)  # fmt: skip
        return 2
    if args.warp_specialize:
        if args.out and os.path.exists(args.out):
            print(f"error: {args.out} exists; results are never overwritten: pass a new path", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("error: unset TRITON_INTERPRET (the interpreter's kernels do not compile)", file=sys.stderr)
            return 2
        records = warp_specialize_probe(args.arch)
        if args.out:
            from longspec_lab.provenance import stamp, write_new_json

            write_new_json(args.out, stamp({"warp_specialize_probe": records}, command=" ".join(sys.argv)))
        return 0
    try:
        records = compile_all(args.arch, args.quick, only=args.only)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"error: no kernel variant's label contains {args.only!r}; run without --only to list them all",
              file=sys.stderr)  # fmt: skip
        return 2
    failed = [r for r in records if not r["ok"]]
    for r in failed:
        print(f"\n{r['label']}:\n{r['error']}", file=sys.stderr)
    print(f"{len(records) - len(failed)} of {len(records)} kernel variants compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
