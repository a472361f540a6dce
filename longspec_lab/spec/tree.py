"""Draft trees for tree speculative decoding: shapes, masks, positions and beam growth.

LongSpec (arXiv 2502.17421) drafts a *tree* of candidate continuations each step instead of a
single chain. The tree is grown level by level as a beam: for level l the draft scores every
(node of level l-1, vocabulary token) pair by `score(parent) + log q(token | path)` and keeps the
global top `w_l` pairs. There is no re-ranking across levels. A tree shape is the list of level
widths, e.g. [4, 16, 16, 16, 16] -> 1 root + 68 draft nodes = 69 nodes.

Numbering: node 0 is the root (the last committed / pending token, not a draft), then level 1,
level 2, ...; inside a level, nodes are in beam order (descending score). Hence parent < child
and every level is a contiguous slice `[level_offsets[l], level_offsets[l+1])`.

The target verifies all nodes in one forward pass. Node i may attend to node j iff j is i or an
ancestor of i (`mask[i, j]`), and node i sits at RoPE position `prefix_len + depth[i]`.

Everything here is pure torch, no model: the draft model enters `grow_beam_tree` only through
the `level_logprobs` callback.

Taught in: notebooks/02_tree_shapes.ipynb.
"""

from __future__ import annotations

import bisect
import numbers
import re
from dataclasses import dataclass
from typing import Sequence

import torch

_EXAMPLE = "e.g. [4, 16, 16, 16, 16]"


# ----------------------------------------------------------------------------- shapes


def _parse_width(level: int, w) -> int:
    """One level's width as a python int, or a ValueError naming the level and the fix."""
    fix = f"every level needs an integer width >= 1, {_EXAMPLE}"
    if isinstance(w, str):
        try:
            w = int(w.strip())
        except ValueError:
            raise ValueError(f"tree_shape level {level} has width {w!r}, not an integer; {fix}") from None
    if isinstance(w, bool) or not isinstance(w, numbers.Integral):
        raise ValueError(f"tree_shape level {level} has width {w!r} of type {type(w).__name__}; {fix}")
    w = int(w)
    if w < 1:
        raise ValueError(f"tree_shape level {level} has width {w}; {fix}")
    return w


def _parse_widths(x) -> tuple[int, ...]:
    if isinstance(x, TreeShape):
        return x.widths
    if isinstance(x, str):
        body = x.strip().strip("[]()").strip()
        if re.search(r",\s*,|^,", body):  # '4,,16': a width left out, not a separator to skip
            raise ValueError(f"tree_shape {x!r} has an empty level (two commas); give every level's width, {_EXAMPLE}")
        parts = [p for p in re.split(r"[,\s]+", body) if p]
    elif isinstance(x, (list, tuple)):
        parts = list(x)
    else:
        raise ValueError(
            f"tree_shape must be a list/tuple of level widths or a string like '4,16,16', got "
            f"{type(x).__name__} {x!r}; for a chain of gamma tokens use [1] * gamma, {_EXAMPLE}"
        )
    if not parts:
        raise ValueError(f"tree_shape is empty; give at least one level width, {_EXAMPLE}")
    return tuple(_parse_width(l, w) for l, w in enumerate(parts, start=1))


@dataclass(frozen=True)
class TreeShape:
    """Level widths of a draft tree (root excluded): widths[l-1] nodes at depth l."""

    widths: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "widths", _parse_widths(self.widths))

    @classmethod
    def of(cls, x) -> "TreeShape":
        """Accepts a TreeShape, a list/tuple of ints, or a string like '4,16,16' / '4 16 16'."""
        return x if isinstance(x, TreeShape) else cls(x)

    @classmethod
    def chain(cls, gamma: int) -> "TreeShape":
        """A chain of `gamma` draft tokens (gamma = 0 gives the root-only shape)."""
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Integral) or gamma < 0:
            raise ValueError(f"a chain needs an integer gamma >= 0 (draft tokens), got {gamma!r}")
        return cls.root_only() if gamma == 0 else cls((1,) * int(gamma))

    @classmethod
    def root_only(cls) -> "TreeShape":
        """The depth-0 shape of a tree holding only its root (partial trees, plain decoding)."""
        s = object.__new__(cls)
        object.__setattr__(s, "widths", ())
        return s

    def __str__(self) -> str:
        return ",".join(map(str, self.widths))

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def num_draft_nodes(self) -> int:
        return sum(self.widths)

    @property
    def num_nodes(self) -> int:
        return 1 + self.num_draft_nodes

    @property
    def level_offsets(self) -> tuple[int, ...]:
        """off[l] = first node of level l (level 0 = root); level l spans [off[l], off[l+1])."""
        off = [0, 1]
        for w in self.widths:
            off.append(off[-1] + w)
        return tuple(off)

    @property
    def mask_bytes(self) -> int:
        return self.num_nodes**2

    def level_of(self, node: int) -> int:
        if not 0 <= node < self.num_nodes:
            raise ValueError(
                f"node {node} is outside this tree of {self.num_nodes} nodes; use 0 <= node < {self.num_nodes}"
            )
        return bisect.bisect_right(self.level_offsets, node) - 1

    def check_fits(self, vocab_size: int) -> None:
        """Raise if some level is wider than the number of distinct (parent, token) pairs."""
        prev = 1
        for l, w in enumerate(self.widths, start=1):
            if w > prev * vocab_size:
                what = (
                    f"the vocabulary has only {vocab_size} tokens"
                    if l == 1
                    else f"level {l - 1} has {prev} nodes x {vocab_size} tokens = {prev * vocab_size} pairs"
                )
                raise ValueError(
                    f"tree_shape level {l} has width {w} but {what}; use a width <= {prev * vocab_size} at level {l}"
                )
            prev = w


DEFAULT_TREE_SHAPE = TreeShape((4, 16, 16, 16, 16))
# Documented caps, checked before any work: a step's tree (root included) and its depth. A tree this
# large already costs more per step than it can win back on any model this package serves.
MAX_TREE_NODES = 1024
MAX_TREE_DEPTH = 64


def check_tree_limits(shape: TreeShape, max_nodes: int = MAX_TREE_NODES, max_depth: int = MAX_TREE_DEPTH) -> None:
    """Raise ValueError if `shape` exceeds the node or depth cap, naming a shape that would fit."""
    if shape.num_nodes > max_nodes:
        raise ValueError(
            f"tree_shape {list(shape.widths)} has {shape.num_nodes} nodes (root included), above the "
            f"cap of {max_nodes}; use fewer or narrower levels, e.g. {list(DEFAULT_TREE_SHAPE.widths)}"
        )
    if shape.depth > max_depth:
        raise ValueError(
            f"tree_shape has depth {shape.depth}, above the cap of {max_depth}; use at most "
            f"{max_depth} levels, e.g. {list(DEFAULT_TREE_SHAPE.widths)}"
        )


# ----------------------------------------------------------------------------- masks & positions


def _check_parents(parents: torch.Tensor) -> None:
    if not isinstance(parents, torch.Tensor) or parents.dim() != 1 or parents.numel() == 0:
        raise ValueError(
            "parents must be a non-empty 1-D LongTensor [N] with parents[0] = -1 (root); "
            f"got {getattr(parents, 'shape', type(parents).__name__)}"
        )
    if parents.dtype.is_floating_point or parents.dtype == torch.bool:
        raise ValueError(f"parents must be an integer tensor, got {parents.dtype}; pass parents.long()")
    if int(parents[0]) != -1:
        raise ValueError(f"parents[0] must be -1 (node 0 is the root), got {int(parents[0])}; number the root 0")
    idx = torch.arange(parents.numel(), device=parents.device)
    bad = ((parents[1:] < 0) | (parents[1:] >= idx[1:])).nonzero()
    if bad.numel():
        i = int(bad[0]) + 1
        raise ValueError(
            f"node {i} has parent {int(parents[i])}; every non-root node needs a parent "
            f"index in [0, {i}) (number nodes so that parents come first)"
        )


def tree_mask(parents: torch.Tensor) -> torch.Tensor:
    """bool [N, N]: mask[i, j] iff j == i or j is an ancestor of i.

    Walks all nodes up one level at a time (pointer chasing), so it costs O(N * depth), not O(N^3).
    """
    _check_parents(parents)
    n = parents.numel()
    rows = torch.arange(n, device=parents.device)
    mask = torch.eye(n, dtype=torch.bool, device=parents.device)  # [N, N]
    anc = parents.long().clone()  # [N] current ancestor, -1 = done
    while True:
        live = anc >= 0
        if not bool(live.any()):
            return mask
        mask[rows[live], anc[live]] = True
        anc = torch.where(live, parents.long()[anc.clamp(min=0)], anc)


def tree_positions(depths: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """RoPE positions of the nodes: node i sits at prefix_len + depth[i] (root at prefix_len)."""
    return depths + prefix_len


# ----------------------------------------------------------------------------- the tree


def _depths_from_parents(parents: torch.Tensor) -> torch.Tensor:
    depths = torch.zeros_like(parents, dtype=torch.long)
    for i, p in enumerate(parents.tolist()[1:], start=1):  # parent < child: one forward pass
        depths[i] = depths[p] + 1
    return depths


@dataclass
class DraftTree:
    """A drafted tree: node 0 = root (last committed/pending token), then level by level."""

    tokens: torch.Tensor  # [N] long
    parents: torch.Tensor  # [N] long, root -1
    depths: torch.Tensor  # [N] long, root 0
    scores: torch.Tensor  # [N] float, cumulative draft log-prob, root 0.0
    shape: TreeShape
    q: torch.Tensor | None = None  # [N, V] the draft's processed distribution at expanded nodes (sampling)
    drafting: str = "beam"  # "beam" (deterministic top-k) or "sampled" (children drawn without replacement)

    def __post_init__(self):
        n = self.shape.num_nodes
        for name in ("tokens", "parents", "depths", "scores"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != n:
                raise ValueError(
                    f"DraftTree.{name} must be a 1-D tensor of {n} nodes (shape "
                    f"{self.shape.widths} + root), got {getattr(t, 'shape', type(t).__name__)}; "
                    "build trees with DraftTree.from_parents or grow_beam_tree"
                )

    @classmethod
    def from_parents(cls, tokens, parents, scores=None, shape=None) -> "DraftTree":
        """Build a tree from token and parent lists, validating the numbering and deriving depths."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        parents = torch.as_tensor(parents, dtype=torch.long, device=tokens.device)
        if tokens.shape != parents.shape:
            raise ValueError(
                f"tokens {tuple(tokens.shape)} and parents {tuple(parents.shape)} must both "
                "be [N] (one entry per node, root first)"
            )
        _check_parents(parents)
        depths = _depths_from_parents(parents.cpu()).to(tokens.device)
        if bool((depths[1:] < depths[:-1]).any()):
            raise ValueError(
                "nodes must be numbered level by level (depths non-decreasing); got depths "
                f"{depths.tolist()}; renumber: root, then all depth-1 nodes, then depth-2, ..."
            )
        counts = torch.bincount(depths)[1:].tolist()
        derived = TreeShape(counts) if counts else TreeShape.root_only()
        if shape is not None and TreeShape.of(shape) != derived:
            raise ValueError(
                f"shape {TreeShape.of(shape).widths} does not match the parents, whose level "
                f"widths are {derived.widths}; pass shape=None to derive it"
            )
        if scores is None:
            scores = torch.zeros(tokens.numel(), device=tokens.device)
        scores = torch.as_tensor(scores, device=tokens.device)
        if not scores.dtype.is_floating_point:
            scores = scores.float()
        return cls(tokens, parents, depths, scores, derived)

    @property
    def num_nodes(self) -> int:
        return self.tokens.numel()

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def mask(self) -> torch.Tensor:
        """bool [N, N], True where node i may attend to node j (j is i or an ancestor)."""
        return tree_mask(self.parents)

    def positions(self, prefix_len: int) -> torch.Tensor:
        return tree_positions(self.depths, prefix_len)

    def path(self, node: int) -> list[int]:
        """Node ids root..node."""
        if not 0 <= node < self.num_nodes:
            raise ValueError(
                f"node {node} is outside this tree of {self.num_nodes} nodes; use 0 <= node < {self.num_nodes}"
            )
        par = self.parents.tolist()
        out = [node]
        while par[out[-1]] >= 0:
            out.append(par[out[-1]])
        return out[::-1]

    def path_tokens(self, node: int) -> list[int]:
        toks = self.tokens.tolist()
        return [toks[i] for i in self.path(node)]

    def children(self, node: int) -> list[int]:
        return (self.parents == node).nonzero().flatten().tolist()

    def to(self, device) -> "DraftTree":
        q = None if self.q is None else self.q.to(device)
        return DraftTree(
            self.tokens.to(device),
            self.parents.to(device),
            self.depths.to(device),
            self.scores.to(device),
            self.shape,
            q,
            self.drafting,
        )


# ----------------------------------------------------------------------------- beam growth


def chain_tree(root_token: int, tokens: Sequence[int] | torch.Tensor, scores=None) -> DraftTree:
    """A chain root -> tokens[0] -> tokens[1] -> ... (chain speculative decoding).

    `scores`, if given, are the cumulative draft log-probs of the len(tokens) draft nodes.
    """
    toks = torch.as_tensor(tokens, dtype=torch.long).flatten()
    gamma = toks.numel()
    dev = toks.device
    all_toks = torch.cat([torch.tensor([int(root_token)], device=dev), toks])
    parents = torch.arange(-1, gamma, device=dev)
    depths = torch.arange(gamma + 1, device=dev)
    if scores is None:
        sc = torch.zeros(gamma + 1, device=dev)
    else:
        s = torch.as_tensor(scores, device=dev).flatten()
        if s.numel() != gamma:
            raise ValueError(
                f"chain_tree got {gamma} tokens but {s.numel()} scores; pass one "
                "cumulative score per draft token (the root's 0.0 is added for you)"
            )
        s = s if s.dtype.is_floating_point else s.float()
        sc = torch.cat([torch.zeros(1, dtype=s.dtype, device=dev), s])
    return DraftTree(all_toks, parents, depths, sc, TreeShape.chain(gamma))


@dataclass
class TreeBatch:
    """B trees of one shape (same level offsets): tokens [B, N], parents [B, N]."""

    tokens: torch.Tensor
    parents: torch.Tensor
    shape: TreeShape

    @classmethod
    def of(cls, trees) -> "TreeBatch":
        trees = [trees] if isinstance(trees, DraftTree) else list(trees)
        if any(t.shape != trees[0].shape for t in trees):
            raise ValueError("a TreeBatch needs trees of one shape; group the trees by shape first")
        return cls(torch.stack([t.tokens for t in trees]), torch.stack([t.parents for t in trees]), trees[0].shape)
