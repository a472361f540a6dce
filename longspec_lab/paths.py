"""Where the shipped data lives: the embedded model pair, its tokenizer, the held-out prompts, the
recorded results and the notebooks.

Everything the package reads at run time is found from here, so no other module computes a path
relative to the source tree. Two layouts, one rule: in an installed wheel the data are package data,
found through `importlib.resources` inside the package (`longspec_lab/data`, `longspec_lab/notebooks`);
in a checkout (and an editable install of it) they are the repository's top-level `data/` and
`notebooks/` folders, which the wheel build maps into the package (see pyproject.toml).

The tools never write into the installed package (it may be read-only, and an upgrade replaces it):
results go to a folder the user names; `check_output_path` refuses a path inside the package.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb (the embedded pair).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped(name: str) -> tuple[Path, bool]:
    """(folder, installed): package data in a wheel install, else the checkout's top-level folder."""
    inside = resources.files("longspec_lab") / name
    if inside.is_dir():  # a wheel install (always unpacked on disk by pip)
        return Path(str(inside)), True
    return PACKAGE_DIR.parent / name, False


DATA_DIR, INSTALLED = _shipped("data")
NOTEBOOKS_DIR, _ = _shipped("notebooks")
EMBEDDED_TARGET = DATA_DIR / "embedded"
EMBEDDED_DRAFT = DATA_DIR / "embedded-draft"
TOKENIZER_DIR = DATA_DIR / "tokenizer"
PROMPTS_DIR = DATA_DIR / "prompts"
RESULTS_DIR = DATA_DIR / "results"  # recorded results (read only); new results go where the user says


def notebooks_dir() -> Path:
    """The folder holding the shipped notebooks (`NN_name.ipynb`); copy them before editing."""
    if not NOTEBOOKS_DIR.is_dir():
        raise FileNotFoundError(
            f"the notebooks are not at {NOTEBOOKS_DIR}; reinstall longspec-lab (they ship inside the package)"
        )
    return NOTEBOOKS_DIR


def check_output_path(path) -> Path:
    """`path` resolved, after checking that it is not inside the installed package; for every tool
    that writes (results, checkpoints, notebook copies)."""
    out = Path(path).expanduser().resolve()
    if INSTALLED and out.is_relative_to(PACKAGE_DIR):
        raise ValueError(
            f"{out} is inside the installed package ({PACKAGE_DIR}), which the tools never write to; "
            "pass an output folder of your own (e.g. --out ./results)"
        )
    return out


def load_prompts(min_tokens: int | None = None, max_tokens: int | None = None, prompts_dir=PROMPTS_DIR) -> list[dict]:
    """Shipped long prompts -> [{name, text, n_tokens, module, line_start, line_end}], sorted by length."""
    index_path = Path(prompts_dir) / "index.json"
    if not index_path.is_file():
        fix = (
            "reinstall longspec-lab (the prompts ship inside the package)"
            if INSTALLED
            else "regenerate with `python -m longspec_lab.train.corpus --make-prompts`"
        )
        raise ValueError(f"{index_path} missing; {fix}")
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
