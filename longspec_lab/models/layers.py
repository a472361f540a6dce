"""Building blocks shared by the target and the GliDe draft: RMSNorm, rotary embeddings (with
Llama-3 and linear scaling), the SwiGLU MLP, and the q/k/v/o projections of grouped-query attention.

Parameter names follow Hugging Face's Llama / Qwen2 / Qwen3 / Mistral modules, so checkpoints load by
name. The optional parts of those families live here too: q/k/v biases (Qwen2), an o_proj bias
(Llama `attention_bias`, Qwen3), a per-head RMSNorm of queries and keys before RoPE (Qwen3 `q_norm`,
`k_norm`) and MLP biases (Llama `mlp_bias`).

Fused projections. A decode step of a small model is launch-bound: each matmul costs a kernel launch
whatever its size. q, k and v read the same input, and so do gate and up, so `fuse()` concatenates
their weights into one `qkv_proj` [(Hq + 2 Hkv) D, hidden] and one `gate_up_proj` [2 F, hidden]:
one matmul each instead of three and two. The fused weight is the only copy (no extra memory), and
the state dict still reads and writes the Hugging Face names (`q_proj.weight`, ...): hooks split
the fused tensor on save and concatenate the parts on load. The loaders fuse by default;
`unfuse()` gives the separate modules back.

Taught in: notebooks/03_one_step_slowly.ipynb
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from longspec_lab.models.config import ModelConfig
from longspec_lab.ops.linear import norm_linear, qkv_rope_cache, qkv_rope_path, residual_norm_linear, rms_norm
from longspec_lab.ops.rope import rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 (float64 stays float64), as the reference implementations do, then cast
        # back; one fused kernel (torch.rms_norm) instead of five small ones: decoding is launch-bound
        return rms_norm(x, self.weight, self.eps)

    @property
    def args(self) -> tuple[torch.Tensor, float]:
        """(weight, eps): what ops.linear.norm_linear takes to apply this norm inside a projection."""
        return self.weight, self.eps


def rope_inv_freq(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse frequencies [D/2] after the configured scaling (default, linear or llama3), computed in
    float64 and rounded once to `dtype`."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", "default")
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
        inv = torch.where(medium, blended, scaled)
    return inv.to(dtype)


class Rotary(nn.Module):
    """cos/sin tables computed on the fly for explicit positions (tree nodes share positions).

    The frequencies stay in float32 (float64 if asked) when the model is cast to bf16/fp16, as in
    transformers: rounded to bf16 they would put the angle at position 4,000 off by radians."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def _apply(self, fn, recurse=True):
        before = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float64 and not before.is_meta:
            self.inv_freq = before.to(self.inv_freq.device, torch.float32)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        # positions [B, T] -> cos, sin [B, 1, T, D] (ops.rope: float32 angles, rounded to dtype)
        return rope_tables(positions, self.inv_freq, dtype)[:2]

    def tables(self, positions: torch.Tensor, dtype: torch.dtype, start: torch.Tensor):
        """cos, sin [B, 1, T, D] and the cache slots start + arange(T) [T] of a static-shape step (start a device
        tensor [1]): made once for all layers, in one kernel launch where LONGSPEC_ROPE_TABLES serves."""
        return rope_tables(positions, self.inv_freq, dtype, start)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, D]; rotate-half convention (HF Llama): x * cos + cat(-x2, x1) * sin
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([-x2, x1], dim=-1), sin)


# ---------------------------------------------------------------------- fusing linears by name


class _Fusable(nn.Module):
    """A module whose sibling linears (same input) can be fused into one, keeping HF names.

    `_FUSE` maps the fused module's name to the names of its parts, in concatenation order."""

    _FUSE: dict[str, tuple[str, ...]] = {}

    def __init__(self):
        super().__init__()
        self._fused_sizes: dict[str, tuple[int, ...]] = {}  # fused name -> output rows of each part
        self.register_state_dict_post_hook(_split_fused_state)
        self.register_load_state_dict_pre_hook(_join_fused_state)

    @property
    def fused(self) -> bool:
        return bool(self._fused_sizes)

    def fuse(self):
        """Replace each group of parts by one linear over the concatenated weights (in place)."""
        for name, parts in self._FUSE.items():
            if name in self._fused_sizes:
                continue
            lins = [getattr(self, p) for p in parts]
            w = torch.cat([lin.weight.detach() for lin in lins])  # [sum out, in]
            has_bias = lins[0].bias is not None
            with torch.device("meta"):
                one = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
            one.weight = nn.Parameter(w, requires_grad=lins[0].weight.requires_grad)
            if has_bias:
                one.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in lins]))
            self._fused_sizes[name] = tuple(lin.out_features for lin in lins)
            for p in parts:
                delattr(self, p)
            setattr(self, name, one)
        return self

    def unfuse(self):
        """The separate Hugging Face modules again (copies of the fused rows)."""
        for name, sizes in list(self._fused_sizes.items()):
            one = getattr(self, name)
            ws = one.weight.detach().split(sizes)
            bs = one.bias.detach().split(sizes) if one.bias is not None else [None] * len(sizes)
            for p, w, b in zip(self._FUSE[name], ws, bs):
                with torch.device("meta"):
                    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
                lin.weight = nn.Parameter(w.clone(), requires_grad=one.weight.requires_grad)
                if b is not None:
                    lin.bias = nn.Parameter(b.clone())
                setattr(self, p, lin)
            delattr(self, name)
            del self._fused_sizes[name]
        return self

    def _rows(self, name: str, i: int, j: int | None = None):
        """(weight, bias) of parts i..j (exclusive; j None = i + 1) of the fused `name`, as views."""
        sizes = self._fused_sizes[name]
        j = i + 1 if j is None else j
        lo, hi = sum(sizes[:i]), sum(sizes[:j])
        one = getattr(self, name)
        return one.weight[lo:hi], None if one.bias is None else one.bias[lo:hi]


def _split_fused_state(module, state_dict, prefix, local_metadata):
    for name, sizes in module._fused_sizes.items():
        for suffix in ("weight", "bias"):
            t = state_dict.pop(f"{prefix}{name}.{suffix}", None)
            if t is not None:
                for p, part in zip(module._FUSE[name], t.split(sizes)):
                    state_dict[f"{prefix}{p}.{suffix}"] = part


def _join_fused_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    for name in module._fused_sizes:
        for suffix in ("weight", "bias"):
            keys = [f"{prefix}{p}.{suffix}" for p in module._FUSE[name]]
            if all(k in state_dict for k in keys):  # otherwise the strict check names what is missing
                state_dict[f"{prefix}{name}.{suffix}"] = torch.cat([state_dict.pop(k) for k in keys])


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse every QKVO and MLP inside `model` (see the module docstring); returns `model`."""
    for mod in list(model.modules()):
        if isinstance(mod, _Fusable) and mod.can_fuse:
            mod.fuse()
    return model


def unfuse_projections(model: nn.Module) -> nn.Module:
    for mod in list(model.modules()):
        if isinstance(mod, _Fusable):
            mod.unfuse()
    return model


# ---------------------------------------------------------------------- MLP and attention projections


def heads_to_rows(o: torch.Tensor) -> torch.Tensor:
    """Attention output [B, H, T, D] -> [B, T, H * D], the rows an o_proj reads."""
    B, H, T, D = o.shape
    return o.transpose(1, 2).reshape(B, T, H * D)


class MLP(_Fusable):
    """SwiGLU: down(silu(gate(x)) * up(x)); fused, gate and up are one matmul."""

    _FUSE = {"gate_up_proj": ("gate_proj", "up_proj")}
    can_fuse = True

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x, norm: RMSNorm | None = None, residual: torch.Tensor | None = None):
        """down(silu(gate(h)) * up(h)) with h = norm(x) (if a norm is given), plus `residual` (if given).
        Fused, the norm, gate_up and the SiLU product are one `norm_linear` call, and so are down and the
        residual: one kernel each when ops.linear's switch is on."""
        if self.fused:
            lin = self.gate_up_proj
            h = norm_linear(x, lin.weight, lin.bias, None if norm is None else norm.args, gated=True)  # [B, T, F]
        else:
            xn = x if norm is None else norm(x)
            h = F.silu(self.gate_proj(xn)) * self.up_proj(xn)
        return norm_linear(h, self.down_proj.weight, self.down_proj.bias, residual=residual)

    def after_attention(self, o, o_proj: nn.Linear, residual, norm: RMSNorm):
        """The rest of a pre-norm block after its attention output o [B, H, T, D]: x = residual + o_proj(o), then
        x + mlp(norm(x)). Fused, o_proj + residual and the norm + gate_up are one `residual_norm_linear` call (one
        launch where LONGSPEC_FUSE_RESIDUAL serves), and down + the residual one `norm_linear`."""
        rows = heads_to_rows(o)  # [B, T, H * D]
        if not self.fused:
            x = norm_linear(rows, o_proj.weight, o_proj.bias, residual=residual)  # residual + o_proj(o)
            return self(x, norm=norm, residual=x)
        lin = self.gate_up_proj
        x, h = residual_norm_linear(rows, o_proj.weight, o_proj.bias, residual, lin.weight, lin.bias, norm.args,
                                    gated=True)  # fmt: skip
        return norm_linear(h, self.down_proj.weight, self.down_proj.bias, residual=x)  # x + down(h)


class QKVO(_Fusable):
    """The four projections of grouped-query attention.

    Options: `bias` on q/k/v, `o_bias` on o_proj, `qk_norm_eps` (not None: Qwen3's RMSNorm over
    each head's D channels of q and k, applied before RoPE). `kv_in` lets k/v read an input of
    another width (then q and k/v cannot be fused). Fused, `split_qkv` is one matmul; `split_q`
    and `split_kv` keep working on row slices of the fused weight."""

    _FUSE = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool,
        kv_in: int | None = None,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        kv_in = hidden if kv_in is None else kv_in
        self.can_fuse = kv_in == hidden
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_in, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_in, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=o_bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def fuse(self):
        if not self.can_fuse:
            raise ValueError(
                "error: q_proj and k/v_proj read inputs of different widths (kv_in), so they cannot be "
                "one matmul; leave this module unfused"
            )
        return super().fuse()

    def _heads(self, y, n, norm):  # [B, T, n*D] -> [B, n, T, D], with the per-head norm if any
        B, T, _ = y.shape
        y = y.view(B, T, n, self.head_dim)
        if norm is not None:
            y = norm(y)
        return y.transpose(1, 2)

    def split_q(self, x):  # [B, T, hidden] -> [B, Hq, T, D]
        y = F.linear(x, *self._rows("qkv_proj", 0)) if self.fused else self.q_proj(x)
        return self._heads(y, self.num_heads, self.q_norm)

    def split_kv(self, x):  # -> k, v [B, Hkv, T, D]
        if self.fused:
            k, v = F.linear(x, *self._rows("qkv_proj", 1, 3)).chunk(2, dim=-1)
        else:
            k, v = self.k_proj(x), self.v_proj(x)
        return self._heads(k, self.num_kv_heads, self.k_norm), self._heads(v, self.num_kv_heads, None)

    def split_qkv(self, x, norm: RMSNorm | None = None):
        """-> q [B, Hq, T, D], k, v [B, Hkv, T, D] of norm(x) (x itself without a norm); fused, the norm and
        the three projections are one `norm_linear` call."""
        if not self.fused:
            xn = x if norm is None else norm(x)
            return (self.split_q(xn), *self.split_kv(xn))
        nq, nk, nv = self._fused_sizes["qkv_proj"]
        lin = self.qkv_proj
        y = norm_linear(x, lin.weight, lin.bias, None if norm is None else norm.args)  # [B, T, (Hq + 2 Hkv) D]
        q, k, v = y.split((nq, nk, nv), dim=-1)
        return (
            self._heads(q, self.num_heads, self.q_norm),
            self._heads(k, self.num_kv_heads, self.k_norm),
            self._heads(v, self.num_kv_heads, None),
        )

    def qkv_rope_write(self, x, norm: RMSNorm | None, cos, sin, cache, layer: int, start):
        """The one-kernel form of `split_qkv`, `apply_rope` on q and k, and `cache.write(layer, start, k, v)`
        (LONGSPEC_QKV_ROPE, `ops.linear.qkv_rope_cache`): returns q [B, Hq, T, D] with RoPE, or None where
        the kernel does not serve this module (switch off, unfused, biases, per-head norms, CPU): then the
        caller takes the readable path. start: the first slot (int) or the T slots (tensor)."""
        if not self.serves_qkv_rope(x, cache.k.dtype):
            return None
        T = x.shape[1]
        if isinstance(start, torch.Tensor):
            slots = start.to(torch.int64)
        else:
            cache.check_room(start, T)  # the kernel writes by slot: a slot past the cache must never reach it
            slots = torch.arange(start, start + T, device=x.device)
        return self.qkv_rope_into(x, norm, cos, sin, cache.k, cache.v, layer, slots)

    def serves_qkv_rope(self, x, cache_dtype) -> bool:
        """Whether `qkv_rope_into` runs for input x and a cache of cache_dtype (ops.linear.qkv_rope_path, on the
        fused projection of a module without per-head norms)."""
        if not self.fused or self.q_norm is not None:
            return False
        return qkv_rope_path(x, self.qkv_proj.weight, self.qkv_proj.bias, self.head_dim, cache_dtype)

    def qkv_rope_into(self, x, norm: RMSNorm | None, cos, sin, k_cache, v_cache, layer: int, slots):
        """x [B, T, hidden] -> q [B, Hq, T, D] with RoPE; k (with RoPE) and v written to k_cache / v_cache
        [L, B, Hkv, S, D] at `layer`, slots [T] int64 (in range: the caller's to check). One kernel; call it
        where `serves_qkv_rope` says so."""
        lin = self.qkv_proj
        return qkv_rope_cache(x, lin.weight, None if norm is None else norm.args, cos.to(x.dtype), sin.to(x.dtype),
                              k_cache, v_cache, layer, slots, self.num_heads, self.num_kv_heads, lin.bias)  # fmt: skip

    def merge(self, o, residual: torch.Tensor | None = None):  # [B, Hq, T, D] -> [B, T, hidden] (+ residual)
        return norm_linear(heads_to_rows(o), self.o_proj.weight, self.o_proj.bias, residual=residual)
