"""A beam level's LM head and selection in one launch (kernels/head_select.py), in Triton's CPU interpreter: the pairs
it picks against float64 scores of the same rounded logits (brute force), its keys against `beam_select` on the head's
logits, over dtypes (float32, and float16: the interpreter has no bfloat16 matmul), level shapes (one parent, the
default tree's 16 x 16, widths that are not powers of two, a width of every pair, V = 1, V not a multiple of the
chunk, one row holding every pick), both selections; ties; the ticket left at zero; the registered op's fake version
and a fullgraph trace; the errors; and the switch LONGSPEC_HEAD_SELECT from ops.topk.head_beam_keys to
beam_level_from_hidden (the whole greedy decode with it is test_beam_select.py's, beside the other switch)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel modules' @triton.jit definitions

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

for _name in (
    "longspec_lab.kernels.tree_attention",
    "longspec_lab.kernels.row_topk",
    "longspec_lab.kernels.beam_select",
):
    if _name in sys.modules and not sys.modules[_name]._INTERPRET:
        importlib.reload(sys.modules[_name])  # imported earlier without the interpreter: redefine the kernels
from test_beam_select import _decoded, _exact_pairs  # noqa: E402  (float64 pairs and decoded keys: the same checks)

import longspec_lab.kernels.beam_select as bs  # noqa: E402
import longspec_lab.kernels.head_select as hs  # noqa: E402
import longspec_lab.kernels.row_topk as rt  # noqa: E402
from longspec_lab.kernels.launch import tickets  # noqa: E402
from longspec_lab.ops import topk as ops_topk  # noqa: E402
from longspec_lab.spec import draft  # noqa: E402

OP = torch.ops.longspec.head_select.default


def _level(n, V, K, seed, dtype=torch.float32, spread=3.0):
    """Hidden rows [n, K], a head [V, K] whose logits spread about `spread`, descending parent scores [n] <= 0."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, K, generator=g).to(dtype)
    head = (torch.randn(V, K, generator=g) * spread * K**-0.5).to(dtype)
    scores = -(torch.rand(n, generator=g) * 4).sort(descending=True).values
    return h, head, scores


CASES = [  # n, V, K, w, block_v (None: the default, 128 tokens a program)
    (1, 4096, 256, 4, None),  # level 1 of the default tree: 32 programs, one row
    (16, 4096, 256, 16, None),  # a default-tree level: 8,192 candidates for the last program
    (4, 1000, 64, 6, 32),  # the tuner's width 6, V not a multiple of the chunk
    (3, 300, 48, 5, 16),  # 19 chunks a row
    (2, 37, 32, 74, None),  # every pair: each row keeps all of its 37 tokens
    (3, 1, 16, 2, None),  # V = 1
    (5, 50, 40, 1, 16),  # w = 1 (a chain level)
]
# (the atol of a score, the gap above which the order must match): float16 logits round to 2^-11 of their size
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-5, 1e-4)}
RUNS = [(*c, dt, "max") for c in CASES for dt in (torch.float32, torch.float16)] + [
    (4, 1000, 64, 6, 32, torch.float16, "bitonic"),
    (2, 37, 32, 74, None, torch.float32, "bitonic"),
    (3, 300, 48, 5, 16, torch.float32, "bitonic"),
]


@pytest.mark.parametrize("n, V, K, w, block_v, dtype, algo", RUNS)
def test_kernel_picks_the_float64_pairs_and_beam_selects_keys(n, V, K, w, block_v, dtype, algo, monkeypatch):
    monkeypatch.setattr(rt, "TOPK_ALGO", algo)
    h, head, scores = _level(n, V, K, seed=n * 7919 + V + w, dtype=dtype)
    got = hs.head_select(h, head, scores, w, block_v)
    assert got.dtype == torch.int64 and got.shape == (w,)
    logits = F.linear(h, head)  # [n, V] rounded to the dtype, as the LM head's output
    idx, score = _decoded(got, n, V)
    want_idx, want_score, gap = _exact_pairs(logits, scores, w)
    atol, sep = TOL[dtype]
    torch.testing.assert_close(score.double(), want_score, rtol=0, atol=atol)
    if gap > sep:
        assert torch.equal(idx, want_idx)
    two = bs.beam_select(logits, scores, w)  # the two launches it replaces: the head's logits, then the selection
    two_idx, two_score = _decoded(two, n, V)
    assert torch.equal(idx, two_idx) or gap <= sep
    torch.testing.assert_close(score, two_score, rtol=0, atol=atol)


def test_reference_is_beam_level_on_the_heads_log_probs():
    """head_select_reference equals spec/draft.py's beam_level on log_softmax(F.linear(h, head)), bit for bit."""
    for n, V, K, w in [(1, 4096, 256, 4), (16, 4096, 256, 16), (4, 100, 32, 9)]:
        h, head, scores = _level(n, V, K, seed=V + w)
        rank, tok, sc = draft.beam_level(scores, torch.log_softmax(F.linear(h, head), -1), w)
        r2, t2, s2 = draft._decode_keys(hs.head_select_reference(h, head, scores, w), n, V)
        assert torch.equal(rank, r2) and torch.equal(tok, t2) and torch.equal(sc, s2)


def test_ties_keep_the_lower_flat_index_first():
    """A head of equal rows gives every token of a row the same logit; with equal parents the kernel's order is the
    flat index order, as beam_level's, across chunks and rows."""
    h = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    head = torch.ones(64, 32)
    got = hs.head_select(h, head, torch.zeros(2), 10, 16)
    idx, score = _decoded(got, 2, 64)
    assert idx.tolist() == list(range(10))
    torch.testing.assert_close(score, torch.full((10,), -torch.log(torch.tensor(64.0)).item()), rtol=0, atol=1e-6)


def test_one_row_takes_every_pick_and_its_best_tokens_share_a_chunk():
    """Row 2's parent is far ahead and its 12 best tokens sit in one 16-token chunk: the level is those 12 and the
    next 4 of that row, so each chunk must keep w keys a row, and the last program w a row."""
    n, V, K, w = 4, 256, 32, 16
    h, head, scores = _level(n, V, K, seed=31)
    scores[2] = 0.0
    scores[[0, 1, 3]] = -50.0
    head[40:52] = h[2] * (0.3 - 0.01 * torch.arange(12.0))[:, None]  # row 2's logits 0.3 |h|^2 down, 0.01 |h|^2 apart
    got = hs.head_select(h, head, scores, w, 16)
    idx, _ = _decoded(got, n, V)
    want_idx, _, _ = _exact_pairs(F.linear(h, head), scores, w)
    assert torch.equal(idx, want_idx)
    assert set(range(2 * V + 40, 2 * V + 52)) <= set(idx.tolist()) and (idx // V == 2).all()


def test_strided_inputs_are_read_as_their_values():
    """Hidden rows taken every other row and a head with a column stride give the contiguous copies' keys."""
    h, head, scores = _level(6, 300, 32, seed=23)
    got = hs.head_select(h[::2], head.t().contiguous().t(), scores[::2].contiguous(), 6, 64)
    assert torch.equal(got, hs.head_select(h[::2].contiguous(), head, scores[::2].contiguous(), 6, 64))


def test_the_ticket_is_back_at_zero_and_a_second_launch_agrees():
    h, head, scores = _level(4, 500, 32, seed=9)
    first = hs.head_select(h, head, scores, 8, 64)
    assert int(tickets(h.device)[0]) == 0
    assert torch.equal(hs.head_select(h, head, scores, 8, 64), first)
    assert int(tickets(h.device)[0]) == 0


def test_op_opcheck_and_fullgraph_trace():
    h, head, scores = _level(3, 200, 32, seed=11)
    torch.library.opcheck(OP, (h, head, scores, 5, 64, 4))
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda x, w, s: hs.head_select(x, w, s, 5, 64), fullgraph=True, backend=spy)
    got = fn(h, head, scores)
    assert len(graphs) == 1
    assert OP in [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.equal(got, hs.head_select(h, head, scores, 5, 64))


def test_bad_input_errors(monkeypatch):
    h, head, scores = _level(2, 40, 16, seed=13)
    with pytest.raises(ValueError, match=r"hidden rows h \[n, K\] in float16, bfloat16 or float32"):
        hs.head_select(h[0], head, scores, 3)
    with pytest.raises(ValueError, match=r"hidden rows h \[n, K\]"):
        hs.head_select(h.double(), head, scores, 3)
    with pytest.raises(ValueError, match=r"the LM head \[V, 16\] in h's dtype"):
        hs.head_select(h, head[:, :8], scores, 3)
    with pytest.raises(ValueError, match=r"the LM head \[V, 16\] in h's dtype"):
        hs.head_select(h, head.half(), scores, 3)
    with pytest.raises(ValueError, match=r"parent_scores \[n\] = \[2\]"):
        hs.head_select(h, head, scores[:1], 3)
    with pytest.raises(ValueError, match="float32 parent_scores"):
        hs.head_select(h, head, scores.double(), 3)
    for w in (0, 81, 2.0, True):
        with pytest.raises(ValueError, match=r"integer width in \[1, n \* V\] = \[1, 80\]"):
            hs.head_select(h, head, scores, w)
    with pytest.raises(ValueError, match="1, 2, 4 or 8 warps"):
        hs.head_select(h, head, scores, 3, num_warps=3)
    wide, wide_head, wide_scores = _level(2, 40, hs.MAX_FEATURES + 1, seed=1)
    with pytest.raises(ValueError, match="head_select_reference"):
        hs.head_select(wide, wide_head, wide_scores, 3)
    monkeypatch.setattr(hs, "_INTERPRET", False)  # as on a machine without TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match="pass CUDA tensors, or set TRITON_INTERPRET=1"):
        hs.head_select(h, head, scores, 3)


def test_plan_keeps_w_a_row_and_refuses_what_the_last_program_cannot_hold():
    p = hs.plan(16, 4096, 256, 16)
    assert (p["block_v"], p["n_chunks"], p["kept"], p["n_pad"], p["candidates"]) == (128, 32, 16, 16, 8192)
    assert p["fits"]
    assert hs.plan(1, 4096, 256, 1)["kept"] == 1
    assert hs.plan(2, 37, 32, 74)["kept"] == 64  # a chunk of 64 (V rounded up) keeps all of its tokens
    assert not hs.plan(32, 4096, 256, 16)["fits"]  # 32 rows x 32 chunks x 16 = 16,384 candidates
    assert hs.plan(32, 4096, 256, 16, 256)["fits"]  # wider chunks: 8,192
    assert not hs.plan(hs.MAX_ROWS + 1, 64, 32, 1)["fits"]


# ----------------------------------------------------------------------------- the switch


def test_head_beam_keys_follows_the_switch(monkeypatch):
    h, head, scores = _level(4, 300, 32, seed=17)
    monkeypatch.setattr(ops_topk, "HEAD_SELECT", "off")
    assert ops_topk.head_beam_keys(h, head, scores, 6) is None
    monkeypatch.setattr(ops_topk, "HEAD_SELECT", "auto")  # the CPU: the head, then the selection
    assert ops_topk.head_beam_keys(h, head, scores, 6) is None
    monkeypatch.setattr(ops_topk, "HEAD_SELECT", "on")
    assert torch.equal(ops_topk.head_beam_keys(h, head, scores, 6), hs.head_select(h, head, scores, 6))
    assert ops_topk.head_beam_keys(h, head, scores.double(), 6) is None
    assert ops_topk.head_beam_keys(h, head.half(), scores, 6) is None  # dtypes apart: the readable path casts
    with torch.enable_grad():
        assert ops_topk.head_beam_keys(h.requires_grad_(), head, scores, 6) is None  # no backward here
    monkeypatch.setattr(ops_topk, "HEAD_SELECT", "fused")
    with pytest.raises(ValueError, match=r"LONGSPEC_HEAD_SELECT='fused' is not one of auto, off, on"):
        ops_topk.head_beam_keys(h.detach(), head, scores, 6)


@pytest.mark.parametrize("n, V, K, w", [(1, 4096, 256, 4), (16, 4096, 256, 16), (3, 257, 32, 5)])
def test_beam_level_from_hidden_both_ways(n, V, K, w, monkeypatch):
    """The switch off runs the head and then beam_level_from_logits (bit for bit); on, the kernel picks the same
    (parent, token) pairs with scores within float32 rounding."""
    h, head, scores = _level(n, V, K, seed=n + V + w)
    monkeypatch.setattr(ops_topk, "HEAD_SELECT", "off")
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "off")
    off = draft.beam_level_from_hidden(scores, h, head, w)
    want = draft.beam_level_from_logits(scores, F.linear(h, head), w)
    assert all(torch.equal(a, b) for a, b in zip(off, want))
    monkeypatch.setattr(ops_topk, "HEAD_SELECT", "on")
    on = draft.beam_level_from_hidden(scores, h, head, w)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    torch.testing.assert_close(on[2], off[2], rtol=0, atol=2e-5)
    nan = h.clone()
    nan[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        draft.beam_level_from_hidden(scores, nan, head, w)
