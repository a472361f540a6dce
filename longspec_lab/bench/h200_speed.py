"""The GPU job behind the speed results: correctness of the graph path, kernels per stage, end to end.

One call on a CUDA machine runs, in order, and writes each report as soon as it is done:

    e2e_h200.json                  ours (ar, chains, trees) against transformers' generate peers,
                                   rewritten after every prompt so that a cut-short job still reports
    profile_h200.json              kernels and time per stage: eager, compiled, replayed (bench.profile)
    e2e_batch_invariant_h200.json  the loops with --batch-invariant: identical outputs? at what cost (both
                                   modes captured without compilation, so the ratio is invariance alone)?
    graphs_vs_eager_float32.json   GraphDecoder (compiled + captured) against SpecDecoder, token for token

    python -m longspec_lab.bench.h200_speed --out DIR [--only e2e,profile,bi,graphs]

Compilation time is reported per plan (`compile_seconds`) and never falls inside a timed run. Point
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR at a kept folder and a second job reuses the kernels.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

# Decoding meets dozens of distinct attention shapes (1 row, each level's width, the whole tree, the
# pending block), and the kernel autotunes each on first use: minutes of Triton compiles before the
# first timed token (seen on the H200, 2026-12-02). One fixed Hopper config keeps the job short.
os.environ.setdefault("LONGSPEC_AUTOTUNE", "0")


def _write(out: Path, name: str, rep: dict) -> None:
    # the profiles (every kernel of every stage, and the step's time line) are written compact: data/ has a budget
    compact = name.startswith("profile")
    (out / name).write_text(json.dumps(rep, **({"separators": (",", ":")} if compact else {"indent": 1})) + "\n")
    print(f"wrote {out / name}", flush=True)


def main(argv=None) -> int:
    from longspec_lab.models.pair import load_pair
    from longspec_lab.paths import EMBEDDED_TARGET, load_prompts
    from longspec_lab.provenance import stamp

    ap = argparse.ArgumentParser(prog="python -m longspec_lab.bench.h200_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON reports (created)")
    ap.add_argument("--only", default="e2e,bi,profile", help="comma-separated subset of e2e,bi,profile,graphs")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts of 2,000+ tokens to time")
    ap.add_argument(
        "--shapes",
        default="4,16,16,16,16;1,2,4,4,4,4,4;1,2,3,4,2,1,3;3,4,6,6,3,4,3",
        help="tree shapes, ';'-separated (default: the paper's tree, the two fastest measured, and the exact tuner's "
        "pick on these prompts fitted to the record of f613640, data/results/tune_h200_predicted_exact_bench.json: "
        "four trees and two chains with the transformers peers fit one 10-minute device call)",
    )
    ap.add_argument("--gammas", default="5", help="chain lengths, ','-separated")
    ap.add_argument(
        "--compile", default="all", choices=("none", "ar", "all"),
        help="which plans torch.compile (an 8-layer stage costs tens of seconds to compile, once)",
    )  # fmt: skip
    ap.add_argument("--profile-modes", default="", help="extra compile modes to profile the AR step with, ','-sep.")
    ap.add_argument("--no-hf", action="store_true", help="leave out the transformers peers")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.exit(2, "error: this job needs a CUDA GPU\n")
    only = set(a.only.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    clock = {}
    shapes = [[int(x) for x in s.split(",")] for s in a.shapes.split(";")]
    gammas = [int(g) for g in a.gammas.split(",")]
    target, draft, tok = load_pair(device="cuda", dtype="bfloat16")
    prompts = [tok.encode(p["text"]) for p in load_prompts(min_tokens=2000)[: a.prompts]]
    # longest first: transformers' static cache is sized by the first prompt and reused (no recompile)
    prompts.sort(key=len, reverse=True)
    from longspec_lab.bench.e2e import format_tree_against_chains, run_bench

    def show(rep):
        for name, r in rep["results"].items():
            per = {k: round(v, 1) for k, v in r.get("stage_us_per_step", {}).items()}
            print(f"{name:28s} {r['tokens_per_s']:9.0f} tok/s  tau {r.get('tau', 1):.2f}  "
                  f"x{r['speedup_vs_ar']:.2f}  eff {r.get('efficiency', 1):.2f}", per, flush=True)  # fmt: skip
        if rep.get("tree_vs_chain", {}).get("trees"):
            print("\n".join(format_tree_against_chains(rep["tree_vs_chain"])), flush=True)
        print("outputs identical:", rep["outputs_identical"], "compile s:", rep["compile_seconds"], flush=True)

    default_rep = None
    if "e2e" in only:
        hf = None
        if not a.no_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(str(EMBEDDED_TARGET), dtype=torch.bfloat16).to("cuda").eval()

        def save(rep):
            extra = {"job_seconds": time.time() - t0, "prompt_tokens": [len(p) for p in prompts], "dtype": "bfloat16"}
            _write(out, "e2e_h200.json", stamp({**rep, **extra}, target.device, target.dtype))

        default_rep = run_bench(
            target, draft, prompts, a.max_new_tokens, shapes, gammas, hf_model=hf, progress=False,
            compile=a.compile == "all", on_prompt=save,
        )  # fmt: skip
        if a.compile == "ar":  # the compiled AR step beside the captured-only one, same prompts
            from longspec_lab.decoding.graphs import GraphDecoder

            dec = GraphDecoder(target, draft, compile=True)
            toks = secs = 0.0
            for ids in prompts:
                dec.generate(ids, method="ar", max_new_tokens=32, stop_at_eos=False)
                r = dec.generate(ids, method="ar", max_new_tokens=a.max_new_tokens, stop_at_eos=False)
                toks, secs = toks + len(r.new_tokens) - 1, secs + r.decode_seconds
            ar = default_rep["results"]["ar"]["tokens_per_s"]
            default_rep["results"]["ar-compiled"] = {
                "tokens_per_s": toks / secs, "tau": 1.0, "speedup_vs_ar": toks / secs / ar,
            }  # fmt: skip
            default_rep["compile_seconds"].update(dec.compile_seconds)
        save(default_rep)
        show(default_rep)
        clock["e2e"] = time.time() - t0
        print(f"e2e done {clock['e2e']:.0f} s", flush=True)
    if "bi" in only:  # both modes graph-captured, uncompiled: the cost of invariance alone, same run
        kw = dict(progress=False, compile=False)
        bi_shapes, bi_gammas = shapes[:2], gammas[-1:]
        plain = run_bench(target, draft, prompts, a.max_new_tokens, bi_shapes, bi_gammas, **kw)
        bi = run_bench(target, draft, prompts, a.max_new_tokens, bi_shapes, bi_gammas, batch_invariant=True, **kw)
        for name, r in bi["results"].items():
            r["vs_default_mode"] = r["tokens_per_s"] / plain["results"][name]["tokens_per_s"]
        bi["default_mode"] = plain
        _write(out, "e2e_batch_invariant_h200.json", stamp(bi, target.device, target.dtype))
        show(plain)
        show(bi)
        clock["bi"] = time.time() - t0
        print(f"batch-invariant done {clock['bi']:.0f} s", flush=True)
    if "profile" in only:
        from longspec_lab.bench.profile import profile_stages
        from longspec_lab.decoding.graphs import COMPILE_MODE
        from longspec_lab.decoding.timing import method_name

        mode = None if a.compile == "none" else COMPILE_MODE
        tree_mode = mode if a.compile == "all" else None
        rep = {
            "ar": profile_stages(target, draft, prompts[0], "ar", compile_mode=mode),
            method_name("chain", gamma=gammas[0]): profile_stages(
                target, draft, prompts[0], "chain", [1] * gammas[0], compile_mode=tree_mode
            ),
            method_name("tree", shape=shapes[0]): profile_stages(
                target, draft, prompts[0], "tree", shapes[0], compile_mode=tree_mode
            ),
        }
        for m in filter(None, a.profile_modes.split(",")):
            rep[f"ar@{m}"] = profile_stages(target, draft, prompts[0], "ar", compile_mode=None if m == "none" else m)
        _write(out, "profile_h200.json", stamp(rep, target.device, target.dtype))
        for k, r in rep.items():
            print(k, {n: (s["eager_kernels"], s["compiled_kernels"], round(s["replay_us"], 1))
                      for n, s in r["stages"].items()}, flush=True)  # fmt: skip
        clock["profile"] = time.time() - t0
        print(f"profile done {clock['profile']:.0f} s", flush=True)
    if "graphs" in only:
        from longspec_lab.decoding.graphs import check_against_eager

        del target, draft
        tgt, drf, tok = load_pair(device="cuda", dtype="float32")
        rep = check_against_eager(prompts[:2], tgt, drf, 48, compile=a.compile == "all")
        _write(out, "graphs_vs_eager_float32.json", stamp(rep, tgt.device, tgt.dtype))
        print("graphs == eager (float32):", rep["all_identical"], f"{time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
