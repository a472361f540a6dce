"""Load and save Hugging Face checkpoint folders (safetensors only, never pickle).

A folder holds `config.json` and either `model.safetensors`, several `*.safetensors` files, or a
sharded index `model.safetensors.index.json`. Names map one to one onto `Target`'s modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longspec_lab.models.config import ModelConfig
from longspec_lab.models.target import Target


def pick_device(device=None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
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
    return ModelConfig.from_hf_dict(json.loads(cfg_file.read_text()))


def weight_files(path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the shard index names {missing} but they are not in {path}; "
                "copy every shard listed in model.safetensors.index.json"
            )
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if files:
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


def load_target(path, device=None, dtype=None) -> Target:
    """Build a `Target` from a local HF folder. Everything is checked before any tensor is
    allocated, so a failed load leaves nothing half-built."""
    cfg = read_config(path)
    files = weight_files(path)
    dev, dt = pick_device(device), pick_dtype(dtype, device)
    with torch.device("meta"):
        model = Target(cfg)
    expected = {k for k in model.state_dict().keys()}
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                if name in expected:
                    state[name] = fh.get_tensor(name)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(
            f"checkpoint in {path} lacks {len(missing)} tensors, e.g. {missing[:3]}; "
            "is it a complete LlamaForCausalLM/Qwen2ForCausalLM checkpoint?"
        )
    for name, t in state.items():
        want = model.state_dict()[name].shape
        if tuple(t.shape) != tuple(want):
            raise ValueError(
                f"tensor {name} has shape {tuple(t.shape)} but config.json implies "
                f"{tuple(want)}; config.json and the weights do not belong together"
            )
    model = model.to_empty(device=dev)
    model.load_state_dict({k: v.to(dt) for k, v in state.items()}, strict=False, assign=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = model.rotary.__class__(cfg).to(dev)
    return model.to(dt).eval()


def save_hf(model: Target, out_dir, dtype=torch.bfloat16, extra_config: dict | None = None) -> Path:
    """Write config.json + model.safetensors that transformers' from_pretrained loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_hf_dict(str(dtype).replace("torch.", ""))
    d.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    gen = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.eos_ids[0] if cfg.eos_ids else None,
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out
