"""Programmatic dependent launch (PDL): on Hopper and later, the next kernel is launched while this one finishes.

A decoding step of the embedded model is a chain of about 160 kernels of a few microseconds each, replayed from
one CUDA graph. Between two of them the GPU waits for the next grid to be launched and its programs to start:
on the H200, a default-tree verify replays in 236.9 us of which its 62 kernels run 198.7
(`data/results/profile_rope_rows_h200.json`), about 0.6 us lost at every kernel boundary.

PDL (CUDA 12, compute capability 9.0+) lets a kernel launched with the programmatic-serialization attribute start
as soon as every program of the kernel before it has executed `griddepcontrol.launch_dependents`. The early kernel
must then execute `griddepcontrol.wait`, which returns once the kernel before it has finished and its writes are
visible, before it reads or writes anything another kernel touches. CUDA graphs keep these edges.

Every kernel of this package opens with the same two instructions, in this order and in every program, before any
other memory access or early return (search for `USE_PDL`); the one exception is a read of what no kernel of a step
writes, a weight, which `norm_linear` issues before the wait so that it overlaps the kernel before (tests hold each
kernel to an explicit list of what it may read early, `READ_BEFORE_WAIT`):

    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished; its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start (and wait in turn)

Waiting first keeps a chain safe: a kernel lets its successor start only after its own predecessor has finished,
so whatever was written two kernels back is complete as well. Inductor's generated kernels follow the same rule
when `torch._inductor.config.triton.enable_pdl` is set, which the decoder sets for the stages it compiles
(`inductor_options`). Kernels launched without the attribute (cuBLAS, PyTorch's own) wait for everything before
them as usual.

    LONGSPEC_PDL=auto   (default) PDL on CUDA devices of compute capability 9.0 or more whose Triton offers it
                        (`gdc_wait` and the `launch_pdl` option: 3.4 and later), never in the interpreter
    LONGSPEC_PDL=off    plain launches everywhere (the A/B side)

`launch_args(device)` gives the keyword arguments each launch site adds: the kernel's USE_PDL constexpr and Triton's
`launch_pdl` option, always together (a kernel launched early that does not wait would race).

What a kernel boundary costs is measured with the smallest kernel there is, `_tick_kernel` (one program adds 1 to
one number; `tick_reference` is the same in PyTorch): a chain of ticks recorded in one CUDA graph and replayed,
launched with PDL and without, beside the same number of PyTorch's own `add_` (`boundary_cost_us`; the decoding
profile's launch-bound unit, `bench.profile`).

A persistent kernel would trade those boundaries for grid-wide barriers inside one launch; `_phases_kernel` times
one barrier per phase (`barrier_cost_us`), with 1, 16 and one program per SM, against the boundary. The same
command reports both, and their ratio (`barrier_vs_boundary`, below 1 where a barrier is the cheaper):

    python -m longspec_lab.kernels.launch --n 200 --phases 64 --out launch_h200.json

Taught in: notebooks/07_timing_real_gpu_runs.ipynb (the PDL A/B pair)
"""

from __future__ import annotations

import os
import statistics

import torch
import triton
import triton.language as tl

PDL = os.environ.get("LONGSPEC_PDL", "auto")
_CHOICES = ("auto", "off")
_CAPABLE: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_has_pdl() -> bool:
    """Whether the installed Triton can compile the gate (`tl.extra.cuda.gdc_wait`) and launch with PDL (the
    `launch_pdl` option of its CUDA backend). Older releases (the package allows torch 2.4's Triton) have neither,
    and the kernels then launch plainly."""
    if "triton" not in _CAPABLE:
        try:
            import triton.language.extra.cuda as cuda_ext
            from triton.backends.nvidia.compiler import CUDAOptions
        except ImportError:
            _CAPABLE["triton"] = False
        else:
            fields = getattr(CUDAOptions, "__dataclass_fields__", {})
            _CAPABLE["triton"] = hasattr(cuda_ext, "gdc_wait") and "launch_pdl" in fields
    return _CAPABLE["triton"]


def pdl_enabled(device) -> bool:
    """True when a launch on `device` uses PDL: LONGSPEC_PDL is auto, the device is CUDA with compute capability
    9.0 or more, Triton offers PDL and is not interpreting. Raises for an unknown LONGSPEC_PDL value."""
    if PDL not in _CHOICES:
        raise ValueError(f"LONGSPEC_PDL={PDL!r} is not one of {', '.join(_CHOICES)}; unset it or pick one")
    return PDL != "off" and device_can_pdl(device)


def device_can_pdl(device) -> bool:
    """Whether launches on `device` can use PDL at all, whatever LONGSPEC_PDL says: CUDA, compute capability 9.0
    or more, a Triton that offers it, and not the interpreter."""
    device = torch.device(device)
    if device.type != "cuda" or _interpreting() or not triton_has_pdl():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _CAPABLE[index]


def launch_args(device, pdl: bool | None = None) -> dict:
    """Keyword arguments for a launch of one of this package's kernels on `device`: USE_PDL (the kernel's
    constexpr: wait, then let the next kernel start) and launch_pdl (Triton's launch attribute), equal.
    `pdl=False` launches plainly whatever the switch says; `pdl=True` asks for PDL where the device can (a timing
    of both forms); None follows `pdl_enabled`."""
    on = pdl_enabled(device) if pdl is None else bool(pdl) and device_can_pdl(device)
    return {"USE_PDL": on, "launch_pdl": on}


def inductor_options(device) -> dict:
    """Inductor config entries for stages compiled to run on `device`: its generated kernels use PDL too when ours
    do (`triton.enable_pdl`, present in the PyTorch releases that generate PDL code); empty otherwise."""
    import torch._inductor.config as inductor_config

    if not pdl_enabled(device) or not hasattr(inductor_config.triton, "enable_pdl"):
        return {}
    return {"triton.enable_pdl": True}


# ----------------------------------------------------------------------------- the cost of a kernel boundary


@triton.jit
def _tick_kernel(
    X,  # [1] int32 (or any number): incremented by one
    USE_PDL: tl.constexpr,  # programmatic dependent launch: wait for the kernel before, then let the next start
):
    if USE_PDL:  # before any other memory access, in every program
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(X, tl.load(X) + 1)


def tick(x: torch.Tensor, pdl: bool | None = None) -> torch.Tensor:
    """x [1] += 1 with one launch of the smallest kernel (in place; returns x). `pdl` as in `launch_args`."""
    if x.numel() != 1 or not x.is_contiguous():
        raise ValueError(f"tick needs a contiguous one-element tensor, got shape {list(x.shape)}")
    _tick_kernel[(1,)](x, **launch_args(x.device, pdl))
    return x


def tick_reference(x: torch.Tensor) -> torch.Tensor:
    """What `tick` computes: x + 1 (out of place)."""
    return x + 1


# A persistent kernel replaces kernel boundaries by grid-wide barriers: every program arrives at a counter, then
# spins until all have. Whether that pays is one number: a barrier's cost against a boundary's. `_phases_kernel`
# runs N_PHASES phases of the smallest work that needs one (each program reads what ANOTHER program wrote in the
# phase before: x_dst[p] = x_src[(p + 1) % n] + 1, ping-pong halves of X), separated by grid barriers.
#
# On the GPU every program must be resident at once, or a spinning program waits forever for one that cannot
# start: `phases` refuses more programs than the device has SMs, and each spin gives up after SPIN_LIMIT polls and
# raises FLAG instead of hanging. The CPU interpreter runs programs one after another, so only one program can
# pass a barrier there (the tests run one; more raise FLAG, which the tests check too).
SPIN_LIMIT = 1 << 16  # about 50 ms of polling: a broken barrier shows as FLAG within seconds, never a hang


@triton.jit
def _phases_kernel(
    X,  # [2, n] int32 ping-pong halves: phase k reads half k % 2 and writes the other
    COUNT,  # [1] int32 barrier arrivals; zero at launch, and zeroed again by the last program to finish
    DONE,  # [1] int32 programs finished; likewise
    FLAG,  # [1] int32 set to 1 when a barrier gave up waiting (SPIN_LIMIT polls): the result is then wrong
    N_PHASES: tl.constexpr,  # phases, each followed by a grid barrier
    BARRIER: tl.constexpr,  # False: no barrier (one program's own chain of dependent loads and stores, the floor)
    SPIN_LIMIT: tl.constexpr,  # polls before a barrier gives up
    USE_PDL: tl.constexpr,  # programmatic dependent launch: wait for the kernel before, then let the next start
):
    if USE_PDL:  # before any other memory access, in every program
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    for k in range(N_PHASES):
        src = X + (k % 2) * n
        dst = X + ((k + 1) % 2) * n
        v = tl.load(src + (pid + 1) % n, cache_modifier=".cg")  # L2, not this SM's L1: another program wrote it
        tl.store(dst + pid, v + 1)
        if BARRIER:
            tl.debug_barrier()  # every thread's store issued before the arrival below releases them
            seen = tl.atomic_add(COUNT, 1, sem="release", scope="gpu") + 1
            target = (k + 1) * n
            polls = 0
            while (seen < target) & (polls < SPIN_LIMIT):
                seen = tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu")
                polls += 1
            if seen < target:
                tl.atomic_xchg(FLAG, 1)
            tl.debug_barrier()
    if BARRIER:  # the last program out resets the counters: every program has left its last spin by then
        if tl.atomic_add(DONE, 1, sem="acq_rel", scope="gpu") == n - 1:
            tl.atomic_xchg(COUNT, 0)
            tl.atomic_xchg(DONE, 0)


def phases(x: torch.Tensor, counters: torch.Tensor, n_phases: int, barrier: bool = True, pdl: bool | None = None):
    """Run `_phases_kernel` once: x [2, n] int32 (n programs), counters [3] int32 (arrivals, finished, flag; zero
    before the first call, and left so by each call). Returns x. Refuses more programs than the GPU has SMs (a
    spin over programs that cannot all be resident would never end); several programs without a barrier read each
    other's writes in no order, so `barrier=False` takes one program."""
    if x.dim() != 2 or x.shape[0] != 2 or x.dtype != torch.int32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous int32 tensor [2, n], got {x.dtype} {list(x.shape)}")
    if counters.shape != (3,) or counters.dtype != torch.int32:
        raise ValueError(
            f"counters must be int32 [3] (arrivals, finished, flag), got {counters.dtype} {list(counters.shape)}"
        )
    n = x.shape[1]
    if not barrier and n != 1:
        raise ValueError(f"barrier=False runs one program (the floor of a phase); got {n}: pass x of shape [2, 1]")
    if x.is_cuda and n > torch.cuda.get_device_properties(x.device).multi_processor_count:
        raise ValueError(f"{n} programs is more than this GPU's SMs: a grid barrier needs every program resident")
    _phases_kernel[(n,)](x, counters[0:], counters[1:], counters[2:], N_PHASES=n_phases, BARRIER=barrier,
                         SPIN_LIMIT=SPIN_LIMIT, **launch_args(x.device, pdl))  # fmt: skip
    return x


def phases_reference(n: int, n_phases: int, calls: int = 1) -> torch.Tensor:
    """x [2, n] after `calls` runs of `phases` from zeros: the half a phase writes holds the phases run so far."""
    x = torch.zeros(2, n, dtype=torch.int32)
    for _ in range(calls):
        for k in range(n_phases):
            x[(k + 1) % 2] = x[k % 2].roll(-1) + 1
    return x


def _replay_us(fn, n: int, reps: int) -> float:
    """Median device time of one call of fn inside a CUDA graph of n calls, replayed after warm-up (us per call)."""
    import time

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6 / n)
    return statistics.median(times)


def boundary_cost_us(device="cuda", n: int = 200, reps: int = 20) -> dict:
    """What one kernel boundary costs in a replayed CUDA graph, per kernel of a chain of n: the tick launched with
    PDL (`tick_pdl_us`, None where the device cannot), without (`tick_plain_us`), and PyTorch's `add_`
    (`torch_add_us`). `unit_us` is the tick as the decoder launches now (LONGSPEC_PDL): the launch-bound unit."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("the cost of a kernel boundary is a GPU measurement: run it on a machine with a CUDA GPU")
    x = torch.zeros(1, dtype=torch.int32, device=device)
    y = torch.zeros(1, device=device)
    pdl_ok = device_can_pdl(device)
    out = {
        "n": n,
        "tick_plain_us": _replay_us(lambda: tick(x, pdl=False), n, reps),
        "tick_pdl_us": _replay_us(lambda: tick(x, pdl=True), n, reps) if pdl_ok else None,
        "torch_add_us": _replay_us(lambda: y.add_(1), n, reps),
        "pdl": pdl_enabled(device),
    }
    out["unit_us"] = out["tick_pdl_us"] if out["pdl"] else out["tick_plain_us"]
    return out


def barrier_cost_us(device="cuda", n_phases: int = 64, programs=(1, 16, 0), reps: int = 20) -> dict:
    """What one grid-wide barrier costs, per phase of a persistent kernel of n_phases (one launch, replayed from a
    CUDA graph): for each program count (0: one per SM) the microseconds per phase, with the floor beside them (one
    program, no barrier: a phase's own dependent load and store) and a check that the barrier kept every phase's
    reads after the writes of the phase before (the result equals `phases_reference`, no spin gave up)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("the cost of a grid barrier is a GPU measurement: run it on a machine with a CUDA GPU")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    counters = torch.zeros(3, dtype=torch.int32, device=device)
    rows = []
    for n, barrier in [(1, False)] + [(p or sms, True) for p in programs]:
        x = torch.zeros(2, n, dtype=torch.int32, device=device)
        for _ in range(3):  # correctness first, outside any graph
            phases(x, counters, n_phases, barrier)
        torch.cuda.synchronize()
        ok = torch.equal(x.cpu(), phases_reference(n, n_phases, 3)) and int(counters[2]) == 0
        counters.zero_()
        if not ok:  # a barrier that does not hold (or gave up) is not timed: it would time the give-ups
            rows.append({"programs": n, "barrier": barrier, "us_per_phase": None, "launch_us": None, "ok": False})
            continue
        us = _replay_us(lambda x=x, n=n, barrier=barrier: phases(x, counters, n_phases, barrier), 1, reps)
        rows.append({"programs": n, "barrier": barrier, "us_per_phase": us / n_phases, "launch_us": us, "ok": ok})
    return {"n_phases": n_phases, "sms": sms, "pdl": pdl_enabled(device), "rows": rows}


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.kernels.launch",
        description="What one kernel boundary costs inside a replayed CUDA graph (the smallest Triton kernel "
        "launched with programmatic dependent launch and without, and PyTorch's add_, per kernel of a chain), and "
        "what one grid-wide barrier of a persistent kernel costs (per phase, 1 to all-SM programs).",
    )
    ap.add_argument("--n", type=int, default=200, help="kernels in the recorded chain (default 200)")
    ap.add_argument("--phases", type=int, default=64, help="phases of the persistent kernel (default 64)")
    ap.add_argument("--reps", type=int, default=20, help="timed replays; the median is reported (default 20)")
    ap.add_argument("--out", default=None, help="write the JSON report here, with its environment (never overwrites)")
    a = ap.parse_args(argv)
    if a.n < 1 or a.reps < 1 or a.phases < 1:
        ap.error("--n, --phases and --reps must be at least 1")
    if a.out and os.path.exists(a.out):
        ap.error(f"{a.out} exists; pick a new name or move it away")
    if not torch.cuda.is_available():
        ap.exit(2, "error: this times kernel launches on a GPU; no CUDA device is visible here\n")
    from longspec_lab.provenance import stamp, write_new_json

    rep = {"boundary": boundary_cost_us("cuda", a.n, a.reps), "barrier": barrier_cost_us("cuda", a.phases, reps=a.reps)}
    unit = rep["boundary"]["unit_us"]
    rows = [r for r in rep["barrier"]["rows"] if r["barrier"]]
    rep["barrier_vs_boundary"] = {str(r["programs"]): r["us_per_phase"] / unit for r in rows if r["ok"]}  # < 1: pays
    rep = stamp(rep, torch.device("cuda"), torch.int32)
    print(json.dumps(rep, indent=1))
    if a.out:
        write_new_json(a.out, rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
