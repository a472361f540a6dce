"""kernels/ sits at the repository root, where `python -m ...` and pytest put it on sys.path under the name
`kernels`, which is also the name of the package transformers (5.2x) imports for its hub kernels. The folder
must hand that name over, or importing transformers from the root fails."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_transformers_imports_from_the_repository_root():
    code = "import transformers.activations, kernels; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # no such package installed: the folder may keep the name
    assert Path(out.stdout.strip()).resolve().parent != ROOT / "kernels"


def test_the_folder_is_still_longspec_lab_kernels():
    import longspec_lab.kernels as ours

    assert Path(ours.__file__).resolve().parent == ROOT / "kernels"
