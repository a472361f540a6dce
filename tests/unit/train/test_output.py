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


@pytest.mark.parametrize("own", ["essay1.txt", "notes.md", "results.json", "weights.safetensors", "README.md"])
def test_overwrite_keeps_a_folder_holding_anything_a_checkpoint_does_not_write(tmp_path, own):
    """A corpus of .txt files, notes or someone's JSON beside old checkpoint files: --overwrite is refused and the
    folder is left as it was (the old rule took every .txt, .md and .json for a checkpoint's own)."""
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "draft.safetensors").write_bytes(b"old")
    (out / own).write_text("mine")
    before = _files(out)
    with pytest.raises(ValueError, match=rf"does not look like a checkpoint folder \(it holds {own}\)"):
        with staged_dir(out, overwrite=True) as tmp:
            (tmp / "draft.safetensors").write_bytes(b"new")
    assert _files(out) == before


def test_overwrite_replaces_a_checkpoint_folder_of_any_layout(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    names = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "merges.txt", "train_log.json"]  # fmt: skip
    for n in names:
        (out / n).write_text("old")
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    assert _files(out) == {"model.safetensors": b"new"}


def test_a_checkpoint_folder_gets_the_mode_of_a_folder_made_by_mkdir(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "ckpt") as tmp:
            (tmp / "x.json").write_text("{}")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755
