"""The tuner's exact acceptance (bench/tune.py: position_accepts, step_accepts_nested, renewal_tau) against the
decoder itself: on the embedded pair in float32 on the CPU, the tau it predicts for a chain and for trees of
several shapes equals the tau the decoder measures when it runs those shapes on the same prompt."""

import pytest
import torch

from longspec_lab.bench import tune
from longspec_lab.decoding.eager import SpecDecoder
from longspec_lab.spec.tree import TreeShape


@pytest.mark.parametrize("n_tokens", [24])
def test_every_position_predicts_the_measured_tau(embedded_pair, n_tokens):
    target, draft, tok = embedded_pair
    from longspec_lab.paths import load_prompts

    ids = tok.encode(load_prompts(min_tokens=1000)[0]["text"])[:200]
    probe = TreeShape.of([4, 8, 8, 8])
    shapes = [[1], [1, 1, 1, 1], [2, 2], [4, 8, 8, 8], [1, 2, 4, 2], [3, 1, 5]]
    dec = SpecDecoder(target, draft)
    torch.manual_seed(0)
    predicted = tune.renewal_tau(tune.position_accepts(dec, [ids], probe, shapes, n_tokens), n_tokens)
    for shape, want in zip(shapes, predicted.tolist()):
        r = dec.generate(ids, method="tree", tree_shape=shape, max_new_tokens=n_tokens, stop_at_eos=False)
        measured = (len(r.new_tokens) - 1) / (r.target_calls - 1)
        assert measured == pytest.approx(want, abs=1e-12), shape
