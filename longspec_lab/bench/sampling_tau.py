"""Tau of every verification rule at temperatures 0.5 and 1.0 on the held-out long prompts.

    python -m longspec_lab.bench.sampling_tau --out sampling_tau.json            # GPU
    python -m longspec_lab.bench.sampling_tau --device cpu --prompts 3 --max-new-tokens 128 \\
        --out sampling_tau_cpu.json

Rows: "greedy" at temperature 0 (the reference), then for each temperature the lossless sampling
rules "target-sample" (beam tree), "rrs" (sampled tree), "chain" (sampled chain of gamma) and the
BIASED "naive-topk" (min(1, p/q) on beam siblings, as the LongSpec reference code does; arXiv
2502.17421). naive-topk's tau is recorded for comparison only: its output is
not a sample of the target's distribution (tests/unit/spec/test_sampling_exact.py rejects it), so its tau is
not an achievable speed-up. tau = generated tokens / target forward passes (prefill included),
summed over the prompts; acceptance rates are by depth and by sibling rank (GenerationResult).

Taught in: notebooks/06_sampling_without_bias.ipynb
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

from longspec_lab.paths import load_prompts
from longspec_lab.provenance import environment
from longspec_lab.spec.tree import DEFAULT_TREE_SHAPE, TreeShape, check_tree_limits

RULES = (("target-sample", "tree"), ("rrs", "tree"), ("chain", "chain"), ("naive-topk", "tree"))
BIASED = {
    "naive-topk": "BIASED: min(1, p/q) on deterministic top-k siblings; not a valid sampler, "
    "tau shown for comparison only"
}


def _ratio(a, t):
    return [x / y if y else None for x, y in zip(a, t)]


def _add(tot: list[int], new: list[int]) -> None:
    tot.extend([0] * (len(new) - len(tot)))
    for i, c in enumerate(new):
        tot[i] += c


def measure_tau(
    dec,
    prompts: list[list[int]],
    temperatures=(0.5, 1.0),
    rules=RULES,
    max_new_tokens=128,
    tree_shape=DEFAULT_TREE_SHAPE,
    gamma=4,
    seed=0,
    top_k=None,
    top_p=None,
) -> list[dict]:
    """One row per (rule, method, temperature), greedy at 0 first; runs are seeded per prompt."""
    runs = [("greedy", "tree", 0.0)] + [(r, m, float(t)) for t in temperatures for r, m in rules]
    rows = []
    for rule, method, temp in runs:
        tokens = calls = 0
        d_try, d_acc, r_try, r_acc, per_prompt = [], [], [], [], []
        t0 = time.perf_counter()
        for i, ids in enumerate(prompts):
            res = dec.generate(
                ids,
                method=method,
                verify=rule,
                temperature=temp,
                top_k=top_k,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                tree_shape=tree_shape,
                gamma=gamma,
                seed=seed + i,
                stop_at_eos=False,
            )
            tokens, calls = tokens + len(res.new_tokens), calls + res.target_calls
            for tot, new in (
                (d_try, res.depth_tried),
                (d_acc, res.depth_accepted),
                (r_try, res.rank_tried),
                (r_acc, res.rank_accepted),
            ):
                _add(tot, new)
            per_prompt.append(round(res.tau, 4))
        rows.append(
            {
                "rule": rule,
                "method": method,
                "temperature": temp,
                "top_k": top_k,
                "top_p": top_p,
                "tree_shape": list(TreeShape.of(tree_shape).widths) if method == "tree" else None,
                "gamma": gamma if method == "chain" else None,
                "tau": tokens / calls,
                "tau_per_prompt": per_prompt,
                "new_tokens": tokens,
                "target_calls": calls,
                "acceptance_by_depth": _ratio(d_acc, d_try),
                "acceptance_by_rank": _ratio(r_acc, r_try),
                "depth_tried": d_try,
                "rank_tried": r_try,
                "lossless": rule not in BIASED,
                "note": BIASED.get(rule, ""),
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'rule':<15}{'method':<8}{'T':>5}{'tau':>7}   acceptance by depth"]
    for r in rows:
        acc = " ".join("-" if a is None else f"{a:.2f}" for a in r["acceptance_by_depth"])
        lines.append(
            f"{r['rule']:<15}{r['method']:<8}{r['temperature']:>5.2f}{r['tau']:>7.2f}   {acc}"
            + ("   (biased)" if not r["lossless"] else "")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.bench.sampling_tau",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--prompts", type=int, default=None, help="number of held-out prompts (default: all that fit)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="tokens per run (default: 256)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 1.0], help="default: 0.5 1.0")
    ap.add_argument("--tree-shape", type=int, nargs="+", default=list(DEFAULT_TREE_SHAPE.widths), metavar="W")
    ap.add_argument("--gamma", type=int, default=4, help="chain length for the chain rule (default: 4)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bf16", "fp16"])
    ap.add_argument("--seed", type=int, default=0, help="run i uses seed + i (default: 0)")
    ap.add_argument("--out", required=True, help="JSON output path (an existing file is not replaced)")
    args = ap.parse_args(argv)
    if args.prompts is not None and args.prompts < 1:
        ap.error(f"argument --prompts: {args.prompts} is out of range; give an integer >= 1")
    if args.max_new_tokens < 1:
        ap.error(f"argument --max-new-tokens: {args.max_new_tokens} is out of range; give an integer >= 1")
    if not all(math.isfinite(t) and t > 0 for t in args.temperatures):
        ap.error(f"argument --temperatures: {args.temperatures} must be finite and > 0")
    if Path(args.out).exists():
        ap.error(f"argument --out: {args.out} already exists; choose a new file name")
    try:
        check_tree_limits(TreeShape.of(args.tree_shape))
    except ValueError as e:
        ap.error(f"argument --tree-shape: {e}")

    from longspec_lab.decoding.eager import SpecDecoder
    from longspec_lab.models.pair import load_pair

    target, draft, tok = load_pair(device=args.device, dtype=args.dtype)
    if draft is None:
        raise SystemExit("error: no draft model; train one with `longspec-lab train-draft` first")
    room = target.config.max_position_embeddings - args.max_new_tokens - TreeShape.of(args.tree_shape).num_nodes
    specs = [p for p in load_prompts(min_tokens=1000) if p["n_tokens"] < room][: args.prompts]
    prompts = [tok.encode(p["text"])[:room] for p in specs]
    dec = SpecDecoder(target, draft)
    dec.generate(prompts[0][:64], method="tree", max_new_tokens=8)  # warm-up
    rows = measure_tau(
        dec,
        prompts,
        args.temperatures,
        max_new_tokens=args.max_new_tokens,
        tree_shape=args.tree_shape,
        gamma=args.gamma,
        seed=args.seed,
    )
    out = {
        "command": "python -m longspec_lab.bench.sampling_tau " + shlex.join(sys.argv[1:] if argv is None else argv),
        "environment": environment(target.device, target.dtype),
        "prompts": [p["name"] for p in specs],
        "prompt_tokens": [len(p) for p in prompts],
        "max_new_tokens": args.max_new_tokens,
        "definition": "tau = generated tokens / target forward passes (prefill included), summed over prompts",
        "rows": rows,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": out["environment"]["schema_version"], **out}, indent=1) + "\n")
    print(format_table(rows))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
