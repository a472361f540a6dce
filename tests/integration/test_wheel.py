"""The wheel is self-contained: built from the checkout, installed into a fresh virtual environment,
it runs `longspec-lab generate` and `longspec-lab demo` from an unrelated folder, with the embedded
pair, tokenizer, prompts and notebooks found inside the installed package, and writes nothing there.
An editable install of the checkout still finds the repository's top-level data/ and notebooks/.

The fresh environment sees this test environment's packages through a .pth line (torch and the
rest are not downloaded again); the package itself is installed from the wheel with --no-deps.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["embedded", "embedded-draft", "tokenizer", "prompts"]


def _run(cmd, cwd, timeout=300, **kw):
    env = dict(os.environ, PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _copy_checkout(dst: Path) -> Path:
    """The checkout's files (tracked and not ignored) without build leftovers, as a clean clone has them."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        files = [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is needed to list the checkout's files")
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    return dst


def _fresh_venv(path: Path) -> Path:
    """A new venv whose own site-packages comes first, then this environment's (via a .pth line)."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    py = path / "bin" / "python"
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "zz_test_environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    return py


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    src = _copy_checkout(base / "src")
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", base / "dist", src], cwd=base)
    (wheel,) = (base / "dist").glob("longspec_lab-*.whl")
    py = _fresh_venv(base / "venv")
    _run([*pip, "--python", py, "install", "--no-deps", "--no-index", "-q", wheel], cwd=base)
    where = _run([py, "-c", "import longspec_lab, os; print(os.path.dirname(longspec_lab.__file__))"], cwd=base)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return py, Path(where.strip()), elsewhere


def test_wheel_ships_the_data_and_notebooks(installed):
    py, pkg, elsewhere = installed
    assert pkg.is_relative_to(py.parent.parent) and not pkg.is_relative_to(ROOT)
    for name in SHIPPED:  # every file, byte for byte
        want = _tree(ROOT / "data" / name)
        assert want and _tree(pkg / "data" / name) == want, name
    assert _tree(pkg / "notebooks") == _tree(ROOT / "notebooks")
    code = (
        "from longspec_lab import paths; print(paths.INSTALLED, paths.DATA_DIR, paths.notebooks_dir()); "
        "paths.check_output_path(paths.RESULTS_DIR / 'x.json')"
    )
    p = subprocess.run([py, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["True", str(pkg / "data"), str(pkg / "notebooks")]
    assert "inside the installed package" in p.stderr and "--out" in p.stderr


def test_generate_and_demo_from_an_unrelated_folder(installed):
    py, pkg, elsewhere = installed
    before = _tree(pkg)
    cli = py.parent / "longspec-lab"
    out = json.loads(_run([cli, "generate", "--max-new-tokens", "6", "--device", "cpu", "--json"], cwd=elsewhere))
    assert out["model_path"] == str(pkg / "data" / "embedded") and len(out["new_tokens"]) == 6
    demo = _run([cli, "demo", "--max-new-tokens", "6", "--device", "cpu"], cwd=elsewhere)
    rows = [line.split() for line in demo.splitlines() if line.startswith(("ar ", "chain ", "tree "))]
    assert [r[0] for r in rows] == ["ar", "chain", "tree"] and all(r[-1] == "True" for r in rows)  # lossless
    assert _tree(pkg) == before  # nothing written into the installed package
    assert not any(p.name != "__pycache__" for p in elsewhere.iterdir())


def test_editable_install_uses_the_checkout_folders(tmp_path):
    src = _copy_checkout(tmp_path / "src")
    py = _fresh_venv(tmp_path / "venv")
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*pip, "-q", "-e", src], cwd=tmp_path)
    code = "from longspec_lab import paths; print(paths.INSTALLED, paths.DATA_DIR, paths.NOTEBOOKS_DIR)"
    assert _run([py, "-c", code], cwd=tmp_path).split() == ["False", str(src / "data"), str(src / "notebooks")]
