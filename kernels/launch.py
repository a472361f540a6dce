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

A persistent kernel would trade those boundaries for waits inside one launch; `_phases_kernel` times one wait per
phase (`barrier_cost_us`: a grid-wide barrier, or a flag per producer that only its consumer polls), with 1, 16 and
one program per SM. The same command reports both costs, and their ratio to the boundary (`wait_vs_boundary`,
below 1 where the wait is the cheaper):

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


TICKET_SLOTS = 1 << 16  # arrival tickets per (device, stream); a kernel needing more falls back to a merge launch
_TICKETS: dict = {}  # (device, stream) -> int32 [TICKET_SLOTS], zero between launches


def tickets(device) -> torch.Tensor:
    """The arrival tickets of the kernels whose last program to arrive finishes the work (the fused merges, the
    beam's selection, the greedy tail): int32 [TICKET_SLOTS], zero between launches (each launch puts its slots
    back to 0), one buffer per (device, stream) so that streams never share a count. Allocated once and never
    freed: a CUDA graph keeps the address.

    A buffer made while its stream records a CUDA graph would be zeroed by a recorded memset, that is only when
    that graph replays, and another graph recording on the same stream would find it uninitialised. So the first
    call outside a capture also makes the buffer of the stream that `torch.cuda.graph` records on by default, and
    `capture_calls` warms up before it records: the usual pattern (run once, then record) finds zeroed tickets."""
    device = torch.device(device)
    if device.type != "cuda":
        key = (str(device), 0)
    else:
        if device.index is None:  # "cuda" and "cuda:0" are one device: one buffer a stream
            device = torch.device("cuda", torch.cuda.current_device())
        key = (str(device), torch.cuda.current_stream(device).cuda_stream)
    if key not in _TICKETS:
        if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            _default_capture_tickets(device)
        _TICKETS[key] = torch.zeros(TICKET_SLOTS, dtype=torch.int32, device=device)
    return _TICKETS[key]


def _default_capture_tickets(device: torch.device) -> None:
    """Make (zeroed, now) the tickets of the stream `torch.cuda.graph` records on when given none."""
    if torch.cuda.graph.default_capture_stream is None:
        torch.cuda.graph.default_capture_stream = torch.cuda.Stream()  # what torch.cuda.graph would create
    stream = torch.cuda.graph.default_capture_stream
    if stream.device != device:  # that stream lives on the device current when it was made
        return
    key = (str(device), stream.cuda_stream)
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(TICKET_SLOTS, dtype=torch.int32, device=device)
        torch.cuda.current_stream(device).synchronize()  # zeroed before the capture stream uses it


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


# A persistent kernel replaces kernel boundaries by waits inside one launch: a grid-wide barrier (every program
# arrives at one counter, then spins until all have), or, finer, a flag per producer that only its consumers wait
# for. Whether that pays is one number each: their cost against a boundary's. `_phases_kernel` runs N_PHASES phases
# of the smallest work that needs one: each program reads what ANOTHER program wrote in the phase before,
# x[k + 1][p] = x[k][(p + 1) % n] + 1 (row k + 1 of X is phase k's output, so no row is ever rewritten), and SYNC
# says how phase k + 1 knows that phase k's value is there:
#     SYNC_NONE      one program, no wait: the chain of dependent loads and stores alone (the floor of a phase)
#     SYNC_BARRIER   a grid-wide barrier after every phase
#     SYNC_FLAG      program p publishes "phase k done" in its own flag; program p waits only for p + 1's
#
# On the GPU every program must be resident at once, or a spinning program waits forever for one that cannot
# start: `phases` refuses more programs than the device has SMs, and each spin gives up after SPIN_LIMIT polls and
# raises the error flag instead of hanging. The CPU interpreter runs programs one after another, so only one
# program can pass a wait there (the tests run one; more raise the error flag, which the tests check too).
SPIN_LIMIT = 1 << 16  # about 50 ms of polling: a broken wait shows as the error flag within seconds, never a hang
SYNC_NONE, SYNC_BARRIER, SYNC_FLAG = 0, 1, 2
MAX_PROGRAMS = 256  # the flags of one launch: more than any GPU's SM count today (phases checks the real one)


@triton.jit
def _spin_until(PTR, target, ERR, SPIN_LIMIT: tl.constexpr):
    """Poll PTR (acquire, GPU scope) until it holds at least target; after SPIN_LIMIT polls give up and set ERR."""
    seen = tl.atomic_add(PTR, 0, sem="acquire", scope="gpu")
    polls = 0
    while (seen < target) & (polls < SPIN_LIMIT):
        seen = tl.atomic_add(PTR, 0, sem="acquire", scope="gpu")
        polls += 1
    if seen < target:
        tl.atomic_xchg(ERR, 1)


@triton.jit
def _phases_kernel(
    X,  # [N_PHASES + 1, n] int32: row 0 the input, row k + 1 what phase k writes
    COUNT,  # [1] int32 barrier arrivals (SYNC_BARRIER); zero at launch, and zeroed again by the last program out
    DONE,  # [1] int32 programs finished; likewise
    ERR,  # [1] int32 set to 1 when a wait gave up (SPIN_LIMIT polls): the result is then wrong
    FLAGS,  # [MAX_PROGRAMS] int32 per program: the phases it has finished (SYNC_FLAG); zeroed by the last out
    N_PHASES: tl.constexpr,  # phases
    SYNC: tl.constexpr,  # SYNC_NONE, SYNC_BARRIER or SYNC_FLAG (above)
    SPIN_LIMIT: tl.constexpr,  # polls before a wait gives up
    MAX_PROGRAMS: tl.constexpr,  # length of FLAGS, a power of two
    USE_PDL: tl.constexpr,  # programmatic dependent launch: wait for the kernel before, then let the next start
):
    if USE_PDL:  # before any other memory access, in every program
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    src = (pid + 1) % n  # the program whose value this one reads
    for k in range(N_PHASES):
        if SYNC == 2:
            if k > 0:  # its phase k - 1 must be done
                _spin_until(FLAGS + src, k, ERR, SPIN_LIMIT)
            tl.debug_barrier()
        v = tl.load(X + k * n + src, cache_modifier=".cg")  # L2, not this SM's L1: another program wrote it
        tl.store(X + (k + 1) * n + pid, v + 1)
        tl.debug_barrier()  # every thread's store issued before the release below publishes it
        if SYNC == 1:
            tl.atomic_add(COUNT, 1, sem="release", scope="gpu")
            _spin_until(COUNT, (k + 1) * n, ERR, SPIN_LIMIT)
            tl.debug_barrier()
        if SYNC == 2:
            tl.atomic_xchg(FLAGS + pid, k + 1, sem="release", scope="gpu")
    if SYNC != 0:  # the last program out resets the counters: every program has left its last wait by then
        if tl.atomic_add(DONE, 1, sem="acq_rel", scope="gpu") == n - 1:
            tl.atomic_xchg(COUNT, 0)
            tl.atomic_xchg(DONE, 0)
            offs = tl.arange(0, MAX_PROGRAMS)
            tl.store(FLAGS + offs, tl.zeros([MAX_PROGRAMS], dtype=tl.int32), mask=offs < n)


def phases(x: torch.Tensor, counters: torch.Tensor, sync: int = SYNC_BARRIER, pdl: bool | None = None):
    """Run `_phases_kernel` once: x [N_PHASES + 1, n] int32 (n programs; row 0 the input), counters int32
    [3 + MAX_PROGRAMS] (arrivals, finished, error flag, then the per-program flags; zero before the first call, and
    left so by each call). Returns x. Refuses more programs than the GPU has SMs (a wait on programs that cannot all
    be resident would never end); several programs with no wait would read each other's writes in no order, so
    SYNC_NONE takes one program."""
    if x.dim() != 2 or x.shape[0] < 2 or x.dtype != torch.int32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous int32 tensor [phases + 1, n], got {x.dtype} {list(x.shape)}")
    if counters.shape != (3 + MAX_PROGRAMS,) or counters.dtype != torch.int32:
        raise ValueError(
            f"counters must be int32 [{3 + MAX_PROGRAMS}] (arrivals, finished, error, then one flag per program), got "
            f"{counters.dtype} {list(counters.shape)}"
        )
    if sync not in (SYNC_NONE, SYNC_BARRIER, SYNC_FLAG):
        raise ValueError(f"sync must be SYNC_NONE, SYNC_BARRIER or SYNC_FLAG (0, 1, 2), got {sync!r}")
    n = x.shape[1]
    if sync == SYNC_NONE and n != 1:
        raise ValueError(f"SYNC_NONE runs one program (the floor of a phase); got {n}: pass x with one column")
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else MAX_PROGRAMS
    if n > min(sms, MAX_PROGRAMS):
        where = f"this GPU's {sms} SMs" if x.is_cuda and n > sms else f"the {MAX_PROGRAMS} flags"
        raise ValueError(f"{n} programs is more than {where}: a wait inside a launch needs every program resident")
    c = counters
    _phases_kernel[(n,)](x, c[0:], c[1:], c[2:], c[3:], N_PHASES=x.shape[0] - 1, SYNC=sync, SPIN_LIMIT=SPIN_LIMIT,
                         MAX_PROGRAMS=MAX_PROGRAMS, **launch_args(x.device, pdl))  # fmt: skip
    return x


def phases_reference(x0: torch.Tensor, n_phases: int) -> torch.Tensor:
    """x [n_phases + 1, n] as `phases` leaves it from the input row x0 [n]: row k + 1 is row k rolled by one, plus 1."""
    rows = [x0.to(torch.int32)]
    for _ in range(n_phases):
        rows.append(rows[-1].roll(-1) + 1)
    return torch.stack(rows)


def capture_calls(calls, warmup: int = 3, each: bool = False):
    """The package's one capture helper: run the callables in order `warmup` times on a side stream (compilation,
    autotuning, the allocator), then record them in order in one CUDA graph, or with `each` each in a graph of its
    own (a list, in order). Replay with `graph.replay()`. `decoding.graphs.capture` is this with `each`."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(s)
    graphs = []
    for group in [[c] for c in calls] if each else [calls]:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for call in group:
                call()
        graphs.append(g)
    torch.cuda.synchronize()
    return graphs if each else graphs[0]


CHAIN = 8  # calls per captured chain: each call's time is the graph's over CHAIN, PDL overlap included
L2_SPAN = 256 << 20  # a chain rotates through enough weight copies to read this many bytes (past any L2 today)


def weight_copies(N: int, K: int, dtype, device, generator, span: int = L2_SPAN) -> list[torch.Tensor]:
    """Enough random [N, K] weights (at least 2) to read `span` bytes in turn, so that a chain over them finds none
    in the L2, as a decoding step finds each layer's weight."""
    copies = max(2, -(-span // (N * K * torch.finfo(dtype).bits // 8)))
    return [torch.randn(N, K, device=device, generator=generator).mul_(0.02).to(dtype) for _ in range(copies)]


def chain_us(fn, x, weights, do_bench=None) -> float:
    """us per call of fn(x, w) in one captured graph of CHAIN calls, w rotating through `weights`
    (`weight_copies`), after warm-up: a projection timed as a step runs it, the weight read from memory and the
    boundaries overlapped under PDL."""
    import functools

    if do_bench is None:
        do_bench = triton.testing.do_bench
    g = capture_calls([functools.partial(fn, x, weights[i % len(weights)]) for i in range(CHAIN)])
    return do_bench(g.replay, warmup=10, rep=60) * 1e3 / CHAIN


def _replay_us(fn, n: int, reps: int) -> float:
    """Median device time of one call of fn inside a CUDA graph of n calls, replayed after warm-up (us per call)."""
    import time

    g = capture_calls([fn] * n)
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
    """What one wait inside a persistent kernel costs, per phase of a kernel of n_phases (one launch, replayed from
    a CUDA graph): for each program count (0: one per SM) a grid-wide barrier and a per-producer flag, with the
    floor beside them (one program, no wait: a phase's own dependent load and store), each first checked (the
    result equals `phases_reference` from a random input, no wait gave up; a form that fails is not timed)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("the cost of a wait in a kernel is a GPU measurement: run it on a machine with a CUDA GPU")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    counters = torch.zeros(3 + MAX_PROGRAMS, dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    forms = [(1, SYNC_NONE)] + [(p or min(sms, MAX_PROGRAMS), s) for p in programs for s in (SYNC_BARRIER, SYNC_FLAG)]
    for n, sync in forms:
        x = torch.zeros(n_phases + 1, n, dtype=torch.int32)
        x[0] = torch.randint(0, 1000, (n,), generator=gen, dtype=torch.int32)
        want = phases_reference(x[0], n_phases)
        x = x.to(device)
        ok = True
        for _ in range(3):  # correctness first, outside any graph: every launch rewrites rows 1.. from row 0
            phases(x, counters, sync)
            torch.cuda.synchronize()
            ok = ok and torch.equal(x.cpu(), want) and int(counters[2]) == 0
        counters.zero_()
        name = {SYNC_NONE: "none", SYNC_BARRIER: "barrier", SYNC_FLAG: "flag"}[sync]
        row = {"programs": n, "sync": name, "ok": ok, "us_per_phase": None, "launch_us": None}
        if ok:  # a wait that does not hold (or gave up) is not timed: it would time the give-ups
            us = _replay_us(lambda x=x, sync=sync: phases(x, counters, sync), 1, reps)
            torch.cuda.synchronize()
            held = torch.equal(x.cpu(), want) and int(counters[2]) == 0  # and it held in every timed replay
            row.update(ok=held, us_per_phase=us / n_phases if held else None, launch_us=us if held else None)
            counters.zero_()
        rows.append(row)
    return {"n_phases": n_phases, "sms": sms, "pdl": pdl_enabled(device), "rows": rows}


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.kernels.launch",
        description="What one kernel boundary costs inside a replayed CUDA graph (the smallest Triton kernel "
        "launched with programmatic dependent launch and without, and PyTorch's add_, per kernel of a chain), and "
        "what one wait inside a persistent kernel costs (a grid-wide barrier or a producer's flag, per phase, 1 to "
        "all-SM programs).",
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
    rows = [r for r in rep["barrier"]["rows"] if r["sync"] != "none" and r["ok"]]
    # below 1: that wait is cheaper than a kernel boundary, so folding kernels into one launch pays by itself
    rep["wait_vs_boundary"] = {f"{r['sync']}@{r['programs']}": r["us_per_phase"] / unit for r in rows}
    rep = stamp(rep, torch.device("cuda"), torch.int32)
    print(json.dumps(rep, indent=1))
    if a.out:
        write_new_json(a.out, rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
