"""Where the shipped data lives: the embedded model pair, its tokenizer, the held-out prompts.

Everything the package reads at run time is found from here, so no other module computes a path
relative to the source tree. The tools never write here: results go to a folder the user names.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb (the embedded pair).
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EMBEDDED_TARGET = DATA_DIR / "embedded"
EMBEDDED_DRAFT = DATA_DIR / "embedded-draft"
TOKENIZER_DIR = DATA_DIR / "tokenizer"
PROMPTS_DIR = DATA_DIR / "prompts"
RESULTS_DIR = DATA_DIR / "results"


def load_prompts(min_tokens: int | None = None, max_tokens: int | None = None, prompts_dir=PROMPTS_DIR) -> list[dict]:
    """Shipped long prompts -> [{name, text, n_tokens, module, line_start, line_end}], sorted by length."""
    index_path = Path(prompts_dir) / "index.json"
    if not index_path.is_file():
        raise ValueError(f"{index_path} missing; regenerate with `python -m longspec_lab.train.corpus --make-prompts`")
    out = []
    for e in json.loads(index_path.read_text())["prompts"]:
        if (min_tokens is not None and e["n_tokens"] < min_tokens) or (
            max_tokens is not None and e["n_tokens"] > max_tokens
        ):
            continue
        text = (Path(prompts_dir) / e["file"]).read_bytes().decode("utf-8")
        out.append(
            dict(
                name=Path(e["file"]).stem,
                text=text,
                n_tokens=e["n_tokens"],
                module=e["module"],
                line_start=e["line_start"],
                line_end=e["line_end"],
            )
        )
    return sorted(out, key=lambda d: (d["n_tokens"], d["name"]))
