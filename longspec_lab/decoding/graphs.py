"""The fast path: static shapes, device-resident bookkeeping, CUDA-graph-captured stages.

`SpecDecoder` (decode.py) is the readable loop: Python ints for lengths, a host sync per step.
`FastDecoder` runs the same greedy algorithm with every shape fixed in advance, so each stage can be
captured once in a CUDA graph (gpt-fast's recipe) and replayed:

    draft (ingest + level 1) -> draft level 2 .. D -> verify (target pass + greedy accept) -> commit

* The committed length P, the root token, the draft's pending tokens and the output buffer live in
  device tensors; the target's cache is written with `index_copy_` at P and attention hides the
  unused slots with masks built on the device (`attention.attend_static`, or the Triton kernel with
  device prefix lengths).
* Acceptance, the accepted path (padded to D + 1 entries) and the commit gather are tensor code.
* The draft's ring buffer has W + D + 1 slots and remembers each slot's position, so padded
  pending tokens can be written without clobbering anything still inside the window.
* The host only replays graphs; it reads the output length every few steps (never more steps than
  can be afforded without passing max_new_tokens by more than one step).
On the CPU the same stage functions run eagerly: tests check that they give the eager loop's tokens.
"""

from __future__ import annotations

import time

import torch

from longspec_lab.decoding.eager import SpecDecoder, _as_prompt
from longspec_lab.spec.trace import GenerationResult
from longspec_lab.spec.tree import DEFAULT_TREE_SHAPE, TreeShape


def _sdpa(q, k, v, mask):
    """Masked attention with the KV heads expanded to the query heads: SDPA's memory-efficient
    kernel takes a boolean mask but not `enable_gqa`, and the fallback costs a dozen launches."""
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _Stage:
    """One stage function; replayed from its CUDA graph once `_Plan.capture` has recorded it."""

    def __init__(self, fn):
        self.fn, self.graph = fn, None

    def __call__(self):
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


class _Plan:
    """Static buffers and stages for one method + tree shape."""

    def __init__(self, dec: "FastDecoder", shape: TreeShape | None):
        dev = dec.device
        self.dec, self.shape = dec, shape
        L = lambda *s: torch.zeros(*s, dtype=torch.long, device=dev)  # noqa: E731
        self.P, self.root, self.out_len, self.seen, self.pend_n = L(1), L(1), L(1), L(1), L(1)
        self.out = L(dec.capacity)
        self.P.fill_(1)  # a valid (garbage) state for the capture warm-up; generate() resets it
        self.pend_n.fill_(1)
        if shape is None:  # autoregressive
            self.stages = [("verify", _Stage(self._ar_step))]
            return
        d = dec.draft
        D, N = shape.depth, shape.num_nodes
        self.D, self.N = D, N
        self.pend = L(D + 1)
        off = shape.level_offsets
        self.levels = [(off[l], off[l + 1]) for l in range(D + 1)]  # node id ranges per level
        self.depths = torch.cat(
            [torch.full((hi - lo,), l, dtype=torch.long) for l, (lo, hi) in enumerate(self.levels)]
        ).to(dev)
        self.tokens, self.parents = L(N), L(N)
        self.scores = torch.zeros(N, device=dev)
        self.anc = torch.zeros(N, N, dtype=torch.bool, device=dev)  # tree mask, built level by level
        self.preds, self.path, self.n_acc = L(N), L(D + 1), L(1)
        dc = d.config
        self.W = dc.window
        self.R = dc.window + D + 1  # ring slots: the window plus room for padded pending tokens
        # one buffer per K and V: ring slots [0, R), then the tree scratch [R, R + N - 1), so a
        # tree level attends to both without concatenating them
        kv = (1, dc.num_kv_heads, self.R + N - 1, dc.head_dim)
        self.kbuf = torch.zeros(kv, dtype=d.dtype, device=dev)
        self.vbuf = torch.zeros_like(self.kbuf)
        self.rk, self.rv = self.kbuf[:, :, : self.R], self.vbuf[:, :, : self.R]
        self.sk, self.sv = self.kbuf[:, :, self.R :], self.vbuf[:, :, self.R :]
        self.rpos = torch.full((self.R,), -1, dtype=torch.long, device=dev)  # position held by each slot
        self.stages = [("draft1", _Stage(self._draft_root))]  # ingest + level 1
        self.stages += [(f"draft{l}", _Stage(lambda l=l: self._draft_level(l))) for l in range(2, D + 1)]
        self.stages += [("verify", _Stage(self._verify)), ("commit", _Stage(self._commit))]

    def capture(self):
        """Warm up every stage in order (autotuning, allocator) on a side stream, then record each
        one in its own CUDA graph. The state this leaves is garbage; `generate` resets it."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                for _, st in self.stages:
                    st.fn()
        torch.cuda.current_stream().wait_stream(s)
        for _, st in self.stages:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                st.fn()
            st.graph = g
        torch.cuda.synchronize()

    # --------------------------------------------------------------- AR
    def _ar_step(self):
        t, dec = self.dec.target, self.dec
        logits = t(
            self.root[None], positions=self.P, cache=dec.tcache, start=self.P, backend=dec.backend, last_only=True
        )
        tok = logits[0, -1].argmax()
        self.out.index_copy_(0, self.out_len, tok[None])
        self.root.copy_(tok[None])
        self.P.add_(1)
        self.out_len.add_(1)

    # --------------------------------------------------------------- draft
    def _cross(self, q):
        """Cross-attention over the target's committed slots [0, P) of its last layer."""
        tc = self.dec.tcache
        S, n = tc.k.shape[3], q.shape[2]
        tk, tv = tc.k[-1].to(q.dtype), tc.v[-1].to(q.dtype)
        if self.dec.backend == "triton" and q.device.type == "cuda" and q.shape[-1] in (64, 128):
            from longspec_lab.kernels.tree_attention import tree_attention

            # the prefix-only case of the tree kernel: an all-False block mask hides slots [P, P+n)
            return tree_attention(q, tk, tv, self.P, self._no_block(n, q.device), max_prefix=S - n)
        vis = (torch.arange(S, device=q.device) < self.P)[None]  # [1, S] committed target slots
        return _sdpa(q, tk, tv, vis)

    def _no_block(self, n, device):
        key = ("no_block", n)
        if key not in self.__dict__:
            self.__dict__[key] = torch.zeros(n, n, dtype=torch.bool, device=device)
        return self.__dict__[key]

    def _ring_vis(self, qpos, committed_only=False):
        """[n, R] ring slots a query at position qpos [n] sees: valid, not after it, inside the window;
        tree nodes (committed_only) see only ingested tokens, never padding written past `seen`."""
        rp = self.rpos[None]
        vis = (rp >= 0) & (rp <= qpos[:, None]) & (rp > qpos[:, None] - self.W)
        return vis & (rp < self.seen) if committed_only else vis

    def _draft_root(self):
        """Ingest the tokens emitted last step (padded to D + 1), then level 1 of the tree."""
        d, D = self.dec.draft, self.D
        pos = self.seen + torch.arange(D + 1, device=self.seen.device)  # [D+1]
        slots = pos % self.R

        def self_fn(q, k, v):
            self.rk.index_copy_(2, slots, k.to(self.rk.dtype))
            self.rv.index_copy_(2, slots, v.to(self.rv.dtype))
            self.rpos.index_copy_(0, slots, pos)
            return _sdpa(q, self.rk.to(q.dtype), self.rv.to(q.dtype), self._ring_vis(pos))

        logits = d._layer(self.pend[None], pos[None], self_fn, self._cross)  # [1, D+1, V]
        last = logits[0].index_select(0, self.pend_n - 1)  # [1, V] at the root (last pending token)
        self.seen.add_(self.pend_n)
        self.tokens[:1].copy_(self.root)
        self.parents[:1].fill_(-1)  # fill_ on a slice: no host-to-device copy inside a graph
        self.scores[:1].fill_(0.0)
        self.anc.zero_()
        self.anc[0, :1].fill_(True)
        self._grow(1, torch.zeros(1, dtype=torch.long, device=last.device), torch.log_softmax(last.float(), -1))

    def _draft_level(self, l):
        """Run the draft over level l-1 and pick level l."""
        d = self.dec.draft
        lo, hi = self.levels[l - 1]
        ids = torch.arange(lo, hi, device=self.tokens.device)
        qpos = self.P + self.depths[lo:hi]  # = seen - 1 + depth

        def self_fn(q, k, v):
            self.sk[:, :, lo - 1 : hi - 1] = k.to(self.sk.dtype)
            self.sv[:, :, lo - 1 : hi - 1] = v.to(self.sv.dtype)
            vis = torch.cat([self._ring_vis(qpos, committed_only=True), self.anc[lo:hi, 1:]], 1)  # [n, R + N - 1]
            return _sdpa(q, self.kbuf.to(q.dtype), self.vbuf.to(q.dtype), vis)

        logits = d._layer(self.tokens[lo:hi][None], qpos[None], self_fn, self._cross)[0]  # [n, V]
        self._grow(l, ids, torch.log_softmax(logits.float(), -1))

    def _grow(self, l, parent_ids, logprobs):
        """Level l = global top-w (parent, token) pairs by cumulative log-prob (beam tree)."""
        lo, hi = self.levels[l]
        V = logprobs.shape[-1]
        flat = (self.scores[parent_ids][:, None] + logprobs).flatten()  # [n * V]
        sc, idx = torch.topk(flat, hi - lo)
        par = parent_ids[idx // V]
        self.tokens[lo:hi] = idx % V
        self.parents[lo:hi] = par
        self.scores[lo:hi] = sc
        rows = self.anc[par].clone()  # ancestors of the parent ...
        rows[:, lo:hi] |= torch.eye(hi - lo, dtype=torch.bool, device=rows.device)  # ... plus itself
        self.anc[lo:hi] = rows

    # --------------------------------------------------------------- verify + accept
    def _verify(self):
        t, dec = self.dec.target, self.dec
        logits = t(
            self.tokens[None],
            positions=(self.P + self.depths)[None],
            cache=dec.tcache,
            start=self.P,
            mask=self.anc,
            backend=dec.backend,
        )
        preds = logits[0].argmax(-1)  # [N] the target's next token after each node's path
        self.preds.copy_(preds)
        ok = preds[self.parents.clamp_min(0)] == self.tokens
        ok[:1].fill_(True)
        for lo, hi in self.levels[1:]:  # accepted = verified and parent accepted
            ok[lo:hi] &= ok[self.parents[lo:hi]]
        N = self.N
        key = torch.where(ok, self.depths * N + (N - 1 - torch.arange(N, device=ok.device)), -1)
        win = key.argmax()[None]  # [1]; indexing with a 0-d tensor would read it on the host
        row = self.anc.index_select(0, win)[0]  # the winner's ancestors (and itself)
        for dpt, (lo, hi) in enumerate(self.levels):
            hit = row[lo:hi]
            self.path[dpt : dpt + 1].copy_(torch.where(hit.any(), lo + hit.int().argmax(), win[0])[None])
        self.n_acc.copy_(self.depths.index_select(0, win) + 1)

    # --------------------------------------------------------------- commit
    def _commit(self):
        dec, D = self.dec, self.D
        c = dec.tcache
        ar = torch.arange(D + 1, device=self.P.device)
        src = self.P + self.path  # accepted nodes sit at slots P + node id
        for t in (c.k, c.v):  # one gather + one scatter per tensor, every layer at once
            t.index_copy_(3, self.P + ar, t.index_select(3, src))
        emitted = self.preds[self.path]  # [D+1], the first n_acc are real
        self.out.index_copy_(0, self.out_len + ar, emitted)
        self.pend.copy_(emitted)
        self.pend_n.copy_(self.n_acc)
        self.root.copy_(emitted.index_select(0, self.n_acc - 1))
        self.P.add_(self.n_acc)
        self.out_len.add_(self.n_acc)


class FastDecoder(SpecDecoder):
    """Greedy ar / chain / tree decoding with static shapes; CUDA graphs on the GPU."""

    def __init__(
        self,
        target,
        draft=None,
        backend: str | None = None,
        tokenizer=None,
        capacity: int | None = None,
        graphs: bool | None = None,
        stage_timing: bool = False,
    ):
        super().__init__(target, draft, backend, tokenizer)
        self.device = target.device
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use graphs=False on the CPU")
        cfg = target.config
        self.capacity = capacity or cfg.max_position_embeddings + 2 * DEFAULT_TREE_SHAPE.num_nodes
        self.tcache = target.new_cache(self.capacity)
        self.stage_timing = stage_timing and self.device.type == "cuda"
        self._plans: dict = {}

    def _plan_for(self, method, shape):
        key = (method, shape.widths if shape is not None else None)
        if key not in self._plans:
            plan = _Plan(self, shape if method != "ar" else None)
            if self.graphs:
                plan.capture()
            self._plans[key] = plan
        return self._plans[key]

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids,
        method: str = "tree",
        max_new_tokens: int = 64,
        tree_shape=DEFAULT_TREE_SHAPE,
        gamma: int = 4,
        trace: bool = False,
        stop_at_eos: bool = True,
        **kw,
    ) -> GenerationResult:
        if trace or kw.get("verify", "greedy") != "greedy" or kw.get("temperature", 0.0):
            return super().generate(prompt_ids, method, max_new_tokens, tree_shape, gamma, trace, stop_at_eos, **kw)
        prompt = _as_prompt(prompt_ids, self.device)
        shape = TreeShape.of(tree_shape) if method == "tree" else TreeShape.chain(gamma) if method == "chain" else None
        need = self._plan(prompt, method, max_new_tokens, shape)
        extra = (shape.depth + 1) if shape is not None else 0
        if need + extra > self.capacity:
            raise ValueError(
                f"this call needs {need + extra} cache slots but the fast decoder holds "
                f"{self.capacity}; build FastDecoder(capacity=...) larger"
            )
        plan = self._plan_for(method, shape)
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        # prefill (eager): the target's cache and the first token, then the draft's ring
        Pn = prompt.numel()
        logits = self.target(prompt[None], cache=self.tcache, start=0, backend=self.backend, last_only=True)
        first = logits[0, -1].argmax()
        plan.P.fill_(Pn)
        plan.root.copy_(first[None])
        plan.out_len.zero_()
        plan.out[:1].copy_(first[None])
        plan.out_len.fill_(1)
        if shape is not None:
            self._prefill_draft(plan, prompt)
        sync()
        t_prefill = time.perf_counter() - t0
        stage_events = {}
        produced, steps, D1 = 1, 0, (shape.depth + 1 if shape is not None else 1)
        eos = set(self.target.config.eos_ids) if stop_at_eos else set()
        done = produced >= max_new_tokens or int(first) in eos
        while not done:
            burst = max(1, (max_new_tokens - produced) // D1)  # cannot overshoot by more than a step
            for _ in range(burst):
                for name, stage in plan.stages:
                    if self.stage_timing:
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                        stage()
                        b.record()
                        stage_events.setdefault(name, []).append((a, b))
                    else:
                        stage()
            steps += burst
            produced = int(plan.out_len)  # the one host sync per burst
            if eos:
                toks = plan.out[:produced].tolist()
                done = any(x in eos for x in toks)
            done = done or produced >= max_new_tokens
        sync()
        wall = time.perf_counter() - t0
        toks = plan.out[:produced].tolist()
        if stop_at_eos:
            toks, stopped = self._cut(toks, max_new_tokens)  # the eager loop's cut: length, then EOS
        else:
            toks, stopped = toks[:max_new_tokens], False
        stages = {"prefill": t_prefill}
        for name, evs in stage_events.items():  # per-level draft times also summed into "draft"
            secs = sum(a.elapsed_time(b) for a, b in evs) / 1e3
            stages[name] = secs
            if name.startswith("draft"):
                stages["draft"] = stages.get("draft", 0.0) + secs
        res = GenerationResult(
            method,
            toks,
            1 + steps,
            [],
            stages,
            wall,
            draft_calls=steps * (shape.depth if shape is not None else 0),
            tree_shape=list(shape.widths) if method == "tree" else None,
            gamma=gamma if method == "chain" else None,
            stopped_at_eos=stopped,
        )
        return res

    def _prefill_draft(self, plan: _Plan, prompt):
        """Eager draft prefill over the prompt, then its last W entries into the static ring."""
        d = self.draft
        dc = d.new_cache(batch=1, max_tree_nodes=1)
        self.tcache.length = prompt.numel()
        d.ingest(prompt[None], dc, self.tcache, backend=self.backend, logits=False)
        k, v = dc.ring()  # [1, Hkv, R0, D] in position order, newest last
        R0 = k.shape[2]
        pos = torch.arange(prompt.numel() - R0, prompt.numel(), device=self.device)
        plan.rpos.fill_(-1)
        slots = pos % plan.R
        plan.rk.index_copy_(2, slots, k.to(plan.rk.dtype))
        plan.rv.index_copy_(2, slots, v.to(plan.rv.dtype))
        plan.rpos.index_copy_(0, slots, pos)
        plan.seen.fill_(prompt.numel())
        plan.pend.zero_()
        plan.pend[:1].copy_(plan.root)
        plan.pend_n.fill_(1)


def check_against_eager(prompts, target, draft, max_new_tokens=64) -> dict:
    """Run the fast path and the eager loop on the same prompts; report whether tokens agree."""
    cases = [("ar", {}), ("chain", {"gamma": 4}), ("tree", {}), ("tree", {"tree_shape": [1, 3, 9]})]
    eager, fast = SpecDecoder(target, draft), FastDecoder(target, draft)
    rows = []
    for ids in prompts:
        for method, kw in cases:
            a = eager.generate(ids, method=method, max_new_tokens=max_new_tokens, stop_at_eos=False, **kw)
            b = fast.generate(ids, method=method, max_new_tokens=max_new_tokens, stop_at_eos=False, **kw)
            rows.append(
                {
                    "method": method,
                    **kw,
                    "prompt_tokens": len(ids),
                    "identical": a.new_tokens == b.new_tokens,
                    "target_calls": [a.target_calls, b.target_calls],
                }
            )
    return {
        "rows": rows,
        "all_identical": all(r["identical"] for r in rows),
        "graphs": fast.graphs,
        "dtype": str(target.dtype).replace("torch.", ""),
        "backend": fast.backend,
    }


if __name__ == "__main__":  # python -m longspec_lab.decoding.graphs --out FILE: fast path vs eager loop on this device
    import argparse
    import json

    from longspec_lab.models.pair import load_pair
    from longspec_lab.paths import load_prompts
    from longspec_lab.provenance import environment

    ap = argparse.ArgumentParser(description="check that the fast path gives the eager loop's tokens")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    tgt, drf, tk = load_pair(device=a.device, dtype=a.dtype)
    rep = check_against_eager([tk.encode(p["text"]) for p in load_prompts(min_tokens=2000)[:2]], tgt, drf)
    rep["environment"] = environment(tgt.device)
    print(json.dumps(rep, indent=1))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rep, fh, indent=2)
