"""Where an 8B-shaped step's time goes: every kernel of a captured decode and verify, and each projection alone.

`verify_cost` times a Llama-3-8B-shaped decode (1 token) and verify (4 pending tokens + the 68-node tree) and
divides them by their floor, the bytes each must read over the copy bandwidth. When a step sits well above its
floor, the question is which kernels hold it there. This benchmark answers it in one run (LongSpec, arXiv
2502.17421, wants the verify to cost about one decode, and both near the bytes they read):

  kernels      one replay of each captured step under `torch.profiler`: every kernel's duration and its
               increment on the step's time line (`bench.profile.step_timeline`), summed per class (projection,
               attention, other), with the bytes/s the projections achieve on the weights they read;
  projections  each projection of the layer and the LM head alone, at 1, 16 and 72 rows, in a captured chain
               over weights rotating past the L2 (as a step reads them): cuBLAS (`F.linear`), the package's
               `norm_linear` kernel and, up to 16 rows, `stream_linear` (what the models call for weights this
               size under LONGSPEC_STREAM_LINEAR=auto), with achieved TB/s and the multiple of the copy-bandwidth
               floor;
  compiled     with --compile, the decode and the verify compiled with torch.compile (the form the decoder
               runs) and captured: their compile times apart, their replay times and their kernels;
  draft        with --draft, the draft step of a tree step (`verify_cost.draft_levels`: an 8B-shaped one-layer
               GliDe draft over the default tree's five levels, each with its LM head and beam selection),
               captured, and with --compile also compiled: per class of kernel against its floor (its weights,
               the LM head once per level, one layer of KV).

    python -m longspec_lab.bench.profile_8b --out F.json      # a CUDA GPU with about 20 GB free

Floors here count the bytes a step reads: every weight except the input embedding table (a step reads one row
of it per token), plus the KV cache up to the context.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb (the 8B-shaped steps: where the compiled decode's time goes)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

# a kernel whose name holds one of these is a projection (cuBLAS's GEMV / GEMM families, CUTLASS, the package's)
PROJECTION_MARKS = ("gemm", "gemv", "cutlass", "nvjet", "xmma", "splitk", "_norm_linear", "_stream_linear")
ATTENTION_MARKS = ("attn", "attention", "flash", "fmha", "sdpa")


def kernel_class(name: str) -> str:
    """The class of a CUDA kernel, from its name: "projection", "attention" or "other"."""
    low = name.lower()
    if any(m in low for m in ATTENTION_MARKS):  # first: flash's split-KV kernels are named "splitkv"
        return "attention"
    if any(m in low for m in PROJECTION_MARKS):
        return "projection"
    return "other"


def summarise(timeline: dict, projection_bytes: int, bw: float, top: int = 12) -> dict:
    """Per class of kernel: count, summed duration and summed increment (us); the projections' achieved bytes/s
    on `projection_bytes` (the weights the step reads) and that over the copy bandwidth `bw`; the `top` kernel
    names by summed increment. timeline: `bench.profile.step_timeline`'s output."""
    classes: dict[str, dict] = {}
    names: dict[str, list] = {}
    for name, _start, dur, inc in timeline["kernels"]:
        c = classes.setdefault(kernel_class(name), {"kernels": 0, "duration_us": 0.0, "increment_us": 0.0})
        c["kernels"] += 1
        c["duration_us"] += dur
        c["increment_us"] += inc
        row = names.setdefault(name, [name, 0, 0.0, 0.0])
        row[1] += 1
        row[2] += dur
        row[3] += inc
    proj = classes.get("projection")
    out = {"total_us": timeline["total_us"], "kernels": len(timeline["kernels"]), "classes": classes}
    if proj and proj["duration_us"] > 0:
        out["projection_TBps"] = projection_bytes / (proj["duration_us"] * 1e-6) / 1e12
        out["projection_vs_copy"] = out["projection_TBps"] * 1e12 / bw
    out["top"] = [[n, k, round(d, 2), round(i, 2)] for n, k, d, i in sorted(names.values(), key=lambda r: -r[3])][:top]
    return out


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """[N, K] of each projection of a layer (q/k/v and gate/up stacked, as the models hold them) and the LM head."""
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    return {
        "qkv": (qkv, cfg.hidden_size),
        "o_proj": (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
        "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size),
        "down": (cfg.hidden_size, cfg.intermediate_size),
        "lm_head": (cfg.vocab_size, cfg.hidden_size),
    }


def time_projections(cfg, bw: float, rows=(1, 16, 72), dtype=torch.bfloat16) -> list[dict]:
    """Each projection alone, per implementation: {"name", "rows", "impl", "us", "TBps", "x_floor"}. cuBLAS and
    `norm_linear` at every row count, `stream_linear` where it takes the rows (at most 16). Each is timed as a step
    runs it, in a captured chain over weights that rotate past the L2 (`kernels.launch.chain_us`, as
    `kernels.stream_linear`'s benchmark times it). (`profile_8b_h100.json`, recorded before, timed one launch per
    graph, where a weight the size of o_proj's may stay in the L2.)"""
    from longspec_lab.kernels.launch import chain_us, weight_copies
    from longspec_lab.kernels.norm_linear import norm_linear
    from longspec_lab.kernels.stream_linear import MAX_ROWS, stream_linear

    impls = {"cublas": (lambda x, w: F.linear(x, w), None), "norm_linear": (lambda x, w: norm_linear(x, w), None),
             "stream_linear": (lambda x, w: stream_linear(x, w), MAX_ROWS)}  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for name, (N, K) in projection_shapes(cfg).items():
        weights = weight_copies(N, K, dtype, "cuda", g)
        for M in rows:
            x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
            nbytes = (N * K + M * K + M * N) * weights[0].element_size()
            for impl, (fn, most) in impls.items():
                if most is not None and M > most:
                    continue
                try:
                    us = chain_us(fn, x, weights)
                except Exception as e:  # a form that does not serve this shape: say why
                    out.append({"name": name, "rows": M, "impl": impl, "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                out.append({"name": name, "rows": M, "impl": impl, "us": us, "TBps": nbytes / (us * 1e-6) / 1e12,
                            "x_floor": us * 1e-6 / (nbytes / bw)})  # fmt: skip
        del weights
    return out


def step_bytes(target, context: int, rows: int) -> tuple[int, int]:
    """(projection weight bytes, all bytes) one step of `rows` tokens at `context` must read: the weights
    (`verify_cost.read_weight_bytes`: the input embedding table a row per token) and the KV cache up to the
    context plus the rows; the projections' share leaves out the norms and the embedding rows."""
    from longspec_lab.bench.verify_cost import read_weight_bytes

    cfg = target.config
    emb = target.model.embed_tokens.weight
    weights = read_weight_bytes(target, rows)
    kv = (context + rows) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * emb.element_size()
    small = sum(p.numel() * p.element_size() for p in target.parameters() if p.dim() == 1)
    if emb is not target.lm_head.weight:
        small += rows * emb.shape[1] * emb.element_size()
    return weights - small, weights + kv


def profile_steps(target, context: int, bw: float, backend: str = "triton", compile_steps: bool = False) -> dict:
    """Decode and verify at `context`, captured, each replayed once under the profiler; with compile_steps both
    also compiled (compile times apart) and captured."""
    import triton

    from longspec_lab.bench.profile import _profiled_kernels, step_timeline
    from longspec_lab.bench.verify_cost import compile_timed, verify_block
    from longspec_lab.decoding.graphs import capture

    dev = torch.device("cuda")
    mask, offsets = verify_block(device=dev)
    T = mask.shape[0]
    cache = target.new_cache(context + T + 8)
    cache.k[:, :, :, :context].normal_(0, 1)
    cache.v[:, :, :, :context].normal_(0, 1)
    Pt = torch.tensor([context], device=dev)
    x1 = torch.zeros(1, 1, dtype=torch.long, device=dev)
    xT = torch.zeros(1, T, dtype=torch.long, device=dev)
    pos = context + offsets

    def dec():
        return target(x1, positions=Pt, cache=cache, start=Pt, backend=backend, last_only=True)

    def ver():
        return target(xT, positions=pos, cache=cache, start=Pt, mask=mask, backend=backend)

    out = {"context": context, "backend": backend}
    forms = [("decode", dec, 1), ("verify", ver, T)]
    with torch.inference_mode():
        for kind, fn, rows in list(forms) if compile_steps else []:  # compiled under inference mode, as replayed
            compiled, out[f"{kind}_compile_s"] = compile_timed(fn, dev)
            forms.append((f"{kind}_compiled", compiled, rows))
        for kind, fn, rows in forms:
            g = capture([fn])[0]
            proj_bytes, all_bytes = step_bytes(target, context, rows)
            ms = triton.testing.do_bench(g.replay, warmup=5, rep=40)
            tl = step_timeline(_profiled_kernels(g.replay), {})
            out[kind] = {"ms": ms, "floor_ms": all_bytes / bw * 1e3, "x_floor": ms * 1e-3 / (all_bytes / bw),
                         **summarise(tl, proj_bytes, bw)}  # fmt: skip
            del g
    return out


def profile_draft(target, context: int, bw: float, compile_step: bool = False) -> dict:
    """The draft step at `context`, captured (and with compile_step also compiled and captured), each replayed
    once under the profiler, as `profile_steps` does the target's steps."""
    import triton

    from longspec_lab.bench.profile import _profiled_kernels, step_timeline
    from longspec_lab.bench.verify_cost import compile_timed, draft_levels, verify_block
    from longspec_lab.decoding.graphs import capture

    dev = torch.device("cuda")
    cache = target.new_cache(context + verify_block()[0].shape[0] + 8)
    cache.k[-1:, :, :, :context].normal_(0, 1)  # the draft reads the last layer's cache only
    cache.v[-1:, :, :, :context].normal_(0, 1)
    out = {"context": context}
    with torch.inference_mode():
        fns, nbytes = draft_levels(target, cache, context, torch.bfloat16, dev)
        floor, proj_bytes = nbytes["floor"], nbytes["projections"]

        def step():
            return [f() for f in fns]

        forms = [("draft", step)]
        if compile_step:
            compiled, out["draft_compile_s"] = compile_timed(step, dev)
            forms.append(("draft_compiled", compiled))
        for kind, fn in forms:
            g = capture([fn])[0]
            ms = triton.testing.do_bench(g.replay, warmup=5, rep=40)
            tl = step_timeline(_profiled_kernels(g.replay), {})
            out[kind] = {"ms": ms, "floor_ms": floor / bw * 1e3, "x_floor": ms * 1e-3 / (floor / bw),
                         "levels_floor_ms": nbytes["levels"] / bw * 1e3,  # five sequential levels read no less
                         **summarise(tl, proj_bytes, bw)}  # fmt: skip
            del g
    return out


def main(argv=None) -> int:
    from longspec_lab.bench.verify_cost import copy_bandwidth, random_target
    from longspec_lab.models.config import PRESETS
    from longspec_lab.provenance import environment

    ap = argparse.ArgumentParser(
        prog="python -m longspec_lab.bench.profile_8b",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--contexts", default="4096,32768", help="comma-separated contexts (default: %(default)s)")
    ap.add_argument("--backend", default="triton", help="attention backend of the steps (default: %(default)s)")
    ap.add_argument("--compile", action="store_true", help="also compile decode and verify at the first context")
    ap.add_argument("--no-projections", action="store_true", help="skip the projections alone")
    ap.add_argument("--draft", action="store_true", help="also profile the draft step (compiled too with --compile)")
    ap.add_argument("--no-steps", action="store_true", help="skip the target's decode and verify")
    ap.add_argument("--out", required=True, help="the JSON report (must not exist; rewritten as each part finishes)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.exit(2, "error: profile_8b needs a CUDA GPU with about 20 GB free (an 8B-shaped model in bf16)\n")
    out = Path(a.out)
    if out.exists():
        ap.exit(2, f"error: {out} exists; pick another --out (recorded results are never overwritten)\n")
    contexts = [int(c) for c in a.contexts.split(",") if c.strip()]
    env = environment("cuda", torch.bfloat16)
    cfg = PRESETS["llama3-8b"]
    bw = copy_bandwidth(torch.device("cuda"))
    rep: dict = {"schema_version": env["schema_version"], "copy_bandwidth_TBps": bw / 1e12, "complete": False}

    def write():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**rep, "environment": env}, indent=1) + "\n")

    if not a.no_projections:
        rep["projections"] = time_projections(cfg, bw)
        for r in rep["projections"]:
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        write()
    target = random_target(cfg, torch.device("cuda"), torch.bfloat16)
    for key, wanted, run in (
        ("steps", not a.no_steps, lambda P, first: profile_steps(target, P, bw, a.backend, a.compile and first)),
        ("draft", a.draft, lambda P, first: profile_draft(target, P, bw, a.compile and first)),
    ):
        if not wanted:
            continue
        rep[key] = []
        for i, P in enumerate(contexts):
            rep[key].append(run(P, i == 0))
            print(json.dumps(rep[key][-1])[:3000], flush=True)
            write()
    rep["complete"] = True
    write()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
