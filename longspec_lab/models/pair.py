"""Find and load what a run needs: the target, the draft and the tokenizer.

Defaults are the embedded pair that ships in `data/`: `data/embedded` (target, HF format, with its
tokenizer) and `data/embedded-draft` (the GliDe draft, safetensors).
"""

from __future__ import annotations

from pathlib import Path

from longspec_lab.models.loaders import load_target
from longspec_lab.models.tokenizer import load_tokenizer_for
from longspec_lab.paths import EMBEDDED_DRAFT, EMBEDDED_TARGET


def load_pair(model_dir=None, draft_dir=None, device=None, dtype=None, need_draft=True):
    """(target, draft or None, tokenizer). The default draft is only looked for next to the default
    target; with another target, pass draft_dir or use method='ar'."""
    model_dir = Path(model_dir) if model_dir is not None else EMBEDDED_TARGET
    if not model_dir.exists():
        raise FileNotFoundError(
            f"model folder {model_dir} does not exist"
            + (
                "; the embedded model ships in data/embedded (run from a full checkout, or train it "
                "with `longspec-lab train-target`)"
                if model_dir == EMBEDDED_TARGET
                else ""
            )
        )
    target = load_target(model_dir, device=device, dtype=dtype)
    draft = None
    if need_draft:
        if draft_dir is None and model_dir.resolve() == EMBEDDED_TARGET.resolve():
            draft_dir = EMBEDDED_DRAFT
        if draft_dir is not None:
            from longspec_lab.models.draft_io import load_draft

            draft = load_draft(draft_dir, target)
    return target, draft, load_tokenizer_for(model_dir)
