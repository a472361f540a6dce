"""The CPU count of a decoding step's GPU kernels (bench/fusion_proxy.py, each run in a fresh process as its command
line runs it) against the H200's own profile, and what the one-launch beam selection (LONGSPEC_BEAM_SELECT) takes
out of a tree level."""

import json
import subprocess
import sys
from pathlib import Path

# the H200's profile of the same code with the one-launch selection and combo kernels off (the proxy models neither
# Inductor's combo grouping nor, with LONGSPEC_BEAM_SELECT=off, the selection kernel)
RECORD = Path(__file__).resolve().parents[2] / "data" / "results" / "profile_ab_base_beam_h200.json"


def _proxies(*runs: tuple[str, ...]) -> list[dict]:
    """The proxy's counts for each argument list, the processes side by side (each compiles for ~30 s on one core)."""
    cmd = [sys.executable, "-m", "longspec_lab.bench.fusion_proxy", "--json"]
    procs = [subprocess.Popen([*cmd, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in runs]
    done = [(p, *p.communicate(timeout=600)) for p in procs]  # every process ends before any assertion
    for p, _, stderr in done:
        assert p.returncode == 0, stderr[-3000:]
    return [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in done]


def _proxy(*args: str) -> dict:
    return _proxies(args)[0]


def _generated_on_the_h200(method: str, stage: str) -> int:
    kernels = json.loads(RECORD.read_text())[method]["stages"][stage]["kernels_in_order"]
    return sum(name.startswith("triton_") for name, _ in kernels)


def test_the_ar_step_counts_the_kernels_the_h200_launched():
    """The proxy's Inductor kernels are the profile's triton_ ones, and our ops are the profile's other kernels (the
    tree op launches a split and a merge)."""
    got = _proxy("--shape", "ar")["verify"]
    assert got["generated"] == _generated_on_the_h200("ar", "verify")
    ours = got["ours"]
    launches = sum(ours.values()) + ours["longspec.tree_attention_packed.default"]  # + the merges
    kernels = json.loads(RECORD.read_text())["ar"]["stages"]["verify"]["kernels_in_order"]
    assert launches == sum(not name.startswith("triton_") for name, _ in kernels)


def test_the_one_launch_selection_takes_two_kernels_out_of_every_later_level():
    # on: the default, as on the GPU
    off, on = _proxies(("--shape", "4,16,16", "--set", "LONGSPEC_BEAM_SELECT=off"), ("--shape", "4,16,16"))
    for level in ("draft2", "draft3"):
        assert off[level]["generated"] == _generated_on_the_h200("tree-4-16-16-16-16", level)
        assert on[level]["generated"] == off[level]["generated"] - 1  # the keys kernel
        assert off[level]["ours"].pop("longspec.flat_topk.default") == 1  # two launches
        assert on[level]["ours"].pop("longspec.beam_select.default") == 1  # one
        assert on[level]["ours"] == off[level]["ours"]
    assert on["verify"] == off["verify"] and on["commit"] == off["commit"]
