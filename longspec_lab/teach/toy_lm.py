"""Exact sampling distributions of a tiny lookup-table language model, and speculative samples of it.

Lossless speculative sampling (LongSpec, arXiv 2502.17421; docs/LONGSPEC.md section 4) claims that the
tokens it emits are distributed EXACTLY as plain sampling from the target. On a real model that can
only be tested statistically against another sampler. On a model small enough to enumerate it can be
tested against the truth:

  * `TableLM` is a "language model" over a vocabulary of V tokens whose logits are a lookup table
    indexed by the whole context (every context of up to `max_len` generated tokens), one table for
    the target and one for a correlated draft. Context (x1..xn) has the integer code
    sum_{i<n} V^i + (x1..xn read as a base-V number).
  * `TableLM.exact(params, n_tokens)` enumerates all V^n sequences: P(x1..xn) = prod_i p(x_i | x_<i),
    with p the target's distribution after temperature / top-k / top-p (sampling.probs_from_logits).
  * `speculative_samples` runs many speculative generations side by side with the library's own
    drafting (spec.draft.grow_beam_tree / grow_sampled_batch) and verification (spec.verify.verify_batch) until each has
    n tokens, and returns the index of every generated sequence in that enumeration.

`gof_pvalue` (chi-square goodness of fit) and `total_variation` compare the two. Used by
notebooks/06 and tests/unit/teach/test_toy_lm.py.

Taught in: notebooks/06_sampling_without_bias.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from longspec_lab.ops.sampling import SamplingParams, make_generator, probs_from_logits
from longspec_lab.spec.draft import grow_beam_tree, grow_sampled_batch
from longspec_lab.spec.tree import TreeBatch, TreeShape
from longspec_lab.spec.verify import MODES, verify_batch

DRAFTING = {"target-sample": "beam", "rrs": "sampled", "chain": "sampled", "naive-topk": "beam", "greedy": "beam"}


@dataclass
class TableLM:
    target: torch.Tensor  # [n_contexts, V] float64 logits
    draft: torch.Tensor  # [n_contexts, V]
    max_len: int  # longest context with its own row

    @classmethod
    def random(
        cls, vocab: int = 8, max_len: int = 5, seed: int = 0, scale: float = 1.5, same: bool = False, mix: float = 0.6
    ) -> "TableLM":
        """Gaussian logits; draft = mix * target + sqrt(1 - mix^2) * noise (or the target itself)."""
        if vocab < 2 or max_len < 1:
            raise ValueError(
                f"TableLM needs vocab >= 2 and max_len >= 1, got {vocab} and {max_len}; "
                "e.g. TableLM.random(vocab=8, max_len=5)"
            )
        n = sum(vocab**i for i in range(max_len + 1))
        if n * vocab > 50_000_000:
            raise ValueError(f"{n} contexts x {vocab} tokens is too large to enumerate; lower vocab or max_len")
        g = torch.Generator().manual_seed(seed)
        target = scale * torch.randn(n, vocab, generator=g, dtype=torch.float64)
        noise = scale * torch.randn(n, vocab, generator=g, dtype=torch.float64)
        draft = target.clone() if same else mix * target + (1 - mix**2) ** 0.5 * noise
        return cls(target, draft, max_len)

    @property
    def vocab(self) -> int:
        return self.target.shape[1]

    def offset(self, length):
        """Code of the first context of `length` tokens (int or tensor): sum_{i<length} V^i."""
        V = self.vocab
        if isinstance(length, torch.Tensor):
            return (V**length - 1) // (V - 1)
        return (V ** int(length) - 1) // (V - 1)

    def child_code(self, code, length, x):
        """Code of context + [x], for a context of `length` tokens with code `code`."""
        return self.offset(length + 1) + (code - self.offset(length)) * self.vocab + x

    def node_codes(self, root_code, root_len, tokens, parents):
        """Context code and length after every tree node: tokens [B, N], parents [N] or [B, N]; the
        root's context is (root_code, root_len) per row, each node appends its own token."""
        B, N = tokens.shape
        parents = parents.expand(B, N) if parents.dim() == 1 else parents
        codes = torch.empty(B, N, dtype=torch.long)
        lens = torch.empty(B, N, dtype=torch.long)
        codes[:, 0], lens[:, 0] = root_code, root_len
        ar = torch.arange(B)
        for i in range(1, N):  # parents come first
            pc, pl = codes[ar, parents[:, i]], lens[ar, parents[:, i]]
            codes[:, i], lens[:, i] = self.child_code(pc, pl, tokens[:, i]), pl + 1
        return codes, lens

    def probs(self, params: SamplingParams, which: str = "target") -> torch.Tensor:
        """[n_contexts, V] sampling distribution of the target (or draft) in float64."""
        return probs_from_logits(self.target if which == "target" else self.draft, params, torch.float64)

    def exact(self, params: SamplingParams, n_tokens: int) -> torch.Tensor:
        """P(first n_tokens tokens) [V ** n_tokens], sequence x1..xn at index (x1..xn in base V)."""
        if not 1 <= n_tokens <= self.max_len:
            raise ValueError(
                f"n_tokens={n_tokens} must be in 1..max_len={self.max_len}; build the table with a larger max_len"
            )
        P = self.probs(params)
        V = self.vocab
        prob, code = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
        for n in range(n_tokens):
            prob = (prob[:, None] * P[code]).flatten()  # [V ** (n + 1)], the newest token varies fastest
            code = self.child_code(code[:, None], n, torch.arange(V)).flatten()
        return prob


def _draft_beam(model: TableLM, rule, rc, rl, shape, params):
    """One beam tree per distinct context, drafted from the draft's raw log-probs as the decoder does."""
    uniq, inv = torch.unique(rc, return_inverse=True)
    trees = []
    for c in uniq.tolist():
        l = int(rl[(rc == c).nonzero()[0, 0]])

        def level_logprobs(partial, node_ids, c=c, l=l):
            codes, _ = model.node_codes(torch.tensor([c]), torch.tensor([l]), partial.tokens[None], partial.parents)
            return torch.log_softmax(model.draft[codes[0, node_ids]], -1)

        trees.append(grow_beam_tree(0, shape, level_logprobs, params=params if rule == "naive-topk" else None))
    ub = TreeBatch.of(trees)
    batch = TreeBatch(ub.tokens[inv], ub.parents[inv], ub.shape)
    q = torch.stack([t.q for t in trees])[inv] if rule == "naive-topk" else None
    return batch, q


def speculative_samples(
    model: TableLM,
    rule: str,
    shape,
    params: SamplingParams,
    n_tokens: int = 3,
    n: int = 20_000,
    seed: int = 0,
    drafting: str | None = None,
) -> torch.Tensor:
    """n speculative generations of n_tokens tokens -> index [n] of each sequence in `exact`'s order.

    rule: a key of verify.VERIFY_RULES; drafting "beam" (deterministic top-k tree) or "sampled"
    (spec.draft; what rrs / chain need), by default the one the decoder pairs with the rule."""
    if rule not in MODES:
        raise ValueError(f"rule {rule!r} is unknown; use one of {', '.join(MODES)}")
    drafting = drafting or DRAFTING[rule]
    if drafting not in ("beam", "sampled"):
        raise ValueError(f"drafting={drafting!r} is unknown; use 'beam' or 'sampled'")
    shape = TreeShape.of(shape)
    if n_tokens - 1 + shape.depth > model.max_len:
        raise ValueError(
            f"{n_tokens} tokens with a tree of depth {shape.depth} reach contexts of "
            f"{n_tokens - 1 + shape.depth} tokens but the table stops at max_len={model.max_len}; "
            "use a shallower tree, fewer tokens, or a larger max_len"
        )
    V = model.vocab
    gen = make_generator(seed)
    P, Q = model.probs(params), model.probs(params, "draft")
    out = torch.full((n, n_tokens), -1, dtype=torch.long)
    count = torch.zeros(n, dtype=torch.long)
    code = torch.zeros(n, dtype=torch.long)  # context = the tokens emitted so far
    while bool((count < n_tokens).any()):
        rows = (count < n_tokens).nonzero().flatten()
        rc, rl = code[rows], count[rows]
        if drafting == "sampled":

            def level_probs(tokens, parents, node_ids):
                return Q[model.node_codes(rc, rl, tokens, parents)[0][:, node_ids]]

            batch, q = grow_sampled_batch(torch.zeros(len(rows), dtype=torch.long), shape, level_probs, gen)
        else:
            batch, q = _draft_beam(model, rule, rc, rl, shape, params)
        codes, _ = model.node_codes(rc, rl, batch.tokens, batch.parents)
        res = verify_batch(rule, batch, P[codes], q, gen)
        for j in range(res.emitted.shape[1]):  # append each emitted token, cut at n_tokens
            x = res.emitted[:, j]
            ok = (x >= 0) & (rl < n_tokens)
            r = rows[ok]
            out[r, rl[ok]] = x[ok]
            rc = torch.where(ok, model.child_code(rc, rl, x.clamp(min=0)), rc)
            rl = rl + ok.long()
        code[rows], count[rows] = rc, rl
    return (out * torch.tensor([V ** (n_tokens - 1 - i) for i in range(n_tokens)])).sum(1)


def empirical(cells: torch.Tensor, n_cells: int) -> np.ndarray:
    """Frequencies [n_cells] of the sampled cell indices."""
    return np.bincount(np.asarray(cells), minlength=n_cells).astype(float) / max(len(cells), 1)


def marginal(probs, n_tokens: int, vocab: int, position: int) -> np.ndarray:
    """P(x_position) [V] from a distribution over V^n_tokens sequences (position counted from 0)."""
    if not 0 <= position < n_tokens:
        raise ValueError(f"position {position} is outside 0..{n_tokens - 1}")
    p = np.asarray(probs, dtype=float).reshape((vocab,) * n_tokens)
    return p.sum(axis=tuple(i for i in range(n_tokens) if i != position))


def total_variation(p, q) -> float:
    """1/2 sum |p - q|: the largest difference in probability the two give to any event."""
    return 0.5 * float(np.abs(np.asarray(p, dtype=float) - np.asarray(q, dtype=float)).sum())


def gof_pvalue(cells: torch.Tensor, exact) -> float:
    """Chi-square goodness of fit of sampled cells against exact probabilities (cells with expected
    count < 5 pooled). A sequence of probability 0 gives p = 0."""
    from scipy import stats

    exact = np.asarray(exact, dtype=float)
    obs = np.bincount(np.asarray(cells), minlength=exact.size).astype(float)
    exp = exact * len(cells)
    if obs[exp == 0].sum() > 0:
        return 0.0
    obs, exp = obs[exp > 0], exp[exp > 0]
    rare = exp < 5
    if rare.any():
        obs = np.append(obs[~rare], obs[rare].sum())
        exp = np.append(exp[~rare], exp[rare].sum())
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)
