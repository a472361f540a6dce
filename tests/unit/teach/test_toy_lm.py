"""longspec_lab.exact: the enumerated distribution of a table LM, and speculative samples of it.

References: a brute-force recursion over explicit token tuples with a plain softmax (no shared code
with toy_lm.py's vectorised enumeration), numpy sums for marginals, and the rules' known behaviour
(lossless rules fit the exact distribution, naive-topk with draft == target does not).
"""

import itertools
import math

import numpy as np
import pytest
import torch

from longspec_lab.ops.sampling import SamplingParams
from longspec_lab.teach import toy_lm as exact


def brute_force(model, temperature, n_tokens):
    """{tuple: probability} by walking every sequence, coding contexts by a dict built on the fly."""
    V = model.vocab
    codes = {(): 0}
    for length in range(1, model.max_len + 1):  # contexts in code order: by length, then base V
        for seq in itertools.product(range(V), repeat=length):
            codes[seq] = len(codes)
    out = {}
    for seq in itertools.product(range(V), repeat=n_tokens):
        p = 1.0
        for i, x in enumerate(seq):
            logits = model.target[codes[seq[:i]]]
            p *= float(torch.softmax(logits / temperature, -1)[x])
        out[seq] = p
    return out


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_exact_matches_brute_force(temperature):
    model = exact.TableLM.random(vocab=4, max_len=3, seed=3)
    got = exact.TableLM.exact(model, SamplingParams(temperature), 3)
    ref = brute_force(model, temperature, 3)
    for i, seq in enumerate(itertools.product(range(4), repeat=3)):  # index = base-4 number
        assert math.isclose(float(got[i]), ref[seq], rel_tol=1e-9, abs_tol=1e-15)
    assert math.isclose(float(got.sum()), 1.0, rel_tol=1e-12)


def test_child_codes_enumerate_every_context_once():
    model = exact.TableLM.random(vocab=3, max_len=3)
    seen = {0}
    frontier = [(0, 0)]
    for _ in range(3):
        nxt = []
        for code, length in frontier:
            for x in range(3):
                c = model.child_code(code, length, x)
                assert c not in seen
                seen.add(c)
                nxt.append((c, length + 1))
        frontier = nxt
    assert seen == set(range(model.target.shape[0]))


def test_marginal_and_total_variation():
    rng = np.random.default_rng(0)
    p = rng.random(27)
    p /= p.sum()
    cube = p.reshape(3, 3, 3)
    assert np.allclose(exact.marginal(p, 3, 3, 0), [cube[i].sum() for i in range(3)])
    assert np.allclose(exact.marginal(p, 3, 3, 2), [cube[:, :, k].sum() for k in range(3)])
    q = np.roll(p, 1)
    assert math.isclose(exact.total_variation(p, q), sum(abs(a - b) for a, b in zip(p, q)) / 2)
    assert exact.total_variation(p, p) == 0


@pytest.mark.parametrize("rule,shape", [("target-sample", [3, 2]), ("rrs", [3, 2]), ("chain", [1, 1])])
def test_lossless_rules_fit_the_exact_distribution(rule, shape):
    model = exact.TableLM.random(vocab=6, max_len=4, seed=1)
    params = SamplingParams(1.0)
    cells = exact.speculative_samples(model, rule, shape, params, n_tokens=2, n=6000, seed=2)
    ref = model.exact(params, 2)
    assert exact.gof_pvalue(cells, ref) > 1e-3
    assert exact.total_variation(exact.empirical(cells, ref.numel()), ref) < 0.06


def test_naive_topk_is_visibly_biased():
    """Draft == target: every top-1 sibling is accepted at ratio 1, so the first token is the argmax."""
    model = exact.TableLM.random(vocab=6, max_len=4, seed=2, scale=0.7, same=True)
    params = SamplingParams(1.0)
    cells = exact.speculative_samples(model, "naive-topk", [2, 2], params, n_tokens=2, n=4000, seed=3)
    ref = model.exact(params, 2)
    assert exact.gof_pvalue(cells, ref) < 1e-6
    first = exact.marginal(exact.empirical(cells, ref.numel()), 2, 6, 0)
    assert first.argmax() == int(model.target[0].argmax()) and first.max() > 0.99


def test_gof_pvalue_zero_for_impossible_sequence():
    ref = torch.tensor([0.5, 0.5, 0.0])
    assert exact.gof_pvalue(torch.tensor([0, 1, 2, 0]), ref) == 0.0


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda m: exact.speculative_samples(m, "bogus", [2], SamplingParams(1.0)), "unknown"),
        (lambda m: exact.speculative_samples(m, "rrs", [2], SamplingParams(1.0), drafting="x"), "drafting"),
        (lambda m: exact.speculative_samples(m, "rrs", [2, 2, 2], SamplingParams(1.0), n_tokens=3), "max_len"),
        (lambda m: m.exact(SamplingParams(1.0), 9), "max_len"),
        (lambda m: exact.marginal(np.ones(4) / 4, 2, 2, 5), "position"),
    ],
)
def test_bad_input_names_the_fix(call, words):
    model = exact.TableLM.random(vocab=4, max_len=3)
    with pytest.raises(ValueError, match=words):
        call(model)
