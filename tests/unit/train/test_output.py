"""Checkpoint writing never destroys data: refusals, whole-or-nothing renames, finite weights."""

import pytest
import torch

from longspec_lab.train.output import check_finite, check_hparam, check_out_dir, fresh_out_dir, staged_dir


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_new_folder_is_written_whole(tmp_path):
    out = tmp_path / "a" / "ckpt"
    with staged_dir(out) as tmp:
        assert tmp.parent == out.parent and not out.exists()  # nothing visible until complete
        (tmp / "model.safetensors").write_bytes(b"new")
    assert _files(out) == {"model.safetensors": b"new"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]


def test_occupied_folder_needs_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--overwrite"):
        check_out_dir(out)
    with pytest.raises(ValueError, match="--overwrite"):
        with staged_dir(out):
            pass
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    assert _files(out) == {"config.json": b'{"new": 1}'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty") == tmp_path / "empty"  # an empty folder is fine


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_crash_or_ctrl_c_leaves_the_old_checkpoint(tmp_path, interrupt):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    with pytest.raises(interrupt):
        with staged_dir(out, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise interrupt()
    assert _files(out) == {"model.safetensors": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_overwrite_never_replaces_other_work(tmp_path, monkeypatch):
    proj = tmp_path / "project"
    (proj / "src").mkdir(parents=True)
    (proj / "notes.json").write_text("{}")
    with pytest.raises(ValueError, match="checkpoint folder"):
        check_out_dir(proj, overwrite=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "draft.safetensors").write_bytes(b"x")
    monkeypatch.chdir(plain)
    with pytest.raises(ValueError, match="working directory"):
        check_out_dir(plain, overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_out_dir(tmp_path / "f")


def test_fresh_out_dir_is_new(tmp_path):
    a = fresh_out_dir("draft", tmp_path)
    a.mkdir()
    b = fresh_out_dir("draft", tmp_path)
    assert a != b and not b.exists() and b.parent == tmp_path and b.name.startswith("draft-")


def test_check_finite_and_hparams():
    ok = [("w", torch.ones(3)), ("steps", torch.tensor([3]))]
    check_finite(ok, "x")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"non-finite.*\['b'\]"):
            check_finite(ok + [("b", torch.tensor([1.0, bad]))], "the draft")
    assert check_hparam("lr", 1e-3, 0, 10, low_open=True) == 1e-3
    for value, match in ((float("nan"), "finite"), (0.0, "> 0"), (11.0, "<= 10"), (True, "number"), ("1", "number")):
        with pytest.raises(ValueError, match=match):
            check_hparam("lr", value, 0, 10, low_open=True)
    with pytest.raises(ValueError, match="integer"):
        check_hparam("steps", 2.5, 1, integer=True)
