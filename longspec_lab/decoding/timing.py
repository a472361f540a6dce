"""Wall-clock timing with the device synchronised, per named stage, and the names timed runs go by.

A results file (`longspec-lab bench`, bench.h200_speed) keys its rows by method name: "ar", "chain-g5" (a chain
of gamma 5), "tree-4-16-16-16-16" (a tree of those level widths), a "-BACKEND" suffix for a run on another
attention backend. `method_name` writes those names and `parse_method` reads them back; the benchmarks, the
tuner and the notebooks all go through the pair.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

# a recorded step's forms, fastest first as the decoder runs them: compiled and captured, captured, eager
STEP_FORMS = (("_compiled_ms", "compiled + CUDA graph"), ("_graph_ms", "CUDA graph"), ("_ms", "eager"))


def fastest_form(row: dict, stem: str) -> tuple[float, str] | None:
    """(ms, form) of the fastest form of the step `stem` recorded in a results row, whose keys are the stem and a
    suffix of STEP_FORMS ("triton_verify_compiled_ms", "draft_step_graph_ms", ...); None when none is recorded.
    Ties go to the form the decoder runs first in STEP_FORMS."""
    if stem.endswith(tuple(sfx.removesuffix("_ms") for sfx, _ in STEP_FORMS if sfx != "_ms")):
        raise ValueError(f"{stem!r} names a form, not a step; pass the step's stem, e.g. {stem.rsplit('_', 1)[0]!r}")
    found = [(row[stem + sfx], i, form) for i, (sfx, form) in enumerate(STEP_FORMS) if stem + sfx in row]
    if not found:
        return None
    ms, _, form = min(found)
    return ms, form


def method_name(method: str, *, gamma: int | None = None, shape=None, backend: str | None = None) -> str:
    """The results-file name of a run: method_name("ar") -> "ar"; ("chain", gamma=5) -> "chain-g5"; ("tree",
    shape=[4, 16]) -> "tree-4-16"; backend="sdpa" appends "-sdpa" (a run on another attention backend)."""
    if method == "ar":
        base = "ar"
    elif method == "chain" and isinstance(gamma, int) and gamma >= 1:
        base = f"chain-g{gamma}"
    elif method == "tree" and shape is not None and len(shape) > 0:
        base = "tree-" + "-".join(str(int(w)) for w in shape)
    else:
        raise ValueError(
            f"method_name takes 'ar', 'chain' with gamma >= 1 or 'tree' with a shape, got {method!r} "
            f"(gamma={gamma!r}, shape={shape!r})"
        )
    if backend is not None and (not backend or "-" in backend or backend[0].isdigit()):
        raise ValueError(f"a backend suffix is a word without '-' that does not start with a digit, got {backend!r}")
    return f"{base}-{backend}" if backend else base


def parse_method(name: str) -> tuple[list[int], str | None] | None:
    """`method_name` read back: (level widths, backend or None). "ar" -> ([], None); "chain-g4" -> ([1, 1, 1, 1],
    None); "tree-2-4-sdpa" -> ([2, 4], "sdpa"); None for any other name (the transformers peers, "hf-greedy")."""
    if name == "ar":
        return [], None
    kind, _, rest = name.partition("-")
    parts = rest.split("-") if rest else []
    widths: list[int] = []
    if kind == "chain" and parts and parts[0][:1] == "g" and parts[0][1:].isdigit() and int(parts[0][1:]) >= 1:
        widths, parts = [1] * int(parts[0][1:]), parts[1:]
    elif kind == "tree":
        while parts and parts[0].isdigit() and int(parts[0]) >= 1:
            widths.append(int(parts.pop(0)))
    if not widths or len(parts) > 1 or (parts and (not parts[0] or parts[0][0].isdigit())):
        return None
    return widths, (parts[0] if parts else None)


def drafted_shape(name: str) -> list[int] | None:
    """The level widths of a chain or tree run on the default attention backend ("chain-g5" -> [1, 1, 1, 1, 1]);
    None for "ar", the transformers peers and runs on another backend: the rows a tuner is fitted to and checked
    against."""
    parsed = parse_method(name)
    return parsed[0] if parsed and parsed[0] and parsed[1] is None else None


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Accumulates seconds per stage ("draft", "verify", "commit", ...). With `enabled=False`
    it only counts, so a fast path can skip the synchronisations."""

    def __init__(self, device="cpu", enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str):
        if not self.enabled:
            yield
            return
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        return dict(self.seconds)
