"""Every recorded result says which of the package's switches were set when it ran."""

import json

import pytest

from longspec_lab.provenance import environment, stamp


def test_environment_records_the_longspec_switches_only(monkeypatch):
    monkeypatch.setenv("LONGSPEC_NORM_LINEAR", "on")
    monkeypatch.setenv("LONGSPEC_AUTOTUNE", "0")
    monkeypatch.setenv("NOT_OURS_SWITCH", "1")
    env = environment(device="cpu")
    assert env["switches"]["LONGSPEC_NORM_LINEAR"] == "on" and env["switches"]["LONGSPEC_AUTOTUNE"] == "0"
    assert all(k.startswith("LONGSPEC_") for k in env["switches"])
    monkeypatch.delenv("LONGSPEC_NORM_LINEAR")
    assert "LONGSPEC_NORM_LINEAR" not in stamp({"x": 1}, "cpu")["environment"]["switches"]


def test_write_new_json_never_overwrites(tmp_path, capsys):
    from longspec_lab.provenance import write_new_json

    path = tmp_path / "r.json"
    write_new_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and "wrote" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        write_new_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
