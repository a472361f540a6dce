"""A beam level's selection in one launch (kernels/beam_select.py), in Triton's CPU interpreter: the pairs it picks
against float64 scores (parent + log-softmax, brute force) and its keys against the PyTorch definition
(`beam_select_reference`, itself checked against spec/draft.py's beam_level), over logits dtypes, level shapes
(one parent, the default tree's 16 x 16, widths that are not powers of two, a width of every pair, V = 1, V not a
multiple of the chunk, several log-sum-exp steps), both selections (repeated maxima and the bitonic network); the
ticket left at zero for the next launch; the registered op's fake version and a fullgraph trace; the errors; and
the switch LONGSPEC_BEAM_SELECT from ops.topk.beam_keys down to a whole greedy decode."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel modules' @triton.jit definitions

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

for _name in ("longspec_lab.kernels.tree_attention", "longspec_lab.kernels.row_topk"):
    if _name in sys.modules and not sys.modules[_name]._INTERPRET:
        importlib.reload(sys.modules[_name])  # imported earlier without the interpreter: redefine the kernels
import longspec_lab.kernels.beam_select as bs  # noqa: E402
import longspec_lab.kernels.row_topk as rt  # noqa: E402
from longspec_lab.kernels.launch import tickets  # noqa: E402
from longspec_lab.ops import topk as ops_topk  # noqa: E402
from longspec_lab.spec import draft  # noqa: E402

OP = torch.ops.longspec.beam_select.default


@pytest.fixture(autouse=True)
def _score_keys(monkeypatch):
    """The tests of the first form run it whatever LONGSPEC_BEAM_CHUNK_KEYS says (the default is logits_rows since
    2026-12-06); the logit-key forms' tests below set the switch themselves."""
    monkeypatch.setattr(bs, "CHUNK_KEYS", "scores")


def _level(n, V, seed, dtype=torch.float32, spread=3.0):
    """Logits [n, V] and descending parent scores [n] <= 0, seeded."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * spread).to(dtype)
    scores = -(torch.rand(n, generator=g) * 4).sort(descending=True).values
    return logits, scores


def _exact_pairs(logits, scores, w):
    """(flat indices of the w best pairs, their scores) in float64, best first, and the gap that separates the w-th
    from the (w+1)-th (a test only trusts the order where consecutive scores are apart)."""
    flat = (scores.double()[:, None] + torch.log_softmax(logits.double(), -1)).flatten()
    top = torch.topk(flat, min(w + 1, flat.numel()))
    vals = top.values
    gaps = (vals[:-1] - vals[1:]).min().item() if vals.numel() > 1 else float("inf")
    return top.indices[:w], vals[:w], gaps


def _decoded(keys, n, V):
    rank, tok, score = draft._decode_keys(keys, n, V)
    return rank * V + tok, score


CASES = [  # n, V, w, block_v (None: LONGSPEC_TOPK_FIRST_BLOCK's 1,024)
    (1, 4096, 4, None),  # level 1 of the default tree: one parent, 4 chunks of 1,024
    (16, 4096, 16, None),  # a default-tree level: 64 programs, 1,024 candidates for the last one
    (4, 1000, 6, 128),  # the tuner's width 6 (bitonic keeps 8), V not a multiple of the chunk
    (3, 300, 5, 32),  # ten chunks a row
    (2, 37, 74, None),  # every pair: each row keeps all of its 37 tokens
    (3, 1, 2, None),  # V = 1
    (5, 50, 1, 16),  # w = 1
]


# every case in both dtypes under both selections, but the bitonic network at the default tree's level shape only on
# two of its 16 rows, in bfloat16 (the decoder's dtype): under the interpreter Triton's bitonic top-k takes ~0.6 s a
# program, 40 s for the whole level; two rows run the same programs (a 1,024-token chunk's top 16) 8 times, and the
# GPU has run the whole level since (the same tokens as the repeated maxima, data/results/e2e_ab_topk_bitonic_h200.json)
RUNS = [
    (*case, dtype, algo)
    for case in CASES
    for dtype in (torch.float32, torch.bfloat16)
    for algo in ("max", "bitonic")
    if not (algo == "bitonic" and case[0] * case[1] >= 16 * 4096)
] + [(2, 4096, 16, None, torch.bfloat16, "bitonic")]


@pytest.mark.parametrize("n, V, w, block_v, dtype, algo", RUNS)
def test_kernel_picks_the_float64_pairs_and_the_definitions_keys(n, V, w, block_v, dtype, algo, monkeypatch):
    monkeypatch.setattr(rt, "TOPK_ALGO", algo)
    logits, scores = _level(n, V, seed=n * 7919 + V + w, dtype=dtype)
    _check_level(bs.beam_select(logits, scores, w, block_v), logits, scores, w)


def _check_level(got, logits, scores, w):
    """A selection's [w] keys against float64 (the pairs, in order where the scores are apart, and their scores)
    and against the definition's keys (the same pairs, the scores within float32 rounding)."""
    n, V = logits.shape
    assert got.dtype == torch.int64 and got.shape == (w,)
    idx, score = _decoded(got, n, V)
    want_idx, want_score, gap = _exact_pairs(logits, scores, w)
    torch.testing.assert_close(score.double(), want_score, rtol=0, atol=2e-5)
    if gap > 1e-4:  # the order is only defined where the scores are apart (module docstring)
        assert torch.equal(idx, want_idx)
    ref_idx, ref_score = _decoded(bs.beam_select_reference(logits, scores, w), n, V)
    assert torch.equal(idx, ref_idx) or gap <= 1e-4
    torch.testing.assert_close(score, ref_score, rtol=0, atol=2e-5)


def test_reference_is_beam_levels_selection():
    """beam_select_reference equals spec/draft.py's beam_level on the same log-probs, bit for bit."""
    for n, V, w in [(1, 4096, 4), (16, 4096, 16), (4, 100, 9)]:
        logits, scores = _level(n, V, seed=V + w)
        rank, tok, sc = draft.beam_level(scores, torch.log_softmax(logits, -1), w)
        r2, t2, s2 = draft._decode_keys(bs.beam_select_reference(logits, scores, w), n, V)
        assert torch.equal(rank, r2) and torch.equal(tok, t2) and torch.equal(sc, s2)


def test_ties_keep_the_lower_flat_index_first():
    """Equal logits in one row and equal parents: the kernel's order is the flat index order, as beam_level's."""
    logits = torch.zeros(2, 64)
    scores = torch.zeros(2)
    got = bs.beam_select(logits, scores, 10, 16)
    idx, score = _decoded(got, 2, 64)
    assert idx.tolist() == list(range(10))
    torch.testing.assert_close(score, torch.full((10,), -torch.log(torch.tensor(64.0)).item()), rtol=0, atol=1e-6)


def test_log_sum_exp_over_several_steps(monkeypatch):
    """A row longer than BLOCK_L takes the online maximum and sum over several steps; the largest logit sits in the
    last step, so a walk that stopped early would get another log-sum-exp (and other scores)."""
    monkeypatch.setattr(bs, "BLOCK_L", 64)  # per warp: 128 tokens a step with 2 warps
    logits, scores = _level(3, 1000, seed=5)
    logits[1, 990] = 25.0
    got = bs.beam_select(logits, scores, 7, 64, num_warps=2)
    idx, score = _decoded(got, 3, 1000)
    want_idx, want_score, _ = _exact_pairs(logits, scores, 7)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(score.double(), want_score, rtol=0, atol=2e-5)


def test_masked_tokens_minus_infinity(monkeypatch):
    """Tokens at -inf (a logits processor's mask), a whole first step of them included: they get no mass, the
    other tokens the log-softmax of the rest, and a -inf token is never picked while a finite one is left."""
    monkeypatch.setattr(bs, "BLOCK_L", 64)
    logits, scores = _level(2, 300, seed=21)
    logits[0, :128] = float("-inf")  # the row's first two steps of 64
    logits[1, 7] = float("-inf")
    got = bs.beam_select(logits, scores, 9, 64, num_warps=1)
    idx, score = _decoded(got, 2, 300)
    want_idx, want_score, _ = _exact_pairs(logits, scores, 9)
    assert torch.equal(idx, want_idx) and torch.isfinite(score).all()
    torch.testing.assert_close(score.double(), want_score, rtol=0, atol=2e-5)


def test_strided_inputs_are_read_as_their_values():
    """Logits with a column stride and parent scores taken every other element give the contiguous copies' keys."""
    logits, scores = _level(4, 300, seed=23)
    wide = torch.zeros(8)
    wide[::2] = scores
    got = bs.beam_select(logits.t().contiguous().t(), wide[::2], 6, 64)
    assert torch.equal(got, bs.beam_select(logits, scores, 6, 64))


def test_the_ticket_is_back_at_zero_and_a_second_launch_agrees():
    logits, scores = _level(4, 500, seed=9)
    first = bs.beam_select(logits, scores, 8, 64)
    assert int(tickets(logits.device)[0]) == 0
    assert torch.equal(bs.beam_select(logits, scores, 8, 64), first)
    assert int(tickets(logits.device)[0]) == 0


def test_op_opcheck_and_fullgraph_trace():
    logits, scores = _level(3, 200, seed=11)
    torch.library.opcheck(OP, (logits, scores, 5, 64, 4))
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(lambda z, s: bs.beam_select(z, s, 5, 64), fullgraph=True, backend=spy)(logits, scores)
    assert len(graphs) == 1
    assert OP in [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.equal(got, bs.beam_select(logits, scores, 5, 64))


def test_bad_input_errors(monkeypatch):
    logits, scores = _level(2, 40, seed=13)
    with pytest.raises(ValueError, match=r"logits \[n, V\] in float16, bfloat16 or float32"):
        bs.beam_select(logits[0], scores, 3)
    with pytest.raises(ValueError, match=r"logits \[n, V\] in float16, bfloat16 or float32"):
        bs.beam_select(logits.double(), scores, 3)
    with pytest.raises(ValueError, match=r"parent_scores \[n\] = \[2\]"):
        bs.beam_select(logits, scores[:1], 3)
    with pytest.raises(ValueError, match="float32 parent_scores"):
        bs.beam_select(logits, scores.double(), 3)
    for w in (0, 81, 2.0, True):
        with pytest.raises(ValueError, match=r"integer width in \[1, n \* V\] = \[1, 80\]"):
            bs.beam_select(logits, scores, w)
    with pytest.raises(ValueError, match="power of two"):
        bs.beam_select(logits, scores, 3, block_v=48)
    with pytest.raises(ValueError, match="num_warps must be 1, 2, 4 or 8"):
        bs.beam_select(logits, scores, 3, num_warps=3)
    big, big_scores = _level(1, bs.MAX_VOCAB + 1, seed=1)
    with pytest.raises(ValueError, match="beam_select_reference"):
        bs.beam_select(big, big_scores, 3)
    monkeypatch.setattr(bs, "_INTERPRET", False)  # as on a machine without TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="pass CUDA tensors, or set TRITON_INTERPRET=1"):
        bs.beam_select(logits, scores, 3)


def test_warps_switch(monkeypatch):
    """NUM_WARPS (LONGSPEC_BEAM_WARPS as a string, or an int assigned at run time) sets every program's warps and
    the log-sum-exp block with them; the pairs are the definition's at every count (the scores may differ in their
    last bits: the log-sum-exp's order follows the block); a bad value names the variable."""
    logits, scores = _level(3, 2100, seed=17)
    want = bs.beam_select_reference(logits, scores, 6) & 0xFFFFFFFF  # [6] the pairs, best first
    seen = []
    real = bs._beam_select_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw["num_warps"], kw["BLOCK_L"]))
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(bs, "_beam_select_kernel", Spy())
    for value, warps in [("1", 1), (2, 2), ("8", 8)]:
        monkeypatch.setattr(bs, "NUM_WARPS", value)
        assert torch.equal(bs.beam_select(logits, scores, 6, 512) & 0xFFFFFFFF, want)
        assert seen[-1] == (warps, min(bs.BLOCK_L * warps, 4096))
    monkeypatch.setattr(bs, "NUM_WARPS", "auto")  # 4 warps up to AUTO_NARROW parents, 8 past them
    assert torch.equal(bs.beam_select(logits, scores, 6, 512) & 0xFFFFFFFF, want)
    assert seen[-1][0] == 4
    wide, wide_scores = _level(bs.AUTO_NARROW + 1, 300, seed=18)
    want_wide = bs.beam_select_reference(wide, wide_scores, 6) & 0xFFFFFFFF
    assert torch.equal(bs.beam_select(wide, wide_scores, 6, 64) & 0xFFFFFFFF, want_wide)
    assert seen[-1][0] == 8
    for bad in ("3", "four", "", 16, True):
        monkeypatch.setattr(bs, "NUM_WARPS", bad)
        with pytest.raises(ValueError, match=r"LONGSPEC_BEAM_WARPS=.* is not 1, 2, 4, 8 or auto"):
            bs.beam_select(logits, scores, 6)
    got = bs.beam_select(logits, scores, 6, 512, num_warps=2)  # an argument overrides the switch
    assert torch.equal(got & 0xFFFFFFFF, want)


@pytest.mark.parametrize("module", ["beam_select", "head_select"])
def test_main_without_cuda_or_with_an_existing_out(module, capsys, tmp_path):
    """Both benchmarks of a beam level (this kernel's and kernels/head_select.py's) check their shapes the same way
    (`parse_level_args`): an existing --out, mismatched --rows/--width, a bad --warps, and no GPU each exit with
    status 2 and one line naming the problem."""
    main = importlib.import_module(f"longspec_lab.kernels.{module}").main
    out = tmp_path / "b.json"
    out.write_text("{}")
    for argv, message in [
        (["--out", str(out)], "exists"),
        (["--rows", "1,4", "--width", "4"], "one width per row count"),
        (["--warps", "3"], "--warps takes 1, 2, 4 and/or 8"),
        (["--block-v", "48"], "--block-v takes powers of two"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit) as e:
        main([])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs a CUDA GPU" in err and f"test_{module}.py" in err
    if module == "beam_select":  # its own option, checked before the GPU is looked for
        with pytest.raises(SystemExit) as e:
            main(["--chunk-keys", "scores,rows"])
        assert (
            e.value.code == 2
            and "--chunk-keys takes the choices scores, logits, logits_rows" in capsys.readouterr().err
        )


# ----------------------------------------------------------------------------- the switch


def test_beam_keys_follows_the_switch(monkeypatch):
    logits, scores = _level(4, 300, seed=17)
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "off")
    assert ops_topk.beam_keys(logits, scores, 6) is None
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "auto")  # the CPU: the definition
    assert ops_topk.beam_keys(logits, scores, 6) is None
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "on")
    assert torch.equal(ops_topk.beam_keys(logits, scores, 6), bs.beam_select(logits, scores, 6))
    assert ops_topk.beam_keys(logits, scores.double(), 6) is None  # float64 scores: the definition's sort path
    wide, wide_scores = _level(2, bs.MAX_VOCAB + 1, seed=2)
    assert ops_topk.beam_keys(wide, wide_scores, 3) is None  # a vocabulary the kernel does not take
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "fused")
    with pytest.raises(ValueError, match=r"LONGSPEC_BEAM_SELECT='fused' is not one of auto, off, on"):
        ops_topk.beam_keys(logits, scores, 6)


@pytest.mark.parametrize("n, V, w", [(1, 4096, 4), (16, 4096, 16), (3, 257, 5)])
def test_beam_level_from_logits_both_ways(n, V, w, monkeypatch):
    """The switch off runs the definition (beam_level on the log-softmax, bit for bit); on, the kernel picks the
    same (parent, token) pairs with scores within float32 rounding."""
    logits, scores = _level(n, V, seed=n + V + w)
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "off")
    off = draft.beam_level_from_logits(scores, logits, w)
    want = draft.beam_level(scores, torch.log_softmax(logits, -1), w)
    assert all(torch.equal(a, b) for a, b in zip(off, want))
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "on")
    on = draft.beam_level_from_logits(scores, logits, w)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    torch.testing.assert_close(on[2], off[2], rtol=0, atol=2e-5)
    nan = logits.clone()
    nan[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        draft.beam_level_from_logits(scores, nan, w)


@pytest.mark.parametrize("switch", ["BEAM_SELECT", "HEAD_SELECT"])
def test_a_greedy_tree_decode_with_the_kernel_equals_plain_decoding(switch, decodes_the_same):
    """The whole decoder with every beam level selected by the kernel (LONGSPEC_BEAM_SELECT), or with its LM head
    and selection in one launch (LONGSPEC_HEAD_SELECT, kernels/head_select.py), on the embedded pair in float32 on
    the CPU: the tokens are plain greedy decoding's, and the trees and the acceptance are the definition's."""
    text = "def fib(n):\n    if n < 2:\n        return n\n"
    decodes_the_same(ops_topk, switch, text, method="tree", tree_shape=[2, 4, 4])


def test_time_level_forms_times_only_the_forms_that_pick_the_float64_pairs(monkeypatch, capsys):
    """The benchmarks' shared timing loop (`time_level_forms`): a form whose keys name other pairs than float64's
    is reported and left out; the others are timed (here by a stand-in for do_bench_cudagraph, which needs CUDA)."""
    import triton.testing

    logits, scores = _level(3, 50, seed=29)
    exact = (scores.double()[:, None] + torch.log_softmax(logits.double(), -1)).flatten()
    want = torch.topk(exact, 4).values
    right = bs.beam_select_reference(logits, scores, 4)
    wrong = bs.beam_select_reference(logits, scores, 5)[1:]  # pairs 2..5: not the top four
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, return_mode: 0.002)
    us = bs.time_level_forms({"right": lambda: right, "wrong": lambda: wrong}, exact, want, 1e-5)
    assert us == {"right": pytest.approx(2.0)}
    assert "wrong: selects other pairs than float64 -- not timed" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the level written by the same launch


def _grown(widths, V, seed, write, monkeypatch, poison=False):
    """A beam tree grown level by level from random logits, each level selected by the kernel, and written either
    by TreeBuffers.add_level (write "off") or by the selection's own launch (LONGSPEC_BEAM_WRITE "on")."""
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "on")
    monkeypatch.setattr(ops_topk, "BEAM_WRITE", write)
    g = torch.Generator().manual_seed(seed)
    buf = draft.TreeBuffers(widths, "cpu")
    buf.start(torch.tensor([3]))
    if poison:  # stale rows, as a previous step's tree leaves them: every entry of a level must be rewritten
        buf.anc[1:] = torch.rand(buf.N - 1, buf.N, generator=g) < 0.5
        buf.tokens[1:], buf.parents[1:], buf.scores[1:] = 99, 99, 99.0
    for level in range(1, buf.D + 1):
        lo, hi = buf.levels[level - 1]
        draft.grow_beam_level_logits(buf, level, torch.randn(hi - lo, V, generator=g) * 3)
    return buf


@pytest.mark.parametrize("widths, V", [((4, 16, 16, 16, 16), 600), ((1, 1, 1, 1), 50), ((2, 4, 8), 37),
                                       ((3, 4, 6, 6, 3, 4, 3), 300), ((2, 6), 3)])  # fmt: skip
def test_writing_the_level_in_the_launch_equals_add_level(widths, V, monkeypatch):
    """LONGSPEC_BEAM_WRITE=on: the tokens, parents, scores and mask rows the last program writes are add_level's,
    bit for bit (the same selection), including a level of every pair (V = 3, width 6) and stale buffers."""
    for poison in (False, True):
        off = _grown(widths, V, 5, "off", monkeypatch, poison)
        on = _grown(widths, V, 5, "on", monkeypatch, poison)
        for name in ("tokens", "parents", "scores", "anc"):
            assert torch.equal(getattr(on, name), getattr(off, name)), (widths, poison, name)
        assert torch.equal(on.anc, on.tree().mask)  # each row: the node and its ancestors, walked from the parents


def test_the_write_switch_and_its_errors(monkeypatch):
    buf = draft.TreeBuffers((2, 4), "cpu")
    tree = {"tokens": buf.tokens, "parents": buf.parents, "scores": buf.scores, "anc": buf.anc}
    logits, scores = _level(2, 40, seed=3)
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "on")
    for value, takes in (("off", False), ("auto", False), ("on", True)):  # auto: the kernel on CUDA only
        monkeypatch.setattr(ops_topk, "BEAM_WRITE", value)
        assert ops_topk.beam_write_takes(logits, scores, 4, tree) is takes
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "off")  # no selection launch: nothing to write from
    assert not ops_topk.beam_write_takes(logits, scores, 4, tree)
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "on")
    big = draft.TreeBuffers((8, 64, 512), "cpu")  # 585 nodes: a level of 512 rows of 1,024 is past the tile
    big_tree = {"tokens": big.tokens, "parents": big.parents, "scores": big.scores, "anc": big.anc}
    assert not ops_topk.beam_write_takes(torch.randn(64, 40), torch.zeros(64), 512, big_tree)
    monkeypatch.setattr(ops_topk, "BEAM_WRITE", "yes")
    with pytest.raises(ValueError, match="LONGSPEC_BEAM_WRITE='yes'"):
        ops_topk.beam_write_takes(logits, scores, 4, tree)
    with pytest.raises(ValueError, match="tree = "):
        bs.beam_select_into(logits, scores, 4, {"tokens": buf.tokens}, 3, 1)
    with pytest.raises(ValueError, match="contiguous scores"):
        bs.beam_select_into(logits, scores, 4, {**tree, "scores": buf.scores.double()}, 3, 1)
    with pytest.raises(ValueError, match="parents' nodes"):
        bs.beam_select_into(logits, scores, 4, tree, 2, 1)  # the level would overlap its parents
    with pytest.raises(ValueError, match="parents' nodes"):
        bs.beam_select_into(logits, scores, 5, tree, 3, 1)  # past the tree's 7 nodes
    before = {k: v.clone() for k, v in tree.items()}
    with pytest.raises(ValueError, match="width"):
        bs.beam_select_into(logits, scores, 0, tree, 3, 1)
    assert all(torch.equal(before[k], tree[k]) for k in tree)  # a refused call writes nothing


def test_a_greedy_decode_with_the_level_written_in_the_launch(decodes_the_same, monkeypatch):
    """The whole decoder with every level after the first written by its selection launch: plain greedy's tokens,
    and the definition's accepted lengths and acceptance counts."""
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "on")
    text = "class Stack:\n    def __init__(self):\n        self.items = []\n"
    decodes_the_same(ops_topk, "BEAM_WRITE", text, method="tree", tree_shape=[2, 4, 4])


@pytest.mark.parametrize("algo", ["max", "bitonic"])
def test_the_timing_probe_stops_after_each_phase_with_that_phase_done(algo, monkeypatch):
    """`phase_probe` (main --phases): phase 1 leaves each row's log-sum-exp in its chunks' first slots, phase 2
    each chunk's K largest keys of the definition (its pairs; the scores to the log-sum-exp's last bits), and
    neither touches the ticket; phase 3 is the whole selection,
    whose candidates hold the level's best key."""
    monkeypatch.setattr(rt, "TOPK_ALGO", algo)
    logits, scores = _level(3, 300, seed=11)
    w, block = 5, 64
    p = bs.plan(3, 300, w, block)
    n_chunks, K = p["n_chunks"], p["kept"]
    lse = bs.phase_probe(logits, scores, w, 1, block).view(3, n_chunks, K)[:, :, 0]  # [n, n_chunks]
    got = lse.to(torch.int32).view(torch.float32)
    torch.testing.assert_close(got, torch.logsumexp(logits.double(), -1).float()[:, None].expand(3, n_chunks))
    keys = bs.beam_keys_reference(logits, scores)  # [n, V]
    cand = bs.phase_probe(logits, scores, w, 2, block).view(3, n_chunks, K)
    for c in range(n_chunks):
        want = torch.topk(keys[:, c * block : (c + 1) * block], min(K, keys[:, c * block :].shape[1]), dim=1).values
        got = cand[:, c, : want.shape[1]]  # the same pairs (low 32 bits), scores to the last bits of the sum
        assert torch.equal(got & 0xFFFFFFFF, want & 0xFFFFFFFF), c
        assert ((got >> 32) - (want >> 32)).abs().max() <= 4, c
    assert not tickets(logits.device).any()
    full = bs.phase_probe(logits, scores, w, 3, block)
    assert int(full.max()) == int(bs.beam_select(logits, scores, w, block)[0]) and not tickets(logits.device).any()
    with pytest.raises(ValueError, match="phases must be one of \\[1, 2, 3\\]"):
        bs.phase_probe(logits, scores, w, 4, block)


# ------------------------------------------------- the chunk programs' logit keys (LONGSPEC_BEAM_CHUNK_KEYS)

# each form's cases: every CASES entry in float32 and bfloat16 under the repeated maxima (the interpreter's fast
# selection), and under the bitonic network where the interpreter runs it in seconds; fp16's own 16-bit keys on two
LOGIT_RUNS = [
    (form, *case, dtype, algo)
    for form in ("logits", "logits_rows")
    for case in CASES
    for dtype in (torch.float32, torch.bfloat16)
    for algo in ("max", "bitonic")
    if not (algo == "bitonic" and case[0] * case[1] >= 16 * 4096) and not (form == "logits_rows" and algo == "max")
] + [(form, 2, 4096, 16, None, torch.float16, "bitonic") for form in ("logits", "logits_rows")]
LOGIT_RUNS += [("logits", 4, 1000, 6, 128, torch.float16, "max"), ("logits_rows", 16, 300, 16, 64, torch.bfloat16,
                                                                     "bitonic")]  # fmt: skip


@pytest.mark.parametrize("form, n, V, w, block_v, dtype, algo", LOGIT_RUNS)
def test_logit_keys_pick_the_float64_pairs_and_the_definitions_keys(form, n, V, w, block_v, dtype, algo, monkeypatch):
    """Each chunk program ranks its own logits (16-bit logits as 32-bit keys) and keeps its chunk's maximum and sum;
    the last program folds them into each row's log-sum-exp (and with logits_rows keeps each row's best first): the
    same pairs as float64 and as the definition, the scores within float32 rounding of the definition's."""
    monkeypatch.setattr(rt, "TOPK_ALGO", algo)
    monkeypatch.setattr(bs, "CHUNK_KEYS", form)
    assert bs._chunk_form(n, V, w, block_v) == (form if algo == "bitonic" and min(w, V) > 1 else "logits")
    logits, scores = _level(n, V, seed=n * 7919 + V + w, dtype=dtype)
    _check_level(bs.beam_select(logits, scores, w, block_v), logits, scores, w)
    assert not tickets(logits.device).any()


@pytest.mark.parametrize("V, runs", [(64, 1), (128, 2), (192, 4), (256, 4)])
def test_the_row_merge_from_alternating_runs(V, runs, monkeypatch):
    """The row merge's chunks store their keys in alternating runs (odd chunks ascending), and the last program
    takes each row's best from those runs without sorting them again (`_row_top_of_runs`): 1, 2 and 4 runs a row
    (192 tokens: three chunks and a run of padding), three rows (a padding row), in all three dtypes, the pairs of
    float64 and of the definition; phase 2 of the probe shows the runs as stored."""
    monkeypatch.setattr(rt, "TOPK_ALGO", "bitonic")
    monkeypatch.setattr(bs, "CHUNK_KEYS", "logits_rows")
    w, block = 16, 64
    p = bs.plan(3, V, w, block)
    assert bs.alternating_runs(p) and triton.next_power_of_2(p["n_chunks"] * 16) // 16 == runs
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        logits, scores = _level(3, V, seed=V + 5, dtype=dtype)
        _check_level(bs.beam_select(logits, scores, w, block), logits, scores, w)
        cand, _ = bs.logits_phase_probe(logits, scores, w, 2, block, row_merge=True)
        runs_got = cand.view(3, p["n_chunks"], 16)
        for c in range(p["n_chunks"]):
            want = torch.sort(runs_got[:, c], dim=1, descending=c % 2 == 0).values
            assert torch.equal(runs_got[:, c], want), (dtype, c)
    assert not bs.alternating_runs(bs.plan(3, 300, 5, 32))  # 5 keys a chunk: tl.topk over each row
    assert not bs.alternating_runs(bs.plan(3, 512, 16, 64))  # 8 runs a row: tl.topk over each row
    p = bs.plan(3, 256, w, block)  # runs only with the row merge and the bitonic network
    assert not bs.alternating_runs(p, row_merge=False) and not bs.alternating_runs(p, bitonic=False)


@pytest.mark.parametrize("form", ["logits", "logits_rows"])
def test_logit_keys_ties_masked_tokens_and_a_whole_masked_chunk(form, monkeypatch):
    """Equal logits keep the lower flat index first (the low 16 bits of a 32-bit key are the reversed column); a
    -inf token is never picked while a finite one is left, and a chunk of -inf only adds nothing to its row's sum."""
    monkeypatch.setattr(rt, "TOPK_ALGO", "bitonic")
    monkeypatch.setattr(bs, "CHUNK_KEYS", form)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        idx, score = _decoded(bs.beam_select(torch.zeros(2, 64, dtype=dtype), torch.zeros(2), 10, 16), 2, 64)
        assert idx.tolist() == list(range(10))
        torch.testing.assert_close(score, torch.full((10,), -torch.log(torch.tensor(64.0)).item()), rtol=0, atol=1e-6)
    logits, scores = _level(2, 300, seed=21, dtype=torch.bfloat16)
    logits[0, :128] = float("-inf")  # the row's first two chunks of 64
    logits[1, 7] = float("-inf")
    idx, score = _decoded(bs.beam_select(logits, scores, 9, 64), 2, 300)
    want_idx, want_score, _ = _exact_pairs(logits, scores, 9)
    assert torch.equal(idx, want_idx) and torch.isfinite(score).all()
    torch.testing.assert_close(score.double(), want_score, rtol=0, atol=2e-5)


@pytest.mark.parametrize("form", ["logits", "logits_rows"])
def test_logit_keys_write_the_level_as_add_level(form, monkeypatch):
    """With the level written by the launch (LONGSPEC_BEAM_WRITE), the logit-key forms grow the tree add_level
    grows from the definition's selection: the same tokens, parents and mask, the scores within float32 rounding."""
    monkeypatch.setattr(rt, "TOPK_ALGO", "bitonic")
    monkeypatch.setattr(bs, "CHUNK_KEYS", "scores")
    off = _grown((2, 4, 8), 37, 5, "off", monkeypatch, poison=True)
    monkeypatch.setattr(bs, "CHUNK_KEYS", form)
    on = _grown((2, 4, 8), 37, 5, "on", monkeypatch, poison=True)
    for name in ("tokens", "parents", "anc"):
        assert torch.equal(getattr(on, name), getattr(off, name)), name
    torch.testing.assert_close(on.scores, off.scores, rtol=0, atol=2e-5)


@pytest.mark.parametrize("form", ["scores", "logits_rows"])
def test_the_bitonic_selection_writes_the_level_from_its_registers(form, monkeypatch):
    """With the bitonic network the last program writes the level from the keys it has just selected, without
    reading them back (`_select_level`), and a width of 1 from its one maximum: the tree add_level grows from the
    same launch's keys, bit for bit, over stale buffers."""
    monkeypatch.setattr(rt, "TOPK_ALGO", "bitonic")
    monkeypatch.setattr(bs, "CHUNK_KEYS", form)
    for widths in ((1, 1, 1), (2, 4, 3)):
        off = _grown(widths, 37, 9, "off", monkeypatch, poison=True)
        on = _grown(widths, 37, 9, "on", monkeypatch, poison=True)
        for name in ("tokens", "parents", "scores", "anc"):
            assert torch.equal(getattr(on, name), getattr(off, name)), (widths, name)
        assert torch.equal(on.anc, on.tree().mask)


def test_the_default_chunk_form_is_the_row_merge():
    """The default (timed 2026-12-06, module docstring), read when the module is imported without the switch."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "LONGSPEC_BEAM_CHUNK_KEYS"}
    code = "import longspec_lab.kernels.beam_select as bs; print(bs.CHUNK_KEYS)"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert got.strip() == "logits_rows"


def test_the_chunk_keys_switch_falls_back_and_names_a_bad_value(monkeypatch):
    """`_chunk_form`: logits_rows needs the bitonic network and a kept count above one (else logits), logits a
    partial tile within MAX_PARTIAL_TILE (else scores); a bad value is named with its fix, before any launch."""
    monkeypatch.setattr(rt, "TOPK_ALGO", "bitonic")
    monkeypatch.setattr(bs, "CHUNK_KEYS", "logits_rows")
    assert bs._chunk_form(16, 4096, 16) == "logits_rows"
    assert bs._chunk_form(1, 4096, 1) == "logits"  # a chain level: one key a chunk, nothing to merge per row
    monkeypatch.setattr(rt, "TOPK_ALGO", "max")
    assert bs._chunk_form(16, 4096, 16) == "logits"
    monkeypatch.setattr(bs, "CHUNK_KEYS", "logits")
    assert bs._chunk_form(4, 16384, 64, 64) == "scores"  # 4 x 256 chunks x 64 kept: the partial tile is too large
    monkeypatch.setattr(bs, "CHUNK_KEYS", "scores")
    assert bs._chunk_form(16, 4096, 16) == "scores"
    monkeypatch.setattr(bs, "CHUNK_KEYS", "rows")
    logits, scores = _level(2, 40, seed=3)
    with pytest.raises(ValueError, match=r"LONGSPEC_BEAM_CHUNK_KEYS='rows' is not one of scores, logits, logits_rows"):
        bs.beam_select(logits, scores, 4)
    assert not tickets(logits.device).any()


def test_a_greedy_tree_decode_with_logit_keys_equals_plain_decoding(decodes_the_same, monkeypatch):
    """The whole decoder with every level selected (and written) by the logit-key form: plain greedy's tokens, and
    the definition's accepted lengths and acceptance counts."""
    monkeypatch.setattr(ops_topk, "BEAM_SELECT", "on")
    monkeypatch.setattr(ops_topk, "BEAM_WRITE", "on")
    monkeypatch.setattr(bs, "CHUNK_KEYS", "logits")
    text = "def fib(n):\n    if n < 2:\n        return n\n"
    decodes_the_same(ops_topk, "BEAM_SELECT", text, method="tree", tree_shape=[2, 4, 4])


def test_the_timing_probe_runs_the_first_form_whatever_the_switch(monkeypatch):
    """`phase_probe` times the score-key form: with the switch at logits_rows its third phase still leaves the
    first form's candidates in its scratch (the level's best key among them), and the ticket at zero."""
    monkeypatch.setattr(rt, "TOPK_ALGO", "bitonic")
    monkeypatch.setattr(bs, "CHUNK_KEYS", "logits_rows")
    logits, scores = _level(3, 300, seed=11)
    full = bs.phase_probe(logits, scores, 5, 3, 64)
    assert full.numel() == bs.plan(3, 300, 5, 64)["candidates"]
    best = bs.beam_select_reference(logits, scores, 5)[0]
    assert int(full.max()) & 0xFFFFFFFF == int(best) & 0xFFFFFFFF  # the same pair (scores to their last bits)
    assert abs((int(full.max()) >> 32) - (int(best) >> 32)) <= 4
    assert not tickets(logits.device).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_logit_keys_timing_probe_stops_after_each_phase_with_that_phase_done(dtype, monkeypatch):
    """`logits_phase_probe` (main --phases on a logit-key form): phase 1 leaves each chunk's maximum and sum of
    exp(logit - maximum) and no keys; phase 2 also each chunk's K largest logit keys (a 16-bit logit's order bits
    and the reversed column, as torch builds them here); neither touches the ticket; phase 3 is the whole
    selection, whose candidates hold the row's best logit."""
    monkeypatch.setattr(rt, "TOPK_ALGO", "bitonic")
    logits, scores = _level(3, 300, seed=13, dtype=dtype)
    w, block = 5, 64
    p = bs.plan(3, 300, w, block)
    n_chunks, K = p["n_chunks"], p["kept"]
    padded = torch.full((3, n_chunks * block), float("-inf"), dtype=torch.float64)
    padded[:, :300] = logits.double()
    chunks = padded.view(3, n_chunks, block)  # [n, chunks, block]
    c_max = chunks.max(-1).values
    c_sum = torch.exp(chunks - c_max[..., None]).sum(-1)
    cand, part = bs.logits_phase_probe(logits, scores, w, 1, block)
    torch.testing.assert_close(part[0].double(), c_max.flatten(), rtol=0, atol=0)
    torch.testing.assert_close(part[1].double(), c_sum.flatten(), rtol=1e-5, atol=0)
    unset = -(2**63) if dtype == torch.float32 else -(2**31)  # the probe's fill: no key written in phase 1
    assert int(cand.max()) == int(cand.min()) == unset and not tickets(logits.device).any()
    cand, part = bs.logits_phase_probe(logits, scores, w, 2, block)
    if dtype == torch.float32:
        bits = logits.view(torch.int32).to(torch.int64)
        key = (torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) << 32) | (0x7FFFFFFF - torch.arange(300))
    else:
        bits = logits.view(torch.int16).to(torch.int32)
        key = (torch.where(bits < 0, bits ^ 0x7FFF, bits) << 16) | (0xFFFF - torch.arange(300, dtype=torch.int32))
    for c in range(n_chunks):
        want = torch.topk(key[:, c * block : (c + 1) * block], K, dim=1).values  # [n, K]
        assert torch.equal(cand.view(3, n_chunks, K)[:, c], want), c
    assert not tickets(logits.device).any()
    full, _ = bs.logits_phase_probe(logits, scores, w, 3, block)
    assert not tickets(logits.device).any()
    best = int(bs.beam_select_reference(logits, scores, w)[0] & 0xFFFFFFFF)  # the reversed flat index of the best
    row, col = divmod(3 * 300 - 1 - best, 300)
    assert int(full.view(3, -1)[row].max()) == int(key[row, col])
    with pytest.raises(ValueError, match="phases must be one of \\[1, 2, 3\\]"):
        bs.logits_phase_probe(logits, scores, w, 0, block)
