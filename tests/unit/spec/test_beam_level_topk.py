"""beam_level's two top-k stages go through ops/topk.py: the Triton row top-k (kernels/row_topk.py, here in
Triton's CPU interpreter) and torch.topk must give the same level, bit for bit, on scores full of exact
ties, so the tie-break by flat index is exercised; both are also checked against a brute-force sort."""

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
import longspec_lab.ops.topk as topk  # noqa: E402
from longspec_lab.spec.draft import beam_level  # noqa: E402


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach the Triton kernel's entry point."""
    calls = []
    real = rt.flat_topk

    def counting(x, k, first_block_v=None, second_block_v=None):
        calls.append((tuple(x.shape), k))
        return real(x, k, first_block_v, second_block_v)

    monkeypatch.setattr(rt, "flat_topk", counting)
    return calls


def _level(n, V, seed):
    """Coarse log-probs (few distinct values, some -inf) and parent scores: exact ties everywhere."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.randint(-4, 1, (n, V), generator=g).float() / 2
    lp[torch.rand(n, V, generator=g) < 0.1] = float("-inf")
    parents = torch.randint(-2, 1, (n,), generator=g).float()
    return parents, lp


@pytest.mark.parametrize("n, V, width", [(1, 50, 1), (3, 7, 5), (4, 6, 20), (16, 300, 16), (2, 4500, 16)])
def test_triton_and_torch_give_the_same_level(n, V, width, kernel_calls, monkeypatch):
    parents, lp = _level(n, V, seed=n * 100 + V)
    monkeypatch.setattr(topk, "ROW_TOPK", "torch")
    want = beam_level(parents, lp, width)
    assert kernel_calls == []
    monkeypatch.setattr(topk, "ROW_TOPK", "triton")
    got = beam_level(parents, lp, width)
    # both stages went through the kernel, as one op: each row's top-min(w, V), then the top-w of those winners
    assert kernel_calls == [((n, V), width)]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    pairs = sorted(((-(parents[i] + lp[i, j]).item(), i * V + j) for i in range(n) for j in range(V)))[:width]
    assert [int(p) * V + int(t) for p, t in zip(got[0], got[1])] == [f for _, f in pairs]


def test_auto_uses_torch_on_the_cpu(kernel_calls, monkeypatch):
    parents, lp = _level(3, 9, seed=1)
    monkeypatch.setattr(topk, "ROW_TOPK", "auto")
    beam_level(parents, lp, 4)
    assert kernel_calls == []


def test_switch_from_the_environment_and_bad_value(monkeypatch):
    try:
        monkeypatch.setenv("LONGSPEC_ROW_TOPK", "torch")
        assert importlib.reload(topk).ROW_TOPK == "torch"
        monkeypatch.setenv("LONGSPEC_ROW_TOPK", "cub")
        importlib.reload(topk)
        with pytest.raises(ValueError, match="LONGSPEC_ROW_TOPK='cub' is not one of auto, torch, triton"):
            beam_level(*_level(2, 5, seed=2), 3)
    finally:
        monkeypatch.delenv("LONGSPEC_ROW_TOPK")
        importlib.reload(topk)
    assert topk.ROW_TOPK == "auto"


def test_beam_level_compiles_to_one_graph_with_the_op(monkeypatch):
    """torch.compile(fullgraph=True) of a whole level with the kernel selected: no graph break, the
    registered op inside the graph, and the same level as eager torch.topk."""
    monkeypatch.setattr(topk, "ROW_TOPK", "triton")
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    parents, lp = _level(4, 50, seed=3)
    torch._dynamo.reset()
    got = torch.compile(beam_level, fullgraph=True, backend=spy)(parents, lp, 8)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.longspec.flat_topk.default in targets, targets
    monkeypatch.setattr(topk, "ROW_TOPK", "torch")
    for a, b in zip(got, beam_level(parents, lp, 8)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("choice", ["torch", "triton"])
@pytest.mark.parametrize("n, V, k", [(1, 9, 9), (5, 3, 15), (16, 257, 16), (4, 100, 1)])
def test_flat_topk_values_is_the_top_k_of_all_keys(choice, n, V, k, monkeypatch):
    monkeypatch.setattr(topk, "ROW_TOPK", choice)
    g = torch.Generator().manual_seed(n * V + k)
    x = torch.randperm(n * V, generator=g).view(n, V).to(torch.int64) - n * V // 2  # distinct, some negative
    assert torch.equal(topk.flat_topk_values(x, k), torch.sort(x.flatten(), descending=True).values[:k])
    with pytest.raises(ValueError, match="k must be in"):
        topk.flat_topk_values(x, n * V + 1)
