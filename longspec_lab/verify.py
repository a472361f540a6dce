"""Acceptance rules: which path of a verified draft tree is kept (greedy rule).

After one target forward pass over a draft tree (LongSpec, arXiv 2502.17421, section 1 step 5 of
LONGSPEC.md) we know, for every node i, the target's next-token prediction t[i] after the path
root..i. Greedy acceptance:

  * node i is *verified*  when t[parent(i)] == token(i)   (the target would have said this token);
  * node i is *accepted*  when it and all its ancestors are verified;
  * the deepest accepted node wins (ties: lowest node index, i.e. the best-scored beam);
  * the emitted tokens are t along root..winner: depth(winner) + 1 tokens, the last being the
    target's own "bonus" prediction after the winner.

Why this is lossless (identical to plain greedy decoding). Let x be the committed text ending in
the root token. Plain greedy decoding would emit y1 = argmax p(. | x) = t[root]. If the winner
path is root, n1, ..., nk then every ni is verified, so token(n1) = t[root] = y1, hence the prefix
x + token(n1) is exactly what greedy decoding has after one step, and t[n1] is its next greedy
token y2; by induction token(ni) = yi and t[ni] = y(i+1). The emitted tokens t[root], t[n1], ...,
t[nk] are therefore y1..y(k+1), the first k+1 tokens of greedy decoding, whatever the draft
proposed. The draft only changes how many tokens one target pass yields (>= 1, the bonus token),
never which tokens. (In floating point this needs the tree pass to produce the same argmax as a
plain pass, which holds up to numerically tied logits.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import DraftTree


@dataclass
class AcceptResult:
    path: torch.Tensor      # [k+1] long, node ids root..winner
    emitted: torch.Tensor   # [k+1] long, target predictions along the path (last = bonus token)
    verified: torch.Tensor  # [N] bool, t[parent] == token (root True)
    accepted: torch.Tensor  # [N] bool, node and all its ancestors verified
    accept_length: int      # len(emitted) = depth(winner) + 1

    @property
    def winner(self) -> int:
        return int(self.path[-1])

    @property
    def num_draft_accepted(self) -> int:
        """Draft tokens accepted (excluding the bonus token)."""
        return self.accept_length - 1


def _check_targets(tree: DraftTree, target_tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(target_tokens, torch.Tensor):
        target_tokens = torch.as_tensor(target_tokens)
    if target_tokens.dtype.is_floating_point:
        raise TypeError(f"target_tokens must be token ids (long), got {target_tokens.dtype}; "
                        "pass logits.argmax(-1) rather than the logits")
    if target_tokens.shape != (tree.num_nodes,):
        raise ValueError(f"target_tokens must be [N] = [{tree.num_nodes}] (one prediction per tree "
                         f"node), got {tuple(target_tokens.shape)}; for batch 1 pass "
                         "logits[0, -N:].argmax(-1)")
    return target_tokens.to(device=tree.device, dtype=torch.long)


def verified_nodes(tree: DraftTree, target_tokens: torch.Tensor) -> torch.Tensor:
    """bool [N]: the target's prediction at each node's parent equals the node's token."""
    par = tree.parents.clamp(min=0)                     # root -> itself (overwritten below)
    ok = target_tokens[par] == tree.tokens              # [N]
    ok[0] = True
    return ok


def accepted_nodes(tree: DraftTree, verified: torch.Tensor) -> torch.Tensor:
    """bool [N]: verified with every ancestor verified; one vectorised step per level."""
    acc = verified.clone()
    off = tree.shape.level_offsets
    for l in range(1, tree.shape.depth + 1):
        lvl = slice(off[l], off[l + 1])
        acc[lvl] = verified[lvl] & acc[tree.parents[lvl]]  # parents are on level l-1, already final
    return acc


def accept_greedy(tree: DraftTree, target_tokens: torch.Tensor) -> AcceptResult:
    """Greedy (temperature 0) acceptance; target_tokens[i] = target argmax after node i's path."""
    t = _check_targets(tree, target_tokens)              # [N]
    verified = verified_nodes(tree, t)                    # [N]
    accepted = accepted_nodes(tree, verified)             # [N]
    depth_if_acc = torch.where(accepted, tree.depths, torch.full_like(tree.depths, -1))
    winner = int(torch.argmax(depth_if_acc))              # first (lowest index) of the deepest
    path = torch.tensor(tree.path(winner), dtype=torch.long, device=tree.device)
    emitted = t[path]                                     # [depth(winner) + 1]
    return AcceptResult(path, emitted, verified, accepted, int(emitted.numel()))
