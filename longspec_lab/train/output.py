"""Checkpoints are written whole or not at all, and never over someone's files without being asked.

Training runs for minutes to hours and ends by writing a folder of weights. Three rules keep that from
ever destroying data:
  1. the output folder is checked *before* any work: a folder that already holds files is refused
     unless the caller passes overwrite=True (the CLI's --overwrite);
  2. the new checkpoint goes to a hidden temporary folder next to the destination and is renamed into
     place only once it is complete, so a crash or Ctrl-C leaves the old folder as it was;
  3. weights with a NaN or an infinity are never saved (`check_finite`): training stops with an error.
With no destination given, `fresh_out_dir` picks a new folder under the working directory.

Taught in: notebooks/05_the_glide_draft.ipynb
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from longspec_lab.models.draft_io import DRAFT_FILES
from longspec_lab.models.files import user_mode
from longspec_lab.models.tokenizer import TOKENIZER_FILES

# --overwrite replaces only folders made of the files a checkpoint holds (what train-target and train-draft write, and
# a Hugging Face folder's weights, config and tokenizer files), never a folder holding anything else: a text corpus,
# notes or a project keep their folder whatever the flags say
CHECKPOINT_NAMES = {
    *DRAFT_FILES, *TOKENIZER_FILES, "config.json", "generation_config.json", "model.safetensors",
    "model.safetensors.index.json", "train_log.json", "added_tokens.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja",
}  # fmt: skip
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")


def is_checkpoint_file(path: Path) -> bool:
    """Whether path is a file that a checkpoint folder holds (CHECKPOINT_NAMES, or a weight shard)."""
    return path.is_file() and (path.name in CHECKPOINT_NAMES or bool(_SHARD.fullmatch(path.name)))


def fresh_out_dir(stem: str, root=None) -> Path:
    """A folder name under `root` (default: the working directory) that does not exist yet."""
    root = Path(root) if root is not None else Path.cwd()
    base = root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


def check_out_dir(out, overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse a destination that is a file, or a folder with files in it unless `overwrite`."""
    from longspec_lab.paths import check_output_path

    out = Path(out)
    check_output_path(out)  # never into the installed package
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a folder; give a folder name for the checkpoint")
    if out.is_dir() and not overwrite:
        names = sorted(p.name for p in out.iterdir())
        if names:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ValueError(
                f"{flag} {out} already holds files ({shown}); pass --overwrite to replace them "
                f"(the old folder stays intact until the new checkpoint is complete), or choose a new folder"
            )
    if out.is_dir() and overwrite:
        foreign = sorted(p.name for p in out.iterdir() if not is_checkpoint_file(p))
        if foreign or out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            held = ", ".join(foreign[:4]) or "the working directory"
            raise ValueError(
                f"{flag} {out} does not look like a checkpoint folder (it holds {held}), so --overwrite "
                "will not replace it; choose a new or empty folder"
            )
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {out}: {parent} is a file, so the folder cannot be made; choose another path")
    return out


def check_finite(tensors, what: str) -> None:
    """Raise ValueError if any tensor of the (name, tensor) pairs holds a NaN or an infinity."""
    import torch

    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(
            f"{what} holds non-finite values (NaN or inf) in {len(bad)} tensors, e.g. {bad[:3]}; nothing was "
            "saved. Lower the learning rate, or check the loss weights"
        )


def check_hparam(name: str, value, low=None, high=None, low_open: bool = False, integer: bool = False):
    """A hyperparameter must be a finite number in [low, high] (or (low, high] with low_open)."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{name}={value!r} must be {'an integer' if integer else 'a number'}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not a finite number; give a finite value")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}={value} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value} must be <= {high}")
    return value


@contextmanager
def staged_dir(out, overwrite: bool = False):
    """Yield a temporary folder next to `out`; on success rename it to `out` (replacing the old folder
    only if `overwrite`), on any error or interrupt delete it and leave `out` untouched."""
    out = check_out_dir(out, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(user_mode(0o777))  # mkdtemp makes 0700: the checkpoint gets the modes of a folder made by mkdir
    try:
        yield tmp
        check_out_dir(out, overwrite)  # again: something may have been written there meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
