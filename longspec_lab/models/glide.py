"""The one-layer GliDe-style draft model with a constant-size cache (LongSpec, arXiv 2502.17421).

Idea (GliDe, arXiv 2402.02082; LongSpec §2 of shared/LONGSPEC.md): a draft that must run many times
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
so its cache is a ring buffer of W slots (slot = position % W) plus a small scratch area for the
current step's tree nodes. Its size does not depend on the context length; only the target's cache
grows. Three entry points share one layer body:
  * `ingest`       committed tokens (prefill, then the tokens accepted last step); writes the ring
  * `tree_forward` one tree level against ring + scratch under the tree mask; ring untouched
  * `forward_train` a whole sequence with the target's K/V given, for training
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from longspec_lab.models.config import ModelConfig
from longspec_lab.models.layers import MLP, QKVO, RMSNorm, apply_rope
from longspec_lab.ops.attention import attend


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
    fix = "train a draft for this target (python -m longspec_lab.train.draft --target DIR)"
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


class DraftCache:
    """Ring buffer k, v [B, Hkv, W, D] (slot = position % W) + tree scratch [B, Hkv, N, D]."""

    def __init__(self, batch, num_kv_heads, window, head_dim, max_tree_nodes, dtype, device):
        self.k = torch.zeros(batch, num_kv_heads, window, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.tree_k = torch.zeros(batch, num_kv_heads, max_tree_nodes, head_dim, dtype=dtype, device=device)
        self.tree_v = torch.zeros_like(self.tree_k)
        self.seen = 0  # committed tokens ingested so far

    window = property(lambda self: self.k.shape[2])
    max_tree_nodes = property(lambda self: self.tree_k.shape[2])
    batch = property(lambda self: self.k.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.tree_k, self.tree_v))

    def reset(self) -> None:
        self.seen = 0

    def clone(self) -> "DraftCache":
        c = object.__new__(DraftCache)
        c.k, c.v, c.tree_k, c.tree_v = (t.clone() for t in (self.k, self.v, self.tree_k, self.tree_v))
        c.seen = self.seen
        return c

    def ring(self):
        """The valid ring entries in position order: k, v [B, Hkv, R, D], R = min(seen, W)."""
        W = self.window
        R = min(self.seen, W)
        idx = torch.arange(self.seen - R, self.seen, device=self.k.device) % W
        return self.k.index_select(2, idx), self.v.index_select(2, idx)

    def write(self, start: int, k, v) -> None:
        """k, v [B, Hkv, T, D] of positions [start, start + T); only the last W matter."""
        W, T = self.window, k.shape[2]
        if T > W:
            k, v, start, T = k[:, :, -W:], v[:, :, -W:], start + T - W, W
        idx = torch.arange(start, start + T, device=self.k.device) % W
        self.k.index_copy_(2, idx, k.to(self.k.dtype))
        self.v.index_copy_(2, idx, v.to(self.v.dtype))


def window_attend(q, ring_k, ring_v, extra_k, extra_v, extra_mask, depth, window, backend):
    """Sliding-window attention over the ring plus `extra` keys (new tokens or tree scratch).

    q [B, Hq, n, D]; ring_k/v [B, Hkv, R, D] in position order, the newest at position seen - 1;
    extra_k/v [B, Hkv, m, D] visible under extra_mask [n, m]; depth [n]: query i sits at position
    seen - 1 + depth[i], so it sees ring entry r (position seen - R + r) iff r >= R + depth[i] - W.
    The ring tail [cut, R) is visible to every query (depth <= m) and becomes attend's all-visible
    prefix; the older head [0, cut) joins the masked block.
    """
    R, m = ring_k.shape[2], extra_k.shape[2]
    cut = max(0, min(R, R + m - window))
    first = (R + depth - window).clamp_min(0)  # [n] first visible ring entry of each query
    head_mask = torch.arange(cut, device=q.device)[None, :] >= first[:, None]  # [n, cut]
    k = torch.cat([ring_k[:, :, cut:], ring_k[:, :, :cut], extra_k], dim=2)
    v = torch.cat([ring_v[:, :, cut:], ring_v[:, :, :cut], extra_v], dim=2)
    mask = torch.cat([head_mask, extra_mask.to(q.device)], dim=1)  # [n, cut + m]
    # backend "triton" needs block_len == n; otherwise `attend` falls back to the torch path.
    return attend(q, k, v, prefix_len=R - cut, block_mask=mask, backend=backend, block_len=cut + m)


class CrossAttn(nn.Module):
    """Queries only: keys/values are the target's last-layer cache (already projected + rotated)."""

    def __init__(self, hidden, num_heads, head_dim):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)

    def split_q(self, x):  # [B, T, hidden] -> [B, Hq, T, D]
        B, T, _ = x.shape
        return self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def merge(self, o):  # [B, Hq, T, D] -> [B, T, hidden]
        B, H, T, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))


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

    def new_cache(self, batch: int = 1, max_tree_nodes: int = 256) -> DraftCache:
        d = self.config
        return DraftCache(batch, d.num_kv_heads, d.window, d.head_dim, max_tree_nodes, self.dtype, self.device)

    # ------------------------------------------------------------------ the one layer
    def _layer(self, tokens, positions, self_fn, cross_fn):
        """tokens [B, T], positions [B, T]; self_fn(q, k, v) and cross_fn(q) -> o [B, Hq, T, D]."""
        cos, sin = self.target.rotary(positions, self.dtype)  # [B, 1, T, D]
        h = self.target.model.embed_tokens(tokens).to(self.dtype)  # [B, T, hidden]
        a = self.self_attn
        x = self.input_layernorm(h)
        q = apply_rope(a.split_q(x), cos, sin)  # [B, Hq, T, D]
        k, v = a.split_kv(x)  # [B, Hkv, T, D]
        h = h + a.merge(self_fn(q, apply_rope(k, cos, sin), v))
        q = apply_rope(self.cross_attn.split_q(self.post_self_attention_layernorm(h)), cos, sin)
        h = h + self.cross_attn.merge(cross_fn(q))
        h = h + self.mlp(self.post_cross_attention_layernorm(h))
        head = self.target.lm_head
        return head(h.to(head.weight.dtype))  # [B, T, V]

    def _cross_cache(self, target_cache, backend):
        """Cross-attention over target slots [0, length) of the last layer, all visible."""
        P = target_cache.length
        tk, tv = target_cache.k[-1], target_cache.v[-1]  # [B, Hkv, S, D]

        def cross(q):
            if P == 0:
                return torch.zeros_like(q)
            # block_len=0: "triton" does not fit this layout and `attend` uses the torch path
            return attend(
                q, tk.to(q.dtype), tv.to(q.dtype), prefix_len=P, block_mask=None, backend=backend, block_len=0
            )

        return cross

    def _check_batch(self, B, dcache, target_cache):
        if dcache.batch != B or target_cache.k.shape[1] != B:
            raise ValueError(
                f"batch {B} does not match the draft cache ({dcache.batch}) / target cache "
                f"({target_cache.k.shape[1]}); allocate both caches with batch={B}"
            )

    # ------------------------------------------------------------------ decoding API
    def ingest(self, tokens, dcache: DraftCache, target_cache, backend: str = "torch", logits: bool = True):
        """Committed tokens [B, T] at positions seen + arange(T) -> logits [B, T, V]; writes the ring.
        With logits=False (a prefill whose outputs nobody reads) only the ring is filled: in one layer
        the self-attention keys and values depend on nothing but the token and its position."""
        B, T = tokens.shape
        self._check_batch(B, dcache, target_cache)
        W = self.config.window
        if not logits:
            keep = min(T, W)  # only the last W positions can ever be seen again
            pos = torch.arange(dcache.seen + T - keep, dcache.seen + T, device=tokens.device)[None].expand(B, keep)
            cos, sin = self.target.rotary(pos, self.dtype)
            x = self.input_layernorm(self.target.model.embed_tokens(tokens[:, T - keep :]).to(self.dtype))
            k, v = self.self_attn.split_kv(x)  # [B, Hkv, keep, D]
            dcache.write(dcache.seen + T - keep, apply_rope(k, cos, sin), v)
            dcache.seen += T
            return None
        if T > W:  # long prefill: chunks of W keep the masks small; the result is the same
            return torch.cat(
                [self.ingest(tokens[:, i : i + W], dcache, target_cache, backend) for i in range(0, T, W)], dim=1
            )
        seen = dcache.seen
        positions = torch.arange(seen, seen + T, device=tokens.device)[None].expand(B, T)
        ring_k, ring_v = dcache.ring()  # a copy, so writing the ring below is safe
        causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()  # T <= W
        depth = torch.arange(1, T + 1, device=tokens.device)

        def self_fn(q, k, v):
            o = window_attend(q, ring_k, ring_v, k, v, causal, depth, W, backend)
            dcache.write(seen, k, v)
            return o

        logits = self._layer(tokens, positions, self_fn, self._cross_cache(target_cache, backend))
        dcache.seen = seen + T
        return logits

    def tree_forward(self, tokens, slots, positions, mask, dcache: DraftCache, target_cache, backend: str = "torch"):
        """One tree level: tokens [B, n] written to scratch `slots` [n]; each node attends to the
        ring (committed tokens, sliding window) plus scratch [0, m) under mask [n, m] (its ancestors
        and itself). A node's depth is its mask row count, so it sits at position seen - 1 + depth
        for the window; `positions` only drive RoPE. Ring and `seen` are not changed."""
        B, n = tokens.shape
        self._check_batch(B, dcache, target_cache)
        slots = torch.as_tensor(slots, device=tokens.device).long()
        mask = torch.as_tensor(mask, device=tokens.device).bool()
        m = mask.shape[1]
        if mask.shape[0] != n or slots.numel() != n:
            raise ValueError(
                f"tree_forward got {n} tokens but mask {tuple(mask.shape)} and {slots.numel()} "
                "slots; pass mask [n, m] and one scratch slot per node"
            )
        N = dcache.max_tree_nodes
        if m > N or (n and int(slots.max()) >= N):
            raise ValueError(
                f"tree needs {max(m, int(slots.max()) + 1)} scratch slots but the draft cache "
                f"holds max_tree_nodes={N}; allocate draft.new_cache(max_tree_nodes=...) larger"
            )
        positions = _expand_positions(positions, B, n, tokens.device)
        ring_k, ring_v = dcache.ring()
        depth = mask.sum(-1)  # [n]

        def self_fn(q, k, v):
            dcache.tree_k[:, :, slots] = k.to(dcache.tree_k.dtype)
            dcache.tree_v[:, :, slots] = v.to(dcache.tree_v.dtype)
            return window_attend(
                q,
                ring_k,
                ring_v,
                dcache.tree_k[:, :, :m],
                dcache.tree_v[:, :, :m],
                mask,
                depth,
                self.config.window,
                backend,
            )

        return self._layer(tokens, positions, self_fn, self._cross_cache(target_cache, backend))

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

        return self._layer(input_ids, positions, self_fn, cross_fn)
