"""Triton tree attention (kernels/tree_attention.py) under the CPU interpreter, against a float64
reference, which is itself checked against a naive dense softmax(QK^T + mask)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel module's @triton.jit definitions

import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

_MOD = "longspec_lab.kernels.tree_attention"
if _MOD in sys.modules and not sys.modules[_MOD]._INTERPRET:
    importlib.reload(sys.modules[_MOD])  # imported earlier without the interpreter: redefine kernels
import longspec_lab.kernels.launch as launch  # noqa: E402
import longspec_lab.kernels.tree_attention as ta  # noqa: E402


def ancestor_mask(parents):
    """parents[i] < i (or -1 for a root) -> bool [T, T], mask[i, j] = j is i or an ancestor of i."""
    T = len(parents)
    m = torch.zeros(T, T, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    return m


def random_tree_mask(T, gen, n_pending=0):
    """n_pending causal rows, then a random tree hanging from the last pending row (or a forest)."""
    parents = [-1 if i == 0 else i - 1 for i in range(n_pending)]
    for i in range(n_pending, T):
        low = n_pending - 1 if n_pending else -1
        parents.append(int(torch.randint(low, i, (1,), generator=gen)) if i > 0 else -1)
    m = ancestor_mask(parents)
    if n_pending:
        m[n_pending:, :n_pending] = True  # tree rows see every pending row
    return m


def random_mask(T, gen):
    return (torch.rand(T, T, generator=gen) < 0.4) | torch.eye(T, dtype=torch.bool)


def naive_dense(q, k, v, plist, mask, scale):
    """softmax over all P+T keys with a dense [T, P+T] mask, float64; all-masked rows -> 0, -inf."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    outs, lses = [], []
    for b, P in enumerate(plist):
        kb = k[b, :, : P + T].double().repeat_interleave(G, 0)
        vb = v[b, :, : P + T].double().repeat_interleave(G, 0)
        full = torch.cat([torch.ones(T, P, dtype=torch.bool), mask[b]], dim=1)  # [T, P+T]
        s = (q[b].double() @ kb.transpose(-1, -2) * scale).masked_fill(~full, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
        outs.append(p @ vb)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


# (B, Hq, Hkv, T, D, prefix lengths, mask kind, num_splits)
CASES = [
    (2, 4, 2, 9, 64, [150, 37], "tree", None),
    (3, 8, 2, 12, 64, [200, 0, 77], "tree_batched", 4),
    (1, 4, 4, 7, 128, [130], "random", None),
    (2, 8, 8, 10, 128, [64, 64], "causal", 3),
    (2, 4, 1, 6, 64, [0, 0], "random", None),
    (3, 8, 4, 16, 64, [97, 255, 3], "pending_tree", 5),
    (1, 32, 8, 5, 128, [129], "pending_tree", None),
    (2, 2, 2, 1, 64, [33, 1], "causal", 2),
    (1, 4, 2, 72, 64, [100], "pending_tree", None),  # the [4,16,16,16,16] verify size
    (2, 4, 1, 40, 128, [65, 190], "tree_batched", 2),  # > 32 keys: two mask words
]


def _inputs(case_id, B, Hq, Hkv, T, D, plist, kind):
    gen = torch.Generator().manual_seed(1000 + case_id)
    S = max(plist) + T + 5
    L = 2  # cache.k[layer]-style strided views
    q = torch.randn(B, T, Hq, D, generator=gen).transpose(1, 2)  # [B, Hq, T, D], non-contiguous
    k = torch.randn(L, B, Hkv, S, D, generator=gen)[1]
    v = torch.randn(L, B, Hkv, S, D, generator=gen)[0]
    if kind == "causal":
        mask = None
    elif kind == "tree":
        mask = random_tree_mask(T, gen)
    elif kind == "random":
        mask = random_mask(T, gen)
    elif kind == "pending_tree":
        mask = random_tree_mask(T, gen, n_pending=min(4, T - 1))
    else:
        mask = torch.stack([random_tree_mask(T, gen, n_pending=b % 3) for b in range(B)])
    return q, k, v, mask


@pytest.mark.parametrize("case_id", range(len(CASES)))
def test_kernel_matches_reference(case_id):
    B, Hq, Hkv, T, D, plist, kind, num_splits = CASES[case_id]
    q, k, v, mask = _inputs(case_id, B, Hq, Hkv, T, D, plist, kind)
    prefix = torch.tensor(plist) if len(set(plist)) > 1 or case_id % 2 else plist[0]
    out = torch.full((B, Hq, T, D), float("nan"))
    lse_out = torch.full((B, Hq, T), float("nan"))
    scratch = ta.make_scratch(q, k, prefix, num_splits)
    for s in scratch:
        s.fill_(float("nan"))  # unused slots must never be read
    o, lse = ta.tree_attention(
        q, k, v, prefix, mask, return_lse=True, out=out, lse_out=lse_out, num_splits=num_splits, scratch=scratch
    )
    assert o is out and lse is lse_out
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "some output element was not written"
    ro, rlse = ta.tree_attention_reference(q, k, v, prefix, mask, return_lse=True, out_dtype=torch.float64)
    torch.testing.assert_close(o.double(), ro, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)
    o2 = ta.tree_attention(q, k, v, prefix, mask, scale=0.3)  # default buffers, other scale
    torch.testing.assert_close(
        o2.double(),
        ta.tree_attention_reference(q, k, v, prefix, mask, scale=0.3, out_dtype=torch.float64),
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize("case_id", range(len(CASES) + 1))
def test_the_overlapped_prefix_loop_is_the_same_computation(case_id, monkeypatch):
    """LONGSPEC_TREE_OVERLAP rotates the prefix loop by half a step (each tile's Q.K^T before the softmax of the tile
    before it): the same tiles, in the same order, through the same online-softmax steps. So its outputs equal the
    default loop's bit for bit, on every case of the suite and on a prefix of nine whole tiles in one split (eight
    rotated iterations), and both equal the float64 reference."""
    if case_id < len(CASES):
        B, Hq, Hkv, T, D, plist, kind, num_splits = CASES[case_id]
        q, k, v, mask = _inputs(case_id, B, Hq, Hkv, T, D, plist, kind)
    else:
        B, Hq, Hkv, T, D, plist, kind, num_splits = 1, 8, 2, 9, 64, [600], "tree", 1
        q, k, v, mask = _inputs(case_id, B, Hq, Hkv, T, D, plist, kind)
    prefix = torch.tensor(plist)
    got = {}
    for overlap in (False, True):
        monkeypatch.setattr(ta, "OVERLAP", overlap)
        got[overlap] = ta.tree_attention(q, k, v, prefix, mask, return_lse=True, num_splits=num_splits)
        assert ta.LAST_LAUNCH["overlap"] is overlap
    assert torch.equal(got[False][0], got[True][0]) and torch.equal(got[False][1], got[True][1])
    ro, rlse = ta.tree_attention_reference(q, k, v, prefix, mask, return_lse=True, out_dtype=torch.float64)
    torch.testing.assert_close(got[True][0].double(), ro, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[True][1], rlse, atol=1e-4, rtol=1e-4)


def test_many_splits_ragged_tail():
    """Prefix lengths not multiples of the tile, forced split counts, a sequence with fewer splits."""
    gen = torch.Generator().manual_seed(7)
    B, Hq, Hkv, T, D = 2, 4, 2, 6, 64
    q, k, v = (
        torch.randn(B, Hq, T, D, generator=gen),
        torch.randn(B, Hkv, 400, D, generator=gen),
        torch.randn(B, Hkv, 400, D, generator=gen),
    )
    mask = random_tree_mask(T, gen, n_pending=2)
    ref = ta.tree_attention_reference(q, k, v, torch.tensor([333, 70]), mask, out_dtype=torch.float64)
    for n in (1, 2, 7, 40):
        o = ta.tree_attention(q, k, v, torch.tensor([333, 70]), mask, num_splits=n)
        torch.testing.assert_close(o.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    ("S", "pref", "num_splits", "seed"),
    [(420, [400, 0, 97], 5, 5), (900, [880, 5, 333], 40, 11)],  # few splits; many, merged in row chunks
)
def test_fused_merge_and_merge_launch_agree(fused, S, pref, num_splits, seed, monkeypatch):
    """The last-arriving split merges (one launch) or a second launch merges: both equal the float64
    reference, with ragged prefixes (one sequence empty or nearly), and the arrival tickets are back at 0
    afterwards. With 40 asked splits the merge reads 32-split tiles of a few rows (MERGE_R < the 14 packed
    rows, so the fused merge loops over row chunks)."""
    monkeypatch.setattr(ta, "FUSED_MERGE", fused)
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, T, D = 3, 4, 2, 7, 64
    q = torch.randn(B, Hq, T, D, generator=gen)
    k, v = torch.randn(B, Hkv, S, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
    mask = random_tree_mask(T, gen, n_pending=2)
    pref = torch.tensor(pref)
    for _ in range(2):  # a second call starts from the tickets the first one left
        o, lse = ta.tree_attention(q, k, v, pref, mask, return_lse=True, num_splits=num_splits)
        assert ta.LAST_LAUNCH["n_splits"] > 1 and ta.LAST_LAUNCH["fused_merge"] is fused
        ro, rlse = ta.tree_attention_reference(q, k, v, pref, mask, return_lse=True, out_dtype=torch.float64)
        torch.testing.assert_close(o.double(), ro, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)
    if num_splits > 16:
        merge_s, merge_r = ta.LAST_LAUNCH["merge_tile"]
        assert ta.LAST_LAUNCH["n_splits"] > 16 and merge_s == 32 and merge_r < 2 * T
    assert all(int(t.abs().sum()) == 0 for t in launch._TICKETS.values())


@pytest.mark.parametrize(
    ("n_splits", "rows", "d"), [(1, 1, 64), (5, 14, 64), (16, 288, 128), (64, 2, 128), (40, 144, 64)]
)
def test_merge_tile_fits_every_split(n_splits, rows, d):
    merge_s, merge_r = ta.merge_tile(n_splits, rows, d)
    assert merge_s >= n_splits and merge_s & (merge_s - 1) == 0 and merge_s < 2 * max(n_splits, 1)
    assert 2 <= merge_r <= 16 and merge_r & (merge_r - 1) == 0
    assert merge_r == 2 or merge_s * merge_r * d <= ta._MERGE_ELEMS


def test_merge_plan_loops_for_several_row_tiles_and_few_splits(monkeypatch):
    monkeypatch.setattr(ta, "LOOP_MERGE", "auto")
    assert ta.merge_plan(4, 288, 128, row_tiles=5) == (True, 1, 16)
    assert ta.merge_plan(4, 8, 64, row_tiles=1) == (False, *ta.merge_tile(4, 8, 64))  # one tile: vector
    assert not ta.merge_plan(ta._LOOP_MERGE_MAX_SPLITS + 1, 288, 128, row_tiles=5)[0]  # many splits: vector
    monkeypatch.setattr(ta, "LOOP_MERGE", "1")
    assert ta.merge_plan(40, 2, 64, row_tiles=1) == (True, 1, 2)
    monkeypatch.setattr(ta, "LOOP_MERGE", "yes")
    with pytest.raises(ValueError, match="LONGSPEC_LOOP_MERGE='yes'"):
        ta.merge_plan(4, 8, 64, row_tiles=1)


@pytest.mark.parametrize("loop", ["0", "1"])
@pytest.mark.parametrize(("pref", "num_splits"), [([150], 3), ([0, 37, 150], 7), ([150, 150, 1], 40)])
def test_both_merge_forms_equal_the_reference(monkeypatch, loop, pref, num_splits):
    """The split-by-split merge and the all-splits-at-once merge, forced, on ragged prefixes (empty, short,
    one split used of many): both equal the float64 reference, output and LSE."""
    monkeypatch.setattr(ta, "LOOP_MERGE", loop)
    monkeypatch.setattr(ta, "FUSED_MERGE", False)
    gen = torch.Generator().manual_seed(11 + num_splits)
    B, Hq, Hkv, T, D = len(pref), 4, 2, 6, 64
    q = torch.randn(B, Hq, T, D, generator=gen)
    k, v = torch.randn(B, Hkv, 160, D, generator=gen), torch.randn(B, Hkv, 160, D, generator=gen)
    mask = random_tree_mask(T, gen, n_pending=2)
    pref = torch.tensor(pref)
    o, lse = ta.tree_attention(q, k, v, pref, mask, return_lse=True, num_splits=num_splits, max_prefix=150)
    assert ta.LAST_LAUNCH["n_splits"] > 1 and ta.LAST_LAUNCH["loop_merge"] is (loop == "1")
    ro, rlse = ta.tree_attention_reference(q, k, v, pref, mask, return_lse=True, out_dtype=torch.float64)
    torch.testing.assert_close(o.double(), ro, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)


def test_several_row_tiles_merge_in_a_second_launch(monkeypatch):
    """The fused merge, when asked for, is for one row tile (decode, draft levels); a pass whose rows span
    several tiles merges in the second launch, and still equals the reference (int64 device lengths)."""
    monkeypatch.setattr(ta, "FUSED_MERGE", True)
    gen = torch.Generator().manual_seed(9)
    B, Hq, Hkv, T, D = 1, 8, 1, 20, 64  # 160 packed rows: two row tiles under the interpreter
    q = torch.randn(B, Hq, T, D, generator=gen)
    k, v = torch.randn(B, Hkv, 200, D, generator=gen), torch.randn(B, Hkv, 200, D, generator=gen)
    mask = random_tree_mask(T, gen, n_pending=2)
    pref = torch.tensor([150])
    o = ta.tree_attention(q, k, v, pref, mask, max_prefix=200 - T)
    assert ta.LAST_LAUNCH["grid"][0] == 2 and ta.LAST_LAUNCH["n_splits"] > 1
    assert ta.FUSED_MERGE and not ta.LAST_LAUNCH["fused_merge"]
    ref = ta.tree_attention_reference(q, k, v, pref, mask, out_dtype=torch.float64)
    torch.testing.assert_close(o.double(), ref, atol=1e-4, rtol=1e-4)


def test_device_prefix_lengths_with_max_prefix():
    """CUDA-graph mode: lengths stay in a tensor, splits are planned for an upper bound."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, T, D = 2, 8, 2, 9, 64
    q = torch.randn(B, Hq, T, D, generator=gen)
    k, v = torch.randn(B, Hkv, 300, D, generator=gen), torch.randn(B, Hkv, 300, D, generator=gen)
    mask = random_tree_mask(T, gen, n_pending=3)
    for lens in ([0, 0], [5, 250], [291, 17]):
        pref = torch.tensor(lens)
        o, lse = ta.tree_attention(q, k, v, pref, mask, return_lse=True, max_prefix=300 - T)
        ro, rlse = ta.tree_attention_reference(q, k, v, pref, mask, return_lse=True, out_dtype=torch.float64)
        torch.testing.assert_close(o.double(), ro, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="integer tensor"):
        ta.tree_attention(q, k, v, 5, mask, max_prefix=200)


def test_empty_rows_give_zero_and_minus_inf():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(1, 2, 4, 64, generator=gen),
        torch.randn(1, 1, 8, 64, generator=gen),
        torch.randn(1, 1, 8, 64, generator=gen),
    )
    mask = torch.eye(4, dtype=torch.bool)
    mask[2, 2] = False  # row 2 sees nothing when P = 0
    o, lse = ta.tree_attention(q, k, v, 0, mask, return_lse=True)
    ro, rlse = ta.tree_attention_reference(q, k, v, 0, mask, return_lse=True)
    assert torch.all(o[:, :, 2] == 0) and torch.all(torch.isneginf(lse[:, :, 2]))
    assert torch.all(ro[:, :, 2] == 0) and torch.all(torch.isneginf(rlse[:, :, 2]))
    torch.testing.assert_close(o, ro, atol=1e-4, rtol=1e-4)
    o, lse = ta.tree_attention(q, k, v, 3, mask, return_lse=True)  # with a prefix the row is not empty
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(o, ta.tree_attention_reference(q, k, v, 3, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_naive_dense(seed):
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, G, T, D = 2, 2, 1 + seed % 3, 5 + seed, 64
    plist = [int(torch.randint(0, 40, (1,), generator=gen)) for _ in range(B)]
    plist[seed % 2] = 0 if seed < 2 else plist[seed % 2]
    q = torch.randn(B, Hkv * G, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, 50, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, 50, D, generator=gen, dtype=torch.float64)
    mask = torch.stack([random_mask(T, gen), random_tree_mask(T, gen, n_pending=2)])
    mask[0, 1] = False  # an empty row (all-masked when P = 0)
    scale = 1 / math.sqrt(D) * (0.5 + seed)
    ro, rlse = ta.tree_attention_reference(q, k, v, torch.tensor(plist), mask, scale, return_lse=True)
    no, nlse = naive_dense(q, k, v, plist, mask, scale)
    torch.testing.assert_close(ro, no, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(rlse.double(), nlse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 31, 32, 33, 72, 130])
def test_pack_block_mask(T):
    gen = torch.Generator().manual_seed(T)
    m = torch.rand(2, T, T, generator=gen) < 0.5
    packed = ta.pack_block_mask(m)
    assert packed.dtype == torch.int32 and packed.shape[2] % 4 == 0 and packed.shape[2] * 32 >= T
    bits = (packed.to(torch.int64)[..., None] >> torch.arange(32)) & 1  # [2, T, W, 32]
    unpacked = bits.flatten(2)[..., :T].bool()
    assert torch.equal(unpacked, m) and not bits.flatten(2)[..., T:].any()
    m[0, 0, 0] = ~m[0, 0, 0]  # in-place edit must invalidate the cache
    assert torch.equal(
        ((ta.pack_block_mask(m).to(torch.int64)[..., None] >> torch.arange(32)) & 1).flatten(2)[..., :T].bool(), m
    )


def test_plan_splits_covers_prefix():
    for p in (1, 15, 16, 17, 1000, 65536):
        for forced in (None, 1, 3, 50):
            n, L = ta.plan_splits(p, 40, 4, "cpu", forced)
            assert n >= 1 and n * L >= p and (n - 1) * L < p and L % 16 == 0
    assert ta.plan_splits(0, 40, 4, "cpu") == (1, 16)


def _good():
    q = torch.randn(1, 4, 3, 64)
    k = torch.randn(1, 2, 10, 64)
    return q, k, k.clone()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v: (q[0], k, v, 2, None), "4-D"),
        (lambda q, k, v: (q, k[:, :, :, :32], v[:, :, :, :32], 2, None), "k .* and v"),
        (lambda q, k, v: (q.half(), k, v, 2, None), "dtype"),
        (
            lambda q, k, v: (q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3], 2, None),
            "multiple of kv heads",
        ),
        (
            lambda q, k, v: (torch.randn(1, 4, 3, 32), torch.randn(1, 2, 10, 32), torch.randn(1, 2, 10, 32), 2, None),
            "head dim 32",
        ),
        (lambda q, k, v: (q, k, v, 8, None), "grow the cache"),
        (lambda q, k, v: (q, k, v, -1, None), "prefix_lens"),
        (lambda q, k, v: (q, k, v, torch.tensor([1, 2]), None), "one committed length"),
        (lambda q, k, v: (q, k, v, 2.0, None), "prefix_lens must be an int"),
        (lambda q, k, v: (q, k, v, 2, torch.ones(3, 3)), "bool"),
        (lambda q, k, v: (q, k, v, 2, torch.ones(4, 4, dtype=torch.bool)), r"\[T, T\]"),
    ],
)
def test_bad_inputs_raise_value_error(mutate, match):
    args = mutate(*_good())
    with pytest.raises(ValueError, match=match):
        ta.tree_attention(*args)


def test_bad_buffers_and_backend_errors(monkeypatch):
    q, k, v = _good()
    with pytest.raises(ValueError, match="out must be"):
        ta.tree_attention(q, k, v, 2, out=torch.empty(1, 4, 3, 32))
    with pytest.raises(ValueError, match="scratch"):
        ta.tree_attention(q, k, v, 2, scratch=(torch.empty(1), torch.empty(1)))
    monkeypatch.setattr(ta, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ta.tree_attention(q, k, v, 2)


def test_bench_quick_dry_run(tmp_path):
    from longspec_lab.kernels import bench_tree_attention as bench

    out = tmp_path / "r.json"
    res = bench.main(["--quick", "--out", str(out), "--plot", str(tmp_path / "r.png")])
    data = json.loads(out.read_text())
    assert data.pop("schema_version") == data["environment"]["schema_version"]
    assert data == json.loads(json.dumps(res, default=str))
    assert data["complete"] and data["cases"] and data["plot"]["format"] in ("png", "html", "svg")
    assert os.path.exists(data["plot"]["path"])
    for case in data["cases"]:
        assert case["methods"]["triton_tree"]["max_rel_err"] < 1e-4
        assert case["methods"]["sdpa_dense"]["max_rel_err"] < 1e-4
        assert case["methods"]["triton_fused_merge"]["max_rel_err"] < 1e-4


def test_bench_plot_svg_fallback(tmp_path, monkeypatch):
    """Without plotly (the GPU image has none) the bench writes a valid hand-made SVG."""
    import xml.dom.minidom

    from longspec_lab.kernels import bench_tree_attention as bench

    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    cases = [
        {
            "name": "x",
            "dtype": "fp16",
            "T": 72,
            "P": p,
            "floor_us": p / 100,
            "compute_floor_us": p / 70,
            "methods": {"triton_tree": {"us": p / 50}, "sdpa_dense": {"us": p}},
        }
        for p in (1024, 4096, 65536)
    ]
    plot = bench.write_plot(str(tmp_path / "p.png"), cases)
    assert plot["format"] == "svg" and plot["path"].endswith(".svg")
    doc = xml.dom.minidom.parse(plot["path"])
    assert len(doc.getElementsByTagName("polyline")) == 4


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_tile_paths_gqa_head_dims_ragged(G, D, overlap, monkeypatch):
    """GQA 1/2/4/8 packed into the row tiles, head dims 64 and 128, ragged prefixes with a 0, through
    tensor-descriptor (TMA) loads or plain loads, one split (output written directly) or several (merge), with the
    default prefix loop and the overlapped one (LONGSPEC_TREE_OVERLAP). Cache slots past each sequence's P + T are
    NaN: no path may read them into the result."""
    tma = (G + D // 64) % 2 == 0
    num_splits = 1 if G in (1, 4) else 3
    monkeypatch.setattr(ta, "USE_TMA_LOADS", tma)
    monkeypatch.setattr(ta, "OVERLAP", overlap)
    gen = torch.Generator().manual_seed(100 * G + D)
    B, Hkv, T = 3, 2, 17 if G == 8 else 6 + G  # G = 8: 136 packed rows, two row tiles
    plist = [0, 37, 90]
    S = max(plist) + T + 7
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    for b, p in enumerate(plist):
        k[b, :, p + T :] = float("nan")
        v[b, :, p + T :] = float("nan")
    mask = torch.stack([random_tree_mask(T, gen, n_pending=1 + b) for b in range(B)])
    pref = torch.tensor(plist)
    o, lse = ta.tree_attention(q, k, v, pref, mask, return_lse=True, num_splits=num_splits)
    assert ta.LAST_LAUNCH["n_splits"] == num_splits and ta.LAST_LAUNCH["tma_ok"]
    ro, rlse = ta.tree_attention_reference(
        q, k.nan_to_num(0.0), v.nan_to_num(0.0), pref, mask, return_lse=True, out_dtype=torch.float64
    )
    torch.testing.assert_close(o.double(), ro, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)


def test_unaligned_cache_view_uses_plain_loads():
    """A K/V view whose rows are not 16-byte aligned cannot be read through a tensor descriptor: the host
    falls back to plain loads, with the same result."""
    gen = torch.Generator().manual_seed(21)
    B, Hq, Hkv, T, D, P = 1, 4, 2, 5, 64, 50
    q = torch.randn(B, Hq, T, D, generator=gen)
    big = torch.randn(B, Hkv, P + T, D + 1, generator=gen)
    k, v = big[..., 1:], big[..., :-1]  # row stride D + 1 floats: not a multiple of 16 bytes
    mask = random_tree_mask(T, gen, n_pending=2)
    o = ta.tree_attention(q, k, v, P, mask)
    assert not ta.LAST_LAUNCH["tma_ok"]
    torch.testing.assert_close(
        o.double(), ta.tree_attention_reference(q, k, v, P, mask, out_dtype=torch.float64), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(("split_len", "block_m"), [(128, 64), (256, 64), (257, 64), (4096, 128)])
def test_autotune_prune_drops_wide_tiles_for_short_splits(split_len, block_m):
    """The pruning rule against a brute-force filter of the Hopper configs: no 8-warp config for 64-row tiles,
    and no 128-key tile when a split has at most _SHORT_SPLIT keys; never an empty list."""
    kept = ta._prune(ta._HOPPER_CONFIGS, {"split_len": split_len}, BLOCK_M=block_m)
    expect = [
        c
        for c in ta._HOPPER_CONFIGS
        if not (block_m == 64 and c.num_warps == 8)
        and not (split_len <= ta._SHORT_SPLIT and c.kwargs["BLOCK_N"] == 128)
    ]
    assert kept == expect and kept


@pytest.mark.parametrize("split", ["on", "off"])
@pytest.mark.parametrize("causal, loop", [(False, "1"), (False, "0"), (True, "auto")])
def test_tree_in_programs_of_its_own_equals_the_reference(split, causal, loop, monkeypatch):
    """LONGSPEC_TREE_SPLIT: the tree keys attended by programs of their own, their partial merged after the prefix
    splits' (both merge forms), against the float64 reference and against the tree fused into the last split;
    ragged prefixes with a 0 (the tree's partial alone), slots past P + T poisoned with NaN."""
    monkeypatch.setattr(ta, "TREE_SPLIT", split)
    monkeypatch.setattr(ta, "LOOP_MERGE", loop)
    gen = torch.Generator().manual_seed(7 + causal)
    B, Hq, Hkv, T, D = 3, 4, 2, 9, 64
    plist = [0, 45, 130]
    S = max(plist) + T + 5
    q = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    for b, p in enumerate(plist):
        k[b, :, p + T :] = float("nan")
        v[b, :, p + T :] = float("nan")
    mask = None if causal else torch.stack([random_tree_mask(T, gen, n_pending=2) for _ in range(B)])
    pref = torch.tensor(plist)
    o, lse = ta.tree_attention(q, k, v, pref, mask, return_lse=True, num_splits=3)
    assert ta.LAST_LAUNCH["tree_split"] == (split == "on") and ta.LAST_LAUNCH["n_splits"] == 3
    ro, rlse = ta.tree_attention_reference(
        q, k.nan_to_num(0.0), v.nan_to_num(0.0), pref, mask, return_lse=True, out_dtype=torch.float64
    )
    torch.testing.assert_close(o.double(), ro, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)
    o2, _ = ta.tree_attention_packed(q, k, v, pref, None if causal else ta._pack_bits(mask), S - T)  # device lengths
    torch.testing.assert_close(o2.double(), ro, atol=1e-4, rtol=1e-4)


def test_wide_gives_one_big_row_tile_its_tree_programs_and_equals_the_reference(monkeypatch):
    """LONGSPEC_TREE_SPLIT=wide on a 36-node tree (72 packed rows, one row tile): the tree keys get programs of their
    own, and the output equals the float64 reference and the auto plan's (the tree in the last split)."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, T, D = 1, 4, 2, 36, 64
    P = 150
    q = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, P + T, D, generator=gen)
    v = torch.randn(B, Hkv, P + T, D, generator=gen)
    mask = random_tree_mask(T, gen)[None]
    pref = torch.tensor([P])
    outs = {}
    for split in ("auto", "wide"):
        monkeypatch.setattr(ta, "TREE_SPLIT", split)
        outs[split] = ta.tree_attention(q, k, v, pref, mask, num_splits=2)
        assert ta.LAST_LAUNCH["tree_split"] == (split == "wide")
    ref = ta.tree_attention_reference(q, k, v, pref, mask, out_dtype=torch.float64)
    for o in outs.values():
        torch.testing.assert_close(o.double(), ref, atol=1e-4, rtol=1e-4)


def test_row_tile_rule_tiles_33_to_64_node_trees_in_two_tiles_of_64(monkeypatch):
    """LONGSPEC_ROW_TILE_RULE=small (the default): 65-128 packed rows (a 33-64-node tree's verify) take two row tiles
    of 64, so auto gives the tree keys programs of their own; "padding" keeps the least padding (one tile of 128);
    passes of up to 64 rows and past 128 are tiled as before; a bad value is named."""
    monkeypatch.setattr(ta, "_INTERPRET", False)  # the GPU rule (the interpreter takes one tile of the rows)
    monkeypatch.delenv("LONGSPEC_BLOCK_M", raising=False)
    monkeypatch.setattr(ta, "TREE_SPLIT", "auto")
    monkeypatch.setattr(ta, "ROW_TILE_RULE", "small")
    assert [ta._pick_block_m(r) for r in (2, 64, 65, 76, 106, 128, 138, 210)] == [64, 64, 64, 64, 64, 64, 64, 128]
    assert ta.tree_split_applies(76, ta._pick_block_m(76), False)
    monkeypatch.setattr(ta, "ROW_TILE_RULE", "padding")
    assert [ta._pick_block_m(r) for r in (2, 64, 65, 76, 106, 128, 138, 210)] == [64, 64, 128, 128, 128, 128, 64, 128]
    assert not ta.tree_split_applies(76, ta._pick_block_m(76), False)
    monkeypatch.setattr(ta, "ROW_TILE_RULE", "fewest")
    with pytest.raises(ValueError, match="LONGSPEC_ROW_TILE_RULE='fewest' is not one of small, padding"):
        ta._pick_block_m(76)


@pytest.mark.parametrize("block_m", ["16", "32"])
def test_forced_small_row_tiles_give_the_reference(monkeypatch, block_m):
    """LONGSPEC_BLOCK_M=16 or 32 (the row tiles the GPU rule never picks; `gpu_jobs --only e2e_block_m_16` times them):
    a 20-node verify's 40 packed rows in 3 or 2 row tiles, with the tree's own programs, equal the float64 reference
    and the rule's own tile."""
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, T, D, P = 1, 4, 2, 20, 64, 130
    q = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, P + T, D, generator=gen)
    v = torch.randn(B, Hkv, P + T, D, generator=gen)
    mask = random_tree_mask(T, gen, n_pending=2)[None]
    pref = torch.tensor([P])
    monkeypatch.setattr(ta, "TREE_SPLIT", "auto")
    monkeypatch.delenv("LONGSPEC_BLOCK_M", raising=False)
    rule = ta.tree_attention(q, k, v, pref, mask, num_splits=2)
    assert ta.LAST_LAUNCH["BLOCK_M"] == 64
    monkeypatch.setenv("LONGSPEC_BLOCK_M", block_m)
    o = ta.tree_attention(q, k, v, pref, mask, num_splits=2)
    assert ta.LAST_LAUNCH["BLOCK_M"] == int(block_m) and ta.LAST_LAUNCH["tree_split"]  # several row tiles
    ref = ta.tree_attention_reference(q, k, v, pref, mask, out_dtype=torch.float64)
    torch.testing.assert_close(o.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o, rule, atol=1e-5, rtol=1e-5)


def test_forced_row_tile_must_be_one_the_kernel_takes(monkeypatch):
    monkeypatch.setenv("LONGSPEC_BLOCK_M", "24")
    with pytest.raises(ValueError, match=r"LONGSPEC_BLOCK_M='24' is not a row tile \(16, 32, 64, 128\); unset it"):
        ta._pick_block_m(40)
    monkeypatch.setenv("LONGSPEC_BLOCK_M", "32")
    assert ta._pick_block_m(2) == 32


def test_tree_split_switch_auto_and_bad_value(monkeypatch):
    """ "auto": programs of its own only when the packed rows need several row tiles; "wide": also one tile of more than
    64 rows; an unknown value is named."""
    monkeypatch.setattr(ta, "TREE_SPLIT", "auto")
    assert ta.tree_split_applies(138, 64, False) and not ta.tree_split_applies(2, 64, False)
    assert not ta.tree_split_applies(138, 64, True)  # prefix only: there is no tree
    # a 38-node tree's verify: 76 packed rows in one tile of 128 (LONGSPEC_ROW_TILE_RULE=padding) -> the tree stays
    # in the last split under auto
    assert not ta.tree_split_applies(76, 128, False)
    monkeypatch.setattr(ta, "TREE_SPLIT", "wide")  # ... and gets programs of its own under wide
    assert ta.tree_split_applies(76, 128, False) and ta.tree_split_applies(138, 64, False)
    assert not ta.tree_split_applies(64, 64, False) and not ta.tree_split_applies(12, 64, False)  # chains, narrow
    assert not ta.tree_split_applies(76, 128, True)
    monkeypatch.setattr(ta, "TREE_SPLIT", "sometimes")
    with pytest.raises(ValueError, match="LONGSPEC_TREE_SPLIT='sometimes' is not one of auto, wide, on, off"):
        ta.tree_split_applies(138, 64, False)


def test_row_tile_splits_bound_the_plan_of_several_row_tiles_only(monkeypatch):
    """LONGSPEC_ROW_TILE_SPLITS caps a multi-row-tile pass's splits (the verification's); one-tile passes keep
    their own table entry; a bad value or config is named with its fix."""
    monkeypatch.setattr(ta, "_sm_count", lambda device: 132)  # an H100's programs, so the cap is what binds
    rows, bm = 144, 64  # three row tiles of 64, as the default tree's verify
    monkeypatch.setattr(ta, "ROW_TILE_SPLITS", "")
    default, _ = ta.plan_splits(2700, rows, 2, "cpu", block_m=bm)
    one_tile = ta.plan_splits(2700, 8, 2, "cpu", block_m=bm)  # 16 stacked rows: one row tile
    for most in ("2", "5", "32"):
        monkeypatch.setattr(ta, "ROW_TILE_SPLITS", most)
        n, length = ta.plan_splits(2700, rows, 2, "cpu", block_m=bm)
        assert n <= int(most) and n * length >= 2700 and (n - 1) * length < 2700
        assert ta.plan_splits(2700, 8, 2, "cpu", block_m=bm) == one_tile
    monkeypatch.setattr(ta, "ROW_TILE_SPLITS", "2")
    assert ta.plan_splits(2700, rows, 2, "cpu", block_m=bm)[0] == 2 < default
    monkeypatch.setattr(ta, "ROW_TILE_SPLITS", "0")
    with pytest.raises(ValueError, match="LONGSPEC_ROW_TILE_SPLITS='0' is not a count from 1 to 64"):
        ta.plan_splits(2700, rows, 2, "cpu", block_m=bm)
    with pytest.raises(ValueError, match="LONGSPEC_ROW_TILE_CONFIG='32:4' is not BLOCK_N:warps:stages"):
        ta._row_tile_kernel("32:4")
    assert ta._row_tile_kernel("32:4:2").configs[0].kwargs["BLOCK_N"] == 32
