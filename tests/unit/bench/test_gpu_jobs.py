"""The GPU job table names modules that exist and flags their parsers accept (a typo would cost a
device call to find)."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
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


def test_code_runs_the_jobs_with_an_archived_package_and_notes_its_commit(tmp_path, monkeypatch, capsys):
    """`--code DIR` (an A/B against an older commit): the job imports DIR's package, not this checkout's, even though
    `python -m` starts from its working folder; the checkout's links are made; each JSON the job writes names DIR's
    commit, and one written before it is left alone."""
    from longspec_lab.bench import gpu_jobs
    from longspec_lab.paths import DATA_DIR

    code = tmp_path / "base"
    (code / "longspec_lab").mkdir(parents=True)
    (code / "kernels").mkdir()
    (code / "longspec_lab" / "__init__.py").write_text("")
    (code / "kernels" / "__init__.py").write_text("")
    (code / "longspec_lab" / "whoami.py").write_text(
        "import json, os, sys\nimport longspec_lab, longspec_lab.kernels\n"
        "json.dump({'package': longspec_lab.__file__, 'kernels': longspec_lab.kernels.__file__,"
        " 'cwd': os.getcwd()}, open(sys.argv[1], 'w'))\n"
    )
    (code / "COMMIT").write_text("0123abc\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "older.json").write_text('{"kept": 1}')
    monkeypatch.setattr(gpu_jobs, "jobs", lambda o: {"who": ([sys.executable, "-m", "longspec_lab.whoami",
                                                                str(o / "who.json")], 60, {})})  # fmt: skip
    past = time.time() - 60
    os.utime(out / "older.json", (past, past))
    monkeypatch.chdir(Path(__file__).resolve().parents[3])  # the checkout, whose own package must not be run
    assert gpu_jobs.main(["--out", str(out), "--only", "who", "--code", str(code)]) == 0
    who = json.loads((out / "who.json").read_text())
    assert Path(who["package"]).resolve() == (code / "longspec_lab" / "__init__.py").resolve()
    assert Path(who["kernels"]).resolve() == (code / "kernels" / "__init__.py").resolve()
    assert (code / "data").resolve() == DATA_DIR.resolve()
    assert "0123abc" in who.get("code_commit_note", "") and str(code.resolve()) in who["code_commit_note"]
    assert json.loads((out / "older.json").read_text()) == {"kept": 1}
    assert "commit 0123abc" in (out / "who.log").read_text() and "commit 0123abc" in capsys.readouterr().out


def test_code_without_an_archive_is_one_line_naming_the_fix(tmp_path, capsys):
    from longspec_lab.bench import gpu_jobs

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        gpu_jobs.main(["--out", str(tmp_path / "out"), "--only", "e2e_base", "--code", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no longspec_lab/__init__.py" in err and "git archive COMMIT" in err
    assert not (tmp_path / "out").exists()


def test_code_whose_links_cannot_be_made_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    from longspec_lab.bench import gpu_jobs

    code = tmp_path / "base"
    (code / "longspec_lab").mkdir(parents=True)
    (code / "kernels").mkdir()
    (code / "longspec_lab" / "__init__.py").write_text("")

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "symlink_to", refuse)
    with pytest.raises(SystemExit) as e:
        gpu_jobs.main(["--out", str(tmp_path / "out"), "--only", "e2e_base", "--code", str(code)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot link" in err and "Permission denied" in err and "writable" in err
