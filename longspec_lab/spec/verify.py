"""Acceptance rules: which path of a verified draft tree is kept (greedy, and lossless sampling).

After one target forward pass over a draft tree (LongSpec, arXiv 2502.17421, section 1 step 5 of
docs/LONGSPEC.md) we know, for every node i, the target's next-token prediction t[i] after the path
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

Sampling (temperature > 0; docs/LONGSPEC.md section 4). Every rule in `VERIFY_RULES` has the signature
`rule(tree, p, q=None, generator=None) -> AcceptResult`, p [N, V] the target's sampling distribution
at every node (sampling.probs_from_logits), q [N, V] the draft's, processed the same way (rows of
expanded nodes only). `verify_batch` runs the same walk on B trees at once (the statistical tests).
All sampling rules walk down from the root and emit one token per visited node:
  * "target-sample"  x ~ p(node); descend into the child whose token is x; else stop. The emitted
                     tokens are exactly an autoregressive sample from p: lossless for ANY tree.
  * "rrs"            recursive rejection sampling over the children c1, c2, ... (drafted from q WITHOUT
                     replacement, in that order, their number fixed before they were drawn):
                     accept ci w.p. min(1, p'(ci)/q'(ci)); on rejection p' <- norm(max(p' - q', 0)) and
                     ci is removed from q' (renormalised); all rejected -> emit x ~ p'. Lossless
                     (SpecInfer / "Recursive Speculative Decoding"): by induction over the children,
                     each emitted token is distributed exactly as p given the prefix.
  * "chain"          the same rule with one child per node: the standard min(1, p/q) rule of chain
                     speculative sampling, the draft having SAMPLED its gamma tokens from q.
  * "naive-topk"     min(1, p'/q) applied to beam (top-k) siblings, q never updated: what the reference
                     code does. BIASED, a labelled counter-example: a top-k sibling x was not drawn
                     from q, it is there with probability 1, so the ratio p/q corrects for a proposal
                     that never happened. With p == q it accepts the draft's first choice every time.
The fields of `AcceptResult` mean the same for every rule: `tried` marks the nodes the rule offered
to its check (greedy: the children of the path's nodes); `verified` the nodes that passed their own
check (greedy: t[parent] == token, known for every node; sampling: accepted when offered);
`accepted` the nodes verified together with all their ancestors (sampling: the emitted path;
greedy: the path, plus any duplicate-token sibling of a path node); `path` the emitted path. Each
rule checks its inputs: p must be probabilities, and the tree must be drafted the way the rule is
lossless for (`DraftTree.drafting`).

`greedy_accept` is the one definition of greedy acceptance: static shapes and no host sync, so the
eager loop, `torch.compile` and CUDA graphs all run it; `accept_greedy` wraps it for one DraftTree.

Taught in: notebooks/03_one_step_slowly.ipynb (greedy) and notebooks/06_sampling_without_bias.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longspec_lab.ops.sampling import sample_categorical, uniform
from longspec_lab.spec.tree import DraftTree, TreeBatch


@dataclass
class AcceptResult:
    path: torch.Tensor  # [k+1] long, node ids root..winner
    emitted: torch.Tensor  # [k+1] long, the tokens this step adds (last = the target's bonus token)
    verified: torch.Tensor  # [N] bool, passed its own check (greedy: t[parent] == token; root True)
    accepted: torch.Tensor  # [N] bool, verified and so is every ancestor (the path, plus duplicate-sibling ties)
    accept_length: int  # len(emitted) = depth(winner) + 1
    tried: torch.Tensor | None = None  # [N] bool, offered to the rule's check

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
        raise TypeError(
            f"target_tokens must be token ids (long), got {target_tokens.dtype}; "
            "pass logits.argmax(-1) rather than the logits"
        )
    if target_tokens.shape != (tree.num_nodes,):
        raise ValueError(
            f"target_tokens must be [N] = [{tree.num_nodes}] (one prediction per tree "
            f"node), got {tuple(target_tokens.shape)}; for batch 1 pass "
            "logits[0, -N:].argmax(-1)"
        )
    return target_tokens.to(device=tree.device, dtype=torch.long)


def greedy_accept(tokens, parents, depths, anc, levels, preds):
    """Greedy acceptance on static buffers, no host sync.

    tokens, parents, depths, preds [N] long; anc [N, N] bool tree mask (row i: node i and its ancestors);
    levels: the (lo, hi) node range of each depth. Returns verified [N], accepted [N], path [D+1] (the node at
    each depth of the winner's path, padded with the winner) and n [1] = depth(winner) + 1 tokens to emit.

    Written without a loop over the levels, so that a compiled step runs it as a few fused reductions: a node is
    accepted when it and every ancestor are verified (one row reduction over the tree mask), and the path's node
    at depth d is the one ancestor of the winner at that depth (one reduction per depth, all in one [D+1, N])."""
    N = tokens.shape[0]
    idx = torch.arange(N, device=tokens.device)
    verified = (preds[parents.clamp_min(0)] == tokens) | (idx == 0)  # [N] root always
    accepted = (anc <= verified[None, :]).all(1)  # [N] no unverified node among itself and its ancestors
    key = torch.where(accepted, depths * N + (N - 1 - idx), -1)  # deepest, then lowest index
    win = key.argmax()[None]  # [1]; a 0-d index would be read on the host
    row = anc.index_select(0, win)  # [1, N] the winner and its ancestors
    at = row & (depths[None, :] == torch.arange(len(levels), device=tokens.device)[:, None])  # [D+1, N]
    path = torch.where(at.any(1), (at.long() * idx).sum(1), win)  # [D+1] one ancestor per depth, else the winner
    return verified, accepted, path, depths.index_select(0, win) + 1


def path_children(parents: torch.Tensor, depths: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """bool [N]: the children of the nodes on a padded path [D+1] (the padding repeats the winner), i.e. the nodes
    greedy acceptance offered. Node j qualifies when its parent is the path's node at depth(j) - 1; a padded entry
    is the winner, which sits one depth higher, so it never matches. Elementwise (a gather, no scatter)."""
    return (parents >= 0) & (path.gather(0, (depths - 1).clamp_min(0)) == parents)


def accept_greedy(tree: DraftTree, target_tokens: torch.Tensor) -> AcceptResult:
    """Greedy (temperature 0) acceptance; target_tokens[i] = target argmax after node i's path."""
    t = _check_targets(tree, target_tokens)  # [N]
    levels = list(zip(tree.shape.level_offsets[:-1], tree.shape.level_offsets[1:]))
    verified, accepted, path, n = greedy_accept(tree.tokens, tree.parents, tree.depths, tree.mask, levels, t)
    k = int(n)
    tried = path_children(tree.parents, tree.depths, path)  # the children of the path's nodes (path padded)
    path = path[:k]
    return AcceptResult(path, t[path], verified, accepted, k, tried)


def verified_nodes(tree: DraftTree, target_tokens: torch.Tensor) -> torch.Tensor:
    """bool [N]: the target's prediction at each node's parent equals the node's token."""
    return accept_greedy(tree, target_tokens).verified


# ----------------------------------------------------------------------------- sampling rules


@dataclass
class BatchAccept:
    emitted: torch.Tensor  # [B, D+1] long, -1 after lengths[b]
    lengths: torch.Tensor  # [B] long, tokens emitted (>= 1)
    path: torch.Tensor  # [B, D+1] long node ids root..winner, -1 after lengths[b]
    tried: torch.Tensor  # [B, N] bool
    on_path: torch.Tensor  # [B, N] bool


MODES = {"greedy": "argmax", "target-sample": "sample", "rrs": "rrs", "chain": "rrs", "naive-topk": "naive"}


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)) per row; a row with no residual mass (p == q up to round-off) keeps p."""
    r = (p - q).clamp_min(0)
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 0, r / s.clamp_min(torch.finfo(r.dtype).tiny), p)


def _offer_children(pr, qr, kids, ktok, live, mode, generator):
    """Offer the children in rank order; -> (found [B], child position in level [B], residual p [B, V],
    tried [B, w]). pr, qr [B, V] (copies, updated in place of rejections); kids, ktok [B, w]."""
    B, w = kids.shape
    ar = torch.arange(B, device=kids.device)
    rank = kids.long().cumsum(1) - 1  # [B, w] sibling rank
    found = torch.zeros(B, dtype=torch.bool, device=kids.device)
    pos = torch.zeros(B, dtype=torch.long, device=kids.device)
    tried = torch.zeros_like(kids)
    for j in range(w):
        sel = kids & (rank == j)  # [B, w] the j-th child
        has = sel.any(1) & live & ~found
        if not bool(has.any()):
            break
        cpos = sel.to(torch.int8).argmax(1)  # [B]
        x = ktok[ar, cpos]
        px, qx = pr[ar, x], qr[ar, x]
        offer = has & (qx > 0)  # a zero-mass child (gumbel_topk padding) is never accepted
        tried[ar, cpos] |= offer
        u = uniform((B,), generator, pr.device, pr.dtype)
        acc = offer & (u * qx < px)  # w.p. min(1, p'(x) / q'(x))
        found, pos = found | acc, torch.where(acc, cpos, pos)
        rej = offer & ~acc
        if bool(rej.any()):
            pr = torch.where(rej[:, None], _residual(pr, qr), pr)
            if mode == "rrs":  # remove x from q', renormalise
                q2 = qr.clone()
                q2[ar, x] = 0
                q2 = q2 / q2.sum(-1, keepdim=True).clamp_min(torch.finfo(q2.dtype).tiny)
                qr = torch.where(rej[:, None], q2, qr)
    return found, pos, pr, tried


def verify_batch(
    rule: str,
    batch: TreeBatch,
    p: torch.Tensor,
    q: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> BatchAccept:
    """Run `rule` on B trees at once; p, q [B, N, V]. One walk, root to leaf, vectorised over B."""
    if rule not in MODES:
        raise ValueError(f"verify rule {rule!r} is unknown; use one of {', '.join(MODES)}")
    mode = MODES[rule]
    B, N = batch.tokens.shape
    if p.shape[:2] != (B, N):
        raise ValueError(
            f"p must be [B, N, V] = [{B}, {N}, V] (the target's distribution at every node), got {tuple(p.shape)}"
        )
    if mode in ("rrs", "naive") and (q is None or q.shape != p.shape):
        raise ValueError(
            f"verify={rule!r} needs the draft distribution q [B, N, V] like p {tuple(p.shape)}; "
            "draft with spec.draft.grow_sampled_tree (rrs, chain) or grow_beam_tree(..., params=...) (naive-topk)"
        )
    if rule == "chain" and any(w != 1 for w in batch.shape.widths):
        raise ValueError(
            f"verify='chain' needs a chain (one child per node), got tree_shape "
            f"{list(batch.shape.widths)}; use method='chain', or verify='rrs' for a tree"
        )
    dev, off, D = p.device, batch.shape.level_offsets, batch.shape.depth
    ar = torch.arange(B, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)
    emitted = torch.full((B, D + 1), -1, dtype=torch.long, device=dev)
    path = emitted.clone()
    path[:, 0] = 0
    tried = torch.zeros(B, N, dtype=torch.bool, device=dev)
    on_path = tried.clone()
    on_path[:, 0] = True
    for l in range(D + 1):
        pr = p[ar, cur]  # [B, V]
        lo, hi = (off[l + 1], off[l + 2]) if l < D else (N, N)
        kids = (batch.parents[:, lo:hi] == cur[:, None]) & live[:, None]  # [B, w] children of cur
        ktok = batch.tokens[:, lo:hi]
        if mode in ("argmax", "sample"):
            x = pr.argmax(-1) if mode == "argmax" else sample_categorical(pr, generator)
            hit = kids & (ktok == x[:, None])  # first child with token x
            found, pos = hit.any(1), hit.to(torch.int8).argmax(1) if hi > lo else cur
            tried[:, lo:hi] |= kids
        else:
            found, pos, pr, t = _offer_children(pr, q[ar, cur], kids, ktok, live, mode, generator)
            tried[:, lo:hi] |= t
            x = sample_categorical(pr, generator)  # from the residual
            if hi > lo:
                x = torch.where(found, ktok[ar, pos], x)
        emitted[:, l] = torch.where(live, x, emitted[:, l])
        go = live & found
        if not bool(go.any()):
            break
        child = lo + pos
        path[:, l + 1] = torch.where(go, child, -1)
        on_path[ar[go], child[go]] = True
        cur, live = torch.where(go, child, cur), go
    return BatchAccept(emitted, (emitted >= 0).sum(1), path, tried, on_path)


def _check_probs(name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """x [N, V] must hold probabilities (non-negative rows summing to 1) where `rows` [N] is True."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor of probabilities, got {type(x).__name__}")
    sel = x if rows is None else x[rows]
    if sel.numel() == 0:
        return
    sums = sel.double().sum(-1)
    if bool((sel < 0).any()) or not bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
        raise ValueError(
            f"{name} must be probabilities (rows >= 0 summing to 1), but its rows sum to "
            f"{float(sums.min()):.3g}..{float(sums.max()):.3g}; these look like logits: pass "
            "ops.sampling.probs_from_logits(logits, params)"
        )


def _single(rule: str, tree: DraftTree, p, q, generator) -> AcceptResult:
    if not isinstance(tree, DraftTree):
        raise TypeError(f"verify={rule!r} takes one DraftTree, got {type(tree).__name__}; for B trees use verify_batch")
    if p.dim() != 2 or p.shape[0] != tree.num_nodes:
        raise ValueError(f"p must be [N, V] = [{tree.num_nodes}, V], one row per tree node; got {tuple(p.shape)}")
    _check_probs("p", p)
    if MODES[rule] in ("rrs", "naive"):
        q = tree.q if q is None else q
        if q is None:
            raise ValueError(
                f"verify={rule!r} needs the draft distribution q [N, V]; draft the tree with "
                "spec.draft.grow_sampled_tree (rrs, chain) or grow_beam_tree(..., params=...) (naive-topk), "
                "which keep it in tree.q"
            )
        if q.shape != p.shape:
            raise ValueError(f"q {tuple(q.shape)} must match p {tuple(p.shape)}: [N, V], one row per tree node")
        _check_probs("q", q, torch.bincount(tree.parents[1:], minlength=tree.num_nodes) > 0)
        want = "beam" if rule == "naive-topk" else "sampled"
        if tree.drafting != want:
            why = {
                "sampled": "it is lossless only when each node's children are drawn from q without replacement, "
                "in a number fixed by the shape; draft with spec.draft.grow_sampled_tree, or use "
                "verify='target-sample', which is lossless for any tree",
                "beam": "it is the biased counter-example on beam (top-k) siblings",
            }[want]
            raise ValueError(f"verify={rule!r} got a tree drafted by {tree.drafting!r}, but {why}")
    r = verify_batch(rule, TreeBatch.of(tree), p[None], None if q is None else q[None], generator)
    n = int(r.lengths[0])
    on_path = r.on_path[0]
    return AcceptResult(r.path[0, :n], r.emitted[0, :n], on_path, on_path, n, r.tried[0])


def verify_greedy(tree: DraftTree, p, q=None, generator=None) -> AcceptResult:
    """Temperature 0: accept_greedy on argmax(p) (p may be logits or probabilities)."""
    return accept_greedy(tree, p.argmax(-1))


def verify_target_sample(tree: DraftTree, p, q=None, generator=None) -> AcceptResult:
    """x ~ p at each node, descend into the child with token x; lossless for any tree."""
    return _single("target-sample", tree, p, q, generator)


def verify_rrs(tree: DraftTree, p, q=None, generator=None) -> AcceptResult:
    """Recursive rejection sampling; the children must be drafted from q without replacement."""
    return _single("rrs", tree, p, q, generator)


def verify_chain(tree: DraftTree, p, q=None, generator=None) -> AcceptResult:
    """min(1, p/q) on a chain whose tokens were sampled from q."""
    return _single("chain", tree, p, q, generator)


def verify_naive_topk(tree: DraftTree, p, q=None, generator=None) -> AcceptResult:
    """BIASED counter-example: min(1, p/q) on deterministic (beam) siblings; never use it for output."""
    return _single("naive-topk", tree, p, q, generator)


VERIFY_RULES = {
    "greedy": verify_greedy,
    "target-sample": verify_target_sample,
    "rrs": verify_rrs,
    "chain": verify_chain,
    "naive-topk": verify_naive_topk,
}
LOSSLESS_SAMPLING_RULES = ("target-sample", "rrs", "chain")


# ----------------------------------------------------------------------------- statistics


def sibling_ranks(parents: torch.Tensor) -> torch.Tensor:
    """[N] long: a node's index among its parent's children (root 0), children in node order."""
    n = parents.numel()
    same = parents[:, None] == parents[None, :]  # [N, N]
    return (same & torch.ones(n, n, dtype=torch.bool, device=parents.device).tril(-1)).sum(1)


def acceptance_stats(parents, depths, path, n, tried, D: int, R: int) -> torch.Tensor:
    """One step's acceptance counts on static buffers, no host sync -> long [2D + 2R]:
    depth d (1..D) tried (the path reached depth d-1 at a node with children offered) and accepted
    (reached depth d), then sibling rank r (0..R-1) tried and accepted. path [D+1] padded, n [1]."""
    # All four counts are one sum over the nodes of a [2D + 2R, N] 0/1 matrix (row k: which nodes count for entry k),
    # built elementwise: a compiled step runs it as one reduction (plus the sibling ranks'), where separate sums,
    # gathers along the path and index_add each became kernels of their own on the GPU.
    dev = parents.device
    N = parents.numel()
    idx = torch.arange(N, device=dev)  # [N]
    ranks = sibling_ranks(parents)  # [N]
    on_path = (depths >= 1) & (depths < n) & (path.gather(0, depths) == idx)  # [N] the path's nodes below the root
    k = torch.arange(2 * D + 2 * R, device=dev)[:, None]  # [K, 1] the entry each row counts
    counts = torch.where(
        k < D,
        (depths == k + 1) & tried,  # depth k+1 offered (any such node: clamped to 1 below)
        torch.where(
            k < 2 * D,
            (idx == 0) & (k - D < n - 1),  # depth k-D+1 reached: counted once
            torch.where(k < 2 * D + R, (ranks == k - 2 * D) & tried & (idx >= 1), (ranks == k - 2 * D - R) & on_path),
        ),
    ).sum(1)  # [K]
    return torch.where(k[:, 0] < D, counts.clamp_max(1), counts)


def acceptance_counts(tree: DraftTree, result: AcceptResult) -> dict[str, list[int]]:
    """`acceptance_stats` of one step as lists (one device -> host transfer)."""
    dev, D = tree.device, tree.shape.depth
    R = max(tree.shape.widths, default=0)
    path = result.path.to(dev)
    padded = torch.cat([path, path[-1:].expand(D + 1 - path.numel())])  # [D+1]
    tried = result.tried
    if tried is None:  # children of the path's nodes
        tried = path_children(tree.parents, tree.depths, padded)
    n = torch.tensor([path.numel()], device=dev)
    flat = acceptance_stats(tree.parents, tree.depths, padded, n, tried.to(dev), D, R).tolist()
    return split_stats(flat, D, R)


def split_stats(flat: list[int], D: int, R: int) -> dict[str, list[int]]:
    """The flat [2D + 2R] counts of `acceptance_stats` as named lists."""
    return {
        "depth_tried": flat[:D],
        "depth_accepted": flat[D : 2 * D],
        "rank_tried": flat[2 * D : 2 * D + R],
        "rank_accepted": flat[2 * D + R : 2 * D + 2 * R],
    }
