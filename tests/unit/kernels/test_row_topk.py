"""Row top-k by repeated maximum (kernels/row_topk.py) in Triton's CPU interpreter against torch.topk, on
seeded distinct int64 keys (shaped like beam_level's) and float32 values: one chunk and several passes,
V not a power of two, V = 1, k = 1, k = V, negative keys and the dtype's minimum itself; the registered
op's fake version (opcheck) and a fullgraph trace; and the errors for bad input."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel module's @triton.jit definitions

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_MOD = "longspec_lab.kernels.row_topk"
if _MOD in sys.modules and not sys.modules[_MOD]._INTERPRET:
    importlib.reload(sys.modules[_MOD])  # imported earlier without the interpreter: redefine the kernel
import longspec_lab.kernels.row_topk as rt  # noqa: E402

OP = torch.ops.longspec.row_topk


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


@pytest.mark.parametrize("rows, V, k, block_v", CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_kernel_matches_torch_topk(rows, V, k, block_v, dtype):
    x = (_keys if dtype == torch.int64 else _floats)(rows, V, seed=rows * 1000 + V + k)
    assert all(len(set(r.tolist())) == V for r in x)  # the precondition
    got = rt.row_topk(x, k, block_v=block_v)
    assert got.dtype == dtype and got.shape == (rows, k)
    assert torch.equal(got, rt.row_topk_reference(x, k))
    assert torch.equal(got, torch.sort(x, dim=1, descending=True).values[:, :k])  # an independent definition


def test_negative_keys_and_the_dtype_minimum():
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


def test_two_chunks_take_a_second_pass():
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
