"""How well does each acceptance model of the tree-shape tuner predict the tau the decoder measures?

For a few shapes, on the same prompts and the same number of new tokens, this compares
  * `rank`: the tuner's default, sibling ranks on the probe's own steps (`bench.tune.expected_accept`);
  * `nested_steps`: the nested beam on the probe's own steps (`step_accepts_nested`, averaged);
  * `exact`: the nested beam at every position, replayed along the decoder's walk (`position_accepts` +
    `renewal_tau`, what `longspec-lab tune --every-position` uses);
with the tau measured by running each shape. In float32 `exact` equals the measurement; the other two
show how far the probe's step positions and the sibling-rank bound move the estimate.

    python -m longspec_lab.bench.acceptance_check --out data/results/tune_acceptance_cpu.json

Taught in: notebooks/02_tree_shapes.ipynb (the tuner).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

DEFAULT_SHAPES = "1,1,1,1,1;1,1,1,1,1,1,1;4,16,16,16,16;1,2,4,4,4,4,4;2,12,12,8,4,1,1;1,2,3,3,3,3,3;2,4,8,8,8,8;2,6,4,8"


def check(target, draft, prompts, probe_shape, shapes, n_tokens, progress=True) -> dict:
    """The three predictions and the measured tau of each shape (module docstring)."""
    from tqdm.auto import tqdm

    from longspec_lab.bench import tune
    from longspec_lab.decoding.eager import SpecDecoder
    from longspec_lab.spec.tree import TreeShape

    probe = TreeShape.of(list(probe_shape))
    dec = SpecDecoder(target, draft)
    bar = tqdm(total=len(prompts) * n_tokens + len(shapes), disable=not progress, desc="acceptance check")
    t0 = time.perf_counter()
    trace = []
    for ids in prompts:  # the probe's own steps, as `tune` records them
        trace += dec.generate(ids, method="tree", tree_shape=probe, max_new_tokens=n_tokens, trace=True,
                              stop_at_eos=False).trace  # fmt: skip
        bar.update()
    ranks = tune.path_ranks(trace, probe.depth)
    rank = tune.expected_accept(ranks, shapes)
    nested = tune.step_accepts_nested(tune.probe_parents(trace, probe.depth), ranks, shapes).double().mean(-1)
    probe_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = tune.renewal_tau(tune.position_accepts(dec, prompts, probe, shapes, n_tokens, bar), n_tokens)
    every_position_seconds = time.perf_counter() - t0
    rows = []
    for i, shape in enumerate(shapes):
        measured = tune.measure(dec, prompts, shape, n_tokens)["tau"]
        bar.update()
        rows.append({"shape": shape, "measured_tau": measured, "rank": float(rank[i]),
                     "nested_steps": float(nested[i]), "exact": float(exact[i])})  # fmt: skip
    bar.close()
    err = {m: max(abs(r[m] - r["measured_tau"]) for r in rows) for m in ("rank", "nested_steps", "exact")}
    return {"probe_shape": list(probe.widths), "probe_steps": len(trace), "n_tokens": n_tokens,
            "num_prompts": len(prompts), "rows": rows, "max_abs_error": err, "probe_seconds": probe_seconds,
            "every_position_seconds": every_position_seconds}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.bench.acceptance_check",
        description="Compare the tree-shape tuner's acceptance models (probe-step sibling ranks, the nested beam on "
        "probe steps, and the exact every-position walk) with the tau the decoder measures, shape by shape, on "
        "the embedded pair (or --model/--draft).",
    )
    ap.add_argument("--model", default=None, help="target checkpoint folder (default: the embedded model)")
    ap.add_argument("--draft", default=None, help="draft checkpoint folder (default: the embedded draft)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (float32 on the CPU is where 'exact' is exact)")
    ap.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    ap.add_argument("--num-prompts", type=int, default=2, help="held-out prompts (default 2)")
    ap.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length in tokens (default 1024)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    ap.add_argument("--probe-shape", default="8,16,16,16,16,16,16", help="the wide probe tree (default %(default)s)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="';'-separated shapes to check (default: 8 shapes)")
    ap.add_argument("--out", default=None, help="write the report (JSON, with the environment) here; must not exist")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    try:
        probe = [int(w) for w in a.probe_shape.split(",")]
        shapes = [[int(w) for w in s.split(",")] for s in a.shapes.split(";") if s]
    except ValueError:
        ap.error("--probe-shape and --shapes take comma-separated widths (shapes separated by ';')")
    too_big = [s for s in shapes if len(s) > len(probe) or any(w > p for w, p in zip(s, probe))]
    if too_big:
        ap.error(f"shapes {too_big} do not fit inside --probe-shape {probe}: widen or deepen the probe")
    if min(a.num_prompts, a.prompt_tokens, a.new_tokens) < 1 or a.new_tokens < 2:
        ap.error("--num-prompts, --prompt-tokens need >= 1 and --new-tokens >= 2")
    if a.out and os.path.exists(a.out):
        ap.exit(2, f"error: {a.out} exists; pick another --out or remove it first\n")
    from longspec_lab.models.pair import load_pair
    from longspec_lab.paths import load_prompts
    from longspec_lab.provenance import stamp, write_new_json

    target, draft, tok = load_pair(a.model, a.draft, a.device, a.dtype)
    prompts = [tok.encode(p["text"])[: a.prompt_tokens] for p in load_prompts(min_tokens=1000)][: a.num_prompts]
    torch.manual_seed(0)
    rep = check(target, draft, prompts, probe, shapes, a.new_tokens, progress=not a.quiet)
    print(f"{'shape':<26}{'measured':>9}{'rank':>7}{'nested':>8}{'exact':>7}")
    for r in rep["rows"]:
        print(f"{json.dumps(r['shape']):<26}{r['measured_tau']:>9.3f}{r['rank']:>7.3f}{r['nested_steps']:>8.3f}"
              f"{r['exact']:>7.3f}")  # fmt: skip
    print("max |error|: " + ", ".join(f"{m} {e:.3f}" for m, e in rep["max_abs_error"].items()))
    if a.out:
        write_new_json(a.out, stamp(rep, target.device, target.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
