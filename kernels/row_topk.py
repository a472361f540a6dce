"""Row top-k by repeated maximum: the draft's beam level without a sort or a radix select.

A beam level (LongSpec, arXiv 2502.17421; `spec/draft.py: beam_level`) keeps the global top-w of
n parents x V tokens. It first takes each parent row's top-w keys, [n, V] int64 -> [n, w], and then
the top-w of those n * w candidates (`ops/topk.py: flat_topk_values` runs both stages here). With
n <= 16, V = 4096 and w <= 16 the first step is tiny work,
yet `torch.topk` runs it as a multi-pass radix select: on the H200 it was one kernel of 47 us, more
than half of a whole chain level (`data/results/profile_h200.json`).

Here one program owns one row chunk of BLOCK_V columns, held in registers, and repeats K times:

    m = max(x);  store m;  x = where(x == m, MIN, x)        (MIN: the dtype's minimum, also the padding)

K block reductions and no memory traffic beyond one read of the chunk. The output of a chunk is its
K largest values, descending. When V needs several chunks, the [rows, n_chunks * K] candidates go
through the same kernel again (a chunk is at least 2K wide, so every pass shrinks the row) until one
chunk is left: the result is [rows, K], descending, as `torch.topk(x, K, dim=1).values`.

Precondition: the keys of a row are DISTINCT under `==` (no two equal values; for float32 no NaN, and
not both +0.0 and -0.0). `where(x == m, ...)` removes every copy of the maximum, so with repeated
values the result would skip the repeats. beam_level's keys are distinct by construction: their low
32 bits hold the pair's flat index. Only values are returned; beam_level reads the index from the key.

flat_topk's second pass, over those first-pass candidates, can also rank them by counting
(`_rank_select_kernel`, LONGSPEC_TOPK_SECOND=rank; measured slower on the H200, so "max" is the default, see
TOPK_SECOND): program p takes 32 candidates and, in steps of
256, counts for each how many candidates are larger; that count is its place in the sorted output, so a
candidate whose count is below k stores itself there. Distinct keys give distinct places (padding equal to
the dtype's minimum ties only with a real minimum, and writes the same value to the same place). No
candidate waits on another's result: 64 programs for 2048 candidates against K dependent block maxima in one
program ("max", the repeated-maximum kernel run over the candidates as one row).

`row_topk_reference` is the definition (`torch.topk`). `row_topk` checks its input and calls the
registered op `torch.ops.longspec.row_topk`, which torch.compile(fullgraph=True) keeps as one opaque
op (its fake version states the output shape). `main` times the kernel against torch.topk:

    python -m longspec_lab.kernels.row_topk --rows 16 --vocab 4096 --k 16

`flat_topk(x, k)` is a beam level's whole selection as one op (`torch.ops.longspec.flat_topk`): the k
largest of all rows x V values, [k] descending, equal to `torch.topk(x.flatten(), k).values` under the
same precondition. Its first pass keeps the top min(k, V) of every chunk of `first_block_v` columns,
[rows, n_chunks * min(k, V)]; those candidates, read as ONE row, go through the passes above until one
chunk is left. A chunk of 4096 columns makes the first pass row_topk's (16 programs of 8 warps for
16 x 4096 keys); narrower chunks (512 columns: 128 programs of one warp, whose maxima need no cross-warp
barrier) trade that for more candidates in the second pass. Timed on the H200 from CUDA graphs (2026-12-04,
data/results/row_topk_flat_h200.json), 16 x 4096 keys, k = 16, with repeated maxima: 11.3 us at 512, 12.5 us at
4096, 12.6 us for row_topk run twice, 32.4 us for torch.topk twice. With the bitonic network (TOPK_ALGO) 1,024
is the fastest width (beam_select_h200.json), and both are the defaults since 2026-12-05. The width is the switch
LONGSPEC_TOPK_FIRST_BLOCK, a power of two read at import into `FLAT_FIRST_BLOCK_V` and checked when used;
`main --flat` times widths against torch.topk and against row_topk run twice:

    python -m longspec_lab.kernels.row_topk --flat --block-v 256,512,1024,4096

Taught in: notebooks/02_tree_shapes.ipynb
"""

import os

import torch
import triton
import triton.language as tl

from longspec_lab.kernels.launch import launch_args

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when the kernel below is defined
MAX_BLOCK_V = 4096  # columns one program holds: 4096 int64 = 32 KiB of registers over 8 warps
# flat_topk's first-pass chunk width, a power of two (module docstring); checked when flat_topk uses it
FLAT_FIRST_BLOCK_V = os.environ.get("LONGSPEC_TOPK_FIRST_BLOCK", "1024")  # with the bitonic network (TOPK_ALGO)
_MIN = {torch.int64: -(2**63), torch.float32: float("-inf")}  # the padding of each supported dtype
# flat_topk's second pass over the first pass's candidates (LONGSPEC_TOPK_SECOND, checked when used): "max" (the
# default) runs the repeated-maximum kernel over them as one row (one program per chunk of up to MAX_BLOCK_V, K
# dependent block reductions); "rank" ranks every candidate by counting the larger ones, RANK_BLOCK_I candidates
# a program, all programs at once, up to RANK_MAX_L candidates (L^2 comparisons in all). Timed on the H200
# (2026-12-04, row_topk_rank_h200.json, 16 x 4096 keys, k = 16, graph-replayed): the whole selection 11.3 us with
# "max", 18.0 us with "rank" (its 4.2M int64 comparisons cost more than 16 dependent maxima over 2,048 values);
# in the decoder the default tree ran 9,824 tokens/s with "max" against 9,306 with "rank" (same call,
# e2e_ab_topk_max_h200.json, e2e_ab_base_topk_h200.json). Kept, tested, as the option for wider candidate sets.
TOPK_SECOND = os.environ.get("LONGSPEC_TOPK_SECOND", "max")
# The widest chunk of the "max" second pass and of any pass after it (LONGSPEC_TOPK_SECOND_BLOCK, a power of two,
# checked when used). With MAX_BLOCK_V, a wide level's 2,048 first-pass candidates (16 parents x 8 chunks of 512
# x 16 kept) are one chunk: one program, K dependent maxima across 4 warps. A narrower chunk splits them over
# one-warp programs and adds a launch: 256 gives 8 programs keeping 16 each, then one program over those 128.
# Timed on the H200 (2026-12-04, row_topk_second_h200.json, 16 x 4096 keys, k = 16, graph-replayed): 11.2-13.9 us
# for every pairing of first chunks 256/512/1024 with second chunks 128/256/512/4096, against 11.3 us for the
# then defaults (512, 4096): the passes' fixed costs, not their width, set the time. The default stays 4096.
FLAT_SECOND_BLOCK_V = os.environ.get("LONGSPEC_TOPK_SECOND_BLOCK", "4096")  # MAX_BLOCK_V
RANK_MAX_L, RANK_BLOCK_I, RANK_BLOCK_J = 16384, 32, 256
# How a chunk keeps its K largest values (LONGSPEC_TOPK_ALGO, checked when used): "max" takes the maximum K times,
# K dependent block reductions, each a chain of shuffles (and, over several warps, a shared-memory round) that the
# next must wait for; "bitonic" runs Triton's bitonic top-k network (`tl.topk`): sort runs of K_POW2, then halve the
# chunk log2(BLOCK_V / K_POW2) times, keeping the larger run of each pair and re-merging it. With k = log2(K_POW2)
# and n = log2(BLOCK_V) that is k(k + 1)/2 + (n - k)(k + 1) compare-exchange rounds (35 for 16 of 512, 45 for 16 of
# 2,048) against K reductions of n shuffle steps each (144 and 176), and no round waits on a reduction's result.
# "auto" (the default) takes "bitonic" on a GPU whose Triton has tl.topk (3.4 or later), and "max" otherwise and
# under the CPU interpreter, where the network's rounds cost seconds (the tests name the algorithm they check).
# With 1,024-token chunks (FLAT_FIRST_BLOCK_V) the network took the H200's one-launch beam selection from 12.1 to
# 9.2 us at 16 rows (beam_select_h200.json), and in the decoder (2026-12-05, one call, the same tokens:
# e2e_ab_topk_bitonic_h200.json against e2e_ab_base_defaults_h200.json) the default tree's draft from 246.0 to
# 235.1 us a step, 13,382 -> 13,543 tokens/s.
# Where "auto" runs the network is a rule by the size of the whole selection (2026-12-07, one H100;
# row_topk_8b_h100.json, row_topk_8b_size_rule_h100.json, verify_8b_4k_topk_ab_h100.json). Inputs of up to
# AUTO_BITONIC_MAX_KEYS keys (the embedded model's 16 x 4,096: a few dozen programs a pass, each waiting on its own
# chain of rounds) take the network in every pass; larger ones take the repeated maxima in every pass. A Llama-3
# vocabulary's level, 16 x 128,256 keys, is 2,016 programs of 1,024 keys and then chunks of 4,096: there the
# network's extra compare-exchanges are paid in full. Graph-replayed, that selection took 70.5 us with the network
# in every pass, 58.4 us with the network only on chunks of at most 1,024 keys (a first rule, dropped), and 34.6 us
# with the maxima in every pass; the compiled 8B draft step at 4k went from 3.10 to 3.01 ms in one call.
TOPK_ALGO = os.environ.get("LONGSPEC_TOPK_ALGO", "auto")
AUTO_BITONIC_MAX_KEYS = 16 * 4096

# The vector maximum. On the GPU: tl.max. Under the interpreter: tl.reduce with the standard library's
# combine function (as in tree_attention.py: tl.max is itself an @jit function of Triton's library and
# is compiled rather than interpreted when triton was imported before TRITON_INTERPRET=1 was set).
if _INTERPRET:

    @triton.jit
    def _vec_max(x):
        return tl.reduce(x, 0, tl.standard._elementwise_max)

    @triton.jit
    def _row_sums(x):
        return tl.reduce(x, 1, tl.standard._sum_combine)
else:

    @triton.jit
    def _row_sums(x):
        return tl.sum(x, 1)

    @triton.jit
    def _vec_max(x):
        return tl.max(x, 0)


@triton.jit
def _row_topk_kernel(
    X,  # [rows, >= L] input values (int64 or float32), unit column stride
    OUT,  # [rows, n_chunks * K] output: chunk c's K largest values at [c * K, (c + 1) * K), descending
    L,  # valid columns of X per row
    stride_x,  # row stride of X, in elements
    stride_o,  # row stride of OUT, in elements
    MIN: tl.constexpr,  # the dtype's minimum: value of masked lanes and of removed maxima
    K: tl.constexpr,  # how many largest values each chunk keeps
    BLOCK_V: tl.constexpr,  # columns per chunk (a power of two); grid axis 1 walks the chunks
    BITONIC: tl.constexpr,  # select with Triton's bitonic top-k network instead of K repeated maxima
    K_POW2: tl.constexpr,  # the power of two >= K that the bitonic network keeps (<= BLOCK_V); K are stored
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
):
    if USE_PDL:  # before any other memory access, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows * L may pass 2**31
    chunk = tl.program_id(1)
    offs = chunk * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V] column indices
    x = tl.load(X + row * stride_x + offs, mask=offs < L, other=MIN)  # [BLOCK_V]
    _store_topk(OUT + row * stride_o + chunk * K, x, MIN, K, BITONIC, K_POW2)


@triton.jit
def _store_topk(out, x, MIN: tl.constexpr, K: tl.constexpr, BITONIC: tl.constexpr, K_POW2: tl.constexpr):
    """Store the K largest values of the 1-D block x (distinct, padded with MIN) at out[0:K], descending. One value
    is one maximum either way: Triton 3.6's tl.topk fails to compile for k = 1 (a chain level's width; the H200
    A/B of 2026-12-05 stopped there, e2e_ab_topk_bitonic_h200.log), so the network only runs for K_POW2 > 1."""
    if BITONIC and K_POW2 > 1:
        # log2(K_POW2) bitonic merge stages sort runs of K_POW2, then each halving keeps the larger of two runs
        # and re-merges (TOPK_ALGO above): no round waits on a reduction
        top = tl.topk(x, K_POW2)  # [K_POW2] the block's largest values, descending
        offs_k = tl.arange(0, K_POW2)
        tl.store(out + offs_k, top, mask=offs_k < K)
    else:
        for i in range(K):
            m = _vec_max(x)  # the largest value not yet taken (keys are distinct)
            tl.store(out + i, m)
            x = tl.where(x == m, MIN, x)  # take it out of the block


@triton.jit
def _rank_select_kernel(
    X,  # [L] candidates (distinct values), unit stride: a flat_topk's first-pass output read as one row
    OUT,  # [K] output: the K largest candidates, descending
    L,  # candidates
    K: tl.constexpr,  # how many largest values to keep
    MIN: tl.constexpr,  # the dtype's minimum: the padding, never counted as larger than a candidate
    BLOCK_I: tl.constexpr,  # candidates this program ranks
    BLOCK_J: tl.constexpr,  # candidates compared against them per step
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
):
    if USE_PDL:  # before any other memory access, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    xi = tl.load(X + offs_i, mask=offs_i < L, other=MIN)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)  # how many candidates are larger: the place in the sorted output
    for j0 in range(0, L, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        xj = tl.load(X + offs_j, mask=offs_j < L, other=MIN)  # [BLOCK_J]
        rank += _row_sums((xj[None, :] > xi[:, None]).to(tl.int32))
    tl.store(OUT + rank, xi, mask=(offs_i < L) & (rank < K))  # distinct values: distinct ranks, no collisions


def row_topk_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: the k largest values of every row, descending. x [rows, V] -> [rows, k]."""
    return torch.topk(x, k, dim=1).values


def _block_v(L: int, k: int, block_v: int) -> int:
    """Chunk width for a row of L columns: the whole row when it fits in block_v, else block_v, and
    never below 2k, so that a pass keeping k of every chunk leaves fewer columns than it read."""
    return min(triton.next_power_of_2(L), max(block_v, triton.next_power_of_2(2 * k)))


def _num_warps(block: int) -> int:
    return min(8, max(1, block // 512))  # 512 columns per warp: 16 int64 per thread at 4096


def _one_pass(x: torch.Tensor, L: int, k: int, block: int, bitonic: bool) -> torch.Tensor:
    """One launch: every chunk of `block` columns of every row keeps its k largest values, descending.
    x [rows, >= L] with unit column stride -> [rows, n_chunks * k]. bitonic: the network, else the maxima."""
    rows = x.shape[0]
    n_chunks = triton.cdiv(L, block)
    out = torch.empty(rows, n_chunks * k, dtype=x.dtype, device=x.device)  # [rows, n_chunks * k]
    _row_topk_kernel[(rows, n_chunks)](
        x, out, L, x.stride(0), out.stride(0), MIN=_MIN[x.dtype], K=k, BLOCK_V=block, BITONIC=bitonic,
        K_POW2=triton.next_power_of_2(k) if bitonic else 1, num_warps=_num_warps(block), **launch_args(x.device),
    )  # fmt: skip
    return out


def _launch(x: torch.Tensor, k: int, block_v: int, bitonic: bool | None = None) -> torch.Tensor:
    """Pass after pass of the kernel until one chunk per row is left. x [rows, L] with unit column stride.
    bitonic: every pass's selection (default: `_algo` for x's size)."""
    rows, L = x.shape
    if rows == 0:
        return x.new_empty(0, k)
    if bitonic is None:
        bitonic = _algo(x.numel()) == "bitonic"
    while True:
        block = _block_v(L, k, block_v)
        x = _one_pass(x, L, k, block, bitonic)  # [rows, n_chunks * k]
        if L <= block:  # one chunk per row: x is [rows, k]
            return x
        L = x.shape[1]  # the candidates hold every row's top k: select again among them


def _passes(L: int, k: int, block_v: int) -> int:
    """How many launches `_launch` makes for rows of L columns."""
    passes = 1
    while L > _block_v(L, k, block_v):
        L, passes = triton.cdiv(L, _block_v(L, k, block_v)) * k, passes + 1
    return passes


@torch.library.custom_op("longspec::row_topk", mutates_args=())
def _row_topk_op(x: torch.Tensor, k: int, block_v: int) -> torch.Tensor:
    """`torch.ops.longspec.row_topk`: x [rows, V] (checked by `row_topk`) -> [rows, k] descending."""
    return _launch(x, k, block_v)


@_row_topk_op.register_fake
def _(x, k, block_v):
    return x.new_empty(x.shape[0], k)


def _check_input(x, name: str) -> None:
    """The checks `row_topk` and `flat_topk` share: a 2-D tensor of a supported dtype that the kernel can read."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = f"a {x.dim()}-D tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} needs a 2-D tensor [rows, V], got {got}; reshape it to [rows, V]")
    if x.dtype not in _MIN:
        raise ValueError(
            f"{name} supports int64 and float32, got {x.dtype}; convert with .to(torch.float32) "
            "(or use torch.topk for other dtypes)"
        )
    if not (x.is_cuda or _INTERPRET):
        raise ValueError(
            f"{name} runs a Triton kernel and got a tensor on {x.device}; pass a CUDA tensor, or set "
            "TRITON_INTERPRET=1 before importing longspec_lab.kernels.row_topk (on the CPU, "
            "row_topk_reference / torch.topk gives the same values)"
        )


def _is_power_of_two(b) -> bool:
    return not isinstance(b, bool) and isinstance(b, int) and b >= 1 and not b & (b - 1)


def row_topk(x: torch.Tensor, k: int, block_v: int | None = None) -> torch.Tensor:
    """The k largest values of every row of x [rows, V], descending: [rows, k], equal to
    `torch.topk(x, k, dim=1).values` when each row's values are distinct (module docstring).
    x: int64 or float32, on CUDA (or on the CPU under TRITON_INTERPRET=1). block_v: the widest chunk
    one program reads, a power of two (default MAX_BLOCK_V); a row wider than that takes two or more
    passes (the tests force a small one to run that path)."""
    _check_input(x, "row_topk")
    V = x.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"row_topk needs an integer k in [1, V] = [1, {V}], got {k!r}; choose k <= the row length")
    block_v = MAX_BLOCK_V if block_v is None else block_v
    if not _is_power_of_two(block_v):
        raise ValueError(f"block_v must be a power of two >= 1, got {block_v!r}; e.g. {MAX_BLOCK_V}")
    if x.stride(1) != 1:
        x = x.contiguous()
    return _row_topk_op(x, k, block_v)


@torch.library.custom_op("longspec::flat_topk", mutates_args=())
def _flat_topk_op(x: torch.Tensor, k: int, first_block_v: int, second_block_v: int) -> torch.Tensor:
    """`torch.ops.longspec.flat_topk`: x [rows, V] (checked by `flat_topk`) -> [k], the k largest of all
    of x, descending."""
    rows, V = x.shape
    kept = min(k, V)  # the global top k lies among every row's top min(k, V)
    bitonic = _algo(rows * V) == "bitonic"  # one selection for every pass (TOPK_ALGO, AUTO_BITONIC_MAX_KEYS)
    first = _one_pass(x, V, kept, _block_v(V, kept, first_block_v), bitonic)  # [rows, n_chunks * kept]
    if first.numel() == kept:  # one row of one chunk: kept == k (k <= rows * V = V), the answer already
        return first.view(k)
    L = first.numel()
    if _second_pass() == "rank" and L <= RANK_MAX_L:  # every candidate finds its own place, in parallel
        out = torch.empty(k, dtype=x.dtype, device=x.device)
        _rank_select_kernel[(triton.cdiv(L, RANK_BLOCK_I),)](
            first,
            out,
            L,
            K=k,
            MIN=_MIN[x.dtype],
            BLOCK_I=RANK_BLOCK_I,
            BLOCK_J=RANK_BLOCK_J,
            num_warps=4,
            **launch_args(x.device),
        )
        return out
    return _launch(first.view(1, -1), k, second_block_v, bitonic).view(k)  # the candidates as one row -> [k]


@_flat_topk_op.register_fake
def _(x, k, first_block_v, second_block_v):
    return x.new_empty(k)


def _algo(keys: int | None = None) -> str:
    """TOPK_ALGO (from LONGSPEC_TOPK_ALGO, or assigned at run time), checked and resolved: "max" or "bitonic".
    keys: how many keys the whole selection reads; "auto" sends more than AUTO_BITONIC_MAX_KEYS to "max" (None: the
    one-launch selections, whose sizes the rule does not cover)."""
    if TOPK_ALGO not in ("auto", "max", "bitonic"):
        raise ValueError(f"LONGSPEC_TOPK_ALGO={TOPK_ALGO!r} is not one of auto, max, bitonic; unset it or pick one")
    if TOPK_ALGO == "auto":
        if not hasattr(tl, "topk") or _INTERPRET:
            return "max"
        return "bitonic" if keys is None or keys <= AUTO_BITONIC_MAX_KEYS else "max"
    if TOPK_ALGO == "bitonic" and not hasattr(tl, "topk"):
        raise RuntimeError(
            f"LONGSPEC_TOPK_ALGO=bitonic needs tl.topk, which Triton {triton.__version__} lacks; "
            "install Triton 3.4 or later, or unset LONGSPEC_TOPK_ALGO"
        )
    return TOPK_ALGO


def _second_pass() -> str:
    if TOPK_SECOND not in ("rank", "max"):
        raise ValueError(f"LONGSPEC_TOPK_SECOND={TOPK_SECOND!r} is not one of rank, max; unset it or pick one")
    return TOPK_SECOND


def _switch_block(name: str, value, default: str) -> int:
    """A chunk-width switch (from the environment as a string, or assigned at run time) as a power of two."""
    block = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if not _is_power_of_two(block):
        raise ValueError(
            f"{name}={value!r} is not a power of two >= 1; unset it (default {default}) or pick one such as {default}"
        )
    return block


def _flat_first_block() -> int:
    """FLAT_FIRST_BLOCK_V (from LONGSPEC_TOPK_FIRST_BLOCK, or assigned at run time) as a power of two."""
    return _switch_block("LONGSPEC_TOPK_FIRST_BLOCK", FLAT_FIRST_BLOCK_V, "1024")


def _flat_second_block() -> int:
    """FLAT_SECOND_BLOCK_V (from LONGSPEC_TOPK_SECOND_BLOCK, or assigned at run time) as a power of two."""
    return _switch_block("LONGSPEC_TOPK_SECOND_BLOCK", FLAT_SECOND_BLOCK_V, str(MAX_BLOCK_V))


def flat_topk(
    x: torch.Tensor, k: int, first_block_v: int | None = None, second_block_v: int | None = None
) -> torch.Tensor:
    """The k largest values of all of x [rows, V], descending: [k], equal to `torch.topk(x.flatten(), k).values`
    and to `torch.topk(torch.topk(x, min(k, V), dim=1).values.flatten(), k).values` when the values are
    distinct (module docstring). Requirements on x as `row_topk`; k in [1, rows * V]. first_block_v: the chunk
    width of the first pass, a power of two (default FLAT_FIRST_BLOCK_V, the switch LONGSPEC_TOPK_FIRST_BLOCK);
    second_block_v: the widest chunk of the second pass and any after it, which read the candidates as one row
    (default FLAT_SECOND_BLOCK_V, the switch LONGSPEC_TOPK_SECOND_BLOCK)."""
    _check_input(x, "flat_topk")
    rows, V = x.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= rows * V:
        raise ValueError(
            f"flat_topk needs an integer k in [1, rows * V] = [1, {rows * V}], got {k!r}; "
            "ask for at most as many values as x holds"
        )
    if first_block_v is None:
        first_block_v = _flat_first_block()
    elif not _is_power_of_two(first_block_v):
        raise ValueError(f"first_block_v must be a power of two >= 1, got {first_block_v!r}; e.g. 512 or 4096")
    if second_block_v is None:
        second_block_v = _flat_second_block()
    elif not _is_power_of_two(second_block_v):
        raise ValueError(f"second_block_v must be a power of two >= 1, got {second_block_v!r}; e.g. 256 or 4096")
    if x.stride(1) != 1:
        x = x.contiguous()
    return _flat_topk_op(x, k, first_block_v, second_block_v)


def _flat_launches(rows: int, V: int, k: int, first_block_v: int, second_block_v: int) -> tuple[int, int]:
    """(launches, programs of the first launch) that `flat_topk` makes for x [rows, V]."""
    kept = min(k, V)
    n_chunks = triton.cdiv(V, _block_v(V, kept, first_block_v))
    if rows * n_chunks == 1:
        return 1, 1
    if _second_pass() == "rank" and rows * n_chunks * kept <= RANK_MAX_L:
        return 2, rows * n_chunks
    return 1 + _passes(rows * n_chunks * kept, k, second_block_v), rows * n_chunks


def _distinct_keys(rows: int, V: int, device, seed: int = 0) -> torch.Tensor:
    """[rows, V] int64 keys shaped like beam_level's: random high 32 bits, distinct low 32 bits."""
    g = torch.Generator().manual_seed(seed)
    high = torch.randint(-(2**31), 2**31, (rows, V), generator=g, dtype=torch.int64)
    low = torch.randperm(rows * V, generator=g).view(rows, V)
    return ((high << 32) + low).to(device)


def main(argv=None) -> int:
    """Time the kernel against torch.topk on beam-level-shaped int64 keys (CUDA)."""
    import argparse

    global TOPK_SECOND, TOPK_ALGO  # each case sets the switches as the ops read them, then restores them

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.kernels.row_topk",
        description=(
            "Time the Triton row top-k (repeated maximum, one program per row chunk) against torch.topk "
            "on distinct int64 keys of the shape the draft's beam level uses: rows = parents of a level, "
            "vocab = V, k = the level's width. Prints medians (us) launched eagerly (triton do_bench) and "
            "replayed from a CUDA graph (do_bench_cudagraph, what the decoder's fast path sees). With --flat, "
            "times the level's whole selection instead: flat_topk, the k largest of all rows x V keys."
        ),
    )
    ap.add_argument("--rows", type=int, default=16, help="rows of the key matrix (parents of a level; default 16)")
    ap.add_argument("--vocab", type=int, default=4096, help="columns per row (vocabulary size V; default 4096)")
    ap.add_argument("--k", type=int, default=16, help="values kept per row (the level's width; default 16)")
    ap.add_argument(
        "--block-v",
        default=str(MAX_BLOCK_V),
        help="comma-separated chunk widths (powers of two) to time; a row wider than one takes two or more passes; "
        "with --flat, the widths of flat_topk's first pass (default %(default)s)",
    )
    ap.add_argument(
        "--second-block",
        default=str(MAX_BLOCK_V),
        help="with --flat: comma-separated widest chunks (powers of two) of the repeated-maximum second pass to time "
        "against each --block-v (default %(default)s: the candidates in one program)",
    )
    ap.add_argument(
        "--flat",
        action="store_true",
        help="time flat_topk (one op: the k largest of all keys) with each --block-v width as its first-pass chunk, "
        "against torch.topk twice (each row's top k, then the top k of those) and against row_topk twice "
        "(the same two stages on the kernel)",
    )
    ap.add_argument(
        "--algo",
        default="max",
        help="comma-separated selections to time for each case: max (K repeated maxima, the default), bitonic "
        "(Triton's bitonic top-k network, LONGSPEC_TOPK_ALGO=bitonic) and/or auto (the decoder's default: the network "
        "for selections of up to AUTO_BITONIC_MAX_KEYS keys, the maxima past it); default %(default)s",
    )
    ap.add_argument("--out", help="also write the medians, with the environment, to this JSON file (must not exist)")
    a = ap.parse_args(argv)
    algos = a.algo.split(",")
    if not algos or any(x not in ("max", "bitonic", "auto") for x in algos):
        ap.error(f"--algo must be comma-separated choices of max, bitonic and auto, e.g. max,bitonic; got {a.algo!r}")
    if a.rows < 1 or a.vocab < 1 or not 1 <= a.k <= a.vocab:
        ap.error(f"need rows >= 1, vocab >= 1 and 1 <= k <= vocab, got {a.rows}, {a.vocab}, {a.k}")

    def widths(text: str, flag: str, example: str) -> list[int]:
        """A comma-separated list of powers of two, or the parser's error naming the flag."""
        try:
            out = [int(b) for b in text.split(",")]
        except ValueError:
            out = []
        if not out or any(b < 1 or b & (b - 1) for b in out):
            ap.error(f"{flag} must be comma-separated powers of two, e.g. {example}; got {text!r}")
        return out

    blocks = widths(a.block_v, "--block-v", "1024,4096")
    seconds = widths(a.second_block, "--second-block", "256,4096")
    if a.out and os.path.exists(a.out):
        ap.exit(2, f"error: {a.out} exists; pick another --out or remove it first\n")
    if not torch.cuda.is_available():
        ap.exit(
            2,
            "error: the benchmark times a GPU kernel and needs CUDA; on the CPU the tests run the kernel in "
            "Triton's interpreter (.venv/bin/pytest tests/unit/kernels/test_row_topk.py)\n",
        )

    from triton.testing import do_bench, do_bench_cudagraph

    def medians(fn) -> tuple[float, float]:
        """(eager, CUDA-graph) median of fn, in us."""
        eager = do_bench(fn, return_mode="median") * 1e3
        return eager, do_bench_cudagraph(fn, return_mode="median") * 1e3

    def checked_medians(fn, want, what: str):
        """medians(fn) once fn is seen to return `want`; None, after saying so, if it does not."""
        if not torch.equal(fn(), want):
            print(f"{what} DIFFERS from torch.topk")
            return None
        return medians(fn)

    if "bitonic" in algos and not hasattr(tl, "topk"):
        print(f"skipping bitonic: Triton {triton.__version__} has no tl.topk")
        algos = [x for x in algos if x != "bitonic"] or ["max"]
    x = _distinct_keys(a.rows, a.vocab, "cuda")
    default_algo = TOPK_ALGO
    report = {"rows": a.rows, "vocab": a.vocab, "k": a.k, "dtype": "int64", "flat": a.flat, "cases": []}
    shape = f"rows={a.rows} V={a.vocab} k={a.k} int64"
    if a.flat:

        def reference():
            return torch.topk(torch.topk(x, a.k, dim=1).values.reshape(-1), a.k).values  # [k]

        def row_topk_twice():
            return row_topk(row_topk(x, a.k).reshape(1, -1), a.k)[0]  # [k]: today's two stages on the kernel

        want = reference()
        if not torch.equal(row_topk_twice(), want):
            print(f"{shape}: row_topk twice DIFFERS from torch.topk")
            return 1
        torch_us, torch_graph_us = medians(reference)
        twice_us, twice_graph_us = medians(row_topk_twice)
        twice_launches = _passes(a.vocab, a.k, MAX_BLOCK_V) + _passes(a.rows * a.k, a.k, MAX_BLOCK_V)
        report.update(
            torch_us=torch_us, torch_graph_us=torch_graph_us, row_topk_twice_us=twice_us,
            row_topk_twice_graph_us=twice_graph_us, row_topk_twice_launches=twice_launches,
        )  # fmt: skip
        print(
            f"{shape}: torch.topk twice {torch_us:.1f} us eager, {torch_graph_us:.1f} us graph; row_topk twice "
            f"({twice_launches} launches) {twice_us:.1f} us eager, {twice_graph_us:.1f} us graph"
        )
        default_second = TOPK_SECOND
        cases = [(b, "rank", MAX_BLOCK_V, al) for b in blocks for al in algos]
        cases += [(b, "max", s, al) for b in blocks for s in seconds for al in algos]
        for b, second, s, algo in cases:
            TOPK_SECOND, TOPK_ALGO = second, algo  # the switches as the op reads them, restored after this case
            try:
                timed = checked_medians(
                    lambda: flat_topk(x, a.k, first_block_v=b, second_block_v=s), want,
                    f"first_block_v={b}, second_block_v={s}, {algo}: flat_topk",
                )  # fmt: skip
                launches, programs = _flat_launches(a.rows, a.vocab, a.k, b, s)
            finally:
                TOPK_SECOND, TOPK_ALGO = default_second, default_algo
            if timed is None:
                return 1
            ours, ours_graph = timed
            report["cases"].append(
                {"first_block_v": b, "second_pass": second, "second_block_v": s, "algo": algo, "launches": launches,
                 "first_programs": programs, "us": ours, "graph_us": ours_graph}
            )  # fmt: skip
            print(
                f"first_block_v={b}, second pass {second} (widest chunk {s}; {launches} launches, {programs} programs "
                f"in the first), {algo}: flat_topk "
                f"{ours:.1f} us eager (vs row_topk twice {ours / twice_us:.2f}, vs torch {ours / torch_us:.2f}), "
                f"{ours_graph:.1f} us graph (vs row_topk twice {ours_graph / twice_graph_us:.2f}, "
                f"vs torch {ours_graph / torch_graph_us:.2f}); equal to torch.topk"
            )
    else:
        want = row_topk_reference(x, a.k)
        torch_us, torch_graph_us = medians(lambda: row_topk_reference(x, a.k))
        report.update(torch_us=torch_us, torch_graph_us=torch_graph_us)
        print(f"{shape}: torch.topk {torch_us:.1f} us eager, {torch_graph_us:.1f} us graph")
        for b, algo in [(b, al) for b in blocks for al in algos]:
            TOPK_ALGO = algo
            try:
                timed = checked_medians(lambda: row_topk(x, a.k, block_v=b), want, f"block_v={b}, {algo}: the kernel")
            finally:
                TOPK_ALGO = default_algo
            if timed is None:
                return 1
            ours, ours_graph = timed
            passes = _passes(a.vocab, a.k, b)
            report["cases"].append({"block_v": b, "algo": algo, "passes": passes, "us": ours, "graph_us": ours_graph})
            print(
                f"block_v={b} ({passes} pass{'es' if passes > 1 else ''}), {algo}: row_topk {ours:.1f} us eager "
                f"(ratio {ours / torch_us:.2f}), {ours_graph:.1f} us graph (ratio {ours_graph / torch_graph_us:.2f}); "
                "equal to torch.topk"
            )
    if a.out:
        from longspec_lab.provenance import stamp, write_new_json

        write_new_json(a.out, stamp(report, torch.device("cuda"), torch.int64))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
