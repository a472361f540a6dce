"""A compact Llama-family causal LM (Llama, Qwen2, Qwen3, Mistral) with a static KV cache (gpt-fast style).

One `forward` serves every stage of speculative decoding:
  * training           : no cache, causal attention over the whole sequence;
  * prefill            : cache, start=0, causal;
  * 1-token decode     : cache, start=L, T=1;
  * tree verification  : cache, start=L, a block of pending tokens + tree nodes under a boolean
                         mask, each with its own RoPE position (prefix_len + depth).
Attention goes through `longspec_lab.ops.attention.attend`, so the backend (torch / sdpa / triton)
is one argument. Module and parameter names match Hugging Face's `LlamaForCausalLM`,
`Qwen2ForCausalLM`, `Qwen3ForCausalLM` and `MistralForCausalLM`, so a checkpoint's state dict loads
by name. `fuse()` turns each layer's q/k/v and gate/up projections into one matmul each (the state
dict keeps the Hugging Face names); the loaders call it for inference.

Taught in: notebooks/03_one_step_slowly.ipynb
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longspec_lab.models.cache import KVCache
from longspec_lab.models.config import GenerationSettings, ModelConfig
from longspec_lab.models.layers import MLP, QKVO, RMSNorm, Rotary, apply_rope, fuse_projections, unfuse_projections
from longspec_lab.ops.attention import attend, block_mask_words
from longspec_lab.ops.linear import lm_head


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = QKVO(
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            bias=cfg.attention_bias,
            o_bias=cfg.o_proj_bias,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
        )
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, layer_idx, cache, start, mask, backend, slots=None, mask_words=None):
        a = self.self_attn
        where = slots if slots is not None else start  # slots: [T] tensor
        # one kernel for norm, q/k/v, RoPE and the cache write where LONGSPEC_QKV_ROPE serves it, else None
        q = None if cache is None else a.qkv_rope_write(x, self.input_layernorm, cos, sin, cache, layer_idx, where)
        if q is None:
            q, k, v = a.split_qkv(x, norm=self.input_layernorm)  # [B, Hq, T, D], [B, Hkv, T, D] x 2 (one matmul)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is not None:
                cache.write(layer_idx, where, k, v)
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:
            o = attend(q, cache.k[layer_idx], cache.v[layer_idx], start, mask, backend, mask_words=mask_words)
        return self.mlp.after_attention(o, a.o_proj, x, self.post_attention_layernorm)  # x + o_proj(o) + mlp(.)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Target(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(cfg)
        # EOS ids and default sampling settings; load_target reads them from generation_config.json
        self.generation = GenerationSettings(eos_token_id=cfg.eos_ids or None)

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def fuse(self) -> "Target":
        """One qkv and one gate_up matmul per layer (in place; state dict names unchanged)."""
        return fuse_projections(self)

    def unfuse(self) -> "Target":
        return unfuse_projections(self)

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int | None = None,
        mask=None,
        backend: str = "torch",
        return_hidden: bool = False,
        last_only: bool = False,
    ):
        """input_ids [B, T]; positions [B, T] or [T] (default start + arange(T));
        mask [T, T] bool over the block (None = causal). Returns logits [B, T, V]
        (or [B, 1, V] with last_only), and the final hidden states if return_hidden."""
        B, T = input_ids.shape
        if cache is not None:
            start = cache.length if start is None else start
            if isinstance(start, torch.Tensor):  # static-shape path: the caller guarantees room
                if positions is None:
                    raise ValueError("a tensor `start` needs explicit positions")
            else:
                cache.check_room(start, T)
        else:
            start = 0
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device)
        if positions.dim() == 1:
            positions = positions[None].expand(B, T)
        if isinstance(start, torch.Tensor):  # a static-shape step: tables and cache slots once for all layers
            cos, sin, slots = self.rotary.tables(positions, self.dtype, start)
        else:
            (cos, sin), slots = self.rotary(positions, self.dtype), None
        # the mask as the Triton kernel reads it, packed once for all layers (None for other backends)
        words = None if cache is None else block_mask_words(mask, backend, input_ids.device)
        x = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, cache, start, mask, backend, slots, words)
        if last_only:
            x = x[:, -1:]
        if not return_hidden:  # the final norm inside the head's projection (one kernel on CUDA)
            return lm_head(x, self.lm_head.weight, self.model.norm.args)
        h = self.model.norm(x)
        return self.lm_head(h), h
