"""A verification pass's greedy tail in one launch (kernels/greedy_accept.py), in Triton's CPU interpreter: every
output (argmax, verified, accepted, path, n, emitted tokens, the added acceptance counts) against the node-by-node
reference and against spec/verify.py's vectorised definition, bit for bit, over tree shapes (chains, the default
tree, deep narrow trees, random parents), logits dtypes, how often the draft matches, ties, rows of -inf, NaN, a
vocabulary over several blocks; the ticket back at zero; the registered op traced whole; the errors; and the switch
LONGSPEC_GREEDY_ACCEPT from ops.accept down to the decoder's verify stage, compiled, and whole greedy decodes."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel modules' @triton.jit definitions

import pytest  # noqa: E402
import torch  # noqa: E402

import longspec_lab.kernels.greedy_accept as ga  # noqa: E402
from longspec_lab.kernels.launch import tickets  # noqa: E402
from longspec_lab.ops import accept  # noqa: E402
from longspec_lab.spec import verify as sv  # noqa: E402
from longspec_lab.spec.draft import TreeBuffers  # noqa: E402

OP = torch.ops.longspec.greedy_accept.default


def _tree(widths, V, seed, p_match=0.8, dtype=torch.float32, sort_parents=False):
    """A drafted tree on TreeBuffers (random parents in the level above, tokens that match the logits' argmax at
    their parent with probability p_match) and the target's logits [N, V] at its nodes, seeded."""
    g = torch.Generator().manual_seed(seed)
    buf = TreeBuffers(widths, "cpu")
    buf.start(torch.tensor([int(torch.randint(0, V, (1,), generator=g))]))
    logits = (torch.randn(buf.N, V, generator=g) * 3).to(dtype)
    preds = logits.float().argmax(-1)
    for level in range(1, buf.D + 1):
        lo, hi = buf.levels[level]
        plo, phi = buf.levels[level - 1]
        par = torch.randint(plo, phi, (hi - lo,), generator=g)
        par = par.sort().values if sort_parents else par
        tok = torch.where(
            torch.rand(hi - lo, generator=g) < p_match, preds[par], torch.randint(0, V, (hi - lo,), generator=g)
        )
        buf.add_level(level, par, tok, torch.zeros(hi - lo))
    return buf, logits


def _buffers(N, D, R, seed=0):
    """The decoder's output buffers, stats already holding earlier steps' counts."""
    g = torch.Generator().manual_seed(seed)
    L = lambda n: torch.full((n,), -7, dtype=torch.long)  # poisoned: every entry must be written
    return {"preds": L(N), "verified": torch.ones(N, dtype=torch.bool), "accepted": torch.ones(N, dtype=torch.bool),
            "path": L(D + 1), "n_acc": L(1), "emitted": L(D + 1),
            "stats": torch.randint(0, 50, (2 * D + 2 * R,), generator=g)}  # fmt: skip


def _definition(buf, logits, stats):
    """spec/verify.py's greedy acceptance, as the decoder's verify stage runs it with the switch off."""
    preds = logits.argmax(-1)
    verified, accepted, path, n = sv.greedy_accept(buf.tokens, buf.parents, buf.depths, buf.anc, buf.levels, preds)
    tried = sv.path_children(buf.parents, buf.depths, path)
    R = max(buf.shape.widths)
    counts = sv.acceptance_stats(buf.parents, buf.depths, path, n, tried, buf.D, R)
    return {"preds": preds, "verified": verified, "accepted": accepted, "path": path, "n_acc": n,
            "emitted": preds.index_select(0, path), "stats": stats + counts}  # fmt: skip


def _run(buf, logits):
    D, R = buf.D, max(buf.shape.widths)
    out = _buffers(buf.N, D, R)
    before = out["stats"].clone()
    ga.greedy_accept(logits, buf.tokens, buf.parents, buf.depths, buf.anc, out, D, R)
    return out, before


SHAPES = [(4, 16, 16, 16, 16), (1,), (1, 1, 1, 1, 1, 1, 1), (1, 3, 9), (2, 4, 8, 8, 8, 8), (3, 4, 6, 6, 3, 4, 3),
          (32,), (1, 2, 3, 4, 2, 1, 3), (2, 4, 8, 16, 32, 64)]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("p_match", [0.3, 0.95])
@pytest.mark.parametrize("form", ga._FORMS)
def test_kernel_equals_the_reference_and_the_definition(shape, p_match, form, monkeypatch):
    """Both forms of the last program's acceptance (the mask tile, the walk by depth); random parents and tokens
    drawn from a small vocabulary often give siblings the same token, so several nodes of a depth are accepted."""
    monkeypatch.setattr(ga, "TAIL_FORM", form)
    for seed in range(3):
        buf, logits = _tree(shape, V=300, seed=seed + 17 * len(shape), p_match=p_match, sort_parents=seed == 0)
        out, before = _run(buf, logits)
        ref = ga.greedy_accept_reference(logits, buf.tokens, buf.parents, buf.depths, buf.anc, buf.D,
                                         max(shape))  # fmt: skip
        ref["stats"] = before + ref["stats"]
        want = _definition(buf, logits, before)
        for key in want:
            assert torch.equal(out[key], ref[key]), (shape, seed, key, out[key], ref[key])
            assert torch.equal(out[key], want[key]), (shape, seed, key, out[key], want[key])


def test_the_reference_is_an_independent_walk():
    """The reference on a hand-made tree, read off by eye: root 0 -> {1, 2}; 1 -> {3}; 2 -> {4, 5}."""
    buf = TreeBuffers((2, 3), "cpu")
    buf.start(torch.tensor([9]))
    buf.add_level(1, torch.tensor([0, 0]), torch.tensor([5, 6]), torch.zeros(2))
    buf.add_level(2, torch.tensor([1, 2, 2]), torch.tensor([7, 8, 3]), torch.zeros(3))
    argmax = [6, 7, 3, 1, 2, 4]  # the target after each node: node 2 (6) matches the root, node 5 (3) node 2
    logits = torch.nn.functional.one_hot(torch.tensor(argmax), 10).float()
    ref = ga.greedy_accept_reference(logits, buf.tokens, buf.parents, buf.depths, buf.anc, 2, 3)
    assert ref["verified"].tolist() == [True, False, True, True, False, True]  # node 3 matches node 1, unaccepted
    assert ref["accepted"].tolist() == [True, False, True, False, False, True]
    assert ref["path"].tolist() == [0, 2, 5] and ref["n_acc"].tolist() == [3]
    assert ref["emitted"].tolist() == [6, 3, 4]
    # offered: depth 1 and 2; reached: 1 and 2; ranks offered: nodes 1, 2 (ranks 0, 1), 4, 5 (0, 1); accepted 2, 5
    assert ref["stats"].tolist() == [1, 1, 1, 1, 2, 2, 0, 0, 2, 0]
    out, before = _run(buf, logits)
    assert torch.equal(out["stats"] - before, ref["stats"]) and torch.equal(out["path"], ref["path"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_ties_take_the_first_index_in_every_dtype(dtype, monkeypatch):
    """Rounded to few values, rows hold many equal maxima, across block borders (BLOCK_V 16 over V = 70): the
    first index wins, as torch.argmax."""
    monkeypatch.setattr(ga, "BLOCK_V", 16)
    buf, logits = _tree((4, 16, 16), V=70, seed=3, dtype=dtype)
    logits = (logits.float() / 3).round().clamp(-1, 1).to(dtype)  # three values: ties everywhere
    logits[5, 40] = logits[5, 60] = 5.0  # the maximum twice, in blocks 2 and 3
    out, _ = _run(buf, logits)
    assert torch.equal(out["preds"], logits.argmax(-1))
    assert out["preds"][5] == 40


def test_a_form_or_warp_count_that_does_not_exist_is_named(monkeypatch):
    buf, logits = _tree((2, 4), V=50, seed=5)
    monkeypatch.setattr(ga, "TAIL_FORM", "scan")
    with pytest.raises(ValueError, match="TAIL_FORM = 'scan' is not one of tile, walk; unset it"):
        _run(buf, logits)
    monkeypatch.setattr(ga, "TAIL_FORM", "tile")
    monkeypatch.setattr(ga, "NUM_WARPS", 3)
    with pytest.raises(ValueError, match="NUM_WARPS = 3 is not 1, 2, 4, 8 or 16"):
        _run(buf, logits)


def test_rows_of_minus_infinity_and_nan(monkeypatch):
    monkeypatch.setattr(ga, "BLOCK_V", 16)
    buf, logits = _tree((2, 4), V=50, seed=5)
    logits[1] = float("-inf")  # every token masked: index 0, as torch.argmax
    logits[2, 33] = float("nan")  # a NaN: torch.argmax returns it
    logits[3, 7] = logits[3, 20] = float("nan")
    out, _ = _run(buf, logits)
    assert out["preds"][1] == 0 and out["preds"][2] == 33 and out["preds"][3] == 7
    assert torch.equal(out["preds"], logits.argmax(-1))


def test_the_ticket_is_back_at_zero_and_a_second_launch_adds_again():
    buf, logits = _tree((4, 16, 16, 16, 16), V=200, seed=8)
    out, before = _run(buf, logits)
    assert int(tickets(logits.device)[0]) == 0
    once = out["stats"] - before
    ga.greedy_accept(logits, buf.tokens, buf.parents, buf.depths, buf.anc, out, buf.D, 16)
    assert torch.equal(out["stats"] - before, 2 * once)


def test_strided_logits_are_read_as_their_values():
    """A slice of wider logits (the batch-invariant pass hands its first N rows of a padded pass)."""
    buf, logits = _tree((1, 3, 9), V=64, seed=12)
    wide = torch.randn(buf.N + 5, 80)
    wide[: buf.N, :64] = logits
    out, _ = _run(buf, wide[: buf.N, :64])
    want, _ = _run(buf, logits)
    for key in out:
        if key != "stats":
            assert torch.equal(out[key], want[key]), key


def test_op_opcheck_and_fullgraph_trace():
    buf, logits = _tree((2, 4, 4), V=40, seed=21)
    D, R = buf.D, 4
    out = _buffers(buf.N, D, R)
    args = (logits, buf.tokens, buf.parents, buf.depths, buf.anc, *out.values(), D, R)
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    graphs = []

    def spy(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = lambda z, o: ga.greedy_accept(z, buf.tokens, buf.parents, buf.depths, buf.anc, o, D, R)  # noqa: E731
    compiled, eager = _buffers(buf.N, D, R), _buffers(buf.N, D, R)
    torch.compile(fn, fullgraph=True, backend=spy)(logits, compiled)
    fn(logits, eager)
    assert len(graphs) == 1
    assert OP in [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    for key in eager:
        assert torch.equal(compiled[key], eager[key]), key
    torch._dynamo.reset()


def test_bad_input_errors(monkeypatch):
    buf, logits = _tree((2, 4), V=30, seed=2)
    D, R = buf.D, 4
    call = lambda z=logits, out=None, D=D, R=R, anc=buf.anc: ga.greedy_accept(  # noqa: E731
        z, buf.tokens, buf.parents, buf.depths, anc, _buffers(buf.N, D, R) if out is None else out, D, R
    )
    with pytest.raises(ValueError, match="logits \\[N, V\\]"):
        call(z=logits.long())
    with pytest.raises(ValueError, match="1 to 128 nodes"):
        call(z=torch.randn(129, 30))
    with pytest.raises(ValueError, match="widest level R"):
        call(R=0)
    bad = _buffers(buf.N, D, R)
    del bad["emitted"]
    with pytest.raises(ValueError, match="needs the buffers emitted"):
        call(out=bad)
    bad = _buffers(buf.N, D, R)
    bad["path"] = torch.zeros(D + 2, dtype=torch.long)
    with pytest.raises(ValueError, match="path \\[3\\]"):
        call(out=bad)
    with pytest.raises(ValueError, match="anc"):
        call(anc=buf.anc.long())
    monkeypatch.setattr(ga, "_INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        call()


def test_the_switch(monkeypatch):
    buf, logits = _tree((4, 16), V=64, seed=4)
    out = _buffers(buf.N, buf.D, 16)
    for value, taken in (("off", False), ("auto", False), ("on", True)):  # auto: the kernel on CUDA only
        monkeypatch.setattr(accept, "GREEDY_ACCEPT", value)
        assert accept.fused_greedy_accept(logits, buf, out, buf.D, 16) is taken
    assert torch.equal(out["preds"], logits.argmax(-1))
    big, big_logits = _tree((8, 64, 64), V=16, seed=4)  # 137 nodes: past the kernel's tile, the definition's
    assert not accept.fused_greedy_accept(big_logits, big, _buffers(big.N, 3, 64), 3, 64)
    monkeypatch.setattr(accept, "GREEDY_ACCEPT", "yes")
    with pytest.raises(ValueError, match="LONGSPEC_GREEDY_ACCEPT='yes'"):
        accept.fused_greedy_accept(logits, buf, out, buf.D, 16)


@pytest.mark.parametrize("kwargs", [{"method": "tree", "tree_shape": [4, 16, 16]}, {"method": "chain", "gamma": 4},
                                    {"method": "tree", "tree_shape": [1, 2, 3, 2]}])  # fmt: skip
def test_a_greedy_decode_with_the_kernel_equals_the_definitions(kwargs, decodes_the_same):
    """The whole decoder on the embedded pair (float32, CPU), every verification's acceptance by the kernel: the
    tokens are plain greedy decoding's, and the accepted lengths and acceptance counts are the definition's."""
    text = "import os\n\n\ndef walk(root):\n    for name in os.listdir(root):\n"
    decodes_the_same(accept, "GREEDY_ACCEPT", text, max_new_tokens=24, **kwargs)
