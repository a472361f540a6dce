"""Bad input through the real command line: every case exits with the documented status, names the
problem (the flag, or the file), prints no traceback, and leaves existing checkpoints as they were.

The cases run once (`results`), each test then checks one. To keep the suite fast, most cases go through
`longspec_lab.cli.main` inside one driver subprocess (the function `python -m longspec_lab` calls, with
its stdout, stderr and exit status captured per case); the cases that train or load a model run as
their own `python -m longspec_lab` processes next to it. None loads more than one small model.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from longspec_lab.paths import EMBEDDED_DRAFT, EMBEDDED_TARGET

HAS_CUDA = torch.cuda.is_available()
try:
    import kaleido  # noqa: F401

    HAS_KALEIDO = True
except ImportError:
    HAS_KALEIDO = False

GEN = ["generate", "--device", "cpu", "--quiet"]
SMALL_DRAFT_RUN = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "2", "--eval-every", "0"]
SMALL_DRAFT_RUN += ["--window", "8", "--device", "cpu", "--dtype", "float32", "--quiet"]

# (id, arguments, exit status, words the message must hold (case-insensitive), folders that must not change)
CASES = [
    # generate: flags, each error naming its flag
    ("gamma-negative", GEN + ["--method", "chain", "--gamma", "-1"], 2, ["--gamma"], []),
    ("gamma-zero", GEN + ["--method", "chain", "--gamma", "0"], 2, ["--gamma"], []),
    ("gamma-huge", GEN + ["--method", "chain", "--gamma", "5000"], 2, ["--gamma", "64"], []),
    ("gamma-not-int", GEN + ["--method", "chain", "--gamma", "four"], 2, ["--gamma", "four"], []),
    ("tree-too-big", GEN + ["--tree-shape", "4096", "4096"], 2, ["--tree-shape", "8193", "1024"], []),
    ("tree-zero", GEN + ["--tree-shape", "4", "0"], 2, ["--tree-shape", "width 0"], []),
    ("tree-word", GEN + ["--tree-shape", "4", "x"], 2, ["--tree-shape", "'x'"], []),
    ("tree-negative", GEN + ["--tree-shape", "4", "-1"], 2, ["--tree-shape"], []),
    ("tree-empty", GEN + ["--tree-shape"], 2, ["--tree-shape"], []),
    ("tree-too-deep", GEN + ["--tree-shape"] + ["1"] * 65, 2, ["--tree-shape", "depth"], []),
    ("chain-with-tree-shape", GEN + ["--method", "chain", "--tree-shape", "2", "2"], 2, ["--tree-shape", "chain"], []),
    ("ar-with-tree-shape", GEN + ["--method", "ar", "--tree-shape", "2"], 2, ["--tree-shape", "ar"], []),
    ("ar-with-zero-shape", GEN + ["--method", "ar", "--tree-shape", "0"], 2, ["--tree-shape"], []),
    ("tree-with-gamma", GEN + ["--gamma", "3"], 2, ["--gamma", "--method chain"], []),
    ("ar-with-draft", GEN + ["--method", "ar", "--draft", str(EMBEDDED_DRAFT)], 2, ["--draft"], []),
    ("seed-overflow", GEN + ["--seed", "99999999999999999999"], 2, ["--seed"], []),
    ("seed-negative", GEN + ["--seed", "-3"], 2, ["--seed"], []),
    ("dtype-unknown", GEN + ["--dtype", "float64"], 2, ["--dtype", "float64"], []),
    ("device-mps", ["generate", "--device", "mps"], 2, ["--device", "mps", "available", "cpu"], []),
    ("device-tpu", ["generate", "--device", "tpu"], 2, ["--device", "tpu", "available", "cpu"], []),
    ("temperature-nan", GEN + ["--temperature", "nan"], 2, ["--temperature", "finite"], []),
    ("temperature-negative", GEN + ["--temperature", "-1"], 2, ["--temperature"], []),
    ("temperature-inf", GEN + ["--temperature", "inf"], 2, ["--temperature", "finite"], []),
    ("top-p-zero", GEN + ["--temperature", "1", "--verify", "rrs", "--top-p", "0"], 2, ["--top-p"], []),
    ("top-p-big", GEN + ["--temperature", "1", "--verify", "rrs", "--top-p", "1.5"], 2, ["--top-p"], []),
    ("top-k-zero", GEN + ["--temperature", "1", "--verify", "rrs", "--top-k", "0"], 2, ["--top-k"], []),
    ("top-k-greedy", GEN + ["--top-k", "5"], 2, ["--top-k", "--temperature"], []),
    ("temperature-greedy-rule", GEN + ["--temperature", "1"], 2, ["--verify", "target-sample", "greedy"], []),
    ("verify-unknown", GEN + ["--verify", "nucleus"], 2, ["--verify", "nucleus"], []),
    ("method-unknown", GEN + ["--method", "beam"], 2, ["--method", "beam"], []),
    ("max-new-zero", GEN + ["--max-new-tokens", "0"], 2, ["--max-new-tokens"], []),
    ("max-new-word", GEN + ["--max-new-tokens", "many"], 2, ["--max-new-tokens", "many"], []),
    (
        "max-new-context",
        GEN + ["--prompt-file", "{short}", "--max-new-tokens", "5000"],
        2,
        ["--max-new-tokens", "4096"],
        [],
    ),
    (
        "chain-context",
        GEN + ["--method", "chain", "--gamma", "64", "--prompt", "x", "--max-new-tokens", "4040"],
        2,
        ["--max-new-tokens", "4096"],
        [],
    ),
    ("prompt-too-long", GEN + ["--prompt-file", "{long}", "--max-new-tokens", "8"], 2, ["prompt", "4096"], []),
    ("prompt-and-file", GEN + ["--prompt", "x", "--prompt-file", "{short}"], 2, ["--prompt", "--prompt-file"], []),
    ("prompt-empty", GEN + ["--prompt", ""], 2, ["--prompt", "empty"], []),
    ("prompt-file-dir", GEN + ["--prompt-file", "{work}"], 2, ["--prompt-file", "folder"], []),
    ("prompt-file-missing", GEN + ["--prompt-file", "{work}/nope.txt"], 2, ["nope.txt", "does not exist"], []),
    ("prompt-file-not-utf8", GEN + ["--prompt-file", "{latin1}"], 2, ["latin1.txt", "utf-8"], []),
    ("prompt-file-empty", GEN + ["--prompt-file", "{empty}"], 2, ["empty.txt", "empty"], []),
    ("backend-unknown", GEN + ["--attention-backend", "flash"], 2, ["--attention-backend", "flash"], []),
    ("triton-on-cpu", GEN + ["--attention-backend", "triton", "--prompt", "x"], 2, ["--attention-backend", "cpu"], []),
    # generate: checkpoints, each error naming the file
    ("model-missing", GEN + ["--model", "{work}/nomodel", "--method", "ar"], 2, ["nomodel", "does not exist"], []),
    ("model-is-file", GEN + ["--model", "{short}", "--method", "ar"], 2, ["short.py", "file"], []),
    ("model-no-config", GEN + ["--model", "{noconfig}", "--method", "ar"], 2, ["config.json"], []),
    ("model-bad-config", GEN + ["--model", "{badconfig}", "--method", "ar"], 2, ["badconfig/config.json", "json"], []),
    (
        "model-truncated",
        GEN + ["--model", "{truncated}", "--method", "ar"],
        2,
        ["truncated/model.safetensors", "truncated"],
        [],
    ),
    (
        "model-pickle-only",
        GEN + ["--model", "{pickled}", "--method", "ar"],
        2,
        ["pickled", "safetensors", "pickle"],
        [],
    ),
    ("draft-is-a-target", GEN + ["--draft", str(EMBEDDED_TARGET), "--prompt", "x"], 2, ["--draft"[2:], "glide"], []),
    ("model-without-draft", GEN + ["--model", "{other}"], 2, ["--draft", "train-draft"], []),
    ("draft-missing", GEN + ["--draft", "{work}/nodraft"], 2, ["--draft", "nodraft"], []),
    ("draft-truncated", GEN + ["--draft", "{draft_truncated}"], 2, ["draft_truncated/draft.safetensors"], []),
    # demo
    ("demo-max-new", ["demo", "--device", "cpu", "--max-new-tokens", "5000"], 2, ["--max-new-tokens", "4096"], []),
    ("demo-tree-zero", ["demo", "--tree-shape", "0"], 2, ["--tree-shape"], []),
    ("demo-other-model", ["demo", "--device", "cpu", "--model", "{other}"], 2, ["--draft"], []),
    # bench
    ("bench-shapes-words", ["bench", "--shapes", "a,b"], 2, ["--shapes", "'a'"], []),
    ("bench-shapes-zero", ["bench", "--shapes", "0"], 2, ["--shapes", "width 0"], []),
    ("bench-tree-zero", ["bench", "--tree-shape", "4", "0"], 2, ["--tree-shape"], []),
    ("bench-gammas-zero", ["bench", "--gammas", "0"], 2, ["--gammas"], []),
    ("bench-gammas-word", ["bench", "--gammas", "4,x"], 2, ["--gammas", "'x'"], []),
    ("bench-backend", ["bench", "--extra-backends", "cuda"], 2, ["--extra-backends"], []),
    ("bench-prompts-zero", ["bench", "--num-prompts", "0"], 2, ["--num-prompts"], []),
    ("bench-plot-type", ["bench", "--plot", "{work}/b.txt"], 2, ["--plot", ".txt"], []),
    (
        "generate-batch-invariant-big-tree",
        ["generate", "--batch-invariant", "--tree-shape", "8", "64", "64"],
        2,
        ["--batch-invariant", "128 rows"],
        [],
    ),
    ("bench-profile-cpu", ["bench", "--profile", "--device", "cpu"], 2, ["--profile", "CUDA"], []),
    ("bench-eager-compile", ["bench", "--eager", "--compile"], 2, ["--compile", "--eager"], []),
    ("bench-out-exists", ["bench", "--out", "{short}"], 2, ["--out", "--overwrite"], []),
    ("bench-out-dir", ["bench", "--out", "{work}"], 2, ["--out", "folder"], []),
    ("bench-max-new", ["bench", "--device", "cpu", "--max-new-tokens", "5000"], 2, ["--max-new-tokens"], []),
    # tune
    ("tune-max-nodes-zero", ["tune", "--max-nodes", "0"], 2, ["--max-nodes"], []),
    ("tune-max-nodes-one", ["tune", "--max-nodes", "1"], 2, ["--max-nodes"], []),
    ("tune-max-nodes-cap", ["tune", "--device", "cpu", "--max-nodes", "5000"], 2, ["--max-nodes", "1024"], []),
    ("tune-max-depth-zero", ["tune", "--max-depth", "0"], 2, ["--max-depth"], []),
    ("tune-min-prompt", ["tune", "--device", "cpu", "--min-prompt-tokens", "99999"], 2, ["--min-prompt-tokens"], []),
    ("tune-latency-missing", ["tune", "--device", "cpu", "--latency-from", "{work}/n.json"], 2, ["--latency-from"], []),
    ("tune-latency-not-a-report", ["tune", "--device", "cpu", "--latency-from", "{short}"], 2, ["--latency-from"], []),
    ("tune-max-depth-probe", ["tune", "--device", "cpu", "--max-depth", "9"], 2, ["--max-depth", "--probe-shape"], []),
    ("tune-probe-zero", ["tune", "--probe-shape", "16,0"], 2, ["--probe-shape"], []),
    (
        "tune-search-too-big",
        [
            "tune",
            "--device",
            "cpu",
            "--max-depth",
            "8",
            "--probe-shape",
            "16",
            "32",
            "32",
            "32",
            "32",
            "32",
            "32",
            "32",
        ],
        2,
        ["88,560,768 shapes", "--max-depth 7"],
        [],
    ),  # fmt: skip
    ("tune-top-zero", ["tune", "--top", "0"], 2, ["--top"], []),
    ("tune-old-new-tokens", ["tune", "--new-tokens", "0"], 2, ["--new-tokens", "deprecated"], []),
    # train-target: nothing existing is touched
    (
        "target-smoke-existing",
        ["train-target", "--smoke", "--out", "{ckpt_target}"],
        2,
        ["--out", "--overwrite"],
        ["ckpt_target"],
    ),
    (
        "target-abbrev-existing",
        ["train-target", "--smoke", "--ou", "{ckpt_target}"],
        2,
        ["--overwrite"],
        ["ckpt_target"],
    ),
    ("target-equals-existing", ["train-target", "--smoke", "--out={ckpt_target}"], 2, ["--overwrite"], ["ckpt_target"]),
    (
        "target-foreign-overwrite",
        ["train-target", "--smoke", "--out", "{project}", "--overwrite"],
        2,
        ["checkpoint folder"],
        ["project"],
    ),
    ("target-out-file", ["train-target", "--smoke", "--out", "{short}"], 2, ["--out", "file"], []),
    ("target-no-tokens", ["train-target", "--out", "{work}/t1"], 2, ["--tokens"], []),
    (
        "target-tokens-missing",
        ["train-target", "--tokens", "{work}/notokens", "--out", "{work}/t2"],
        2,
        ["--tokens", "notokens"],
        [],
    ),
    ("target-lr-nan", ["train-target", "--smoke", "--lr", "nan"], 2, ["--lr", "finite"], []),
    ("target-lr-zero", ["train-target", "--smoke", "--lr", "0"], 2, ["--lr"], []),
    ("target-smoke-steps", ["train-target", "--smoke", "--steps", "3"], 2, ["--smoke", "--steps"], []),
    ("target-preset", ["train-target", "--preset", "huge"], 2, ["--preset", "huge"], []),
    ("target-overwrite-no-out", ["train-target", "--smoke", "--overwrite"], 2, ["--overwrite", "--out"], []),
    ("target-ambiguous", ["train-target", "--smoke", "--o", "x"], 2, ["ambiguous", "--o"], []),
    # train-draft: nothing existing is touched, no NaN model is saved
    (
        "draft-smoke-existing",
        ["train-draft", "--smoke", "--out", "{ckpt_draft}"],
        2,
        ["--out", "--overwrite"],
        ["ckpt_draft"],
    ),
    ("draft-equals-existing", ["train-draft", "--smoke", "--out={ckpt_draft}"], 2, ["--overwrite"], ["ckpt_draft"]),
    (
        "draft-kd-nan",
        ["train-draft", "--tokens", "{nan_tokens}", "--out", "{ckpt_draft}", "--kd-weight", "nan"],
        2,
        ["--kd-weight", "finite"],
        ["ckpt_draft"],
    ),
    ("draft-kd-negative", ["train-draft", "--smoke", "--kd-weight", "-1"], 2, ["--kd-weight"], []),
    ("draft-lr-inf", ["train-draft", "--smoke", "--lr", "inf"], 2, ["--lr", "finite"], []),
    ("draft-window-zero", ["train-draft", "--smoke", "--window", "0"], 2, ["--window"], []),
    ("draft-seq-len-one", ["train-draft", "--seq-len", "1"], 2, ["--seq-len"], []),
    ("draft-max-seconds-zero", ["train-draft", "--smoke", "--max-seconds", "0"], 2, ["--max-seconds"], []),
    ("draft-no-data", ["train-draft", "--out", "{work}/d1"], 2, ["--text", "--tokens"], []),
    (
        "draft-text-and-tokens",
        ["train-draft", "--text", "{txt}", "--tokens", "{nan_tokens}"],
        2,
        ["--text", "--tokens"],
        [],
    ),
    (
        "draft-text-missing",
        ["train-draft", "--text", "{work}/notext", "--out", "{work}/d2"],
        2,
        ["--text", "notext"],
        [],
    ),
    (
        "draft-old-target",
        ["train-draft", "--target", "{work}/nomodel", "--tokens", "{nan_tokens}"],
        2,
        ["--target", "deprecated", "nomodel"],
        [],
    ),
    (
        "draft-model-truncated",
        ["train-draft", "--model", "{truncated}", "--text", "{txt}", "--out", "{work}/d3"],
        2,
        ["truncated/model.safetensors"],
        [],
    ),
    (
        "draft-seq-len-context",
        ["train-draft", "--model", str(EMBEDDED_TARGET), "--text", "{txt}", "--seq-len", "5000", "--out", "{work}/d4"],
        2,
        ["--seq-len", "4096"],
        [],
    ),
    (
        "draft-smoke-steps",
        ["train-draft", "--smoke", "--steps", "5", "--out", "{work}/d5"],
        2,
        ["--smoke", "--steps"],
        [],
    ),
    (
        "draft-nan-loss",
        ["train-draft", "--model", "{nan_target}", "--tokens", "{nan_tokens}", "--out", "{work}/nan_draft"]
        + SMALL_DRAFT_RUN,
        2,
        ["nan"],
        [],
    ),
    (
        "draft-bad-jsonl",
        ["train-draft", "--model", str(EMBEDDED_TARGET), "--text", "{bad_jsonl}", "--out", "{work}/d6"]
        + SMALL_DRAFT_RUN,
        2,
        ["bad.jsonl", "line 2"],
        [],
    ),
    (
        "draft-binary-text",
        ["train-draft", "--model", str(EMBEDDED_TARGET), "--text", "{binonly}", "--out", "{work}/d7"] + SMALL_DRAFT_RUN,
        2,
        ["binonly", "utf-8"],
        [],
    ),
    # found by an audit on 2026-12-07: each was a traceback, a late failure or lost data
    (
        "draft-overwrite-a-text-folder",
        ["train-draft", "--model", str(EMBEDDED_TARGET), "--text", "{corpus}", "--out", "{corpus}", "--overwrite"]
        + SMALL_DRAFT_RUN,
        2,
        ["--out", "not look like a checkpoint folder", "essay1.txt"],
        ["corpus"],
    ),
    ("bench-out-under-a-file", ["bench", "--out", "{short}/r.json"], 2, ["--out", "short.py is a file"], []),
    (
        "bench-out-is-the-plot",
        ["bench", "--out", "{work}/r.html", "--plot", "{work}/r.html"],
        2,
        ["--plot", "r.html"],
        [],
    ),
    ("bench-report-edited", ["bench", "--from-report", "{edited_report}"], 2, ["tokens_per_s", "not a number"], []),
    (
        "bench-batch-invariant-wide-tree",
        ["bench", "--device", "cpu", "--batch-invariant", "--tree-shape", "64", "64"],
        2,
        ["--batch-invariant", "129 nodes"],
        [],
    ),
    (
        "model-config-a-list",
        GEN + ["--model", "{listconfig}", "--method", "ar", "--prompt", "x"],
        2,
        ["config.json", "list"],
        [],
    ),
    (
        "model-config-without-vocab",
        GEN + ["--model", "{novocab}", "--method", "ar", "--prompt", "x"],
        2,
        ["config.json", "lacks the field 'vocab_size'"],
        [],
    ),
    (
        "model-tokenizer-damaged",
        GEN + ["--model", "{badtok}", "--method", "ar", "--prompt", "x", "--max-new-tokens", "2"],
        2,
        ["tokenizer", "badtok", "copy the tokenizer files again"],
        [],
    ),
    ("tree-empty-level", GEN + ["--tree-shape", "4,,16"], 2, ["--tree-shape", "empty level"], []),
    ("target-smoke-with-preset", ["train-target", "--smoke", "--preset", "llama3-8b"], 2, ["--smoke", "--preset"], []),
    (
        "report-with-unused-flags",
        ["bench", "--from-report", "{edited_report}", "--tree-shape", "2", "--num-prompts", "3"],
        2,
        ["--from-report", "--num-prompts", "--tree-shape", "unused"],
        [],
    ),
    ("tune-shortlist-alone", ["tune", "--shortlist", "5"], 2, ["--shortlist", "--every-position"], []),
    (
        "verify-chain-in-flags",
        GEN + ["--verify", "chain", "--temperature", "1", "--prompt", "x"],
        2,
        ["--method chain"],
        [],
    ),
    # lab, the top level
    ("lab-into-file", ["lab", "{short}", "--no-browser"], 2, ["short.py", "file"], []),
    ("lab-port-zero", ["lab", "--port", "0"], 2, ["--port"], []),
    ("no-command", [], 2, ["command"], []),
    ("unknown-command", ["generat"], 2, ["generat", "generate"], []),
    ("unknown-flag", ["generate", "--frobnicate"], 2, ["--frobnicate"], []),
]
if not HAS_CUDA:
    CASES.append(("device-cuda-absent", GEN + ["--device", "cuda", "--prompt", "x"], 2, ["--device", "cpu"], []))
if not HAS_KALEIDO:
    CASES.append(("bench-plot-png", ["bench", "--plot", "{work}/b.png"], 2, ["--plot", "kaleido", "b.html"], []))


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _setup(work: Path) -> dict:
    f = {"work": work}
    (work / "short.py").write_text("def add(a, b):\n")
    f["short"] = work / "short.py"
    (work / "long.py").write_text("".join(f"def f_{i}(a, b):\n    return a * {i} + b\n" for i in range(1500)))
    f["long"] = work / "long.py"
    (work / "latin1.txt").write_bytes("caf\u00e9 = 1\n".encode("latin-1"))
    f["latin1"] = work / "latin1.txt"
    (work / "empty.txt").write_text("")
    f["empty"] = work / "empty.txt"
    (work / "noconfig").mkdir()
    (work / "noconfig" / "README.md").write_text("not a model\n")
    f["noconfig"] = work / "noconfig"
    for name in ("badconfig", "truncated", "other", "ckpt_target"):
        shutil.copytree(EMBEDDED_TARGET, work / name)
        f[name] = work / name
    (work / "badconfig" / "config.json").write_text('{"model_type": "llama", ')
    (work / "pickled").mkdir()
    shutil.copy(EMBEDDED_TARGET / "config.json", work / "pickled" / "config.json")
    (work / "pickled" / "pytorch_model.bin").write_bytes(b"not unpickled")
    f["pickled"] = work / "pickled"
    weights = work / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for name in ("draft_truncated", "ckpt_draft"):
        shutil.copytree(EMBEDDED_DRAFT, work / name)
        f[name] = work / name
    d = work / "draft_truncated" / "draft.safetensors"
    d.write_bytes(d.read_bytes()[:1000])
    (work / "project" / "src").mkdir(parents=True)
    (work / "project" / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (work / "project" / "config.json").write_text("{}\n")
    f["project"] = work / "project"
    (work / "txt").mkdir()
    (work / "txt" / "a.py").write_text("".join(f"x_{i} = {i}\n" for i in range(300)))
    f["txt"] = work / "txt"
    (work / "binonly").mkdir()
    (work / "binonly" / "blob.bin").write_bytes(bytes(range(256)) * 4)
    f["binonly"] = work / "binonly"
    (work / "bad.jsonl").write_text('{"text": "def f(): pass"}\n{"text": oops}\n')
    f["bad_jsonl"] = work / "bad.jsonl"
    (work / "corpus").mkdir()  # someone's text, with an old draft beside it
    for i in range(3):
        (work / "corpus" / f"essay{i + 1}.txt").write_text("".join(f"line {j} of essay {i}\n" for j in range(200)))
    shutil.copy(EMBEDDED_DRAFT / "draft.safetensors", work / "corpus" / "draft.safetensors")
    f["corpus"] = work / "corpus"
    for name in ("listconfig", "novocab", "badtok"):
        shutil.copytree(EMBEDDED_TARGET, work / name)
        f[name] = work / name
    (work / "listconfig" / "config.json").write_text("[1, 2]")
    cfg = json.loads((EMBEDDED_TARGET / "config.json").read_text())
    del cfg["vocab_size"]
    (work / "novocab" / "config.json").write_text(json.dumps(cfg))
    (work / "badtok" / "tokenizer.json").write_text("")
    (work / "edited_report.json").write_text(json.dumps({"results": {"ar": {"tokens_per_s": None}}}))
    f["edited_report"] = work / "edited_report.json"
    # a target whose weights are NaN, and token files for it: the loss is NaN from the first step
    from longspec_lab.models.config import PRESETS
    from longspec_lab.models.loaders import save_hf
    from longspec_lab.models.target import Target

    torch.manual_seed(0)
    t = Target(PRESETS["tiny"])
    with torch.no_grad():
        t.model.embed_tokens.weight.fill_(float("nan"))
    save_hf(t, work / "nan_target", torch.float32)
    f["nan_target"] = work / "nan_target"
    (work / "nan_tokens").mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "heldout"):
        rng.integers(0, PRESETS["tiny"].vocab_size, 400).astype(np.uint16).tofile(work / "nan_tokens" / f"{split}.u16")
    f["nan_tokens"] = work / "nan_tokens"
    return f


SEPARATE = {"draft-nan-loss", "draft-bad-jsonl", "draft-binary-text", "target-smoke-existing", "device-mps"}

# one process, many command lines: main(argv) per case, as `python -m longspec_lab` runs it
DRIVER = r"""
import contextlib, io, json, sys, traceback
from longspec_lab.cli import main
results = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, out.getvalue(), err.getvalue()])
json.dump(results, sys.__stdout__)
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="200")
    return env


def _run(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "longspec_lab", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def _run_many(argvs, cwd) -> list:
    r = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps(argvs),
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return [SimpleNamespace(returncode=c, stdout=o, stderr=e) for c, o, e in json.loads(r.stdout)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad_input")
    files = _setup(work)
    before = {name: _digest(files[name]) for name in ("ckpt_target", "ckpt_draft", "project", "corpus")}
    argv = {cid: [a.format(**files) for a in args] for cid, args, *_ in CASES}
    together = [cid for cid in argv if cid not in SEPARATE]
    with ThreadPoolExecutor(max_workers=3) as pool:
        many = pool.submit(_run_many, [argv[cid] for cid in together], work)
        alone = {cid: pool.submit(_run, argv[cid], work) for cid in argv if cid in SEPARATE}
        done = dict(zip(together, many.result()))
        done.update({cid: f.result() for cid, f in alone.items()})
    return done, files, before, work


@pytest.mark.parametrize("cid, args, code, words, unchanged", CASES, ids=[c[0] for c in CASES])
def test_bad_input(results, cid, args, code, words, unchanged):
    done, files, before, work = results
    r = done[cid]
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert r.returncode == code, out
    assert r.stderr.count("error:") == 1, r.stderr
    msg = r.stderr.lower()
    for w in words:
        assert w.format(**files).lower() in msg, (w, r.stderr)
    for name in unchanged:
        assert _digest(files[name]) == before[name], f"{name} changed"
    assert not list(work.glob(".*partial*")), "a half-written checkpoint was left behind"


def test_expected_errors_are_one_line(results):
    """`error: <what>; <fix>`: one line on stderr (warnings for deprecated spellings aside)."""
    done = results[0]
    for cid, r in done.items():
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and ";" in lines[0], (cid, r.stderr)


def test_nothing_written_by_failed_training(results):
    _, files, _, work = results
    for name in ("nan_draft", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "t1", "t2"):
        assert not (work / name).exists(), name
    assert not [p for p in work.iterdir() if p.name.startswith(("draft-", "target-", "smoke-"))]
    assert not (work / "b.html").exists() and not (work / "b.png").exists()


def test_debug_shows_the_traceback(tmp_path):
    r = _run(["generate", "--debug", "--prompt-file", str(tmp_path), "--method", "ar"], tmp_path)
    assert r.returncode == 1 and "Traceback" in r.stderr and "UsageError" in r.stderr


def test_truncated_checkpoint_is_named_even_past_the_header(tmp_path):
    """A header that promises more bytes than the file holds is caught without reading the tensors."""
    shutil.copytree(EMBEDDED_TARGET, tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1])
    r = _run(GEN + ["--model", str(tmp_path / "m"), "--method", "ar", "--prompt", "x"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(w) in r.stderr and "truncated" in r.stderr


def test_config_is_json_but_nonsense(tmp_path):
    shutil.copytree(EMBEDDED_TARGET, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": "many"}))
    r = _run(GEN + ["--model", str(tmp_path / "m"), "--method", "ar", "--prompt", "x"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "error:" in r.stderr


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`longspec-lab bench --from-report R | head`, where the reader has gone before the table is written (here
    `true`, which reads nothing): no error message, status 0, as for other command-line tools."""
    from longspec_lab.paths import RESULTS_DIR

    report = RESULTS_DIR / "e2e_h100.json"
    cmd = f"set -o pipefail; {sys.executable} -m longspec_lab bench --from-report {report} | true"
    r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stderr)
