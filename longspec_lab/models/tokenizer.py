"""Tokenizers for a model folder: the fast `tokenizers` file when there is one, else AutoTokenizer.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer

from longspec_lab.paths import TOKENIZER_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_tokenizer(path=None) -> Tokenizer:
    """The fast ``tokenizers.Tokenizer`` (no transformers import). ``path``: folder or tokenizer.json."""
    path = Path(path) if path is not None else TOKENIZER_DIR
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"no tokenizer at {file}; train one with `python -m longspec_lab.train.tokenizer --train` "
            f"or pass the folder that holds tokenizer.json"
        )
    return Tokenizer.from_file(str(file))


def load_hf_tokenizer(path=None):
    """The same tokenizer as a ``transformers`` fast tokenizer (via ``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(path) if path is not None else TOKENIZER_DIR))


def tokenizer_fingerprint(path=None) -> str:
    path = Path(path) if path is not None else TOKENIZER_DIR
    file = path / "tokenizer.json" if path.is_dir() else path
    return hashlib.sha256(file.read_bytes()).hexdigest()


def copy_tokenizer_files(dst, src=None) -> None:
    """Copy tokenizer.json + configs into a model folder so ``from_pretrained(model_dir)`` finds them."""
    src = Path(src) if src is not None else TOKENIZER_DIR
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if not (src / name).is_file():
            raise ValueError(f"{src / name} missing; run `python -m longspec_lab.train.tokenizer --train` first")
        (dst / name).write_bytes((src / name).read_bytes())


class Tok:
    """A minimal tokenizer facade: `tokenizers.Tokenizer` when tokenizer.json exists (fast, no
    transformers import), otherwise `transformers.AutoTokenizer`."""

    def __init__(self, path):
        path = Path(path)
        self._fast = None
        self._hf = None
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(path / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(path))

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text).ids
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        ids = list(ids)
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self._hf.decode(ids)


def load_tokenizer_for(model_dir) -> Tok:
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {model_dir}; put tokenizer.json (or a transformers tokenizer) next to the weights"
        )
    return Tok(model_dir)
