"""run_notebooks --wheels: a wheel is laid out as an installer would lay it out, without pip."""

import os
import sys
import zipfile

import pytest

from longspec_lab.teach.run_notebooks import unpack_wheels


def _wheel(path, name):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Name: {name}\nVersion: 1.0\n")
        z.writestr(f"{name}-1.0.data/data/share/jupyter/kernels/k/kernel.json", "{}")
        z.writestr(f"{name}-1.0.data/purelib/{name}_extra.py", "X = 1\n")


def test_unpack_wheels_lays_out_packages_and_data(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    (tmp_path / "w").mkdir()
    _wheel(tmp_path / "w" / "fakepkg_lsl-1.0-py3-none-any.whl", "fakepkg_lsl")
    site = unpack_wheels(tmp_path / "w", tmp_path / "site")
    assert (site / "fakepkg_lsl" / "__init__.py").is_file()
    assert (site / "fakepkg_lsl_extra.py").is_file()
    assert (site / "share" / "jupyter" / "kernels" / "k" / "kernel.json").is_file()
    assert not list(site.glob("*.data"))
    assert os.environ["JUPYTER_PATH"].split(os.pathsep)[0] == str(site / "share" / "jupyter")
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(site)
    import importlib

    assert importlib.import_module("fakepkg_lsl").VALUE == 42
    sys.modules.pop("fakepkg_lsl", None)


def test_unpack_wheels_without_wheels_names_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="no .whl files"):
        unpack_wheels(tmp_path, tmp_path / "site")
