"""RoPE tables in one launch: cos and sin for explicit positions, and the cache slots a decoding step writes.

Llama's rotary embedding (RoFormer, Su et al., arXiv 2104.09864; the rotate-half form transformers uses) turns
position p into the angles p * inv_freq[i], i < D/2. `models/layers.py: Rotary` and `ops/rope.py` build

    freqs = float32(p) * inv_freq                               # [N, D/2], float32
    cos, sin = cos(cat(freqs, freqs)), sin(cat(freqs, freqs))   # [N, D], rounded to the model's dtype

for every row (tree nodes share positions, so positions are explicit). A static-shape decoding step also needs
the cache slots its rows write: slots = start + arange(T), start a device tensor.

Why a kernel for so little arithmetic. Inside a compiled step every target layer's fused projection
(`kernels/norm_linear.py: qkv_rope_cache`, an opaque op to Inductor) takes the tables and the slots as inputs,
and Inductor materialises the computed inputs of such an op once per consumer: on the H200 the AR step ran one
table kernel per layer plus two more (10 of its 66 kernels, `data/results/profile_h200.json`, 2026-12-04). The
outputs of an opaque op are buffers that every layer reads as they are, so this one launch replaces them all.

One program writes BLOCK_N rows: it loads their positions and the frequencies, takes cos and sin in float32
(`tl.cos`, libdevice's cosf on CUDA: the function torch's CUDA cos and Inductor's generated code call), rounds
them to the table's dtype and stores each half twice; the programs that hold rows t < T also write the slots.

`rope_tables_reference` is the definition (the PyTorch ops above). `rope_tables` checks its input and calls the
registered op `torch.ops.longspec.rope_tables`, which torch.compile(fullgraph=True) keeps as one opaque op. `main`
times it against the PyTorch ops (eager and compiled), all replayed from CUDA graphs, and checks that the tables
are the same bits:

    python -m longspec_lab.kernels.rope --rows 1,72 --head-dim 64

Taught in: notebooks/07_timing_real_gpu_runs.ipynb
"""

import os

import torch
import triton
import triton.language as tl

from longspec_lab.kernels.launch import launch_args

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when the kernel below is defined
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_N = 16  # rows per program: a 72-row tree step is 5 programs, a decode row one


@triton.jit
def _rope_tables_kernel(
    POS,  # [N] int64 positions, all rows of all batches in order
    INV_FREQ,  # [HALF] float32 inverse frequencies
    COS,  # [N, 2 * HALF] output: cos of the angles, the table's dtype
    SIN,  # [N, 2 * HALF] output: sin of the angles
    START,  # [1] int64: the first cache slot (read when HAS_SLOTS)
    SLOTS,  # [T] int64 output: START + t (written when HAS_SLOTS)
    N,  # rows of the tables
    T,  # slots to write: the rows of one batch
    HALF: tl.constexpr,  # D / 2: frequencies per row
    BLOCK_H: tl.constexpr,  # HALF rounded up to a power of two (the column tile)
    BLOCK_N: tl.constexpr,  # rows per program
    HAS_SLOTS: tl.constexpr,  # whether to write SLOTS
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/launch.py): wait, then let the next start
):
    if USE_PDL:  # before any other memory access, in every program (kernels/launch.py)
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished and its writes are visible
        tl.extra.cuda.gdc_launch_dependents()  # the kernel after this one may start, and waits in turn
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cols = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    pos = tl.load(POS + rows, mask=rows < N, other=0).to(tl.float32)  # float32(p), as positions.float()
    inv = tl.load(INV_FREQ + cols, mask=cols < HALF, other=0.0)
    freqs = pos[:, None] * inv[None, :]  # [BLOCK_N, BLOCK_H] float32
    c = tl.cos(freqs).to(COS.dtype.element_ty)
    s = tl.sin(freqs).to(SIN.dtype.element_ty)
    offs = rows[:, None].to(tl.int64) * (2 * HALF) + cols[None, :]  # [BLOCK_N, BLOCK_H] first half
    keep = (rows[:, None] < N) & (cols[None, :] < HALF)
    tl.store(COS + offs, c, mask=keep)
    tl.store(COS + offs + HALF, c, mask=keep)  # cat(freqs, freqs): the second half repeats the first
    tl.store(SIN + offs, s, mask=keep)
    tl.store(SIN + offs + HALF, s, mask=keep)
    if HAS_SLOTS:
        start = tl.load(START)
        tl.store(SLOTS + rows, start + rows, mask=rows < T)


def rope_tables_reference(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, start=None):
    """The definition: positions [B, T] int64, inv_freq [D/2] -> cos, sin [B, T, D] in dtype, and the slots
    start + arange(T) [T] (None without a start)."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, D]
    slots = None if start is None else start + torch.arange(positions.shape[-1], device=positions.device)
    return emb.cos().to(dtype), emb.sin().to(dtype), slots


@torch.library.custom_op("longspec::rope_tables", mutates_args=())
def _rope_tables_op(
    positions: torch.Tensor, inv_freq: torch.Tensor, start: torch.Tensor | None, T: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`torch.ops.longspec.rope_tables`: positions [N] int64 (checked by `rope_tables`) -> cos, sin [N, D] and
    slots [T] (empty without a start)."""
    N, half = positions.shape[0], inv_freq.shape[0]
    cos = torch.empty(N, 2 * half, dtype=dtype, device=positions.device)
    sin = torch.empty_like(cos)
    slots = torch.empty(T if start is not None else 0, dtype=torch.int64, device=positions.device)
    if N:
        _rope_tables_kernel[(triton.cdiv(max(N, T if start is not None else 0), BLOCK_N),)](
            positions, inv_freq, cos, sin, positions if start is None else start, slots, N, slots.shape[0],
            HALF=half, BLOCK_H=triton.next_power_of_2(half), BLOCK_N=BLOCK_N, HAS_SLOTS=start is not None,
            **launch_args(positions.device),
        )  # fmt: skip
    return cos, sin, slots


@_rope_tables_op.register_fake
def _(positions, inv_freq, start, T, dtype):
    N, half = positions.shape[0], inv_freq.shape[0]
    cos = positions.new_empty(N, 2 * half, dtype=dtype)
    return cos, torch.empty_like(cos), positions.new_empty(T if start is not None else 0)


def _fail(problem: str, fix: str):
    raise ValueError(f"rope_tables: {problem}; {fix}")


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, start=None):
    """cos, sin [B, T, D] (dtype) of positions [B, T] (int64) with inv_freq [D/2] (float32), and the slots
    start + arange(T) [T] int64 when start [1] (int64) is given, else None: `rope_tables_reference`'s values in
    one kernel launch. On CUDA, or on the CPU under TRITON_INTERPRET=1."""
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.dtype != torch.int64:
        _fail(f"positions must be an int64 tensor [B, T], got {getattr(positions, 'dtype', type(positions))} "
              f"{list(getattr(positions, 'shape', []))}", "pass the rows' positions as torch.long [B, T]")  # fmt: skip
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or inv_freq.dtype != torch.float32:
        _fail("inv_freq must be a float32 tensor [D/2]", "pass Rotary.inv_freq (float32)")
    if dtype not in _DTYPES:
        _fail(f"the tables' dtype must be one of {', '.join(map(str, _DTYPES))}, got {dtype}", "pick the model's dtype")
    if start is not None and (not isinstance(start, torch.Tensor) or start.shape != (1,) or start.dtype != torch.int64):
        _fail("start must be an int64 tensor [1] (the first cache slot on the device)", "pass the decoder's P")
    if any(t.device != positions.device for t in (inv_freq, start) if t is not None):
        _fail("positions, inv_freq and start must be on one device", "move them to the model's device")
    if not (positions.is_cuda or _INTERPRET):
        _fail(f"it runs a Triton kernel and got tensors on {positions.device}",
              "pass CUDA tensors, or use rope_tables_reference on the CPU")  # fmt: skip
    B, T = positions.shape
    cos, sin, slots = _rope_tables_op(positions.reshape(-1).contiguous(), inv_freq.contiguous(), start, T, dtype)
    D = 2 * inv_freq.shape[0]
    return cos.view(B, T, D), sin.view(B, T, D), None if start is None else slots


def main(argv=None) -> int:
    """Time the kernel against the PyTorch ops making the same tables (CUDA), all replayed from CUDA graphs."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.kernels.rope",
        description=(
            "Time the RoPE-table kernel (cos, sin and the cache slots of a decoding step in one launch) against "
            "the PyTorch ops that define them, eager and compiled, each replayed from a CUDA graph; checks that "
            "the kernel's tables are the same bits as the PyTorch ops'. Prints medians in us."
        ),
    )
    ap.add_argument("--rows", default="1,72", help="comma-separated rows per step (1: AR; 72: a 69-node tree)")
    ap.add_argument("--head-dim", type=int, default=64, help="head dimension D (default 64, the embedded model)")
    ap.add_argument("--position", type=int, default=3000, help="position of the first row (default 3000)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", help="also write the medians, with the environment, to this JSON file (must not exist)")
    a = ap.parse_args(argv)
    try:
        rows = [int(r) for r in a.rows.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1 or a.head_dim < 2 or a.head_dim % 2 or a.position < 0:
        ap.error("need --rows as positive integers (e.g. 1,72), an even --head-dim >= 2 and --position >= 0")
    if a.out and os.path.exists(a.out):
        ap.exit(2, f"error: {a.out} exists; pick another --out or remove it first\n")
    if not torch.cuda.is_available():
        ap.exit(2, "error: the benchmark times a GPU kernel and needs CUDA; on the CPU the tests run the kernel in "
                   "Triton's interpreter (.venv/bin/pytest tests/unit/kernels/test_rope.py)\n")  # fmt: skip
    from triton.testing import do_bench_cudagraph

    dtype = getattr(torch, a.dtype)
    dev = torch.device("cuda")
    inv = 1.0 / (10000.0 ** (torch.arange(0, a.head_dim, 2, dtype=torch.float64, device=dev) / a.head_dim))
    inv = inv.float()
    start = torch.tensor([a.position], device=dev)
    compiled = torch.compile(rope_tables_reference, fullgraph=True, dynamic=False)
    report = {"head_dim": a.head_dim, "position": a.position, "dtype": a.dtype, "cases": []}
    for n in rows:
        g = torch.Generator().manual_seed(n)
        pos = (a.position + torch.randint(0, 8, (1, n), generator=g)).to(dev)  # tree rows: a few depths
        want = rope_tables_reference(pos, inv, dtype, start)
        got = rope_tables(pos, inv, dtype, start)
        same = all(torch.equal(x, y) for x, y in zip(got, want))
        diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(got[:2], want[:2]))
        us = {
            "kernel": do_bench_cudagraph(lambda: rope_tables(pos, inv, dtype, start), return_mode="median") * 1e3,
            "torch_eager": do_bench_cudagraph(
                lambda: rope_tables_reference(pos, inv, dtype, start), return_mode="median"
            )
            * 1e3,  # fmt: skip
            "torch_compiled": do_bench_cudagraph(lambda: compiled(pos, inv, dtype, start), return_mode="median") * 1e3,
        }
        report["cases"].append({"rows": n, "us": us, "bit_identical": same, "max_abs_diff": diff})
        verdict = "identical" if same else f"DIFFER by {diff:.3g}"
        print(f"rows={n} D={a.head_dim} {a.dtype}: kernel {us['kernel']:.2f} us, torch eager {us['torch_eager']:.2f}, "
              f"compiled {us['torch_compiled']:.2f}; tables {verdict}")  # fmt: skip
    if a.out:
        from longspec_lab.provenance import stamp, write_new_json

        write_new_json(a.out, stamp(report, dev, dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
