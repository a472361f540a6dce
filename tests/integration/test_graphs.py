"""The static-shape fast path (CUDA graphs on the GPU) gives the eager loop's tokens and target
calls; on the CPU its stage functions run eagerly."""

import pytest

from longspec_lab.decoding.eager import SpecDecoder
from longspec_lab.decoding.graphs import FastDecoder
from longspec_lab.paths import load_prompts

CASES = [
    ("ar", {}),
    ("chain", {"gamma": 4}),
    ("tree", {}),
    ("tree", {"tree_shape": [1, 3, 9]}),
    ("tree", {"tree_shape": [2, 2, 2, 2, 2, 2, 2, 2]}),
]


@pytest.fixture(scope="module")
def decoders(embedded_pair):
    target, draft, tok = embedded_pair
    return SpecDecoder(target, draft), FastDecoder(target, draft, capacity=1400), tok


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_fast_equals_eager(decoders, method, kw):
    ref, fast, tok = decoders
    for p in load_prompts(min_tokens=1000)[:2]:
        ids = tok.encode(p["text"])[:1200]
        a = ref.generate(ids, method=method, max_new_tokens=33, stop_at_eos=False, **kw)
        b = fast.generate(ids, method=method, max_new_tokens=33, stop_at_eos=False, **kw)
        assert b.new_tokens == a.new_tokens
        assert b.target_calls == a.target_calls  # the same trees were drafted and accepted


def test_fast_eos_and_capacity(decoders, embedded_pair):
    ref, fast, tok = decoders
    target = embedded_pair[0]
    ids = tok.encode(load_prompts(min_tokens=1000)[1]["text"])[:500]
    full = ref.generate(ids, max_new_tokens=20, stop_at_eos=False).new_tokens
    old = target.config.eos_token_id
    target.config.eos_token_id = full[6]
    try:
        res = fast.generate(ids, max_new_tokens=20)
    finally:
        target.config.eos_token_id = old
    assert res.stopped_at_eos and res.new_tokens == full[: full.index(full[6]) + 1]
    with pytest.raises(ValueError, match="fast decoder holds"):
        fast.generate(ids * 3, max_new_tokens=20)
    assert fast.generate(ids, max_new_tokens=20, stop_at_eos=False).new_tokens == full
