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

import numpy as np
import pytest
import torch
from scipy import stats

from longspec_lab.sample_tree import grow_beam_tree_q, grow_sampled_batch
from longspec_lab.sampling import SamplingParams, make_generator, probs_from_logits
from longspec_lab.tree import grow_beam_tree
from longspec_lab.verify import TreeBatch, verify_batch

V, T, MAX_LEN = 8, 3, 5          # vocabulary, tokens compared, longest context in the tables
OFF = [sum(V ** i for i in range(n)) for n in range(MAX_LEN + 2)]  # code offset of length-n contexts
N_SAMPLES = 20_000


def child_code(code, length, x):
    """Code of context + [x], for a context of `length` tokens with code `code` (tensors or ints)."""
    off = torch.tensor(OFF)
    length = torch.as_tensor(length)
    return off[length + 1] + (code - off[length]) * V + x


class TableModel:
    """Logits for every context (code) up to MAX_LEN tokens: target, and a correlated draft."""

    def __init__(self, seed, scale=1.5, same=False):
        g = torch.Generator().manual_seed(seed)
        n = OFF[MAX_LEN + 1]
        self.target = scale * torch.randn(n, V, generator=g, dtype=torch.float64)
        noise = scale * torch.randn(n, V, generator=g, dtype=torch.float64)
        self.draft = self.target.clone() if same else 0.6 * self.target + 0.8 * noise

    def exact(self, params):
        """P(first T tokens) [V ** T] by enumeration."""
        P = probs_from_logits(self.target, params, torch.float64)
        prob, code = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
        for n in range(T):
            prob = (prob[:, None] * P[code]).flatten()                   # [V ** (n + 1)], x_n fastest last
            code = child_code(code[:, None], n, torch.arange(V)).flatten()
        return prob


def node_codes(root_code, root_len, tokens, parents):
    """Context code and length of every node: tokens/parents [B, N] (or parents [N])."""
    B, N = tokens.shape
    parents = parents.expand(B, N) if parents.dim() == 1 else parents
    codes = torch.empty(B, N, dtype=torch.long)
    lens = torch.empty(B, N, dtype=torch.long)
    codes[:, 0], lens[:, 0] = root_code, root_len
    ar = torch.arange(B)
    for i in range(1, N):
        pc, pl = codes[ar, parents[:, i]], lens[ar, parents[:, i]]
        codes[:, i], lens[:, i] = child_code(pc, pl, tokens[:, i]), pl + 1
    return codes, lens


def speculative_samples(model, rule, drafting, shape, params, n=N_SAMPLES, seed=0):
    """n runs of speculative decoding until T tokens -> cell index [n] of the first T tokens."""
    gen = make_generator(seed)
    P = probs_from_logits(model.target, params, torch.float64)        # [contexts, V]
    Q = probs_from_logits(model.draft, params, torch.float64)
    out = torch.full((n, T), -1, dtype=torch.long)
    count = torch.zeros(n, dtype=torch.long)
    code = torch.zeros(n, dtype=torch.long)                            # context = tokens emitted so far
    while bool((count < T).any()):
        rows = (count < T).nonzero().flatten()
        rc, rl = code[rows], count[rows]
        if drafting == "sampled":
            def level_probs(tokens, parents, node_ids):
                codes, _ = node_codes(rc, rl, tokens, parents)
                return Q[codes[:, node_ids]]
            batch, q = grow_sampled_batch(torch.zeros(len(rows), dtype=torch.long), shape, level_probs, gen)
        else:  # beam tree per distinct context, drafted from the draft's raw log-probs as decode.py does
            uniq, inv = torch.unique(rc, return_inverse=True)
            trees = []
            for c in uniq.tolist():
                l = int(rl[(rc == c).nonzero()[0, 0]])

                def level_logprobs(partial, node_ids, c=c, l=l):
                    codes, _ = node_codes(torch.tensor([c]), torch.tensor([l]), partial.tokens[None],
                                          partial.parents)
                    return torch.log_softmax(model.draft[codes[0, node_ids]], -1)
                trees.append(grow_beam_tree_q(0, shape, level_logprobs, params) if rule == "naive-topk" else
                             (grow_beam_tree(0, shape, level_logprobs), None))
            ub = TreeBatch.of([t for t, _ in trees])
            batch = TreeBatch(ub.tokens[inv], ub.parents[inv], ub.shape)
            q = torch.stack([q for _, q in trees])[inv] if rule == "naive-topk" else None
        codes, _ = node_codes(rc, rl, batch.tokens, batch.parents)
        res = verify_batch(rule, batch, P[codes], q, gen)
        for j in range(res.emitted.shape[1]):                         # append, cut at T tokens
            x = res.emitted[:, j]
            ok = (x >= 0) & (rl < T)
            r = rows[ok]
            out[r, rl[ok]] = x[ok]
            rc = torch.where(ok, child_code(rc, rl, x.clamp(min=0)), rc)
            rl = rl + ok.long()
        code[rows], count[rows] = rc, rl
    return (out * torch.tensor([V ** (T - 1 - i) for i in range(T)])).sum(1)


def gof_pvalue(cells, exact):
    """Chi-square goodness of fit of sampled cells against exact probabilities (rare cells pooled)."""
    obs = np.bincount(cells.numpy(), minlength=exact.numel()).astype(float)
    exp = exact.numpy() * len(cells)
    assert obs[exp == 0].sum() == 0, "a sequence of probability 0 was generated"
    obs, exp = obs[exp > 0], exp[exp > 0]
    rare = exp < 5
    if rare.any():
        obs = np.append(obs[~rare], obs[rare].sum())
        exp = np.append(exp[~rare], exp[rare].sum())
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


MODEL = TableModel(seed=1)
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
    pval = gof_pvalue(cells, MODEL.exact(params))
    print(f"{_id(case)} T={temperature}: p = {pval:.4g}")
    assert pval > 1e-3


@pytest.mark.parametrize("case", FILTERED, ids=_id)
def test_lossless_rules_with_top_k_top_p(case):
    rule, drafting, shape, top_k, top_p = case
    params = SamplingParams(1.0, top_k, top_p)
    cells = speculative_samples(MODEL, rule, drafting, shape, params, seed=7)
    pval = gof_pvalue(cells, MODEL.exact(params))
    print(f"{_id(case)}: p = {pval:.4g}")
    assert pval > 1e-3


# Draft == target and flat-ish logits: a top-k sibling is always accepted at ratio p/q = 1, so
# naive-topk emits the draft's first choice every time instead of a sample.
SAME = TableModel(seed=2, scale=0.7, same=True)


def test_naive_topk_is_rejected():
    params = SamplingParams(1.0)
    cells = speculative_samples(SAME, "naive-topk", "beam", [2, 2, 2], params, seed=3)
    pval = gof_pvalue(cells, SAME.exact(params))
    print(f"naive-topk: p = {pval:.3g}")
    assert pval < 1e-6


@pytest.mark.parametrize("rule,drafting", [("rrs", "sampled"), ("target-sample", "beam")])
def test_lossless_rules_pass_the_naive_topk_case(rule, drafting):
    params = SamplingParams(1.0)
    cells = speculative_samples(SAME, rule, drafting, [2, 2, 2], params, seed=3)
    assert gof_pvalue(cells, SAME.exact(params)) > 1e-3


def test_speculation_saves_steps():
    """Not a vacuous walk: with a correlated draft, rrs accepts drafted tokens (more than 1 per step)."""
    params = SamplingParams(1.0)
    gen = make_generator(0)
    Q = probs_from_logits(MODEL.draft, params, torch.float64)
    P = probs_from_logits(MODEL.target, params, torch.float64)
    n = 4000
    batch, q = grow_sampled_batch(torch.zeros(n, dtype=torch.long), [3, 4, 2],
                                  lambda t, p, ids: Q[node_codes(torch.zeros(n, dtype=torch.long),
                                                                 torch.zeros(n, dtype=torch.long), t, p)[0][:, ids]],
                                  gen)
    codes, _ = node_codes(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), batch.tokens,
                          batch.parents)
    res = verify_batch("rrs", batch, P[codes], q, gen)
    assert 1.3 < res.lengths.double().mean() <= 4
    assert math.isclose(float((res.lengths >= 2).double().mean()),
                        float(res.on_path[:, 1:4].any(1).double().mean()))


def test_rrs_without_removing_rejected_tokens_is_rejected():
    """Power against a subtle bug: sampled siblings verified without removing x from q' (the
    naive-topk update) is biased, and the test sees it."""
    params = SamplingParams(1.0)
    cells = speculative_samples(MODEL, "naive-topk", "sampled", [3, 4, 2], params, seed=5)
    assert gof_pvalue(cells, MODEL.exact(params)) < 1e-6
