"""The exact test: speculative sampling reproduces the target's sampling distribution.

A tiny random "model" (vocabulary 8) is a lookup table of logits for every context of up to 5
generated tokens, one table for the target and one for the draft, so the exact probability of each of
the 8^3 possible first three tokens is a product of three table entries. For each lossless rule, at
several temperatures and tree shapes, 20,000 speculative generations run side by side (one
vectorised walk over all of them per step, `verify.verify_batch`, the same code the decoder calls with
one tree) and a chi-square goodness-of-fit test compares their first three tokens with the exact
distribution (cells with expected count < 5 pooled). Lossless rules must pass at p > 0.001; the biased
"naive-topk" rule must be rejected with p < 1e-6 on a case built so its bias is large.
"""

import math

import pytest
import torch

from longspec_lab.ops.sampling import SamplingParams, make_generator, probs_from_logits
from longspec_lab.spec.draft import grow_sampled_batch
from longspec_lab.spec.verify import verify_batch
from longspec_lab.teach import toy_lm as exact
from longspec_lab.teach.toy_lm import TableLM

N_SAMPLES = 20_000
T = 3  # tokens compared


def speculative_samples(model, rule, drafting, shape, params, n=N_SAMPLES, seed=0):
    """n runs of speculative decoding until T tokens -> cell index [n] of the first T tokens."""
    return exact.speculative_samples(model, rule, shape, params, n_tokens=T, n=n, seed=seed, drafting=drafting)


def gof_pvalue(cells, probs):
    """Chi-square goodness of fit against the exact probabilities (rare cells pooled); a sequence
    of probability 0 fails outright."""
    return exact.gof_pvalue(cells, probs.numpy())


MODEL = TableLM.random(vocab=8, max_len=5, seed=1)  # tables: longspec_lab/teach/toy_lm.py, checked in test_toy_lm.py
CASES = [  # (rule, drafting, tree shape, top_k, top_p)
    ("target-sample", "beam", [3, 3, 2], None, None),
    ("target-sample", "beam", [2, 4], None, None),
    ("target-sample", "sampled", [3, 4, 2], None, None),
    ("rrs", "sampled", [3, 4, 2], None, None),
    ("rrs", "sampled", [6, 2], None, None),
    ("chain", "sampled", [1, 1, 1], None, None),
]
FILTERED = [  # top-k / top-p on both models; rrs children outnumber q's support (padding)
    ("target-sample", "beam", [3, 3], 3, 0.9),
    ("rrs", "sampled", [4, 4], 3, 0.9),
    ("rrs", "sampled", [5, 3], None, 0.8),
    ("chain", "sampled", [1, 1], 5, None),
]


def _id(case):
    rule, drafting, shape, k, p = case
    return f"{rule}-{drafting}-{'x'.join(map(str, shape))}" + (f"-k{k}" if k else "") + (f"-p{p}" if p else "")


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_lossless_rules_match_exact_distribution(case, temperature):
    rule, drafting, shape, top_k, top_p = case
    params = SamplingParams(temperature, top_k, top_p)
    cells = speculative_samples(MODEL, rule, drafting, shape, params, seed=int(temperature * 10))
    pval = gof_pvalue(cells, MODEL.exact(params, T))
    print(f"{_id(case)} T={temperature}: p = {pval:.4g}")
    assert pval > 1e-3


@pytest.mark.parametrize("case", FILTERED, ids=_id)
def test_lossless_rules_with_top_k_top_p(case):
    rule, drafting, shape, top_k, top_p = case
    params = SamplingParams(1.0, top_k, top_p)
    cells = speculative_samples(MODEL, rule, drafting, shape, params, seed=7)
    pval = gof_pvalue(cells, MODEL.exact(params, T))
    print(f"{_id(case)}: p = {pval:.4g}")
    assert pval > 1e-3


# Draft == target and flat-ish logits: a top-k sibling is always accepted at ratio p/q = 1, so
# naive-topk emits the draft's first choice every time instead of a sample.
SAME = TableLM.random(vocab=8, max_len=5, seed=2, scale=0.7, same=True)


def test_naive_topk_is_rejected():
    params = SamplingParams(1.0)
    cells = speculative_samples(SAME, "naive-topk", "beam", [2, 2, 2], params, seed=3)
    pval = gof_pvalue(cells, SAME.exact(params, T))
    print(f"naive-topk: p = {pval:.3g}")
    assert pval < 1e-6


@pytest.mark.parametrize("rule,drafting", [("rrs", "sampled"), ("target-sample", "beam")])
def test_lossless_rules_pass_the_naive_topk_case(rule, drafting):
    params = SamplingParams(1.0)
    cells = speculative_samples(SAME, rule, drafting, [2, 2, 2], params, seed=3)
    assert gof_pvalue(cells, SAME.exact(params, T)) > 1e-3


def test_speculation_saves_steps():
    """Not a vacuous walk: with a correlated draft, rrs accepts drafted tokens (more than 1 per step)."""
    params = SamplingParams(1.0)
    gen = make_generator(0)
    Q = probs_from_logits(MODEL.draft, params, torch.float64)
    P = probs_from_logits(MODEL.target, params, torch.float64)
    n = 4000
    batch, q = grow_sampled_batch(
        torch.zeros(n, dtype=torch.long),
        [3, 4, 2],
        lambda t, p, ids: Q[
            MODEL.node_codes(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), t, p)[0][:, ids]
        ],
        gen,
    )
    codes, _ = MODEL.node_codes(
        torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), batch.tokens, batch.parents
    )
    res = verify_batch("rrs", batch, P[codes], q, gen)
    assert 1.3 < res.lengths.double().mean() <= 4
    assert math.isclose(float((res.lengths >= 2).double().mean()), float(res.on_path[:, 1:4].any(1).double().mean()))


def test_rrs_without_removing_rejected_tokens_is_rejected():
    """Power against a subtle bug: sampled siblings verified without removing x from q' (the
    naive-topk update) is biased, and the test sees it."""
    params = SamplingParams(1.0)
    cells = speculative_samples(MODEL, "naive-topk", "sampled", [3, 4, 2], params, seed=5)
    assert gof_pvalue(cells, MODEL.exact(params, T)) < 1e-6
