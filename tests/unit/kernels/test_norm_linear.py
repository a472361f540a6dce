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


@pytest.mark.parametrize(("M", "N", "K"), [(1, 512, 256), (72, 512, 256), (1, 14336, 4096), (300, 64, 8),
                                     (72, 256, 768), (16, 768, 256), (5, 6144, 4096), (1, 4096, 256),
                                     (16, 4096, 256), (72, 4096, 256)])  # fmt: skip
def test_tiles_fit_the_matrix_unit_and_the_weight(M, N, K):
    """Power-of-two tiles the matrix unit takes (>= 16 rows), no wider than needed: small weights get 16-row
    tiles and K steps up to 256, large ones the row tile that holds M (up to 64) and K steps up to 128."""
    bm, bn, bk = nl.tiles(M, N, K)
    assert all(t >= 16 and t & (t - 1) == 0 for t in (bm, bn, bk))
    assert bk <= max(16, 1 << (K - 1).bit_length())  # the next power of two
    if N * K <= nl.SMALL_WEIGHT and N >= nl.HEAD_COLS:  # a small LM head: its own tiles (LONGSPEC_HEAD_TILES)
        assert (bm, bn) == ((32, 128) if M > 16 else (16, 32)) and bk <= 256
    elif N * K <= nl.SMALL_WEIGHT:
        assert bm == 16 and bn in (16, 32) and bk <= 256
    else:
        assert bm <= 64 and (bm >= M or bm == 64) and bn in (32, 64) and bk <= 128


def test_lm_head_tiles_compute_the_definition_and_the_switch_restores_the_old_rule(monkeypatch):
    """A verification-sized LM head (24 rows x 4,096 columns) runs in 32 x 128 tiles and equals the float64
    definition and the old 16 x 32 tiles' result (to float32 rounding: the interpreter's matmul may sum in another
    order for another tile); LONGSPEC_HEAD_TILES=off gives the old tiles back, and a bad value is named."""
    assert nl.tiles(24, 4096, 256) == (32, 128, 256) and nl.tiles(8, 4096, 256) == (16, 32, 256)
    x, w, nw, eps, _, _ = _case(11, 24, 256, 4096, True, False, False)
    got = nl.norm_linear(x, w, nw, eps)
    torch.testing.assert_close(got.double(), nl.norm_linear_reference(x, w, nw, eps), atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(nl, "HEAD_TILES", "off")
    assert nl.tiles(24, 4096, 256) == (16, 32, 256) and nl.tiles(1, 4096, 256) == (16, 16, 256)
    torch.testing.assert_close(nl.norm_linear(x, w, nw, eps), got, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(nl, "HEAD_TILES", "maybe")
    with pytest.raises(ValueError, match="LONGSPEC_HEAD_TILES='maybe' is not one of on, off"):
        nl.tiles(24, 4096, 256)


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


@pytest.mark.parametrize(("M", "K", "N", "has_norm", "has_res", "gated"),
                         [(1, 64, 48, True, False, False), (16, 256, 512, True, False, False),
                          (5, 200, 96, False, True, False), (7, 128, 40, True, True, True)])  # fmt: skip
def test_bias_matches_float64_and_the_pytorch_ops(M, K, N, has_norm, has_res, gated):
    """A bias (the draft's q/k/v and its cross-attention query, Qwen2's q/k/v) is added to the accumulator
    before the projection is rounded: float32 equals the float64 definition, and float16 stays within one step
    of F.linear with the bias (a bias epilogue), in the weight's row order (gate rows, then up rows)."""
    args = _case(M + N, M, K, N, has_norm, has_res, gated)
    g = torch.Generator().manual_seed(M * N)
    bias = torch.randn(args[1].shape[0], generator=g)
    got = nl.norm_linear(*args, bias=bias)
    torch.testing.assert_close(got.double(), nl.norm_linear_reference(*args, bias=bias), atol=2e-5, rtol=2e-5)
    x, w, nw, eps, r, _ = _case(M + N, M, K, N, has_norm, has_res, gated, dtype=torch.float16)
    b16 = bias.half()
    got = nl.norm_linear(x, w, nw, eps, r, gated, bias=b16)
    h = x if nw is None else nw * torch.nn.functional.rms_norm(x.float(), (K,), eps=eps).half()
    y = torch.nn.functional.linear(h, w, b16)
    if gated:
        y = torch.nn.functional.silu(y[:, :N]) * y[:, N:]
    y = y if r is None else r + y
    ulp = 2.0 ** (torch.floor(torch.log2(y.float().abs().max())).item() - 10)
    assert (got.float() - y.float()).abs().max().item() <= ulp
    with pytest.raises(ValueError, match=r"bias must be \[%d\]" % w.shape[0]):
        nl.norm_linear(x, w, nw, eps, r, gated, bias=b16[1:])


# ----------------------------------------------------------------------------- q/k/v + RoPE + cache write


def _rope_case(seed, B, T, K, Hq, Hkv, D, dtype=torch.float32, L=3, S=24):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(B, T, K, generator=g)).to(dtype)
    w = (torch.randn((Hq + 2 * Hkv) * D, K, generator=g) / K**0.5).to(dtype)
    nw = (1 + 0.2 * torch.randn(K, generator=g)).to(dtype)
    pos = torch.randint(0, 4000, (B, T), generator=g).float()  # large angles: rounding shows
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([pos[..., None] * inv, pos[..., None] * inv], dim=-1)  # [B, T, D]
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, T, D], as Rotary gives
    kc = torch.randn(L, B, Hkv, S, D, generator=g).to(dtype)
    vc = torch.randn(L, B, Hkv, S, D, generator=g).to(dtype)
    slots = torch.randperm(S, generator=g)[:T]
    return x, w, nw, cos, sin, kc, vc, slots


@pytest.mark.parametrize(
    ("B", "T", "K", "Hq", "Hkv", "D"),
    [(1, 1, 64, 4, 2, 32), (2, 5, 96, 4, 4, 64), (1, 18, 128, 8, 1, 32), (3, 7, 48, 2, 2, 128)],
)
@pytest.mark.parametrize("has_norm", [False, True])
def test_qkv_rope_cache_matches_float64_and_writes_only_its_slots(B, T, K, Hq, Hkv, D, has_norm):
    x, w, nw, cos, sin, kc, vc, slots = _rope_case(B * T + D, B, T, K, Hq, Hkv, D)
    nw = nw if has_norm else None
    kc0, vc0 = kc.clone(), vc.clone()
    q = nl.qkv_rope_cache(x, w, nw, 1e-5, cos, sin, kc, vc, 1, slots, Hq, Hkv)
    rq, rk, rv = nl.qkv_rope_cache_reference(x, w, nw, 1e-5, cos, sin, Hq, Hkv)
    assert q.shape == (B, Hq, T, D)
    torch.testing.assert_close(q.double(), rq, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kc[1][:, :, slots].double(), rk, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(vc[1][:, :, slots].double(), rv, atol=2e-5, rtol=2e-5)
    untouched = torch.ones(3, 1, 1, kc.shape[3], 1, dtype=torch.bool)
    untouched[1, :, :, slots] = False
    assert torch.equal(kc[untouched.expand_as(kc)], kc0[untouched.expand_as(kc)])
    assert torch.equal(vc[untouched.expand_as(vc)], vc0[untouched.expand_as(vc)])


def test_qkv_rope_cache_with_bias_matches_float64():
    """The fused q/k/v bias is added per head half before RoPE, as the readable path's F.linear then apply_rope."""
    B, T, K, Hq, Hkv, D = 1, 6, 64, 4, 2, 32
    x, w, nw, cos, sin, kc, vc, slots = _rope_case(11, B, T, K, Hq, Hkv, D)
    bias = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(5))
    q = nl.qkv_rope_cache(x, w, nw, 1e-5, cos, sin, kc, vc, 2, slots, Hq, Hkv, bias=bias)
    rq, rk, rv = nl.qkv_rope_cache_reference(x, w, nw, 1e-5, cos, sin, Hq, Hkv, bias=bias)
    torch.testing.assert_close(q.double(), rq, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kc[2][:, :, slots].double(), rk, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(vc[2][:, :, slots].double(), rv, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="fused q/k/v bias"):
        nl.qkv_rope_cache(x, w, nw, 1e-5, cos, sin, kc, vc, 2, slots, Hq, Hkv, bias=bias[:-1])


def test_qkv_rope_cache_rounds_like_the_pytorch_ops():
    """float16: the readable path (norm_linear's PyTorch ops, apply_rope, the cache write) and the kernel
    differ only by the matmul's summation order, so by at most a couple of float16 steps."""
    from longspec_lab.models.layers import apply_rope

    Hq, Hkv, D, B, T = 4, 2, 64, 1, 9
    x, w, nw, cos, sin, kc, vc, slots = _rope_case(3, B, T, 128, Hq, Hkv, D, dtype=torch.float16)
    kc2, vc2 = kc.clone(), vc.clone()
    q = nl.qkv_rope_cache(x, w, nw, 1e-5, cos, sin, kc, vc, 0, slots, Hq, Hkv)
    y = nl._torch_version(x, w, nw, 1e-5, None, False)
    rq, rk, rv = (t.reshape(B, T, -1, D).transpose(1, 2) for t in y.split((Hq * D, Hkv * D, Hkv * D), dim=-1))
    rq, rk = apply_rope(rq, cos, sin), apply_rope(rk, cos, sin)
    kc2[0][:, :, slots], vc2[0][:, :, slots] = rk, rv
    step = torch.finfo(torch.float16).eps * 4  # relative: a couple of float16 steps at these magnitudes
    torch.testing.assert_close(q, rq, atol=step, rtol=step)
    torch.testing.assert_close(kc, kc2, atol=step, rtol=step)
    torch.testing.assert_close(vc, vc2, atol=step, rtol=step)


def test_qkv_rope_cache_compiles_as_one_mutating_op():
    """torch.compile(fullgraph=True) keeps the registered op, which writes the caches in place."""
    x, w, nw, cos, sin, kc, vc, slots = _rope_case(4, 1, 3, 64, 2, 1, 32)
    kc2, vc2 = kc.clone(), vc.clone()

    def f(x, kc, vc):
        return nl.qkv_rope_cache(x, w, nw, 1e-5, cos, sin, kc, vc, 2, slots, 2, 1) + 0

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, kc, vc)
    want = f(x, kc2, vc2)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    torch.library.opcheck(
        torch.ops.longspec.qkv_rope_cache.default, (x[0], w, nw, 1e-5, cos[0, 0], sin[0, 0], kc, vc, 0, slots, 2, 1)
    )


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda a: {**a, "x": a["x"][0]}, "x must be a tensor"),
        (lambda a: {**a, "v_cache": a["v_cache"][:, :, :, :5]}, "one shape"),
        (lambda a: {**a, "num_kv_heads": 2}, "do not fit the cache"),
        (lambda a: {**a, "weight": a["weight"][1:]}, "fused q/k/v projection"),
        (lambda a: {**a, "layer": 3}, "layer 3 of 3"),
        (lambda a: {**a, "slots": a["slots"].int()}, "int64 slots"),
        (lambda a: {**a, "cos": a["cos"].double()}, "one dtype"),
    ],
)
def test_qkv_rope_cache_bad_inputs_name_the_problem(mutate, words):
    x, w, nw, cos, sin, kc, vc, slots = _rope_case(5, 1, 3, 64, 2, 1, 32)
    args = {"x": x, "weight": w, "norm_weight": nw, "eps": 1e-5, "cos": cos, "sin": sin, "k_cache": kc,
            "v_cache": vc, "layer": 0, "slots": slots, "num_heads": 2, "num_kv_heads": 1}  # fmt: skip
    with pytest.raises(ValueError, match=words):
        nl.qkv_rope_cache(**mutate(args))


@pytest.mark.parametrize(("B", "T", "K", "Hq", "D"), [(1, 1, 64, 4, 32), (2, 5, 96, 2, 64), (1, 16, 48, 8, 128)])
@pytest.mark.parametrize("has_norm, has_bias", [(False, False), (True, True), (True, False)])
def test_linear_rope_matches_float64(B, T, K, Hq, D, has_norm, has_bias):
    """No key or value heads: the query projection (the draft's cross-attention) with RoPE, nothing written."""
    x, w, nw, cos, sin, _, _, _ = _rope_case(B * T + K, B, T, K, Hq, 0, D)
    nw = nw if has_norm else None
    bias = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(T)) if has_bias else None
    q = nl.linear_rope(x, w, nw, 1e-5, cos, sin, Hq, bias)
    rq, _, _ = nl.qkv_rope_cache_reference(x, w, nw, 1e-5, cos, sin, Hq, 0, bias=bias)
    assert q.shape == (B, Hq, T, D) and q.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(q.double(), rq, atol=2e-5, rtol=2e-5)


def test_linear_rope_rounds_like_the_pytorch_ops_and_compiles_as_one_op():
    """float16: against norm_linear's PyTorch ops then apply_rope (the readable path) within a couple of float16
    steps; torch.compile(fullgraph=True) keeps the registered op; opcheck on its fake version."""
    from longspec_lab.models.layers import apply_rope

    Hq, D, B, T = 4, 64, 1, 9
    x, w, nw, cos, sin, _, _, _ = _rope_case(8, B, T, 128, Hq, 0, D, dtype=torch.float16)
    q = nl.linear_rope(x, w, nw, 1e-5, cos, sin, Hq)
    want = apply_rope(nl._torch_version(x, w, nw, 1e-5, None, False).view(B, T, Hq, D).transpose(1, 2), cos, sin)
    step = torch.finfo(torch.float16).eps * 4
    torch.testing.assert_close(q, want, atol=step, rtol=step)

    def f(x):
        return nl.linear_rope(x, w, nw, 1e-5, cos, sin, Hq) + 0

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), q + 0)
    torch.library.opcheck(torch.ops.longspec.linear_rope.default, (x[0], w, nw, 1e-5, cos[0, 0], sin[0, 0], Hq))


def test_one_table_row_for_all_rows_equals_the_expanded_tables():
    """Rows that share one position (a draft tree level) may pass one RoPE row, [1, 1, 1, D], read with stride 0:
    the same bits as the table expanded to every row, for the q/k/v + cache kernel and for linear_rope."""
    B, T, K, Hq, Hkv, D = 1, 6, 64, 4, 2, 32
    x, w, nw, cos, sin, kc, vc, slots = _rope_case(14, B, T, K, Hq, Hkv, D)
    c1, s1 = cos[:, :, 2:3], sin[:, :, 2:3]  # [1, 1, 1, D]
    c_all, s_all = c1.expand(B, 1, T, D).contiguous(), s1.expand(B, 1, T, D).contiguous()
    kc2, vc2 = kc.clone(), vc.clone()
    q1 = nl.qkv_rope_cache(x, w, nw, 1e-5, c1, s1, kc, vc, 1, slots, Hq, Hkv)
    q2 = nl.qkv_rope_cache(x, w, nw, 1e-5, c_all, s_all, kc2, vc2, 1, slots, Hq, Hkv)
    assert torch.equal(q1, q2) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    xq, wq, _, _, _, _, _, _ = _rope_case(15, B, T, K, Hq, 0, D)
    assert torch.equal(nl.linear_rope(xq, wq, nw, 1e-5, c1, s1, Hq), nl.linear_rope(xq, wq, nw, 1e-5, c_all, s_all, Hq))
    rq, _, _ = nl.qkv_rope_cache_reference(xq, wq, nw, 1e-5, c_all, s_all, Hq, 0)
    torch.testing.assert_close(nl.linear_rope(xq, wq, nw, 1e-5, c1, s1, Hq).double(), rq, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda a: {**a, "x": a["x"][0]}, "x must be a tensor"),
        (lambda a: {**a, "weight": a["weight"][1:]}, "power-of-two dim"),
        (lambda a: {**a, "num_heads": 3}, "power-of-two dim"),
        (lambda a: {**a, "cos": a["cos"][..., :16]}, "must be the tables"),
        (lambda a: {**a, "bias": torch.zeros(5)}, "projection's bias"),
        (lambda a: {**a, "sin": a["sin"].double(), "cos": a["cos"].double()}, "one dtype"),
    ],
)
def test_linear_rope_bad_inputs_name_the_problem(mutate, words):
    x, w, nw, cos, sin, _, _, _ = _rope_case(9, 1, 3, 64, 2, 0, 32)
    args = {"x": x, "weight": w, "norm_weight": nw, "eps": 1e-5, "cos": cos, "sin": sin, "num_heads": 2}
    with pytest.raises(ValueError, match=words):
        nl.linear_rope(**mutate(args))


def test_small_weight_bound_is_the_auto_bound():
    """The tiles' small-weight rule covers exactly the weights LONGSPEC_NORM_LINEAR=auto sends to the kernel."""
    from longspec_lab.ops import linear

    assert nl.SMALL_WEIGHT == linear.AUTO_MAX_WEIGHT


def _pre_case(seed, M, KP, K, N, has_norm, gated, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, KP, generator=g).to(dtype)
    wp = (torch.randn(K, KP, generator=g) / KP**0.5).to(dtype)
    r = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(2 * N if gated else N, K, generator=g) / K**0.5).to(dtype)
    nw = (1 + 0.2 * torch.randn(K, generator=g)).to(dtype) if has_norm else None
    return a, wp, r, w, nw


@pytest.mark.parametrize("has_norm", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(("M", "KP", "K", "N"), [(1, 256, 256, 96), (5, 200, 80, 40), (40, 48, 64, 24)])
def test_residual_norm_linear_matches_float64_and_the_two_calls(M, KP, K, N, has_norm, gated):
    """The prologue (x = residual + a @ w_pre^T) and the projection after it, in one launch: x and y against
    float64, and against the two norm_linear launches it replaces. Ragged: KP = 200 in 128-wide steps, K = 80
    in a 128-wide tile, 40 rows in 16-row tiles (each of several column tiles recomputes x; one stores it)."""
    a, wp, r, w, nw = _pre_case(M + KP + N, M, KP, K, N, has_norm, gated)
    x, y = nl.residual_norm_linear(a, wp, r, w, nw, 1e-5, gated)
    x64 = r.double() + a.double() @ wp.double().T
    torch.testing.assert_close(x.double(), x64, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(
        y.double(), nl.norm_linear_reference(x64, w, nw, 1e-5, None, gated), atol=5e-5, rtol=5e-5
    )
    x2 = nl.norm_linear(a, wp, residual=r)
    torch.testing.assert_close(x, x2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, nl.norm_linear(x2, w, nw, 1e-5, gated=gated), atol=1e-5, rtol=1e-5)


def test_residual_norm_linear_in_half_precision_equals_the_two_calls():
    """In float16 the one launch rounds where the two launches round (the projection, the residual sum, the
    norm, SiLU, the product): bit-identical outputs, on leading dims [B, T]."""
    a, wp, r, w, nw = _pre_case(3, 6, 256, 256, 96, True, True, torch.float16)
    a, r = a.view(2, 3, 256), r.view(2, 3, 256)
    x, y = nl.residual_norm_linear(a, wp, r, w, nw, 1e-5, gated=True)
    x2 = nl.norm_linear(a, wp, residual=r)
    assert x.shape == (2, 3, 256) and y.shape == (2, 3, 96)
    assert torch.equal(x, x2) and torch.equal(y, nl.norm_linear(x2, w, nw, 1e-5, gated=True))


def test_residual_norm_linear_opcheck_and_compiles_as_one_op():
    a, wp, r, w, nw = _pre_case(4, 3, 32, 64, 16, True, True)
    torch.library.opcheck(torch.ops.longspec.residual_norm_linear.default, (a, wp, r, w, nw, 1e-5, True))
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(a, r):
        x, y = nl.residual_norm_linear(a, wp, r, w, nw, 1e-5, gated=True)
        return x + 1, y * 2

    torch._dynamo.reset()
    x, y = torch.compile(f, fullgraph=True, backend=spy)(a, r)
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "residual_norm_linear" in str(n.target)]
    assert len(graphs) == 1 and len(calls) == 1
    want_x, want_y = nl.residual_norm_linear(a, wp, r, w, nw, 1e-5, gated=True)
    assert torch.equal(x, want_x + 1) and torch.equal(y, want_y * 2)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda a, wp, r, w: (a[:, :-1], wp, r, w), "does not take a's"),
        (lambda a, wp, r, w: (a, wp, r[:, :-1], w), "residual must be"),
        (lambda a, wp, r, w: (a, wp, r, w[:, :-1]), "does not take the"),
        (lambda a, wp, r, w: (a, wp, r.double(), w), "share one"),
        (lambda a, wp, r, w: (a, torch.zeros(300, 32), torch.zeros(3, 300), torch.zeros(8, 300)), "more than 256"),
    ],
)
def test_residual_norm_linear_bad_inputs_name_the_problem(change, words):
    a, wp, r, w, _ = _pre_case(5, 3, 32, 64, 16, False, False)
    with pytest.raises(ValueError, match=words):
        nl.residual_norm_linear(*change(a, wp, r, w))


def test_launches_pass_the_pointer_types_the_sm90_check_compiles(monkeypatch):
    """compile_check compiles each launch's signature ahead of time; the interpreter never types a branch it does
    not take. So every pointer a launch passes must have the kind (integer or float) its compiled variant names:
    a q-only linear_rope once passed a float tensor as the int64 SLOTS and failed to compile on the H200 alone."""
    from longspec_lab.kernels.compile_check import variants

    sigs = {label.split(":")[0]: sig for label, fn, sig, _, _ in variants() if fn is nl._norm_linear_kernel}
    real, seen = nl._norm_linear_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(dict(zip(real.arg_names, args)))
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(nl, "_norm_linear_kernel", Spy())
    x, w, nw, cos, sin, kc, vc, slots = _rope_case(12, 1, 4, 64, 2, 1, 32)
    nl.qkv_rope_cache(x, w, nw, 1e-5, cos, sin, kc, vc, 0, slots, 2, 1)
    xq, wq, _, cq, sq, _, _, _ = _rope_case(13, 1, 4, 64, 2, 0, 32)
    nl.linear_rope(xq, wq, nw, 1e-5, cq, sq, 2, torch.zeros(wq.shape[0]))
    assert len(seen) == 2  # (without ROPE the epilogue that reads SLOTS, KC and VC is not compiled at all)
    for args, name in zip(seen, ("qkv_rope_cache", "linear_rope")):
        for arg, kind in sigs[name].items():
            if kind.startswith("*"):
                integer = kind[1:] in ("i64", "i32", "u8")
                assert (not args[arg].is_floating_point()) == integer, (name, arg, kind, args[arg].dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_first_reads_the_same_values_and_gives_the_same_bits(dtype, monkeypatch):
    """LONGSPEC_WEIGHT_FIRST: with one K step the kernel reads its weight tile before the PDL wait and its rows once;
    the outputs are bit for bit those of the step loop (switch off), for every form of the kernel that has one step
    (norm + projection, gated, residual, bias, q/k/v with RoPE into the cache, the prologue), and K past one step
    takes the loop either way. An unknown value names the switch."""

    def run():
        g = torch.Generator().manual_seed(21)  # the same inputs on both sides
        x, w, nw, eps, r, _ = _case(8, 9, 256, 96, True, True, True, dtype)
        b = torch.randn(2 * 96, generator=g).to(dtype)
        out = [nl.norm_linear(x, w, nw, eps, r, gated=True, bias=b), nl.norm_linear(x[:, :200], w[:, :200], nw[:200])]
        xr, wr, nwr, cos, sin, kc, vc, slots = _rope_case(3, 2, 5, 96, 4, 2, 64)
        out += [nl.qkv_rope_cache(xr.to(dtype), wr.to(dtype), nwr.to(dtype), 1e-5, cos.to(dtype), sin.to(dtype),
                                  kc.to(dtype), vc.to(dtype), 1, slots, 4, 2)]  # fmt: skip
        a, wp, rp, w2, nw2 = _pre_case(4, 5, 200, 80, 40, True, False)
        out += list(nl.residual_norm_linear(a.to(dtype), wp.to(dtype), rp.to(dtype), w2.to(dtype), nw2.to(dtype),
                                            1e-5, False))  # fmt: skip
        big = _case(9, 3, 512, 32, True, False, False, dtype)  # 512 inputs: two steps of 256, the loop
        out += [nl.norm_linear(*big[:4])]
        return out

    seen = []
    real = nl.one_k
    monkeypatch.setattr(nl, "one_k", lambda K, bk: seen.append((K, real(K, bk))) or seen[-1][1])
    monkeypatch.setattr(nl, "WEIGHT_FIRST", "on")
    on = run()
    assert {k for k, one in seen if one} >= {96, 200, 256} and (512, False) in seen
    monkeypatch.setattr(nl, "WEIGHT_FIRST", "off")
    seen.clear()
    off = run()
    assert not any(one for _, one in seen)
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)
    monkeypatch.setattr(nl, "WEIGHT_FIRST", "yes")
    with pytest.raises(ValueError, match="LONGSPEC_WEIGHT_FIRST='yes' is not one of on, off, wide"):
        run()


@pytest.mark.parametrize("gated,res", [(False, True), (True, False)])
def test_weight_first_wide_widens_the_k_step_of_small_weights_only(gated, res, monkeypatch):
    """LONGSPEC_WEIGHT_FIRST=wide: a small projection with 768 inputs (the embedded model's down_proj) runs as one
    padded step of 1,024 with its weight read first, and gives the float64 definition's values as the step loop
    does; a weight above SMALL_WEIGHT, or K past WIDE_MAX_K, keeps the loop."""
    x, w, nw, eps, r, _ = _case(10, 5, 768, 48, True, res, gated, torch.float32)
    seen = []
    real = nl.one_k
    monkeypatch.setattr(nl, "one_k", lambda K, bk: seen.append((K, bk, real(K, bk))) or seen[-1][2])
    monkeypatch.setattr(nl, "WEIGHT_FIRST", "wide")
    wide = nl.norm_linear(x, w, nw, eps, r, gated=gated)
    assert seen == [(768, 1024, True)]
    ref = nl.norm_linear_reference(x.double(), w.double(), nw.double(), eps, None if r is None else r.double(), gated)
    torch.testing.assert_close(wide.double(), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(nl, "WEIGHT_FIRST", "on")
    seen.clear()
    loop = nl.norm_linear(x, w, nw, eps, r, gated=gated)
    assert seen == [(768, 256, False)]
    torch.testing.assert_close(loop.double(), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(nl, "WEIGHT_FIRST", "wide")
    assert nl.step_k(48, 2048, 256) == 256  # past WIDE_MAX_K
    assert nl.step_k(2048, 768, 256) == 256  # above SMALL_WEIGHT
    assert nl.step_k(48, 200, 256) == 256  # already one step
