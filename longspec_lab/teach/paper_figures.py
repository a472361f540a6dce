"""The LongSpec paper's figures that the notebooks rebuild from this repository's own data
(arXiv 2502.17421): the cost of one target pass against context, acceptance by depth and by
sibling rank, the projected speedup against context with its draft / verify / commit terms
stacked, the hybrid split of tree attention as a block matrix with its log-sum-exp merge stepped,
and what goes wrong when the draft's positions do not match the ones the target's cache was
built with (the reason for anchor-offset training).

Every function maps data to a plotly figure; nothing here holds state. Colours come from
`palette` (one per method, rule and stage).

Taught in: notebooks/04_hybrid_tree_attention_and_the_triton_kernel.ipynb
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from longspec_lab.teach import cost as cost_model
from longspec_lab.teach.palette import METHOD, REFERENCE, method_color, series_color, stage_color

# ----------------------------------------------------------------------------- the cost picture


def tokens_label(n: int) -> str:
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def cost_ratio_figure(
    model: cost_model.ModelCost,
    hw: cost_model.Hardware,
    rows: int = 72,
    contexts: Sequence[int] | None = None,
    recorded: Sequence[Mapping] | None = None,
    live: Sequence[Mapping] | None = None,
    live_label: str = "measured here",
    title: str | None = None,
) -> go.Figure:
    """t(rows) / t(1 row) against context: the band between the overlapped floor and the
    no-overlap bound of the cost model, the recorded H200 points and a live measurement (median
    with min..max error bars)."""
    contexts = list(contexts or [2**k for k in range(10, 18)])
    curve = cost_model.ratio_curve(model, hw, rows, contexts)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=contexts,
            y=curve["no_overlap"],
            mode="lines",
            name="model: reads, then arithmetic (no overlap)",
            line=dict(color=method_color("tree"), dash="dash"),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=contexts,
            y=curve["floor"],
            mode="lines",
            name="model: reads and arithmetic overlapped (floor)",
            line=dict(color=method_color("tree")),
            fill="tonexty",
            fillcolor="rgba(44,160,44,0.12)",
        )
    )
    if recorded:
        fig.add_trace(
            go.Scatter(
                x=[p["context"] for p in recorded],
                y=[p["ratio"] for p in recorded],
                mode="markers+text",
                name="H200, Llama-3-8B shape (recorded)",
                text=[f"{p['ratio']:.2f}" for p in recorded],
                textposition="top center",
                marker=dict(size=11, symbol="diamond", color=METHOD["triton"], line=dict(width=1, color=REFERENCE)),
            )
        )
    if live:
        fig.add_trace(
            go.Scatter(
                x=[p["context"] for p in live],
                y=[p["ratio"] for p in live],
                mode="markers+lines",
                name=live_label,
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[p["ratio_max"] - p["ratio"] for p in live],
                    arrayminus=[p["ratio"] - p["ratio_min"] for p in live],
                ),
                marker=dict(size=9, color=method_color("ar")),
                line=dict(color=method_color("ar"), dash="dot"),
            )
        )
    fig.add_hline(y=1.0, line=dict(color=REFERENCE, dash="dot"), annotation_text="free: costs one decode step")
    xs = contexts + [p["context"] for p in (live or [])]
    fig.update_xaxes(
        type="log", title="context length (tokens in the KV cache)", tickvals=xs, ticktext=[tokens_label(c) for c in xs]
    )
    fig.update_yaxes(type="log", title=f"time of a {rows}-row pass / time of a 1-row pass")
    fig.update_layout(
        title=title or f"What checking {rows} tokens costs: one target pass of {rows} rows against one of 1 row",
        legend=dict(orientation="h", y=-0.25),
        height=500,
        width=900,
        margin=dict(t=70),
    )
    return fig


# ----------------------------------------------------------------------------- acceptance


def acceptance_figure(results: Mapping[str, object], title: str = "Where the tree pays off") -> go.Figure:
    """Left: P(a child at depth d is accepted | the path reached depth d-1 and that node has
    children). Right: P(a child of sibling rank r is accepted | the rule looked at it). One series
    per result ({label: GenerationResult}); hover shows how many times each was tried."""
    if not results:
        raise ValueError("no results; pass {label: GenerationResult of a chain or tree run}")
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.12,
        subplot_titles=("acceptance by depth", "acceptance by sibling rank (0 = the draft's best child)"),
    )
    used = set()
    for k, (label, r) in enumerate(results.items()):
        by_d, by_r = r.acceptance_by_depth, r.acceptance_by_rank
        if not by_d:
            raise ValueError(f"{label}: no acceptance counts; generate with method='tree' or 'chain'")
        try:
            c = method_color(label)
        except ValueError:
            c = series_color(k)
        if c in used:  # two runs of the same method: keep them apart
            c = series_color(k + 2)
        used.add(c)
        for col, rates, tried, first in ((1, by_d, r.depth_tried, 1), (2, by_r, r.rank_tried, 0)):
            xs = [i + first for i, v in enumerate(rates) if v is not None]
            fig.add_trace(
                go.Bar(
                    x=xs,
                    y=[rates[i - first] for i in xs],
                    name=label,
                    legendgroup=label,
                    showlegend=col == 1,
                    marker_color=c,
                    customdata=[tried[i - first] for i in xs],
                    hovertemplate="%{x}: %{y:.2f} of %{customdata} tries<extra>" + label + "</extra>",
                    text=[f"{rates[i - first]:.2f}" for i in xs],
                    textposition="outside",
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="depth d of the child", dtick=1, row=1, col=1)
    fig.update_xaxes(title_text="sibling rank r", dtick=1, row=1, col=2)
    fig.update_yaxes(title_text="acceptance rate", range=[0, 1.15])
    fig.update_layout(title=title, barmode="group", height=430, width=980, legend=dict(orientation="h", y=-0.2))
    return fig


# ----------------------------------------------------------------------------- speedup against context


def speedup_figure(terms: Sequence[Mapping], tau: float, paper: tuple[float, float] = (1.5, 3.3)) -> go.Figure:
    """Stacked bars: ms per generated token of the draft, verify and commit terms (step cost / tau)
    per context, next to the decode step they replace; the projected speedup on the right axis,
    with the paper's reported range shaded."""
    if not terms:
        raise ValueError("no terms; pass teach.cost.speedup_terms(verify_8b, tau)")
    x = [tokens_label(t["context"]) for t in terms]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for st in ("draft", "verify", "commit"):
        fig.add_trace(
            go.Bar(
                x=x,
                y=[t[st] for t in terms],
                name=f"{st} / τ",
                marker_color=stage_color(st),
                offsetgroup="spec",
                text=[f"{t[st]:.2f}" for t in terms],
                textposition="inside",
            ),
            secondary_y=False,
        )
    fig.add_trace(
        go.Bar(
            x=x,
            y=[t["decode"] for t in terms],
            name="one decode step (plain decoding, per token)",
            marker_color=method_color("ar"),
            offsetgroup="ar",
            text=[f"{t['decode']:.2f}" for t in terms],
            textposition="outside",
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[t["speedup"] for t in terms],
            mode="lines+markers+text",
            name="projected speedup (right axis)",
            text=[f"{t['speedup']:.2f}×" for t in terms],
            textposition="top center",
            line=dict(color=REFERENCE, width=3),
        ),
        secondary_y=True,
    )
    fig.add_hrect(
        y0=paper[0],
        y1=paper[1],
        fillcolor="rgba(120,120,120,0.12)",
        line_width=0,
        secondary_y=True,
        annotation_text=f"paper: {paper[0]}-{paper[1]}× (measured, 7B-13B, LongBench)",
        annotation_position="top left",
    )
    fig.update_yaxes(title_text="ms per generated token", secondary_y=False, rangemode="tozero")
    top = max(max(t["speedup"] for t in terms), paper[1]) * 1.2
    fig.update_yaxes(title_text="speedup over plain decoding", secondary_y=True, range=[0, top])
    fig.update_xaxes(title_text="context length")
    fig.update_layout(
        title=f"Projected speedup against context, Llama-3-8B shapes on the H200 (τ = {tau:g})",
        barmode="relative",
        height=500,
        width=980,
        legend=dict(orientation="h", y=-0.22),
    )
    return fig


# ----------------------------------------------------------------------------- the hybrid split


def lse_merge(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attentions exactly: parts [(o_i [..., D], lse_i [...])] -> (o, lse), with
    lse = log sum_i e^{lse_i} and o = sum_i e^{lse_i - lse} o_i."""
    if not parts:
        raise ValueError("lse_merge needs at least one (output, lse) pair")
    lse = torch.logsumexp(torch.stack([l for _, l in parts]), dim=0)
    o = sum(torch.exp(l - lse)[..., None] * oi for oi, l in parts)
    return o, lse


def merge_steps(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """The merge done one part at a time, as a kernel's second pass does it: after each part, the
    running (o, lse), the weight the running result keeps and the weight the new part gets."""
    if not parts:
        raise ValueError("merge_steps needs at least one (output, lse) pair")
    o, lse = parts[0]
    steps = [dict(part=0, o=o, lse=lse, w_old=None, w_new=torch.ones_like(lse))]
    for i, (oi, li) in enumerate(parts[1:], start=1):
        new = torch.logaddexp(lse, li)
        w_old, w_new = torch.exp(lse - new), torch.exp(li - new)
        o = w_old[..., None] * o + w_new[..., None] * oi
        lse = new
        steps.append(dict(part=i, o=o, lse=lse, w_old=w_old, w_new=w_new))
    return steps


def hybrid_split_figure(
    mask: torch.Tensor,
    prefix_len: int,
    lse_prefix: torch.Tensor | None = None,
    lse_tree: torch.Tensor | None = None,
    prefix_columns: int = 24,
    row: int | None = None,
) -> go.Figure:
    """One verification pass as a block matrix: T query rows against P prefix keys (dense: every
    row sees every prefix key; drawn as `prefix_columns` chunks) and the T tree keys (the tree mask).
    With the two parts' LSEs (one query head) a slider steps through the merge for one row: the
    prefix part alone, the tree part alone, then w = sigmoid(lse_p - lse_t) and the merged result."""
    m = mask.detach().cpu().to(torch.int64)
    T = m.shape[0]
    if m.shape != (T, T):
        raise ValueError(f"mask must be [T, T], got {tuple(m.shape)}")
    z = torch.cat([torch.ones(T, prefix_columns, dtype=torch.int64), 2 * m], dim=1).tolist()
    xlab = [f"prefix {i + 1}" for i in range(prefix_columns)] + [f"tree {j}" for j in range(T)]
    colors = [[0, "#f2f2f2"], [0.33, "#f2f2f2"], [0.34, METHOD["ar"]], [0.66, METHOD["ar"]], [0.67, METHOD["tree"]]]
    colors.append([1, METHOD["tree"]])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(len(xlab))),
            y=list(range(T)),
            zmin=0,
            zmax=2,
            colorscale=colors,
            showscale=False,
            customdata=[[xlab[j] for j in range(len(xlab))] for _ in range(T)],
            hovertemplate="query row %{y} → %{customdata}: %{z}<extra></extra>",
            xgap=1,
            ygap=1,
            name="may attend",
        )
    )
    for name, col in (
        (f"prefix block: all {prefix_len:,} keys, no mask (drawn as {prefix_columns} chunks)", METHOD["ar"]),
        ("tree block: T × T tree mask (ancestors and self)", METHOD["tree"]),
        ("masked", "#f2f2f2"),
    ):
        fig.add_trace(
            go.Scatter(x=[None], y=[None], mode="markers", name=name, marker=dict(symbol="square", size=12, color=col))
        )
    fig.add_vline(x=prefix_columns - 0.5, line=dict(color=REFERENCE, width=2))
    row = T - 1 if row is None else int(row)
    fig.add_shape(
        type="rect",
        x0=-0.5,
        x1=len(xlab) - 0.5,
        y0=row - 0.5,
        y1=row + 0.5,
        line=dict(color="#d62728", width=2),
    )
    annotations = [
        dict(
            x=prefix_columns / 2,
            y=-1.2,
            text=f"<b>prefix part</b>: o_p, ℓ_p (plain attention over {prefix_len:,} keys)",
            showarrow=False,
        ),
        dict(x=prefix_columns + T / 2, y=-1.2, text="<b>tree part</b>: o_t, ℓ_t (masked)", showarrow=False),
    ]
    fig.update_layout(annotations=annotations)
    if lse_prefix is not None and lse_tree is not None:
        lp, lt = float(lse_prefix[row]), float(lse_tree[row])
        w = 1 / (1 + math.exp(-(lp - lt)))
        lse = max(lp, lt) + math.log1p(math.exp(-abs(lp - lt)))
        texts = [
            f"step 1 · row {row}: the prefix part alone gives o_p and ℓ_p = {lp:.3f}",
            f"step 2 · row {row}: the tree part alone gives o_t and ℓ_t = {lt:.3f} (only the row's path is visible)",
            f"step 3 · merge: w = σ(ℓ_p − ℓ_t) = {w:.4f} of the mass is on the prefix, 1 − w = {1 - w:.4f} on the tree",
            f"step 4 · o = w·o_p + (1 − w)·o_t, ℓ = log(e^ℓ_p + e^ℓ_t) = {lse:.3f}: one softmax over all keys",
        ]
        opac = [
            (1.0, 0.15),
            (0.15, 1.0),
            (1.0, 1.0),
            (1.0, 1.0),
        ]
        steps = []
        for k, (txt, (a, b)) in enumerate(zip(texts, opac)):
            zz = [[v if (v != 1 or a == 1.0) and (v != 2 or b == 1.0) else 0 for v in r_] for r_ in z]
            steps.append(
                dict(
                    label=f"{k + 1}",
                    method="update",
                    args=[{"z": [zz]}, {"title.text": txt}, [0]],
                )
            )
        fig.update_layout(
            sliders=[dict(active=3, steps=steps, currentvalue=dict(prefix="merge step "), pad=dict(t=10), y=-0.1)]
        )
        fig.update_layout(title=texts[3])
    else:
        fig.update_layout(
            title=f"One verification pass: {T} query rows against {prefix_len:,} prefix keys + {T} tree keys"
        )
    fig.update_xaxes(
        tickvals=[0, prefix_columns - 1, prefix_columns, len(xlab) - 1],
        ticktext=["key 0", f"key {prefix_len - 1}", f"tree 0 (slot {prefix_len})", f"tree {T - 1}"],
    )
    fig.update_yaxes(autorange="reversed", title="query row = tree node")
    fig.update_layout(height=620, width=980, legend=dict(orientation="h", y=-0.42), margin=dict(b=190, t=70))
    return fig


# ----------------------------------------------------------------------------- positions ablated


class _RotaryRemap:
    """Stands in for the draft's `target` reference: every attribute is the target's, except that
    the RoPE tables are built at remapped positions."""

    def __init__(self, target, remap: Callable[[torch.Tensor], torch.Tensor]):
        self._target, self._remap = target, remap

    def rotary(self, positions, dtype):
        return self._target.rotary(self._remap(positions), dtype)

    def __getattr__(self, name):
        return getattr(self._target, name)


POSITION_ABLATIONS = {
    "true positions (as the target's cache has them)": None,
    "wrapped into the 1024-token training window (p mod 1024)": lambda p: p % 1024,
    "shifted forward by 2,048": lambda p: p + 2048,
    "all at position 0 (no position information)": lambda p: p * 0,
}


@contextlib.contextmanager
def draft_positions(draft, remap: Callable[[torch.Tensor], torch.Tensor] | None):
    """Within the block, the draft rotates its queries and keys at remap(true position), while the
    target's cache keeps its keys at the true positions (the draft's cross-attention reads them)."""
    if remap is None:
        yield draft
        return
    if not hasattr(draft, "target") or not hasattr(draft.target, "rotary"):
        raise ValueError("this draft has no target.rotary to remap; pass a GliDe draft from models.glide")
    had = "target" in vars(draft)
    old = vars(draft).get("target")
    object.__setattr__(draft, "target", _RotaryRemap(draft.target, remap))
    try:
        yield draft
    finally:
        if had:
            object.__setattr__(draft, "target", old)
        else:
            del vars(draft)["target"]


def position_ablation(decoder, draft, ids, max_new_tokens: int, shape=(4, 16, 16, 16, 16), ablations=None):
    """tau, acceptance at depth 1 and the output of the same greedy tree generation under each
    position remapping (ablations: {name: remap or None})."""
    rows = []
    for name, remap in (ablations or POSITION_ABLATIONS).items():
        with draft_positions(draft, remap):
            r = decoder.generate(ids, method="tree", tree_shape=list(shape), max_new_tokens=max_new_tokens)
        rows.append(
            dict(
                positions=name,
                tau=r.tau,
                depth1_acceptance=(r.acceptance_by_depth or [None])[0],
                target_calls=r.target_calls,
                new_tokens=list(r.new_tokens),
            )
        )
    return rows


def position_ablation_figure(rows: Sequence[Mapping], title: str | None = None) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("τ (tokens per target pass)", "acceptance at depth 1"))
    names = [r["positions"] for r in rows]
    cols = [method_color("tree") if i == 0 else series_color(i + 2) for i in range(len(rows))]
    for col, key in ((1, "tau"), (2, "depth1_acceptance")):
        fig.add_trace(
            go.Bar(
                x=names,
                y=[r[key] for r in rows],
                marker_color=cols,
                showlegend=False,
                text=[f"{r[key]:.2f}" for r in rows],
                textposition="outside",
            ),
            row=1,
            col=col,
        )
    fig.update_yaxes(rangemode="tozero")
    fig.update_yaxes(range=[0, 1.1], row=1, col=2)
    fig.update_layout(
        title=title or "The draft's positions must match the target's cache: measured with the same prompt",
        height=460,
        width=980,
        margin=dict(b=140),
    )
    return fig


# ----------------------------------------------------------------------------- recursive rejection sampling


def rrs_steps(p, q, children) -> list[dict]:
    """One level of recursive rejection sampling, child by child (SpecInfer / Sequoia): the child x
    is accepted with probability min(1, p(x) / q(x)); on rejection p becomes norm(max(p - q, 0)) and
    x is removed from q (renormalised). Returns, per offered child, the p and q it met, its
    acceptance probability and the probability that the level ends on it; the last entry is the
    residual p sampled when every child is rejected."""
    import numpy as np

    p, q = np.asarray(p, dtype=float).copy(), np.asarray(q, dtype=float).copy()
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"p {p.shape} and q {q.shape} must be vectors of the same length")
    reach, out = 1.0, []
    for x in children:
        a = min(1.0, p[x] / q[x]) if q[x] > 0 else 1.0
        out.append(dict(child=int(x), p=p.copy(), q=q.copy(), accept=a, ends_here=reach * a))
        reach *= 1 - a
        p = np.maximum(p - q, 0)
        p = p / p.sum() if p.sum() > 0 else p
        q[x] = 0
        q = q / q.sum() if q.sum() > 0 else q
    out.append(dict(child=None, p=p.copy(), q=q.copy(), accept=None, ends_here=reach))
    return out


def rrs_steps_figure(steps: Sequence[Mapping], labels: Sequence[str] | None = None) -> go.Figure:
    """One panel per offered child: the p (target, residual after earlier rejections) and q (draft,
    without the rejected children) that child meets, with its acceptance probability."""
    from longspec_lab.teach.palette import rule_color

    n = len(steps)
    V = len(steps[0]["p"])
    labels = list(labels or [str(i) for i in range(V)])
    titles = [
        f"offer {labels[s['child']]}: accept min(1, p/q) = {s['accept']:.2f}"
        if s["child"] is not None
        else f"all rejected ({s['ends_here']:.2f}): sample the residual p"
        for s in steps
    ]
    fig = make_subplots(rows=1, cols=n, shared_yaxes=True, subplot_titles=titles, horizontal_spacing=0.03)
    for k, s in enumerate(steps, start=1):
        for name, key, col in (("p (target, residual)", "p", rule_color("rrs")), ("q (draft)", "q", REFERENCE)):
            fig.add_trace(
                go.Bar(
                    x=labels,
                    y=list(s[key]),
                    name=name,
                    legendgroup=key,
                    showlegend=k == 1,
                    marker_color=col,
                    opacity=1.0 if key == "p" else 0.35,
                ),
                row=1,
                col=k,
            )
        if s["child"] is not None:
            fig.add_vrect(x0=s["child"] - 0.5, x1=s["child"] + 0.5, line=dict(color="#d62728", width=2), row=1, col=k)
    fig.update_layout(
        title="Recursive rejection sampling, one level: each rejection turns p into its residual",
        barmode="group",
        height=380,
        width=min(250 * n + 120, 1100),
        legend=dict(orientation="h", y=-0.2),
    )
    fig.update_annotations(font_size=11)
    return fig
