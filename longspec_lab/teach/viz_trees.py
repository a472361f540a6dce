"""Pure figure functions for the notebooks: draft trees and tree masks (results plots: `viz_results`).

Nothing here holds widget state; every function maps data (a `DraftTree`, a `StepRecord` from
`GenerationResult.trace`, a mask, a list of results) to a `graphviz.Digraph` or a plotly `Figure`.
The widgets in `widgets.py` only wire these together. LongSpec (arXiv 2502.17421) drafts a beam
tree per step and verifies it in one target pass; these pictures show which nodes the target
agreed with (verified), which of those form the accepted path, and what each node may attend to.

Node colours (legend in every diagram): root, accepted path, verified but not accepted (its token
matches the target's prediction at its parent, but an ancestor was rejected), rejected, and plain
drafted nodes when no verification is shown.

Taught in: notebooks/02_tree_shapes.ipynb and notebooks/03_one_step_slowly.ipynb.
"""

from __future__ import annotations

from typing import Sequence

import graphviz
import numpy as np
import plotly.graph_objects as go
import torch

from longspec_lab.spec.trace import StepRecord
from longspec_lab.spec.tree import DraftTree, TreeShape
from longspec_lab.teach.palette import COLORS, PATH_EDGE, STATUS_TEXT, _html

_VISIBLE = {"\n": "↵", " ": "·", "\t": "⇥", "\r": "␍"}


# ----------------------------------------------------------------------------- token labels


def visible_text(s: str, max_len: int | None = None) -> str:
    """Make whitespace visible (newline -> ↵, space -> ·, tab -> ⇥); other control chars -> \\xNN."""
    out = "".join(_VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in s)
    if max_len is not None and len(out) > max_len:
        out = out[: max(1, max_len - 1)] + "…"
    return out or "∅"


def token_label(token_id: int, tokenizer=None, max_len: int = 14) -> str:
    """Visible text of one token id, decoded with `tokenizer` (anything with .decode(list[int]))."""
    token_id = int(token_id)
    if tokenizer is None:
        return f"<{token_id}>"
    return visible_text(tokenizer.decode([token_id]), max_len)


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\")  # graphviz quoting escapes the double quotes itself


# ----------------------------------------------------------------------------- trees


def balanced_tree(shape) -> DraftTree:
    """A placeholder tree of `shape`: level l's nodes spread evenly over level l-1's nodes.

    Only for drawing a shape before any draft has run: a real beam tree picks parents by score,
    so its branching is usually far from even."""
    shape = TreeShape.of(shape)
    off, parents = shape.level_offsets, [-1]
    for l, w in enumerate(shape.widths, start=1):
        prev = off[l] - off[l - 1]
        parents += [off[l - 1] + (j * prev) // w for j in range(w)]
    return DraftTree.from_parents([0] * len(parents), parents)


def truncate_tree(tree: DraftTree, depth: int) -> DraftTree:
    """The first `depth` levels of a tree (nodes are numbered level by level, so it is a prefix)."""
    if not 0 <= depth <= tree.shape.depth:
        raise ValueError(f"depth {depth} is outside 0..{tree.shape.depth}; pick a level of this tree")
    n = tree.shape.level_offsets[depth + 1]
    return DraftTree.from_parents(tree.tokens[:n], tree.parents[:n], tree.scores[:n])


def children_per_node(tree: DraftTree, level: int) -> list[int]:
    """How many level-`level` children each node of level `level - 1` got (in beam order)."""
    off = tree.shape.level_offsets
    if not 1 <= level <= tree.shape.depth:
        raise ValueError(f"level {level} is outside 1..{tree.shape.depth}; pick a level of this tree")
    par = tree.parents[off[level] : off[level + 1]].tolist()
    return [par.count(p) for p in range(off[level - 1], off[level])]


def _unpack(obj):
    """tree_or_shape -> (tree, step or None, placeholder?)."""
    if isinstance(obj, StepRecord):
        return obj.tree, obj, False
    if isinstance(obj, DraftTree):
        return obj, None, False
    try:
        return balanced_tree(obj), None, True
    except ValueError as e:
        raise ValueError(f"tree_diagram needs a DraftTree, a StepRecord or a tree shape: {e}") from None


def node_statuses(tree: DraftTree, step: StepRecord | None = None) -> list[str]:
    """Status per node: 'root', then 'accepted' / 'verified' / 'rejected' (with a step) or 'drafted'."""
    if step is None:
        return ["root"] + ["drafted"] * (tree.num_nodes - 1)
    path = set(step.result.path.tolist())
    ver = step.result.verified.tolist()
    return ["root"] + [
        "accepted" if i in path else "verified" if ver[i] else "rejected" for i in range(1, tree.num_nodes)
    ]


def visible_nodes(tree: DraftTree, max_children: int, keep=()) -> tuple[list[int], dict[int, list[int]]]:
    """Which nodes a diagram draws: per parent its first `max_children` children (beam order) plus
    any in `keep`; the other children and all their descendants are hidden.
    Returns (shown node ids, {parent: hidden children})."""
    if max_children < 1:
        raise ValueError(f"max_children={max_children} must be >= 1 (how many siblings to draw before '+k more')")
    keep, shown, hidden = set(keep), [0], {}
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents.tolist()[1:], start=1):
        kids.setdefault(p, []).append(i)
    stack = [0]
    while stack:
        p = stack.pop()
        ch = kids.get(p, [])
        vis = [c for r, c in enumerate(ch) if r < max_children or c in keep]
        if len(vis) < len(ch):
            hidden[p] = [c for c in ch if c not in vis]
        shown += vis
        stack += vis
    return sorted(shown), hidden


def _subtree_size(tree: DraftTree, roots: list[int]) -> int:
    par, inside, n = tree.parents.tolist(), set(roots), 0
    for i in range(1, tree.num_nodes):  # parents come first
        if i in inside or par[i] in inside:
            inside.add(i)
            n += 1
    return n


def _legend_html(title: str, statuses: Sequence[str], note: str = "") -> str:
    cells = "".join(f'<td bgcolor="{COLORS[s]}" border="1"> {STATUS_TEXT[s]} </td>' for s in statuses)
    k = len(statuses)
    note = f'<tr><td colspan="{k}"><font point-size="10">{_html(note)}</font></td></tr>' if note else ""
    return (
        f'<<table border="0" cellspacing="6"><tr><td colspan="{k}"><b>{_html(title)}</b></td></tr>'
        f"{note}<tr>{cells}</tr></table>>"
    )


def tree_diagram(
    tree_or_shape,
    trace_step: StepRecord | None = None,
    tokenizer=None,
    max_children: int = 4,
    show_scores: bool = True,
    title: str | None = None,
    rankdir: str = "LR",
    token_len: int = 12,
    size: str | None = "10,30",
    losers: Sequence[dict] | None = None,
) -> graphviz.Digraph:
    """Draw a draft tree level by level (one column per level, `rank=same`).

    tree_or_shape: a DraftTree, a StepRecord (tree + verification) or a shape such as [4, 16, 16]
    (drawn as a placeholder tree). With a step, each node also shows the target's prediction after
    it (`→ tok`) and is coloured by status; the accepted path's edges are drawn thick. Siblings
    beyond `max_children` collapse into one '+k more' node (accepted-path nodes are always drawn).
    Graph node names: `n{i}` for tree nodes, `more{parent}` for collapsed groups, `level{l}` for
    the column headers. `size` (inches, "w,h") shrinks big drawings to fit a notebook column.
    losers: beam candidates that lost their level (dicts with parent, token, score, level, rank, as
    `setup.beam_losers` returns), drawn greyed out with dashed edges (graph names `lost{k}`)."""
    tree, step, placeholder = _unpack(tree_or_shape)
    step = trace_step if trace_step is not None else step
    if step is not None and step.tree.num_nodes != tree.num_nodes:
        raise ValueError(
            f"trace_step has a tree of {step.tree.num_nodes} nodes but the tree has "
            f"{tree.num_nodes}; pass the step's own tree (or the step alone)"
        )
    status = node_statuses(tree, step)
    path = step.result.path.tolist() if step is not None else []
    losers = list(losers or [])
    shown, hidden = visible_nodes(tree, max_children, keep=set(path) | {int(c["parent"]) for c in losers})
    toks, par, sc = tree.tokens.tolist(), tree.parents.tolist(), tree.scores.tolist()
    depths = tree.depths.tolist()
    pred = step.target_tokens.tolist() if step is not None else None
    shape = tree.shape
    if title is None:
        kind = "placeholder layout of shape" if placeholder else "draft tree"
        title = f"{kind} {list(shape.widths)}: {tree.num_nodes} nodes"
        if step is not None:
            title += " · " + step_summary(step)
    note = (
        ""
        if placeholder
        else (
            "each node: its token / node id and cumulative draft log-prob"
            + (" / → the target's prediction after it" if step is not None else "")
        )
    )
    drawn = {status[i] for i in shown} | ({"more"} if hidden else set()) | ({"lost"} if losers else set())
    present = [s for s in STATUS_TEXT if s in drawn]
    g = graphviz.Digraph("draft_tree")
    if size:
        g.attr(size=size)
    g.attr(
        rankdir=rankdir,
        nodesep="0.08",
        ranksep="0.35",
        labelloc="t",
        fontname="DejaVu Sans",
        fontsize="12",
        label=_legend_html(title, present, note),
    )
    g.attr(
        "node",
        shape="box",
        style="rounded,filled",
        fontname="DejaVu Sans Mono",
        fontsize="10",
        margin="0.06,0.03",
        height="0.3",
        color="#555555",
    )
    g.attr("edge", color="#9a9a9a", arrowsize="0.5")
    levels: dict[int, list[str]] = {}
    for i in shown:
        if placeholder:
            lines = [f"#{i}" if i else "root"]
        else:
            lines = [token_label(toks[i], tokenizer, token_len), f"#{i}" if i else "root #0"]
            if show_scores and i:
                lines[1] += f" {sc[i]:.2f}"
            if pred is not None:
                lines.append("→ " + token_label(pred[i], tokenizer, token_len))
        attrs = dict(fillcolor=COLORS[status[i]])
        if i == 0:
            attrs.update(peripheries="2", penwidth="1.5")
        if status[i] == "accepted":
            attrs.update(penwidth="2", color=PATH_EDGE)
        g.node(f"n{i}", label="\\n".join(_dot_escape(s) for s in lines), **attrs)
        levels.setdefault(depths[i], []).append(f"n{i}")
        if i:
            on_path = status[i] == "accepted"
            g.edge(f"n{par[i]}", f"n{i}", **(dict(color=PATH_EDGE, penwidth="2.5") if on_path else {}))
    for p, kids in sorted(hidden.items()):
        below = _subtree_size(tree, kids) - len(kids)
        label = f"+{len(kids)} more" + (f"\\n(+{below} below)" if below else "")
        g.node(f"more{p}", label=label, fillcolor=COLORS["more"], style="rounded,dashed,filled", fontcolor="#555555")
        g.edge(f"n{p}", f"more{p}", style="dashed")
        levels.setdefault(depths[p] + 1, []).append(f"more{p}")
    shown_set = set(shown)
    for k, c in enumerate(losers):
        p = int(c["parent"])
        if p not in shown_set:
            continue
        label = _dot_escape(token_label(c["token"], tokenizer, token_len)) + f"\\nlost {c['score']:.2f}"
        g.node(f"lost{k}", label=label, fillcolor=COLORS["lost"], style="rounded,dashed,filled", fontcolor="#777777")
        g.edge(f"n{p}", f"lost{k}", style="dashed", color="#bbbbbb")
        levels.setdefault(depths[p] + 1, []).append(f"lost{k}")
    for l in range(shape.depth + 1):  # column headers, chained invisibly so they keep their order
        n = shape.level_offsets[l + 1] - shape.level_offsets[l]
        g.node(
            f"level{l}",
            label="root" if l == 0 else f"level {l}\\n{n} nodes",
            shape="plaintext",
            style="",
            fontname="DejaVu Sans",
            fontsize="11",
        )
        if l:
            g.edge(f"level{l - 1}", f"level{l}", style="invis")
        with g.subgraph() as s:
            s.attr(rank="same")
            for name in [f"level{l}"] + levels.get(l, []):
                s.node(name)
    return g


def step_summary(step: StepRecord) -> str:
    """'step 3 (1-based): 4 drafted token(s) accepted + 1 bonus = 5 emitted', saying so when the
    length limit kept fewer of them."""
    k, n = len(step.result.path.tolist()), len(step.emitted)
    s = f"step {step.step + 1}: {k - 1} drafted token(s) accepted + 1 bonus = {k}"
    return s + (f" verified, {n} emitted (the length limit cut the rest)" if n < k else " emitted")


def diagram_svg(dot: graphviz.Digraph) -> str:
    """Render with the `dot` program to an SVG string (no XML prologue), for HTML widgets."""
    svg = dot.pipe(format="svg", encoding="utf-8")
    return svg[svg.find("<svg") :]


# ----------------------------------------------------------------------------- masks


def mask_figure(
    mask,
    levels=None,
    path: Sequence[int] | None = None,
    title: str | None = None,
    labels: Sequence[str] | None = None,
    size: int = 560,
) -> go.Figure:
    """Heatmap of a tree mask (row i = query node, column j = key node, 1 = i may attend to j).

    mask: bool/int [N, N] (tensor or array), or a DraftTree / StepRecord (then levels and path are
    taken from it). levels: a TreeShape / widths / level offsets, drawn as boundary lines.
    path: node ids of the accepted path, highlighted. labels: per-node text for the hover."""
    if isinstance(mask, StepRecord):
        path = mask.result.path.tolist() if path is None else path
        mask = mask.tree
    if isinstance(mask, DraftTree):
        levels = mask.shape if levels is None else levels
        mask = mask.mask
    m = (mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)).astype(int)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"mask must be square [N, N], got shape {m.shape}; pass tree.mask")
    n = m.shape[0]
    if levels is None:
        offsets = []
    elif isinstance(levels, TreeShape) or (len(levels) and levels[0] != 0):
        offsets = list(TreeShape.of(levels).level_offsets)
    else:
        offsets = list(levels)
    ids = list(range(n))
    hover = "query node %{y} → key node %{x}: %{z}<extra></extra>"
    custom = None
    if labels is not None:
        custom = np.array([[f"{labels[i]} → {labels[j]}" for j in ids] for i in ids], dtype=object)
        hover = "query %{y} → key %{x} (%{customdata}): %{z}<extra></extra>"
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=ids,
            y=ids,
            zmin=0,
            zmax=1,
            showscale=False,
            customdata=custom,
            colorscale=[[0, "#f2f2f2"], [1, "#3b6fb6"]],
            hovertemplate=hover,
            xgap=1 if n <= 80 else 0,
            ygap=1 if n <= 80 else 0,
            name="mask",
        )
    )
    for name, color in (("1: may attend (self or ancestor)", "#3b6fb6"), ("0: masked", "#f2f2f2")):
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=name,
                marker=dict(symbol="square", size=12, color=color, line=dict(width=1, color="#888")),
            )
        )
    if path is not None and len(path):
        pts = [(j, i) for i in path for j in path if m[i, j]]
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in pts],
                y=[p[1] for p in pts],
                mode="markers",
                name="accepted path",
                hoverinfo="skip",
                marker=dict(symbol="square-open", size=max(4, min(12, 520 // n)), color=PATH_EDGE, line=dict(width=2)),
            )
        )
    for k, o in enumerate(offsets[1:-1], start=1):
        for line in (
            dict(x0=o - 0.5, x1=o - 0.5, y0=-0.5, y1=n - 0.5),
            dict(y0=o - 0.5, y1=o - 0.5, x0=-0.5, x1=n - 0.5),
        ):
            fig.add_shape(type="line", line=dict(color="#d62728", width=1, dash="dot"), **line)
        fig.add_annotation(
            x=(o + offsets[k + 1] - 1) / 2,
            y=-0.5,
            yshift=10,
            text=f"L{k}",
            showarrow=False,
            font=dict(size=10, color="#d62728"),
        )
    fig.update_layout(
        title=title or f"Tree mask: {n} × {n} (row attends to column)",
        width=size + 180,
        height=size,
        legend=dict(title="cell", x=1.02, y=1),
        margin=dict(l=60, r=20, t=60, b=50),
        plot_bgcolor="white",
    )
    fig.update_xaxes(title="key node j (attended to)", range=[-0.5, n - 0.5], constrain="domain", side="bottom")
    fig.update_yaxes(title="query node i", autorange="reversed", scaleanchor="x", constrain="domain")
    return fig
