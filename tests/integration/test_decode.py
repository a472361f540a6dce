"""Chain and tree speculative decoding are lossless: token for token equal to transformers'
greedy `generate` on the same float32 weights, on held-out long prompts."""

import pytest
import torch

from longspec_lab.decoding.eager import SpecDecoder
from longspec_lab.decoding.graphs import GraphDecoder
from longspec_lab.paths import load_prompts

SHAPES = [[1], [4, 16, 16, 16, 16], [2, 2, 2, 2, 2, 2, 2, 2], [32], [1, 3, 9]]
N_NEW = 24


@pytest.fixture(scope="module")
def prompts(embedded_pair):
    _, _, tok = embedded_pair
    ps = [tok.encode(p["text"]) for p in load_prompts(max_tokens=4096 - N_NEW - 80)][:10]
    assert len(ps) == 10 and sum(len(p) >= 2000 for p in ps) >= 3
    return ps


@pytest.fixture(scope="module")
def references(prompts, hf_embedded):
    refs = []
    with torch.no_grad():
        for ids in prompts:
            out = hf_embedded.generate(
                torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            refs.append(out[0, len(ids) :].tolist())
    return refs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tree_is_lossless(embedded_pair, prompts, references, shape):
    target, draft, _ = embedded_pair
    dec = SpecDecoder(target, draft, backend="torch")
    calls = 0
    for ids, ref in zip(prompts, references):
        res = dec.generate(ids, method="tree", tree_shape=shape, max_new_tokens=N_NEW, stop_at_eos=False)
        assert res.new_tokens == ref
        assert sum(res.accepted_lengths) + 1 == N_NEW
        calls += res.target_calls
    assert calls < len(prompts) * N_NEW  # the draft did save target passes


@pytest.mark.parametrize("gamma", [1, 4])
def test_chain_is_lossless(embedded_pair, prompts, references, gamma):
    target, draft, _ = embedded_pair
    dec = SpecDecoder(target, draft, backend="torch")
    for ids, ref in zip(prompts, references):
        assert dec.generate(ids, method="chain", gamma=gamma, max_new_tokens=N_NEW, stop_at_eos=False).new_tokens == ref


def test_sdpa_backend_agrees(embedded_pair, prompts, references):
    target, draft, _ = embedded_pair
    dec = SpecDecoder(target, draft, backend="sdpa")
    res = dec.generate(prompts[0], method="tree", max_new_tokens=N_NEW, stop_at_eos=False)
    assert res.new_tokens == references[0]


def test_commit_equals_fresh_prefill(embedded_pair, prompts, monkeypatch):
    """After tree steps with commits, the target's cache equals a fresh prefill of the committed text."""
    from longspec_lab.decoding import steps

    target, draft, _ = embedded_pair
    dec = SpecDecoder(target, draft, backend="torch")
    ids = prompts[1][:600]
    captured = {}
    orig = steps.commit

    def spy(st):
        orig(st)
        captured["state"] = st

    monkeypatch.setattr(steps, "commit", spy)
    res = dec.generate(ids, method="tree", max_new_tokens=40, stop_at_eos=False)
    st = captured["state"]
    committed = ids + res.new_tokens[:-1]  # the newest token (root) is not in the cache yet
    L = len(committed)  # the last step may have accepted more than max_new_tokens lets through
    assert L <= int(st.P) <= L + 6
    fresh = target.new_cache(len(committed) + 8)
    with torch.no_grad():
        target(torch.tensor([committed]), cache=fresh, start=0)
    assert torch.allclose(st.tcache.k[:, :, :, :L], fresh.k[:, :, :, :L], atol=1e-4)
    assert torch.allclose(st.tcache.v[:, :, :, :L], fresh.v[:, :, :, :L], atol=1e-4)


def test_trace_records_are_consistent(embedded_pair, prompts):
    target, draft, tok = embedded_pair
    dec = SpecDecoder(target, draft, tokenizer=tok)
    res = dec.generate(prompts[2], method="tree", max_new_tokens=30, trace=True, stop_at_eos=False)
    assert len(res.trace) == len(res.accepted_lengths) == res.target_calls - 1
    produced = [res.new_tokens[0]]
    for rec in res.trace:
        assert rec.tree.num_nodes == 69 and rec.mask.shape == (69, 69)
        assert rec.tree.tokens[0] == produced[-1]  # root = the last committed token
        path = rec.result.path.tolist()
        assert rec.tree.tokens[path[1:]].tolist() == rec.result.emitted[:-1].tolist()
        produced += rec.emitted
        assert rec.text == tok.decode(produced)
    assert produced == res.new_tokens


def test_max_new_tokens_exact_and_eos(embedded_pair, prompts):
    target, draft, _ = embedded_pair
    dec = SpecDecoder(target, draft)
    for n in (1, 2, 7):
        assert len(dec.generate(prompts[0], max_new_tokens=n, stop_at_eos=False).new_tokens) == n
    full = dec.generate(prompts[0], max_new_tokens=20, stop_at_eos=False).new_tokens
    eos_tok = full[5]  # pretend this token is EOS: generation must stop right after it
    old = target.config.eos_token_id
    target.config.eos_token_id = eos_tok
    try:
        res = dec.generate(prompts[0], max_new_tokens=20)
    finally:
        target.config.eos_token_id = old
    assert res.stopped_at_eos and res.new_tokens == full[: full.index(eos_tok) + 1]


def test_bad_input_leaves_decoder_usable(embedded_pair, prompts):
    target, draft, _ = embedded_pair
    dec = SpecDecoder(target, draft)
    ids = prompts[0][:200]
    good = dec.generate(ids, max_new_tokens=10).new_tokens
    for bad, msg in [([4, 0, 16], "width 0"), ([4, -2], "width -2"), ([4, 2.5], "2.5")]:
        with pytest.raises(ValueError, match=msg):
            dec.generate(ids, tree_shape=bad, max_new_tokens=10)
    with pytest.raises(ValueError, match="cap of 1024"):
        dec.generate(ids, tree_shape=[target.config.vocab_size + 1], max_new_tokens=10)
    V = target.config.vocab_size
    for bad, msg in [
        (torch.tensor(ids, dtype=torch.float32), "dtype torch.float32"),  # never cast silently
        (torch.ones(5, dtype=torch.bool), "dtype torch.bool"),
        ([1, V], f"outside the vocabulary \\[0, {V}\\)"),
        ([-1, 2], "token -1 at position 0"),
        ([99999], "outside the vocabulary"),
        ("def f():", "must be token ids, got str"),
        (None, "got NoneType"),
        ([1, 2.5], "not an integer token id"),
        ([[1, 2], [3, 4]], "batch 1"),
        ([], "empty"),
    ]:
        with pytest.raises(ValueError, match=msg):
            dec.generate(bad, max_new_tokens=4)
    small = SpecDecoder(target, draft, max_cache_len=len(ids) + 40)
    with pytest.raises(ValueError, match="cache holds"):
        small.generate(ids, tree_shape=[4, 16, 16, 16, 16], max_new_tokens=10)
    assert small.generate(ids, tree_shape=[2, 2], max_new_tokens=10).new_tokens == good
    assert dec.generate(ids, max_new_tokens=10).new_tokens == good


def _ar_and_tree_rows(target, draft, prompt):
    """The logits of the token after `prompt` from a padded AR pass (1 row of 128) and from the verify pass of a
    drafted [4,16,16,16,16] tree (its root row), both in batch-invariant form."""
    from longspec_lab.decoding import steps
    from longspec_lab.spec.tree import TreeShape

    with torch.inference_mode():
        a = steps.DecodeState(target, draft, None, 600, "torch", rows=128)
        steps.prefill(a, prompt)
        b = steps.DecodeState(target, draft, TreeShape((4, 16, 16, 16, 16)), 600, "torch", rows=128)
        steps.prefill(b, prompt)
        steps.draft_root(b)
        for level in range(2, 6):
            steps.draft_next(b, level)
        return steps.ar_forward(a), steps.verify_forward(b)[0]


def test_batch_invariant_mode_is_lossless_and_row_invariant(embedded_pair, prompts):
    """Padded passes change nothing in float32 (same tokens as the default mode and as each other), and
    a token's logits are bit-identical whether its pass held 1 row (ar) or the whole tree."""
    target, draft, _ = embedded_pair
    ids = prompts[0][:500]
    plain = SpecDecoder(target, draft)
    inv = SpecDecoder(target, draft, batch_invariant=True)
    want = plain.generate(ids, method="ar", max_new_tokens=24, stop_at_eos=False).new_tokens
    for method, kw in [("ar", {}), ("chain", {"gamma": 4}), ("tree", {})]:
        res = inv.generate(ids, method=method, max_new_tokens=24, stop_at_eos=False, **kw)
        assert res.new_tokens == want, method
    prompt = torch.tensor(ids)
    ar_row, tree_row = _ar_and_tree_rows(target, draft, prompt)
    assert torch.equal(ar_row, tree_row)
    with pytest.raises(ValueError, match="batch-invariant passes have 128 rows"):
        inv.generate(ids, tree_shape=[8, 64, 64], max_new_tokens=4)
    with pytest.raises(ValueError, match="batch_invariant"):
        SpecDecoder(target, draft, batch_invariant=-3)
    assert inv.generate(ids, method="ar", max_new_tokens=24, stop_at_eos=False).new_tokens == want  # still works


def test_batch_invariant_rows_with_the_rope_tables_kernel(embedded_pair, prompts, monkeypatch):
    """LONGSPEC_ROPE_TABLES=on (the kernel in Triton's interpreter): a token's logits stay bit-identical whether
    its padded pass held 1 row (ar) or the whole tree, as with the PyTorch tables; the kernel made them."""
    from longspec_lab.kernels import rope as rope_kernel
    from longspec_lab.ops import rope

    calls, real = [], rope_kernel.rope_tables
    monkeypatch.setattr(rope_kernel, "rope_tables", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(rope, "ROPE_TABLES", "on")
    target, draft, _ = embedded_pair
    prompt = torch.tensor(prompts[0][:500])
    ar_row, tree_row = _ar_and_tree_rows(target, draft, prompt)
    assert torch.equal(ar_row, tree_row)
    assert calls.count((1, 128)) == 2  # the AR pass and the verify pass, each padded to 128 rows


def test_window_rows_made_once_give_the_levels_each_computes(embedded_pair, prompts):
    """draft_root makes every later level's window row and RoPE row at once (`DecodeState.window_rows`,
    `window_rope`); each level drafting with its own `ring.visible(qpos, committed_only=True)` and RoPE tables
    instead (tree_level's defaults) grows the same tree, bit for bit, on a ring that has ingested several steps."""
    from longspec_lab.decoding import steps
    from longspec_lab.spec.tree import TreeShape

    target, draft, _ = embedded_pair
    st = steps.DecodeState(target, draft, TreeShape((2, 3, 3, 3)), 3000, "torch")
    with torch.inference_mode():
        steps.prefill(st, torch.tensor(prompts[0][:700]))
        for _ in range(3):  # a few steps: pending blocks of several tokens, a ring that has moved on
            for _, stage in steps.greedy_stages(st):
                stage()
        steps.draft_root(st)
        for level in range(2, st.D + 1):
            steps.draft_next(st, level)
        grown = [t.clone() for t in (st.tree.tokens, st.tree.scores, st.tree.anc)]
        pos = st.P + torch.arange(1, st.D)
        rows = st.ring.visible(pos, committed_only=True)
        assert torch.equal(st.window_rows, rows) and rows.any(1).all()
        for made, table in zip(st.window_rope, st.draft.target.rotary(pos[None], st.draft.dtype)):
            assert torch.equal(made, table)  # the RoPE rows of those depths
        buf, (tk, tv) = st.tree, st.target_kv
        for level in range(2, st.D + 1):  # the levels again, each computing its own window
            lo, hi = buf.levels[level - 1]
            qpos = st.P + buf.depths[lo:hi]
            h = st.draft.tree_level(buf.tokens[lo:hi], qpos, lo - 1, buf.anc[lo:hi, 1:], st.ring, tk, tv, st.P,
                                    hidden=True)  # fmt: skip
            steps.beam_rule(buf, level, h, st.draft)
        for a, b in zip(grown, (buf.tokens, buf.scores, buf.anc)):
            assert torch.equal(a, b)


def test_tokens_after_an_eos_are_kept_without_stop_at_eos(embedded_pair, hf_embedded):
    """stop_at_eos=False keeps every accepted token, an EOS in the middle of a step's path included: chain and tree
    then equal transformers' greedy generate with no EOS, token for token (a short code prompt whose continuation
    emits EOS early, then goes on)."""
    target, draft, tok = embedded_pair
    ids = tok.encode("def add(a, b):\n    return")
    with torch.no_grad():
        out = hf_embedded.generate(
            torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    ref = out[0, len(ids) :].tolist()
    eos = set(target.config.eos_ids)
    assert any(t in eos for t in ref[:-8]), "the case needs an EOS well before the end"
    dec = SpecDecoder(target, draft, backend="torch")
    for kw in ({"method": "tree"}, {"method": "tree", "tree_shape": [2, 2, 2, 2, 2]}, {"method": "chain", "gamma": 5}):
        res = dec.generate(ids, max_new_tokens=40, stop_at_eos=False, **kw)
        assert res.new_tokens == ref, kw
        assert sum(res.accepted_lengths) + 1 == 40 and not res.stopped_at_eos
    fast = GraphDecoder(target, draft, capacity=700).generate(ids, max_new_tokens=40, stop_at_eos=False)
    assert fast.new_tokens == ref  # the fast path's own loop, on the CPU without capture
    stopped = dec.generate(ids, max_new_tokens=40)  # the default stops at the first EOS, which it includes
    first = next(i for i, t in enumerate(ref) if t in eos)
    assert stopped.new_tokens == ref[: first + 1] and stopped.stopped_at_eos
