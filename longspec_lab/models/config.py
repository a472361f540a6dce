"""One dataclass that describes a dense Llama-family decoder (Llama, Qwen2, Qwen3, Mistral), with presets.

The same `ModelConfig` describes the embedded code model that ships with the package, a real
Llama-3-8B, and the tiny models the tests build. It converts to and from the `config.json` that
Hugging Face checkpoints carry, in both the transformers 4.x spelling (`rope_theta` + `rope_scaling`)
and the 5.x spelling (`rope_parameters`). The four families differ only in small options:

| family | q/k/v bias | o_proj bias | q/k RMSNorm | MLP bias |
|---|---|---|---|---|
| Llama | `attention_bias` | `attention_bias` | no | `mlp_bias` |
| Qwen2 | always | no | no | no |
| Qwen3 | `attention_bias` | `attention_bias` | always | no |
| Mistral | no | no | no | no |

What the decoder cannot reproduce exactly is refused here, with the reason and the fix: mixtures of
experts, sliding-window attention that is actually in use (a window shorter than the context), RoPE
scaling other than linear and llama3 (yarn, dynamic, longrope), partial rotary embeddings.

`context_length` is the usable context: `max_position_embeddings`, stretched by a linear RoPE factor
(Vicuna-7B-v1.5-16k: 4,096 x 4 = 16,384 positions). `GenerationSettings` reads
`generation_config.json`: its EOS ids and default sampling settings, as transformers applies them.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb (the embedded pair).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_NO_CONFIG_FIX = "use transformers directly for this checkpoint"


def _family(arch: str) -> str:
    return {v: k for k, v in MODEL_TYPES.items()}[arch]


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # biases on q/k/v (Qwen2 always; Llama/Qwen3 with attention_bias)
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    o_proj_bias: bool = False  # Llama and Qwen3 with attention_bias=True
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    mlp_bias: bool = False  # Llama mlp_bias=True

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; longspec_lab runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}. Convert the checkpoint to one of these or "
                "use transformers directly for other families."
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"config field {name}={v!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention needs each KV head shared by a whole number of query heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is odd; rotary embeddings rotate pairs of channels")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            orig = (self.rope_scaling or {}).get("original_max_position_embeddings")
            native = f"its native {orig} positions" if orig else "its native context"
            raise ValueError(
                f"RoPE scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
                f"remove the rope_scaling entry from config.json to run the model at {native}, "
                f"or {_NO_CONFIG_FIX}"
            )
        fam = _family(self.architecture)
        want = {
            "llama": dict(o_proj_bias=self.attention_bias, qk_norm=False),
            "qwen2": dict(attention_bias=True, o_proj_bias=False, qk_norm=False, mlp_bias=False),
            "qwen3": dict(o_proj_bias=self.attention_bias, qk_norm=True, mlp_bias=False),
            "mistral": dict(attention_bias=False, o_proj_bias=False, qk_norm=False, mlp_bias=False),
        }[fam]
        wrong = {k: v for k, v in want.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(
                f"{self.architecture} cannot have {', '.join(f'{k}={getattr(self, k)}' for k in wrong)}; "
                f"that family has {', '.join(f'{k}={v}' for k, v in wrong.items())}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_heads // self.num_kv_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)

    @property
    def context_length(self) -> int:
        """Positions the model can use: max_position_embeddings, or for linear RoPE scaling the
        factor times the positions it was trained on (`original_max_position_embeddings` when the
        config gives it, else max_position_embeddings, transformers' convention)."""
        sc = self.rope_scaling or {}
        if sc.get("rope_type") == "linear":
            orig = sc.get("original_max_position_embeddings") or self.max_position_embeddings
            return max(self.max_position_embeddings, int(sc["factor"] * orig))
        return self.max_position_embeddings

    def num_parameters(self) -> int:
        d, h, kv, hd, f, v = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
            self.vocab_size,
        )
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.attention_bias:
            attn += h * hd + 2 * kv * hd
        attn += d * self.o_proj_bias + 2 * hd * self.qk_norm
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        layer = attn + mlp + 2 * d
        emb = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # -------------------------------------------------------- HF conversion
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        mt = d.get("model_type", "")
        arch = archs[0] if archs else MODEL_TYPES.get(mt, mt or "<missing>")
        n_experts = d.get("num_experts") or d.get("num_local_experts") or d.get("n_routed_experts")
        if n_experts or "moe" in arch.lower() or "mixtral" in arch.lower() or "moe" in str(mt).lower():
            raise ValueError(
                f"{arch} (model_type={mt!r}) is a mixture-of-experts model"
                + (f" with {n_experts} experts per layer" if n_experts else "")
                + "; longspec_lab serves dense decoders only (one MLP per layer), so "
                f"{_NO_CONFIG_FIX} or pick a dense model of the family"
            )
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} (model_type={mt!r}); "
                f"longspec_lab loads {', '.join(SUPPORTED_ARCHITECTURES)} checkpoints only"
            )
        fam = _family(arch)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported; the SwiGLU MLP here uses 'silu'")
        if d.get("mlp_bias") and fam != "llama":
            raise ValueError(f"mlp_bias=True is not supported for {arch} (transformers builds it without MLP biases)")
        prf = d.get("partial_rotary_factor", 1.0)
        if prf not in (None, 1, 1.0):
            raise ValueError(
                f"partial_rotary_factor={prf} is not supported: RoPE here rotates every channel; {_NO_CONFIG_FIX}"
            )
        # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in rope_theta/rope_scaling
        rp = dict(d.get("rope_parameters") or {})
        theta = rp.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
        scaling = d.get("rope_scaling") or (rp if rp else None)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            scaling.pop("type", None)
            scaling.pop("rope_theta", None)
            if scaling["rope_type"] == "default":
                scaling = None
        heads = d["num_attention_heads"]
        bias = bool(d.get("attention_bias", False))
        cfg = cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias={"llama": bias, "qwen2": True, "qwen3": bias, "mistral": False}[fam],
            architecture=arch,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            o_proj_bias=bias and fam in ("llama", "qwen3"),
            qk_norm=fam == "qwen3",
            mlp_bias=bool(d.get("mlp_bias", False)),
        )
        window = _sliding_window_in_use(d, fam, cfg.num_layers, cfg.context_length)
        if window is not None:
            raise ValueError(
                f"{arch} uses sliding-window attention here (window {window} < context "
                f"{cfg.context_length}); longspec_lab attends over the whole context, so its tokens would "
                "differ from transformers past the window. Use a checkpoint without a window "
                "(sliding_window null, or use_sliding_window false) or " + _NO_CONFIG_FIX
            )
        return cfg

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        fam = _family(self.architecture)
        d = {
            "architectures": [self.architecture],
            "model_type": fam,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,  # a copy: transformers edits it
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
        }
        if fam in ("llama", "qwen3"):
            d["attention_bias"] = self.attention_bias
        if fam == "llama":
            d["mlp_bias"] = self.mlp_bias
        if fam in ("qwen2", "qwen3"):
            d["use_sliding_window"] = False
        if fam == "mistral":
            d["sliding_window"] = None
        return d


def _sliding_window_in_use(d: dict, fam: str, num_layers: int, context: int) -> int | None:
    """The window size if some layer attends over a window shorter than the context, else None."""
    w = d.get("sliding_window")
    if fam in ("qwen2", "qwen3"):
        types = d.get("layer_types")
        if types is not None:
            used = "sliding_attention" in types
        else:
            used = bool(d.get("use_sliding_window")) and d.get("max_window_layers", num_layers) < num_layers
        if not (used and w):
            return None
    elif fam != "mistral" or not w:
        return None
    return int(w) if int(w) < context else None


@dataclass
class GenerationSettings:
    """What `generation_config.json` asks of generate: EOS ids and the default sampling settings.

    Missing fields take transformers' defaults (greedy; when sampling: temperature 1, top-k 50,
    top-p 1). temperature 0 means greedy; top_k / top_p None mean off. `unsupported` lists settings
    the file gives that longspec_lab does not apply (repetition_penalty, min_p, ...)."""

    eos_token_id: tuple[int, ...] | None = None
    do_sample: bool = False
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    unsupported: dict = dataclasses.field(default_factory=dict)

    # fields that change the tokens and that longspec_lab does not implement, with their no-op values
    _NEUTRAL = {
        "repetition_penalty": 1.0,
        "min_p": None,
        "typical_p": 1.0,
        "epsilon_cutoff": 0.0,
        "eta_cutoff": 0.0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "length_penalty": 1.0,
        "bad_words_ids": None,
        "suppress_tokens": None,
        "begin_suppress_tokens": None,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "min_new_tokens": None,
        "min_length": 0,
    }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "GenerationSettings":
        e = d.get("eos_token_id")
        eos = None if e is None else tuple(int(x) for x in (e if isinstance(e, (list, tuple)) else [e]))
        do_sample = bool(d.get("do_sample", False))
        temperature = d.get("temperature")
        top_k = d.get("top_k")
        top_p = d.get("top_p")
        unsupported = {k: d[k] for k, v in cls._NEUTRAL.items() if k in d and d[k] not in (v, None)}
        if not do_sample:
            return cls(eos, False, 0.0, None, None, unsupported)
        temperature = 1.0 if temperature is None else float(temperature)
        top_k = 50 if top_k is None else int(top_k)
        top_p = 1.0 if top_p is None else float(top_p)
        return cls(eos, True, temperature, top_k or None, top_p if top_p < 1.0 else None, unsupported)


PRESETS: dict[str, ModelConfig] = {
    # the code model that ships in data/embedded (7.3M parameters, ~14.7 MB in bf16)
    "embedded": ModelConfig(),
    # Llama-3-8B shapes, for cost measurements with random weights
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # for unit tests: small enough to run hundreds of forwards on a CPU in seconds
    "tiny": ModelConfig(
        vocab_size=64,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=512,
    ),
}
