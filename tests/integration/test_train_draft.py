"""train_draft: anchor-offset positions, a CPU smoke run whose loss falls, and the outputs it writes."""

import json

import numpy as np
import pytest
import torch

from longspec_lab.models.config import PRESETS
from longspec_lab.models.draft_io import load_draft
from longspec_lab.models.loaders import load_target, save_hf
from longspec_lab.models.target import Target
from longspec_lab.train.draft import anchor_positions, main, train_draft


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
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--batch-size", "--seq-len", "--kd-weight", "--max-staleness", "--smoke", "--window"):
        assert flag in out
