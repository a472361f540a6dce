"""Target training: a tiny CPU run learns, and the saved folder is a valid HF checkpoint."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from longspec_lab.models.config import PRESETS
from longspec_lab.models.loaders import load_target
from longspec_lab.models.tokenizer import TOKENIZER_FILES, load_tokenizer
from longspec_lab.train.target import DEFAULTS, build_parser, lr_at, main, smoke_tokens, train_target


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


def test_cli_help_and_smoke(tmp_path, capsys):
    helptext = build_parser().format_help()
    assert "--tokens-dir" in helptext and "--smoke" in helptext
    assert f"(default: {DEFAULTS['steps']})" in helptext
    assert main(["--smoke", "--quiet", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert json.loads(capsys.readouterr().out)["steps"] == 20
