"""The GPU job behind the speed results: correctness of the graph path, kernels per stage, end to end.

One call on a CUDA machine runs, in order, and writes each report as soon as it is done:

    graphs_vs_eager_<dtype>.json   GraphDecoder (compiled + captured) against SpecDecoder, token for token
    profile_h200.json              kernels and time per stage: eager, compiled, replayed (bench.profile)
    e2e_h200.json                  ours (ar, chains, trees) against transformers' generate peers

    python -m longspec_lab.bench.h200_speed --out DIR [--only graphs,profile,e2e]

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
    (out / name).write_text(json.dumps(rep, indent=1) + "\n")
    print(f"wrote {out / name}", flush=True)


def main(argv=None) -> int:
    from longspec_lab.models.pair import load_pair
    from longspec_lab.paths import EMBEDDED_TARGET, load_prompts
    from longspec_lab.provenance import stamp

    ap = argparse.ArgumentParser(prog="python -m longspec_lab.bench.h200_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON reports (created; files are not overwritten)")
    ap.add_argument("--only", default="graphs,profile,e2e", help="comma-separated subset of graphs,profile,e2e")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts of 2,000+ tokens to time")
    ap.add_argument("--shapes", default="4,16,16,16,16;2,4,8,8,8,8", help="tree shapes, ';'-separated")
    ap.add_argument("--gammas", default="5", help="chain lengths, ','-separated")
    ap.add_argument(
        "--compile", default="ar", choices=("none", "ar", "all"),
        help="which plans torch.compile (compiling an 8-layer step costs ~30 s per stage function)",
    )  # fmt: skip
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.exit(2, "error: this job needs a CUDA GPU\n")
    only = set(a.only.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if "graphs" in only:
        from longspec_lab.decoding.graphs import check_against_eager

        tgt, drf, tok = load_pair(device="cuda", dtype="float32")
        prompts = [tok.encode(p["text"]) for p in load_prompts(min_tokens=2000)[:2]]
        rep = check_against_eager(prompts, tgt, drf, 48, compile=a.compile == "all")
        rep = stamp(rep, tgt.device, tgt.dtype)
        _write(out, "graphs_vs_eager_float32.json", rep)
        print("graphs == eager (float32):", rep["all_identical"], f"{time.time() - t0:.0f} s", flush=True)
        del tgt, drf
    target, draft, tok = load_pair(device="cuda", dtype="bfloat16")
    prompts = [tok.encode(p["text"]) for p in load_prompts(min_tokens=2000)[: a.prompts]]
    if "profile" in only:
        from longspec_lab.bench.profile import profile_stages
        from longspec_lab.decoding.graphs import COMPILE_MODE

        shape = [int(x) for x in a.shapes.split(";")[0].split(",")]
        mode = None if a.compile == "none" else COMPILE_MODE
        tree_mode = mode if a.compile == "all" else None
        rep = {
            "ar": profile_stages(target, draft, prompts[0], "ar", compile_mode=mode),
            "chain": profile_stages(
                target, draft, prompts[0], "chain", [1] * int(a.gammas.split(",")[0]), compile_mode=tree_mode
            ),
            "tree": profile_stages(target, draft, prompts[0], "tree", shape, compile_mode=tree_mode),
        }
        _write(out, "profile_h200.json", stamp(rep, target.device, target.dtype))
        for k, r in rep.items():
            print(k, {n: (s["eager_kernels"], s["compiled_kernels"], round(s["replay_us"], 1))
                      for n, s in r["stages"].items()}, flush=True)  # fmt: skip
        print(f"profile done {time.time() - t0:.0f} s", flush=True)
    if "e2e" in only:
        from transformers import AutoModelForCausalLM

        from longspec_lab.bench.e2e import run_bench

        hf = AutoModelForCausalLM.from_pretrained(str(EMBEDDED_TARGET), dtype=torch.bfloat16).to("cuda").eval()
        shapes = [[int(x) for x in s.split(",")] for s in a.shapes.split(";")]
        gammas = [int(g) for g in a.gammas.split(",")]
        rep = run_bench(
            target, draft, prompts, a.max_new_tokens, shapes, gammas, hf_model=hf, progress=False,
            compile=a.compile == "all",
        )  # fmt: skip
        if a.compile == "ar":  # the compiled AR step beside the captured-only one, same prompts
            from longspec_lab.decoding.graphs import GraphDecoder

            dec = GraphDecoder(target, draft, compile=True)
            toks = secs = 0.0
            for ids in prompts:
                dec.generate(ids, method="ar", max_new_tokens=32, stop_at_eos=False)
                r = dec.generate(ids, method="ar", max_new_tokens=a.max_new_tokens, stop_at_eos=False)
                toks, secs = toks + len(r.new_tokens) - 1, secs + r.decode_seconds
            ar = rep["results"]["ar"]["tokens_per_s"]
            rep["results"]["ar-compiled"] = {"tokens_per_s": toks / secs, "tau": 1.0, "speedup_vs_ar": toks / secs / ar}
            rep["compile_seconds"].update(dec.compile_seconds)
        _write(out, "e2e_h200.json", stamp(rep, target.device, target.dtype))
        for name, r in rep["results"].items():
            print(f"{name:28s} {r['tokens_per_s']:9.0f} tok/s  tau {r.get('tau', 1):.2f}  "
                  f"x{r['speedup_vs_ar']:.2f}", r.get("stage_seconds"), flush=True)  # fmt: skip
        print(f"e2e done {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
