"""One provenance helper for every results JSON: environment, command, date and schema version.

Every benchmark, training run and report in the package calls `environment()` (or `stamp()`, which
adds it to a result dict), so a number in `data/results/` always says where and how it was made.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb (reading recorded results).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

SCHEMA_VERSION = 1


def _git_commit() -> str | None:
    """HEAD, with "+dirty" when tracked files differ from it (a copied working tree, uncommitted edits)."""
    here = Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=here,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    head = out.stdout.strip()
    return (head + ("+dirty" if dirty.stdout.strip() else "")) if head else None


def environment(device=None, dtype=None, command: str | None = None) -> dict:
    """Versions, device, date, command line and git commit of the running process."""
    env = {
        "schema_version": SCHEMA_VERSION,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
    }
    for mod in ("transformers", "triton", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    dev = torch.device(device) if device is not None else None
    env["device"] = str(dev) if dev is not None else None
    if dev is not None and dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(gpu=p.name, device_name=p.name, sm_count=p.multi_processor_count, cuda=torch.version.cuda)
        # with the switches below, this says whether kernels were launched with PDL (9.0+: kernels/launch.py)
        env["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(dev))
    else:
        env.update(gpu=None, device_name=platform.processor() or platform.machine())
    if dtype is not None:
        env["dtype"] = str(dtype).replace("torch.", "")
    # the package's switches (LONGSPEC_NORM_LINEAR, LONGSPEC_AUTOTUNE, ...): two runs that differ only there
    # must say so
    env["switches"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("LONGSPEC_")}
    return env


def stamp(result: dict, device=None, dtype=None, command: str | None = None) -> dict:
    """`result` with `schema_version` and `environment` filled in (a new dict)."""
    return {"schema_version": SCHEMA_VERSION, **result, "environment": environment(device, dtype, command)}


def write_new_json(path, report: dict) -> None:
    """Write `report` as JSON to `path`, which must not exist yet (a recorded result is never overwritten), and
    say so. Benchmarks check the path before their run, so this failing means a race, not a user's mistake."""
    with open(path, "x") as f:
        f.write(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
