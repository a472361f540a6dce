"""Helpers the notebooks share: detect CPU/CI and shrink the work, load the embedded pair, cut a
held-out prompt, draft one real tree for a shape, and narrate one verification step.

A notebook's first cell is `S = setup()`. On a CUDA machine outside CI it keeps the full sizes; in
CI (env `CI` set) or without CUDA it shrinks prompts and generations so that every notebook runs
top to bottom on a laptop CPU in well under 90 seconds. `LONGSPEC_SMALL=0/1` forces either mode.

`describe_step` and `kv_commit_figure` explain one step of tree verification (LongSpec,
arXiv 2502.17421, shared/LONGSPEC.md section 1 steps 5-6): which node matched, why the path
stops, the bonus token, and how the accepted nodes' KV entries are moved.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass

import plotly.graph_objects as go
import torch

from . import viz
from .trace import StepRecord
from .tree import TreeShape


def _flag(name: str) -> bool | None:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    return v.strip().lower() not in ("0", "false", "no", "off")


def small_run() -> tuple[bool, str]:
    """(shrink the work?, why)."""
    forced = _flag("LONGSPEC_SMALL")
    if forced is not None:
        return forced, f"LONGSPEC_SMALL={os.environ['LONGSPEC_SMALL']}"
    if _flag("CI"):
        return True, "running in CI"
    if not torch.cuda.is_available():
        return True, "no CUDA GPU"
    return False, "CUDA GPU present"


@dataclass
class Settings:
    small: bool
    reason: str
    device: str
    prompt_tokens: int     # prompt length the notebooks use
    max_new_tokens: int    # tokens per generation

    def __str__(self) -> str:
        mode = "small (CPU/CI)" if self.small else "full"
        return (f"{mode} mode because {self.reason}: device {self.device}, prompts of {self.prompt_tokens} tokens, "
                f"{self.max_new_tokens} new tokens per generation")


def setup(seed: int = 0, prompt_tokens: tuple[int, int] = (384, 2048),
          max_new_tokens: tuple[int, int] = (32, 128), quiet: bool = False) -> Settings:
    """Seed, pick the device and the sizes: (small, full) pairs for prompt and generation lengths."""
    small, why = small_run()
    torch.manual_seed(seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = Settings(small, why, device, prompt_tokens[0 if small else 1], max_new_tokens[0 if small else 1])
    if not quiet:
        print(s)
    return s


def load_embedded(settings: Settings | None = None, need_draft: bool = True):
    """(target, draft, tokenizer) of the embedded pair in data/, float32 on CPU, bf16 on CUDA."""
    from .load import load_pair

    device = settings.device if settings is not None else None
    dtype = "float32" if device in (None, "cpu") else None
    return load_pair(device=device, dtype=dtype, need_draft=need_draft)


def held_out_prompt(tokenizer, n_tokens: int) -> tuple[list[int], str]:
    """The last `n_tokens` tokens of the shortest shipped held-out prompt that has that many."""
    from .corpus import load_prompts

    prompts = load_prompts()
    fit = [p for p in prompts if p["n_tokens"] >= n_tokens] or prompts[-1:]
    p = fit[0]
    ids = tokenizer.encode(p["text"])[-n_tokens:]
    return ids, f"{p['name']} (last {len(ids)} tokens of held-out module {p['module']})"


def first_step_fn(decoder, prompt_ids):
    """shape -> the StepRecord of the first tree step on `prompt_ids` (a real drafted and verified
    tree), for `TreeShapeExplorer(tree_fn=...)`."""
    def fn(shape) -> StepRecord:
        res = decoder.generate(prompt_ids, method="tree", tree_shape=TreeShape.of(shape), max_new_tokens=2,
                               trace=True, stop_at_eos=False)
        return res.trace[0]
    return fn


# ----------------------------------------------------------------------------- one step, explained

def describe_step(step: StepRecord, tokenizer=None) -> str:
    """HTML: the accepted path node by node, why it stops, the bonus token, the KV commit."""
    tree, t, res = step.tree, step.target_tokens.tolist(), step.result
    tok = lambda i: f"<code>{html.escape(viz.token_label(i, tokenizer, 24))}</code>"
    toks, path = tree.tokens.tolist(), res.path.tolist()
    lines = [f"The root (node #0) is the last committed token {tok(toks[0])}; after it the target predicts "
             f"{tok(t[0])}."]
    for a, b in zip(path, path[1:]):
        lines.append(f"Node #{b} (level {int(tree.depths[b])}) drafted {tok(toks[b])} = the target's prediction "
                     f"after node #{a}: <b>verified</b>; after it the target predicts {tok(t[b])}.")
    w = path[-1]
    kids = tree.children(w)
    if not kids:
        why = f"node #{w} is on the last level ({tree.shape.depth}): the tree has nothing deeper to check."
    else:
        kt = ", ".join(tok(toks[c]) for c in kids[:8]) + (" …" if len(kids) > 8 else "")
        why = (f"node #{w} has {len(kids)} drafted children ({kt}) and none of them is {tok(t[w])}, "
               "so no deeper node can be verified.")
    lines.append(f"<b>Why the path stops:</b> {why}")
    lines.append(f"<b>Bonus token:</b> the target's own prediction after node #{w}, {tok(t[w])}, is emitted too, "
                 f"so this step emits {len(path)} tokens from one target pass ({len(path) - 1} drafted + 1).")
    off = sum(bool(v) for v in res.verified.tolist()[1:]) - (len(path) - 1)
    if off:
        lines.append(f"{off} other node(s) also matched the target's prediction at their parent, but a parent "
                     "of theirs was rejected, so they cannot be used (orange in the diagram).")
    P = step.prefix_len
    lines.append(f"<b>KV commit:</b> verification wrote node i's keys and values at cache slot {P} + i. The accepted "
                 f"nodes {path} move to slots {P}..{P + len(path) - 1}; the other {tree.num_nodes - len(path)} "
                 "entries are simply left behind and overwritten by the next step's tree.")
    return "<ol>" + "".join(f"<li>{s}</li>" for s in lines) + "</ol>"


def kv_commit_figure(step: StepRecord, tokenizer=None) -> go.Figure:
    """The target cache slots P..P+N-1 before the commit (node i at P+i, coloured by status) and
    after it (the accepted path packed at P..P+k), with arrows for the moves."""
    tree, path, P = step.tree, step.result.path.tolist(), step.prefix_len
    status = viz.node_statuses(tree, step)
    n = tree.num_nodes
    fig = go.Figure()
    for st in ("root", "accepted", "verified", "rejected"):
        xs = [i for i in range(n) if status[i] == st]
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=[1] * len(xs), mode="markers", name=viz.STATUS_TEXT[st],
                                     marker=dict(symbol="square", size=11, color=viz.COLORS[st],
                                                 line=dict(width=1, color="#555"))))
    toks = [viz.token_label(int(tree.tokens[i]), tokenizer, 12) for i in path]
    fig.add_trace(go.Scatter(x=list(range(len(path))), y=[0] * len(path), mode="markers", name="committed",
                             hovertext=[f"node #{i}: {t}" for i, t in zip(path, toks)], hoverinfo="text",
                             marker=dict(symbol="square", size=11, color=viz.COLORS["accepted"],
                                         line=dict(width=1.5, color=viz.PATH_EDGE))))
    rest = list(range(len(path), n))
    fig.add_trace(go.Scatter(x=rest, y=[0] * len(rest), mode="markers", name="free (overwritten next step)",
                             marker=dict(symbol="square-open", size=11, color="#bbbbbb")))
    for k, i in enumerate(path):
        fig.add_annotation(x=k, y=0.08, ax=i, ay=0.92, xref="x", yref="y", axref="x", ayref="y",
                           showarrow=True, arrowhead=2, arrowcolor=viz.PATH_EDGE, text="")
    fig.add_annotation(x=0, y=-0.45, xanchor="left", showarrow=False, font=dict(size=11),
                       text="committed tokens: " + " ".join(html.escape(t) for t in toks))
    fig.update_layout(title=f"KV commit at step {step.step}: accepted nodes {path} move to slots P..P+{len(path) - 1}"
                            f" (P = {P})", height=380, width=900,
                      legend=dict(title="cache slot holds", orientation="h", y=-0.35, x=0),
                      xaxis_title="cache slot − P (before: node id; after: position after the prefix)",
                      margin=dict(b=120))
    fig.update_yaxes(tickvals=[0, 1], ticktext=["after commit", "after verify"], range=[-0.7, 1.4],
                     title="")
    fig.update_xaxes(range=[-1, n], zeroline=False)
    return fig
