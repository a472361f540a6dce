"""Sampled draft trees for lossless speculative sampling, recording the draft distribution q.

Recursive rejection sampling (verify.py, rule "rrs"; shared/LONGSPEC.md §4) is lossless only if the
children of every node are an ordered sample WITHOUT replacement from the draft's q at that node, and
their NUMBER does not depend on which tokens were drawn. A beam tree breaks both: its siblings are the
deterministic top-k, and a level's global top-w decides how many children each parent gets by
comparing the children's own scores. So a sampled tree is grown differently:

  1. Allocation, fixed by the shape alone. Level l has width w_l and n = w_{l-1} parents, ranked by
     their node order (level 1 = the root alone). Child slot j = 0..w_l-1 goes to parent j mod n
     (round robin), so parent r gets floor(w_l / n) children, plus one if r < w_l mod n: earlier
     ranks (the parents drawn first, typically the likelier ones) get the spare slots. The counts,
     hence `parents`, the mask and the positions, are decided before any child is drawn and are the
     same for every step: shape [4, 16, 16] gives 4 children to the root, 4 to each level-1 node,
     1 to each level-2 node.
  2. Draw, per parent, its c children by Gumbel-top-c from q(. | path) (sampling.gumbel_topk), in
     sampling order; a level is numbered by parent, then by draw order. If q has fewer than c tokens
     with mass (top-k/top-p filtering), the extra children are zero-mass padding the verifier skips.

Each expanded node's q row is kept ([N, V], leaves 0) for the verifier. q is the draft's softmax after
the SAME temperature/top-k/top-p processing as the target (sampling.probs_from_logits). The chain of
chain speculative sampling is the shape [1] * gamma. `grow_beam_tree_q` wraps tree.grow_beam_tree to
record q as well (for the biased "naive-topk" counter-example). arXiv 2502.17421 describes the beam
tree; the sampled tree follows SpecInfer / Sequoia / "Recursive Speculative Decoding".
"""

from __future__ import annotations

from typing import Callable

import torch

from longspec_lab.ops.sampling import SamplingParams, gumbel_topk, probs_from_logits
from longspec_lab.spec.tree import DraftTree, TreeBatch, TreeShape


def beam_level(parent_scores: torch.Tensor, logprobs: torch.Tensor, width: int):
    """Global top-`width` (node, token) pairs by parent_score + logprob.

    parent_scores [n], logprobs [n, V] -> (parent_local_idx [w], tokens [w], scores [w]) in descending
    score; equal scores are ordered by lower flat index n_i * V + token (deterministic).
    """
    n, V = logprobs.shape
    if parent_scores.shape != (n,):
        raise ValueError(
            f"parent_scores {tuple(parent_scores.shape)} must be [n] = [{n}] to match logprobs {tuple(logprobs.shape)}"
        )
    if not 1 <= width <= n * V:
        raise ValueError(
            f"a level of width {width} needs that many (node, token) pairs but only "
            f"{n} nodes x {V} tokens = {n * V} exist; use a width in [1, {n * V}]"
        )
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    flat = (parent_scores.to(dtype)[:, None] + logprobs.to(dtype)).flatten()  # [n * V]
    top = torch.topk(flat, width).values  # [w], sorted desc
    if bool(torch.isnan(top).any()):
        raise ValueError(
            "draft log-probs contain NaN; check the draft logits (overflow in fp16?) and use log_softmax in float32"
        )
    thr = top[-1]
    above = (flat > thr).nonzero().flatten()  # all of these are kept
    tied = (flat == thr).nonzero().flatten()[: width - above.numel()]  # lowest indices first
    idx = torch.cat([above, tied]).sort().values  # flat index ascending
    order = torch.sort(flat[idx], descending=True, stable=True).indices  # stable: ties by index
    idx = idx[order]
    return idx // V, idx % V, flat[idx]


LevelLogprobs = Callable[[DraftTree, torch.Tensor], torch.Tensor]


def grow_beam_tree(root_token: int, shape, level_logprobs: LevelLogprobs, device=None) -> DraftTree:
    """Grow a beam tree (LONGSPEC.md section 1, steps 1-2).

    `level_logprobs(partial_tree, node_ids) -> [len(node_ids), V]` returns the draft's log-probs
    for the next token after each listed node's path; it is called once per level, with the root
    (tensor([0])) for level 1 and with all nodes of level l-1 for level l. `partial_tree` holds the
    nodes built so far, so its mask and positions are valid for a draft forward over them.
    """
    shape = TreeShape.of(shape)
    device = torch.device("cpu") if device is None else torch.device(device)
    tree = DraftTree(
        torch.tensor([int(root_token)], device=device),
        torch.tensor([-1], device=device),
        torch.tensor([0], device=device),
        torch.zeros(1, device=device),
        TreeShape.root_only(),
    )
    off = shape.level_offsets
    for l, w in enumerate(shape.widths, start=1):
        node_ids = torch.arange(off[l - 1], off[l], device=device)  # level l-1
        lp = level_logprobs(tree, node_ids)  # [n, V]
        if lp.dim() != 2 or lp.shape[0] != node_ids.numel():
            raise ValueError(
                f"level_logprobs must return [{node_ids.numel()}, V] for level {l}, got "
                f"{tuple(lp.shape)}; return one row of log-probs per requested node"
            )
        if w > node_ids.numel() * lp.shape[1]:
            shape.check_fits(lp.shape[1])  # raises, naming the level
        pidx, tok, sc = beam_level(tree.scores[node_ids], lp, w)
        scores = torch.cat([tree.scores.to(sc.dtype), sc])
        tree = DraftTree(
            torch.cat([tree.tokens, tok.to(tree.tokens.dtype)]),
            torch.cat([tree.parents, node_ids[pidx]]),
            torch.cat([tree.depths, torch.full((w,), l, device=device)]),
            scores,
            TreeShape(shape.widths[:l]),
        )
    return tree


def allocate_children(num_parents: int, width: int) -> list[int]:
    """Children per parent rank for one level: round robin, earlier ranks get the remainder."""
    if num_parents < 1 or width < 1:
        raise ValueError(
            f"a level needs >= 1 parent and width >= 1, got {num_parents} parents and width "
            f"{width}; check the tree_shape"
        )
    base, extra = divmod(width, num_parents)
    return [base + (r < extra) for r in range(num_parents)]


def sampled_parents(shape) -> torch.Tensor:
    """parents [N] of the sampled tree of `shape`: depends on the shape only."""
    shape = TreeShape.of(shape)
    off, parents = shape.level_offsets, [-1]
    for l, w in enumerate(shape.widths, start=1):
        for r, c in enumerate(allocate_children(off[l] - off[l - 1], w)):
            parents += [off[l - 1] + r] * c
    return torch.tensor(parents, dtype=torch.long)


BatchLevelProbs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def grow_sampled_batch(
    root_tokens: torch.Tensor, shape, level_probs: BatchLevelProbs, generator: torch.Generator | None = None
):
    """B sampled trees at once -> (TreeBatch, q [B, N, V]).

    `level_probs(tokens [B, n_so_far], parents [n_so_far], node_ids [n]) -> [B, n, V]`: the draft's
    processed distribution after each listed node's path, called once per level (root, then level
    1, ...), like tree.grow_beam_tree's callback."""
    shape = TreeShape.of(shape)
    tokens = torch.as_tensor(root_tokens, dtype=torch.long).reshape(-1, 1)  # [B, 1]
    B, dev = tokens.shape[0], tokens.device
    parents_all = sampled_parents(shape).to(dev)
    off = shape.level_offsets
    qs = []
    for l, w in enumerate(shape.widths, start=1):
        node_ids = torch.arange(off[l - 1], off[l], device=dev)
        q = level_probs(tokens, parents_all[: off[l]], node_ids)  # [B, n, V]
        n, V = node_ids.numel(), q.shape[-1]
        if q.shape[:2] != (B, n):
            raise ValueError(
                f"level_probs must return [B, n, V] = [{B}, {n}, V] for level {l}, got "
                f"{tuple(q.shape)}; return one distribution per batch row and node"
            )
        counts = allocate_children(n, w)
        if max(counts) > V:
            shape.check_fits(V)  # raises, naming the level
            raise ValueError(
                f"level {l}: {max(counts)} children of one parent exceed the vocabulary of {V}; use a narrower level"
            )
        drawn = gumbel_topk(q, max(counts), generator)  # [B, n, c_max] in draw order
        keep = torch.cat([drawn[:, r, :c] for r, c in enumerate(counts)], dim=1)  # [B, w]
        tokens = torch.cat([tokens, keep], dim=1)
        qs.append(q)
    V = qs[0].shape[-1] if qs else 1
    leaves = torch.zeros(
        B, shape.num_nodes - sum(x.shape[1] for x in qs), V, dtype=qs[0].dtype if qs else torch.float32, device=dev
    )
    q_all = torch.cat(qs + [leaves], dim=1)  # [B, N, V]
    return TreeBatch(tokens, parents_all[None].expand(B, -1), shape), q_all


def _with_scores(tokens: torch.Tensor, parents: torch.Tensor, q: torch.Tensor) -> DraftTree:
    """The DraftTree of tokens [N], parents [N], scored by cumulative log q (padding: -inf)."""
    tree = DraftTree.from_parents(tokens, parents)
    lq = torch.log(q[parents.clamp(min=0), tokens].double())  # [N] log q(token | parent path)
    scores = torch.zeros(tree.num_nodes, dtype=torch.float64, device=tokens.device)
    off = tree.shape.level_offsets
    for l in range(1, tree.shape.depth + 1):  # parents sit one level up
        lvl = slice(off[l], off[l + 1])
        scores[lvl] = scores[parents[lvl]] + lq[lvl]
    tree.scores = scores
    return tree


def grow_sampled_tree(
    root_token: int,
    shape,
    level_logprobs,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    device=None,
):
    """One sampled tree -> (DraftTree, q [N, V]).

    `level_logprobs(partial_tree, node_ids) -> [n, V]` is tree.grow_beam_tree's callback (log-probs or
    logits of the draft; `params` turns them into q)."""
    device = torch.device("cpu") if device is None else torch.device(device)

    def level_probs(tokens, parents, node_ids):
        partial = DraftTree.from_parents(tokens[0], parents)
        return probs_from_logits(level_logprobs(partial, node_ids), params)[None]  # [1, n, V]

    root = torch.tensor([int(root_token)], device=device)
    batch, q = grow_sampled_batch(root, shape, level_probs, generator)
    return _with_scores(batch.tokens[0], batch.parents[0], q[0]), q[0]


def grow_beam_tree_q(root_token: int, shape, level_logprobs, params: SamplingParams, device=None):
    """tree.grow_beam_tree, also returning the processed draft q [N, V] at every expanded node."""
    rows: dict[int, torch.Tensor] = {}

    def recording(partial, node_ids):
        lp = level_logprobs(partial, node_ids)
        q = probs_from_logits(lp, params)
        for i, nid in enumerate(node_ids.tolist()):
            rows[nid] = q[i]
        return lp

    tree = grow_beam_tree(root_token, shape, recording, device=device)
    V = next(iter(rows.values())).shape[-1] if rows else 1
    q = torch.zeros(
        tree.num_nodes, V, dtype=next(iter(rows.values())).dtype if rows else torch.float32, device=tree.device
    )
    for nid, row in rows.items():
        q[nid] = row
    return tree, q
