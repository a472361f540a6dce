"""One decoding step as a list of stages over static buffers: draft -> verify -> commit.

This is the only place where the stages of LongSpec (arXiv 2502.17421, docs/LONGSPEC.md section 1)
are put in order. `DecodeState` holds every buffer a step touches, preallocated for one method and
tree shape (gpt-fast's static KV cache, extended to the tree, the draft's ring and the bookkeeping):

    state before a step: the target's cache holds every committed token except the newest one, the
    root (the target's last prediction), at slots [0, P); the draft's ring still has to ingest the
    tokens emitted last step (`pend`, the first `pend_n` of D+1 slots).

    draft_root   ingest pend into the draft's ring, then tree level 1 from the root
    draft_next   tree level l from the draft run over level l-1 (one call per level)
    verify       one target pass over the N tree nodes (slots P..P+N-1), greedy acceptance
    commit       keep the accepted path's KV, emit its tokens, P += n

Each stage is a plain function of the state with static shapes and no host sync, so the eager loop
(`eager.SpecDecoder`) calls these functions one after another, and the graph path
(`graphs.GraphDecoder`) compiles and captures the very same functions: the fast path is the
readable path, captured. Sampling rules reuse the draft and commit stages; their acceptance walk
(spec.verify) runs between `verify_forward` and `commit` on the host.

Taught in: notebooks/03_one_step_slowly.ipynb.
"""

from __future__ import annotations

from functools import partial

import torch

from longspec_lab.ops.accept import fused_greedy_accept
from longspec_lab.ops.sampling import SamplingParams, probs_from_logits
from longspec_lab.spec.commit import advance, commit_kv
from longspec_lab.spec.draft import TreeBuffers, grow_beam_level_hidden, grow_beam_level_logits, grow_sampled_level
from longspec_lab.spec.tree import TreeShape
from longspec_lab.spec.verify import VERIFY_RULES, AcceptResult, acceptance_stats, greedy_accept, path_children


class DecodeState:
    """Device buffers for one method (shape None: autoregressive) and tree shape.

    P, root, out_len, n_acc [1]; out [capacity + D + 1] the generated tokens; emitted, path [D+1];
    the target's static KV cache; for a tree: the tree buffers, the draft's ring, pend [D+1] and
    pend_n [1] (tokens still to ingest), preds [N] (target argmax per node), verified / accepted [N],
    stats [2D + 2R] (acceptance counts summed over steps, spec.verify.acceptance_stats)."""

    def __init__(
        self, target, draft, shape: TreeShape | None, capacity: int, backend: str, keep_q: bool = False,
        drafting: str = "beam", rows: int = 0,
    ):  # fmt: skip
        dev = target.device
        self.target, self.draft, self.shape, self.backend = target, draft, shape, backend
        self.rows = rows  # > 0: batch-invariant mode, every target pass padded to this many rows
        capacity += rows
        self.D = shape.depth if shape is not None else 0
        L = lambda *s: torch.zeros(*s, dtype=torch.long, device=dev)
        self.P, self.root, self.out_len, self.n_acc = L(1), L(1), L(1), L(1)
        self.out = L(capacity + self.D + 1)
        self.emitted, self.path = L(self.D + 1), L(self.D + 1)
        self.tcache = target.new_cache(capacity)
        vocab = target.config.vocab_size
        rows = shape.num_nodes if shape is not None else 1
        # the target's logits of the last pass, for the sampling rules' host walk (graph path)
        self.logits = torch.zeros(rows, vocab, dtype=target.dtype, device=dev) if keep_q else None
        self.steps = L(1)  # steps taken; lengths[i] = tokens emitted by step i
        self.lengths = L(capacity + 1)
        if shape is None:
            return
        N = shape.num_nodes
        self.tree = TreeBuffers(shape, dev, vocab if keep_q else None)
        self.tree.drafting = drafting  # "sampled" when the levels are drawn by sampled_rule
        self.ring = draft.new_ring(max_pending=self.D + 1, max_tree_nodes=N)
        # [D - 1, R]: which ring slots the nodes of depth 1 .. D - 1 see (they sit at P + depth), made once a step
        self.window_rows = torch.zeros(max(self.D - 1, 1), self.ring.R, dtype=torch.bool, device=dev)
        # ... and their RoPE tables, made with them: [cos, sin], each [1, 1, D - 1, head dim] in the draft's dtype
        rope_shape = (1, 1, max(self.D - 1, 1), draft.config.head_dim)
        self.window_rope = [torch.zeros(rope_shape, dtype=draft.dtype, device=dev) for _ in range(2)]
        self.pend, self.pend_n = L(self.D + 1), L(1)
        self.preds = L(N)
        self.verified = torch.zeros(N, dtype=torch.bool, device=dev)
        self.accepted = torch.zeros(N, dtype=torch.bool, device=dev)
        self.R = max(shape.widths)
        self.stats = L(2 * self.D + 2 * self.R)

    @property
    def target_kv(self):
        """The target's last-layer cache [1, Hkv, S, D] x 2: what the draft cross-attends to."""
        return self.tcache.k[-1], self.tcache.v[-1]


# ----------------------------------------------------------------------------- prefill (dynamic length)


def prefill(st: DecodeState, prompt: torch.Tensor, pick=None) -> torch.Tensor:
    """Run the prompt [T] through the target (and the draft's ring); reset every buffer. Returns the
    target's logits [V] after the prompt; the first token is their argmax, or pick(logits) -> [1]."""
    t = st.target
    logits = t(prompt[None], cache=st.tcache, start=0, backend=st.backend, last_only=True)[0, -1]
    tok = logits.argmax()[None] if pick is None else pick(logits)
    st.P.fill_(prompt.numel())
    st.root.copy_(tok)
    st.out[:1].copy_(tok)
    st.out_len.fill_(1)
    st.steps.zero_()
    if st.shape is not None:
        st.ring.reset()
        st.draft.prefill(prompt, st.ring)
        st.pend.zero_()
        st.pend[:1].copy_(tok)
        st.pend_n.fill_(1)
        st.stats.zero_()
    return logits


# ----------------------------------------------------------------------------- the stages


def ar_forward(st: DecodeState) -> torch.Tensor:
    """The target's logits [V] after the root (one token at slot P, which it writes)."""
    t = st.target
    if st.rows:  # batch-invariant: the same padded pass as verification
        return _padded_pass(st, st.root, st.P, None)[0]
    return t(st.root[None], positions=st.P, cache=st.tcache, start=st.P, backend=st.backend, last_only=True)[0, -1]


def _padded_pass(st: DecodeState, tokens, positions, mask) -> torch.Tensor:
    """Batch-invariant mode: every target pass has exactly `st.rows` rows, so each matmul and attention
    call has one shape and a token's row is computed the same way in a 1-token and a 72-token pass.
    tokens, positions [n]; mask [n, n] (None: one row). The padding rows see no block key, which the
    ordered attention skips (output 0): they cost matmul rows, not attention. Their cache slots lie past
    the n real ones and are overwritten later; no real row ever sees them. Returns logits [n, V]."""
    n, M = tokens.shape[0], st.rows
    pad = torch.zeros(M - n, dtype=tokens.dtype, device=tokens.device)
    toks = torch.cat([tokens, pad])[None]  # [1, M]
    pos = torch.cat([positions.expand(n), st.P.expand(M - n)])[None]  # [1, M]
    block = torch.zeros(M, M, dtype=torch.bool, device=tokens.device)  # [M, M] padding rows: all False
    block[:n, :n] = torch.ones(1, 1, dtype=torch.bool, device=tokens.device) if mask is None else mask
    # "ordered" attention: each row sums its keys in one order (prefix, then its visible block keys), so a
    # token's output is the same whether its ancestors are tree keys here or prefix keys in an AR step
    logits = st.target(toks, positions=pos, cache=st.tcache, start=st.P, mask=block, backend="ordered")
    return logits[0, :n]


def ar_step(st: DecodeState, pick=None) -> None:
    """Plain decoding: one target pass; its argmax (or pick(logits) -> [1], a sampler) is the next token."""
    ar_choose(st, ar_forward(st), pick)
    ar_advance(st)


def ar_choose(st: DecodeState, logits: torch.Tensor, pick=None) -> None:
    """The next token of plain decoding from the logits [V]: argmax, or pick(logits) -> [1]."""
    st.emitted[:1].copy_(logits.argmax()[None] if pick is None else pick(logits))
    st.n_acc.fill_(1)


def ar_advance(st: DecodeState) -> None:
    """Emit the chosen token: it becomes the root, P and the output move on by one."""
    advance(st.out, st.out_len, st.root, st.P, st.emitted[:1], st.n_acc)
    _count_step(st)


def ar_logits(st: DecodeState) -> None:
    """The AR pass into the state's logits buffer (the graph path's sampling runs read it)."""
    st.logits[:1].copy_(ar_forward(st)[None])


def beam_rule(buf: TreeBuffers, l: int, h: torch.Tensor, draft, params: SamplingParams | None = None) -> None:
    """Grow level l of a beam tree from the draft's last hidden rows h [n, K] at level l-1 (recording q with
    params). Greedy: the LM head and the selection (one launch with LONGSPEC_HEAD_SELECT); else the logits, then
    log-softmax, scores and top-k (one launch with LONGSPEC_BEAM_SELECT)."""
    if params is None:
        grow_beam_level_hidden(buf, l, h, draft.head_weight)
        return
    logits = draft.head(h)  # [n, V]
    lo, hi = buf.levels[l - 1]
    buf.q[lo:hi] = probs_from_logits(logits, params).to(buf.q.dtype)
    grow_beam_level_logits(buf, l, logits)


def sampled_rule(buf, l, h, draft, params: SamplingParams, generator: torch.Generator | None = None) -> None:
    """Grow level l of a sampled tree: children drawn without replacement from the processed q."""
    grow_sampled_level(buf, l, probs_from_logits(draft.head(h), params), generator)


def draft_root(st: DecodeState, grow=beam_rule) -> None:
    """Ingest the tokens emitted last step, then level 1 of the tree from the root."""
    tk, tv = st.target_kv
    h = st.draft.ingest(st.pend, st.pend_n, st.ring, tk, tv, st.P, st.backend, hidden=True)  # [D+1, K]
    if st.D > 1:  # the ring is now fixed for this step: the window and RoPE rows of every later level at once
        pos = st.P + torch.arange(1, st.D, device=st.P.device)  # [D - 1] positions of depths 1 .. D - 1
        st.window_rows.copy_(st.ring.visible(pos, committed_only=True))
        for buf, table in zip(st.window_rope, st.draft.target.rotary(pos[None], st.draft.dtype)):
            buf.copy_(table)
    st.tree.start(st.root)
    grow(st.tree, 1, h.index_select(0, st.pend_n - 1), st.draft)  # [1, K] at the last real pending token


def draft_next(st: DecodeState, l: int, grow=beam_rule) -> None:
    """Level l of the tree: the draft runs once over all nodes of level l-1."""
    buf = st.tree
    lo, hi = buf.levels[l - 1]
    tk, tv = st.target_kv
    qpos = st.P + buf.depths[lo:hi]  # [n] = seen - 1 + depth, depth = l - 1
    anc = buf.anc[lo:hi, 1:]  # [n, N-1] the scratch slots of each node's ancestors and itself
    window = st.window_rows[l - 2 : l - 1]  # [1, R] what depth l - 1 sees of the ring (made in draft_root)
    rope = [t[:, :, l - 2 : l - 1] for t in st.window_rope]  # cos, sin [1, 1, 1, D] of its position
    h = st.draft.tree_level(buf.tokens[lo:hi], qpos, lo - 1, anc, st.ring, tk, tv, st.P, st.backend, window,
                            rope, hidden=True)  # [n, K]  # fmt: skip
    grow(buf, l, h, st.draft)


def verify_forward(st: DecodeState) -> torch.Tensor:
    """One target pass over every tree node (RoPE position P + depth, the tree mask) -> logits [N, V]."""
    buf = st.tree
    if st.rows:
        return _padded_pass(st, buf.tokens, st.P + buf.depths, buf.anc)
    pos = (st.P + buf.depths)[None]
    t = st.target
    return t(buf.tokens[None], positions=pos, cache=st.tcache, start=st.P, mask=buf.anc, backend=st.backend)[0]


def verify(st: DecodeState) -> None:
    """The verification pass with greedy acceptance: path, n_acc, emitted = target argmax along the path.
    With LONGSPEC_GREEDY_ACCEPT the acceptance after the pass is one launch (`ops.accept`), the same outputs."""
    buf = st.tree
    logits = verify_forward(st)  # [N, V]
    if fused_greedy_accept(logits, buf, _accept_buffers(st), st.D, st.R):
        return
    preds = logits.argmax(-1)  # [N] the target's next token after each node's path
    st.preds.copy_(preds)
    verified, accepted, path, n = greedy_accept(buf.tokens, buf.parents, buf.depths, buf.anc, buf.levels, preds)
    st.verified.copy_(verified)
    st.accepted.copy_(accepted)
    st.path.copy_(path)
    st.n_acc.copy_(n)
    st.emitted.copy_(preds.index_select(0, path))
    tried = path_children(buf.parents, buf.depths, path)  # the children of the path's nodes
    st.stats.add_(acceptance_stats(buf.parents, buf.depths, path, n, tried, st.D, st.R))


def _accept_buffers(st: DecodeState) -> dict:
    """The state's buffers that greedy acceptance writes (and `stats`, which it adds to)."""
    names = ("preds", "verified", "accepted", "path", "n_acc", "emitted", "stats")
    return {name: getattr(st, name) for name in names}


def verify_logits(st: DecodeState) -> None:
    """The verification pass into the state's logits buffer [N, V] (for the sampling rules' walk)."""
    st.logits.copy_(verify_forward(st))


def sample_accept(st: DecodeState, logits: torch.Tensor, verify: str, params, generator):
    """A sampling rule's walk on the verified tree (host control flow), written back into the state:
    path, emitted, n_acc and the acceptance counts. Returns (AcceptResult, DraftTree, target argmax [N])."""
    p = probs_from_logits(logits, params)  # [N, V] the target's distribution per node
    tree = st.tree.tree()
    result = VERIFY_RULES[verify](tree, p, None, generator)
    n, pad = result.accept_length, st.D + 1 - result.accept_length
    st.path.copy_(torch.cat([result.path, result.path[-1:].expand(pad)]))
    st.emitted.copy_(torch.cat([result.emitted, result.emitted[-1:].expand(pad)]))
    st.n_acc.fill_(n)
    buf = st.tree
    st.stats.add_(acceptance_stats(buf.parents, buf.depths, st.path, st.n_acc, result.tried, st.D, st.R))
    return result, tree, p.argmax(-1)


def commit(st: DecodeState) -> None:
    """Keep the accepted path's KV entries (all layers), emit its tokens, hand them to the draft."""
    commit_kv(st.tcache.k, st.tcache.v, st.P, st.path)
    st.pend.copy_(st.emitted)
    st.pend_n.copy_(st.n_acc)
    advance(st.out, st.out_len, st.root, st.P, st.emitted, st.n_acc)
    _count_step(st)


def _count_step(st: DecodeState) -> None:
    st.lengths.index_copy_(0, st.steps, st.n_acc)
    st.steps.add_(1)


def step_outcome(st: DecodeState):
    """The last greedy step read back for a trace: (DraftTree, preds [N], AcceptResult), on the device."""
    n = int(st.n_acc)
    path = st.path[:n].clone()
    tree = st.tree.tree()
    tried = path_children(tree.parents, tree.depths, st.path)  # the padded path [D+1]
    result = AcceptResult(path, st.emitted[:n].clone(), st.verified.clone(), st.accepted.clone(), n, tried)
    return tree, st.preds.clone(), result


def sampling_stages(st: DecodeState, params: SamplingParams | None = None):
    """The stages of one sampled step around the host walk: (before, after) lists of (name, function).
    The draft is the beam tree (with q recorded when `params` is given, for naive-topk)."""
    if st.shape is None:
        return [("verify", partial(ar_logits, st))], [("commit", partial(ar_advance, st))]
    grow = beam_rule if params is None else partial(beam_rule, params=params)
    before = [("draft1", partial(draft_root, st, grow))]
    before += [(f"draft{l}", partial(draft_next, st, l, grow)) for l in range(2, st.D + 1)]
    return before + [("verify", partial(verify_logits, st))], [("commit", partial(commit, st))]


def greedy_stages(st: DecodeState) -> list[tuple[str, callable]]:
    """The stages of one greedy step, in order, as (name, zero-argument function) pairs."""
    if st.shape is None:
        return [("verify", partial(ar_step, st))]
    stages = [("draft1", partial(draft_root, st))]
    stages += [(f"draft{l}", partial(draft_next, st, l)) for l in range(2, st.D + 1)]
    return stages + [("verify", partial(verify, st)), ("commit", partial(commit, st))]
