"""Notebook widgets that wire the pure figures of `viz.py` to ipywidgets controls.

* `TreeShapeExplorer`: choose a tree shape (depth + one width per level, or a preset) and see its
  node count, the mask's size in bytes, the tree diagram and the mask. Updates on slider release.
* `TreeGrowth`: one drafted beam tree shown level by level (how the beam grows).
* `StepPlayer`: play through the trace of a real generation, one verification step at a time.

No maths lives here: trees, masks and acceptance come from the library, pictures from `viz.py`.
Every widget exposes its state as attributes (`node_count_label.value`, `diagram_source`, ...) so
tests can drive it without a browser.

Taught in: notebooks/02_tree_shapes.ipynb and notebooks/03_one_step_slowly.ipynb.
"""

from __future__ import annotations

import html
import re
from typing import Callable

import ipywidgets as W
import plotly.graph_objects as go

from longspec_lab.spec.trace import GenerationResult, StepRecord
from longspec_lab.spec.tree import DEFAULT_TREE_SHAPE, DraftTree, TreeShape
from longspec_lab.teach import palette, viz_trees

PRESETS = {
    "LongSpec [4, 16, 16, 16, 16]": (4, 16, 16, 16, 16),
    "chain of 4 [1, 1, 1, 1]": (1, 1, 1, 1),
    "wide and shallow [16, 16]": (16, 16),
    "narrow [2, 4, 4, 4]": (2, 4, 4, 4),
    "deep [2, 4, 8, 8, 8, 8, 8]": (2, 4, 8, 8, 8, 8, 8),
}
_ERR = '<div style="color:#b00020;font-weight:bold">{}</div>'


def _svg_fit(svg: str) -> str:
    """Make a graphviz SVG scale to its box: width 100% of the column (never wider than drawn),
    height following the viewBox, so the root and the accepted path are always on screen."""
    m = re.match(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"', svg)
    if not m:
        return svg
    w = m.group(1)
    return f'<svg class="fitted-tree" width="100%" style="max-width:{w}pt;height:auto"' + svg[m.end() :]


def _svg_box(svg: str) -> str:
    return f'<div class="tree-box" style="width:100%">{_svg_fit(svg)}</div>'


class _Snapshot:
    """Widgets also carry a static HTML copy of what they show (text/html next to the widget view):
    JupyterLab draws the live widget; a static page (the site, a code-hosting viewer) the copy."""

    def snapshot_html(self) -> str:
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if data is not None:
            data["text/html"] = '<div class="widget-snapshot">' + self.snapshot_html() + "</div>"
        return bundle


def _fig_html(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False)


def _render(dot) -> str:
    """SVG for an HTML widget; without the `dot` program, the DOT source with a hint."""
    try:
        return _svg_box(viz_trees.diagram_svg(dot))
    except Exception as e:  # graphviz.ExecutableNotFound, or a rendering failure
        return (
            _ERR.format(
                f"cannot render the diagram ({type(e).__name__}); install Graphviz "
                "(apt-get install graphviz) to see it. DOT source:"
            )
            + f"<pre>{html.escape(dot.source)}</pre>"
        )


class TreeShapeExplorer(_Snapshot, W.VBox):
    """Depth slider + one width slider per level + presets -> node count, mask bytes, diagram, mask.

    tree_fn(shape) may return a real drafted tree (DraftTree or StepRecord) for the shape; without
    it the diagram shows a placeholder layout. cache_limit: the most tree nodes the cache reserves
    room for (the reference reserves 256 slots); larger trees are refused with a message."""

    def __init__(
        self,
        shape=DEFAULT_TREE_SHAPE,
        max_depth: int = 8,
        max_width: int = 64,
        cache_limit: int = 256,
        max_children: int = 4,
        tree_fn: Callable[[TreeShape], DraftTree | StepRecord] | None = None,
        tokenizer=None,
    ):
        widths = list(TreeShape.of(shape).widths)
        if not 1 <= len(widths) <= max_depth:
            raise ValueError(f"shape {widths} has depth {len(widths)}; use max_depth >= {len(widths)}")
        self.cache_limit, self.tree_fn, self.tokenizer = int(cache_limit), tree_fn, tokenizer
        self.shape: TreeShape | None = None
        self.error: str | None = None
        self.diagram_source = ""
        self._hold = False
        style = {"description_width": "70px"}
        self.depth_slider = W.IntSlider(
            value=len(widths), min=0, max=max_depth, description="depth", continuous_update=False, style=style
        )
        self.width_sliders = [
            W.IntSlider(
                value=widths[l] if l < len(widths) else 4,
                min=0,
                max=max_width,
                description=f"level {l + 1}",
                continuous_update=False,
                style=style,
            )
            for l in range(max_depth)
        ]
        self.preset = W.Dropdown(
            options=["(custom)"] + list(PRESETS), value="(custom)", description="preset", style=style
        )
        self.max_children_slider = W.IntSlider(
            value=max_children,
            min=1,
            max=16,
            continuous_update=False,
            description="siblings",
            style=style,
            tooltip="children drawn per node before '+k more'",
        )
        self.node_count_label = W.HTML()
        self.mask_label = W.HTML()
        self.message = W.HTML()
        self.diagram = W.HTML()
        self.mask_fig = go.FigureWidget(viz_trees.mask_figure([[1]]))
        for s in [self.depth_slider, self.max_children_slider, *self.width_sliders]:
            s.observe(self._on_change, names="value")
        self.preset.observe(self._on_preset, names="value")
        controls = W.VBox(
            [self.preset, self.depth_slider, *self.width_sliders, self.max_children_slider],
            layout=W.Layout(min_width="330px"),
        )
        info = W.VBox([self.node_count_label, self.mask_label, self.message])
        super().__init__([W.HBox([controls, info]), self.diagram, self.mask_fig])
        self.update()

    # ------------------------------------------------------------------ state
    @property
    def widths(self) -> list[int]:
        return [s.value for s in self.width_sliders[: self.depth_slider.value]]

    def set_shape(self, widths) -> None:
        """Set depth and widths at once (one update)."""
        widths = list(widths)
        if len(widths) > len(self.width_sliders):
            raise ValueError(
                f"shape {widths} is deeper than this explorer's {len(self.width_sliders)} "
                "levels; build it with a larger max_depth"
            )
        self._hold = True
        try:
            self.depth_slider.value = len(widths)
            for s, w in zip(self.width_sliders, widths):
                s.value = min(max(int(w), s.min), s.max)
        finally:
            self._hold = False
        self.update()

    def _on_preset(self, change) -> None:
        if change["new"] in PRESETS and not self._hold:
            self.set_shape(PRESETS[change["new"]])

    def _on_change(self, change) -> None:
        if not self._hold:
            self.update()

    def _check(self) -> TreeShape:
        d = self.depth_slider.value
        if d == 0:
            raise ValueError(
                "depth 0 means no draft tree at all (that is plain decoding, one token per "
                "target pass); set depth to 1 or more"
            )
        shape = TreeShape(tuple(self.widths))  # width 0 -> ValueError naming the level
        if shape.num_nodes > self.cache_limit:
            raise ValueError(
                f"this tree has {shape.num_nodes} nodes but the cache reserves only "
                f"{self.cache_limit} slots for the tree; lower a width or the depth"
            )
        return shape

    # ------------------------------------------------------------------ drawing
    def update(self) -> None:
        for l, s in enumerate(self.width_sliders):
            s.layout.display = None if l < self.depth_slider.value else "none"
        try:
            shape = self._check()
            tree = self.tree_fn(shape) if self.tree_fn is not None else shape
        except ValueError as e:
            self.shape, self.error = None, str(e)
            self.message.value = _ERR.format(html.escape(self.error))
            self.node_count_label.value = "<b>nodes: —</b> (fix the shape)"
            self.mask_label.value = ""
            self.diagram.value = ""
            self.diagram_source = ""
            clear_figure(self.mask_fig, "no mask: the shape was refused (fix it above)")
            self._sync_preset()
            return
        self.shape, self.error = shape, None
        self.message.value = ""
        n, plus = shape.num_nodes, " + ".join(map(str, shape.widths))
        self.node_count_label.value = f"<b>nodes: {n}</b> = 1 root + {plus}"
        self.mask_label.value = (
            f"mask: {n} × {n} = {n * n:,} entries = <b>{shape.mask_bytes:,} bytes</b> as bool "
            f"({2 * n * n:,} as float16, the reference's layout)"
        )
        dot = viz_trees.tree_diagram(tree, tokenizer=self.tokenizer, max_children=self.max_children_slider.value)
        self.diagram_source = dot.source
        self.diagram.value = _render(dot)
        new = viz_trees.mask_figure(
            tree if not isinstance(tree, TreeShape) else viz_trees.balanced_tree(shape),
            title=f"Tree mask for {list(shape.widths)}: {n} × {n}",
        )
        refresh_figure(self.mask_fig, new)
        self._sync_preset()

    def _sync_preset(self) -> None:
        """The preset box names the preset the sliders show, or '(custom)'."""
        name = next((k for k, v in PRESETS.items() if list(v) == self.widths), "(custom)")
        if self.preset.value != name:
            self._hold = True
            try:
                self.preset.value = name
            finally:
                self._hold = False

    def snapshot_html(self) -> str:
        return (
            f"<div>{self.node_count_label.value}<br>{self.mask_label.value}{self.message.value}</div>"
            + self.diagram.value
            + (_fig_html(go.Figure(self.mask_fig)) if self.shape is not None else "")
        )


def clear_figure(fig: go.FigureWidget, title: str) -> None:
    """Empty a FigureWidget (no traces, no shapes) and say why in its title."""
    with fig.batch_update():
        fig.data = []
        fig.layout.shapes = []
        fig.layout.annotations = []
        fig.update_layout(title=title)


def refresh_figure(fig: go.FigureWidget, new: go.Figure) -> None:
    """Update a FigureWidget in place to show `new` (same trace kinds: update; else replace)."""
    if [t.type for t in fig.data] != [t.type for t in new.data]:
        fig.data = []
        fig.add_traces(list(new.data))
    else:
        with fig.batch_update():
            for old, tr in zip(fig.data, new.data):
                js = tr.to_plotly_json()
                js.pop("type", None)
                old.update(js, overwrite=True)
    with fig.batch_update():
        fig.layout.shapes = new.layout.shapes
        fig.layout.annotations = new.layout.annotations
        fig.update_layout(title=new.layout.title, width=new.layout.width, height=new.layout.height)
        fig.update_xaxes(new.layout.xaxis.to_plotly_json())
        fig.update_yaxes(new.layout.yaxis.to_plotly_json())


class TreeGrowth(_Snapshot, W.VBox):
    """One drafted tree shown level by level: level l's nodes are the global top-w_l (parent, token)
    pairs by cumulative draft log-prob over all nodes of level l-1."""

    def __init__(self, tree: DraftTree | StepRecord, tokenizer=None, max_children: int = 4, losers=None):
        self.tree = tree.tree if isinstance(tree, StepRecord) else tree
        self.losers = list(losers or [])  # setup.first_step_with_losers: candidates that lost, greyed out
        if self.tree.shape.depth < 1:
            raise ValueError("this tree has only its root; draft a tree with at least one level")
        self.tokenizer, self.max_children = tokenizer, max_children
        self.level_slider = W.IntSlider(
            value=1, min=1, max=self.tree.shape.depth, description="levels", continuous_update=False
        )
        self.diagram = W.HTML()
        self.diagram_source = ""
        self.level_slider.observe(lambda c: self.update(), names="value")
        super().__init__([self.level_slider, self.diagram])
        self.update()

    def update(self) -> None:
        l = self.level_slider.value
        part = viz_trees.truncate_tree(self.tree, l)
        title = f"beam tree after {l} of {self.tree.shape.depth} levels: widths {list(part.shape.widths)}"
        lost = [c for c in self.losers if c["level"] <= l]
        if lost:
            title += f" · grey: the {len(lost)} best candidates that lost (score = cumulative draft log-prob)"
        dot = viz_trees.tree_diagram(
            part, tokenizer=self.tokenizer, max_children=self.max_children, title=title, losers=lost
        )
        self.diagram_source = dot.source
        self.diagram.value = _render(dot)

    def snapshot_html(self) -> str:
        return self.diagram.value


class StepPlayer(_Snapshot, W.VBox):
    """Play / step through `GenerationResult.trace`: per step the drafted tree with real tokens, the
    target's prediction at each node, the accepted path, the committed text so far and tau so far."""

    def __init__(
        self, result: GenerationResult, tokenizer=None, max_children: int = 4, interval_ms: int = 1800, prompt_ids=None
    ):
        if not isinstance(result, GenerationResult) or not result.trace:
            raise ValueError(
                "StepPlayer needs a GenerationResult with a trace; call "
                "SpecDecoder.generate(..., method='tree', trace=True)"
            )
        self.result, self.tokenizer, self.max_children = result, tokenizer, max_children
        self.context = tokenizer.decode(list(prompt_ids)[-120:]) if (tokenizer and prompt_ids is not None) else ""
        n = len(result.trace)
        self.play = W.Play(value=0, min=0, max=n - 1, interval=interval_ms, description="play")
        self.slider = W.IntSlider(value=0, min=0, max=n - 1, description="step", continuous_update=False)
        self.prev_button = W.Button(description="◀ prev", layout=W.Layout(width="80px"))
        self.next_button = W.Button(description="next ▶", layout=W.Layout(width="80px"))
        self.header, self.text, self.diagram, self.path_table = W.HTML(), W.HTML(), W.HTML(), W.HTML()
        self.diagram_source = ""
        self.play.observe(lambda c: setattr(self.slider, "value", c["new"]), names="value")
        self.slider.observe(self._on_step, names="value")
        self.prev_button.on_click(lambda _: self.go(self.slider.value - 1))
        self.next_button.on_click(lambda _: self.go(self.slider.value + 1))
        bar = W.HBox([self.play, self.prev_button, self.next_button, self.slider])
        super().__init__([bar, self.header, self.text, self.diagram, self.path_table])
        self.update()

    @property
    def step(self) -> int:
        return self.slider.value

    def go(self, k: int) -> None:
        self.slider.value = min(max(int(k), 0), self.slider.max)

    def _on_step(self, change) -> None:
        self.play.value = change["new"]
        self.update()

    def tau_so_far(self, k: int | None = None) -> float:
        """Tokens so far / target passes so far (the prefill's pass and token included), as result.tau."""
        k = self.step if k is None else k
        made = 1 + sum(len(s.emitted) for s in self.result.trace[: k + 1])
        return made / (2 + k)

    def committed_tokens(self, k: int | None = None) -> tuple[list[int], list[int]]:
        """(tokens committed before step k, tokens step k added)."""
        k = self.step if k is None else k
        before = 1 + sum(len(s.emitted) for s in self.result.trace[:k])
        added = len(self.result.trace[k].emitted)
        return self.result.new_tokens[:before], self.result.new_tokens[before : before + added]

    def update(self) -> None:
        k = self.step
        st = self.result.trace[k]
        before, added = self.committed_tokens(k)
        path_len = len(st.result.path)
        cut = (
            f" · the length limit kept <b>{len(added)}</b> of the {path_len} verified tokens"
            if len(added) < path_len
            else ""
        )
        self.header.value = (
            f"<b>step {st.step + 1} of {len(self.result.trace)}</b> · committed tokens before: "
            f"{st.prefix_len} · this step emitted <b>{len(added)}</b> tokens "
            f"({path_len - 1} drafted accepted + 1 bonus verified){cut} · τ so far <b>{self.tau_so_far(k):.2f}</b>"
        )
        if self.tokenizer is not None:
            old, new = self.tokenizer.decode(before), self.tokenizer.decode(added)
            esc = lambda t: html.escape(t).replace("\n", "<br>")
            ctx = self.context[-400:]
            ctx = ctx[ctx.find("\n") + 1 :] if "\n" in ctx else ctx  # start on a whole line
            # column-reverse keeps the box scrolled to its end, where this step's tokens are
            self.text.value = (
                '<div style="display:flex;flex-direction:column-reverse;max-height:170px;overflow:auto;'
                'border:1px solid #ddd;padding:4px">'
                '<div style="font-family:monospace;white-space:pre-wrap;line-height:1.35">'
                f'<span style="color:#999">{esc(ctx)}</span>{esc(old[-600:])}'
                f'<span style="background:{palette.COLORS["accepted"]}">{esc(new)}</span></div></div>'
            )
        dot = viz_trees.tree_diagram(st, tokenizer=self.tokenizer, max_children=self.max_children)
        self.diagram_source = dot.source
        self.diagram.value = _render(dot)
        rows = "".join(
            f"<tr><td>{d}</td><td>#{i}</td><td>{html.escape(viz_trees.token_label(st.tree.tokens[i], self.tokenizer))}"
            f"</td><td>{html.escape(viz_trees.token_label(st.target_tokens[i], self.tokenizer))}</td>"
            f"<td>{'yes' if d < len(added) else 'no (length limit)'}</td></tr>"
            for d, i in enumerate(st.result.path.tolist())
        )
        self.path_table.value = (
            "<table><tr><th>depth</th><th>node</th><th>drafted token</th>"
            f"<th>target's next token</th><th>emitted</th></tr>{rows}</table>"
        )

    def snapshot_html(self) -> str:
        return self.header.value + self.text.value + self.diagram.value + self.path_table.value


class CostModelExplorer(_Snapshot, W.VBox):
    """Sliders for the roofline cost model of one target pass (teach.cost): rows verified, the
    longest context, model size, bandwidth and FLOP rate -> t(rows) / t(1 row) against context, with
    the recorded H200 points and a live measurement (both fixed: they belong to their own
    hardware and model, so they stay put when the sliders move)."""

    def __init__(self, recorded=None, live=None, live_label: str = "measured here"):
        from longspec_lab.teach import cost

        self._cost, self.recorded, self.live, self.live_label = cost, recorded, live, live_label
        style = {"description_width": "150px"}
        lay = W.Layout(width="520px")
        hw, m = cost.Hardware.h200(), cost.ModelCost.llama3_8b()
        self.rows_slider = W.IntSlider(
            value=72, min=1, max=512, description="rows verified", continuous_update=False, style=style, layout=lay
        )
        self.context_slider = W.IntSlider(
            value=17,
            min=12,
            max=20,
            description="longest context 2^k",
            continuous_update=False,
            style=style,
            layout=lay,
        )
        self.params_slider = W.FloatLogSlider(
            value=m.params / 1e9, base=10, min=-1, max=2.5, description="model size (B params)", style=style, layout=lay
        )
        self.bw_slider = W.FloatSlider(
            value=hw.bandwidth / 1e12,
            min=0.2,
            max=10,
            step=0.05,
            description="bandwidth (TB/s)",
            style=style,
            layout=lay,
        )
        self.flops_slider = W.FloatSlider(
            value=hw.flops / 1e12, min=10, max=2500, step=5, description="FLOP rate (TFLOP/s)", style=style, layout=lay
        )
        for s in (self.params_slider, self.bw_slider, self.flops_slider):
            s.continuous_update = False
        self.summary = W.HTML()
        self.fig = go.FigureWidget(self.figure())
        for s in self.sliders:
            s.observe(lambda c: self.update(), names="value")
        super().__init__([*self.sliders, self.summary, self.fig])
        self.update()

    @property
    def sliders(self):
        return [self.rows_slider, self.context_slider, self.params_slider, self.bw_slider, self.flops_slider]

    def model_and_hardware(self):
        c = self._cost
        m = c.ModelCost.llama3_8b().scaled(self.params_slider.value * 1e9)
        return m, c.Hardware(self.bw_slider.value * 1e12, self.flops_slider.value * 1e12)

    def contexts(self) -> list[int]:
        return [2**k for k in range(10, self.context_slider.value + 1)]

    def figure(self):
        from longspec_lab.teach.paper_figures import cost_ratio_figure

        m, hw = self.model_and_hardware()
        return cost_ratio_figure(
            m, hw, self.rows_slider.value, self.contexts(), self.recorded, self.live, live_label=self.live_label
        )

    def update(self) -> None:
        m, hw = self.model_and_hardware()
        c, rows = self._cost, self.rows_slider.value
        L = self.contexts()[-1]
        ridge = c.ridge_rows(m, hw, L)
        self.summary.value = (
            f"at {L:,} tokens of context one pass reads <b>{c.pass_bytes(m, rows, L) / 1e9:.1f} GB</b> for "
            f"{rows} rows and {c.pass_bytes(m, 1, L) / 1e9:.1f} GB for 1 row; it turns compute bound above "
            f"<b>{ridge:,} rows</b>. Ratio at {L:,}: {c.ratio_curve(m, hw, rows, [L])['floor'][0]:.2f} (floor) to "
            f"{c.ratio_curve(m, hw, rows, [L])['no_overlap'][0]:.2f} (no overlap)."
        )
        refresh_figure(self.fig, self.figure())

    def snapshot_html(self) -> str:
        return self.summary.value + _fig_html(go.Figure(self.fig))


class LiveTimer(_Snapshot, W.VBox):
    """Pick a tree shape and a chain length, press 'time it': ar, chain and tree on the same prompt,
    each run `repeats` times (teach.cost.time_methods) -> medians with their spread."""

    def __init__(self, decoder, prompt_ids, max_new_tokens: int = 64, shape=(4, 16, 16, 16, 16), gamma: int = 4):
        self.decoder, self.prompt_ids, self.max_new_tokens = decoder, prompt_ids, max_new_tokens
        self.shape_text = W.Text(value=str(list(shape)), description="tree shape")
        self.gamma_slider = W.IntSlider(value=gamma, min=1, max=8, description="chain γ", continuous_update=False)
        self.repeats = W.IntSlider(value=3, min=1, max=10, description="repeats", continuous_update=False)
        self.button = W.Button(description="time it")
        self.message, self.table = W.HTML(), W.HTML()
        self.fig = go.FigureWidget()
        self.rows: list[dict] = []
        self.button.on_click(lambda _: self.run())
        super().__init__(
            [
                W.HBox([self.shape_text, self.gamma_slider, self.repeats, self.button]),
                self.message,
                self.table,
                self.fig,
            ]
        )

    def run(self) -> list[dict]:
        from longspec_lab.teach import cost, viz_results
        from longspec_lab.teach.exercises import parse_shape

        try:
            shape = TreeShape.of(parse_shape(self.shape_text.value))
        except ValueError as e:
            self.message.value = _ERR.format(html.escape(str(e)))
            return []
        self.message.value = "<i>timing…</i>"
        self.rows = cost.time_methods(
            self.decoder,
            self.prompt_ids,
            list(shape.widths),
            self.gamma_slider.value,
            self.repeats.value,
            self.max_new_tokens,
        )
        self.message.value = (
            f"{self.repeats.value} run(s) each after a warm-up, {self.max_new_tokens} new tokens, "
            f"prompt of {len(self.prompt_ids)} tokens"
        )
        self.table.value = viz_results.html_table(
            self.rows,
            ["method", "tau", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "runs"],
            formats={
                "tau": "{:.2f}",
                "tokens_per_s": "{:.0f}",
                "tokens_per_s_min": "{:.0f}",
                "tokens_per_s_max": "{:.0f}",
            },
            title="tokens/s: median, min and max over the runs",
        )
        new = go.Figure(
            go.Bar(
                x=[r["method"] for r in self.rows],
                y=[r["tokens_per_s"] for r in self.rows],
                marker_color=[palette.method_color(r["method"]) for r in self.rows],
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[r["tokens_per_s_max"] - r["tokens_per_s"] for r in self.rows],
                    arrayminus=[r["tokens_per_s"] - r["tokens_per_s_min"] for r in self.rows],
                ),
                text=[f"τ {r['tau']:.2f}" for r in self.rows],
                textposition="outside",
            )
        )
        new.update_layout(
            title="Live: tokens/s (median, bars: min..max)", yaxis_title="new tokens per second", height=380, width=700
        )
        refresh_figure(self.fig, new)
        return self.rows

    def snapshot_html(self) -> str:
        return self.message.value + self.table.value + (_fig_html(go.Figure(self.fig)) if self.rows else "")
