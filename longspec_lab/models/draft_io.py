"""Draft checkpoints: save and load the GliDe draft in safetensors (never pickle).

Names follow LongSpec's released drafts (`self_attn.*`, `cross_attn.*`, `mlp.*`, `input_layernorm`,
`post_self_attention_layernorm`, `post_cross_attention_layernorm`), so a LongSpec draft for a Llama
target loads as it is. Everything is checked from the tensor shapes before the model is built.

The one prefix rule. Only a GliDe draft has a tensor ending in `cross_attn.q_proj.weight`; the text
before it in that one name is the draft prefix P (empty for the released drafts; `model.`,
`model.layers.0.` or `draft_model.` in other state dicts). A tensor belongs to the draft if and only
if its name is P followed by one of the draft's own names, exactly. So a state dict that holds the
target next to the draft (`model.layers.7.self_attn.*` beside `draft_model.self_attn.*`) loads the
draft's tensors only; the target's are skipped and listed in a warning, never mapped onto the draft.
Refused: no such tensor, two of them (two drafts or two prefixes), a name appearing twice, and a
name under P that is neither the draft's nor a target tensor (`embed_tokens`, `layers.N.`, ...).

Taught in: notebooks/05_the_glide_draft.ipynb
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from longspec_lab.models.files import check_safetensors, read_json, save_safetensors
from longspec_lab.models.glide import DraftConfig, Glide, check_fits
from longspec_lab.models.layers import fuse_projections
from longspec_lab.models.loaders import pick_device, pick_dtype

ANCHOR = "cross_attn.q_proj.weight"  # the one name only a GliDe draft has: it fixes the prefix
_UNUSED = ("cross_attn.k_proj.weight", "cross_attn.v_proj.weight", "cross_attn.k_proj.bias", "cross_attn.v_proj.bias")
# a tensor of the target (shared embedding, LM head, final norm, its layers), written with or without `model.`
_TARGET_NAME = re.compile(r"^(model\.)?(embed_tokens|lm_head|norm|layers\.\d+|rotary_emb)\.")


class MissingCheckpointError(FileNotFoundError, ValueError):
    """A draft folder or one of its files is missing (both a FileNotFoundError and a ValueError)."""


DRAFT_FILES = ("draft.safetensors", "draft_config.json")


def save_draft(draft: Glide, out_dir, overwrite: bool = False) -> Path:
    """Write draft.safetensors and draft_config.json into the folder out_dir (made if missing). A folder that already
    holds them is refused unless overwrite=True, and so is a model's folder (its config.json or weights: a draft
    there would stop the model from loading). Each file is written under a temporary name and then renamed, so an
    interrupted save leaves the old files, never half of a new one."""
    if not isinstance(draft, Glide):
        raise TypeError(
            f"save_draft saves a GliDe draft (longspec_lab.models.glide.Glide), got {type(draft).__name__}; "
            "a target saves with longspec_lab.models.loaders.save_hf"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give save_draft a folder for {' and '.join(DRAFT_FILES)}")
    if out.is_dir():
        there = [n for n in DRAFT_FILES if (out / n).exists()]
        if there and not overwrite:
            raise FileExistsError(f"{out} already holds {', '.join(there)}; pass overwrite=True or pick another folder")
        weights = (".safetensors", ".safetensors.index.json")
        model = [
            p.name
            for p in out.iterdir()
            if p.name == "config.json" or (p.name.startswith("model") and p.name.endswith(weights))
        ]
        if model:
            raise ValueError(
                f"{out} holds a model checkpoint ({', '.join(sorted(model)[:3])}); a draft written there would stop "
                "the model from loading. Save the draft in a folder of its own"
            )
    out.mkdir(parents=True, exist_ok=True)
    # clone: the names of a fused module are views of one tensor, and safetensors stores no shared memory
    state = {k: v.detach().to("cpu").clone() for k, v in draft.state_dict().items()}
    meta = dict(dataclasses.asdict(draft.config), model_type="longspec_lab-glide")
    tmp = [out / f".{n}.partial" for n in DRAFT_FILES]
    try:
        save_safetensors(state, tmp[0])
        tmp[1].write_text(json.dumps(meta, indent=2) + "\n")
        for t, n in zip(tmp, DRAFT_FILES):
            os.replace(t, out / n)
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)
    return out


def draft_prefix(names) -> str:
    """The prefix P of the draft's tensors: the text before the one name ending in cross_attn.q_proj.weight."""
    anchors = sorted(n for n in names if n == ANCHOR or n.endswith("." + ANCHOR))
    if not anchors:
        raise ValueError(
            f"no tensor named [prefix.]{ANCHOR} in the draft checkpoint; it is not a GliDe draft "
            "(train one with python -m longspec_lab.train.draft)"
        )
    if len(anchors) > 1:
        raise ValueError(
            f"the checkpoint holds {len(anchors)} GliDe drafts ({anchors}); keep one draft per folder "
            "so that its prefix is unambiguous"
        )
    return anchors[0][: -len(ANCHOR)]


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


def load_draft(path, target, device=None, dtype=None, fuse: bool = True) -> Glide:
    """Read a draft folder (draft.safetensors + draft_config.json, or a reference checkpoint whose
    names carry one prefix, see the module docstring). Every check runs before anything is allocated.
    `fuse` (default) joins the self-attention's q/k/v and the MLP's gate/up into one matmul each."""
    path = Path(path)
    files = _draft_files(path)
    for f in files:
        check_safetensors(f)
    folder = path if path.is_dir() else path.parent
    names = {}  # checkpoint name -> file
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                if name in names:
                    raise ValueError(
                        f"tensor {name} is in both {names[name].name} and {f.name}; keep one copy "
                        "(the last one read would win)"
                    )
                names[name] = f
    prefix = draft_prefix(names)
    with torch.device("meta"):
        own = set(Glide(DraftConfig.from_target(target.config), target).state_dict())
    shapes, where, unused, skipped, foreign = {}, {}, [], [], []
    for name, f in names.items():
        short = name[len(prefix) :] if name.startswith(prefix) else None
        if short in own:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                shapes[short] = tuple(fh.get_slice(name).get_shape())
            where[short] = (f, name)
        elif short in _UNUSED:
            unused.append(name)
        elif short is None or _TARGET_NAME.match(short) or _TARGET_NAME.match(name):
            skipped.append(name)
        else:
            foreign.append(name)
    if foreign:
        raise ValueError(
            f"{len(foreign)} tensors under the draft prefix {prefix!r} are not GliDe draft tensors, e.g. "
            f"{sorted(foreign)[:3]}; the draft's names are {sorted(own)[:3]}...: is this another draft design?"
        )
    if unused:
        warnings.warn(
            f"ignoring {unused}: the draft's cross-attention reads the target's K/V cache "
            "directly (already projected and rotated), so these projections are never used"
        )
    if skipped:
        warnings.warn(
            f"loading only the draft's tensors (prefix {prefix!r}); skipped {len(skipped)} others, "
            f"e.g. {sorted(skipped)[:3]} (the target's, which the draft shares rather than owns)"
        )
    tcfg = target.config
    cfg_file = folder / "draft_config.json"
    if cfg_file.is_file():
        raw = read_json(cfg_file)
        fields = {f.name for f in dataclasses.fields(DraftConfig)}
        try:
            dcfg = DraftConfig(**{k: v for k, v in raw.items() if k in fields})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg_file}: {e}; fix the file or write it again with save_draft") from None
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
    if dcfg.window > tcfg.context_length:  # a window past the context sees every position, as the context itself
        dcfg = dataclasses.replace(dcfg, window=tcfg.context_length)
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
    draft = draft.to(device=dev, dtype=target.dtype if dtype is None else pick_dtype(dtype)).eval()
    return fuse_projections(draft) if fuse else draft
