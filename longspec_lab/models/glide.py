"""The one-layer GliDe-style draft model with a constant-size cache (LongSpec, arXiv 2502.17421).

Idea (GliDe, arXiv 2402.02082; LongSpec, docs/LONGSPEC.md section 2): a draft that must run many times
per step over a long context has to be tiny, yet it should know the whole context. So it has ONE
decoder layer and borrows everything else from the target:

    h = embed(tokens)                                   # the target's embed_tokens (shared)
    h = h + SelfAttn(input_layernorm(h))                # own cache, sliding window of W positions
    h = h + CrossAttn(post_self_attention_layernorm(h)) # keys/values = the TARGET's last-layer KV cache
    h = h + MLP(post_cross_attention_layernorm(h))      # SwiGLU
    logits = target.lm_head(h)                          # no final norm, as the reference

The cross-attention has only `q_proj` and `o_proj`: its keys and values are the target's last-layer
cache entries, which are already projected and RoPE-rotated at their own positions, so the draft
just rotates its queries at theirs. (The reference checkpoints also carry `cross_attn.k_proj/v_proj`;
they are never used, and `load_draft` skips them with a warning.)

Constant memory: the self-attention only looks back W positions (position p sees positions > p - W),
so its cache is a ring of W + (pending block) slots plus a small scratch area for the current step's
tree nodes (`DraftRing`). Its size does not depend on the context length; only the target's cache
grows. All shapes are static and the ring's bookkeeping lives on the device, so the same methods run
eagerly, compiled and inside CUDA graphs. Four entry points share one layer body (`layer`):
  * `prefill`       the prompt: only the ring's keys and values (no logits)
  * `ingest`        the tokens accepted last step (a padded block); writes the ring
  * `tree_level`    one tree level against ring + scratch under the tree mask; ring untouched
  * `forward_train` a whole sequence with the target's K/V given, for training

Taught in: notebooks/05_the_glide_draft.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from longspec_lab.models.config import ModelConfig
from longspec_lab.models.layers import MLP, QKVO, RMSNorm, apply_rope
from longspec_lab.ops.attention import masked_sdpa, prefix_attention
from longspec_lab.ops.linear import linear_rope, linear_rope_path, lm_head, norm_linear


@dataclass
class DraftConfig:
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    vocab_size: int = 4096
    window: int = 512
    rms_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in (
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "window",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"draft config field {name}={v!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"draft num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads}; pick head counts that form whole GQA groups"
            )

    @classmethod
    def from_target(cls, cfg: ModelConfig, window: int = 512) -> "DraftConfig":
        return cls(
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            window=window,
            rms_norm_eps=cfg.rms_norm_eps,
        )


def check_fits(dcfg: DraftConfig, tcfg: ModelConfig) -> None:
    """The draft shares the target's embedding, RoPE, LM head and last-layer KV: these must agree."""
    fix = "train a draft for this target (longspec-lab train-draft --model DIR)"
    for name, d, t in (
        ("hidden size", dcfg.hidden_size, tcfg.hidden_size),
        ("vocabulary size", dcfg.vocab_size, tcfg.vocab_size),
        ("head_dim", dcfg.head_dim, tcfg.head_dim),
    ):
        if d != t:
            raise ValueError(f"draft {name} {d} does not fit the target's {t}; {fix}")
    if dcfg.num_heads % tcfg.num_kv_heads:
        raise ValueError(
            f"draft num_heads={dcfg.num_heads} cannot cross-attend over the target's "
            f"{tcfg.num_kv_heads} KV heads (not a multiple); {fix}"
        )


class DraftRing:
    """The draft's constant-size self-attention cache, with static shapes.

    k, v [1, Hkv, R + N - 1, D]: ring slots [0, R) hold the last positions (slot = position % R,
    R = W + max_pending, so writing a padded block of pending tokens never clobbers an entry still
    inside a query's window), then N - 1 scratch slots for the current step's tree nodes 1..N-1.
    They are views of `cache_k`, `cache_v` [1, 1, Hkv, R + N - 1, D], a one-layer cache in the target's
    layout [L, B, Hkv, S, D], which the fused q/k/v + RoPE + cache-write kernel writes by slot as it writes
    the target's cache; `scratch_slots` [N - 1] are the scratch slots' indices on the device.
    `pos` [R] remembers the position each ring slot holds (-1: empty) and `seen` [1] counts the
    committed tokens ingested so far, both on the device."""

    def __init__(self, num_kv_heads, window, head_dim, max_pending, max_tree_nodes, dtype, device):
        self.window, self.R = window, window + max_pending
        scratch = max(max_tree_nodes, 1) - 1
        shape = (1, 1, num_kv_heads, self.R + scratch, head_dim)
        self.cache_k = torch.zeros(shape, dtype=dtype, device=device)  # [1, 1, Hkv, R + N - 1, D]
        self.cache_v = torch.zeros_like(self.cache_k)
        self.scratch_slots = self.R + torch.arange(scratch, device=device)  # [N - 1]
        self.pos = torch.full((self.R,), -1, dtype=torch.long, device=device)  # [R]
        self.seen = torch.zeros(1, dtype=torch.long, device=device)  # [1]

    @property
    def k(self) -> torch.Tensor:  # [1, Hkv, R + N - 1, D]
        return self.cache_k[0]

    @property
    def v(self) -> torch.Tensor:
        return self.cache_v[0]

    @property
    def nbytes(self) -> int:
        return 2 * self.cache_k.numel() * self.cache_k.element_size()

    def reset(self) -> None:
        self.pos.fill_(-1)
        self.seen.zero_()

    def slots(self, pos: torch.Tensor) -> torch.Tensor:
        """The ring slots [T] of positions pos [T]."""
        return pos % self.R

    def write(self, pos: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        """The ring-buffer update: k, v [1, Hkv, T, D] of positions pos [T] into slots pos % R (k = v = None:
        the fused kernel has written them there already; only the slots' positions are recorded)."""
        slots = self.slots(pos)
        if k is not None:
            self.cache_k.index_copy_(3, slots, k[None].to(self.cache_k.dtype))  # on the base tensor, not a view
            self.cache_v.index_copy_(3, slots, v[None].to(self.cache_v.dtype))
        self.pos.index_copy_(0, slots, pos)

    def visible(self, qpos: torch.Tensor, committed_only: bool = False) -> torch.Tensor:
        """bool [n, R]: the ring slots a query at position qpos [n] sees: filled, not after it, and
        inside its window of W positions; tree nodes (committed_only) see only ingested tokens, never
        the padding of a pending block written past `seen`."""
        rp = self.pos[None]  # [1, R]
        vis = (rp >= 0) & (rp <= qpos[:, None]) & (rp > qpos[:, None] - self.window)
        return vis & (rp < self.seen) if committed_only else vis


class CrossAttn(nn.Module):
    """Queries only: keys/values are the target's last-layer cache (already projected + rotated)."""

    def __init__(self, hidden, num_heads, head_dim):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)

    def split_q(self, x, norm=None):  # [B, T, hidden] -> [B, Hq, T, D] of norm(x): one `norm_linear` call
        B, T, _ = x.shape
        y = norm_linear(x, self.q_proj.weight, self.q_proj.bias, None if norm is None else norm.args)
        return y.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def rotated_q(self, x, norm, cos, sin):
        """`apply_rope(split_q(x, norm), cos, sin)`; one kernel where LONGSPEC_QKV_ROPE serves (ops.linear_rope)."""
        lin, args = self.q_proj, None if norm is None else norm.args
        if linear_rope_path(x, lin.weight, lin.bias, args, cos, self.num_heads):
            return linear_rope(x, lin.weight, args, cos, sin, self.num_heads, lin.bias)
        return apply_rope(self.split_q(x, norm), cos, sin)


def _expand_positions(positions, B, T, device):
    positions = torch.as_tensor(positions, device=device)
    return positions[None].expand(B, T) if positions.dim() == 1 else positions


class Glide(nn.Module):
    def __init__(self, dcfg: DraftConfig, target):
        super().__init__()
        check_fits(dcfg, target.config)
        self.config = dcfg
        object.__setattr__(self, "target", target)  # shared, NOT a submodule: state_dict = draft only
        d = dcfg
        self.self_attn = QKVO(d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim, bias=True)
        self.cross_attn = CrossAttn(d.hidden_size, d.num_heads, d.head_dim)
        self.mlp = MLP(d.hidden_size, d.intermediate_size)
        self.input_layernorm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.post_self_attention_layernorm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.post_cross_attention_layernorm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)

    @property
    def dtype(self):
        return self.input_layernorm.weight.dtype

    @property
    def device(self):
        return self.input_layernorm.weight.device

    def new_ring(self, max_pending: int = 1, max_tree_nodes: int = 1) -> DraftRing:
        """A ring for blocks of up to `max_pending` pending tokens and trees of `max_tree_nodes` nodes."""
        d = self.config
        return DraftRing(d.num_kv_heads, d.window, d.head_dim, max_pending, max_tree_nodes, self.dtype, self.device)

    # ------------------------------------------------------------------ the one layer
    def layer(
        self, tokens, positions, self_attn, cross_attn, ring: DraftRing | None = None, slots=None, rope=None,
        hidden: bool = False,
    ):  # fmt: skip
        """tokens, positions [B, T]; self_attn(q, k, v) and cross_attn(q) -> o [B, Hq, T, D]. Returns logits
        [B, T, V], or with `hidden` the last hidden rows [B, T, hidden] before the LM head (`head` makes the logits
        of them; a greedy beam level scores them with the head in one launch, `spec/draft.py:
        beam_level_from_hidden`). The three entry points below differ only in what the two attention callbacks see.
        With a ring and its slots [T] for these rows, where LONGSPEC_QKV_ROPE serves, the norm, q/k/v, RoPE and
        the ring write are one kernel (`QKVO.qkv_rope_into`) and self_attn gets k = v = None: they are in the
        ring already. rope: the tables `self.target.rotary(positions, self.dtype)` made beforehand, or one row
        [1, 1, 1, D] of them when every row sits at one position."""
        cos, sin = self.target.rotary(positions, self.dtype) if rope is None else rope  # [B, 1, T or 1, D]
        h = self.target.model.embed_tokens(tokens).to(self.dtype)  # [B, T, hidden]
        a = self.self_attn
        if ring is not None and a.serves_qkv_rope(h, ring.cache_k.dtype):
            q = a.qkv_rope_into(h, self.input_layernorm, cos, sin, ring.cache_k, ring.cache_v, 0, slots)
            o = self_attn(q, None, None)
        else:
            q, k, v = a.split_qkv(h, norm=self.input_layernorm)  # [B, Hq, T, D], [B, Hkv, T, D] x 2
            o = self_attn(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        h = a.merge(o, residual=h)  # h + o_proj(o)
        q = self.cross_attn.rotated_q(h, self.post_self_attention_layernorm, cos, sin)  # [B, Hq, T, D]
        h = self.mlp.after_attention(cross_attn(q), self.cross_attn.o_proj, h, self.post_cross_attention_layernorm)
        return h if hidden else self.head(h)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head the draft shares with its target, [V, hidden]."""
        return self.target.lm_head.weight

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of the last hidden rows h [..., hidden]: the target's LM head, no final norm."""
        head = self.head_weight  # [V, hidden]
        return lm_head(h.to(head.dtype), head)

    def _ring_kv(self, tokens, positions):
        """Self-attention keys and values [1, Hkv, T, D]: in one layer they depend on token and position only."""
        cos, sin = self.target.rotary(positions, self.dtype)
        x = self.input_layernorm(self.target.model.embed_tokens(tokens).to(self.dtype))
        k, v = self.self_attn.split_kv(x)
        return apply_rope(k, cos, sin), v

    # ------------------------------------------------------------------ decoding (static shapes)
    def prefill(self, tokens: torch.Tensor, ring: DraftRing) -> None:
        """Ingest a prompt [T] without computing logits (nobody reads them): only the last W positions
        can ever be seen again, so only their keys and values are computed and written."""
        tokens = tokens.reshape(1, -1)
        T, W = tokens.shape[1], self.config.window
        keep = min(T, W)
        pos = ring.seen + torch.arange(T - keep, T, device=tokens.device)  # [keep]
        k, v = self._ring_kv(tokens[:, T - keep :], pos[None])
        ring.write(pos, k, v)
        ring.seen.add_(T)

    def ingest(self, tokens, n_valid, ring: DraftRing, target_k, target_v, P, backend: str = "torch", hidden=False):
        """Committed tokens [T] (the first n_valid [1] real, the rest padding) at positions seen + 0..T-1
        -> logits [T, V] (with `hidden`, the rows before the head, [T, hidden]). Writes the ring (padding lands
        past `seen`, invisible to real queries) and
        cross-attends to the target's last-layer cache target_k/v [1, Hkv, S, D] over slots [0, P)."""
        T = tokens.shape[-1]
        pos = ring.seen + torch.arange(T, device=tokens.device)  # [T]
        R = ring.R

        def self_attn(q, k, v):
            ring.write(pos, k, v)
            return masked_sdpa(q, ring.k[:, :, :R], ring.v[:, :, :R], ring.visible(pos))

        def cross_attn(q):
            return prefix_attention(q, target_k, target_v, P, backend)

        out = self.layer(tokens.reshape(1, T), pos[None], self_attn, cross_attn, ring, ring.slots(pos), None, hidden)
        ring.seen.add_(n_valid)
        return out[0]

    def tree_level(
        self, tokens, qpos, first_slot: int, anc_rows, ring: DraftRing, target_k, target_v, P, backend: str = "torch",
        window_rows=None, rope=None, hidden: bool = False,
    ):  # fmt: skip
        """One tree level: tokens [n] at positions qpos [n] (= seen - 1 + depth), whose keys go to the
        scratch slots first_slot .. first_slot + n - 1 (node i uses scratch slot i - 1). Each node sees
        the committed ring entries in its window and, through anc_rows [n, N - 1], the scratch entries
        of its ancestors and itself -> logits [n, V] (with `hidden`, the rows before the head, [n, hidden]). The
        ring and `seen` are not changed.
        window_rows [n or 1, R]: `ring.visible(qpos, committed_only=True)` made beforehand (a decoding step makes
        them for all levels at once, `DraftRing.visible`); one row serves a level whose nodes share a position.
        rope: (cos, sin) of qpos made beforehand, one row [1, 1, 1, D] each for such a level (see `layer`)."""
        n, R = tokens.shape[-1], ring.R
        lo = R + first_slot
        if window_rows is None:
            window_rows = ring.visible(qpos, committed_only=True)  # [n, R]

        def self_attn(q, k, v):
            if k is not None:  # else the fused kernel has written them to the scratch slots
                ring.cache_k[:, :, :, lo : lo + n] = k[None].to(ring.cache_k.dtype)
                ring.cache_v[:, :, :, lo : lo + n] = v[None].to(ring.cache_v.dtype)
            return masked_sdpa(q, ring.k, ring.v, window_rows, anc_rows)  # keys: R ring slots, N - 1 scratch

        def cross_attn(q):
            return prefix_attention(q, target_k, target_v, P, backend)

        slots = ring.scratch_slots[first_slot : first_slot + n]  # a slice of a device buffer: no kernel
        return self.layer(tokens.reshape(1, n), qpos[None], self_attn, cross_attn, ring, slots, rope, hidden)[0]

    # ------------------------------------------------------------------ training
    def forward_train(self, input_ids, positions, target_k, target_v, staleness: int = 0):
        """input_ids/positions [B, T]; target_k/v [B, Hkv, T, D] (the target's last layer on the
        same sequence). Self-attention: causal, position p sees positions > p - W. Cross-attention:
        query i sees target entries j <= i - 1 - staleness (the root of a step sees the target's
        cache up to the previous token; a depth-d node is d further behind). Rows with no visible
        target entry get zero cross-attention output."""
        B, T = input_ids.shape
        positions = _expand_positions(positions, B, T, input_ids.device)
        idx = torch.arange(T, device=input_ids.device)
        causal = idx[:, None] >= idx[None, :]  # [T, T]
        gap = positions[:, :, None] - positions[:, None, :]  # [B, T, T]
        self_mask = (causal & (gap < self.config.window))[:, None]  # [B, 1, T, T]
        cross_mask = idx[None, :] <= idx[:, None] - 1 - int(staleness)  # [T, T]
        has = cross_mask.any(-1)  # [T]
        cross_mask = cross_mask | ~has[:, None]  # keep softmax finite; those rows are zeroed below
        G = self.config.num_heads // target_k.shape[1]

        def self_fn(q, k, v):
            g = q.shape[1] // k.shape[1]
            k, v = k.to(q.dtype).repeat_interleave(g, 1), v.to(q.dtype).repeat_interleave(g, 1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self_mask)

        def cross_fn(q):
            k = target_k.to(q.dtype).repeat_interleave(G, 1)
            v = target_v.to(q.dtype).repeat_interleave(G, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=cross_mask)
            return o * has[:, None].to(o.dtype)

        return self.layer(input_ids, positions, self_fn, cross_fn)
