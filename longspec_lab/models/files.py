"""Checks on a checkpoint's files before anything is read from them: each damaged file is named, with the fix.

A copied checkpoint fails in a few plain ways: a JSON file cut short or edited by hand, a `.safetensors` file whose
copy stopped early, a config that lacks a field. The libraries that read them then raise their own errors
(`JSONDecodeError`, `SafetensorError: invalid header length`, `KeyError: 'hidden_size'`), which do not say which file
is at fault or what to do. `read_json` and `check_safetensors` turn each into a `ValueError` that names the file; the
loaders (`loaders.py`, `draft_io.py`) call them, and the command line (`cli.py`) shows their message without a
traceback. `check_safetensors` reads only the 8-byte length and the header, never the tensors.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb (the embedded pair, loaded as loaders.py loads it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CORRUPT_FIX = "the checkpoint is corrupt or truncated; copy it again"


def read_json(path, want=dict, fix: str = CORRUPT_FIX):
    """The parsed content of the JSON file at path, which must be a `want` (dict by default): a ValueError naming the
    file, and `fix`, where it is not valid UTF-8 JSON or holds another kind of value."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from None
    if want is not None and not isinstance(value, want):
        raise ValueError(
            f"{path} holds a JSON {type(value).__name__}, not an object; {fix} (a config file is one {{...}} object "
            "of fields)"
        )
    return value


def check_safetensors(path) -> None:
    """A .safetensors file's header and size, without reading its tensors: a ValueError naming the file if the header
    is unreadable or the file is shorter than its header says (a copy cut short)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{path} is not a readable safetensors file ({size} bytes); {CORRUPT_FIX}")
        try:
            header = json.loads(fh.read(n))
            end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{path} has a damaged header; {CORRUPT_FIX}") from None
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: {size} bytes, but its header describes {8 + n + end}; {CORRUPT_FIX}")


def save_safetensors(state: dict, path) -> None:
    """safetensors' save_file, then the file's mode set as for any file the user makes (safetensors creates 0600, which
    other accounts cannot read)."""
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})
    os.chmod(path, user_mode(0o666))


def user_mode(bits: int) -> int:
    """bits (0o666 for a file, 0o777 for a folder) under the process's umask: the mode open() or mkdir() would give."""
    umask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(umask)
    return bits & ~umask
