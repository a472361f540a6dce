"""Sampling from a model's logits: temperature, top-k and top-p, exactly as `transformers` applies them.

Speculative *sampling* (LongSpec, arXiv 2502.17421, and docs/LONGSPEC.md section 4) is lossless only with
respect to one precise distribution: the one plain sampling would use. This module defines it, for
the target and (with the same settings) for the draft:

    scores = logits / temperature               # TemperatureLogitsWarper (skipped when T == 1)
    scores[scores < k-th largest] = -inf        # TopKLogitsWarper        (top_k None = off)
    sort ascending; drop the low tail whose     # TopPLogitsWarper        (top_p None or 1 = off)
        cumulative softmax mass <= 1 - top_p,
        always keeping the largest score
    p = softmax(scores)

in that order, the order `generate(do_sample=True)` builds its warpers in. Temperature 0 means greedy:
p is the one-hot vector of `argmax(logits)` (first index on ties, as `torch.argmax`), so every sampling
rule degenerates to greedy decoding.

Randomness comes only from explicit `torch.Generator`s (`make_generator(seed, device)`), so a seeded
run reproduces token for token. Two samplers:
  * `sample_categorical`  inverse-CDF sampling (one uniform per row; zero-probability tokens are never drawn)
  * `gumbel_topk`         k tokens without replacement, in sampling order (Gumbel-top-k trick:
                          the top-k of log p + Gumbel noise is an ordered sample without replacement)

Taught in: notebooks/06_sampling_without_bias.ipynb.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

_T_FIX = "use a finite temperature >= 0 (0 = greedy), e.g. temperature=0.7"
_K_FIX = "use an integer top_k >= 1 (e.g. top_k=50), or top_k=None for no top-k filtering"
_P_FIX = "use top_p in (0, 1] (e.g. top_p=0.9), or top_p=None (same as 1.0) for no nucleus filtering"


def _check_temperature(t) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise ValueError(f"temperature={t!r} is not a number; {_T_FIX}")
    t = float(t)
    if math.isnan(t) or math.isinf(t):
        raise ValueError(f"temperature={t} is not finite; {_T_FIX}")
    if t < 0:
        raise ValueError(f"temperature={t} is negative; {_T_FIX}")
    return t


def _check_top_k(k) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"top_k={k!r} is not an integer; {_K_FIX}")
    if int(k) < 1:
        raise ValueError(f"top_k={int(k)} keeps no token; {_K_FIX}")
    return int(k)


def _check_top_p(p) -> float | None:
    if p is None:
        return None
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or math.isnan(float(p)):
        raise ValueError(f"top_p={p!r} is not a number; {_P_FIX}")
    if not 0.0 < float(p) <= 1.0:
        raise ValueError(f"top_p={float(p)} is outside (0, 1]; {_P_FIX}")
    return float(p)


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings; temperature 0 is greedy (top_k / top_p then change nothing)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "temperature", _check_temperature(self.temperature))
        object.__setattr__(self, "top_k", _check_top_k(self.top_k))
        object.__setattr__(self, "top_p", _check_top_p(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


# ----------------------------------------------------------------------------- the warpers


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores if temperature == 1.0 else scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep every score >= the k-th largest (ties at the k-th are all kept, as transformers does)."""
    if top_k is None:
        return scores
    k = min(top_k, scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]  # [..., 1]
    return scores.masked_fill(scores < kth, -math.inf)


def apply_top_p(scores: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Nucleus filtering: drop the ascending-sorted tail with cumulative mass <= 1 - top_p."""
    if top_p is None or top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)  # [..., V]
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - top_p)
    drop_sorted[..., -1:] = False  # keep at least the best token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature -> top-k -> top-p on logits [..., V] (computed in at least float32)."""
    if params.greedy:
        raise ValueError(
            "temperature 0 is greedy and has no warped logits; call probs_from_logits, "
            "which returns the one-hot argmax distribution"
        )
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scores = apply_temperature(scores, params.temperature)
    scores = apply_top_k(scores, params.top_k)
    return apply_top_p(scores, params.top_p)


def probs_from_logits(logits: torch.Tensor, params: SamplingParams, dtype=None) -> torch.Tensor:
    """The sampling distribution [..., V]. `logits` may also be log-probs (all warpers are shift-invariant)."""
    dtype = dtype or torch.promote_types(logits.dtype, torch.float32)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(dtype)
    return torch.softmax(warp_logits(logits, params).to(dtype), dim=-1)


# ----------------------------------------------------------------------------- samplers


def make_generator(seed: int, device="cpu") -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed={seed!r} must be an integer; pass e.g. seed=0")
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def _check_generator(generator, device) -> None:
    if generator is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(
            f"the torch.Generator is on {generator.device} but the probabilities are on {device}; "
            f"create it with make_generator(seed, device='{device}')"
        )


def uniform(shape, generator, device, dtype=torch.float64) -> torch.Tensor:
    """U[0, 1) of `shape`, drawn from `generator`."""
    _check_generator(generator, device)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [..., V] (need not be normalised) -> long [...]."""
    cdf = probs.cumsum(-1)  # [..., V]
    u = uniform(probs.shape[:-1] + (1,), generator, probs.device, cdf.dtype) * cdf[..., -1:]
    idx = torch.searchsorted(cdf.contiguous(), u, right=True).squeeze(-1)  # first i with cdf[i] > u
    V = probs.shape[-1]
    last = V - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)  # last token with mass (round-off)
    return torch.minimum(idx, last)


def gumbel_topk(probs: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k distinct tokens per row of probs [..., V], an ordered sample without replacement -> [..., k].

    The i-th token is distributed as probs with the first i-1 removed and renormalised. If a row has
    fewer than k tokens with mass, the remaining picks are zero-probability tokens (padding)."""
    if not 1 <= k <= probs.shape[-1]:
        raise ValueError(
            f"cannot draw {k} distinct tokens from a vocabulary of {probs.shape[-1]}; use 1 <= k <= {probs.shape[-1]}"
        )
    u = uniform(probs.shape, generator, probs.device, torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))  # [..., V] Gumbel(0, 1)
    keys = torch.log(probs.to(torch.float64)) + gumbel  # zero mass -> -inf
    return torch.topk(keys, k, dim=-1).indices  # sorted by key, descending
