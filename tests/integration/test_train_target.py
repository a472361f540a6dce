"""Target training: a tiny CPU run learns, and the saved folder is a valid HF checkpoint."""

import json
import math
import re

import pytest
import torch
from safetensors import safe_open

import longspec_lab.train.target as target_mod
from longspec_lab.cli import main as cli_main
from longspec_lab.models.config import PRESETS
from longspec_lab.models.loaders import load_target
from longspec_lab.models.tokenizer import TOKENIZER_FILES, load_tokenizer
from longspec_lab.train.target import DEFAULTS, lr_at, smoke_tokens, train_target


@pytest.fixture(scope="module")
def tiny_cfg():
    return PRESETS["tiny"].replace(vocab_size=load_tokenizer().get_vocab_size())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_cfg):
    tmp = tmp_path_factory.mktemp("train")
    tokens = smoke_tokens(tmp / "tokens", n_train_files=20)
    out = tmp / "model"
    summary = train_target(
        tiny_cfg,
        out,
        steps=20,
        batch_size=4,
        seq_len=128,
        lr=3e-3,
        warmup=2,
        weight_decay=0.1,
        seed=0,
        device="cpu",
        dtype="float32",
        eval_every=10,
        tokens_dir=tokens,
        max_eval_windows=4,
        progress=False,
    )
    return summary, out, tokens


def test_loss_falls_and_log(trained):
    summary, out, _ = trained
    log = json.loads((out / "train_log.json").read_text())
    losses = log["loss_curve"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert abs(losses[0] - math.log(4096)) < 0.5  # small init: near-uniform predictions at step 0
    assert [e["step"] for e in log["evals"]] == [10, 20]
    assert summary["best_heldout_loss"] == min(e["heldout_loss"] for e in log["evals"])
    assert summary["tokens_seen"] == 20 * 4 * 128
    assert log["summary"]["params"] == PRESETS["tiny"].replace(vocab_size=4096).num_parameters()


def test_saved_folder_is_hf_checkpoint(trained):
    transformers = pytest.importorskip("transformers")
    _, out, _ = trained
    for f in ("config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
        assert all(fh.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = load_target(out, device="cpu", dtype="float32")
    ids = torch.tensor([[0] + tok.encode("import os\n\ndef main(argv=None):\n    return 0\n")])
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert got.shape == ref.shape == (1, ids.shape[1], 4096)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_best_checkpoint_is_saved(trained, tiny_cfg):
    """The saved weights reproduce the best held-out loss (up to bf16 rounding), not just the last step."""
    summary, out, tokens = trained
    from longspec_lab.train.corpus import TokenDataset
    from longspec_lab.train.target import evaluate

    model = load_target(out, device="cpu", dtype="float32")
    held = TokenDataset(tokens / "heldout.u16", 128).eval_windows(4)
    loss = evaluate(model, held, 4, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    assert abs(loss - summary["best_heldout_loss"]) < 0.02


def test_lr_schedule():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_bad_arguments(tmp_path, tiny_cfg, trained):
    _, _, tokens = trained
    with pytest.raises(ValueError, match="seq-len"):
        train_target(tiny_cfg, tmp_path, steps=1, seq_len=10_000, tokens_dir=tokens, device="cpu", progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train_target(PRESETS["tiny"], tmp_path, steps=1, seq_len=64, tokens_dir=tokens, device="cpu", progress=False)
    with pytest.raises(ValueError, match="--tokenize"):
        train_target(
            tiny_cfg, tmp_path, steps=1, seq_len=64, tokens_dir=tmp_path / "none", device="cpu", progress=False
        )


def test_cli_help_and_smoke(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli_main(["train-target", "--help"])
    helptext = capsys.readouterr().out
    assert e.value.code == 0 and helptext.startswith("usage: longspec-lab train-target")
    assert "--tokens " in helptext and "--smoke" in helptext and "--tokens-dir" not in helptext
    assert helptext.count(f"(default: {DEFAULTS['steps']})") == 1
    assert re.search(r"\(default: [^)]*\)\s*\(default", helptext) is None  # each default shown once
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train-target", "--smoke", "--quiet", "--out", "m"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert json.loads(out[: out.rindex("}") + 1])["steps"] == 20 and "wrote the target to m" in out
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    assert cli_main(["train-target", "--smoke", "--quiet", "--out", "m"]) == 2  # refused, nothing touched
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_overwrite_replaces_only_a_complete_checkpoint(tmp_path, tiny_cfg, trained):
    _, _, tokens = trained
    kw = dict(steps=2, batch_size=2, seq_len=32, eval_every=1, tokens_dir=tokens, device="cpu", dtype="float32")
    kw.update(max_eval_windows=2, progress=False)
    out = tmp_path / "ckpt"
    train_target(tiny_cfg, out, **kw)
    first = (out / "train_log.json").read_text()
    with pytest.raises(ValueError, match="--overwrite"):
        train_target(tiny_cfg, out, **kw)
    assert (out / "train_log.json").read_text() == first
    train_target(tiny_cfg, out, overwrite=True, **dict(kw, steps=3))
    assert json.loads((out / "train_log.json").read_text())["summary"]["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left


def test_nonfinite_loss_stops_and_saves_nothing(tmp_path, tiny_cfg, trained, monkeypatch):
    _, _, tokens = trained
    real = target_mod.lm_loss
    monkeypatch.setattr(target_mod, "lm_loss", lambda m, b: real(m, b) * float("nan"))
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="loss became nan at step 1"):
        train_target(
            tiny_cfg,
            out,
            steps=3,
            batch_size=2,
            seq_len=32,
            tokens_dir=tokens,
            device="cpu",
            dtype="float32",
            progress=False,
        )
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_nonfinite_hyperparameters(tmp_path, tiny_cfg, trained):
    _, _, tokens = trained
    for bad in (dict(lr=float("nan")), dict(lr=0.0), dict(weight_decay=float("inf")), dict(steps=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            train_target(tiny_cfg, tmp_path / "x", tokens_dir=tokens, device="cpu", progress=False, **bad)
    assert not (tmp_path / "x").exists()
