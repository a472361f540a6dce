"""Draft checkpoints: save and load the GliDe draft in safetensors (never pickle).

Names follow LongSpec's released drafts (`self_attn.*`, `cross_attn.*`, `mlp.*`, `input_layernorm`,
`post_self_attention_layernorm`, `post_cross_attention_layernorm`), with or without a prefix such as
`model.` or `model.layers.0.`, so a LongSpec draft for a Llama target loads as it is. Everything is
checked from the tensor shapes before the model is built.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longspec_lab.models.glide import DraftConfig, Glide, check_fits
from longspec_lab.models.loaders import pick_device, pick_dtype

_ROOTS = (
    "self_attn.",
    "cross_attn.",
    "mlp.",
    "input_layernorm.",
    "post_self_attention_layernorm.",
    "post_cross_attention_layernorm.",
)
_UNUSED = ("cross_attn.k_proj.", "cross_attn.v_proj.")


class MissingCheckpointError(FileNotFoundError, ValueError):
    """A draft folder or one of its files is missing (both a FileNotFoundError and a ValueError)."""


def save_draft(draft: Glide, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in draft.state_dict().items()}
    save_file(state, str(out / "draft.safetensors"), metadata={"format": "pt"})
    meta = dict(dataclasses.asdict(draft.config), model_type="longspec_lab-glide")
    (out / "draft_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _strip(name: str) -> str | None:
    """'model.layers.0.self_attn.q_proj.weight' -> 'self_attn.q_proj.weight'; None if not a draft name."""
    for root in _ROOTS:
        if name.startswith(root):
            return name
        i = name.find("." + root)
        if i >= 0:
            return name[i + 1 :]
    return None


def _draft_files(path: Path) -> list[Path]:
    if not path.exists():
        raise MissingCheckpointError(
            f"draft checkpoint {str(path)!r} does not exist; pass a folder written "
            "by save_draft / python -m longspec_lab.train.draft"
        )
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file; drafts load from safetensors only")
        return [path]
    if (path / "draft.safetensors").is_file():
        return [path / "draft.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(any(path.glob(p)) for p in ("*.bin", "*.pt", "*.pth", "*.pkl")):
        raise ValueError(
            f"{path} holds only pickle weights (*.bin/*.pt); longspec_lab loads safetensors only "
            "(unpickling can run arbitrary code). Convert once: load the state dict in a trusted "
            "environment and write it with safetensors.torch.save_file"
        )
    raise MissingCheckpointError(
        f"no draft.safetensors (or *.safetensors) in {path}; train one with "
        "python -m longspec_lab.train.draft or point at the right folder"
    )


def load_draft(path, target, device=None, dtype=None) -> Glide:
    """Read a draft folder (draft.safetensors + draft_config.json, or a reference checkpoint whose
    names carry a prefix such as `model.layers.0.`). Every check runs before anything is allocated."""
    path = Path(path)
    files = _draft_files(path)
    folder = path if path.is_dir() else path.parent
    shapes, where, unused = {}, {}, []
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                short = _strip(name)  # None: shared with the target (embed, lm_head) or foreign
                if short is not None and short.startswith(_UNUSED):
                    unused.append(name)
                elif short is not None:
                    shapes[short] = tuple(fh.get_slice(name).get_shape())
                    where[short] = (f, name)
    if unused:
        warnings.warn(
            f"ignoring {unused}: the draft's cross-attention reads the target's K/V cache "
            "directly (already projected and rotated), so these projections are never used"
        )
    tcfg = target.config
    cfg_file = folder / "draft_config.json"
    if cfg_file.is_file():
        raw = json.loads(cfg_file.read_text())
        fields = {f.name for f in dataclasses.fields(DraftConfig)}
        dcfg = DraftConfig(**{k: v for k, v in raw.items() if k in fields})
    else:
        if "mlp.gate_proj.weight" not in shapes:
            raise ValueError(
                f"{folder} has no draft_config.json and no mlp.gate_proj weight to infer the "
                "draft's shape from; is this a GliDe draft checkpoint?"
            )
        q = shapes.get("self_attn.q_proj.weight", (tcfg.num_heads * tcfg.head_dim,))
        kv = shapes.get("self_attn.k_proj.weight", (tcfg.num_kv_heads * tcfg.head_dim,))
        dcfg = DraftConfig(
            hidden_size=shapes["mlp.gate_proj.weight"][1],
            num_heads=max(1, q[0] // tcfg.head_dim),
            num_kv_heads=max(1, kv[0] // tcfg.head_dim),
            head_dim=tcfg.head_dim,
            intermediate_size=shapes["mlp.gate_proj.weight"][0],
            vocab_size=tcfg.vocab_size,
            window=512,
            rms_norm_eps=tcfg.rms_norm_eps,
        )
        warnings.warn(f"{folder} has no draft_config.json; inferred {dcfg} from the tensor shapes and the target")
    check_fits(dcfg, tcfg)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in Glide(dcfg, target).state_dict().items()}
    missing = sorted(set(want) - set(shapes))
    if missing:
        raise ValueError(
            f"draft checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:3]}; "
            "it is not a complete GliDe draft (expected names like self_attn.q_proj.weight)"
        )
    for name, shape in want.items():
        if shapes[name] != shape:
            raise ValueError(
                f"draft tensor {name} has shape {shapes[name]} but this target needs {shape} "
                f"(target hidden {tcfg.hidden_size}, {tcfg.num_heads}/{tcfg.num_kv_heads} heads of "
                f"dim {tcfg.head_dim}); the draft was trained for another target: train a draft "
                "for this one (python -m longspec_lab.train.draft)"
            )
    draft = Glide(dcfg, target)
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            state.update({n: fh.get_tensor(orig) for n, (ff, orig) in where.items() if ff == f})
    draft.load_state_dict(state)
    dev = target.device if device is None else pick_device(device)
    return draft.to(device=dev, dtype=target.dtype if dtype is None else pick_dtype(dtype)).eval()
