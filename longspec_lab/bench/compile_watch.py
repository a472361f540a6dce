"""Where a stage's compile spends its time: compile one stage of a decoding step as the graph path does, and when it
runs past a limit, record where the main thread is, every frame of it.

The graph path (`decoding/graphs.py`) compiles each stage function of `decoding/steps.py` with `torch.compile`
(fullgraph, static shapes) before it captures it. A stage that takes minutes to compile looks, from outside, like a
decoder that hangs. `faulthandler` can dump the stack, but it stops at 100 frames, and a compiler stuck in a deep
recursion (Inductor printing a nested IR node, say) fills all 100 with the recursion, hiding the caller that asked
for it. This tool's watchdog is a Python thread: after `--after` seconds it reads the main thread's whole stack
(`sys._current_frames`), folds each run of a repeating block of frames into one copy and a count, and writes it,
outermost frame first, so the caller shows at the top and the recursion as one folded block below it. It takes a
second sample a few seconds later: frames that changed between the two are where the work moves.

    python -m longspec_lab.bench.compile_watch --stage verify --set LONGSPEC_GREEDY_ACCEPT=on --after 60 --out F

The stage runs on the embedded pair (bf16 on CUDA, float32 on the CPU) after a prefill, with the switches given,
compiled as `graphs.compile_stage` does (Inductor's options, combo kernels and PDL as the decoder sets them). With
`--stop` (the default) the process ends once the samples are written (exit status 3): a stuck compile cannot be
interrupted from another thread. A compile that finishes in time is timed and reported as such.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback

MAX_PERIOD = 12  # the longest block of frames that `fold` recognises as repeating


def _repeat_at(frames: list[str], i: int, max_period: int) -> tuple[int, int]:
    """(p, r): the shortest block of p frames starting at i that repeats back to back, and its r >= 2 copies;
    (1, 1) where none does."""
    for p in range(1, max_period + 1):
        block = frames[i : i + p]
        if len(block) < p:
            break
        reps = 1
        while frames[i + reps * p : i + (reps + 1) * p] == block:
            reps += 1
        if reps > 1:
            return p, reps
    return 1, 1


def fold(frames: list[str], max_period: int = MAX_PERIOD) -> list[str]:
    """`frames` with every run of a block repeated back to back (a block of 1 to max_period frames) written once,
    followed by a line `... the N frames above, R times in all`; scanned left to right, the shortest block first."""
    out: list[str] = []
    i = 0
    while i < len(frames):
        p, reps = _repeat_at(frames, i, max_period)
        out += frames[i : i + p]
        if reps > 1:
            out.append(f"... the {p} frame{'s' if p > 1 else ''} above, {reps} times in all")
        i += p * reps
    return out


def thread_stack(ident: int) -> list[str]:
    """The thread's stack, outermost frame first, as `file:line in function` strings."""
    frame = sys._current_frames().get(ident)
    if frame is None:
        return []
    return [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_stack(frame)]


def watch(fn, after: float, gap: float = 5.0, on_fire=None) -> dict:
    """Run fn() on this thread while a watchdog thread waits `after` seconds; if fn is still running then, the
    watchdog samples this thread's stack twice, `gap` seconds apart, and calls on_fire(report) (which may end the
    process). Returns {"finished", "seconds", "samples": [{"at", "frames", "folded"}]}; `samples` is empty when fn
    finished in time."""
    main, done = threading.get_ident(), threading.Event()
    report: dict = {"finished": False, "seconds": None, "samples": []}

    def dog():
        if done.wait(after):
            return
        for k in range(2):
            if k and done.wait(gap):
                return
            frames = thread_stack(main)
            report["samples"].append({"at": round(after + k * gap, 1), "frames": len(frames), "folded": fold(frames)})
        if on_fire is not None:
            on_fire(report)

    t = threading.Thread(target=dog, daemon=True)
    t0 = time.perf_counter()
    t.start()
    try:
        fn()
    finally:
        done.set()
    report["finished"], report["seconds"] = True, time.perf_counter() - t0
    t.join()
    return report


def record_ir_printers(path: str, limit: int = 50) -> None:
    """Wrap the `__str__` (and `__repr__` where it is the same function) of every class of Inductor's IR so that
    each outermost call, one not made inside another IR node's printing, appends its caller's stack, folded, to
    `path` as a JSON line at once (the first `limit` distinct callers). A compile stuck printing a huge IR node
    holds the interpreter in C for minutes, so no watchdog thread gets to look; this names the caller on entry."""
    from torch._inductor import ir

    state, seen = threading.local(), set()

    def wrap(cls):
        orig = cls.__dict__["__str__"]

        def __str__(self):
            depth = getattr(state, "depth", 0)
            if depth == 0 and len(seen) < limit:
                frames = [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_stack()[:-1]]
                key = tuple(frames[-8:])
                if key not in seen:
                    seen.add(key)
                    with open(path, "a") as fh:
                        fh.write(json.dumps({"type": cls.__name__, "frames": fold(frames)}) + "\n")
            state.depth = depth + 1
            try:
                return orig(self)
            finally:
                state.depth = depth

        if cls.__dict__.get("__repr__") is orig:
            cls.__repr__ = __str__
        cls.__str__ = __str__

    for cls in list(vars(ir).values()):
        if isinstance(cls, type) and issubclass(cls, ir.IRNode) and "__str__" in cls.__dict__:
            wrap(cls)


def _stage(name: str, shape: list[int], device: str):
    """The named stage function of one greedy step of the embedded pair, on `device`, after a prefill."""
    import torch

    from longspec_lab.decoding import steps
    from longspec_lab.decoding.graphs import default_capacity
    from longspec_lab.models.pair import load_pair
    from longspec_lab.spec.tree import TreeShape

    cuda = device.startswith("cuda")
    target, draft, _ = load_pair(device=device, dtype="bf16" if cuda else "float32")
    backend = "triton" if cuda else "torch"  # as the decoders choose by device
    st = steps.DecodeState(target, draft, TreeShape.of(shape), default_capacity(target), backend)
    steps.prefill(st, (torch.arange(3, 3 + 256) % target.config.vocab_size).to(target.device))
    stages = dict(steps.greedy_stages(st))
    if name not in stages:
        raise ValueError(f"no stage {name!r} in a step of tree {shape}; pick one of {', '.join(stages)}")
    return stages[name]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.bench.compile_watch",
        description="Compile one stage of a decoding step as the graph path does; if the compile runs past --after "
        "seconds, write the main thread's whole stack (folded, outermost frame first), twice.",
    )
    ap.add_argument("--stage", default="verify", help="draft1 .. draftD, verify or commit (default: verify)")
    ap.add_argument("--shape", default="4,16,16,16,16", help="tree widths, comma-separated (default: 4,16,16,16,16)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="LONGSPEC_X=value", help="a switch for the stage (repeatable)"
    )
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--after", type=float, default=60.0, help="seconds before the stack is sampled (default: 60)")
    ap.add_argument("--no-stop", action="store_true", help="after sampling, let the compile go on to its end")
    ap.add_argument("--out", required=True, help="JSON report to write (must not exist)")
    ap.add_argument(
        "--ir-printers",
        default=None,
        metavar="F",
        help="also append to F (JSON lines) the caller of every outermost print of an Inductor IR node",
    )
    a = ap.parse_args(argv)
    if os.path.exists(a.out):
        ap.exit(2, f"error: {a.out} exists; pick another path or remove it first\n")
    for item in a.set:
        key, sep, value = item.partition("=")
        if not (sep and key.startswith("LONGSPEC_") and value):
            ap.exit(2, f"error: --set {item!r} is not LONGSPEC_X=value; e.g. --set LONGSPEC_GREEDY_ACCEPT=on\n")
        os.environ[key] = value  # before the package's modules read their switches at import
    try:
        shape = [int(w) for w in a.shape.split(",")]
    except ValueError:
        ap.exit(2, f"error: --shape {a.shape!r} is not comma-separated widths; e.g. --shape 4,16,16,16,16\n")
    if a.after <= 0:
        ap.exit(2, f"error: --after must be positive, got {a.after}\n")

    import torch

    from longspec_lab.decoding.graphs import compile_stage
    from longspec_lab.provenance import stamp

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        fn = _stage(a.stage, shape, device)
    except ValueError as e:
        ap.exit(2, f"error: {e}\n")
    if a.ir_printers:
        record_ir_printers(a.ir_printers)
    compiled = compile_stage(fn)
    base = {
        "stage": a.stage,
        "shape": shape,
        "switches": dict(s.partition("=")[::2] for s in a.set),
        "after_s": a.after,
    }

    def write(report: dict) -> None:
        out = stamp({**base, **report}, device)
        with open(a.out, "x") as f:
            f.write(json.dumps(out, indent=1) + "\n")
        for s in report["samples"]:
            print(f"--- after {s['at']} s: {s['frames']} frames, folded:", *s["folded"], sep="\n", flush=True)
        print(f"wrote {a.out}", flush=True)

    def fire(report: dict) -> None:
        if a.no_stop:
            return
        write(report)
        print(f"the compile of {a.stage} was still running after {a.after:g} s; stopped (exit status 3)", flush=True)
        os._exit(3)  # the main thread is inside the compiler: nothing else can end it

    print(f"compiling {a.stage} of tree {shape} on {device} with {a.set or 'the default switches'} ...", flush=True)
    with torch.no_grad():
        report = watch(compiled, a.after, on_fire=fire)
    print(f"{a.stage} compiled and ran in {report['seconds']:.1f} s", flush=True)
    write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
