"""bench/compile_watch.py: the folded stack, the watchdog's samples, and the command line's errors."""

import json
import random
import re
import time

import pytest

from longspec_lab.bench import compile_watch as cw


def _unfold(folded: list[str]) -> list[str]:
    """The inverse of fold, written independently: each `... the N frames above, R times in all` line repeats the
    N lines before it R - 1 more times."""
    out: list[str] = []
    for line in folded:
        m = re.fullmatch(r"\.\.\. the (\d+) frames? above, (\d+) times in all", line)
        if m:
            n, r = int(m.group(1)), int(m.group(2))
            out += out[-n:] * (r - 1)
        else:
            out.append(line)
    return out


def test_fold_writes_each_repeated_block_once_and_loses_nothing():
    assert cw.fold(list("abcdcdcdefffg")) == [
        "a", "b", "c", "d", "... the 2 frames above, 3 times in all", "e", "f", "... the 1 frame above, 3 times in all",
        "g",
    ]  # fmt: skip
    rng = random.Random(0)
    for _ in range(300):  # random stacks with recursions of random periods inside: fold, then unfold, is the stack
        frames: list[str] = []
        while len(frames) < 60:
            if rng.random() < 0.3:
                block = [rng.choice("pqrstu") for _ in range(rng.randint(1, 5))]
                frames += block * rng.randint(2, 9)
            else:
                frames.append(rng.choice("abcdefgh"))
        folded = cw.fold(frames)
        assert _unfold(folded) == frames
        assert len(folded) <= len(frames)


def test_fold_shortens_a_deep_recursion_to_its_block():
    frames = ["main", "compile"] + ["str_helper", "indent", "__str__"] * 40 + ["prefixed_lines"]
    assert cw.fold(frames) == [
        "main", "compile", "str_helper", "indent", "__str__", "... the 3 frames above, 40 times in all",
        "prefixed_lines",
    ]  # fmt: skip


def _deep(n: int, seconds: float) -> None:
    if n:
        return _deep(n - 1, seconds)
    time.sleep(seconds)


def test_the_watchdog_samples_a_call_that_outlives_its_limit():
    fired = []
    report = cw.watch(lambda: _deep(30, 1.5), after=0.3, gap=0.3, on_fire=fired.append)
    assert report["finished"] and report["seconds"] >= 1.5
    assert len(report["samples"]) == 2 and fired == [report]
    folded = report["samples"][0]["folded"]
    deep = [i for i, line in enumerate(folded) if line.endswith("in _deep")]
    assert len(deep) == 2, folded  # the recursive call written once, then the innermost call (asleep, another line)
    assert folded[deep[0] + 1] == "... the 1 frame above, 30 times in all" and deep[1] == deep[0] + 2 == len(folded) - 1
    assert any("test_the_watchdog_samples" in line for line in folded[: deep[0]])  # the caller above it
    assert report["samples"][0]["frames"] > 31


def test_the_watchdog_stays_quiet_when_the_call_ends_in_time():
    report = cw.watch(lambda: None, after=5.0, on_fire=lambda r: pytest.fail("fired"))
    assert report["finished"] and report["samples"] == [] and report["seconds"] < 5.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "GREEDY_ACCEPT=on"], "is not LONGSPEC_X=value"),
        (["--set", "LONGSPEC_GREEDY_ACCEPT"], "is not LONGSPEC_X=value"),
        (["--shape", "4,x"], "is not comma-separated widths"),
        (["--after", "0"], "--after must be positive"),
        (["--stage", "draft9", "--device", "cpu"], "no stage 'draft9'"),
    ],
)
def test_the_command_line_names_each_mistake(args, message, tmp_path, capsys):
    out = tmp_path / "watch.json"
    with pytest.raises(SystemExit) as e:
        cw.main([*args, "--out", str(out)])
    assert e.value.code == 2 and message in capsys.readouterr().err and not out.exists()


def test_an_existing_report_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "watch.json"
    out.write_text(json.dumps({"kept": True}))
    with pytest.raises(SystemExit) as e:
        cw.main(["--out", str(out)])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    assert json.loads(out.read_text()) == {"kept": True}


def test_ir_printers_name_the_caller_of_each_outermost_print(tmp_path):
    """In a fresh process (the wrapping lasts as long as the process): a custom op's implicit fallback logs its
    arguments at INFO, printing an IR node; the record names that caller (Inductor's operator_str) once, with the
    nested prints inside it not recorded again."""
    import subprocess
    import sys

    path = tmp_path / "printers.jsonl"
    code = f"""
import logging, torch
from torch._inductor import config
from longspec_lab.bench.compile_watch import record_ir_printers
record_ir_printers({str(path)!r})
f = torch.library.custom_op(
    "longspec_test::plus_one_watch", lambda x: x + 1, mutates_args=(), schema="(Tensor x) -> Tensor"
)
f.register_fake(lambda x: torch.empty_like(x))
logging.basicConfig(level=logging.WARNING)
logging.getLogger("torch._inductor.graph").setLevel(logging.INFO)
x = torch.arange(6.0)
with config.patch(fx_graph_cache=False):
    torch.compile(lambda: torch.ops.longspec_test.plus_one_watch(x * 2) * 3)()
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    callers = [r for r in records if any("operator_str" in f for f in r["frames"])]
    assert callers and callers[0]["type"] == "MutableBox"  # TensorBox prints as its base class does
    assert any(f.endswith("in call_function") for f in callers[0]["frames"])  # the lowering that asked
    assert len(records) == len({tuple(r["frames"][-8:]) for r in records})  # each caller once
