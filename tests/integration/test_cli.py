"""The command line's conventions: --version, `python -m longspec_lab`, --help for every subcommand,
`lab` (copies notebooks without replacing edited ones, starts JupyterLab), old flag spellings, and
bench --plot naming the file it wrote."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from longspec_lab import __version__
from longspec_lab.cli import build_parser, main
from longspec_lab.paths import notebooks_dir

SUBCOMMANDS = ("generate", "demo", "bench", "tune", "train-target", "train-draft", "lab")


def _cli(*args, cwd=None, timeout=300):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", COLUMNS="120")
    return subprocess.run(
        [sys.executable, "-m", "longspec_lab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_version_and_python_dash_m():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"longspec-lab {__version__}"
    r = _cli("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: longspec-lab")
    for name in SUBCOMMANDS:
        assert name in r.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_explains_itself(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: longspec-lab {name}")
    assert re.search(r"\(default: [^)]*\)\s*\(default", out) is None  # each default shown once
    assert "default: None" not in out and "python -m" not in out.split("\n")[0]
    assert "--debug" in out


def test_one_flag_vocabulary():
    """The same flag names where the same thing is meant, and the old spellings hidden but accepted."""
    sub = build_parser()._subparsers._group_actions[0].choices
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.items()}
    for name in ("generate", "demo", "bench", "tune"):
        assert {"--model", "--draft", "--max-new-tokens", "--quiet", "--device", "--dtype"} <= flags[name]
    assert {"--model", "--tokens", "--text", "--quiet", "--out", "--overwrite"} <= flags["train-draft"]
    assert {"--tokens", "--quiet", "--out", "--overwrite"} <= flags["train-target"]
    assert "--tree-shape" in flags["generate"] and "--tree-shape" in flags["demo"] and "--tree-shape" in flags["bench"]
    old = {"train-draft": ["--target", "--no-progress"], "train-target": ["--tokens-dir"], "tune": ["--new-tokens"]}
    old["bench"] = ["--shapes"]
    for name, spellings in old.items():
        assert set(spellings) <= flags[name]
        helptext = sub[name].format_help()
        assert not any(re.search(rf"{s}\b", helptext) for s in spellings), (name, spellings)


def test_old_spellings_still_work(capsys):
    args = build_parser().parse_args(["bench", "--shapes", "4,16;8,16", "--gammas", "4,5"])
    assert args.tree_shapes == [[4, 16], [8, 16]] and args.gammas == [4, 5]
    assert "--shapes is deprecated; use --tree-shape" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "--tree-shape", "4", "16", "--tree-shape", "8,16"])
    assert args.tree_shapes == [[4, 16], [8, 16]]
    args = build_parser().parse_args(["tune", "--new-tokens", "32", "--probe-shape", "8,8,8"])
    assert args.max_new_tokens == 32 and args.probe_shape == [8, 8, 8]
    args = build_parser().parse_args(["train-draft", "--target", "m", "--no-progress"])
    assert args.model == "m" and args.quiet is True
    args = build_parser().parse_args(["train-target", "--tokens-dir", "t"])
    assert args.tokens == "t"
    err = capsys.readouterr().err
    for s in ("--new-tokens", "--target", "--no-progress", "--tokens-dir"):
        assert f"{s} is deprecated" in err


def test_smoke_flags_match_the_trainers():
    """The CLI refuses flags that --smoke sets itself; its lists follow the trainers' SMOKE settings."""
    from longspec_lab.cli import DRAFT_SMOKE_FLAGS, TARGET_SMOKE_FLAGS
    from longspec_lab.train.draft import SMOKE as DRAFT_SMOKE
    from longspec_lab.train.target import SMOKE as TARGET_SMOKE

    assert set(DRAFT_SMOKE_FLAGS) == set(DRAFT_SMOKE)
    assert set(TARGET_SMOKE_FLAGS) == set(TARGET_SMOKE) - {"max_eval_windows"}


def test_lab_copies_notebooks_and_starts_jupyterlab(tmp_path):
    shipped = sorted(p.name for p in notebooks_dir().glob("*.ipynb"))
    assert shipped
    work = tmp_path / "nb"
    work.mkdir()
    edited = work / shipped[0]
    edited.write_text('{"my": "edits"}')
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"))
    p = subprocess.Popen(
        [sys.executable, "-m", "longspec_lab", "lab", str(work), "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    seen = ""
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "http://" not in seen:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                break
            seen += line
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=30)
    assert "copied" in seen and "kept 1 you already had" in seen, seen
    assert "http://" in seen and "Traceback" not in seen, seen
    assert edited.read_text() == '{"my": "edits"}'  # the user's copy is never replaced
    assert sorted(q.name for q in work.glob("*.ipynb")) == shipped
    for name in shipped[1:]:
        assert (work / name).read_bytes() == (notebooks_dir() / name).read_bytes()


def test_bench_plot_says_which_file_it_wrote(tmp_path):
    args = ["bench", "--device", "cpu", "--no-hf", "--eager", "--num-prompts", "1", "--min-prompt-tokens", "300"]
    args += ["--max-new-tokens", "4", "--tree-shape", "2", "2", "--gammas", "1", "--quiet"]
    args += ["--plot", "fig.html", "--out", "r.json"]
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote the figure to fig.html" in r.stdout and "wrote the report to r.json" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.html", "r.json"]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(rep["results"]) == {"ar", "chain-g1", "tree-2-2"}
    # the tree against the chains: no chain of its depth (2) here, so only the fastest chain's ratio
    vs_chain = rep["tree_vs_chain"]
    assert vs_chain["best_chain"] == "chain-g1" and vs_chain["trees"]["tree-2-2"]["chain"] is None
    assert "trees against chains (best chain: chain-g1):" in r.stdout and "tree-2-2" in r.stdout
    r = _cli(*args, cwd=tmp_path)  # the report exists now: refused without --overwrite
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr


def test_bench_from_report_prints_a_recorded_run_without_running(tmp_path, capsys):
    """`bench --from-report` on a recorded H100 run: the table's tokens/s and each tree against its chains, as the
    report's numbers give them (no model loaded); --plot writes the figure; bad input is one line, status 2."""
    from longspec_lab.paths import RESULTS_DIR

    record = RESULTS_DIR / "e2e_h100.json"
    rep = json.loads(record.read_text())
    assert main(["bench", "--from-report", str(record), "--plot", str(tmp_path / "f.html")]) == 0
    out = capsys.readouterr().out
    tps = rep["results"]["tree-1-2-4-4-4-4-4"]["tokens_per_s"]
    assert re.search(rf"^tree-1-2-4-4-4-4-4\s+{tps:.1f}\s", out, re.M), out
    best = max((n for n in rep["results"] if n.startswith("chain-")), key=lambda n: rep["results"][n]["tokens_per_s"])
    assert f"trees against chains (best chain: {best}):" in out and "at its cost" in out
    assert f"wrote the figure to {tmp_path / 'f.html'}" in out and (tmp_path / "f.html").is_file()
    (tmp_path / "bad.json").write_text('{"results": {"ar": {"tau": 1}}}')
    for args, said in (
        (["--from-report", str(tmp_path / "missing.json")], "no such report"),
        (["--from-report", str(tmp_path / "bad.json")], "has no end-to-end results"),
        (["--from-report", str(record), "--out", str(tmp_path / "o.json")], "drop --out"),
    ):
        r = _cli("bench", *args)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o.json").exists()


def test_progress_line_leaves_the_output_alone(monkeypatch):
    """generate/demo count target passes with a forward hook; on a terminal the bar is live, and the
    model's output must come through unchanged (a hook that returns a value would replace it)."""
    import io

    import torch

    from longspec_lab.cli import _Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with _Progress(lin, "tree", quiet=False) as p:
        assert not p.bar.disable
        outs = [lin(x) for _ in range(3)]
    assert all(torch.equal(o, lin(x)) for o in outs) and p.bar.n == 3
    with _Progress(lin, "tree", quiet=True) as p:
        lin(x)
    assert p.bar.disable and not lin._forward_hooks  # hooks removed afterwards


def test_tune_on_a_recording_prints_its_shapes_predicted_against_measured(tmp_path, capsys):
    """`tune --latency-from` on the H200 record: the fit, the search, then every recorded chain and tree under the
    same models next to its measured tokens/s and tau, and the report names the prompts it tuned on."""
    from longspec_lab.bench.tune import recorded_rows
    from longspec_lab.paths import RESULTS_DIR

    record = RESULTS_DIR / "e2e_h200.json"
    out = tmp_path / "tune.json"
    code = main(["tune", "--device", "cpu", "--latency-from", str(record), "--num-prompts", "1", "--prompt-tokens",
                 "200", "--max-new-tokens", "12", "--probe-shape", "4,16,16,16,16,16,16", "--max-depth", "3",
                 "--max-nodes", "40", "--out", str(out), "--quiet"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "predicted here against measured there" in text
    rep, rows = json.loads(out.read_text()), recorded_rows(json.loads(record.read_text()))
    probe = [4, 16, 16, 16, 16, 16, 16]
    outside = {k for k in rows if len(json.loads(k)) > len(probe) or any(w > p for w, p in zip(json.loads(k), probe))}
    assert set(rep["recorded_predicted"]) == set(rows) - outside and len(rows) - len(outside) >= 4
    assert set(rep["recorded_outside_probe"]) == outside  # e.g. the record's chain gamma 9, deeper than the probe
    for key, row in rows.items():
        line = next(ln for ln in text.splitlines() if ln.startswith(key))
        assert f"{row['tokens_per_s']:.1f}" in line and f"{row['tau']:.2f}" in line
        assert ("not predicted" in line) == (key in outside)
    assert [p["tokens"] for p in rep["prompts"]] == [200] and rep["prompts"][0]["name"]


def test_the_demo_reads_its_table_as_tau_over_step_cost(monkeypatch, tmp_path):
    """The demo's closing lines split each speedup into tau and the cost of one step in AR steps (the prefill aside),
    from the results themselves; with a recorded GPU run for the same tree they add its figures, and without one they
    say nothing about a GPU."""
    from types import SimpleNamespace

    import longspec_lab.paths as paths
    from longspec_lab.cli import _demo_reading

    def res(wall, prefill, calls, tau, shape=None):
        return SimpleNamespace(wall_seconds=wall, stage_seconds={"prefill": prefill}, target_calls=calls, tau=tau,
                               tree_shape=shape)  # fmt: skip

    rows = [("ar", res(2.5, 0.5, 101, 1.0)), ("chain", res(1.5, 0.5, 21, 4.0)),
            ("tree", res(1.0, 0.5, 6, 5.0, [4, 16, 16, 16, 16]))]  # fmt: skip
    # AR: 2.0 s over 100 steps = 0.02 s a step; chain 1.0 s / 20 = 0.05 (2.5 AR steps); tree 0.5 s / 5 = 0.1 (5)
    lines = _demo_reading(rows, "cpu")
    assert "  chain: 4.00 / 2.50 = 1.60x" in lines and "  tree: 5.00 / 5.00 = 1.00x" in lines, lines
    rec = json.loads((paths.RESULTS_DIR / "e2e_h200.json").read_text())["results"]
    r = rec["tree-4-16-16-16-16"]
    step = r["tau"] * rec["ar"]["tokens_per_s"] / r["tokens_per_s"]  # its step in AR steps, from the two rates
    text = "\n".join(lines)
    assert f"costs {step:.2f} AR steps" in text and f"{r['speedup_vs_ar']:.2f}x" in text, text
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path)  # no record: no GPU line
    assert "H200" not in "\n".join(_demo_reading(rows, "cpu"))
