"""Why checking 72 tokens costs about one decoding step: a roofline cost model of one target pass,
the measured H200 points, and repeated timings (medians with their spread) on this machine.

One target pass over r query rows at context L reads the weights once and the KV cache of the L
context tokens once, whatever r is; its arithmetic grows with r (2 FLOPs per weight per row, plus
4 * r * L * d_attn per layer of attention). While the bytes dominate, a pass over 72 rows (the 4
pending tokens and 68 tree nodes of LongSpec's [4, 16, 16, 16, 16], arXiv 2502.17421) costs about
what a 1-row decode step costs. Two bounds bracket a real pass:

    floor     t = max(bytes / BW, flops / F)   (reads and arithmetic fully overlapped)
    no overlap  t = bytes / BW + flops / F     (one after the other)

`ratio_curve` gives t(r rows) / t(1 row) against context for both. `repeat` times a function a few
times and keeps the median, the minimum and the maximum, so one noisy run cannot flip a ranking.

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from longspec_lab.decoding.timing import fastest_form, method_name


@dataclass(frozen=True)
class ModelCost:
    """The few numbers of a dense decoder that fix the bytes and FLOPs of one pass."""

    params: float  # weights read per pass
    num_layers: int
    attn_dim: int  # query heads x head_dim (the width of QK^T and PV per row)
    kv_bytes_per_token: float  # K and V of all layers for one context token
    bytes_per_param: float = 2.0  # bf16

    @classmethod
    def llama3_8b(cls) -> "ModelCost":
        # 8.03 B weights, of which a pass reads 7.50 B: the untied 128,256 x 4,096 input embedding table is read a
        # row per token (bench.verify_cost.read_weight_bytes); 32 layers, 32 query heads x 128, 8 KV heads x 128, bf16
        return cls(params=8.03e9 - 128256 * 4096, num_layers=32, attn_dim=4096, kv_bytes_per_token=32 * 2 * 8 * 128 * 2)

    def scaled(self, params: float) -> "ModelCost":
        """The same family at another size: layers and widths grow so that params ~ 12 L d^2."""
        f = params / self.params
        return replace(
            self,
            params=params,
            num_layers=max(1, round(self.num_layers * f ** (1 / 3))),
            attn_dim=max(64, round(self.attn_dim * f ** (1 / 3))),
            kv_bytes_per_token=self.kv_bytes_per_token * f ** (2 / 3),
        )


@dataclass(frozen=True)
class Hardware:
    bandwidth: float  # bytes / s
    flops: float  # FLOP / s (matrix units, the pass's dtype)
    name: str = ""

    @classmethod
    def h200(cls) -> "Hardware":
        # measured on the H200 this project used: copy 4.27 TB/s, bf16 matmul 687 TFLOP/s
        return cls(4.27e12, 687e12, "H200 (measured copy bandwidth and matmul rate)")


def pass_bytes(m: ModelCost, rows: int, context: int) -> float:
    """Weights + the context's KV read once + the new rows' KV written."""
    return m.params * m.bytes_per_param + (context + rows) * m.kv_bytes_per_token


def pass_flops(m: ModelCost, rows: int, context: int) -> float:
    """2 FLOPs per weight per row + QK^T and PV (2 * 2 * rows * keys * attn_dim per layer)."""
    return 2.0 * m.params * rows + 4.0 * rows * (context + rows) * m.attn_dim * m.num_layers


def pass_seconds(m: ModelCost, hw: Hardware, rows: int, context: int, overlap: bool = True) -> float:
    if rows < 1 or context < 0:
        raise ValueError(f"rows={rows} and context={context}: a pass needs rows >= 1 and context >= 0")
    tb, tf = pass_bytes(m, rows, context) / hw.bandwidth, pass_flops(m, rows, context) / hw.flops
    return max(tb, tf) if overlap else tb + tf


def ratio_curve(m: ModelCost, hw: Hardware, rows: int, contexts: Sequence[int]) -> dict[str, list[float]]:
    """t(rows) / t(1) at each context: 'floor' (overlapped) and 'no_overlap' bounds."""
    out = {"context": [int(c) for c in contexts], "floor": [], "no_overlap": []}
    for c in contexts:
        for key, ov in (("floor", True), ("no_overlap", False)):
            out[key].append(pass_seconds(m, hw, rows, c, ov) / pass_seconds(m, hw, 1, c, ov))
    return out


def ridge_rows(m: ModelCost, hw: Hardware, context: int) -> int:
    """The fewest rows at which the overlapped pass turns compute bound at this context."""
    lo, hi = 1, 1 << 20
    if pass_flops(m, hi, context) / hw.flops < pass_bytes(m, hi, context) / hw.bandwidth:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if pass_flops(m, mid, context) / hw.flops >= pass_bytes(m, mid, context) / hw.bandwidth:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ----------------------------------------------------------------------------- repeated timings


def repeat(fn: Callable[[], object], n: int = 5, warmup: int = 1, device: str | None = None) -> dict:
    """Run fn `warmup` + `n` times; seconds of the timed runs with their median, min and max.
    On CUDA the device is synchronised around each run."""
    if n < 1:
        raise ValueError(f"n={n}: time at least one run")
    sync = torch.cuda.synchronize if (device or "").startswith("cuda") and torch.cuda.is_available() else None
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(n):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        runs.append(time.perf_counter() - t0)
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs}


def measure_pass_ratio(target, ids: Sequence[int], contexts: Sequence[int], rows: int = 72, n: int = 5) -> list[dict]:
    """Time one target pass of `rows` rows and of 1 row after each context length (a prefix of `ids`),
    `n` runs each after a warm-up: rows / 1-row median ratio with the spread (min and max of the
    per-run ratios taken in run order)."""
    contexts = sorted(int(c) for c in contexts)
    if not contexts or contexts[-1] + rows > len(ids) + rows and contexts[-1] > len(ids):
        raise ValueError(f"contexts {contexts} exceed the {len(ids)} prompt tokens; pass a longer prompt")
    dev = target.device
    x = torch.as_tensor(list(ids), device=dev)[None]
    cache = target.new_cache(contexts[-1] + rows)
    out = []
    with torch.inference_mode():
        target(x[:, : contexts[-1]], cache=cache, start=0, last_only=True)
        for c in contexts:
            cache.length = c
            blocks = {r: x[:, c - r : c] if c >= r else x[:, :r] for r in (1, rows)}
            t = {
                r: repeat(lambda r=r: target(blocks[r], cache=cache, start=c, last_only=True), n=n, device=str(dev))
                for r in (1, rows)
            }
            per_run = [a / b for a, b in zip(t[rows]["runs"], t[1]["runs"])]
            out.append(
                dict(
                    context=c,
                    ms_1=1e3 * t[1]["median"],
                    ms_rows=1e3 * t[rows]["median"],
                    ratio=t[rows]["median"] / t[1]["median"],
                    ratio_min=min(per_run),
                    ratio_max=max(per_run),
                    runs=n,
                )
            )
        cache.length = contexts[-1]
    return out


def step_ms(row: dict, kind: str, backend: str = "triton") -> tuple[float, str]:
    """(ms, form) of a verify_8b row's `kind` step ("decode" or "verify") for `backend`, or of its draft step
    (kind "draft"): the fastest form recorded (`decoding.timing.fastest_form`: compiled and captured where the run
    compiled that context, else captured, else eager), as the benchmark's own ratios take it."""
    stem = "draft_step" if kind == "draft" else f"{backend}_{kind}"
    found = fastest_form(row, stem)
    if found is None:
        raise ValueError(f"this row has no {stem} timing; pass a row of data/results/verify_8b_*.json")
    return found


def recorded_ratio_points(verify_8b: dict) -> list[dict]:
    """verify_8b_*.json -> per context the measured verify / decode ratio (Triton backend, each step in its fastest
    recorded form: compiled and CUDA-graph captured where the run compiled it)."""
    pts = []
    for r in verify_8b.get("rows", []):
        try:
            (v, form), (d, _) = step_ms(r, "verify"), step_ms(r, "decode")
        except ValueError:
            continue
        pts.append(dict(context=r["context"], ratio=v / d, verify_ms=v, decode_ms=d, form=form))
    if not pts:
        raise ValueError("this result has no triton verify and decode timings; pass data/results/verify_8b_*.json")
    return pts


# ----------------------------------------------------------------------------- the speedup, term by term


def speedup_terms(verify_8b: dict, tau: float) -> list[dict]:
    """Per context of verify_8b_*.json: ms per generated token of the draft, verify and commit terms (each step's
    cost / tau), the decode step it replaces, and the projected speedup tau * t_decode / (t_draft + t_verify +
    t_commit); draft, decode and verify in their fastest recorded form (`step_ms`), the commit captured."""
    if tau < 1:
        raise ValueError(f"tau={tau} < 1: a step emits at least one token")
    out = []
    for r in verify_8b["rows"]:
        d, c = step_ms(r, "draft")[0], r["commit_graph_ms"]
        v, dec = step_ms(r, "verify")[0], step_ms(r, "decode")[0]
        out.append(
            dict(
                context=r["context"],
                draft=d / tau,
                verify=v / tau,
                commit=c / tau,
                decode=dec,
                speedup=tau * dec / (d + v + c),
            )
        )
    return out


LLAMA3_8B_HEAD_BYTES = 128256 * 4096 * 2  # the LM head an 8B-shaped draft shares with its target, bf16


def draft_levels_floor_ms(floor_ms: float, bandwidth_TBps: float, head_bytes: float = LLAMA3_8B_HEAD_BYTES,
                          levels: int = 5) -> float:  # fmt: skip
    """The floor of a draft step's `levels` sequential levels, from the goal's floor (`floor_ms`: the draft layer's
    weights and one layer of KV read once, the LM head once per level): each level reads its layer and its layer
    of KV again, so levels x floor less the (levels - 1) x levels extra heads that product counts. Recorded runs
    since 2026-12-05 evening carry it (`draft_levels_floor_bytes`, `levels_floor_ms`); this derives it for the
    others."""
    if levels < 1 or floor_ms <= 0 or bandwidth_TBps <= 0:
        got = f"levels={levels}, floor_ms={floor_ms}, bandwidth_TBps={bandwidth_TBps}"
        raise ValueError(f"need levels >= 1 and a positive floor and bandwidth; got {got}")
    return levels * floor_ms - (levels - 1) * levels * head_bytes / (bandwidth_TBps * 1e12) * 1e3


def time_methods(
    decoder, prompt_ids, shape, gamma: int = 4, n: int = 3, max_new_tokens: int = 64, trace: bool = False
) -> list[dict]:
    """ar, chain (gamma) and tree (shape) on the same prompt, each `n` times after a warm-up:
    tokens/s median, min and max over the runs, tau (the same in every run: greedy) and, under
    "result", the last run's GenerationResult (with its trace when `trace`)."""
    runs = {
        "ar": dict(method="ar"),
        method_name("chain", gamma=gamma): dict(method="chain", gamma=gamma),
        method_name("tree", shape=shape): dict(method="tree", tree_shape=list(shape)),
    }
    out = []
    for label, kw in runs.items():
        decoder.generate(prompt_ids, max_new_tokens=min(8, max_new_tokens), stop_at_eos=False, **kw)  # warm-up
        speeds, tau = [], None
        for _ in range(n):
            r = decoder.generate(
                prompt_ids, max_new_tokens=max_new_tokens, stop_at_eos=False, trace=trace and kw["method"] != "ar", **kw
            )
            speeds.append(r.tokens_per_s)
            tau = r.tau
        out.append(
            dict(
                method=label,
                tau=tau,
                tokens_per_s=statistics.median(speeds),
                tokens_per_s_min=min(speeds),
                tokens_per_s_max=max(speeds),
                runs=n,
                result=r,
            )
        )
    return out
