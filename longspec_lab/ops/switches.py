"""The package's run-time switches: environment variables named LONGSPEC_*, each read once at import into a
module constant that tests and sweeps may reassign (docs/GPU_JOBS.md lists them all; every result records
the ones that were set, `provenance.environment`).

`checked(name, value, choices)` is the one error every switch gives for a value it does not know.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb (the fused-projection A/B flips LONGSPEC_NORM_LINEAR)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

HAS_TRITON = importlib.util.find_spec("triton") is not None  # without it every "auto" switch takes PyTorch


def checked(name: str, value: str, choices: Sequence[str]) -> str:
    """value if it is one of choices; otherwise a ValueError that names the variable, the value and the fix."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}; unset it or pick one")
    return value
