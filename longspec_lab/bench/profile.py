"""Count what a step launches: kernels and time per stage, eager against compiled against captured.

On a small model a decoding step is bound by kernel launches, not by bytes: a 7M-parameter target
reads its weights in a few microseconds, yet an eager step launches hundreds of kernels. This module
counts, for every stage of `decoding.steps.greedy_stages`, the GPU kernels one call launches
(`torch.profiler`, one call after warm-up) and the time they take on the device, in three forms of
the SAME stage function:

    eager      the readable function, run as is
    compiled   the function through torch.compile (Inductor), run without capture
    replay     the compiled function recorded in a CUDA graph and replayed (what GraphDecoder runs)

and splits each stage's replay time into a launch-bound part (kernels x the measured cost of a
kernel boundary inside a graph: the smallest Triton kernel, launched as the decoder launches, with
programmatic dependent launch where it is on; `kernels.launch.boundary_cost_us`) and the rest (bytes
and arithmetic).

It also replays the whole step as the decoder does (one CUDA graph of every stage in order) once under
the profiler and lays its kernels on one time line (`step_timeline`): each kernel's own duration and
its increment, the time from the end of the kernel before it to its own end. The increments add up to
the step; a kernel whose increment exceeds its duration waited at the boundary, and one whose duration
exceeds its increment started early (PDL) and overlapped the one before it.

    python -m longspec_lab.bench.profile --device cuda --out profile.json

Taught in: notebooks/07_timing_real_gpu_runs.ipynb (the per-stage kernel bars).
"""

from __future__ import annotations

import statistics
import time

import torch

from longspec_lab.decoding import steps
from longspec_lab.decoding.graphs import COMPILE_MODE, Stage, capture, default_capacity, run_in_order
from longspec_lab.kernels.launch import boundary_cost_us
from longspec_lab.spec.tree import TreeShape


def _kernels(fn, top: int = 0):
    """(GPU kernels launched, their summed device time in us) for one call of fn; with top > 0 also the
    `top` kernel names that took the most device time, as [name, calls, us] (where the time goes), and
    every kernel in launch order as [name, us] (which launches the compiler left, and where)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in evs if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    count, us = len(kernels), sum(e.device_time for e in kernels)
    if not top:
        return count, us
    by_name: dict[str, list] = {}
    for e in kernels:
        row = by_name.setdefault(e.name[:120], [e.name[:120], 0, 0.0])
        row[1] += 1
        row[2] += e.device_time
    in_order = [[e.name[:120], round(e.device_time, 3)] for e in sorted(kernels, key=lambda e: e.time_range.start)]
    return count, us, sorted(by_name.values(), key=lambda r: -r[2])[:top], in_order


def _median_us(fn, reps: int = 50) -> float:
    """Median wall time of fn in us, device-synchronised around each call, after warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def step_timeline(kernels: list[tuple[str, float, float]], stage_kernels: dict[str, int]) -> dict:
    """One replayed step's kernels on a time line. kernels: (name, start, end) in us, in any order;
    stage_kernels: the stages in order with the kernels each launches (their compiled counts). Returns
    {"total_us", "kernels": [[name, start, duration, increment], ...] in start order (start from the first
    kernel's), "stages": {stage: {"kernels", "increment_us", "duration_us"}}}, where a kernel's increment is its
    end minus the latest end before it (the first: its duration; never below 0: a kernel that ends inside the one
    before adds nothing), so the increments add up to the step. The stages are attributed by count, in order;
    "stages" is None when the profiler saw another number of kernels than the stages launch."""
    ks = sorted(kernels, key=lambda k: (k[1], k[2]))
    rows, last_end = [], None
    t0 = ks[0][1] if ks else 0.0
    for name, start, end in ks:
        inc = end - start if last_end is None else max(end - last_end, 0.0)
        rows.append([name[:60], round(start - t0, 3), round(end - start, 3), round(inc, 3)])
        last_end = end if last_end is None else max(last_end, end)
    out = {"total_us": round(sum(r[3] for r in rows), 3), "kernels": rows, "stages": None}
    if sum(stage_kernels.values()) == len(rows):
        out["stages"], i = {}, 0
        for stage, n in stage_kernels.items():
            part = rows[i : i + n]
            out["stages"][stage] = {"kernels": n, "increment_us": round(sum(r[3] for r in part), 3),
                                    "duration_us": round(sum(r[2] for r in part), 3)}  # fmt: skip
            i += n
    return out


def _profiled_kernels(fn) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every GPU kernel one call of fn runs (memcpy and memset left out)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    keep = [e for e in evs if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    return [(e.name, e.time_range.start, e.time_range.end) for e in keep]


def profile_stages(target, draft, prompt, method: str = "tree", shape=None, backend: str = "triton",
                   compile_mode: str | None = COMPILE_MODE) -> dict:  # fmt: skip
    """Per-stage kernels and times for one method and shape, from a real mid-generation state.
    compile_mode None: capture the eager stage functions without compiling them."""
    shape = TreeShape.of(shape) if method != "ar" else None
    # GraphDecoder's cache size, so that the compiled stages (and Inductor's cache) are the same graphs
    capacity = max(default_capacity(target), len(prompt) + 512)
    st = steps.DecodeState(target, draft, shape, capacity, backend)
    with torch.inference_mode():
        steps.prefill(st, torch.as_tensor(prompt, device=target.device))
        fns = steps.greedy_stages(st)
        for _ in range(3):  # a few real steps, so the state is a real one
            for _, fn in fns:
                fn()
        boundary = boundary_cost_us(target.device)
        launch = boundary["unit_us"]
        rows, compiled = {}, []
        for name, fn in fns:
            stage = Stage(name, fn, compile_mode)
            compiled.append(stage.fn)
            g = capture([stage.fn])[0]  # the warm-up compiles
            k_e, t_e = _kernels(fn)
            k_c, t_c, top, in_order = _kernels(stage.fn, top=12)
            replay = _median_us(g.replay)
            rows[name] = {
                "eager_kernels": k_e,
                "eager_kernel_us": t_e,
                "eager_wall_us": _median_us(fn),
                "compiled_kernels": k_c,
                "compiled_kernel_us": t_c,
                "replay_us": replay,
                "launch_bound_us": min(replay, k_c * launch),
                "top_kernels": top,
                "kernels_in_order": in_order,
            }
        step_graph = capture([run_in_order(compiled)])[0]  # the step as GraphDecoder replays it (LONGSPEC_STEP_GRAPH)
        step_replay = _median_us(step_graph.replay, 20)  # every replay is a real step: P moves on (capacity above)
        counts = {n: r["compiled_kernels"] for n, r in rows.items()}
        timeline = step_timeline(_profiled_kernels(step_graph.replay), counts)
    total = {k: sum(r[k] for r in rows.values()) for k in ("eager_kernels", "compiled_kernels", "replay_us")}
    total["step_graph_replay_us"] = step_replay
    return {"method": method, "tree_shape": list(shape.widths) if shape else None, "launch_cost_us": launch,
            "boundary_cost": boundary, "compile_mode": compile_mode, "backend": backend,
            "stages": rows, "step": total, "step_timeline": timeline}  # fmt: skip


def main(argv=None) -> int:
    import argparse
    import json

    from longspec_lab.models.pair import load_pair
    from longspec_lab.paths import load_prompts
    from longspec_lab.provenance import stamp

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.bench.profile",
        description="Kernels launched and time per decoding stage: eager, compiled, and replayed from a CUDA graph.",
    )
    ap.add_argument("--device", default="cuda", help="a CUDA device (kernel counts need one)")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    ap.add_argument("--tree-shape", default="4,16,16,16,16", help="the tree to profile, e.g. 4,16,16,16,16")
    ap.add_argument("--gamma", type=int, default=5, help="draft tokens of the chain to profile")
    ap.add_argument("--out", default=None, help="write the JSON report here (refuses to overwrite)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.exit(2, "error: kernel counts need a CUDA GPU; run this on a machine with one\n")
    target, draft, tok = load_pair(device=a.device, dtype=a.dtype)
    prompt = tok.encode(load_prompts(min_tokens=2000)[0]["text"])
    rep = {
        "ar": profile_stages(target, draft, prompt, "ar"),
        "chain": profile_stages(target, draft, prompt, "chain", [1] * a.gamma),
        "tree": profile_stages(target, draft, prompt, "tree", a.tree_shape),
    }
    rep = stamp(rep, target.device, target.dtype)
    print(json.dumps(rep, indent=1))
    if a.out:
        with open(a.out, "x") as fh:
            json.dump(rep, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
