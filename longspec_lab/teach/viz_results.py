"""Pure figure functions for results: tau, timing, Pareto fronts, kernel timings, kernels per stage
(launch-bound against the rest) and one stage's kernels in launch order, the GliDe draft, sampling
distributions and the 8B verify/decode costs.

Like `viz.py` (trees and masks), every function maps data (results, `summary()` dicts or the JSON
files in data/results) to a plotly `Figure`, a `graphviz.Digraph` or an HTML table, and holds no
widget state. `viz` re-exports all of them, so notebooks use one namespace.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb (and the result figures of 04-06).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import graphviz
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from longspec_lab.decoding.timing import STEP_FORMS
from longspec_lab.teach.palette import METHOD, REFERENCE, _html, method_color, rule_color, series_color, stage_color
from longspec_lab.teach.palette import method_key as palette_key


def _color(label: str, k: int) -> str:
    """The palette's colour of a method or rule label; other labels get the k-th series colour."""
    for fn in (method_color, rule_color):
        try:
            return fn(label)
        except ValueError:
            pass
    return series_color(k)


def _stats(r) -> dict:
    """A GenerationResult or its summary() dict -> the numbers the plots need."""
    d = r.summary() if hasattr(r, "summary") else dict(r)
    missing = [k for k in ("tau", "tokens_per_s", "stage_seconds", "new_tokens") if k not in d]
    if missing:
        raise ValueError(f"result lacks {missing}; pass GenerationResult objects or their summary() dicts")
    n = d["new_tokens"] if isinstance(d["new_tokens"], int) else len(d["new_tokens"])
    return dict(d, n_new=n)


def _items(results) -> list[tuple[str, dict]]:
    pairs = (
        list(results.items())
        if isinstance(results, Mapping)
        else [(getattr(r, "method", None) or r["method"], r) for r in results]
    )
    if not pairs:
        raise ValueError("no results to plot; pass {label: GenerationResult} with at least one entry")
    return [(str(k), _stats(v)) for k, v in pairs]


def tau_figure(results, title: str = "Speculative decoding: tokens per target pass and speed") -> go.Figure:
    """Side by side: mean accepted length tau and tokens/s per method ({label: result})."""
    items = _items(results)
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.15,
        subplot_titles=("τ = generated tokens / target forward passes", "decoding speed (prefill excluded)"),
    )
    for k, (label, s) in enumerate(items):
        c = _color(label, k)
        for col, key, fmt in ((1, "tau", "{:.2f}"), (2, "tokens_per_s", "{:.0f}")):
            fig.add_trace(
                go.Bar(
                    x=[label],
                    y=[s[key]],
                    name=label,
                    marker_color=c,
                    legendgroup=label,
                    showlegend=col == 1,
                    text=[fmt.format(s[key])],
                    textposition="outside",
                ),
                row=1,
                col=col,
            )
    fig.update_yaxes(title_text="τ (tokens per target pass)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="new tokens per second", rangemode="tozero", row=1, col=2)
    fig.update_xaxes(title_text="method")
    top = max(s["tau"] for _, s in items)
    fig.update_yaxes(range=[0, top * 1.2 + 0.1], row=1, col=1)
    fig.update_layout(title=title, legend_title="method", height=420, width=900, bargap=0.35)
    return fig


def stage_times_figure(results, title: str = "Where the decoding time goes") -> go.Figure:
    """Stacked bars: milliseconds per new token spent in draft / verify / commit / other, per method."""
    items = _items(results)
    stages = ["draft", "verify", "commit", "other"]
    rows = {}
    for label, s in items:
        sec = dict(s["stage_seconds"])
        n = max(s["n_new"] - 1, 1)  # the first token comes from the prefill
        decode = s.get("wall_seconds", sum(sec.values())) - sec.get("prefill", 0.0)
        parts = {k: sec.get(k, 0.0) for k in stages[:3]}
        parts["other"] = max(decode - sum(parts.values()), 0.0)
        rows[label] = {k: 1e3 * v / n for k, v in parts.items()}
    fig = go.Figure()
    for k, st in enumerate(stages):
        fig.add_trace(
            go.Bar(y=list(rows), x=[rows[l][st] for l in rows], name=st, orientation="h", marker_color=stage_color(st))
        )
    fig.update_layout(
        barmode="stack",
        title=title,
        legend_title="stage",
        legend_traceorder="normal",
        height=140 + 50 * len(rows),
        width=820,
        xaxis_title="milliseconds per new token",
        yaxis_title="method",
    )
    fig.update_yaxes(autorange="reversed")
    return fig


def accepted_lengths_figure(result, title: str | None = None) -> go.Figure:
    """Tokens emitted per verification step (accepted drafts + the bonus token), with the mean."""
    acc = list(result.accepted_lengths)
    if not acc:
        raise ValueError("this result has no verification steps; generate more than one token")
    fig = go.Figure(
        go.Bar(x=list(range(1, len(acc) + 1)), y=acc, name="tokens this step", marker_color=_color(result.method, 0))
    )
    mean = sum(acc) / len(acc)
    fig.add_trace(
        go.Scatter(
            x=[0.5, len(acc) + 0.5],
            y=[mean, mean],
            mode="lines",
            name=f"mean over verify steps {mean:.2f} (τ = {result.tau:.2f} also counts the prefill pass)",
            line=dict(color=REFERENCE, dash="dash"),
        )
    )
    fig.update_layout(
        title=title or f"Tokens per target pass, step by step ({result.method})",
        height=320,
        width=820,
        xaxis_title="verification step (1-based)",
        yaxis_title="tokens emitted (incl. bonus)",
        legend_title="",
    )
    return fig


def pareto_front(
    points: Sequence[Mapping], x: str, y: str, minimize_x: bool = True, maximize_y: bool = True
) -> list[int]:
    """Indices of the points no other point beats on both x and y, sorted by x."""
    sx, sy = (1 if minimize_x else -1), (-1 if maximize_y else 1)
    key = [(sx * float(p[x]), sy * float(p[y])) for p in points]  # both "smaller is better" now
    front = [i for i, (a, b) in enumerate(key) if not any((c <= a and d <= b) and (c < a or d < b) for c, d in key)]
    return sorted(front, key=lambda i: float(points[i][x]))


def pareto_figure(
    points: Sequence[Mapping],
    x: str = "num_nodes",
    y: str = "tokens_per_s",
    label: str | None = "label",
    group: str | None = None,
    title: str | None = None,
    x_title: str | None = None,
    y_title: str | None = None,
    minimize_x: bool = True,
    maximize_y: bool = True,
    log_x: bool = False,
) -> go.Figure:
    """Scatter of `points` (dicts) with the Pareto front drawn as a line."""
    if not points:
        raise ValueError("no points to plot; pass a list of dicts with the x and y keys")
    fig = go.Figure()
    groups = sorted({str(p.get(group, "")) for p in points}) if group else [""]
    for k, gname in enumerate(groups):
        sel = [p for p in points if not group or str(p.get(group, "")) == gname]
        fig.add_trace(
            go.Scatter(
                x=[p[x] for p in sel],
                y=[p[y] for p in sel],
                mode="markers+text",
                name=gname or "runs",
                marker=dict(size=9, color=_color(gname, k)),
                text=[str(p.get(label, "")) for p in sel] if label else None,
                textposition="top center",
                textfont=dict(size=9),
            )
        )
    front = [points[i] for i in pareto_front(points, x, y, minimize_x, maximize_y)]
    fig.add_trace(
        go.Scatter(
            x=[p[x] for p in front],
            y=[p[y] for p in front],
            mode="lines",
            name="Pareto front",
            line=dict(color=REFERENCE, dash="dash"),
        )
    )
    fig.update_layout(
        title=title or f"{y} against {x}",
        xaxis_title=x_title or x,
        yaxis_title=y_title or y,
        legend_title=group or "",
        height=440,
        width=820,
    )
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def line_figure(
    series: Mapping[str, tuple[Sequence, Sequence]],
    title: str,
    x_title: str,
    y_title: str,
    log_x: bool = False,
    log_y: bool = False,
    colors: Mapping[str, str] | None = None,
) -> go.Figure:
    """Generic lines: {name: (xs, ys)}; a method or rule name gets its palette colour, `colors`
    overrides per name."""
    fig = go.Figure()
    for k, (name, (xs, ys)) in enumerate(series.items()):
        fig.add_trace(
            go.Scatter(
                x=list(xs),
                y=list(ys),
                mode="lines+markers",
                name=name,
                line=dict(color=(colors or {}).get(name) or _color(name, k)),
            )
        )
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=420, width=820)
    fig.update_xaxes(type="log" if log_x else "linear")
    fig.update_yaxes(type="log" if log_y else "linear")
    return fig


# ------------------------------------------------------------ tables, kernels, draft, sampling, GPU runs


def html_table(
    rows: Sequence[Mapping],
    columns: Sequence[str] | None = None,
    formats: Mapping[str, str] | None = None,
    title: str | None = None,
) -> str:
    """A small HTML table of dicts (for `IPython.display.HTML`): `columns` picks and orders the keys,
    `formats` maps a key to a format spec ("{:.2f}"); missing values show as "–"."""
    if not rows:
        raise ValueError("html_table got no rows; pass a non-empty list of dicts")
    columns = list(columns or rows[0].keys())
    formats = dict(formats or {})

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return "–"
        return _html(formats[c].format(v) if c in formats else str(v))

    head = "".join(f"<th style='text-align:left;padding:2px 8px'>{_html(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td style='padding:2px 8px'>{cell(r, c)}</td>" for c in columns) + "</tr>" for r in rows
    )
    cap = f"<caption style='text-align:left;font-weight:bold'>{_html(title)}</caption>" if title else ""
    return f"<table style='border-collapse:collapse;font-size:13px'>{cap}<tr>{head}</tr>{body}</table>"


def ab_rows(a: Mapping[str, Mapping], b: Mapping[str, Mapping], label_a: str = "A", label_b: str = "B") -> list[dict]:
    """One row per method present in both e2e `results` mappings ({method: {"tokens_per_s", "stage_us_per_step"}}):
    tokens/s under each, their ratio b / a, and the per-step verify and draft-level microseconds under each.
    For an A/B of one switch, both runs from the same session (e.g. LONGSPEC_NORM_LINEAR off against on)."""
    common = [m for m in a if m in b]
    if not common:
        raise ValueError(f"the two runs share no method ({sorted(a)} against {sorted(b)})")
    rows = []
    for m in common:
        ra, rb = a[m], b[m]
        sa, sb = ra.get("stage_us_per_step", {}), rb.get("stage_us_per_step", {})
        rows.append(
            {
                "method": m,
                f"{label_a} tok/s": ra["tokens_per_s"],
                f"{label_b} tok/s": rb["tokens_per_s"],
                f"{label_b} / {label_a}": rb["tokens_per_s"] / ra["tokens_per_s"],
                f"verify us ({label_a})": sa.get("verify"),
                f"verify us ({label_b})": sb.get("verify"),
                f"draft level us ({label_a})": sa.get("draft_level"),
                f"draft level us ({label_b})": sb.get("draft_level"),
            }
        )
    return rows


def log_ticks(values) -> list[float]:
    """1-2-5 tick values covering `values` (positive numbers), for readable log axes."""
    vals = [float(v) for v in values if v is not None and v > 0]
    if not vals:
        return []
    lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    ticks = [m * 10.0**e for e in range(lo, hi + 1) for m in (1, 2, 5)]
    keep = [t for t in ticks if min(vals) / 2.5 <= t <= max(vals) * 2.5]
    return [int(t) if t >= 1 and t == int(t) else t for t in keep]


def tokens_label(n: int) -> str:
    """4096 -> '4k', 131072 -> '128k' (multiples of 1024), else the number."""
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def spread_labels(fig: go.Figure) -> go.Figure:
    """Alternate the text labels of every markers+text trace above / below its points (in x order),
    so that the labels of neighbouring points do not overprint each other."""
    for t in fig.data:
        if t.mode and "text" in t.mode and t.x is not None:
            order = sorted(range(len(t.x)), key=lambda i: (t.x[i], t.y[i]))
            pos = [""] * len(t.x)
            for r, i in enumerate(order):
                pos[i] = "top center" if r % 2 == 0 else "bottom center"
            t.textposition = pos
    return fig


KERNEL_METHODS = {
    "triton_tree": "Triton split-KV tree kernel",
    "sdpa_dense": "SDPA, dense [T, P+T] mask",
    "two_pass": "flash prefix + masked tree + LSE merge",
    "flex": "FlexAttention",
}


def kernel_timing_figure(
    cases: Sequence[Mapping], name: str | None = None, dtype: str | None = None, title: str | None = None
) -> go.Figure:
    """Tree-attention time against prefix length (log-log), one line per method, with the bandwidth
    floor (bytes / copy bandwidth) and the compute floor (FLOPs / matmul rate). Left: do_bench
    (L2 flushed, launch overhead included); right: CUDA-graph replay (no host overhead).
    `cases`: the "cases" of kernels/bench_tree_attention.py's JSON; name/dtype pick one series."""
    name = name or cases[0]["name"]
    dtype = dtype or cases[0]["dtype"]
    sel = sorted((c for c in cases if c["name"] == name and c["dtype"] == dtype), key=lambda c: c["P"])
    if not sel:
        have = sorted({(c["name"], c["dtype"]) for c in cases})
        raise ValueError(f"no cases for name={name!r}, dtype={dtype!r}; pick one of {have}")
    xs = [c["P"] for c in sel]
    methods = [m for m in KERNEL_METHODS if any(m in c["methods"] for c in sel)]
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.06,
        subplot_titles=("do_bench median (L2 flushed, with launch overhead)", "CUDA-graph replay (no host overhead)"),
    )
    for col, key in ((1, "us"), (2, "us_graph")):
        for k, m in enumerate(methods):
            pts = [(c["P"], c["methods"][m].get(key)) for c in sel if m in c["methods"]]
            pts = [(x, y) for x, y in pts if y is not None]
            fig.add_trace(
                go.Scatter(
                    x=[p[0] for p in pts],
                    y=[p[1] for p in pts],
                    mode="lines+markers",
                    name=KERNEL_METHODS[m],
                    legendgroup=m,
                    showlegend=col == 1,
                    line=dict(color=method_color(m)),
                ),
                row=1,
                col=col,
            )
        for fk, label, dash in (
            ("floor_us", "bandwidth floor (bytes / copy BW)", "dot"),
            ("compute_floor_us", "compute floor (FLOPs / matmul rate)", "dash"),
        ):
            if all(fk in c for c in sel):
                fig.add_trace(
                    go.Scatter(
                        x=xs,
                        y=[c[fk] for c in sel],
                        mode="lines",
                        name=label,
                        legendgroup=fk,
                        showlegend=col == 1,
                        line=dict(color=REFERENCE, dash=dash),
                    ),
                    row=1,
                    col=col,
                )
    ys = [y for t in fig.data for y in t.y if y is not None]
    fig.update_xaxes(
        type="log", title_text="prefix length P (cached tokens)", tickvals=xs, ticktext=[tokens_label(x) for x in xs]
    )
    fig.update_yaxes(type="log", tickvals=log_ticks(ys))
    fig.update_yaxes(title_text="microseconds per call", row=1, col=1)
    T = sel[0].get("T")
    fig.update_layout(
        title=title
        or f"Tree attention, {name} ({sel[0].get('Hq')} q heads / {sel[0].get('Hkv')} kv "
        f"heads, {dtype.replace('torch.', '')}), T = {T} query rows",
        legend=dict(title="method", orientation="h", y=-0.25),
        height=520,
        width=980,
    )
    return fig


# the forms of the draft's window attention in kernels/masked_attention.py's JSON, in plotting order
MASKED_FORMS = {
    "kernel": "one kernel (keys split, last program merges)",
    "kernel_one_program": "one kernel, one program walks all keys",
    "math_compiled": "written out, compiled (two matmuls + softmax)",
    "torch_compiled": "PyTorch ops, compiled (two matmuls + softmax)",
    "sdpa": "one SDPA call",
}


def masked_attention_figure(split: Mapping, one_program: Mapping | None = None, title: str | None = None) -> go.Figure:
    """Grouped bars: microseconds per call of the draft's window attention against the query rows of a level,
    one bar per form, from kernels/masked_attention.py's JSON (`split`: the recorded default; `one_program`, if
    given, adds its first form, where one program walked all keys, as the "kernel_one_program" bar)."""
    cases = split.get("cases") if isinstance(split, Mapping) else None
    if not cases:
        raise ValueError(
            "no masked-attention cases: pass the JSON of `python -m longspec_lab.kernels.masked_attention`"
        )
    rows = [c["rows"] for c in cases]
    per_form = {f: [c["us"].get(f) for c in cases] for f in MASKED_FORMS if any(f in c["us"] for c in cases)}
    if one_program is not None:
        first = {c["rows"]: c["us"].get("kernel") for c in one_program.get("cases", [])}
        per_form = {"kernel": per_form.pop("kernel"), "kernel_one_program": [first.get(r) for r in rows], **per_form}
    fig = go.Figure()
    for k, (form, ys) in enumerate(per_form.items()):
        fig.add_trace(
            go.Bar(
                x=[f"{r} row{'s' if r > 1 else ''}" for r in rows],
                y=ys,
                name=MASKED_FORMS[form],
                text=[None if y is None else f"{y:.1f}" for y in ys],
                textposition="outside",
                marker_color=series_color(k),
            )
        )
    heads = split.get("heads", ["?", "?", "?"])
    fig.update_layout(
        title=title
        or f"The draft's window attention: {heads[0]} q heads / {heads[1]} kv heads of {heads[2]}, "
        f"{split.get('keys')} keys, CUDA-graph replay",
        xaxis_title="query rows per head (the level's width)",
        yaxis_title="microseconds per call",
        barmode="group",
        legend=dict(title="form", orientation="h", y=-0.25),
        height=480,
        width=980,
    )
    return fig


DECODER_CONFIG = (64, 4, 3)  # (BLOCK_N, warps, stages): the fixed config decoding runs (LONGSPEC_AUTOTUNE=0)


def _sweep_rows(sweep: Mapping) -> dict[str, dict]:
    """kernels/sweep_tree_attention.py's JSON -> {shape: {"merge": {n_splits: us}, "fused": {...}, "planned":
    (n_splits, us) or None, "sdpa": us or None, "shape": {...}}} for the decoder's config and BLOCK_M 64."""
    if not isinstance(sweep, Mapping) or not isinstance(sweep.get("shapes"), Mapping) or not sweep["shapes"]:
        raise ValueError("sweep has no 'shapes'; pass the dict of data/results/tree_attention_sweep_small_h200.json")
    out = {}
    elems = sweep.get("merge_elems_default")  # newer sweeps also time a smaller merge tile: leave those out
    for name, rec in sweep["shapes"].items():
        rows = [
            v
            for v in rec.get("variants", [])
            if "us" in v
            and list(v.get("config", [])) == list(DECODER_CONFIG)
            and v.get("BLOCK_M") == 64
            and v.get("merge_elems", elems) == elems
        ]
        if not rows:
            continue
        curves = {"merge": {}, "fused": {}}
        for v in rows:
            if v["splits_asked"] is not None:
                curves["fused" if v["fused_merge"] else "merge"][v["n_splits"]] = v["us"]
        planned = [v for v in rows if v["splits_asked"] is None and not v["fused_merge"]]
        out[name] = {
            **curves,
            "planned": (planned[0]["n_splits"], planned[0]["us"]) if planned else None,
            "sdpa": rec.get("sdpa_nomask_us"),
            "shape": rec.get("shape", {}),
        }
    if not out:
        raise ValueError(
            f"no timed rows with config {DECODER_CONFIG} and BLOCK_M 64 in the sweep; was it run on a GPU?"
        )
    return out


def split_sweep_figure(sweep: Mapping, title: str | None = None) -> go.Figure:
    """Time per call against the number of prefix splits, one panel per shape of the latency sweep: the
    merge launch and the fused merge (lines), the plan the planner made at the time of the run (star) and
    torch's SDPA with no mask (dashed). The decoder's fixed config and 64-row tiles only."""
    data = _sweep_rows(sweep)
    names = list(data)
    cols = min(3, len(names))
    nrows = -(-len(names) // cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[n.replace("-", " ") for n in names],
                        horizontal_spacing=0.07, vertical_spacing=0.16)  # fmt: skip
    styles = (("merge", "merge launch (default)", series_color(0)), ("fused", "fused merge", series_color(1)))
    for i, name in enumerate(names):
        r, c = i // cols + 1, i % cols + 1
        d = data[name]
        for key, label, color in styles:
            pts = sorted(d[key].items())
            fig.add_trace(
                go.Scatter(
                    x=[p[0] for p in pts],
                    y=[p[1] for p in pts],
                    mode="lines+markers",
                    name=label,
                    legendgroup=key,
                    showlegend=i == 0,
                    line=dict(color=color),
                ),  # fmt: skip
                row=r,
                col=c,
            )
        if d["planned"] is not None:
            fig.add_trace(
                go.Scatter(
                    x=[d["planned"][0]],
                    y=[d["planned"][1]],
                    mode="markers",
                    name="planned then",
                    legendgroup="planned",
                    showlegend=i == 0,
                    marker=dict(symbol="star", size=13, color=REFERENCE),
                ),  # fmt: skip
                row=r,
                col=c,
            )
        if d["sdpa"] is not None:
            xs = [n for key, _, _ in styles for n in d[key]]
            fig.add_trace(
                go.Scatter(
                    x=[min(xs), max(xs)],
                    y=[d["sdpa"]] * 2,
                    mode="lines",
                    name="torch SDPA, no mask",
                    legendgroup="sdpa",
                    showlegend=i == 0,
                    line=dict(color=REFERENCE, dash="dash"),
                ),  # fmt: skip
                row=r,
                col=c,
            )
    fig.update_xaxes(type="log", dtick=math.log10(2), title_text="prefix splits")
    fig.update_yaxes(title_text="us per call", rangemode="tozero")
    env = sweep.get("environment", {})
    fig.update_layout(
        title=title or f"How many splits? One call per shape, CUDA-graph replay ({env.get('gpu') or 'GPU'})",
        legend=dict(orientation="h", y=-0.18),
        height=330 * nrows + 120,
        width=1000,
    )
    return fig


def glide_diagram(draft_config, target_config=None) -> graphviz.Digraph:
    """The one-layer GliDe draft (models/glide.py) as a block diagram: which parts are its own and
    which it borrows from the target (embedding, LM head, the last layer's KV cache)."""
    d = draft_config
    W = d.window
    own, shared = "#cfe2f3", "#ffd966"
    g = graphviz.Digraph("glide")
    g.attr(
        rankdir="TB",
        fontname="DejaVu Sans",
        fontsize="12",
        labelloc="t",
        nodesep="0.3",
        ranksep="0.25",
        label=_legend_html_colors(
            "GliDe draft: one decoder layer, everything else borrowed from the target",
            [(own, "the draft's own weights"), (shared, "shared with / read from the target")],
        ),
    )
    g.attr("node", shape="box", style="rounded,filled", fontname="DejaVu Sans", fontsize="11")
    tgt = f" ({target_config.num_layers} layers)" if target_config is not None else ""
    g.node("tok", "tokens (committed, or one tree level)", fillcolor="#ffffff")
    g.node("emb", "embed_tokens (target's)", fillcolor=shared)
    g.node(
        "sa",
        f"self-attention, sliding window W = {W}\\n{d.num_heads} q heads / {d.num_kv_heads} kv heads\\n"
        f"own ring-buffer cache of W slots",
        fillcolor=own,
    )
    g.node(
        "ca", f"cross-attention: q_proj, o_proj only\\nkeys/values = target's LAST-layer KV cache{tgt}", fillcolor=own
    )
    g.node(
        "kv", "target KV cache, last layer\\n(whole context, already RoPE-rotated)", fillcolor=shared, shape="cylinder"
    )
    g.node("mlp", f"SwiGLU MLP ({d.hidden_size} → {d.intermediate_size} → {d.hidden_size})", fillcolor=own)
    g.node("head", "lm_head (target's) → draft logits", fillcolor=shared)
    for a, b in (("tok", "emb"), ("emb", "sa"), ("sa", "ca"), ("ca", "mlp"), ("mlp", "head")):
        g.edge(a, b)
    g.edge("kv", "ca", style="dashed", label=" K, V")
    return g


def _legend_html_colors(title: str, items: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f'<td bgcolor="{c}" border="1"> {_html(t)} </td>' for c, t in items)
    return (
        f'<<table border="0" cellspacing="6"><tr><td colspan="{len(items)}"><b>{_html(title)}</b></td></tr>'
        f"<tr>{cells}</tr></table>>"
    )


def anchor_positions_figure(
    positions,
    max_pos: int | None = None,
    zoom: int = 8,
    title: str = "Anchor-offset position ids of one training batch",
) -> go.Figure:
    """positions [B, T] (train.draft.anchor_positions): left, position id against token index for
    each row; right, the first `zoom` tokens, where the unshifted "sink" positions 0..k-1 sit."""
    pos = positions.detach().cpu().numpy() if isinstance(positions, torch.Tensor) else np.asarray(positions)
    if pos.ndim != 2:
        raise ValueError(f"positions must be [B, T], got shape {pos.shape}")
    B, T = pos.shape
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.62, 0.38],
        horizontal_spacing=0.1,
        subplot_titles=(
            "whole window: the rest is shifted by a random offset",
            f"first {min(zoom, T)} tokens: the sinks",
        ),
    )
    idx = np.arange(T)
    for b in range(B):
        sinks = int(np.argmax(pos[b] != idx)) if (pos[b] != idx).any() else T
        c = series_color(b)
        name = f"row {b}: {sinks} sink(s), offset {int(pos[b, -1] - (T - 1))}"
        fig.add_trace(
            go.Scatter(x=idx, y=pos[b], mode="lines", name=name, legendgroup=str(b), line=dict(color=c)), row=1, col=1
        )
        z = idx[: min(zoom, T)]
        fig.add_trace(
            go.Scatter(
                x=z,
                y=pos[b, : len(z)],
                mode="lines+markers",
                name=name,
                legendgroup=str(b),
                showlegend=False,
                line=dict(color=c),
            ),
            row=1,
            col=2,
        )
    if max_pos is not None:
        fig.add_hline(
            y=max_pos - 1,
            line=dict(color="#d62728", dash="dot"),
            row=1,
            col=1,
            annotation_text=f"max position {max_pos - 1}",
            annotation_position="bottom right",
        )
    fig.update_xaxes(title_text="token index in the training window")
    fig.update_yaxes(title_text="position id given to RoPE", row=1, col=1)
    zoomed = [int(y) for y in pos[:, : min(zoom, T)].ravel() if y > 0]
    fig.update_yaxes(type="log", title_text="position id (log; 0 not drawn)", tickvals=log_ticks(zoomed), row=1, col=2)
    fig.update_layout(title=title, legend=dict(title="batch row", orientation="h", y=-0.25), height=480, width=980)
    return fig


def distribution_figure(
    exact,
    empirical: Mapping[str, Sequence[float]],
    labels: Sequence[str] | None = None,
    title: str = "Empirical distributions against the exact target distribution",
    x_title: str = "token",
) -> go.Figure:
    """Grouped bars: the exact probabilities (outlined) and each sampler's empirical frequencies."""
    exact = np.asarray(exact, dtype=float)
    labels = list(labels) if labels is not None else [str(i) for i in range(exact.size)]
    if len(labels) != exact.size or any(len(v) != exact.size for v in empirical.values()):
        raise ValueError("exact, every empirical distribution and labels must have the same length")
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=exact,
            name="exact target p",
            marker=dict(color="#ffffff", line=dict(color="#000000", width=1.5)),
        )
    )
    for k, (name, freq) in enumerate(empirical.items()):
        fig.add_trace(go.Bar(x=labels, y=list(freq), name=name, marker_color=_color(name, k)))
    fig.update_layout(
        title=title,
        barmode="group",
        xaxis_title=x_title,
        yaxis_title="probability",
        legend_title="distribution",
        height=430,
        width=980,
        bargap=0.2,
    )
    return fig


def tau_by_rule_figure(rows: Sequence[Mapping], title: str = "τ per verification rule") -> go.Figure:
    """Bars of tau per rule (x) and temperature (colour) from sampling_report rows; rows whose
    `lossless` is False are hatched and marked "biased"."""
    if not rows:
        raise ValueError("no rows; pass data/results/sampling_tau_cpu.json's 'rows'")
    temps = sorted({float(r["temperature"]) for r in rows})
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    fig = go.Figure()
    for k, t in enumerate(temps):
        sel = {r["rule"]: r for r in rows if float(r["temperature"]) == t}
        xs = [x for x in rules if x in sel]
        fig.add_trace(
            go.Bar(
                x=xs,
                y=[sel[x]["tau"] for x in xs],
                name=f"temperature {t:g}" + (" (lighter)" if k < len(temps) - 1 else ""),
                marker_color=[rule_color(x) for x in xs],
                marker_opacity=0.45 + 0.55 * (k + 1) / len(temps),
                marker_line=dict(color=REFERENCE, width=1),
                marker_pattern_shape=["/" if not sel[x].get("lossless", True) else "" for x in xs],
                text=[
                    f"T {t:g}: {sel[x]['tau']:.2f}" + ("<br>biased" if not sel[x].get("lossless", True) else "")
                    for x in xs
                ],
                textposition="outside",
            )
        )
    fig.update_layout(
        title=title,
        barmode="group",
        xaxis_title="verification rule",
        yaxis_title="τ (tokens per target pass)",
        legend_title="sampling",
        height=450,
        width=900,
    )
    fig.update_yaxes(range=[0, max(r["tau"] for r in rows) * 1.25])
    return fig


def speed_bars_figure(
    results: Mapping[str, Mapping], title: str = "Decoding speed", baseline: str | None = None
) -> go.Figure:
    """Horizontal bars of tokens/s per method ({name: {"tokens_per_s": ..}}), with tau and the speedup
    over `baseline` (a key of results) written on each bar."""
    names = list(results)
    if not names:
        raise ValueError("no results to plot")
    if baseline is not None and baseline not in results:
        raise ValueError(f"baseline {baseline!r} is not among the results {names}")
    base = results[baseline]["tokens_per_s"] if baseline else None
    text = []
    for n in names:
        r = results[n]
        t = f"{r['tokens_per_s']:.0f}"
        if r.get("tau") is not None:
            t += f" · τ {r['tau']:.2f}"
        if base:
            t += f" · {r['tokens_per_s'] / base:.1f}×"
        text.append(t)
    colors = [method_color(n) for n in names]
    fig = go.Figure(
        go.Bar(
            y=names,
            x=[results[n]["tokens_per_s"] for n in names],
            orientation="h",
            text=text,
            textposition="outside",
            marker_color=colors,
            showlegend=False,
        )
    )
    names_of = {
        "ar": "ours, autoregressive",
        "chain": "ours, chain",
        "tree": "ours, tree",
        "tree-sdpa": "ours, tree (SDPA)",
        "hf-greedy": "transformers generate",
        "hf-prompt-lookup": "transformers prompt lookup",
    }
    for key in dict.fromkeys(palette_key(n) for n in names):
        fig.add_trace(
            go.Bar(x=[None], y=[None], name=names_of.get(key, key), marker_color=METHOD[key], orientation="h")
        )
    top = max(results[n]["tokens_per_s"] for n in names)
    if base:
        title += f"<br><sup>bar text: tokens/s · τ · speedup over {baseline}</sup>"
    fig.update_layout(
        title=title,
        xaxis_title="new tokens per second (decode phase)",
        yaxis_title="method",
        height=160 + 36 * len(names),
        width=980,
        legend_title="implementation",
        barmode="overlay",
        margin=dict(t=90),
    )
    fig.update_xaxes(range=[0, top * 1.4])
    fig.update_yaxes(autorange="reversed")
    return fig


def tuner_check_figure(rows: Sequence[Mapping], labels: Sequence[str], title: str | None = None) -> go.Figure:
    """Grouped bars of `setup.tuner_check_rows`: per recorded shape, the measured tokens/s and each prediction's
    ({label} tok/s), so a reader sees which prompts' predictions rank the shapes as measured."""
    if not rows:
        raise ValueError("tuner_check_figure got no rows; pass setup.tuner_check_rows(record, tuned)")
    shapes = [r["shape"] for r in rows]
    measured = [r["measured tok/s"] for r in rows]
    fig = go.Figure(go.Bar(name="measured", x=shapes, y=measured, marker_color="#333333", textposition="outside",
                           text=[f"{y:.0f}" for y in measured]))  # fmt: skip
    for k, label in enumerate(labels):
        ys = [r.get(f"{label} tok/s") for r in rows]
        fig.add_bar(name=f"predicted, {label}", x=shapes, y=ys, marker_color=series_color(k),
                    text=[None if y is None else f"{y:.0f}" for y in ys], textposition="outside")  # fmt: skip
    top = max(measured + [r.get(f"{lb} tok/s") or 0 for r in rows for lb in labels])
    fig.update_layout(
        title=title or "The tuner's predictions against the recording it was fitted to",
        barmode="group", xaxis_title="recorded shape", yaxis_title="new tokens per second",
        height=460, width=980, legend_title="",
    )  # fmt: skip
    fig.update_yaxes(range=[0, top * 1.15])
    return fig


def tree_chain_figure(table: Mapping, goal: float = 1.15, title: str | None = None) -> go.Figure:
    """Each tree against the chain of its own depth, from `bench.e2e.tree_against_chains`'s table (a report's
    "tree_vs_chain"): x = step ratio (what the branches cost), y = tau ratio (what they add), a colour per depth.
    A tree's speed over its chain's is y / x, so the lines y = x (as fast as its chain) and y = goal * x (goal times
    its chain) split the plane; a point left of its line needs no cheaper step, one below it more tau."""
    pts = [(n, t) for n, t in table.get("trees", {}).items() if t.get("tau_ratio") is not None]
    if not pts:
        raise ValueError(
            "tree_chain_figure got no tree with a chain of its depth; time chains of the trees' depths "
            "(bench --gammas, h200_speed --gammas) and pass the report's tree_vs_chain"
        )
    fig = go.Figure()
    depths = sorted({t["depth"] for _, t in pts})
    for k, d in enumerate(depths):
        sel = [(n, t) for n, t in pts if t["depth"] == d]
        fig.add_trace(go.Scatter(
            x=[t["step_ratio"] for _, t in sel], y=[t["tau_ratio"] for _, t in sel], mode="markers+text",
            name=f"depth {d} (against {sel[0][1]['chain']})", marker=dict(size=10, color=series_color(k)),
            text=[n.removeprefix("tree-").replace("-", ",") for n, _ in sel], textposition="top center",
            textfont=dict(size=9),
            customdata=[[n, t["vs_best_chain"], t["at_chain_cost_vs_best_chain"]] for n, t in sel],
            hovertemplate="%{customdata[0]}<br>step x%{x:.3f}, tau x%{y:.3f} its chain<br>x%{customdata[1]:.3f} the "
            "best chain; at its chain's cost x%{customdata[2]:.3f}<extra></extra>",
        ))  # fmt: skip
    xs = [t["step_ratio"] for _, t in pts]
    lo, hi = min(1.0, min(xs)) * 0.98, max(xs) * 1.03
    for ratio, name, dash in ((1.0, "as fast as its chain", "dot"), (goal, f"{goal:g}x its chain", "dash")):
        fig.add_trace(go.Scatter(x=[lo, hi], y=[ratio * lo, ratio * hi], mode="lines", name=name,
                                 line=dict(color=REFERENCE, dash=dash)))  # fmt: skip
    fig.update_layout(
        title=title or f"What the branches buy and cost (fastest chain: {table.get('best_chain')})",
        xaxis_title="step time / the chain's step time", yaxis_title="tau / the chain's tau",
        height=480, width=900, legend_title="",
    )  # fmt: skip
    return declutter_labels(fig)  # the narrow trees sit close together


def verify_decode_figure(
    rows: Sequence[Mapping],
    backends: Sequence[str] = ("triton", "sdpa", "hf"),
    title: str = "Llama-3-8B shapes: one decode step vs one tree-verify step",
) -> go.Figure:
    """Left: ms per step of a 1-token decode and a 72-row tree verify per backend and context, with
    the bandwidth floor (weights + KV bytes / copy bandwidth). Right: verify / decode ratio (1 = the
    tree is free). `rows`: data/results/verify_8b_*.json's rows (each backend in the fastest form every row
    recorded: compiled and CUDA-graph captured, captured, or eager)."""
    if not rows:
        raise ValueError("no rows; pass verify_8b_h200.json's 'rows'")
    ctx = [r["context"] for r in rows]
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=("milliseconds per step (solid: verify, dotted: decode)", "verify / decode time ratio"),
    )
    for k, b in enumerate(backends):
        c = method_color(b)
        # the fastest form every row recorded: compiled and captured, captured, or eager
        every = [(s, f) for s, f in STEP_FORMS if all(f"{b}_verify{s}" in r and f"{b}_decode{s}" in r for r in rows)]
        sfx, form = every[0] if every else STEP_FORMS[-1]  # the fastest form in every row; else eager
        label = {"triton": "ours + Triton kernel", "sdpa": "ours + SDPA", "hf": "transformers"}.get(b, b)
        label += f" ({form})"
        if f"{b}_verify{sfx}" not in rows[0]:
            continue
        ver = [r[f"{b}_verify{sfx}"] for r in rows]
        dec = [r[f"{b}_decode{sfx}"] for r in rows]
        fig.add_trace(
            go.Scatter(x=ctx, y=ver, mode="lines+markers", name=label, legendgroup=b, line=dict(color=c)), row=1, col=1
        )
        fig.add_trace(
            go.Scatter(
                x=ctx,
                y=dec,
                mode="lines+markers",
                name=label + " decode",
                legendgroup=b,
                showlegend=False,
                line=dict(color=c, dash="dot"),
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=ctx,
                y=[v / d for v, d in zip(ver, dec)],
                mode="lines+markers",
                name=label,
                legendgroup=b,
                showlegend=False,
                line=dict(color=c),
            ),
            row=1,
            col=2,
        )
    if "floor_verify_ms" in rows[0]:
        fig.add_trace(
            go.Scatter(
                x=ctx,
                y=[r["floor_verify_ms"] for r in rows],
                mode="lines",
                name="bandwidth floor (weights + KV / copy BW)",
                line=dict(color=REFERENCE, dash="dash"),
            ),
            row=1,
            col=1,
        )
    fig.add_hline(
        y=1.0,
        line=dict(color=REFERENCE, dash="dash"),
        row=1,
        col=2,
        annotation_text="ratio 1: verifying the tree costs one decode step",
    )
    left = [y for t in fig.data if t.xaxis in (None, "x") for y in t.y]
    right = [y for t in fig.data if t.xaxis == "x2" for y in t.y] + [1.0]
    fig.update_xaxes(
        type="log", title_text="context length (cached tokens)", tickvals=ctx, ticktext=[tokens_label(c) for c in ctx]
    )
    fig.update_yaxes(type="log", title_text="ms per step", tickvals=log_ticks(left), row=1, col=1)
    fig.update_yaxes(type="log", title_text="verify time / decode time", tickvals=log_ticks(right), row=1, col=2)
    fig.update_layout(title=title, legend=dict(title="implementation", orientation="h", y=-0.25), height=500, width=980)
    return fig


KERNEL_CLASSES = ("projection", "attention", "other")  # bench/profile_8b.py's classes, in stacking order


def class_time_figure(steps: Mapping[str, Mapping], title: str = "Where each step's time goes") -> go.Figure:
    """Horizontal bars, one per step of a `bench/profile_8b.py` report ({name: step}, each step with "classes",
    "floor_ms" and optionally "levels_floor_ms"): its kernels' time-line increments stacked per class (projection,
    attention, other; they add up to the step), with its floor marked, and the floor of a draft's sequential levels
    where the step records one. The bars come from one replay under the profiler; the bar text is the step's timed
    median ("ms") and its multiple of the floor."""
    names = [n for n, st in steps.items() if isinstance(st, Mapping) and "classes" in st]
    if not names:
        raise ValueError("no profiled steps: pass profile_8b's step dicts, e.g. report['steps'][0]")
    fig = go.Figure()
    for k, cls in enumerate(KERNEL_CLASSES):
        ms = [steps[n]["classes"].get(cls, {}).get("increment_us", 0.0) / 1e3 for n in names]
        fig.add_trace(go.Bar(y=names, x=ms, name=cls, orientation="h", marker_color=series_color(k)))
    total = [sum(st.get("increment_us", 0.0) for st in steps[n]["classes"].values()) / 1e3 for n in names]
    fig.add_trace(
        go.Scatter(
            y=names, x=total, mode="text", textposition="middle right", showlegend=False, cliponaxis=False,
            text=[f"  timed {s['ms']:.2f} ms · {s['ms'] / s['floor_ms']:.2f}× floor" for s in map(steps.get, names)],
        )
    )  # fmt: skip
    floors = (("floor_ms", "floor (bytes / copy bandwidth)", dict(symbol="line-ns", size=30, line=dict(width=3))),
              ("levels_floor_ms", "floor of the draft's sequential levels", dict(symbol="diamond-open", size=13,
                                                                                  line=dict(width=2))))  # fmt: skip
    for key, label, marker in floors:
        have = [n for n in names if steps[n].get(key) is not None]
        if have:
            marker["line"]["color"] = marker["color"] = REFERENCE
            xs = [steps[n][key] for n in have]
            fig.add_trace(go.Scatter(y=have, x=xs, mode="markers", name=label, marker=marker))
    fig.update_layout(
        title=title, barmode="stack", xaxis_title="ms (kernels' increments on one replay's time line)",
        yaxis_title="step", height=180 + 48 * len(names), width=980, legend_title="kernel class",
        legend_traceorder="normal", margin=dict(t=80),
    )  # fmt: skip
    fig.update_xaxes(range=[0, max(total) * 1.5])
    fig.update_yaxes(autorange="reversed")
    return fig


def timing_spread_figure(rows: Sequence[Mapping], title: str = "tokens/s: median of the runs, bars from min to max"):
    """Bars of median tokens/s per method with min..max error bars (teach.cost.time_methods rows)."""
    if not rows:
        raise ValueError("no rows; pass teach.cost.time_methods(...)")
    fig = go.Figure(
        go.Bar(
            x=[r["method"] for r in rows],
            y=[r["tokens_per_s"] for r in rows],
            marker_color=[_color(r["method"], k) for k, r in enumerate(rows)],
            error_y=dict(
                type="data",
                symmetric=False,
                array=[r["tokens_per_s_max"] - r["tokens_per_s"] for r in rows],
                arrayminus=[r["tokens_per_s"] - r["tokens_per_s_min"] for r in rows],
            ),
            text=[f"τ {r['tau']:.2f}" for r in rows],
            textposition="outside",
            showlegend=False,
        )
    )
    top = max(r["tokens_per_s_max"] for r in rows)
    fig.update_layout(title=title, yaxis_title="new tokens per second", height=400, width=760)
    fig.update_yaxes(range=[0, top * 1.25])
    return fig


KERNEL_STAGE_KEYS = ("eager_kernels", "compiled_kernels", "replay_us", "launch_bound_us")


def _kernel_rows(profile: Mapping) -> list[dict]:
    """bench.profile's JSON -> one row per (method, stage), checked; a clear error names what is missing."""
    if not isinstance(profile, Mapping):
        raise ValueError(f"profile is a {type(profile).__name__}; pass the dict of data/results/profile_h200.json")
    methods = [(m, v) for m, v in profile.items() if m not in ("schema_version", "environment")]
    if not methods:
        raise ValueError("profile has no method entries; pass the dict that bench.profile writes ({method: {stages}})")
    rows = []
    for m, v in methods:
        if not isinstance(v, Mapping) or not isinstance(v.get("stages"), Mapping) or not v["stages"]:
            raise ValueError(f"profile[{m!r}] lacks 'stages'; each method needs {{'stages': {{stage: {{...}}}}}}")
        if "launch_cost_us" not in v:
            raise ValueError(f"profile[{m!r}] lacks 'launch_cost_us'; re-run bench.profile, which measures it")
        for s, st in v["stages"].items():
            missing = [k for k in KERNEL_STAGE_KEYS if not isinstance(st, Mapping) or k not in st]
            if missing:
                raise ValueError(
                    f"profile[{m!r}]['stages'][{s!r}] lacks {missing}; each stage needs {list(KERNEL_STAGE_KEYS)}"
                )
            replay = float(st["replay_us"])
            launch = min(float(st["launch_bound_us"]), replay)  # never more than the whole replay
            top = st.get("top_kernels") or []
            rows.append(
                dict(
                    method=m,
                    stage=s,
                    replay_us=replay,
                    launch_us=launch,
                    rest_us=replay - launch,
                    eager_kernels=int(st["eager_kernels"]),
                    compiled_kernels=int(st["compiled_kernels"]),
                    launch_cost_us=float(v["launch_cost_us"]),
                    top=f"{top[0][0][:48]} ({top[0][2]:.1f} us)" if top else "-",
                )
            )
    return rows


def kernel_bars(profile: Mapping, title: str | None = None) -> go.Figure:
    """One bar per (method, stage) of a step replayed from its CUDA graph, stacked into the
    launch-bound part (compiled kernels x the measured cost of one tiny kernel in a graph) and the
    rest (the kernels' own work: reading weights and cache, arithmetic). Each bar is labelled with its
    kernel count before (eager) and after compilation; one panel per method, stages in step order.
    `profile`: data/results/profile_h200.json (bench.profile)."""
    rows = _kernel_rows(profile)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    per = {m: [r for r in rows if r["method"] == m] for m in methods}
    fig = make_subplots(
        rows=1,
        cols=len(methods),
        shared_yaxes=True,
        column_widths=[len(per[m]) + 1 for m in methods],
        horizontal_spacing=0.03,
        subplot_titles=methods,
    )
    hover = (
        "%{x}: %{y:.1f} us of %{customdata[0]:.1f} us replayed<br>"
        "kernels: %{customdata[1]} eager → %{customdata[2]} compiled, %{customdata[3]:.2f} us per launch"
        "<br>largest kernel: %{customdata[4]}<extra>%{fullData.name}</extra>"
    )
    for col, m in enumerate(methods, start=1):
        rs = per[m]
        x = [r["stage"] for r in rs]
        keys = ("replay_us", "eager_kernels", "compiled_kernels", "launch_cost_us", "top")
        custom = [[r[k] for k in keys] for r in rs]
        fig.add_trace(
            go.Bar(
                x=x,
                y=[r["launch_us"] for r in rs],
                name="launch-bound: compiled kernels × one launch",
                legendgroup="launch",
                showlegend=col == 1,
                marker_color=stage_color("other"),
                marker_pattern_shape="/",
                customdata=custom,
                hovertemplate=hover,
            ),
            row=1,
            col=col,
        )
        fig.add_trace(
            go.Bar(
                x=x,
                y=[r["rest_us"] for r in rs],
                name=f"the rest (the kernels' own work), {m}",
                legendgroup=m,
                marker_color=method_color(m),
                customdata=custom,
                hovertemplate=hover,
                text=[f"{r['eager_kernels']}→{r['compiled_kernels']}" for r in rs],
                textposition="outside",
                textfont=dict(size=10),
                cliponaxis=False,
            ),
            row=1,
            col=col,
        )
    top = max(r["replay_us"] for r in rows)
    fig.update_layout(
        barmode="stack",
        title=dict(
            text=title
            or "Time per stage, replayed from a CUDA graph: launch-bound part and the rest"
            "<br><sup>bar label: CUDA kernels eager → compiled; hover a bar for its largest kernel</sup>",
            x=0.02,
        ),
        legend=dict(orientation="h", y=-0.2, x=0),
        height=560,
        width=max(760, 200 + 50 * len(rows)),
        margin=dict(t=110, b=130),
    )
    fig.update_yaxes(range=[0, top * 1.15], rangemode="tozero")
    fig.update_yaxes(title_text="microseconds per stage call", row=1, col=1)
    fig.update_xaxes(title_text="stage (draftN = draft level N)", row=1, col=(len(methods) + 1) // 2)
    return fig


# What a compiled kernel is, from its name: the package's Triton kernels by their function names, cuBLAS by its
# kernel families, Inductor's generated kernels by their prefixes (poi: pointwise; per/red: reductions).
KERNEL_KINDS = (
    ("fused projection (norm_linear)", ("_norm_linear_kernel",)),
    ("attention (Triton)", ("_tree_attn", "_masked_attn", "_ordered_attn")),
    ("beam top-k (Triton)", ("_row_topk", "_rank_select")),
    ("RoPE tables (Triton)", ("_rope_tables",)),
    ("cuBLAS matmul", ("nvjet", "gemm", "gemv", "cutlass", "sm90_xmma", "ampere_")),
    ("Inductor pointwise", ("triton_poi",)),
    ("Inductor reduction", ("triton_per", "triton_red")),
)


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, from its name (KERNEL_KINDS); "other" for anything else."""
    for kind, prefixes in KERNEL_KINDS:
        if any(p in name for p in prefixes):
            return kind
    return "other"


def _kind_groups(names: Sequence[str]):
    """(colour index, kind, positions) for each kind of kernel among names, in KERNEL_KINDS order, "other" last."""
    kinds = [kernel_kind(n) for n in names]
    for k, (kind, _) in enumerate([*KERNEL_KINDS, ("other", ())]):
        idx = [i for i, x in enumerate(kinds) if x == kind]
        if idx:
            yield k, kind, idx


def launch_order_figure(profile: Mapping, method: str, stage: str, title: str | None = None) -> go.Figure:
    """Every CUDA kernel one compiled stage launches, in launch order: a bar per kernel (its own GPU time),
    coloured by kind, with the measured cost of one launch inside a CUDA graph as a dashed line: a kernel
    whose bar barely clears the line does little more than launch. The legend gives each kind's count and
    time. `profile`: data/results/profile_h200.json (bench.profile records `kernels_in_order`)."""
    rows = {(r["method"], r["stage"]): r for r in _kernel_rows(profile)}
    if (method, stage) not in rows:
        have = ", ".join(f"{m}/{s}" for m, s in rows)
        raise ValueError(f"the profile has no stage {method}/{stage}; it has {have}")
    order = profile[method]["stages"][stage].get("kernels_in_order")
    if not order:
        raise ValueError(
            f"profile[{method!r}]['stages'][{stage!r}] lacks 'kernels_in_order'; re-run bench.profile, which records "
            "every kernel of a stage in launch order"
        )
    names = [str(n) for n, _ in order]
    us = [float(t) for _, t in order]
    fig = go.Figure()
    for k, kind, idx in _kind_groups(names):
        fig.add_trace(
            go.Bar(
                x=[i + 1 for i in idx],
                y=[us[i] for i in idx],
                name=f"{kind}: {len(idx)} kernel{'s' * (len(idx) > 1)}, {sum(us[i] for i in idx):.1f} us",
                marker_color=series_color(k),
                customdata=[names[i][:90] for i in idx],
                hovertemplate="kernel %{x}: %{y:.2f} us<br>%{customdata}<extra>%{fullData.name}</extra>",
            )
        )
    launch = rows[(method, stage)]["launch_cost_us"]
    note = f"one launch in a CUDA graph: {launch:.2f} us"
    fig.add_hline(y=launch, line_dash="dash", line_color="#555555", annotation_text=note)
    fig.update_layout(
        title=dict(
            text=title
            or f"{method}, {stage}: {len(us)} kernels in launch order<br><sup>{sum(us):.1f} us of kernel time; "
            f"the stage replayed from its CUDA graph: {rows[(method, stage)]['replay_us']:.1f} us</sup>",
            x=0.02,
        ),
        legend=dict(orientation="h", y=-0.22, x=0),
        height=460,
        width=max(760, 160 + 22 * len(us)),
        margin=dict(t=80, b=140),
        bargap=0.15,
    )
    fig.update_xaxes(title_text="launch order", dtick=1 if len(us) <= 40 else 5)
    fig.update_yaxes(title_text="kernel time (us)", rangemode="tozero")
    return fig


def step_timeline_figure(profile: Mapping, method: str, title: str | None = None) -> go.Figure:
    """One whole step replayed as the decoder replays it (one CUDA graph), kernel by kernel on its time line: a lane
    per stage, each kernel a bar from its start to its end, coloured by kind. With programmatic dependent launch a
    kernel starts before the one ahead of it ends and waits inside: bars overlap. Each lane is labelled with what its
    stage added to the step (the increments: each kernel's end past the latest end before it), which add up to the
    step. `profile`: a `bench.profile` report with `step_timeline` (recorded since the boundary-cost work)."""
    if method not in profile or not isinstance(profile[method], Mapping):
        have = ", ".join(k for k, v in profile.items() if isinstance(v, Mapping) and "stages" in v)
        raise ValueError(f"the profile has no method {method!r}; it has {have}")
    tl_ = profile[method].get("step_timeline")
    if not tl_ or not tl_.get("kernels"):
        raise ValueError(
            f"profile[{method!r}] lacks 'step_timeline'; re-run bench.profile, which replays the whole step under the "
            "profiler"
        )
    rows = tl_["kernels"]  # [name, start, duration, increment]
    stages = tl_.get("stages") or {"step": {"kernels": len(rows), "increment_us": tl_["total_us"]}}
    lane = []
    for stage, st in stages.items():
        lane += [stage] * int(st["kernels"])
    lanes = list(stages)
    fig = go.Figure()
    for k, kind, idx in _kind_groups([str(r[0]) for r in rows]):
        fig.add_trace(
            go.Bar(
                orientation="h",
                y=[lane[i] for i in idx],
                x=[float(rows[i][2]) for i in idx],
                base=[float(rows[i][1]) for i in idx],
                name=f"{kind}: {len(idx)} kernel{'s' * (len(idx) > 1)}",
                marker=dict(color=series_color(k), line=dict(width=1, color="white")),
                opacity=0.85,  # a kernel that started early (PDL) shows through the one it overlaps
                customdata=[[str(rows[i][0])[:60], float(rows[i][3])] for i in idx],
                hovertemplate="%{customdata[0]}<br>starts at %{base:.1f} us, runs %{x:.2f} us, "
                "adds %{customdata[1]:.2f} us<extra>%{fullData.name}</extra>",
            )
        )
    for stage, st in stages.items():
        fig.add_annotation(x=1.0, xref="paper", xanchor="left", y=stage, text=f"+{float(st['increment_us']):.1f} us",
                           showarrow=False, font=dict(size=11))  # fmt: skip
    own = sum(float(r[2]) for r in rows)
    fig.update_layout(
        title=dict(
            text=title
            or f"{method}: one step replayed from one CUDA graph, {float(tl_['total_us']):.1f} us, {len(rows)} kernels"
            f"<br><sup>bars: each kernel's start and end ({own:.1f} us in all: overlaps count twice); right: what "
            "each stage adds to the step</sup>",
            x=0.02,
        ),
        barmode="overlay",
        legend=dict(orientation="h", yanchor="top", y=-0.3, x=0),
        height=max(360, 200 + 34 * len(lanes)),
        width=980,
        margin=dict(t=80, b=150, r=90),
    )
    fig.update_yaxes(categoryorder="array", categoryarray=lanes[::-1], title_text="stage")
    fig.update_xaxes(title_text="time in the step (us)", rangemode="tozero")
    return fig


# ----------------------------------------------------------------------------- labels that do not overlap

_MARGIN = dict(l=80, r=80, t=100, b=80)  # plotly's default margins


def _axis_map(fig: go.Figure, axis: str, pts: Sequence[float], size_px: float, raw: bool = False):
    """Data value -> pixels from the plot area's left (x) or top (y); raw: values already in axis
    units (log10 on a log axis, as annotations hold them)."""
    ax = fig.layout[axis]
    log = ax.type == "log" and not raw
    f = (lambda v: math.log10(v)) if log else (lambda v: float(v))
    if ax.range is not None:
        lo, hi = float(ax.range[0]), float(ax.range[1])
    else:
        vals = [f(v) for v in pts]
        lo, hi = min(vals), max(vals)
        pad = 0.06 * (hi - lo or 1.0)
        lo, hi = lo - pad, hi + pad
    flip = axis.startswith("y")
    return lambda v: ((hi - f(v)) if flip else (f(v) - lo)) / (hi - lo) * size_px


def label_boxes(fig: go.Figure, char_px: float = 6.2, line_px: float = 13.0) -> list[tuple[float, float, float, float]]:
    """Pixel boxes (x0, y0, x1, y1) of the point labels that `declutter_labels` placed (annotations
    with xshift / yshift), in plot-area coordinates (y down)."""
    anns = [a for a in fig.layout.annotations if a.name == "point-label"]
    if not anns:
        return []
    W = (fig.layout.width or 820) - _MARGIN["l"] - _MARGIN["r"]
    H = (fig.layout.height or 440) - _MARGIN["t"] - _MARGIN["b"]
    fx = _axis_map(fig, "xaxis", [a.x for a in anns], W, raw=True)
    fy = _axis_map(fig, "yaxis", [a.y for a in anns], H, raw=True)
    out = []
    for a in anns:
        w, cx, cy = char_px * len(str(a.text)), fx(a.x) + (a.xshift or 0), fy(a.y) - (a.yshift or 0)
        out.append((cx - w / 2, cy - line_px / 2, cx + w / 2, cy + line_px / 2))
    return out


def declutter_labels(fig: go.Figure, char_px: float = 6.2, line_px: float = 13.0) -> go.Figure:
    """Replace the text of every markers+text trace by annotations placed, point by point, at the
    first offset (above, below, right, left, then further out) where the label overlaps neither an
    earlier label nor a marker. Fixes labels such as '4·8·8' printed over '2·4·8·8·8·8'."""
    pts = []
    for t in fig.data:
        if t.mode and "text" in t.mode and t.x is not None and t.text is not None:
            texts = [t.text] * len(t.x) if isinstance(t.text, str) else list(t.text)
            pts += [(x, y, str(s)) for x, y, s in zip(t.x, t.y, texts) if s]
            t.mode = t.mode.replace("+text", "").replace("text+", "")
            t.text = None
    if not pts:
        return fig
    W = (fig.layout.width or 820) - _MARGIN["l"] - _MARGIN["r"]
    H = (fig.layout.height or 440) - _MARGIN["t"] - _MARGIN["b"]
    all_x = [p[0] for t in fig.data if t.x is not None for p in zip(t.x, t.y) if p[0] is not None]
    all_y = [p[1] for t in fig.data if t.y is not None for p in zip(t.x, t.y) if p[1] is not None]
    if fig.layout.xaxis.range is None:
        fig.update_xaxes(range=_padded_range(all_x, fig.layout.xaxis.type == "log"))
    if fig.layout.yaxis.range is None:
        fig.update_yaxes(range=_padded_range(all_y, fig.layout.yaxis.type == "log", top=0.15))
    fx, fy = _axis_map(fig, "xaxis", all_x, W), _axis_map(fig, "yaxis", all_y, H)
    markers = [(fx(x) - 5, fy(y) - 5, fx(x) + 5, fy(y) + 5) for x, y in zip(all_x, all_y)]
    placed: list[tuple[float, float, float, float]] = []

    def free(b):
        return all(b[2] <= o[0] or o[2] <= b[0] or b[3] <= o[1] or o[3] <= b[1] for o in placed + markers)

    for x, y, text in sorted(pts, key=lambda p: (fx(p[0]), fy(p[1]))):
        w, cx, cy = char_px * len(text), fx(x), fy(y)
        tries = []
        for d in (1, 2, 3, 4):
            tries += [(0, d * line_px), (0, -d * line_px), (w / 2 + 8 * d, 0), (-(w / 2 + 8 * d), 0)]
            tries += [(w / 2 + 8, d * line_px), (-(w / 2 + 8), -d * line_px)]
        for dx, dy in tries:  # dy > 0: up
            b = (cx + dx - w / 2, cy - dy - line_px / 2, cx + dx + w / 2, cy - dy + line_px / 2)
            if free(b):
                break
        placed.append(b)
        fig.add_annotation(
            x=math.log10(x) if fig.layout.xaxis.type == "log" else x,
            y=math.log10(y) if fig.layout.yaxis.type == "log" else y,
            text=text,
            showarrow=False,
            xshift=dx,
            yshift=dy,
            font=dict(size=10),
            name="point-label",
        )
    return fig


def _padded_range(vals, log: bool, top: float = 0.08) -> list[float]:
    v = [math.log10(x) if log else float(x) for x in vals if x is not None and (not log or x > 0)]
    lo, hi = min(v), max(v)
    span = hi - lo or 1.0
    return [lo - 0.08 * span, hi + top * span]


def kernel_count_rows(counts: Mapping, profile: Mapping) -> list[dict]:
    """One row per (method, stage) of `bench.fusion_proxy --record`'s counts beside an H200 profile of the same code
    with the one-launch selection and combo kernels off (`profile_ab_base_beam_h200.json`): the kernels the H200
    saw, the CPU count with the selection off (its `launches`: Inductor's kernels and ours), today's default (the
    selection on, each level from the second written by it), the bound with combo kernels too, the default with the
    LM head and the selection in one launch (LONGSPEC_HEAD_SELECT=on), with each level written after its selection
    (LONGSPEC_BEAM_WRITE=off), and the combo bound with the verify's greedy tail as the compiled definition
    (LONGSPEC_GREEDY_ACCEPT=off, the default before 2026-12-06); a stage the profile or a variant lacks shows None."""
    variants = counts["variants"]
    off = variants.get("beam_select_off", {}).get("methods", {})
    head = variants.get("head_select_on", {}).get("methods", {})
    written = variants.get("beam_write_off", {}).get("methods", {})
    tail = variants.get("greedy_accept_off", {}).get("methods", {})
    rows = []
    for method, stages in variants["default"]["methods"].items():
        recorded = profile.get(method, {}).get("stages", {})
        for stage, c in stages.items():
            o = off.get(method, {}).get(stage)
            hs = head.get(method, {}).get(stage)
            w = written.get(method, {}).get(stage)
            t = tail.get(method, {}).get(stage)
            rows.append({
                "method": method, "stage": stage,
                "H200, both off": recorded.get(stage, {}).get("compiled_kernels"),
                "CPU, selection off": o["launches"] if o else None,
                "CPU, default": c["launches"], "combo bound": c["launches_combo"],
                "CPU, head + selection in one": hs["launches"] if hs else None,
                "CPU, level written after": w["launches"] if w else None,
                "combo bound, greedy tail written out": t["launches_combo"] if t else None,
            })  # fmt: skip
    return rows
