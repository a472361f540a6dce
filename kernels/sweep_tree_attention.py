"""Latency sweep of the tree-attention kernel on the small shapes a decoding step launches.

At a few thousand keys and a handful of query rows the kernel is bound by latency, not by bytes or
FLOPs: the embedded model's 1-row decode reads about 1.4 MB of K/V per layer (0.3 us at the H200's
copy rate) yet took 11 us in the profiled step. What sets that time is how many dependent round trips
the slowest program makes: its share of keys (split length / BLOCK_N steps), the tail and tree steps,
and the merge of the split partials. This sweep times every plan choice that changes those counts:

  splits     the planner's choice, or a forced count (1 .. 64)
  BLOCK_M    the row tile (64, the default for <= 64 packed rows, 32, or 16, the smallest matrix tile)
  config     key tile, warps and pipeline depth (the decoder runs one fixed config, LONGSPEC_AUTOTUNE=0)
  merge      fused (the last split to finish merges) or a second merge launch
  merge tile fp32 partial-output elements one merging program reads at once (the planner's plan only;
             the Llama 72-row verify at 1k ran 28.9 us after the merge became one tile, 16.2 us before)

Each variant is checked against the float64 reference, then timed as the decoder runs it: device prefix
lengths (`max_prefix` = the cache capacity), CALLS back-to-back calls captured in one CUDA graph, the
median over replays divided by CALLS. torch's SDPA on the same keys (GQA expanded, no mask) is timed
beside it as the stock peer.

    python -m longspec_lab.kernels.sweep_tree_attention --out F.json [--budget-s 240] [--shapes a,b]

Taught in: notebooks/04_hybrid_tree_attention_and_the_triton_kernel.ipynb
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module defines its kernels
try:
    from longspec_lab.kernels import tree_attention as ta  # noqa: E402
    from longspec_lab.kernels.bench_tree_attention import N_PENDING, TREE_SHAPE, beam_tree_parents, verify_mask  # noqa: E402
except ImportError:  # from the repo root without the package installed
    from kernels import tree_attention as ta  # noqa: E402
    from kernels.bench_tree_attention import N_PENDING, TREE_SHAPE, beam_tree_parents, verify_mask  # noqa: E402
from longspec_lab.provenance import environment  # noqa: E402

# name: (Hq, Hkv, D, T, prefix P, cache capacity S, mask kind). Capacities are the decoder's: the
# embedded model's context 4096 plus room for two default trees; the 8B shapes a 4k / 32k context.
SHAPES = {
    "embedded-decode": (4, 2, 64, 1, 2700, 4234, "causal"),
    "embedded-verify": (4, 2, 64, 72, 2700, 4234, "tree"),
    "embedded-draft-cross": (4, 2, 64, 16, 2700, 4234, "none"),
    "llama-decode-4k": (32, 8, 128, 1, 4000, 4234, "causal"),
    "llama-decode-32k": (32, 8, 128, 1, 32000, 32906, "causal"),
    "llama-verify-1k": (32, 8, 128, 72, 1024, 4234, "tree"),
}
SPLITS = (None, 4, 8, 16, 32, 64)
BLOCK_MS = (64, 16)  # CLI: --block-m
ALIGN_MANY = 64  # split granularity (keys) for forced counts above 16: 128 would cap them at P / 128
CONFIGS = ((64, 4, 3), (32, 4, 2), (128, 4, 2), (64, 2, 2))  # (BLOCK_N, warps, stages), plain loads
CALLS = 20  # calls per captured graph
MERGE_ELEMS = (2048, 8192)  # vector-merge tiles tried (the planner's plan only; the kernel's _MERGE_ELEMS is 2048)


def tree_mask(T, gen):
    """bool [T, T]: the kernel benchmark's verification block, N_PENDING causal rows then a random beam tree
    (the benchmark's [4,16,16,16,16] when T = 72, one level of T - N_PENDING nodes otherwise)."""
    shape = TREE_SHAPE if T == N_PENDING + sum(TREE_SHAPE) else [T - N_PENDING]
    return verify_mask(N_PENDING, beam_tree_parents(shape, gen))


def make_inputs(shape, dtype, device, gen):
    Hq, Hkv, D, T, P, S, kind = shape
    q = torch.randn(1, Hq, T, D, generator=gen).to(device, dtype)
    k = torch.randn(1, Hkv, S, D, generator=gen).to(device, dtype)
    v = torch.randn(1, Hkv, S, D, generator=gen).to(device, dtype)
    if kind == "causal":
        mask = None
    else:
        mask = (torch.zeros(T, T, dtype=torch.bool) if kind == "none" else tree_mask(T, gen)).to(device)
    return q, k, v, torch.tensor([P], device=device), mask


def graph_us(fn, calls=CALLS, replays=30) -> float:
    """Median time of one call, from `calls` calls captured back to back in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def _with_config(cfg):
    """A one-config autotuner over the split kernel (plain loads), swapped in for the decoder's fixed one."""
    bn, warps, stages = cfg
    return ta._autotuned([ta._cfg(bn, warps, stages, False)])


def run_shape(name, shape, dtype, device, gen, deadline, log, configs=CONFIGS, splits_list=SPLITS, block_ms=BLOCK_MS):
    q, k, v, pref, mask = make_inputs(shape, dtype, device, gen)
    Hq, Hkv, D, T, P, S, kind = shape
    cpu = [x.float().cpu() for x in (q, k, v)]
    ref = ta.tree_attention_reference(*cpu, pref.cpu(), None if mask is None else mask.cpu())
    rows = []
    rec = {"shape": dict(zip(("Hq", "Hkv", "D", "T", "P", "S", "mask"), shape)), "variants": rows}
    if device.type == "cuda":  # the stock peer: SDPA over the P + T keys, GQA expanded, no mask
        kk, vv = (x[:, :, : P + T].repeat_interleave(Hq // Hkv, 1) for x in (k, v))
        rec["sdpa_nomask_us"] = graph_us(lambda: F.scaled_dot_product_attention(q, kk, vv))
    saved = (ta._split_kernel, ta._split_kernel_plain, ta.FUSED_MERGE, os.environ.get("LONGSPEC_BLOCK_M"))
    saved_loop = ta.LOOP_MERGE
    # stage 1: the decoder's config, every row tile, split count and merge; stage 2: the other configs at
    # the planner's split count and at stage 1's best plan
    # stage 0: the planner's plan with each merge form forced: split by split ("1"), all splits at once ("0")
    # in each merge tile (fp32 elements one merging program holds); the other stages let the planner pick ("auto")
    plan = [(configs[0], 64, None, False, ta._MERGE_ELEMS, "1")]
    plan += [(configs[0], 64, None, False, m, "0") for m in MERGE_ELEMS]
    stage1 = itertools.product(configs[:1], block_ms, splits_list, (True, False))
    plan += [(*p, ta._MERGE_ELEMS, "auto") for p in stage1]
    saved_elems = ta._MERGE_ELEMS
    try:
        while plan:
            cfg, bm, splits, fused, elems, loop = plan.pop(0)
            if not plan and cfg == configs[0] and len(configs) > 1:
                timed = [r for r in rows if "us" in r] or [
                    {"BLOCK_M": 64, "splits_asked": None, "fused_asked": True, "loop_asked": "auto"}
                ]
                b = min(timed, key=lambda r: r.get("us", 0.0))
                for c in configs[1:]:
                    plan += [(c, b["BLOCK_M"], b["splits_asked"], b["fused_asked"], saved_elems, b["loop_asked"])]
                    if b["splits_asked"] is not None:
                        plan += [(c, 64, None, True, saved_elems, "auto")]
            if time.monotonic() > deadline:
                rec["cut_short"] = True
                break
            if T * Hq // Hkv > 64 and bm == 16:
                continue  # several row tiles: the small tile only multiplies the programs
            if device.type == "cuda":
                ta._split_kernel = ta._split_kernel_plain = _with_config(cfg)
            ta.FUSED_MERGE = fused
            ta._MERGE_ELEMS = elems
            ta.LOOP_MERGE = loop
            os.environ["LONGSPEC_BLOCK_M"] = str(bm)
            if splits and splits > 16:
                os.environ["LONGSPEC_SPLIT_ALIGN"] = str(ALIGN_MANY)
            else:  # the planner's own granularity
                os.environ.pop("LONGSPEC_SPLIT_ALIGN", None)
            row = {"config": cfg, "BLOCK_M": bm, "splits_asked": splits, "fused_asked": fused, "merge_elems": elems,
                   "loop_asked": loop}  # fmt: skip

            def fn():
                return ta.tree_attention(q, k, v, pref, mask, max_prefix=S - T, num_splits=splits)

            try:
                o = fn()
                row.update(
                    n_splits=ta.LAST_LAUNCH["n_splits"],
                    fused_merge=ta.LAST_LAUNCH["fused_merge"],
                    merge_tile=list(ta.LAST_LAUNCH["merge_tile"]),
                    loop_merge=ta.LAST_LAUNCH["loop_merge"],
                    max_abs_err=float((o.float() - ref.to(o.device)).abs().max()),
                )
                if row["n_splits"] == 1 and not fused:
                    continue  # one split never merges: the fused row already timed it
                if device.type == "cuda":
                    row["us"] = graph_us(fn)
            except Exception as e:  # a variant that fails is recorded, the sweep goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            log(f"{name} {row}")
    finally:
        ta._split_kernel, ta._split_kernel_plain, ta.FUSED_MERGE, bm_env = saved
        ta.LOOP_MERGE = saved_loop
        ta._MERGE_ELEMS = saved_elems
        os.environ.pop("LONGSPEC_SPLIT_ALIGN", None)
        if bm_env is None:
            os.environ.pop("LONGSPEC_BLOCK_M", None)
        else:
            os.environ["LONGSPEC_BLOCK_M"] = bm_env
    timed = [r for r in rows if "us" in r]
    if timed:
        best = min(timed, key=lambda r: r["us"])
        default = [r for r in timed if r["config"] == configs[0] and r["BLOCK_M"] == 64 and r["splits_asked"] is None
                   and r["merge_elems"] == saved_elems and r["loop_asked"] == "auto"]  # fmt: skip
        rec["best"] = best
        rec["default"] = next((r for r in default if r["fused_merge"] == ta.FUSED_MERGE), None)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.kernels.sweep_tree_attention",
        description="Time the tree-attention kernel's plan choices (splits, row tile, config, merge) on the small "
        "shapes of a decoding step, graph-captured, each checked against the float64 reference.",
    )
    ap.add_argument("--out", default=None, help="write the results (JSON) here; an existing file is not overwritten")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting variants after this many seconds")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--block-m", default="64,16", help="row tiles to try, comma-separated (16, 32, 64 or 128)")
    a = ap.parse_args(argv)
    names = [s for s in a.shapes.split(",") if s]
    shapes, configs, splits = dict(SHAPES), CONFIGS, SPLITS
    block_ms = tuple(int(b) if b.strip().isdigit() else -1 for b in a.block_m.split(",") if b.strip())
    if not block_ms or any(b not in ta.FORCED_BLOCK_MS for b in block_ms):
        print(f"error: --block-m {a.block_m!r} must list row tiles from {ta.FORCED_BLOCK_MS}; e.g. --block-m 16,32,64",
              file=sys.stderr)  # fmt: skip
        return 2
    bad = [s for s in names if s not in shapes]
    if bad:
        print(f"error: unknown shape(s) {bad}; choose from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    if a.out and os.path.exists(a.out):
        print(f"error: {a.out} exists; pass another --out or remove it", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    if device.type == "cpu":  # interpreter: correctness of every plan on tiny shapes, no timing
        shapes = {n: (s[0], s[1], s[2], min(s[3], 8), 100, 140, s[6]) for n, s in shapes.items()}
        configs, splits = CONFIGS[:1], (None, 1, 4)
        dtype = torch.float32
    gen = torch.Generator().manual_seed(0)
    deadline = time.monotonic() + a.budget_s
    report = {"environment": environment(command=" ".join(sys.argv)), "calls_per_graph": CALLS, "shapes": {}}
    report["merge_elems_default"] = ta._MERGE_ELEMS  # stage-0 rows: loop_asked "0" or "1" (a forced merge form)
    for i, name in enumerate(names):  # each shape gets an equal share of the time left
        share = time.monotonic() + (deadline - time.monotonic()) / (len(names) - i)
        report["shapes"][name] = run_shape(
            name, shapes[name], dtype, device, gen, share, print, configs, splits, block_ms
        )
        if a.out:  # after every shape, so a run cut short still leaves data
            with open(a.out + ".part", "w") as fh:
                json.dump(report, fh, indent=1, default=str)
    if a.out:
        os.replace(a.out + ".part", a.out)
    for name, rec in report["shapes"].items():
        b, d = rec.get("best"), rec.get("default")
        if b and d:
            print(f"{name}: default {d['us']:.1f} us ({d['n_splits']} splits), best {b['us']:.1f} us "
                  f"({b['n_splits']} splits, BLOCK_M {b['BLOCK_M']}, config {b['config']}, fused {b['fused_merge']}); "
                  f"sdpa {rec.get('sdpa_nomask_us', float('nan')):.1f} us")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
