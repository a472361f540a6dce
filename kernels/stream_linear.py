"""A few rows through a large weight at the copy-bandwidth floor: split-K, the weight read before the wait.

A decode step of an 8B model reads 15 GB of weights for one token, so each projection is a matrix-vector
product whose floor is its weight's bytes over the copy bandwidth (LongSpec, arXiv 2502.17421, counts on the
verify costing about one decode, and a decode costing its bytes). Profiled on an H100 (2026-12-05,
`data/results/profile_8b_h100.json`), a compiled 8B decode at 4k spent 5.64 of its 6.42 ms in cuBLAS's
projections, which read the weights at 0.89 of the copy bandwidth; alone, in a captured chain, q/k/v took 1.35x
its floor, o_proj 1.61x and down_proj 1.18x (`stream_linear_h100.json`). Each of those launches starts cold:
cuBLAS kernels do not use programmatic dependent launch, so a projection's first bytes are requested only once
the kernel before it has finished. This kernel was written to close that gap. Timed in the same session it did
not: it was slower than cuBLAS for every projection but the LM head, and the compiled decode took 7.91 ms
against 6.42 (`profile_8b_stream_on_h100.json`), so LONGSPEC_STREAM_LINEAR is off by default.

This kernel computes what `kernels/norm_linear.py` computes, for M <= MAX_ROWS rows and weights of any size:

    y = epilogue(RMSNorm(x) @ W^T)       epilogue: silu(gate) * up (GATED), + residual (HAS_RES)

Layout: the weight [N, K] is cut into BLOCK_N columns x (K / SPLIT) inputs; program (n, s) streams its slab in
K_STEPS steps of [BLOCK_N, BLOCK_K]. The first step's weight tile (a parameter, which no kernel of a step
writes) is loaded before the programmatic-dependent-launch wait (kernels/launch.py), so it is in flight while
the kernel before finishes. The rows x [M, K] (at most a few KiB) are read after the wait. The SPLIT programs
of a column tile write float32 partial products; the last of them to arrive (an arrival ticket per column tile,
left at zero) adds them up in split order, so the sum is deterministic, and applies the epilogue. With SPLIT = 1
the program applies it directly.

The norm is applied after the matmul: each program accumulates the mean square of the inputs it reads, and
the last one scales the summed product by 1 / sqrt(mean square + eps). So the matmul multiplies x * norm_weight
rounded to x's dtype, where `norm_linear` multiplies the rounded normalised rows: the outputs agree with the
definition to the dtype's rounding, not bit for bit with `norm_linear`. The rest rounds as `norm_linear` does.

`stream_linear_reference` is the definition in float64 (the same as `norm_linear_reference`); `stream_linear`
checks its inputs and calls the registered op `torch.ops.longspec.stream_linear` (opaque to torch.compile, with
a fake version); `main` times it against cuBLAS (`F.linear`) on Llama-3-8B's projections, each call in a
captured chain over weights that do not fit the L2 cache, against the copy bandwidth measured in the same run
(`--sweep`: every tile choice of SWEEP too):

    python -m longspec_lab.kernels.stream_linear [--sweep] [--rows 1,16]

`longspec_lab/ops/linear.py` decides when the models use it (LONGSPEC_STREAM_LINEAR).

Taught in: notebooks/07_timing_real_gpu_runs.ipynb (the 8B-shaped steps: where the compiled decode's time goes)
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from longspec_lab.kernels.launch import TICKET_SLOTS, launch_args, tickets
from longspec_lab.kernels.norm_linear import check_inputs, norm_linear_reference
from longspec_lab.kernels.tree_attention import _sm_count, _sum

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_ROWS = 16  # rows a launch takes: one matrix-unit row tile (a decode, a draft level of up to 16 nodes)


@triton.jit
def _step(acc, acc_up, ss, x_rows, row_ok, kk, k_ok, w, wu, nw, HAS_NORM: tl.constexpr, GATED: tl.constexpr,
          IEEE: tl.constexpr):  # fmt: skip
    """One K step: the rows' inputs kk (read here), their mean-square partial, times the norm weight, into the
    float32 products with the weight tiles w (and wu: the up rows) [BLOCK_N, BLOCK_K]."""
    x = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
    if HAS_NORM:
        xf = x.to(tl.float32)
        ss += _sum(xf * xf, 1)
        x = (xf * nw.to(tl.float32)[None, :]).to(w.dtype)  # the norm's weight, rounded; 1 / rms comes last
    if IEEE:
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    if GATED:
        if IEEE:
            acc_up = tl.dot(x, tl.trans(wu), acc_up, input_precision="ieee")
        else:
            acc_up = tl.dot(x, tl.trans(wu), acc_up)
    return acc, acc_up, ss


@triton.jit
def _epilogue(acc, acc_up, ss, rows, row_ok, cols, col_ok, R, Y, stride_rm, stride_ym, K, eps,
              HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr, GATED: tl.constexpr):  # fmt: skip
    """The whole products [BLOCK_M, BLOCK_N] (float32) to the output: 1 / rms, rounding, SiLU product, residual."""
    dt = Y.dtype.element_ty
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(ss / K + eps)  # [BLOCK_M]
        acc = acc * rstd[:, None]
        acc_up = acc_up * rstd[:, None]
    y = acc.to(dt).to(tl.float32)  # the projection, rounded as a matmul's output
    if GATED:  # silu(gate) rounded, times up, as two ops in the dtype
        u = acc_up.to(dt).to(tl.float32)
        y = (y / (1.0 + tl.exp(-y))).to(dt).to(tl.float32) * u
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        r = tl.load(R + rows.to(tl.int64)[:, None] * stride_rm + cols[None, :], mask=ok, other=0.0)
        y = r.to(tl.float32) + y.to(dt).to(tl.float32)
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], y.to(dt), mask=ok)


@triton.jit
def _stream_linear_kernel(
    X,  # [M, K] input rows (M <= BLOCK_M), unit column stride
    W,  # [N or 2N, K] weight in nn.Linear layout; GATED: gate rows [0, N), then up rows [N, 2N)
    NW,  # [K] RMSNorm weight (read only if HAS_NORM)
    R,  # [M, N] residual added to the output (read only if HAS_RES)
    Y,  # [M, N] output, X's dtype
    PART,  # float32 [SPLIT, 1 or 2 (GATED), M, N] partial products (SPLIT > 1)
    SS,  # float32 [column tiles, SPLIT, M] partial sums of squares of the inputs (SPLIT > 1, HAS_NORM)
    TICKET,  # int32 [column tiles] arrivals per column tile, zero between launches (SPLIT > 1)
    M,  # rows
    N,  # output columns
    K,  # input features
    K_STEPS,  # BLOCK_K steps per split: split s reads inputs [s K_STEPS BLOCK_K, (s + 1) K_STEPS BLOCK_K)
    stride_xm,
    stride_wn,
    stride_rm,
    stride_ym,
    eps,  # RMSNorm epsilon
    HAS_NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    GATED: tl.constexpr,
    IEEE: tl.constexpr,  # float32 inputs: exact float32 products in tl.dot
    ONE_SPLIT: tl.constexpr,  # SPLIT == 1: the program applies the epilogue itself (no partials, no ticket)
    SPLIT,  # programs per column tile, each over its own K range
    BLOCK_M: tl.constexpr,  # rows (16: the matrix unit's smallest row tile)
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # input features per step
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_s * K_STEPS * BLOCK_K
    w_rows = W + cols.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    wu_rows = w_rows + N * stride_wn  # GATED: the up rows of the same columns
    # before the wait: the first step's weight tiles and norm weights, parameters no kernel of a step writes
    kk = k_lo + offs_k
    k_ok = kk < K
    w0 = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
    wu0 = w0
    if GATED:
        wu0 = tl.load(wu_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    nw0 = tl.zeros([BLOCK_K], dtype=w0.dtype)
    if HAS_NORM:
        nw0 = tl.load(NW + kk, mask=k_ok, other=0.0)
    if USE_PDL:  # before any access to what another kernel writes, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    rows = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = rows < M
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, acc_up, ss = _step(acc, acc_up, ss, x_rows, row_ok, kk, k_ok, w0, wu0, nw0, HAS_NORM, GATED, IEEE)
    for step in range(1, K_STEPS):  # the rest of the slab, software-pipelined
        kk = k_lo + step * BLOCK_K + offs_k
        k_ok = kk < K
        w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        wu = w
        if GATED:
            wu = tl.load(wu_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        nw = nw0
        if HAS_NORM:
            nw = tl.load(NW + kk, mask=k_ok, other=0.0)
        acc, acc_up, ss = _step(acc, acc_up, ss, x_rows, row_ok, kk, k_ok, w, wu, nw, HAS_NORM, GATED, IEEE)
    if ONE_SPLIT:
        _epilogue(acc, acc_up, ss, rows, row_ok, cols, col_ok, R, Y, stride_rm, stride_ym, K, eps,
                  HAS_NORM, HAS_RES, GATED)  # fmt: skip
    else:
        G: tl.constexpr = 2 if GATED else 1
        part = PART + rows[:, None] * N + cols[None, :]  # [BLOCK_M, BLOCK_N] of split 0, gate / plain
        ok = row_ok[:, None] & col_ok[None, :]  # only the rows the launch has: M x N floats a split, not BLOCK_M x N
        tl.store(part + (pid_s * G) * M * N, acc, mask=ok)
        if GATED:
            tl.store(part + (pid_s * G + 1) * M * N, acc_up, mask=ok)
        if HAS_NORM:
            tl.store(SS + (pid_n * SPLIT + pid_s) * M + rows, ss, mask=row_ok)
        tl.debug_barrier()  # every store of this program is issued before its ticket moves
        arrived = tl.atomic_add(TICKET + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:  # the last split of this column tile: the sum in split order, then the epilogue
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
            for s in range(SPLIT):
                acc += tl.load(part + (s * G) * M * N, mask=ok, other=0.0, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(part + (s * G + 1) * M * N, mask=ok, other=0.0,
                                      cache_modifier=".cg")  # fmt: skip
                if HAS_NORM:
                    ss += tl.load(SS + (pid_n * SPLIT + s) * M + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            _epilogue(acc, acc_up, ss, rows, row_ok, cols, col_ok, R, Y, stride_rm, stride_ym, K, eps,
                      HAS_NORM, HAS_RES, GATED)  # fmt: skip
            tl.atomic_xchg(TICKET + pid_n, 0)


def stream_linear_reference(x, weight, norm_weight=None, eps=1e-6, residual=None, gated=False):
    """The definition in float64 (`norm_linear_reference`): x [M, K] -> [M, N]."""
    return norm_linear_reference(x, weight, norm_weight, eps, residual, gated)


PLAN_OVERRIDE: Optional[tuple] = None  # (BLOCK_N, BLOCK_K, SPLIT, num_warps) for every launch: the sweep sets it
WAVES = 4  # programs to aim for per SM: splits are added until the grid has about this many per SM


def plan(M: int, N: int, K: int, gated: bool, sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT, K_STEPS, num_warps) for M rows through a weight of N output columns (gated: 2N
    rows) and K inputs on a device of `sms` SMs: 64 columns (32 gated, whose program reads two tiles) by 256
    inputs a step, and as many K splits as bring the grid to about WAVES programs per SM, each split an equal
    number of steps. PLAN_OVERRIDE, set by the sweep, replaces the tiles, the split count and the warps."""
    block_n, block_k, split, warps = PLAN_OVERRIDE or (32 if gated else 64, 256, 0, 4)
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    chunks = triton.cdiv(K, block_k)
    tiles = triton.cdiv(N, block_n)
    if not split:
        steps = max(1, (chunks * tiles) // (WAVES * sms))
        split = triton.cdiv(chunks, steps)
    split = max(1, min(split, chunks, 1 if tiles > TICKET_SLOTS else chunks))
    return block_n, block_k, split, triton.cdiv(chunks, split), warps


LAST_PLAN: dict = {}  # the latest launch's plan (the benchmark records it)


def _launch(x, weight, norm_weight, eps, residual, gated):
    M, K = x.shape
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    sms = _sm_count(x.device)  # 4 under the interpreter
    block_n, block_k, split, k_steps, warps = plan(M, N, K, gated, sms)
    LAST_PLAN.update(block_n=block_n, block_k=block_k, split=split, k_steps=k_steps, num_warps=warps)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(N, block_n)
    if split > 1:
        part = torch.empty(split * (2 if gated else 1) * M * N, dtype=torch.float32, device=x.device)
        ss = torch.empty(tiles * split * M if norm_weight is not None else 1, dtype=torch.float32,
                         device=x.device)  # fmt: skip
        arrivals = tickets(x.device)
    else:
        part = ss = arrivals = y  # unread
    _stream_linear_kernel[(tiles, split)](
        x, weight, x if norm_weight is None else norm_weight, x if residual is None else residual, y,
        part, ss, arrivals, M, N, K, k_steps, x.stride(0), weight.stride(0),
        0 if residual is None else residual.stride(0), y.stride(0), float(eps),
        HAS_NORM=norm_weight is not None, HAS_RES=residual is not None, GATED=gated, IEEE=x.dtype == torch.float32,
        ONE_SPLIT=split == 1, SPLIT=split, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=1 if _INTERPRET else 3, **launch_args(x.device),
    )  # fmt: skip
    return y


@torch.library.custom_op("longspec::stream_linear", mutates_args=())
def _stream_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    eps: float,
    residual: Optional[torch.Tensor],
    gated: bool,
) -> torch.Tensor:
    """`torch.ops.longspec.stream_linear`: x [M, K] (checked by `stream_linear`) -> y [M, N]."""
    return _launch(x, weight, norm_weight, eps, residual, gated)


@_stream_linear_op.register_fake
def _(x, weight, norm_weight, eps, residual, gated):
    return x.new_empty(x.shape[0], weight.shape[0] // 2 if gated else weight.shape[0])


def stream_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    residual: Optional[torch.Tensor] = None,
    gated: bool = False,
) -> torch.Tensor:
    """[..., K] rows (at most MAX_ROWS of them) -> [..., N]: `norm_linear`'s computation (RMSNorm if norm_weight,
    x @ weight^T, silu(gate) * up if gated, + residual), streamed for large weights. See the module docstring.
    On CUDA, or on the CPU under TRITON_INTERPRET=1. With PDL the weight and norm_weight are read before the
    kernel waits for the one launched before it: they must not be that kernel's output (models pass parameters)."""
    x2, w, nw, r2, _, lead, N = check_inputs("stream_linear", x, weight, norm_weight, residual, gated, None)
    if x2.shape[0] > MAX_ROWS:
        raise ValueError(
            f"stream_linear: {x2.shape[0]} rows, more than the {MAX_ROWS} one launch takes; "
            "use norm_linear (or F.linear) for more rows"
        )
    if x2.shape[0] == 0:
        return x.new_empty(*lead, N)
    return _stream_linear_op(x2, w, nw, float(eps), r2, bool(gated)).view(*lead, N)


# Llama-3-8B's projections as the models hold them ([N, K]; gate_up stacked, gated) and its LM head
LLAMA_8B = {
    "qkv": (6144, 4096, False),
    "o_proj": (4096, 4096, False),
    "gate_up": (28672, 4096, True),
    "down": (4096, 14336, False),
    "lm_head": (128256, 4096, False),
}
SWEEP = [(bn, bk, 0, w) for bn in (32, 64, 128) for bk in (128, 256, 512) for w in (4, 8) if bn * bk <= 32768]


def _copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + written), the floor every projection is divided by."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def main(argv=None) -> int:
    """Benchmark (CUDA): each Llama-3-8B projection at a few rows, cuBLAS against this kernel (its plan, and with
    --sweep each tile choice), per call in a captured chain, against the copy-bandwidth floor of the same run."""
    import argparse
    import json

    import torch.nn.functional as F

    ap = argparse.ArgumentParser(prog="python -m longspec_lab.kernels.stream_linear", description=main.__doc__)
    ap.add_argument("--rows", default="1,16", help="comma-separated row counts, each <= 16 (default: %(default)s)")
    ap.add_argument("--shapes", default=",".join(LLAMA_8B), help="which projections (default: %(default)s)")
    ap.add_argument("--sweep", action="store_true", help="also time every tile choice in SWEEP at each shape")
    ap.add_argument("--out", default=None, help="write the JSON report here (refuses to overwrite)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.exit(2, "error: the benchmark times CUDA kernels; run it on a machine with a CUDA GPU\n")
    if a.out and os.path.exists(a.out):
        ap.exit(2, f"error: {a.out} exists; pick another --out\n")
    rows = [int(r) for r in a.rows.split(",")]
    if any(not 1 <= r <= MAX_ROWS for r in rows):
        ap.exit(2, f"error: --rows must each be between 1 and {MAX_ROWS}\n")
    names = [n.strip() for n in a.shapes.split(",")]
    if any(n not in LLAMA_8B for n in names):
        ap.exit(2, f"error: --shapes takes names from {list(LLAMA_8B)}\n")
    from triton.testing import do_bench

    from longspec_lab.kernels.launch import CHAIN, chain_us, weight_copies
    from longspec_lab.provenance import stamp, write_new_json

    global PLAN_OVERRIDE
    dev = torch.device("cuda")
    bw = _copy_bandwidth()
    gen = torch.Generator(device=dev).manual_seed(0)
    report = {"copy_bandwidth_TBps": bw / 1e12, "chain": CHAIN, "rows": []}
    for name in names:
        N, K, gated = LLAMA_8B[name]
        weights = weight_copies(N, K, torch.bfloat16, dev, gen)
        nw = torch.ones(K, device=dev, dtype=torch.bfloat16)
        for M in rows:
            x = torch.randn(M, K, device=dev, generator=gen).bfloat16()
            floor_us = (N * K + M * K + M * N) * 2 / bw * 1e6
            forms = {"cublas": (lambda x, w: F.linear(x, w), None)}
            forms["stream"] = (lambda x, w: stream_linear(x, w, nw, 1e-5, gated=gated), None)
            for p in SWEEP if a.sweep else []:
                forms[f"stream {p[0]}x{p[1]} w{p[3]}"] = (forms["stream"][0], p)
            for form, (fn, p) in forms.items():
                PLAN_OVERRIDE = p
                try:
                    us = chain_us(fn, weights=weights, x=x, do_bench=do_bench)
                except Exception as e:  # a tile choice that does not fit this GPU: recorded, not fatal
                    report["rows"].append({"name": name, "rows": M, "form": form, "error": f"{e}"[:200]})
                    continue
                finally:
                    PLAN_OVERRIDE = None
                row = {"name": name, "rows": M, "form": form, "us": round(us, 2), "x_floor": round(us / floor_us, 3),
                       "TBps": round(N * K * 2 / (us * 1e-6) / 1e12, 3),
                       "plan": dict(LAST_PLAN) if form != "cublas" else None}  # fmt: skip
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
        del weights
    if a.out:
        write_new_json(a.out, stamp(report, dev, torch.bfloat16))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
