"""Exercises with checkers, one or more per notebook (d2l style): the learner writes a few lines,
a checker from here says right or not yet, and why; a folded solution follows in the notebook.

Each checker takes the learner's answer (a number, a shape, or a function), tests it against an
independent reference (brute force, a float64 softmax, an exact distribution with a chi-square
test, a real generation) and returns a `Check`, which shows itself as a coloured verdict in a
notebook. A malformed answer is "not yet" with the reason, never an exception.

`ShapeChallenge` wraps the notebook 2 checker in a text box and a button, so that the same check
runs from a browser.

Taught in: notebooks/02_tree_shapes.ipynb
"""

from __future__ import annotations

import ast
import html
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class Check:
    ok: bool
    message: str
    exercise: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def _repr_html_(self) -> str:
        color, mark, word = ("#1b7837", "✔", "right") if self.ok else ("#b00020", "✘", "not yet")
        return (
            f'<div class="exercise-check" data-ok="{str(self.ok).lower()}" style="border-left:4px solid {color};'
            f'padding:4px 10px;margin:4px 0"><b style="color:{color}">{mark} {word}</b>'
            f"{' · ' + html.escape(self.exercise) if self.exercise else ''}: {html.escape(self.message)}</div>"
        )

    def __repr__(self) -> str:
        return f"{'right' if self.ok else 'not yet'}: {self.message}"


def _call(fn, *args):
    """(value, None) or (None, Check explaining the failure)."""
    if not callable(fn):
        return None, f"expected a function, got {type(fn).__name__}; define it with def and pass its name"
    try:
        return fn(*args), None
    except Exception as e:  # the learner's code failed: say how, do not raise
        return None, f"your function raised {type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- 01: the cost model


def rows_at_ratio(context: int, ratio: float = 1.5, model=None, hw=None) -> int:
    """The most rows one pass can take at `context` while costing at most `ratio` 1-row passes
    (overlapped floor model), by brute force over rows."""
    from longspec_lab.teach import cost

    model, hw = model or cost.ModelCost.llama3_8b(), hw or cost.Hardware.h200()
    one = cost.pass_seconds(model, hw, 1, context)
    r = 1
    while cost.pass_seconds(model, hw, r + 1, context) <= ratio * one:
        r += 1
        if r > 1 << 16:
            break
    return r


def check_rows_budget(answer, context: int = 32768, ratio: float = 1.5) -> Check:
    """01: how many rows can one pass verify at `context` on the H200 (Llama-3-8B shape, floor
    model) before it costs `ratio` decode steps? Within 2% counts."""
    name = f"rows for {ratio}× a decode step at {context:,} tokens"
    if not isinstance(answer, (int, float)) or isinstance(answer, bool) or not math.isfinite(answer):
        return Check(False, f"answer with a number of rows, got {answer!r}", name)
    want = rows_at_ratio(context, ratio)
    if abs(answer - want) <= 0.02 * want:
        return Check(True, f"{answer:g} rows; the brute-force answer is {want}", name)
    hint = "too many: arithmetic has taken over" if answer > want else "too few: the pass is still bound by bytes"
    return Check(False, f"{answer:g} is {hint}; search rows with cost.pass_seconds", name)


# ----------------------------------------------------------------------------- 02: a better small shape


def parse_shape(text) -> list[int]:
    """'[2, 4, 8]' or '2 4 8' or a list -> [2, 4, 8]; ValueError naming the problem otherwise."""
    if isinstance(text, (list, tuple)):
        vals = list(text)
    else:
        s = str(text).strip()
        try:
            vals = ast.literal_eval(s) if s.startswith("[") or s.startswith("(") else [int(x) for x in s.split()]
        except (ValueError, SyntaxError):
            raise ValueError(f"cannot read {text!r} as a tree shape; write widths like [2, 4, 8]") from None
    if not isinstance(vals, (list, tuple)) or not vals or not all(isinstance(v, int) and v >= 1 for v in vals):
        raise ValueError(f"{text!r} is not a tree shape; write positive integer widths like [2, 4, 8]")
    return [int(v) for v in vals]


_TAU_MEMO: dict = {}


def check_small_shape(
    shape, decoder, prompt_ids, max_new_tokens: int, max_nodes: int = 40, default=(4, 16, 16, 16, 16)
) -> Check:
    """02: a shape of at most `max_nodes` nodes (root included) whose tau beats the default tree's on
    `prompt_ids` (greedy, same number of new tokens)."""
    name = f"a tree of at most {max_nodes} nodes that beats {list(default)}"
    try:
        widths = parse_shape(shape)
    except ValueError as e:
        return Check(False, str(e), name)
    n = 1 + sum(widths)
    if n > max_nodes:
        return Check(
            False, f"{widths} has {n} nodes (1 root + {' + '.join(map(str, widths))}); stay within {max_nodes}", name
        )
    runs = {}
    for key, s in (("default", list(default)), ("yours", widths)):
        memo = (id(decoder), tuple(prompt_ids), max_new_tokens, tuple(s))
        if memo not in _TAU_MEMO:  # greedy: the same shape on the same prompt always gives the same tau
            r = decoder.generate(
                prompt_ids, method="tree", tree_shape=s, max_new_tokens=max_new_tokens, stop_at_eos=False
            )
            _TAU_MEMO[memo] = r.tau
        runs[key] = _TAU_MEMO[memo]
    msg = f"{widths} ({n} nodes): τ {runs['yours']:.2f} against {runs['default']:.2f} for the default (69 nodes)"
    if runs["yours"] > runs["default"]:
        return Check(True, msg, name)
    return Check(False, msg + "; where does the default lose its accepted paths? try deeper and narrower", name)


class ShapeChallenge:
    """A text box, a button and a verdict for `check_small_shape` (drivable from a browser)."""

    def __init__(self, decoder, prompt_ids, max_new_tokens: int, max_nodes: int = 40):
        import ipywidgets as W

        self.decoder, self.prompt_ids, self.max_new_tokens, self.max_nodes = (
            decoder,
            prompt_ids,
            max_new_tokens,
            max_nodes,
        )
        self.text = W.Text(value="", placeholder="e.g. [2, 4, 8]", description="your shape")
        self.button = W.Button(description="check")
        self.verdict = W.HTML(value="")
        self.last: Check | None = None
        self.button.on_click(lambda _: self.check())
        self.widget = W.VBox([W.HBox([self.text, self.button]), self.verdict])

    def check(self) -> Check:
        self.verdict.value = "<i>running both trees…</i>"
        self.last = check_small_shape(
            self.text.value, self.decoder, self.prompt_ids, self.max_new_tokens, max_nodes=self.max_nodes
        )
        self.verdict.value = self.last._repr_html_()
        return self.last

    def _repr_mimebundle_(self, **kw):
        bundle = self.widget._repr_mimebundle_(**kw)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data["text/html"] = (
            f"<div class='widget-snapshot'>shape challenge: type a shape of at most {self.max_nodes} nodes and "
            f"press <b>check</b> (in JupyterLab). {self.verdict.value}</div>"
        )
        return bundle


# ----------------------------------------------------------------------------- 03: predict the accepted node


def check_accepted_node(step, node: int) -> Check:
    """03: which node is the deepest accepted one (the winner) of this traced step?"""
    res, tree = step.result, step.tree
    name = f"the accepted node of step {step.step + 1}"
    if not isinstance(node, int) or isinstance(node, bool) or not 0 <= node < tree.num_nodes:
        return Check(False, f"answer with a node id in 0..{tree.num_nodes - 1}, got {node!r}", name)
    path = res.path.tolist()
    if node == path[-1]:
        return Check(True, f"node #{node}: its path {path} is verified node by node", name)
    t = step.target_tokens.tolist()
    toks = tree.tokens.tolist()
    if node in path:
        why = f"node #{node} is accepted but not the deepest: the path goes on to #{path[-1]}"
    else:
        bad = next((i for i in tree.path(node)[1:] if toks[i] != t[int(tree.parents[i])]), node)
        why = (
            f"node #{node}'s path breaks at node #{bad}: it drafted token {toks[bad]} but the target "
            f"predicted {t[int(tree.parents[bad])]} after its parent"
        )
    return Check(False, why, name)


# ----------------------------------------------------------------------------- 04: merge three parts


def _partial_attention(q, k, v):
    """float64 attention of q [n, D] over k, v [m, D]: (o [n, D], lse [n])."""
    s = q @ k.T / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1) @ v, lse


def check_lse_merge(merge: Callable, seed: int = 0) -> Check:
    """04: merge([(o1, lse1), (o2, lse2), (o3, lse3)]) -> o must equal one softmax over all keys."""
    name = "merge three partial attentions by LSE"
    g = torch.Generator().manual_seed(seed)
    n, D, sizes = 5, 16, (40, 7, 3)
    q = torch.randn(n, D, generator=g, dtype=torch.float64)
    k = 3 * torch.randn(sum(sizes), D, generator=g, dtype=torch.float64)  # large scores: naive sums overflow
    v = torch.randn(sum(sizes), D, generator=g, dtype=torch.float64)
    ref, _ = _partial_attention(q, k, v)
    parts, lo = [], 0
    for m in sizes:
        parts.append(_partial_attention(q, k[lo : lo + m], v[lo : lo + m]))
        lo += m
    out, err = _call(merge, [(o.clone(), l.clone()) for o, l in parts])
    if err:
        return Check(False, err, name)
    out = out[0] if isinstance(out, tuple) else out
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return Check(False, f"return the merged output [{n}, {D}] (a tensor), got {got}", name)
    diff = (out.double() - ref).abs().max().item()
    if diff < 1e-9:
        return Check(True, f"max |difference| to one float64 softmax over all {sum(sizes)} keys: {diff:.1e}", name)
    return Check(
        False,
        f"max |difference| {diff:.2e} to the single softmax; weight each part by e^(lse_i − lse), lse = log Σ e^lse_i",
        name,
    )


# ----------------------------------------------------------------------------- 05: anchor-offset positions


def check_anchor_positions(fn: Callable, seed: int = 0) -> Check:
    """05: fn(seq_len, sinks, offset) -> the position ids of one training row: the first `sinks`
    positions unchanged, every later one shifted by `offset`."""
    name = "anchor-offset position ids of one row"
    rng = np.random.default_rng(seed)
    for _ in range(20):
        T, k, off = int(rng.integers(1, 64)), int(rng.integers(0, 5)), int(rng.integers(0, 5000))
        want = [i if i < k else i + off for i in range(T)]
        got, err = _call(fn, T, k, off)
        if err:
            return Check(False, err, name)
        try:
            got = [int(x) for x in (got.tolist() if isinstance(got, torch.Tensor) else got)]
        except TypeError:
            return Check(False, f"return a list or tensor of {T} positions, got {type(got).__name__}", name)
        if got != want:
            bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return Check(
                False,
                f"seq_len={T}, sinks={k}, offset={off}: at index {bad} expected "
                f"{want[bad] if bad < len(want) else 'nothing'}, got {got[bad] if bad < len(got) else 'nothing'}",
                name,
            )
    return Check(True, "20 random rows match: sinks keep 0..k−1, the rest start at k + offset", name)


# ----------------------------------------------------------------------------- 06: one level of RRS


def _children_without_replacement(q: np.ndarray, k: int, rng) -> list[int]:
    return [int(x) for x in rng.choice(q.size, size=k, replace=False, p=q)]


def rrs_reference(p, q, children, rng) -> int:
    """One level of recursive rejection sampling (the checker's own, for the tests)."""
    p, q = np.asarray(p, dtype=float).copy(), np.asarray(q, dtype=float).copy()
    for x in children:
        if rng.random() < min(1.0, p[x] / q[x]):
            return x
        p = np.maximum(p - q, 0)
        p /= p.sum()
        q[x] = 0
        q /= q.sum() if q.sum() > 0 else 1
    return int(rng.choice(p.size, p=p))


def check_rrs_level(fn: Callable, n: int = 20000, seed: int = 0) -> Check:
    """06: fn(p, q, children, rng) -> token, where `children` were drawn from q without replacement;
    the token must be distributed exactly as p (chi-square test over `n` runs, p-value > 0.001)."""
    from longspec_lab.teach.toy_lm import gof_pvalue

    name = "one level of recursive rejection sampling"
    rng = np.random.default_rng(seed)
    V = 6
    p = rng.dirichlet(np.ones(V))
    q = rng.dirichlet(np.ones(V))
    cells = []
    for _ in range(n):
        kids = _children_without_replacement(q, 3, rng)
        x, err = _call(fn, p.copy(), q.copy(), list(kids), rng)
        if err:
            return Check(False, err, name)
        if not isinstance(x, (int, np.integer)) or not 0 <= int(x) < V:
            return Check(False, f"return a token id in 0..{V - 1}, got {x!r}", name)
        cells.append(int(x))
    pv = gof_pvalue(torch.tensor(cells), p)
    freq = np.bincount(cells, minlength=V) / n
    tv = 0.5 * np.abs(freq - p).sum()
    msg = f"{n} samples against the exact p: chi-square p-value {pv:.3g}, total variation {tv:.3f}"
    if pv > 1e-3:
        return Check(True, msg, name)
    return Check(False, msg + "; after a rejection, p becomes norm(max(p − q, 0)) and x leaves q", name)


# ----------------------------------------------------------------------------- 07: the projection


def check_projected_speedups(fn: Callable, verify_8b: dict, tau: float = 4.0) -> Check:
    """07: fn(rows, tau) -> one projected speedup per row of verify_8b_h200.json:
    tau x decode / (draft + verify + commit), CUDA-graph Triton timings."""
    name = f"projected speedups at τ = {tau:g}"
    rows = verify_8b["rows"]
    want = [
        tau
        * r["triton_decode_graph_ms"]
        / (r["draft_step_graph_ms"] + r["triton_verify_graph_ms"] + r["commit_graph_ms"])
        for r in rows
    ]
    got, err = _call(fn, rows, tau)
    if err:
        return Check(False, err, name)
    try:
        got = [float(x) for x in got]
    except TypeError:
        return Check(False, f"return a list of {len(rows)} numbers, got {type(got).__name__}", name)
    if len(got) != len(want):
        return Check(False, f"return one speedup per context ({len(want)}), got {len(got)}", name)
    if all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(got, want)):
        return Check(True, ", ".join(f"{r['context']:,}: {w:.2f}×" for r, w in zip(rows, want)), name)
    return Check(
        False,
        f"expected {[round(w, 2) for w in want]}, got {[round(g, 2) for g in got]}; "
        "a step costs draft + verify + commit and yields τ tokens",
        name,
    )
