"""Row top-k by repeated maximum (kernels/row_topk.py) in Triton's CPU interpreter against torch.topk, on
seeded distinct int64 keys (shaped like beam_level's) and float32 values: one chunk and several passes,
V not a power of two, V = 1, k = 1, k = V, negative keys and the dtype's minimum itself; the registered
op's fake version (opcheck) and a fullgraph trace; and the errors for bad input.

The same for flat_topk, the k largest of all rows x V values as one op: first-pass chunks narrower than
2k, one row, k above V, candidates wide enough for two more passes, the launches it makes, its
first-chunk switch (LONGSPEC_TOPK_FIRST_BLOCK), its second pass's chunk (LONGSPEC_TOPK_SECOND_BLOCK) and
ops.topk.flat_topk_values compiled with fullgraph."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel module's @triton.jit definitions

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_MOD = "longspec_lab.kernels.row_topk"
if _MOD in sys.modules and not sys.modules[_MOD]._INTERPRET:
    importlib.reload(sys.modules[_MOD])  # imported earlier without the interpreter: redefine the kernel
import longspec_lab.kernels.row_topk as rt  # noqa: E402

OP = torch.ops.longspec.row_topk
FLAT_OP = torch.ops.longspec.flat_topk


def _keys(rows, V, seed):
    """[rows, V] int64, distinct: random signed high 32 bits, a permutation in the low 32 bits."""
    g = torch.Generator().manual_seed(seed)
    high = torch.randint(-(2**31), 2**31, (rows, V), generator=g, dtype=torch.int64)
    return (high << 32) + torch.randperm(rows * V, generator=g).view(rows, V)


def _floats(rows, V, seed):
    """[rows, V] float32, distinct: a shuffled grid of multiples of 1/8 around 0, so negatives too."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(rows * V, generator=g).view(rows, V).float() - rows * V / 2) / 8


CASES = [  # rows, V, k, block_v (None: the default, one chunk here)
    (3, 1, 1, None),  # V = 1
    (4, 37, 1, None),  # V not a power of two, k = 1
    (4, 37, 37, None),  # k = V
    (2, 100, 7, None),
    (2, 4096, 16, None),  # one beam level's row, default tree width
    (3, 300, 5, 32),  # 10 chunks -> 50 candidates -> 2 chunks -> 10 -> 1: three passes
    (2, 70, 20, 16),  # k above block_v: the chunk widens to 64 so every pass still shrinks the row
    (1, 33, 33, 16),  # k = V with several chunks requested: one chunk of 64
]


@pytest.fixture(params=["max", "bitonic"])
def algo(request, monkeypatch):
    """Each chunk's selection both ways (LONGSPEC_TOPK_ALGO): K repeated maxima, or Triton's bitonic top-k."""
    monkeypatch.setattr(rt, "TOPK_ALGO", request.param)
    return request.param


@pytest.mark.parametrize("rows, V, k, block_v", CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_kernel_matches_torch_topk(rows, V, k, block_v, dtype, algo):
    x = (_keys if dtype == torch.int64 else _floats)(rows, V, seed=rows * 1000 + V + k)
    assert all(len(set(r.tolist())) == V for r in x)  # the precondition
    got = rt.row_topk(x, k, block_v=block_v)
    assert got.dtype == dtype and got.shape == (rows, k)
    assert torch.equal(got, rt.row_topk_reference(x, k))
    assert torch.equal(got, torch.sort(x, dim=1, descending=True).values[:, :k])  # an independent definition


def test_negative_keys_and_the_dtype_minimum(algo):
    """All keys negative, and the padding value itself present as a real key: still exact."""
    x = -_keys(2, 50, seed=7).abs() - 1
    x[0, 13] = torch.iinfo(torch.int64).min
    for k, b in [(50, None), (50, 16), (3, 16)]:
        assert torch.equal(rt.row_topk(x, k, block_v=b), torch.topk(x, k, dim=1).values)
    f = _floats(2, 40, seed=8) - 1000.0
    f[1, 5] = float("-inf")
    assert torch.equal(rt.row_topk(f, 40, block_v=16), torch.topk(f, 40, dim=1).values)


def test_strided_and_empty_inputs():
    x = _keys(30, 6, seed=9).t()  # [6, 30], column stride 6: made contiguous
    assert torch.equal(rt.row_topk(x, 4), torch.topk(x, 4, dim=1).values)
    assert rt.row_topk(torch.empty(0, 5, dtype=torch.int64), 2).shape == (0, 2)


def test_two_chunks_take_a_second_pass(algo):
    """With block_v smaller than V the launch runs twice; a single-pass kernel that kept only the first
    chunk's top k would miss the row's maximum placed in the last chunk."""
    x = _keys(1, 40, seed=11)
    x[0, 39] = x.max() + 1
    got = rt.row_topk(x, 3, block_v=8)
    assert int(got[0, 0]) == int(x[0, 39]) and torch.equal(got, torch.topk(x, 3, dim=1).values)


def test_op_opcheck_and_fullgraph_trace():
    x = _keys(3, 20, seed=12)
    torch.library.opcheck(OP, (x, 4, 8))

    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def level(x):
        return torch.topk(rt.row_topk(x, 4).flatten(), 4).values  # beam_level's two stages

    torch._dynamo.reset()
    got = torch.compile(level, fullgraph=True, backend=spy)(x)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert OP.default in targets or OP in targets, targets
    assert torch.equal(got, torch.topk(x.flatten(), 4).values)


def test_bad_input_errors(monkeypatch):
    x = _keys(2, 10, seed=13)
    with pytest.raises(ValueError, match="2-D tensor"):
        rt.row_topk(x.flatten(), 3)
    with pytest.raises(ValueError, match="2-D tensor"):
        rt.row_topk(x[None], 3)
    with pytest.raises(ValueError, match="2-D tensor"):
        rt.row_topk([[1, 2]], 1)
    with pytest.raises(ValueError, match="int64 and float32, got torch.int32"):
        rt.row_topk(x.int(), 3)
    for k in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match=r"integer k in \[1, V\] = \[1, 10\]"):
            rt.row_topk(x, k)
    with pytest.raises(ValueError, match="power of two"):
        rt.row_topk(x, 3, block_v=12)
    monkeypatch.setattr(rt, "_INTERPRET", False)  # as on a machine without TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="CUDA tensor, or set TRITON_INTERPRET=1"):
        rt.row_topk(x, 3)


def test_main_without_cuda_explains(capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU message")
    with pytest.raises(SystemExit) as e:
        rt.main(["--rows", "2", "--vocab", "8", "--k", "2"])
    assert e.value.code == 2 and "needs CUDA" in capsys.readouterr().err


# ----------------------------------------------------------------------------- flat_topk


@pytest.fixture
def launches(monkeypatch):
    """The grid of every launch of the kernel, in order."""
    grids = []

    class Spy:
        def __init__(self, kernel, tag):
            self.kernel, self.tag = kernel, tag

        def __getitem__(self, grid):
            grids.append(grid if self.tag is None else (self.tag, *grid))
            return self.kernel[grid]

    monkeypatch.setattr(rt, "_row_topk_kernel", Spy(rt._row_topk_kernel, None))
    monkeypatch.setattr(rt, "_rank_select_kernel", Spy(rt._rank_select_kernel, "rank"))
    return grids


def _flat_reference(x, k):
    """The two stages flat_topk_values defines: each row's top min(k, V), then the top k of those."""
    return torch.topk(torch.topk(x, min(k, x.shape[1]), dim=1).values.reshape(-1), k).values  # [k]


FLAT_CASES = [  # rows, V, k, first_block_v (None: FLAT_FIRST_BLOCK_V, pinned to 4096), first grid, launches
    (16, 512, 16, 64, (16, 8), 2),  # a beam level in narrow chunks: 128 programs, 2048 candidates in one row
    (16, 1000, 16, None, (16, 1), 2),  # the default: one chunk per row, V not a power of two
    (4, 300, 5, 8, (4, 19), 2),  # first_block_v below 2k: the chunk widens to 16; the last chunk holds 12
    (1, 100, 7, None, (1, 1), 1),  # one row in one chunk: its top k is the answer, no second launch
    (1, 100, 7, 16, (1, 7), 2),  # one row in several chunks
    (3, 50, 1, 16, (3, 4), 2),  # k = 1
    (4, 8, 20, 4, (4, 1), 2),  # k above V: each row keeps all 8 of its values, then the top 20 of 32
    (5, 3, 15, None, (5, 1), 2),  # k = rows * V: every value, sorted
    (2, 1, 2, None, (2, 1), 2),  # V = 1
]


# each case under both selections and both second passes, but the bitonic network with the rank second pass only on
# the small cases: "rank" never runs the network, so on the two beam-level cases (16 rows, 8-12 s each under the
# interpreter) its first pass would repeat the bitonic "max" run's exactly
FLAT_RUNS = [
    (*case, second, algo)
    for case in FLAT_CASES
    for second in ("rank", "max")
    for algo in ("max", "bitonic")
    if not (algo == "bitonic" and second == "rank" and case[0] * case[1] >= 16 * 512)
]


@pytest.mark.parametrize("rows, V, k, first_block_v, grid, n_launches, second, algo", FLAT_RUNS)
def test_flat_topk_matches_torch(rows, V, k, first_block_v, grid, n_launches, second, algo, launches, monkeypatch):
    """Both second passes: "rank" (each candidate counts the larger ones and writes itself to its place, one
    program per 32 candidates) and "max" (repeated maxima over the candidates as one row); each chunk's selection
    both ways (LONGSPEC_TOPK_ALGO)."""
    monkeypatch.setattr(rt, "TOPK_ALGO", algo)
    monkeypatch.setattr(rt, "FLAT_FIRST_BLOCK_V", "4096")
    monkeypatch.setattr(rt, "FLAT_SECOND_BLOCK_V", "4096")
    monkeypatch.setattr(rt, "TOPK_SECOND", second)
    x = rt._distinct_keys(rows, V, "cpu", seed=rows * 1000 + V + k)
    got = rt.flat_topk(x, k, first_block_v=first_block_v)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert torch.equal(got, _flat_reference(x, k))
    assert torch.equal(got, torch.sort(x.flatten(), descending=True).values[:k])  # an independent definition
    assert launches[0] == grid and len(launches) == n_launches
    if n_launches == 2:  # the candidates of the first pass, ranked or reduced as one row
        L = grid[0] * grid[1] * min(k, V)
        assert launches[1] == (("rank", -(-L // rt.RANK_BLOCK_I)) if second == "rank" else (1, 1))
    assert rt._flat_launches(rows, V, k, first_block_v or 4096, 4096) == (n_launches, grid[0] * grid[1])


def test_flat_candidates_wider_than_a_chunk_take_two_more_passes(monkeypatch, launches):
    """With the second pass's chunk at 64 the 312 candidates of the first pass are read as 5 chunks, then 30
    values as one: three launches, and the answer still the global top k."""
    monkeypatch.setattr(rt, "FLAT_SECOND_BLOCK_V", 64)
    monkeypatch.setattr(rt, "TOPK_SECOND", "max")  # the default; "rank" takes them in one launch (the test above)
    x = rt._distinct_keys(4, 200, "cpu", seed=20)
    x[3, 199] = x.max() + 1  # the maximum in the last chunk of the last row
    got = rt.flat_topk(x, 6, first_block_v=16)
    assert launches == [(4, 13), (1, 5), (1, 1)]  # 4 x 13 chunks x 6 = 312 -> 5 x 6 = 30 -> 6
    assert rt._flat_launches(4, 200, 6, 16, 64) == (3, 52)
    assert int(got[0]) == int(x[3, 199]) and torch.equal(got, _flat_reference(x, 6))


@pytest.mark.parametrize(
    "second_block_v, grids",
    [
        (256, [(16, 8), (1, 8), (1, 1)]),  # 2048 candidates -> 8 one-warp chunks keep 16 each -> 128 -> one chunk
        (128, [(16, 8), (1, 16), (1, 2), (1, 1)]),  # 2048 -> 256 -> 32 -> 16
        (16, [(16, 8), (1, 64), (1, 32), (1, 16), (1, 8), (1, 4), (1, 2), (1, 1)]),  # below 2k: chunks widen to 32
    ],
)
def test_flat_topk_narrow_second_pass(second_block_v, grids, launches, monkeypatch):
    """A beam level's 16 x 512 keys, k = 16, first chunks of 64: the second pass in chunks of second_block_v
    (explicit, or the switch FLAT_SECOND_BLOCK_V) takes pass after pass and still gives the global top k."""
    monkeypatch.setattr(rt, "TOPK_SECOND", "max")
    x = rt._distinct_keys(16, 512, "cpu", seed=27)
    x[15, 511] = x.max() + 1  # the maximum in the last chunk, so every pass must carry it
    want = torch.sort(x.flatten(), descending=True).values[:16]
    assert torch.equal(rt.flat_topk(x, 16, first_block_v=64, second_block_v=second_block_v), want)
    assert launches == grids and rt._flat_launches(16, 512, 16, 64, second_block_v) == (len(grids), 128)
    launches.clear()
    monkeypatch.setattr(rt, "FLAT_SECOND_BLOCK_V", str(second_block_v))
    assert torch.equal(rt.flat_topk(x, 16, first_block_v=64), want) and launches == grids


def test_flat_second_block_errors(monkeypatch):
    x = rt._distinct_keys(2, 10, "cpu", seed=28)
    for b in (12, 0, True, 4.0):
        with pytest.raises(ValueError, match="second_block_v must be a power of two"):
            rt.flat_topk(x, 3, second_block_v=b)
    monkeypatch.setattr(rt, "FLAT_SECOND_BLOCK_V", "300")
    with pytest.raises(ValueError, match=r"LONGSPEC_TOPK_SECOND_BLOCK='300' is not a power of two .*default 4096"):
        rt.flat_topk(x, 3)


@pytest.mark.parametrize("rows, V, k, first_block_v", [(3, 200, 10, 32), (4, 8, 20, 4), (2, 37, 37, None)])
def test_flat_topk_float32(rows, V, k, first_block_v):
    x = _floats(rows, V, seed=rows + V + k)
    got = rt.flat_topk(x, k, first_block_v=first_block_v)
    assert got.dtype == torch.float32 and torch.equal(got, _flat_reference(x, k))


def test_flat_topk_negative_keys_and_the_dtype_minimum():
    """The padding of a short last chunk (the dtype's minimum) never displaces a real value, and the minimum
    as a real key still comes out last when every value is asked for."""
    x = -rt._distinct_keys(2, 33, "cpu", seed=22).abs() - 1
    x[0, 13] = torch.iinfo(torch.int64).min
    for k, b in [(3, 16), (66, 16), (66, None)]:  # 33 = 16 + 16 + 1: the last chunk pads 2 of its 3 outputs
        assert torch.equal(rt.flat_topk(x, k, first_block_v=b), _flat_reference(x, k))
    f = _floats(2, 40, seed=23) - 1000.0
    f[1, 5] = float("-inf")
    assert torch.equal(rt.flat_topk(f, 80, first_block_v=16), torch.sort(f.flatten(), descending=True).values)


def test_flat_topk_strided_input():
    x = rt._distinct_keys(30, 6, "cpu", seed=24).t()  # [6, 30], column stride 6: made contiguous
    assert torch.equal(rt.flat_topk(x, 9, first_block_v=8), _flat_reference(x, 9))


def test_flat_topk_bad_input_errors(monkeypatch):
    x = rt._distinct_keys(2, 10, "cpu", seed=25)
    with pytest.raises(ValueError, match="flat_topk needs a 2-D tensor"):
        rt.flat_topk(x.flatten(), 3)
    with pytest.raises(ValueError, match="flat_topk supports int64 and float32, got torch.int32"):
        rt.flat_topk(x.int(), 3)
    for k in (0, 21, 2.0, True):
        with pytest.raises(ValueError, match=r"integer k in \[1, rows \* V\] = \[1, 20\]"):
            rt.flat_topk(x, k)
    for b in (12, 0, True, 4.0):
        with pytest.raises(ValueError, match="first_block_v must be a power of two"):
            rt.flat_topk(x, 3, first_block_v=b)
    monkeypatch.setattr(rt, "_INTERPRET", False)  # as on a machine without TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="flat_topk runs a Triton kernel .* CUDA tensor, or set TRITON_INTERPRET=1"):
        rt.flat_topk(x, 3)


def test_flat_first_block_switch(monkeypatch, launches):
    """FLAT_FIRST_BLOCK_V (a string from the environment, or an int assigned at run time) sets the first
    pass's chunk; a value that is not a power of two is an error naming the variable."""
    x = rt._distinct_keys(2, 300, "cpu", seed=26)
    for value, grid in [("64", (2, 5)), (128, (2, 3)), ("4096", (2, 1))]:
        monkeypatch.setattr(rt, "FLAT_FIRST_BLOCK_V", value)
        launches.clear()
        assert torch.equal(rt.flat_topk(x, 4), _flat_reference(x, 4)) and launches[0] == grid
    for bad in ("512.0", "abc", "", "0", "12", 12, True):
        monkeypatch.setattr(rt, "FLAT_FIRST_BLOCK_V", bad)
        with pytest.raises(ValueError, match=r"LONGSPEC_TOPK_FIRST_BLOCK=.* is not a power of two"):
            rt.flat_topk(x, 4)
    assert torch.equal(rt.flat_topk(x, 4, first_block_v=32), _flat_reference(x, 4))  # an argument overrides it


def test_bitonic_keeps_a_power_of_two_and_stores_k(monkeypatch):
    """The bitonic network keeps K_POW2 >= k values and only the first k are stored: a level of width 6 (the
    tuner's [2,3,6,4,3,8]) writes 6 values per chunk, in the same places as the repeated maxima, and the row's
    largest value placed in its last column comes first either way."""
    x = rt._distinct_keys(3, 700, "cpu", seed=41)
    x[2, 699] = x.max() + 1
    got = {}
    for algo in ("max", "bitonic"):
        monkeypatch.setattr(rt, "TOPK_ALGO", algo)
        got[algo] = rt._one_pass(x, 700, 6, 256, algo == "bitonic")  # [3, 3 chunks * 6]: the raw first pass
        assert torch.equal(rt.flat_topk(x, 6, first_block_v=256), _flat_reference(x, 6))
    assert got["bitonic"].shape == (3, 18) and torch.equal(got["bitonic"], got["max"])
    assert int(got["bitonic"][2, 12]) == int(x[2, 699])


def test_topk_algo_switch_errors(monkeypatch):
    """A value that is neither algorithm, and "bitonic" on a Triton without tl.topk, are errors naming the fix."""
    x = rt._distinct_keys(2, 40, "cpu", seed=42)
    for bad in ("sort", "", "Bitonic"):
        monkeypatch.setattr(rt, "TOPK_ALGO", bad)
        with pytest.raises(ValueError, match=r"LONGSPEC_TOPK_ALGO=.* is not one of auto, max, bitonic"):
            rt.row_topk(x, 3)
    monkeypatch.setattr(rt, "TOPK_ALGO", "bitonic")
    monkeypatch.delattr(rt.tl, "topk")
    with pytest.raises(RuntimeError, match="needs tl.topk.*Triton 3.4 or later"):
        rt.flat_topk(x, 3)
    monkeypatch.setattr(rt, "TOPK_ALGO", "max")  # the default still runs
    assert torch.equal(rt.row_topk(x, 3), torch.topk(x, 3, dim=1).values)


def test_topk_algo_auto_is_the_network_on_a_gpu_only(monkeypatch):
    """The default, "auto": the bitonic network where it is compiled (tl.topk, not the interpreter), maxima else."""
    monkeypatch.setattr(rt, "TOPK_ALGO", "auto")
    monkeypatch.setattr(rt, "_INTERPRET", False)
    assert rt._algo() == ("bitonic" if hasattr(rt.tl, "topk") else "max")
    monkeypatch.setattr(rt, "_INTERPRET", True)
    assert rt._algo() == "max"
    monkeypatch.setattr(rt, "_INTERPRET", False)
    monkeypatch.delattr(rt.tl, "topk", raising=False)
    assert rt._algo() == "max"


def test_topk_algo_auto_picks_by_the_selections_size(monkeypatch):
    """On a GPU, "auto" gives a selection of up to AUTO_BITONIC_MAX_KEYS keys the network in every pass and a larger
    one the maxima in every pass: a Llama-3-sized level (16 x 128,256 keys) takes the maxima, the embedded model's
    (16 x 4,096) the network. Shrunk here: a threshold of 2,000 keys, and inputs of 4 x 400 and 4 x 600 keys."""
    monkeypatch.setattr(rt, "TOPK_ALGO", "auto")
    monkeypatch.setattr(rt, "_INTERPRET", False)
    monkeypatch.setattr(rt.tl, "topk", getattr(rt.tl, "topk", None), raising=False)  # a Triton that has it
    assert [rt._algo(n) for n in (None, 16 * 4096, 16 * 4096 + 1, 16 * 128256)] == ["bitonic"] * 2 + ["max"] * 2
    monkeypatch.setattr(rt, "AUTO_BITONIC_MAX_KEYS", 2000)
    seen, real = [], rt._row_topk_kernel

    class Spy:  # records each launch's chunk width and selection, then runs the maxima (fast in the interpreter)
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw["BLOCK_V"], kw["BITONIC"]))
                return real[grid](*args, **{**kw, "BITONIC": False, "K_POW2": 1})

            return launch

    monkeypatch.setattr(rt, "_row_topk_kernel", Spy())
    monkeypatch.setattr(rt, "_check_input", lambda x, name: None)  # a CPU tensor, with _INTERPRET set False above
    for V, bitonic in ((400, True), (600, False)):
        seen.clear()
        x = rt._distinct_keys(4, V, "cpu", seed=43)
        got = rt.flat_topk(x, 4, first_block_v=64, second_block_v=128)
        assert len(seen) >= 2 and {b for _, b in seen} == {bitonic}, (V, seen)  # chunks of 64, then wider
        assert torch.equal(got, _flat_reference(x, 4))
        seen.clear()
        assert torch.equal(rt.row_topk(x, 4, block_v=128), torch.topk(x, 4, dim=1).values)
        assert seen and {b for _, b in seen} == {bitonic}, (V, seen)


def test_topk_algo_from_the_environment():
    """The module reads LONGSPEC_TOPK_ALGO at import (a fresh interpreter, as for the first-block switch)."""
    code = (
        "import torch, longspec_lab.kernels.row_topk as rt; x = rt._distinct_keys(4, 300, 'cpu', 3); "
        "print(rt.TOPK_ALGO, bool(torch.equal(rt.flat_topk(x, 8), torch.topk(x.flatten(), 8).values)))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "LONGSPEC_TOPK_ALGO": "bitonic"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["bitonic", "True"]


def test_flat_first_block_from_the_environment():
    """The module reads LONGSPEC_TOPK_FIRST_BLOCK at import (in a fresh interpreter: reloading the module here
    would register its ops again and leave this file's op handles stale)."""
    code = "import longspec_lab.kernels.row_topk as rt; print(repr(rt.FLAT_FIRST_BLOCK_V), rt._flat_first_block())"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LONGSPEC_TOPK_FIRST_BLOCK": "1024"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["'1024'", "1024"]


def test_flat_op_opcheck():
    x = rt._distinct_keys(3, 20, "cpu", seed=27)
    torch.library.opcheck(FLAT_OP, (x, 4, 8, 4096))
    torch.library.opcheck(FLAT_OP, (x, 4, 8, 8))  # the candidates in chunks of 8: two more passes
    torch.library.opcheck(FLAT_OP, (x[:1], 4, 32, 4096))  # one row, one chunk: the first pass is the answer


def test_flat_topk_values_compiles_to_one_graph_with_the_op(monkeypatch):
    """ops.topk.flat_topk_values with the kernel selected, under torch.compile(fullgraph=True): no graph
    break, one flat_topk op in the graph (not two row_topk's), and the same values with aot_eager, which
    runs the op's fake version."""
    import longspec_lab.ops.topk as topk

    monkeypatch.setattr(topk, "ROW_TOPK", "triton")
    monkeypatch.setattr(rt, "FLAT_FIRST_BLOCK_V", "16")  # several chunks per row
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def select(x):
        return topk.flat_topk_values(x, 8) - 1

    x = rt._distinct_keys(4, 50, "cpu", seed=28)
    want = _flat_reference(x, 8) - 1
    torch._dynamo.reset()
    assert torch.equal(torch.compile(select, fullgraph=True, backend=spy)(x), want)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(FLAT_OP.default) == 1 and OP.default not in targets, targets
    torch._dynamo.reset()
    assert torch.equal(torch.compile(select, fullgraph=True, backend="aot_eager")(x), want)
    monkeypatch.setattr(topk, "ROW_TOPK", "torch")
    assert torch.equal(select(x), want)


def test_main_flat_without_cuda_or_with_an_existing_out(capsys, tmp_path):
    out = tmp_path / "flat.json"
    out.write_text("{}")
    with pytest.raises(SystemExit) as e:
        rt.main(["--flat", "--out", str(out)])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit) as e:
        rt.main(["--flat", "--block-v", "16,64", "--rows", "2", "--vocab", "8", "--k", "2", "--algo", "max,bitonic"])
    assert e.value.code == 2 and "needs CUDA" in capsys.readouterr().err
    for bad in ("sort", "max,", ""):  # refused before anything runs, naming the choices
        with pytest.raises(SystemExit) as e:
            rt.main(["--flat", "--algo", bad])
        assert e.value.code == 2 and "--algo must be comma-separated choices of max, bitonic" in capsys.readouterr().err


def test_rank_second_pass_past_its_bound_and_the_switch(monkeypatch, launches):
    """Above RANK_MAX_L candidates "rank" hands over to the repeated maximum (L^2 comparisons would cost more);
    an unknown LONGSPEC_TOPK_SECOND names itself and the choices."""
    monkeypatch.setattr(rt, "RANK_MAX_L", 100)
    monkeypatch.setattr(rt, "TOPK_SECOND", "rank")
    x = rt._distinct_keys(16, 64, "cpu", seed=3)
    assert torch.equal(rt.flat_topk(x, 8, first_block_v=16), _flat_reference(x, 8))  # 16 x 4 x 8 = 512 > 100
    assert launches == [(16, 4), (1, 1)]
    monkeypatch.setattr(rt, "TOPK_SECOND", "sort")
    with pytest.raises(ValueError, match="LONGSPEC_TOPK_SECOND='sort' is not one of rank, max"):
        rt.flat_topk(x, 8, first_block_v=16)


def test_bitonic_never_asks_the_network_for_one_value(monkeypatch):
    """k = 1 (a chain level) takes the maximum even with the bitonic switch: Triton 3.6's tl.topk does not compile
    for k = 1. The network is watched under the interpreter, which calls tl.topk through the module."""
    asked = []
    real = rt.tl.topk

    def watched(x, k, *args, **kwargs):
        asked.append(int(getattr(k, "value", k)))
        return real(x, k, *args, **kwargs)

    monkeypatch.setattr(rt, "TOPK_ALGO", "bitonic")
    monkeypatch.setattr(rt.tl, "topk", watched)
    x = rt._distinct_keys(3, 300, "cpu", seed=51)
    assert torch.equal(rt.flat_topk(x, 1, first_block_v=64), torch.topk(x.flatten(), 1).values)
    assert torch.equal(rt.row_topk(x, 1), torch.topk(x, 1, dim=1).values)
    assert asked == []
    assert torch.equal(rt.row_topk(x, 3), torch.topk(x, 3, dim=1).values) and asked  # k = 3: the network (4 kept)
