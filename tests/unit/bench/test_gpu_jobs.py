"""The GPU job table names modules that exist and flags their parsers accept (a typo would cost a
device call to find)."""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from longspec_lab.bench.gpu_jobs import jobs

TABLE = jobs(Path("OUT"))


@pytest.mark.parametrize("name", sorted(TABLE))
def test_job_runs_a_module_that_parses_its_flags(name, monkeypatch):
    cmd, limit, env = TABLE[name]
    assert cmd[1] == "-m" and limit > 0 and isinstance(env, dict)
    module = cmd[2]
    assert importlib.util.find_spec(module) is not None, module
    if name == "notebooks":  # its parser is checked by executing notebooks elsewhere; check the files
        assert all(Path(p).is_file() for p in cmd[3:5])
        return
    # every flag is known to the parser: --help after them would hide errors, so ask argparse directly
    args = cmd[3:]
    if module == "longspec_lab":
        args = [*args, "--help"]
        out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return
    mod = importlib.import_module(module)
    parsed = []

    class Stop(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def capture(self, a=None, ns=None):
        parsed.append(real(self, a, ns))  # argparse exits (SystemExit 2) on an unknown flag
        raise Stop

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Stop):
        mod.main(args)
    assert parsed


def test_every_switch_a_job_sets_is_read_by_the_package():
    """A job's LONGSPEC_* variables are ones the package (or a notebook) reads: a misspelt switch would time the A side
    twice."""
    root = Path(__file__).resolve().parents[3]
    files = [p for d in ("longspec_lab", "kernels") for p in sorted((root / d).rglob("*.py"))]
    src = "\n".join(p.read_text() for p in files + sorted((root / "notebooks").glob("*.ipynb")))
    names = {key for _, _, env in TABLE.values() for key in env if key.startswith("LONGSPEC_")}
    assert {"LONGSPEC_WEIGHT_FIRST", "LONGSPEC_TOPK_ALGO", "LONGSPEC_TOPK_FIRST_BLOCK"} <= names
    for key in sorted(names):
        assert f'os.environ.get("{key}"' in src or f'os.environ.get(\\"{key}\\"' in src, f"{key}: no module reads it"
