"""One-kernel masked attention (kernels/masked_attention.py): the definition against a brute-force per-row
softmax in float64; the Triton kernel (CPU interpreter) against the definition in float32 and float16 over
GQA groups 1/2/4, one to many rows, key counts that are not a multiple of the tile, a shared mask row and
rows that see nothing; the registered op's fake version (opcheck) and a fullgraph trace; the errors for
bad input; and masked_sdpa's "triton" form against its "math" form on a draft level's shapes."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel module's @triton.jit definitions

import pytest  # noqa: E402
import torch  # noqa: E402

import longspec_lab.kernels.masked_attention as ma  # noqa: E402

OP = torch.ops.longspec.masked_attention.default


def _case(T, Hq, Hkv, S, D=16, seed=0, dtype=torch.float32, shared=False, p=0.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, S, D, generator=g).to(dtype)
    mask = torch.rand(1 if shared else T, S, generator=g) < p
    return q, k, v, mask


def test_reference_equals_brute_force():
    q, k, v, mask = _case(5, 4, 2, 23, seed=1)
    mask[2] = False  # a row that sees nothing
    got = ma.masked_attention_reference(q, k, v, mask)
    G, D = 2, q.shape[-1]
    for h in range(4):
        for t in range(5):
            keys = [n for n in range(23) if mask[t, n]]
            if not keys:
                assert torch.equal(got[0, h, t], torch.zeros(D, dtype=torch.float64))
                continue
            kk, vv = k[0, h // G, keys].double(), v[0, h // G, keys].double()
            w = torch.softmax(kk @ q[0, h, t].double() * D**-0.5, 0)
            torch.testing.assert_close(got[0, h, t], w @ vv, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize(
    "T,Hq,Hkv,S,shared",
    [
        (1, 4, 2, 37, False),  # a chain level: one row, the window not a multiple of the tile
        (5, 4, 2, 70, False),
        (16, 8, 2, 100, True),  # G = 4, one mask row shared by every query row
        (3, 4, 4, 64, False),  # G = 1
        (40, 4, 2, 33, False),  # G * T = 80 rows: two row tiles
    ],
)
def test_kernel_matches_reference(T, Hq, Hkv, S, shared, dtype, tol):
    q, k, v, mask = _case(T, Hq, Hkv, S, seed=T + S, dtype=dtype, shared=shared)
    if not shared:
        mask[0] = False  # padding rows see nothing and give 0
    got = ma.masked_attention(q, k, v, mask)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), ma.masked_attention_reference(q, k, v, mask), rtol=tol, atol=tol)


@pytest.mark.parametrize("tile_rows", ["16", "32", "64"])
def test_every_row_tile_cap_gives_the_reference(tile_rows, monkeypatch):
    """LONGSPEC_MASKED_TILE_ROWS: a 16-parent level's 32 stacked rows in two tiles of 16 or one of 32, 80 rows in
    five, three or two tiles; the config follows the cap."""
    monkeypatch.setattr(ma, "TILE_ROWS", tile_rows)
    assert ma.launch_config(32, 586)[0] == min(32, int(tile_rows)) and ma.launch_config(2, 586)[0] == 16
    for T in (16, 40):
        q, k, v, mask = _case(T, 4, 2, 90, seed=T)
        got = ma.masked_attention(q, k, v, mask)
        torch.testing.assert_close(got.double(), ma.masked_attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(ma, "TILE_ROWS", "24")
    with pytest.raises(ValueError, match="LONGSPEC_MASKED_TILE_ROWS='24' is not 16, 32 or 64"):
        ma.launch_config(32, 586)


@pytest.mark.parametrize("splits", [1, 2, 4, 8])
@pytest.mark.parametrize("T,S", [(1, 37), (5, 170), (40, 33)])
def test_split_keys_merge_to_the_reference_and_leave_the_tickets_at_zero(T, S, splits):
    """Keys split over 1-8 programs (some empty when the keys run out), merged by the last one to arrive."""
    from longspec_lab.kernels.launch import tickets

    q, k, v, mask = _case(T, 4, 2, S, seed=10 * T + splits)
    mask[0] = False
    got = ma._launch(q, k, v, mask.view(torch.uint8), 16**-0.5, (16, 32, 4, 2, splits))
    torch.testing.assert_close(got.double(), ma.masked_attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert not tickets(q.device).any()


def test_head_dim_64_and_a_scale():
    q, k, v, mask = _case(4, 4, 2, 50, D=64, seed=3, p=0.3)
    mask[:, 0] = True
    got = ma.masked_attention(q, k, v, mask, scale=0.3)
    torch.testing.assert_close(
        got.double(), ma.masked_attention_reference(q, k, v, mask, scale=0.3), rtol=1e-5, atol=1e-5
    )


def test_strided_views_are_read_in_place():
    """k and v as slices of a bigger cache (the ring's first R slots), q transposed from [B, T, H, D]."""
    g = torch.Generator().manual_seed(4)
    cache_k = torch.randn(1, 2, 90, 16, generator=g)
    cache_v = torch.randn(1, 2, 90, 16, generator=g)
    q = torch.randn(1, 6, 4, 16, generator=g).transpose(1, 2)  # [1, 4, 6, 16], non-contiguous
    k, v = cache_k[:, :, :71], cache_v[:, :, :71]
    mask = torch.rand(6, 71, generator=g) < 0.6
    mask[:, 3] = True
    got = ma.masked_attention(q, k, v, mask)
    torch.testing.assert_close(got.double(), ma.masked_attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("T,S,S_tail,shared", [(16, 100, 37, True), (5, 70, 64, False), (1, 37, 5, True)])
def test_two_part_mask_is_the_concatenated_mask(T, S, S_tail, shared, splits):
    """mask [T or 1, S - S_tail] then tail_mask [T, S_tail], read where they lie (the tail a row-strided slice of
    a larger mask, as a tree level's rows of the tree mask): the reference over cat([mask, tail_mask], 1). With a
    head part of 63 keys a 32-key tile straddles the boundary."""
    q, k, v, head = _case(T, 4, 2, S - S_tail, seed=T + S + splits, shared=shared)
    k = torch.randn(1, 2, S, 16, generator=torch.Generator().manual_seed(1))
    v = torch.randn(1, 2, S, 16, generator=torch.Generator().manual_seed(2))
    big = torch.rand(T + 3, S_tail + 9, generator=torch.Generator().manual_seed(3)) < 0.5
    tail = big[2 : 2 + T, 4 : 4 + S_tail]  # row stride S_tail + 9, columns adjacent
    if not shared:
        head[0] = False  # with tail[0], a row that sees nothing: it gives 0
    tail[0] = False
    full = torch.cat([head.expand(T, -1), tail], 1)
    want = ma.masked_attention_reference(q, k, v, full)
    got = ma._launch(q, k, v, head.view(torch.uint8), 16**-0.5, (16, 32, 4, 2, splits), tail.view(torch.uint8))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if shared or splits == 4:
        return
    torch.testing.assert_close(ma.masked_attention(q, k, v, head, tail_mask=tail).double(), want, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(OP, (q, k, v, head, 0.25, tail))


def test_two_part_mask_errors_and_masked_sdpa_forms(monkeypatch):
    import longspec_lab.ops.attention as attention

    q, k, v, mask = _case(16, 4, 2, 97, seed=9)
    head, tail = mask[:1, :60], mask[:, 60:]
    with pytest.raises(ValueError, match="must be \\[16 or 1, 60\\]"):
        ma.masked_attention(q, k, v, mask, tail_mask=tail)  # the whole mask plus a tail
    with pytest.raises(ValueError, match="tail_mask shape"):
        ma.masked_attention(q, k, v, head, tail_mask=tail[:3])
    with pytest.raises(ValueError, match="2-D bool"):
        ma.masked_attention(q, k, v, head, tail_mask=tail.int())
    monkeypatch.setattr(attention, "MASKED_ATTN", "math")  # the readable form concatenates the parts
    want = attention.masked_sdpa(q, k, v, torch.cat([head.expand(16, -1), tail], 1))
    torch.testing.assert_close(attention.masked_sdpa(q, k, v, head, tail), want, rtol=0, atol=0)
    monkeypatch.setattr(attention, "MASKED_ATTN", "triton")
    torch.testing.assert_close(attention.masked_sdpa(q, k, v, head, tail), want, rtol=1e-5, atol=1e-5)


def test_op_opcheck_and_fullgraph_trace():
    q, k, v, mask = _case(3, 4, 2, 20, seed=5)
    torch.library.opcheck(OP, (q, k, v, mask, 0.25))
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def attn(q, k, v, mask):
        return ma.masked_attention(q, k, v, mask) * 2

    torch._dynamo.reset()
    got = torch.compile(attn, fullgraph=True, backend=spy)(q, k, v, mask)
    assert len(graphs) == 1 and "masked_attention" in str(graphs[0].graph)
    torch.testing.assert_close(got.double(), 2 * ma.masked_attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda q, k, v, m: (q[0], k, v, m), "4-D tensor"),
        (lambda q, k, v, m: (q, k[:, :, :-1], v, m), "must both be"),
        (lambda q, k, v, m: (q[:, :3], k, v, m), "whole groups"),
        (lambda q, k, v, m: (q, k.half(), v, m), "cast k and v"),
        (lambda q, k, v, m: (q, k, v, m.int()), "bool tensor"),
        (lambda q, k, v, m: (q, k, v, m[:, :-1]), "mask shape"),
        (lambda q, k, v, m: (q[..., :12], k[..., :12], v[..., :12], m), "power of two"),
    ],
)
def test_bad_input_errors(change, match):
    q, k, v, mask = _case(3, 4, 2, 20, seed=6)
    with pytest.raises(ValueError, match=match):
        ma.masked_attention(*change(q, k, v, mask))


def test_masked_sdpa_triton_form_equals_math_form(monkeypatch):
    """ops.attention.masked_sdpa with LONGSPEC_MASKED_ATTN=triton against its written-out form, on a tree
    level's shapes (16 rows over a ring of window + pending + scratch slots) and a chain level's one row."""
    import longspec_lab.ops.attention as attention

    for T, S, seed in ((16, 97, 7), (1, 97, 8)):
        q, k, v, mask = _case(T, 4, 2, S, seed=seed)
        mask[:, -1] = True
        monkeypatch.setattr(attention, "MASKED_ATTN", "math")
        want = attention.masked_sdpa(q, k, v, mask)
        monkeypatch.setattr(attention, "MASKED_ATTN", "triton")
        got = attention.masked_sdpa(q, k, v, mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_main_without_cuda_explains(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the benchmark")
    with pytest.raises(SystemExit) as e:
        ma.main(["--rows", "4"])
    assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("shared", [False, True])
def test_the_benchmarks_pytorch_peer_computes_the_definition(shared):
    """`_torch_version`, what `main` times the kernel against, does the same work: equal to float64 in float32."""
    q, k, v, mask = _case(6, 4, 2, 45, seed=11, shared=shared)
    mask[:, 0] = True
    want = ma.masked_attention_reference(q, k, v, mask)
    torch.testing.assert_close(ma._torch_version(q, k, v, mask).double(), want, rtol=1e-5, atol=1e-5)
