"""Drafting a tree, one level at a time: the beam tree of LongSpec and the sampled tree of lossless sampling.

LongSpec (arXiv 2502.17421, docs/LONGSPEC.md section 1) drafts a *beam tree*: for level l the draft
scores every (node of level l-1, token) pair by `score(parent) + log q(token | path)` and keeps the
global top `w_l` pairs; there is no re-ranking across levels. Ties are broken by the lower flat index
`parent_rank * V + token`, so a level is a pure function of its inputs.

Lossless *sampling* with recursive rejection (docs/LONGSPEC.md section 4) needs a different tree: the
children of a node must be an ordered sample WITHOUT replacement from q at that node, and their number
must not depend on what was drawn. So a *sampled tree* gives parent rank r of level l-1 a fixed share
of the w_l slots (round robin, earlier ranks get the remainder: `allocate_children`) and draws each
parent's children by Gumbel-top-c (`ops.sampling.gumbel_topk`). The parents, the mask and the
positions then depend on the shape alone. The chain of chain speculative sampling is the shape [1]*gamma.

Everything here works on static buffers (`TreeBuffers`, one slot per node of the shape), so the same
functions run eagerly, under `torch.compile` and inside a CUDA graph:

    TreeBuffers.start(root)          node 0 = the root
    grow_beam_level(buf, l, logp)    level l from the draft's log-probs at level l-1      [n, V]
    grow_beam_level_logits(buf, l, z) the same from the draft's logits (one launch on the GPU with the switch
                                     LONGSPEC_BEAM_SELECT: ops.topk.beam_keys)             [n, V]
    grow_beam_level_hidden(buf, l, h, head) the same from the draft's last hidden rows and its LM head (the head
                                     and the selection in one launch with LONGSPEC_HEAD_SELECT) [n, K]
    grow_sampled_level(buf, l, q, g) level l drawn from the draft's distribution at l-1   [n, V]

The draft *model* enters only through those rows; `decoding/steps.py` runs the model. The
teaching growers (`grow_beam_tree`, `grow_sampled_tree`) take a callback instead of a model and call
the same level functions, so there is one definition of each rule.

Taught in: notebooks/02_tree_shapes.ipynb (beam growth) and notebooks/06_sampling_without_bias.ipynb.
"""

from __future__ import annotations

from typing import Callable

import torch

from longspec_lab.ops.linear import lm_head
from longspec_lab.ops.sampling import SamplingParams, gumbel_topk, probs_from_logits
from longspec_lab.ops.topk import beam_keys, beam_level_into, beam_write_takes, flat_topk_values, head_beam_keys
from longspec_lab.spec.tree import DraftTree, TreeBatch, TreeShape

# ----------------------------------------------------------------------------- one beam level


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys with the same order (IEEE bits, negative magnitudes flipped)."""
    b = x.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b)


def _from_order_key(key: torch.Tensor) -> torch.Tensor:
    """The inverse of `_order_key`: int64 keys -> the float32 values they were made from, bit for bit."""
    b = torch.where(key < 0, key ^ 0x7FFFFFFF, key)  # the flip is its own inverse
    return b.to(torch.int32).view(torch.float32)


def _may_sync(x: torch.Tensor) -> bool:
    """Whether a check may read a value back to the host: not while compiling or capturing a graph."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def beam_level(parent_scores: torch.Tensor, logprobs: torch.Tensor, width: int):
    """Global top-`width` (parent, token) pairs by parent_score + logprob.

    parent_scores [n], logprobs [n, V] -> (parent_rank [w], tokens [w], scores [w]), in descending
    score; equal scores are ordered by the lower flat index n_i * V + token. Static shapes, no host
    sync: in float32 one top-k over int64 keys (score bits, then the reversed index) gives that
    order without a sort; other dtypes use a stable sort, which gives the same order."""
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
    if _may_sync(flat) and bool(torch.isnan(flat).any()):
        raise ValueError(
            "draft log-probs contain NaN; check the draft logits (overflow in fp16?) and use log_softmax in float32"
        )
    if dtype == torch.float32:
        rev = (n * V - 1) - torch.arange(n * V, device=flat.device)  # lower index -> larger key
        keys = ((_order_key(flat) << 32) + rev).view(n, V)  # [n, V] distinct, and each one names its pair
        # Two small top-k's instead of one over n * V: the global top-w lies inside the rows' top-w's.
        # On the GPU both run as the row top-k kernel (ops.topk); one torch.topk over 65k keys is a multi-pass
        # radix select.
        return _decode_keys(flat_topk_values(keys, width), n, V)  # [w] keys -> the level
    idx = torch.sort(flat, descending=True, stable=True).indices[:width]
    return idx // V, idx % V, flat[idx]


def _decode_keys(best: torch.Tensor, n: int, V: int):
    """(parent_rank, token, score) [w] of beam keys [w]: the low 32 bits hold the reversed flat index, the high
    32 bits the score itself. Decoding reads nothing but `best`, so under torch.compile the level's bookkeeping
    after the top-k is one kernel of w elements (a gather flat[idx] makes it two)."""
    idx = (n * V - 1) - (best & 0xFFFFFFFF)
    return idx // V, idx % V, _from_order_key(best >> 32)


def _refuse_nan(x: torch.Tensor, parent_scores: torch.Tensor, what: str) -> None:
    """The check a one-launch selection's inputs get, where a check may read back (`_may_sync`): a ValueError if the
    draft's `what` (its logits or hidden rows) or the parents' scores hold NaN, which the kernels would rank as a
    value where the definition's log-probs check refuses them."""
    if _may_sync(x) and bool(torch.isnan(x).any() | torch.isnan(parent_scores).any()):
        raise ValueError(f"draft {what} contain NaN; check the draft model (overflow in fp16?)")


def beam_level_from_logits(parent_scores: torch.Tensor, logits: torch.Tensor, width: int):
    """`beam_level(parent_scores, log_softmax(logits.float()), width)`: the definition, or, where the switch
    LONGSPEC_BEAM_SELECT takes the level (`ops.topk.beam_keys`), the same selection in one launch whose scores
    may differ from the definition's in their last bits (the log-sum-exp is summed in another order)."""
    keys = beam_keys(logits, parent_scores, width)
    if keys is None:
        return beam_level(parent_scores, torch.log_softmax(logits.float(), dim=-1), width)
    _refuse_nan(logits, parent_scores, "logits")
    return _decode_keys(keys, *logits.shape)


def beam_level_from_hidden(parent_scores: torch.Tensor, h: torch.Tensor, head: torch.Tensor, width: int):
    """`beam_level_from_logits(parent_scores, lm_head(h, head), width)` from the draft's last hidden rows h [n, K]
    and its LM head [V, K]: the definition, or, where the switch LONGSPEC_HEAD_SELECT takes the level
    (`ops.topk.head_beam_keys`), the head and the selection in one launch (scores as `beam_level_from_logits`'s
    kernel: equal but for their last bits)."""
    h = h.to(head.dtype)
    level = _head_select_level(parent_scores, h, head, width)
    return beam_level_from_logits(parent_scores, lm_head(h, head), width) if level is None else level


def _head_select_level(parent_scores: torch.Tensor, h: torch.Tensor, head: torch.Tensor, width: int):
    """(parent_rank, token, score) [w] from the LM head and the selection in one launch, or None where
    LONGSPEC_HEAD_SELECT (`ops.topk.head_beam_keys`) leaves the level to the logits."""
    keys = head_beam_keys(h, head, parent_scores, width)
    if keys is None:
        return None
    _refuse_nan(h, parent_scores, "hidden states")
    return _decode_keys(keys, h.shape[0], head.shape[0])


# ----------------------------------------------------------------------------- static tree buffers


class TreeBuffers:
    """One tree of a fixed shape in preallocated device tensors (node 0 = root, then level by level).

    tokens, parents [N] long; scores [N] float32 (or score_dtype; cumulative log q); anc [N, N] bool, the tree mask
    built as levels are added (row i: node i and its ancestors); depths [N] (constant); q [N, V] the
    draft distribution at each expanded node (only with `vocab_size`, for the sampling rules)."""

    def __init__(self, shape, device, vocab_size: int | None = None, score_dtype=torch.float32):
        shape = TreeShape.of(shape)
        off = shape.level_offsets
        N, dev = shape.num_nodes, torch.device(device)
        self.shape, self.N, self.D = shape, N, shape.depth
        self.levels = [(off[l], off[l + 1]) for l in range(shape.depth + 1)]  # node range of each level
        self.tokens = torch.zeros(N, dtype=torch.long, device=dev)
        self.parents = torch.full((N,), -1, dtype=torch.long, device=dev)
        self.scores = torch.zeros(N, dtype=score_dtype, device=dev)
        self.anc = torch.zeros(N, N, dtype=torch.bool, device=dev)
        self.depths = torch.cat(
            [torch.full((hi - lo,), l, dtype=torch.long) for l, (lo, hi) in enumerate(self.levels)]
        ).to(dev)
        self.q = None if vocab_size is None else torch.zeros(N, vocab_size, dtype=score_dtype, device=dev)
        self.drafting = "beam"  # how the levels are grown: "beam" or "sampled"

    def start(self, root: torch.Tensor) -> None:
        """A tree holding only its root; root [1] long (device)."""
        self.tokens[:1].copy_(root)
        self.parents[:1].fill_(-1)  # fill_ on a slice: no host-to-device copy inside a graph
        self.scores[:1].fill_(0.0)
        self.anc.zero_()
        self.anc[0, :1].fill_(True)
        if self.q is not None:
            self.q.zero_()

    def add_level(self, l: int, parent_ids: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor) -> None:
        """Write level l: parent_ids, tokens, scores [w]; its mask rows mark each node and its l ancestors.

        The ancestors are found by walking `parents` up to the root (l - 1 hops, unrolled: l is a Python int),
        not by copying the parents' rows of `anc`: a kernel that reads rows of `anc` it cannot prove disjoint
        from the rows it writes needs a temporary and a second kernel under torch.compile."""
        lo, hi = self.levels[l]
        self.tokens[lo:hi] = tokens
        self.parents[lo:hi] = parent_ids
        self.scores[lo:hi] = scores.to(self.scores.dtype)
        cols = torch.arange(self.N, device=parent_ids.device)  # [N]
        rows = cols == torch.arange(lo, hi, device=parent_ids.device)[:, None]  # [w, N] the node itself
        up = parent_ids  # [w] the ancestor at depth l - 1, then l - 2, ..., 0 (the root)
        for hop in range(l):
            rows = rows | (cols == up[:, None])
            if hop < l - 1:
                up = self.parents.index_select(0, up)
        self.anc[lo:hi] = rows

    def tree(self, upto: int | None = None) -> DraftTree:
        """The (partial, levels 0..upto) tree as a DraftTree on the same device."""
        upto = self.D if upto is None else upto
        n = self.levels[upto][1]
        shape = TreeShape(self.shape.widths[:upto]) if upto else TreeShape.root_only()
        q = None if self.q is None else self.q[:n].clone()
        return DraftTree(
            self.tokens[:n].clone(),
            self.parents[:n].clone(),
            self.depths[:n].clone(),
            self.scores[:n].clone(),
            shape,
            q,
            self.drafting,
        )


def grow_beam_level(buf: TreeBuffers, l: int, logprobs: torch.Tensor) -> None:
    """Level l of a beam tree from the draft's log-probs [n, V] after each node of level l-1."""
    lo, hi = buf.levels[l - 1]
    w = buf.levels[l][1] - buf.levels[l][0]
    rank, tok, sc = beam_level(buf.scores[lo:hi], logprobs, w)
    buf.add_level(l, lo + rank, tok, sc)


def grow_beam_level_logits(buf: TreeBuffers, l: int, logits: torch.Tensor) -> None:
    """Level l of a beam tree from the draft's logits [n, V] (`beam_level_from_logits`): what the decoder runs.
    With LONGSPEC_BEAM_WRITE the selection's launch also writes the level (`ops.topk.beam_level_into`): the same
    tokens, parents, scores and mask rows as `add_level` below, with no launch of its own."""
    lo, hi = buf.levels[l - 1]
    new_lo, new_hi = buf.levels[l]
    # not level 1: the decoder's first draft stage starts the tree (`start`) just before, and compiled, a launch
    # that writes buffers the same graph has just written makes Inductor copy them around it (bench.fusion_proxy:
    # that stage's generated kernels 12 -> 18); later levels' stages begin from the buffers as they are
    if l > 1 and _write_level(buf, logits, lo, hi, new_lo, new_hi - new_lo):
        return
    rank, tok, sc = beam_level_from_logits(buf.scores[lo:hi], logits, new_hi - new_lo)
    buf.add_level(l, lo + rank, tok, sc)


def grow_beam_level_hidden(buf: TreeBuffers, l: int, h: torch.Tensor, head: torch.Tensor) -> None:
    """Level l of a beam tree from the draft's last hidden rows h [n, K] and its LM head [V, K]
    (`beam_level_from_hidden`): what the greedy decoder runs. Where the LM head is not folded into the selection
    (LONGSPEC_HEAD_SELECT off, the default), the logits go to `grow_beam_level_logits`."""
    lo, hi = buf.levels[l - 1]
    h = h.to(head.dtype)
    level = _head_select_level(buf.scores[lo:hi], h, head, buf.levels[l][1] - buf.levels[l][0])
    if level is None:  # the logits, then the selection (and, with LONGSPEC_BEAM_WRITE, the level) in one launch
        grow_beam_level_logits(buf, l, lm_head(h, head))
        return
    rank, tok, sc = level
    buf.add_level(l, lo + rank, tok, sc)


def _write_level(buf: TreeBuffers, logits: torch.Tensor, lo: int, hi: int, new_lo: int, w: int) -> bool:
    """The level [new_lo, new_lo + w) selected and written by one launch (`ops.topk.beam_level_into`), or False."""
    tree = {"tokens": buf.tokens, "parents": buf.parents, "scores": buf.scores, "anc": buf.anc}
    scores = buf.scores[lo:hi]
    if not beam_write_takes(logits, scores, w, tree):
        return False
    _refuse_nan(logits, scores, "logits")  # before the launch: nothing written
    beam_level_into(logits, scores, w, tree, new_lo, lo)
    return True


# ----------------------------------------------------------------------------- one sampled level


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


def sampled_children(q: torch.Tensor, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The `width` children of one sampled level: q [..., n, V] at the n parents -> tokens [..., width],
    numbered by parent rank, then in draw order (each parent's share by `allocate_children`)."""
    n, V = q.shape[-2:]
    counts = allocate_children(n, width)
    if max(counts) > V:
        raise ValueError(
            f"a sampled level gives {max(counts)} children to one parent but the vocabulary has {V} tokens; "
            "use a narrower level"
        )
    drawn = gumbel_topk(q, max(counts), generator)  # [..., n, c_max] in draw order
    return torch.cat([drawn[..., r, :c] for r, c in enumerate(counts)], dim=-1)  # [..., w]


def grow_sampled_level(buf: TreeBuffers, l: int, q: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Level l of a sampled tree from the draft's processed distribution q [n, V] at level l-1."""
    lo, hi = buf.levels[l - 1]
    w = buf.levels[l][1] - buf.levels[l][0]
    counts = allocate_children(hi - lo, w)
    rank = torch.repeat_interleave(torch.arange(hi - lo, device=q.device), torch.tensor(counts, device=q.device))
    tok = sampled_children(q, w, generator)  # [w]
    if buf.q is not None:
        buf.q[lo:hi] = q.to(buf.q.dtype)
    sc = buf.scores[lo + rank] + torch.log(q[rank, tok].to(buf.scores.dtype))  # padding (zero mass) -> -inf
    buf.add_level(l, lo + rank, tok, sc)


# ----------------------------------------------------------------------------- teaching growers

LevelLogprobs = Callable[[DraftTree, torch.Tensor], torch.Tensor]


def _grow(root_token, shape, level_logprobs, device, level_fn, vocab_for_q=False):
    shape = TreeShape.of(shape)
    device = torch.device("cpu") if device is None else torch.device(device)
    buf = None
    root = torch.tensor([int(root_token)], device=device)
    for l in range(1, shape.depth + 1):
        if buf is None:  # the first callback tells the vocabulary size
            lp = level_logprobs(DraftTree.from_parents(root, [-1]), torch.zeros(1, dtype=torch.long, device=device))
            _check_rows(lp, 1, 1)
            shape.check_fits(lp.shape[-1])
            dtype = torch.promote_types(lp.dtype, torch.float32)  # float64 callbacks keep float64 scores
            buf = TreeBuffers(shape, device, lp.shape[-1] if vocab_for_q else None, dtype)
            buf.start(root)
        else:
            lo, hi = buf.levels[l - 1]
            lp = level_logprobs(buf.tree(l - 1), torch.arange(lo, hi, device=device))
            _check_rows(lp, hi - lo, l)
        level_fn(buf, l, lp)
    if buf is None:
        buf = TreeBuffers(shape, device)
        buf.start(root)
    return buf


def _check_rows(lp, n, l):
    if lp.dim() != 2 or lp.shape[0] != n:
        raise ValueError(
            f"level_logprobs must return [{n}, V] for level {l}, got {tuple(lp.shape)}; "
            "return one row of log-probs per requested node"
        )


def grow_beam_tree(
    root_token: int, shape, level_logprobs: LevelLogprobs, device=None, params: SamplingParams | None = None
) -> DraftTree:
    """Grow a beam tree (docs/LONGSPEC.md section 1, steps 1-2).

    `level_logprobs(partial_tree, node_ids) -> [len(node_ids), V]` returns the draft's log-probs
    for the next token after each listed node's path; it is called once per level, with the root
    (tensor([0])) for level 1 and with all nodes of level l-1 for level l. `partial_tree` holds the
    nodes built so far, so its mask and positions are valid for a draft forward over them.
    With `params`, the processed draft distribution at every expanded node is kept in `tree.q`
    (what the biased "naive-topk" counter-example reads)."""

    def level(buf, l, lp):
        if params is not None:
            lo, hi = buf.levels[l - 1]
            buf.q[lo:hi] = probs_from_logits(lp, params).to(buf.q.dtype)
        grow_beam_level(buf, l, lp)

    buf = _grow(root_token, shape, level_logprobs, device, level, vocab_for_q=params is not None)
    return buf.tree()


def grow_sampled_tree(
    root_token: int,
    shape,
    level_logprobs: LevelLogprobs,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    device=None,
) -> DraftTree:
    """One sampled tree, with the processed draft distribution at every expanded node in `tree.q`.

    `level_logprobs` is `grow_beam_tree`'s callback (log-probs or logits of the draft); `params`
    (temperature, top-k, top-p) turns them into q exactly as the target's rows are processed."""

    def level(buf, l, lp):
        grow_sampled_level(buf, l, probs_from_logits(lp, params), generator)

    buf = _grow(root_token, shape, level_logprobs, device, level, vocab_for_q=True)
    buf.drafting = "sampled"
    return buf.tree()


BatchLevelProbs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def grow_sampled_batch(
    root_tokens: torch.Tensor, shape, level_probs: BatchLevelProbs, generator: torch.Generator | None = None
):
    """B sampled trees at once -> (TreeBatch, q [B, N, V]) (for exact-distribution tests).

    `level_probs(tokens [B, n_so_far], parents [n_so_far], node_ids [n]) -> [B, n, V]`: the draft's
    processed distribution after each listed node's path, called once per level (root, then level 1,
    ...). The children are drawn by `sampled_children`, the one definition of a sampled level."""
    shape = TreeShape.of(shape)
    tokens = torch.as_tensor(root_tokens, dtype=torch.long).reshape(-1, 1)  # [B, 1]
    B, dev = tokens.shape[0], tokens.device
    parents_all = sampled_parents(shape).to(dev)
    off = shape.level_offsets
    qs = []
    for l, w in enumerate(shape.widths, start=1):
        node_ids = torch.arange(off[l - 1], off[l], device=dev)
        q = level_probs(tokens, parents_all[: off[l]], node_ids)  # [B, n, V]
        if q.shape[:2] != (B, node_ids.numel()):
            raise ValueError(
                f"level_probs must return [B, n, V] = [{B}, {node_ids.numel()}, V] for level {l}, got "
                f"{tuple(q.shape)}; return one distribution per batch row and node"
            )
        shape.check_fits(q.shape[-1])
        tokens = torch.cat([tokens, sampled_children(q, w, generator)], dim=1)
        qs.append(q)
    V = qs[0].shape[-1] if qs else 1
    n_leaves = shape.num_nodes - sum(x.shape[1] for x in qs)
    leaves = torch.zeros(B, n_leaves, V, dtype=qs[0].dtype if qs else torch.float32, device=dev)
    q_all = torch.cat(qs + [leaves], dim=1)  # [B, N, V]
    return TreeBatch(tokens, parents_all[None].expand(B, -1), shape), q_all
