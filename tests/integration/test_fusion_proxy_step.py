"""The CPU count of a decoding step's GPU kernels (bench/fusion_proxy.py, each run in a fresh process as its command
line runs it) against the H200's own profile, and what the one-launch beam selection (LONGSPEC_BEAM_SELECT) and its
writing of the level (LONGSPEC_BEAM_WRITE) take out of a tree level."""

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


def test_the_one_launch_selection_takes_out_one_kernel_and_writing_the_level_two_more():
    """From the second level on: the selection in the compiled definition (LONGSPEC_BEAM_SELECT=off) is as many
    generated kernels as the H200 launched, plus flat_topk's two launches; the one-launch selection takes out the
    keys kernel; and the selection writing the level (LONGSPEC_BEAM_WRITE, the default) takes out the two kernels
    of add_level after it. Nothing changes in the verify or the commit. The greedy tail in one launch (the default)
    takes the verify's argmax and the five kernels of acceptance after it out, for one launch of its own, and
    changes nothing else."""
    off, select, write, tail_off = _proxies(
        ("--shape", "4,16,16", "--set", "LONGSPEC_BEAM_SELECT=off"),
        ("--shape", "4,16,16", "--set", "LONGSPEC_BEAM_WRITE=off"),
        ("--shape", "4,16,16"),  # the defaults, as on the GPU
        ("--shape", "4,16,16", "--set", "LONGSPEC_GREEDY_ACCEPT=off"),
    )
    for stage in ("draft1", "draft2", "draft3", "commit"):
        assert tail_off[stage] == write[stage]
    tail_on = {**write["verify"], "ours": dict(write["verify"]["ours"])}
    assert tail_on["ours"].pop("longspec.greedy_accept.default") == 1
    assert tail_on["ours"] == tail_off["verify"]["ours"]
    assert tail_off["verify"]["generated"] - tail_on["generated"] == 6
    for level in ("draft2", "draft3"):
        assert off[level]["generated"] == _generated_on_the_h200("tree-4-16-16-16-16", level)
        assert select[level]["generated"] == off[level]["generated"] - 1  # the keys kernel
        assert write[level]["generated"] == select[level]["generated"] - 2  # add_level's tokens and mask rows
        assert off[level]["ours"].pop("longspec.flat_topk.default") == 1  # two launches
        assert select[level]["ours"].pop("longspec.beam_select.default") == 1  # one
        assert write[level]["ours"].pop("longspec.beam_select_into.default") == 1  # the same one, writing
        assert select[level]["ours"] == off[level]["ours"] == write[level]["ours"]
    assert write["draft1"] == select["draft1"]  # level 1 keeps add_level (module docstring of ops/topk.py)
    for stage in ("verify", "commit"):
        assert off[stage] == select[stage] == write[stage]
