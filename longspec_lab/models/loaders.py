"""Load and save Hugging Face checkpoint folders (safetensors only, never pickle).

A folder holds `config.json` and either `model.safetensors`, several `*.safetensors` files, or a
sharded index `model.safetensors.index.json`; `generation_config.json` is read when present (its
EOS ids replace config.json's, as in transformers' `generate`, and its sampling settings become
`target.generation`). Names map one to one onto `Target`'s modules, and nothing is dropped or mixed
silently: every tensor in the files is either loaded, or equal to what it would be recomputed as
(a tied `lm_head.weight`, a stored `rotary_emb.inv_freq`), or named in an error together with the
config flag that would explain it. Checks run before any tensor is allocated on the device.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb (the embedded pair).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from longspec_lab.models.config import GenerationSettings, ModelConfig
from longspec_lab.models.files import CORRUPT_FIX, check_safetensors, read_json, save_safetensors
from longspec_lab.models.layers import rope_inv_freq
from longspec_lab.models.target import Target


def pick_device(device=None) -> torch.device:
    """None / "auto": cuda when a GPU is visible, else cpu; otherwise "cpu", "cuda", "cuda:N" or a torch.device."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is unknown; use 'cpu', 'cuda' or 'cuda:N' (or leave it unset)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: longspec_lab runs on 'cpu' or 'cuda' (a CUDA GPU) only")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' was asked for but this torch build sees no CUDA GPU; "
            "use --device cpu (or leave it unset to choose automatically)"
        )
    return dev


def pick_dtype(dtype=None, device=None) -> torch.dtype:
    """float32 on CPU, bf16 on GPU, unless overridden ('float32', 'bf16', 'fp16', ...)."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if pick_device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"dtype {dtype} is not a float type the models run in; use float32, bf16 or fp16")
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is unknown; use one of {', '.join(names)}")
    return names[dtype]


def read_config(path) -> ModelConfig:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"model folder {str(path)!r} does not exist; pass a local folder "
            "holding config.json and *.safetensors (nothing is downloaded)"
        )
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{str(cfg_file)!r} is missing; a Hugging Face checkpoint folder needs config.json next to its weights"
        )
    raw = read_json(cfg_file)
    try:
        return ModelConfig.from_hf_dict(raw)
    except (KeyError, TypeError) as e:  # a field missing, or of the wrong kind: name the file
        what = f"lacks the field {e.args[0]!r}" if isinstance(e, KeyError) else f"has a field of the wrong type ({e})"
        raise ValueError(
            f"{cfg_file} {what}, which a {raw.get('model_type') or 'decoder'} config needs; the file is incomplete or "
            "hand-edited: copy config.json again from the model's source"
        ) from None


def weight_files(path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map of tensor names to files; {CORRUPT_FIX}")
        shards = sorted(set(map(str, weight_map.values())))
        pickled = [s for s in shards if not s.endswith(".safetensors")]
        if pickled:
            raise ValueError(
                f"{index} maps tensors to {pickled[:3]}, not *.safetensors files; longspec_lab loads safetensors "
                "only, because unpickling can run arbitrary code. Convert once with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the shard index names {missing} but they are not in {path}; "
                "copy every shard listed in model.safetensors.index.json"
            )
        for s in shards:
            check_safetensors(path / s)
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if files:
        for f in files:
            check_safetensors(f)
        return files
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise ValueError(
            f"{path} holds only pickle weights (*.bin/*.pt); longspec_lab loads safetensors only, "
            "because unpickling can run arbitrary code. Convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise FileNotFoundError(
        f"no *.safetensors weights in {path}; a checkpoint folder needs "
        "model.safetensors or a sharded model.safetensors.index.json"
    )


def read_generation(path) -> GenerationSettings | None:
    """`generation_config.json` of a model folder, or None when there is none."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return None
    raw = read_json(f, fix="fix or delete the file")
    try:
        return GenerationSettings.from_hf_dict(raw)
    except (TypeError, ValueError) as e:  # e.g. eos_token_id "</s>": transformers' file holds token ids
        raise ValueError(
            f"{f} has a value of the wrong kind ({e}): eos_token_id must be a token id or a list of them, "
            "temperature / top_p numbers and top_k an integer; fix or delete the file"
        ) from None


def check_head_dim(cfg: ModelConfig, device=None, attention_backend=None) -> str:
    """The attention backend the model will run with; refuses a head dim the Triton kernel does not take."""
    from longspec_lab.ops.attention import check_backend, default_backend

    backend = check_backend(attention_backend or default_backend(pick_device(device)))
    if backend == "triton":
        from longspec_lab.kernels.tree_attention import SUPPORTED_HEAD_DIMS

        if cfg.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"head_dim {cfg.head_dim} is not taken by the Triton tree-attention kernel (it takes "
                f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}); run with --attention-backend sdpa (or torch)"
            )
    return backend


def _unexpected_hint(names: list[str], cfg: ModelConfig) -> str:
    if any(n.startswith(("cross_attn.", "self_attn.")) or ".cross_attn." in n for n in names):
        return (
            "a GliDe draft's tensors (cross_attn.*): a draft.safetensors is in the model folder. Keep the draft in a "
            "folder of its own and pass it as the draft"
        )
    if any(n.endswith("o_proj.bias") for n in names) and not cfg.o_proj_bias:
        return f"o_proj biases while {cfg.architecture} here has none (attention_bias: true in config.json?)"
    if any(".q_norm." in n or ".k_norm." in n for n in names) and not cfg.qk_norm:
        return 'q/k norms: a Qwen3 checkpoint? config.json should say "architectures": ["Qwen3ForCausalLM"]'
    if any(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in names) and not cfg.attention_bias:
        return "q/k/v biases while config.json declares none (attention_bias: true?)"
    if any(".mlp." in n and n.endswith(".bias") for n in names) and not cfg.mlp_bias:
        return "MLP biases while config.json declares none (mlp_bias: true?)"
    return "tensors of another architecture or format (quantized weights, another family's names)"


def load_target(path, device=None, dtype=None, fuse: bool = True, attention_backend=None) -> Target:
    """Build a `Target` from a local HF folder. Everything is checked before any tensor is
    allocated, so a failed load leaves nothing half-built. `fuse` (default) joins q/k/v and gate/up
    into one matmul each. Given an `attention_backend`, the head dim is checked against it (load_pair,
    the serving path, always checks the backend the device defaults to; training does not need it)."""
    path = Path(path)
    cfg = read_config(path)
    gen = read_generation(path)
    if gen is not None and gen.eos_token_id is not None:
        cfg.eos_token_id = list(gen.eos_token_id) if len(gen.eos_token_id) > 1 else gen.eos_token_id[0]
    if gen is not None and gen.unsupported:
        warnings.warn(
            f"{path / 'generation_config.json'} sets {gen.unsupported}; longspec_lab does not apply these "
            "(only EOS ids, temperature, top-k and top-p), so sampled text can differ from transformers'"
        )
    if attention_backend is not None:
        check_head_dim(cfg, device, attention_backend)
    files = weight_files(path)
    dev, dt = pick_device(device), pick_dtype(dtype, device)
    with torch.device("meta"):
        model = Target(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        del want["lm_head.weight"]
    state, source, unexpected, inv_freq = {}, {}, [], rope_inv_freq(cfg)
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                if name in source:
                    raise ValueError(
                        f"tensor {name} is in both {source[name].name} and {f.name}; keep one copy of the "
                        "weights in the folder (the last one read would win)"
                    )
                source[name] = f
                if name in want:
                    state[name] = fh.get_tensor(name)
                elif name == "lm_head.weight" and cfg.tie_word_embeddings:
                    state[name] = fh.get_tensor(name)  # must equal the embedding: checked below
                elif name.endswith("rotary_emb.inv_freq"):
                    t = fh.get_tensor(name).float()
                    if t.shape != inv_freq.shape or not torch.allclose(t, inv_freq, rtol=1e-2):
                        raise ValueError(
                            f"{name} in {f.name} differs from the RoPE frequencies config.json implies; "
                            "config.json (rope_theta, rope_scaling, head_dim) does not describe these weights"
                        )
                else:
                    unexpected.append(name)
    if unexpected:
        raise ValueError(
            f"checkpoint in {path} holds {len(unexpected)} tensors that {cfg.architecture} as configured "
            f"does not use, e.g. {sorted(unexpected)[:4]}: {_unexpected_hint(unexpected, cfg)}; fix config.json "
            "or convert the checkpoint (nothing is dropped silently)"
        )
    missing = sorted(set(want) - set(state))
    if missing:
        raise ValueError(
            f"checkpoint in {path} lacks {len(missing)} tensors, e.g. {missing[:3]}; is it a complete "
            f"{cfg.architecture} checkpoint, and does config.json (biases, layers) describe it?"
        )
    for name, t in state.items():
        shape = want.get(name, want.get("model.embed_tokens.weight"))
        if tuple(t.shape) != shape:
            raise ValueError(
                f"tensor {name} has shape {tuple(t.shape)} but config.json implies "
                f"{shape}; config.json and the weights do not belong together"
            )
    if "lm_head.weight" in state and cfg.tie_word_embeddings:
        if not torch.equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"]):
            raise ValueError(
                f"config.json in {path} says tie_word_embeddings=true but lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings to false to use both"
            )
    model = model.to(dt).to_empty(device=dev)  # in the target dtype first: float64 stays exact
    model.load_state_dict({k: v.to(dt) for k, v in state.items()}, strict=False, assign=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = model.rotary.__class__(cfg).to(dev)
    model = model.to(dt).eval()
    if fuse:
        model.fuse()
    if gen is not None:
        model.generation = gen
    return model


def save_hf(model: Target, out_dir, dtype=torch.bfloat16, extra_config: dict | None = None) -> Path:
    """Write config.json + model.safetensors + generation_config.json that transformers' from_pretrained
    loads (Hugging Face names, fused or not)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    # clone: the names of a fused module are views of one tensor, and safetensors stores no shared memory
    state = {k: v.detach().to("cpu", dtype).clone() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_safetensors(state, out / "model.safetensors")
    d = cfg.to_hf_dict(str(dtype).replace("torch.", ""))
    d.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    gen = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.eos_ids[0] if cfg.eos_ids else None,
        "do_sample": False,
    }
    g = getattr(model, "generation", None)
    if g is not None and g.do_sample:
        gen.update(do_sample=True, temperature=g.temperature, top_k=g.top_k or 0, top_p=g.top_p or 1.0)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out
