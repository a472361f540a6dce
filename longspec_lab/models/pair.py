"""Find and load what a run needs: the target, the draft and the tokenizer.

Defaults are the embedded pair that ships with the package (`paths.EMBEDDED_TARGET`: the target in
Hugging Face format, with its tokenizer; `paths.EMBEDDED_DRAFT`: its GliDe draft, safetensors), in the
installed package or in the checkout's data/ folder.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb (the embedded pair).
"""

from __future__ import annotations

from pathlib import Path

from longspec_lab.models.loaders import check_head_dim, load_target, read_config
from longspec_lab.models.tokenizer import load_tokenizer_for
from longspec_lab.paths import EMBEDDED_DRAFT, EMBEDDED_TARGET, INSTALLED


def load_pair(model_dir=None, draft_dir=None, device=None, dtype=None, need_draft=True, attention_backend=None):
    """(target, draft or None, tokenizer). The default draft is only looked for next to the default
    target; with another target, pass draft_dir or use method='ar'. `attention_backend` (default: by
    device) is checked against the model (the Triton kernel takes head dims 64 and 128)."""
    model_dir = Path(model_dir) if model_dir is not None else EMBEDDED_TARGET
    if not model_dir.exists():
        where = "reinstall longspec-lab (it ships inside the package)" if INSTALLED else "run from a full checkout"
        raise FileNotFoundError(
            f"model folder {model_dir} does not exist"
            + (
                f"; the embedded model ships with longspec_lab: {where}, or train it with `longspec-lab train-target`"
                if model_dir == EMBEDDED_TARGET
                else ""
            )
        )
    check_head_dim(read_config(model_dir), device, attention_backend)  # Triton (the CUDA default): D 64, 128
    target = load_target(model_dir, device=device, dtype=dtype)
    draft = None
    if need_draft:
        if draft_dir is None and model_dir.resolve() == EMBEDDED_TARGET.resolve():
            draft_dir = EMBEDDED_DRAFT
        if draft_dir is not None:
            from longspec_lab.models.draft_io import load_draft

            draft = load_draft(draft_dir, target)
    return target, draft, load_tokenizer_for(model_dir)
