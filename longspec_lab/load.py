"""Find and load what a run needs: the target, the draft and the tokenizer.

Defaults are the embedded pair that ships in `data/`: `data/embedded` (target, HF format, with its
tokenizer) and `data/embedded-draft` (the GliDe draft, safetensors).
"""

from __future__ import annotations

from pathlib import Path

from .corpus import DATA_DIR
from .models.loader import load_target

EMBEDDED_TARGET = DATA_DIR / "embedded"
EMBEDDED_DRAFT = DATA_DIR / "embedded-draft"


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
        raise FileNotFoundError(f"no tokenizer in {model_dir}; put tokenizer.json (or a transformers "
                                "tokenizer) next to the weights")
    return Tok(model_dir)


def load_pair(model_dir=None, draft_dir=None, device=None, dtype=None, need_draft=True):
    """(target, draft or None, tokenizer). The default draft is only looked for next to the default
    target; with another target, pass draft_dir or use method='ar'."""
    model_dir = Path(model_dir) if model_dir is not None else EMBEDDED_TARGET
    if not model_dir.exists():
        raise FileNotFoundError(
            f"model folder {model_dir} does not exist"
            + ("; the embedded model ships in data/embedded (run from a full checkout, or train it "
               "with `longspec-lab train-target`)" if model_dir == EMBEDDED_TARGET else ""))
    target = load_target(model_dir, device=device, dtype=dtype)
    draft = None
    if need_draft:
        if draft_dir is None and model_dir.resolve() == EMBEDDED_TARGET.resolve():
            draft_dir = EMBEDDED_DRAFT
        if draft_dir is not None:
            from .models.glide import load_draft

            draft = load_draft(draft_dir, target)
    return target, draft, load_tokenizer_for(model_dir)
