"""The RoPE-table kernel (kernels/rope.py) in Triton's CPU interpreter: against its PyTorch definition and float64
for decode, tree and batched rows, head dims whose half is not a power of two, positions up to 128k and every
table dtype; the cache slots; the registered op's fake version (opcheck) and a fullgraph trace; the input checks.
Whether a compiled step makes the tables once for all layers: tests/unit/ops/test_rope_tables.py.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel module's @triton.jit definitions

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_MOD = "longspec_lab.kernels.rope"
if _MOD in sys.modules and not sys.modules[_MOD]._INTERPRET:
    importlib.reload(sys.modules[_MOD])
import longspec_lab.kernels.rope as rk  # noqa: E402


def _inv_freq(D: int, theta: float = 10000.0) -> torch.Tensor:
    return (1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)).float()


def _positions(B, T, base, seed):
    g = torch.Generator().manual_seed(seed)
    return base + torch.randint(0, 9, (B, T), generator=g)  # tree rows: a few depths past the base


ULP = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}  # one unit of the last place near 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("B", "T", "D", "base"), [
    (1, 1, 64, 3000),  # an AR step
    (1, 72, 64, 2500),  # a 69-node tree and its pending rows: 5 programs, the last one ragged
    (2, 5, 128, 0),  # two batches, position 0
    (1, 17, 80, 131000),  # D/2 = 40 is not a power of two (the column tile is 64); positions near 128k
])  # fmt: skip
def test_matches_the_definition_and_float64(B, T, D, base, dtype):
    """Against the PyTorch ops that define the tables (numpy's float32 cos under the interpreter against torch's:
    within one rounding of the table's dtype) and against float64 angles; the slots exactly."""
    pos, inv = _positions(B, T, base, seed=B * 100 + T), _inv_freq(D)
    start = torch.tensor([base + 7])
    cos, sin, slots = rk.rope_tables(pos, inv, dtype, start)
    want_cos, want_sin, want_slots = rk.rope_tables_reference(pos, inv, dtype, start)
    assert cos.shape == sin.shape == (B, T, D) and cos.dtype == sin.dtype == dtype
    assert torch.equal(slots, want_slots) and torch.equal(slots, base + 7 + torch.arange(T))
    for got, want in ((cos, want_cos), (sin, want_sin)):
        torch.testing.assert_close(got.float(), want.float(), atol=ULP[dtype], rtol=0)
    exact = pos.double()[..., None] * inv.double()  # float64 angles of the float32 frequencies
    f32_err = (pos.float()[..., None] * inv - exact).abs()  # the definition rounds the angle to float32 first
    tol = f32_err.max().item() + 2 * ULP[dtype]
    torch.testing.assert_close(cos[..., : D // 2].double(), exact.cos(), atol=tol, rtol=0)
    torch.testing.assert_close(sin[..., D // 2 :].double(), exact.sin(), atol=tol, rtol=0)


def test_without_a_start_no_slots_and_empty_rows():
    inv = _inv_freq(64)
    cos, sin, slots = rk.rope_tables(_positions(1, 3, 10, seed=1), inv, torch.bfloat16)
    assert slots is None and cos.shape == (1, 3, 64)
    cos, sin, slots = rk.rope_tables(torch.zeros(1, 0, dtype=torch.long), inv, torch.float32, torch.tensor([4]))
    assert cos.shape == (1, 0, 64) and slots.shape == (0,)


def test_op_opcheck_and_fullgraph_trace():
    pos, inv = _positions(1, 20, 100, seed=2).reshape(-1), _inv_freq(32)
    torch.library.opcheck(rk._rope_tables_op, (pos, inv, torch.tensor([100]), 20, torch.bfloat16))
    torch.library.opcheck(rk._rope_tables_op, (pos, inv, None, 20, torch.float32))
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(p, s):
        cos, sin, slots = rk.rope_tables(p, inv, torch.bfloat16, s)
        return cos * 2, sin, slots + 1

    p, s = _positions(1, 9, 50, seed=3), torch.tensor([50])
    got = torch.compile(f, fullgraph=True, backend=spy)(p, s)
    want = f(p, s)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert [n.target for n in graphs[0].graph.nodes if n.op == "call_function"].count(
        torch.ops.longspec.rope_tables.default
    ) == 1


def test_bad_input_errors(monkeypatch):
    pos, inv, start = _positions(1, 4, 0, seed=4), _inv_freq(64), torch.tensor([0])
    cases = [
        (dict(positions=pos.int()), "positions must be an int64 tensor"),
        (dict(positions=pos[0]), "positions must be an int64 tensor"),
        (dict(inv_freq=inv.double()), "inv_freq must be a float32 tensor"),
        (dict(dtype=torch.int32), "the tables' dtype must be one of"),
        (dict(start=torch.tensor([[0]])), "start must be an int64 tensor"),
        (dict(start=torch.tensor([0.0])), "start must be an int64 tensor"),
    ]
    for change, msg in cases:
        args = {"positions": pos, "inv_freq": inv, "dtype": torch.bfloat16, "start": start, **change}
        with pytest.raises(ValueError, match=msg):
            rk.rope_tables(**args)
    monkeypatch.setattr(rk, "_INTERPRET", False)  # as on a machine without TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="runs a Triton kernel and got tensors on cpu; pass CUDA tensors"):
        rk.rope_tables(pos, inv, torch.bfloat16, start)
