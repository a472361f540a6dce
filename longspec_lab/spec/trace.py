"""What a generation returns: new tokens, statistics, and (optionally) one record per step.

The per-step records are what the notebooks draw: the drafted tree, its mask, the target's
prediction at every node, the accepted path and the text so far.

Taught in: notebooks/03_one_step_slowly.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longspec_lab.spec.tree import DraftTree
from longspec_lab.spec.verify import AcceptResult


@dataclass
class StepRecord:
    step: int
    prefix_len: int  # committed tokens in the target cache before this step
    tree: DraftTree  # the drafted tree (root = last committed token), on the CPU
    target_tokens: torch.Tensor  # [N] the target's prediction after each node's path
    result: AcceptResult  # verified / accepted nodes, path, emitted tokens
    emitted: list[int]  # tokens this step added (after max_new_tokens/EOS cuts)
    text: str | None = None  # decoded text of all new tokens so far (if a tokenizer was given)

    @property
    def mask(self) -> torch.Tensor:
        return self.tree.mask


@dataclass
class GenerationResult:
    method: str
    new_tokens: list[int]
    target_calls: int  # target forward passes, prefill included
    accepted_lengths: list[int]  # tokens emitted per verification step
    stage_seconds: dict[str, float]  # prefill / draft / verify / commit, device-synchronised
    wall_seconds: float  # whole call, prefill included
    draft_calls: int = 0
    tree_shape: list[int] | None = None
    gamma: int | None = None
    stopped_at_eos: bool = False
    trace: list[StepRecord] = field(default_factory=list)
    # sampling (verify.py): the rule, the target/draft sampling settings, the seed of the run
    verify: str = "greedy"
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    # acceptance counts summed over steps: index d = depth d+1, index r = sibling rank r
    depth_tried: list[int] = field(default_factory=list)
    depth_accepted: list[int] = field(default_factory=list)
    rank_tried: list[int] = field(default_factory=list)
    rank_accepted: list[int] = field(default_factory=list)

    def add_acceptance(self, counts: dict[str, list[int]]) -> None:
        """Add one step's verify.acceptance_counts to the running totals."""
        for name, new in counts.items():
            old = getattr(self, name)
            old.extend([0] * (len(new) - len(old)))
            for i, c in enumerate(new):
                old[i] += c

    @staticmethod
    def _rates(acc: list[int], tried: list[int]) -> list[float | None]:
        return [a / t if t else None for a, t in zip(acc, tried)]

    @property
    def acceptance_by_depth(self) -> list[float | None]:
        """P(a child at depth d+1 is accepted | the path reached depth d at a node with children)."""
        return self._rates(self.depth_accepted, self.depth_tried)

    @property
    def acceptance_by_rank(self) -> list[float | None]:
        """P(a child of sibling rank r is accepted | the rule looked at it)."""
        return self._rates(self.rank_accepted, self.rank_tried)

    @property
    def tau(self) -> float:
        """Mean accepted length: generated tokens / target forward passes (plain decoding = 1)."""
        return len(self.new_tokens) / max(self.target_calls, 1)

    @property
    def decode_seconds(self) -> float:
        return self.wall_seconds - self.stage_seconds.get("prefill", 0.0)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over the decoding phase (prefill excluded)."""
        n = max(len(self.new_tokens) - 1, 0)  # the first token comes out of the prefill
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary(self) -> dict:
        return {
            "method": self.method,
            "new_tokens": list(self.new_tokens),
            "target_calls": self.target_calls,
            "draft_calls": self.draft_calls,
            "tau": self.tau,
            "accepted_lengths": list(self.accepted_lengths),
            "tokens_per_s": self.tokens_per_s,
            "wall_seconds": self.wall_seconds,
            "stage_seconds": dict(self.stage_seconds),
            "tree_shape": self.tree_shape,
            "gamma": self.gamma,
            "stopped_at_eos": self.stopped_at_eos,
            "verify": self.verify,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "acceptance_by_depth": self.acceptance_by_depth,
            "acceptance_by_rank": self.acceptance_by_rank,
            "depth_tried": list(self.depth_tried),
            "rank_tried": list(self.rank_tried),
        }
