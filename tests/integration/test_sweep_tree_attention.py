"""The latency sweep's CPU dry run: every plan it would time (split counts, row tiles, fused or launched
merge, split-by-split or all-at-once merge) runs under the Triton interpreter and matches the float64
reference; the report is written once."""

import json
import os
import subprocess
import sys

import pytest


def test_sweep_dry_run_checks_every_plan(tmp_path):
    out = tmp_path / "sweep.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "longspec_lab.kernels.sweep_tree_attention", "--out", str(out)]
    r = subprocess.run(cmd + ["--shapes", "embedded-decode,embedded-verify"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert set(rep["shapes"]) == {"embedded-decode", "embedded-verify"}
    assert rep["merge_elems_default"] > 0
    for rec in rep["shapes"].values():
        variants = rec["variants"]
        assert {v["merge_elems"] for v in variants} == {8192, 2048}  # stage 0: both vector-merge tiles
        forced = {v["loop_asked"]: v["loop_merge"] for v in variants if v["loop_asked"] != "auto"}
        assert forced == {"1": True, "0": False}  # stage 0: both merge forms, forced
        assert {v["BLOCK_M"] for v in variants} == {16, 64} and any(v["n_splits"] > 1 for v in variants)
        assert all("error" not in v and v["max_abs_err"] < 1e-4 for v in variants)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)  # never overwrites
    assert again.returncode == 2 and "exists" in again.stderr


TILES = "row tiles from (16, 32, 64, 128)"


@pytest.mark.parametrize(("arg", "says"), [("--shapes=nope", "unknown shape"), ("--block-m=16,24", TILES),
                                           ("--block-m=x", TILES)])  # fmt: skip
def test_sweep_rejects_bad_arguments(arg, says):
    r = subprocess.run([sys.executable, "-m", "longspec_lab.kernels.sweep_tree_attention", arg],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr
