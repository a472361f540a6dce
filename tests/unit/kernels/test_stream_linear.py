"""The split-K streaming projection (kernels/stream_linear.py) under the CPU interpreter: against the float64
definition for every combination of its options, with one split and with several (ragged splits, tiles and
rows), against `norm_linear` on the same inputs, its plan, its arrival tickets, torch.compile and its checks."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel module's @triton.jit definitions

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

for _mod in ("longspec_lab.kernels.norm_linear", "longspec_lab.kernels.stream_linear"):
    if _mod in sys.modules and not sys.modules[_mod]._INTERPRET:
        importlib.reload(sys.modules[_mod])
from test_norm_linear import _case  # noqa: E402  (one case maker for both projection kernels: the same arguments)

import longspec_lab.kernels.norm_linear as nl  # noqa: E402
import longspec_lab.kernels.stream_linear as sl  # noqa: E402


@pytest.fixture
def plan_override():
    """Set sl.PLAN_OVERRIDE for one test, and put it back."""
    saved = sl.PLAN_OVERRIDE
    yield lambda p: setattr(sl, "PLAN_OVERRIDE", p)
    sl.PLAN_OVERRIDE = saved


# (BLOCK_N, BLOCK_K, SPLIT, warps): one split over every step; three splits of 32-input steps over K = 200
# (7 steps: 3 + 3 + 1); as many splits as steps; the default plan (4 interpreter "SMs")
PLANS = [(16, 64, 1, 4), (16, 32, 3, 4), (32, 32, 7, 4), None]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("has_norm", [False, True])
@pytest.mark.parametrize("has_res", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_matches_float64_definition(plan, has_norm, has_res, gated, plan_override):
    """Ragged: 5 rows of a 16-row tile, 40 columns of 16- or 32-column tiles, 200 inputs in 32- or 64-input steps."""
    plan_override(plan)
    args = _case(11, 5, 200, 40, has_norm, has_res, gated)
    got = sl.stream_linear(*args)
    want = sl.stream_linear_reference(*args)
    assert got.shape == (5, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    if plan is not None:
        assert (sl.LAST_PLAN["block_n"], sl.LAST_PLAN["split"]) == (plan[0], plan[2])


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("plan", [(32, 64, 1, 4), (32, 32, 5, 4)])
def test_float16_against_norm_linear_and_the_definition(M, plan, plan_override):
    """float16, a norm and the SiLU product: within float16 rounding of the definition, as `norm_linear` is
    (the norm is applied after the matmul here, before it there, so the two agree to rounding, not bits)."""
    plan_override(plan)
    args = _case(5 + M, M, 160, 64, True, True, True, dtype=torch.float16)
    got = sl.stream_linear(*args).double()
    want = sl.stream_linear_reference(*args)
    other = nl.norm_linear(*args).double()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got, other, atol=2e-2, rtol=1e-2)


def test_tickets_are_left_at_zero(plan_override):
    """A split launch's last program per column tile puts its ticket back, so the next launch starts from zero."""
    plan_override((16, 32, 4, 4))
    args = _case(2, 3, 128, 64, True, False, False)
    first = sl.stream_linear(*args)
    tickets = sl.tickets(args[0].device)
    assert int(tickets.abs().sum()) == 0
    torch.testing.assert_close(sl.stream_linear(*args), first, atol=0, rtol=0)


def test_split_sum_is_deterministic_and_the_same_for_every_split_count(plan_override):
    """The splits are added in split order: two runs give the same bits, and 1, 2 or 4 splits agree with the
    definition within float32 rounding."""
    args = _case(8, 4, 256, 32, False, False, False)
    outs = []
    for split in (1, 2, 4):
        plan_override((32, 64, split, 4))
        outs.append(sl.stream_linear(*args))
        torch.testing.assert_close(sl.stream_linear(*args), outs[-1], atol=0, rtol=0)
    for o in outs:
        torch.testing.assert_close(o.double(), sl.stream_linear_reference(*args), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    ("N", "K", "gated", "sms"),
    [(6144, 4096, False, 132), (4096, 4096, False, 132), (14336, 4096, True, 132), (4096, 14336, False, 132),
     (128256, 4096, False, 132), (40, 200, False, 4), (5, 7, True, 1)],
)  # fmt: skip
def test_plan_covers_k_once_without_empty_splits(N, K, gated, sms):
    """Every input is in exactly one split's steps, no split is empty, and the grid reaches about WAVES programs
    per SM where the weight allows it."""
    block_n, block_k, split, steps, _ = sl.plan(1, N, K, gated, sms)
    chunks = -(-K // block_k)
    assert split * steps >= chunks and (split - 1) * steps < chunks
    assert block_k <= max(16, 1 << (K - 1).bit_length())
    programs = -(-N // block_n) * split
    if chunks * -(-N // block_n) >= sl.WAVES * sms:
        assert programs >= sl.WAVES * sms // 2
    else:
        assert split == chunks  # too small a weight for the waves: every step its own split


def test_leading_dims_and_empty_rows():
    x, w, nw, eps, _, _ = _case(3, 6, 64, 24, True, False, False)
    got = sl.stream_linear(x.view(2, 3, 64), w, nw, eps)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got.view(6, 24).double(), sl.stream_linear_reference(x, w, nw, eps), atol=2e-5,
                               rtol=2e-5)  # fmt: skip
    assert sl.stream_linear(x[:0], w).shape == (0, 24)


def test_compiled_call_is_one_opaque_op():
    """torch.compile(fullgraph=True) traces the wrapper into a graph holding the registered op."""
    args = _case(5, 4, 64, 32, True, True, False)

    def f(x, w, nw, r):
        return sl.stream_linear(x, w, nw, 1e-5, r)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(args[0], args[1], args[2], args[4]), f(args[0], args[1], args[2], args[4]))


def test_opcheck():
    args = _case(6, 3, 48, 16, True, True, True)
    torch.library.opcheck(torch.ops.longspec.stream_linear, (args[0], args[1], args[2], 1e-5, args[4], True),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_errors_name_the_problem_and_the_fix():
    x, w, *_ = _case(1, 17, 32, 16, False, False, False)
    with pytest.raises(ValueError, match=r"stream_linear: 17 rows.*norm_linear"):
        sl.stream_linear(x, w)
    with pytest.raises(ValueError, match=r"stream_linear: weight \(16, 32\) does not take K = 31"):
        sl.stream_linear(x[:4, :31], w)
    with pytest.raises(ValueError, match=r"stream_linear: gated needs .* even row count"):
        sl.stream_linear(x[:4], w[:15], gated=True)
