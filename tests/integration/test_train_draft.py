"""train_draft: anchor-offset positions, a CPU smoke run whose loss falls, the outputs it writes; a draft
trained on your own text for a Qwen3 target, used losslessly at once; nothing destroyed along the way."""

import json
import re
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from longspec_lab.cli import main as cli_main
from longspec_lab.models.config import PRESETS
from longspec_lab.models.draft_io import load_draft
from longspec_lab.models.loaders import load_target, save_hf
from longspec_lab.models.target import Target
from longspec_lab.models.tokenizer import load_tokenizer_for
from longspec_lab.paths import EMBEDDED_TARGET
from longspec_lab.train.draft import anchor_positions, train_draft


def test_anchor_positions_keep_sinks_and_reach_the_end():
    gen = torch.Generator().manual_seed(0)
    pos = anchor_positions(512, 16, 100, gen, max_sinks=4)
    assert pos.min() >= 0 and pos.max() <= 99
    assert pos.max() == 99  # with 512 rows some offset is the largest allowed one
    steps = pos.diff(dim=1)  # 1 everywhere except one jump (the offset) after the sinks
    jumps = (steps != 1).sum(1)
    assert (jumps <= 1).all() and (steps >= 1).all()
    k = torch.where(jumps == 1, (steps != 1).int().argmax(1) + 1, torch.zeros_like(jumps))
    assert k.max() <= 4 and set(k.tolist()) >= {1, 2, 3, 4}
    for row, kk in zip(pos, k):
        assert torch.equal(row[:kk], torch.arange(int(kk)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        anchor_positions(1, 200, 100, gen)


def write_tokens(path, n, vocab, seed):
    """A noisy deterministic chain: next = (5 * prev + 3) % vocab most of the time (learnable)."""
    rng = np.random.default_rng(seed)
    toks = np.zeros(n, dtype=np.uint16)
    for i in range(1, n):
        toks[i] = (5 * int(toks[i - 1]) + 3) % vocab if rng.random() < 0.9 else rng.integers(vocab)
    toks.tofile(path)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_draft")
    torch.manual_seed(0)
    target = Target(PRESETS["tiny"])
    torch.nn.init.normal_(target.model.embed_tokens.weight, std=0.2)  # a usable output basis for the tied head
    save_hf(target, root / "target", torch.float32)
    (root / "tokens").mkdir()
    write_tokens(root / "tokens" / "train.u16", 20000, 64, 1)
    write_tokens(root / "tokens" / "heldout.u16", 2000, 64, 2)
    log = train_draft(
        root / "target",
        root / "draft",
        steps=20,
        batch_size=4,
        seq_len=48,
        lr=3e-3,
        warmup=2,
        seed=0,
        device="cpu",
        dtype="float32",
        tokens_dir=root / "tokens",
        kd_weight=0.5,
        window=16,
        max_staleness=2,
        progress=False,
        eval_every=10,
        eval_windows=4,
        log_every=1,
    )
    return root, log


def test_smoke_loss_falls_and_outputs_written(smoke_run):
    root, log = smoke_run
    losses = [r["loss"] for r in log["losses"]]
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    on_disk = json.loads((root / "draft" / "train_log.json").read_text())
    assert on_disk["steps"] == 20 and on_disk["tokens_seen"] == 20 * 4 * 48
    assert [e["step"] for e in on_disk["evals"]] == [10, 20]
    for e in on_disk["evals"]:
        for s in ("staleness0", "staleness2"):
            a = e[s]
            assert 0 <= a["top1"] <= a["top4"] <= a["top16"] <= 1 and a["loss"] > 0
    assert {"wall_seconds", "device", "versions", "command", "final_eval"} <= set(on_disk)
    draft = load_draft(root / "draft", load_target(root / "target", "cpu", "float32"))
    assert draft.config.window == 16


def test_cli_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train-draft", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: longspec-lab train-draft")
    for flag in ("--steps", "--batch-size", "--seq-len", "--kd-weight", "--max-staleness", "--smoke", "--window"):
        assert flag in out
    for flag in ("--model", "--text", "--tokens", "--out", "--overwrite", "--quiet"):
        assert flag in out
    assert out.count("(default: 4000)") == 1 and "(default: 1.0)" in out
    assert re.search(r"\(default: [^)]*\)\s*\(default", out) is None  # each default shown once


def test_existing_output_is_refused_before_any_work(smoke_run, tmp_path):
    root, _ = smoke_run
    before = {p.name: p.read_bytes() for p in (root / "draft").iterdir()}
    with pytest.raises(ValueError, match="--overwrite"):
        train_draft(root / "target", root / "draft", steps=1, tokens_dir=root / "tokens", device="cpu")
    with pytest.raises(ValueError, match="kd_weight"):
        train_draft(root / "target", tmp_path / "d", kd_weight=float("nan"), tokens_dir=root / "tokens")
    assert {p.name: p.read_bytes() for p in (root / "draft").iterdir()} == before
    assert not (tmp_path / "d").exists()


def _qwen3_target(path: Path) -> Path:
    """A tiny random Qwen3 (q/k norms, GQA) written by transformers, with the embedded tokenizer's files."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # a peaked next-token distribution, so drafts and greedy paths are not ties of noise
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(EMBEDDED_TARGET / f, path / f)
    return path


def test_draft_from_your_own_text_for_a_qwen3_target(tmp_path, capsys):
    """`train-draft --model M --text DIR` then `generate --model M --draft OUT`: the tree output equals
    transformers' greedy generate token for token."""
    transformers = pytest.importorskip("transformers")
    model = _qwen3_target(tmp_path / "qwen3")
    text = tmp_path / "text"
    text.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "heapq.py", "shlex.py", "bisect.py", "colorsys.py"):
        shutil.copy(stdlib / name, text / name)
    args = ["train-draft", "--model", str(model), "--text", str(text), "--out", str(tmp_path / "draft"), "--quiet"]
    args += ["--steps", "4", "--batch-size", "2", "--seq-len", "48", "--warmup", "1", "--eval-every", "0"]
    args += ["--eval-windows", "2", "--window", "16", "--device", "cpu", "--dtype", "float32"]
    assert cli_main(args) == 0, capsys.readouterr().err
    log = json.loads((tmp_path / "draft" / "train_log.json").read_text())
    assert log["text"] == str(text) and log["steps"] == 4 and log["target"] == str(model)
    capsys.readouterr()

    prompt = (stdlib / "csv.py").read_text()[:600]
    gen = ["generate", "--model", str(model), "--draft", str(tmp_path / "draft"), "--prompt", prompt, "--json"]
    gen += ["--tree-shape", "2", "4", "4", "--max-new-tokens", "24", "--device", "cpu", "--dtype", "float32"]
    assert cli_main(gen) == 0
    res = json.loads(capsys.readouterr().out)
    ids = load_tokenizer_for(model).encode(prompt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0)[0, len(ids) :]
    assert res["prompt_tokens"] == len(ids) and res["new_tokens"] == ref.tolist()
    assert res["target_calls"] <= len(res["new_tokens"])


def test_smoke_run_honours_out_however_spelled(tmp_path, monkeypatch, capsys):
    """`--out=DIR` (and abbreviations) is parsed by argparse; a smoke run needs no data/tokens."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train-draft", "--smoke", "--quiet", "--out=sm"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "sm").iterdir()) == [
        "draft.safetensors",
        "draft_config.json",
        "train_log.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]  # nothing else written, no temporary folder
    assert "wrote the draft to sm" in capsys.readouterr().out
