"""The fused RMSNorm + projection kernel (kernels/norm_linear.py) under the CPU interpreter: against the
float64 definition for every combination of its options and ragged tile edges, against the PyTorch ops it
replaces, through torch.compile as one opaque op, and its input checks."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel module's @triton.jit definitions

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_MOD = "longspec_lab.kernels.norm_linear"
if _MOD in sys.modules and not sys.modules[_MOD]._INTERPRET:
    importlib.reload(sys.modules[_MOD])
import longspec_lab.kernels.norm_linear as nl  # noqa: E402


def _case(seed, M, K, N, has_norm, has_res, gated, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(M, K, generator=g)).to(dtype)
    w = (torch.randn(2 * N if gated else N, K, generator=g) / K**0.5).to(dtype)
    nw = (1 + 0.2 * torch.randn(K, generator=g)).to(dtype) if has_norm else None
    r = torch.randn(M, N, generator=g).to(dtype) if has_res else None
    return x, w, nw, 1e-5, r, gated


@pytest.mark.parametrize("has_norm", [False, True])
@pytest.mark.parametrize("has_res", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(("M", "K", "N"), [(1, 64, 48), (5, 200, 96), (72, 256, 40)])
def test_matches_float64_definition(M, K, N, has_norm, has_res, gated):
    """Ragged everywhere: M, N, K not multiples of the tiles (200 inputs in 128-wide steps, 40 of 32 columns)."""
    args = _case(M * 7 + K, M, K, N, has_norm, has_res, gated)
    got = nl.norm_linear(*args)
    want = nl.norm_linear_reference(*args)
    assert got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_leading_dims_and_the_pytorch_ops_it_replaces():
    """[B, T, K] rows give [B, T, N], equal (float32) to rms_norm + linear + silu product + residual as
    PyTorch ops, which is what the models run without the kernel."""
    x, w, nw, eps, _, _ = _case(3, 6, 128, 80, True, False, True)
    x3 = x.view(2, 3, 128)
    r3 = torch.randn(2, 3, 80, generator=torch.Generator().manual_seed(4))
    got = nl.norm_linear(x3, w, nw, eps, r3, gated=True)
    want = nl._torch_version(x3, w, nw, eps, r3, True)
    assert got.shape == (2, 3, 80)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_compiled_call_is_one_opaque_op():
    """torch.compile(fullgraph=True) traces the wrapper into a graph holding the registered op (its fake
    version gives the shape), and the compiled result equals the eager one."""
    args = _case(5, 4, 64, 32, True, True, False)

    def f(x, w, nw, r):
        return nl.norm_linear(x, w, nw, 1e-5, r) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, w, nw, _, r, _ = args
    torch.testing.assert_close(compiled(x, w, nw, r), f(x, w, nw, r))


def test_opcheck():
    x, w, nw, eps, r, gated = _case(6, 3, 64, 32, True, True, True)
    torch.library.opcheck(torch.ops.longspec.norm_linear.default, (x, w, nw, eps, r, gated))


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda a: {**a, "weight": a["weight"][:, :10]}, "does not take K"),
        (lambda a: {**a, "weight": a["weight"][:33], "gated": True}, "even row count"),
        (lambda a: {**a, "weight": a["weight"].double()}, "share one of"),
        (lambda a: {**a, "norm_weight": a["norm_weight"][:5]}, "norm_weight must be"),
        (lambda a: {**a, "residual": a["residual"][:, :3]}, "residual must be"),
        (lambda a: {**a, "weight": a["weight"][0]}, "2-D tensor"),
    ],
)
def test_bad_inputs_name_the_problem(mutate, words):
    x, w, nw, eps, r, _ = _case(8, 2, 64, 64, True, True, False)
    kw = mutate({"x": x, "weight": w, "norm_weight": nw, "eps": eps, "residual": r, "gated": False})
    with pytest.raises(ValueError, match=words):
        nl.norm_linear(**kw)


@pytest.mark.parametrize(("M", "N", "K"), [(1, 512, 256), (72, 512, 256), (1, 14336, 4096), (300, 64, 8)])
def test_tiles_hold_the_rows_and_fit_the_matrix_unit(M, N, K):
    bm, bn, bk = nl.tiles(M, N, K)
    assert 16 <= bm <= 64 and (bm >= M or bm == 64) and bm & (bm - 1) == 0
    assert bn in (32, 64) and 16 <= bk <= 128 and bk & (bk - 1) == 0


@pytest.mark.parametrize(("M", "N", "K"), [(1, 512, 256), (72, 64, 96)])
def test_every_swept_tile_computes_the_definition(M, N, K, monkeypatch):
    """The tile sweep (`main --sweep`) times only tiles that compute the float64 definition; here every
    candidate of two shapes runs under the interpreter, `tiles`' own pick first, with no duplicates."""
    cands = nl.tile_candidates(M, N, K)
    assert cands[0] == nl.tiles(M, N, K) and len(set(cands)) == len(cands)
    assert all(bm >= 16 and (bm // 2 < M or bm == 16) for bm, _, _ in cands)
    x, w, nw, eps, r, gated = _case(7, M, K, N, True, True, False)
    want = nl.norm_linear_reference(x, w, nw, eps, r, gated)
    for t in cands[:: max(1, len(cands) // 6)]:  # a spread of them: the interpreter is slow
        monkeypatch.setattr(nl, "TILES_OVERRIDE", t)
        torch.testing.assert_close(nl.norm_linear(x, w, nw, eps, r, gated).double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("M", "K", "N", "has_norm", "has_res", "gated"),
                         [(1, 256, 512, True, False, False), (3, 256, 96, True, False, True),
                          (72, 128, 64, True, True, True), (5, 192, 64, False, True, False)])  # fmt: skip
def test_half_precision_rounds_like_the_pytorch_ops(M, K, N, has_norm, has_res, gated):
    """In float16 (the interpreter has no bfloat16) the kernel's intermediate roundings follow the modules':
    its error against float64 is no larger than the PyTorch ops' own, and the two differ by at most one
    float16 step of the output's magnitude (the matmul's summation order)."""
    args = _case(M + K + N, M, K, N, has_norm, has_res, gated, dtype=torch.float16)
    got, ops = nl.norm_linear(*args), nl._torch_version(*args)
    want = nl.norm_linear_reference(*args)
    err_kernel, err_ops = (got.double() - want).abs().max().item(), (ops.double() - want).abs().max().item()
    assert got.dtype == torch.float16 and err_kernel <= 1.25 * err_ops + 1e-3
    ulp = 2.0 ** (torch.floor(torch.log2(want.abs().max())).item() - 10)
    assert (got.float() - ops.float()).abs().max().item() <= ulp
