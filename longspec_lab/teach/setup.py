"""Helpers the notebooks share: detect CPU/CI and shrink the work, load the embedded pair, cut a
held-out prompt, draft one real tree for a shape, and narrate one verification step.

A notebook's first cell is `S = setup()`. On a CUDA machine outside CI it keeps the full sizes; in
CI (env `CI` set) or without CUDA it shrinks prompts and generations so that every notebook runs
top to bottom on a laptop CPU in well under 90 seconds. `LONGSPEC_SMALL=0/1` forces either mode.

`describe_step` and `kv_commit_figure` explain one step of tree verification (LongSpec,
arXiv 2502.17421, docs/LONGSPEC.md section 1): which node matched, why the path
stops, the bonus token, and how the accepted nodes' KV entries are moved.

Taught in: every notebook in notebooks/ (its first cell calls `setup()`).
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass

import plotly.graph_objects as go
import torch

from longspec_lab.decoding.timing import drafted_shape, parse_method
from longspec_lab.spec.trace import StepRecord
from longspec_lab.spec.tree import TreeShape
from longspec_lab.teach import palette, viz_results, viz_trees


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
    prompt_tokens: int  # prompt length the notebooks use
    max_new_tokens: int  # tokens per generation

    def __str__(self) -> str:
        mode = "small (CPU/CI)" if self.small else "full"
        return (
            f"{mode} mode because {self.reason}: device {self.device}, prompts of {self.prompt_tokens} tokens, "
            f"{self.max_new_tokens} new tokens per generation"
        )


def setup(
    seed: int = 0,
    prompt_tokens: tuple[int, int] = (384, 2048),
    max_new_tokens: tuple[int, int] = (32, 128),
    quiet: bool = False,
) -> Settings:
    """Seed, pick the device and the sizes: (small, full) pairs for prompt and generation lengths."""
    small, why = small_run()
    torch.manual_seed(seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = Settings(small, why, device, prompt_tokens[0 if small else 1], max_new_tokens[0 if small else 1])
    busy = ""
    if device == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:  # oversubscribed: threads fighting for cores make every timing slow and noisy
            torch.set_num_threads(1)
            busy = f"; the machine is busy (load {load:.1f} on {cores} cores), so torch uses 1 thread"
    if not quiet:
        print(str(s) + busy)
    return s


def load_embedded(settings: Settings | None = None, need_draft: bool = True):
    """(target, draft, tokenizer) of the embedded pair in data/, float32 on CPU, bf16 on CUDA."""
    from longspec_lab.models.pair import load_pair

    device = settings.device if settings is not None else None
    dtype = "float32" if device in (None, "cpu") else None
    return load_pair(device=device, dtype=dtype, need_draft=need_draft)


def held_out_prompt(tokenizer, n_tokens: int) -> tuple[list[int], str]:
    """The last `n_tokens` tokens of the shortest shipped held-out prompt that has that many."""
    from longspec_lab.paths import load_prompts

    prompts = load_prompts()
    fit = [p for p in prompts if p["n_tokens"] >= n_tokens] or prompts[-1:]
    p = fit[0]
    ids = tokenizer.encode(p["text"])[-n_tokens:]
    return ids, f"{p['name']} (last {len(ids)} tokens of held-out module {p['module']})"


def first_step_fn(decoder, prompt_ids):
    """shape -> the StepRecord of the first tree step on `prompt_ids` (a real drafted and verified
    tree), for `TreeShapeExplorer(tree_fn=...)`."""

    def fn(shape) -> StepRecord:
        res = decoder.generate(
            prompt_ids, method="tree", tree_shape=TreeShape.of(shape), max_new_tokens=2, trace=True, stop_at_eos=False
        )
        return res.trace[0]

    return fn


def first_step_with_losers(decoder, prompt_ids, shape, n_lost: int = 3):
    """(StepRecord of the first tree step on `prompt_ids`, the beam candidates that lost): per level
    the `n_lost` best (parent, token) pairs just below the level's width, as dicts with level,
    parent, token, score (cumulative draft log-prob) and rank (0-based, in the level's competition).

    Every level's competition (`spec.draft.beam_level`: parent scores + the draft's log-probs) is
    recorded while the decoder drafts, then replayed over width + n_lost places; its first `width`
    winners must be the tree's own level (checked)."""
    import longspec_lab.spec.draft as spec_draft

    orig = spec_draft.beam_level
    record = []

    def recording(parent_scores, logprobs, width):
        record.append((parent_scores.detach().float().cpu().clone(), logprobs.detach().float().cpu().clone()))
        return orig(parent_scores, logprobs, width)

    spec_draft.beam_level = recording
    try:
        res = decoder.generate(
            prompt_ids, method="tree", tree_shape=TreeShape.of(shape), max_new_tokens=2, trace=True, stop_at_eos=False
        )
    finally:
        spec_draft.beam_level = orig
    step = res.trace[0]
    tree, widths = step.tree, step.tree.shape.widths
    if len(record) < len(widths):
        raise RuntimeError("error: the decoder drafted without spec.draft.beam_level; update first_step_with_losers")
    off, losers = tree.shape.level_offsets, []
    for l, ((ps, lp), w) in enumerate(zip(record, widths), start=1):
        ranks, toks, scores = orig(ps, lp, min(w + n_lost, lp.numel()))
        if toks[:w].tolist() != tree.tokens[off[l] : off[l + 1]].tolist():
            raise RuntimeError(
                f"error: replaying level {l} did not give the drafted level; the draft is not deterministic"
            )
        for r in range(w, len(toks)):
            losers.append(
                dict(level=l, parent=off[l - 1] + int(ranks[r]), token=int(toks[r]), score=float(scores[r]), rank=r)
            )
    return step, losers


def pick_rejection_step(result) -> int:
    """Index of the traced step with the longest accepted path that stops on a rejection (its last
    accepted node has drafted children, none of them right) and was not cut by the length limit."""
    best = None
    for k, st in enumerate(result.trace):
        path = st.result.path.tolist()
        if st.tree.children(path[-1]) and len(st.emitted) == len(path):
            if best is None or len(path) > len(result.trace[best].result.path):
                best = k
    if best is None:
        raise ValueError("no step of this trace stops on a rejection; generate more tokens or use a deeper tree")
    return best


def save_live_result(name: str, data: dict) -> str | None:
    """When LONGSPEC_RESULTS_OUT names a folder (teach.run_notebooks sets it), write data there as
    <name>.json (never over an existing file) and return the path; otherwise do nothing."""
    import json
    from pathlib import Path

    folder = os.environ.get("LONGSPEC_RESULTS_OUT")
    if not folder:
        return None
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"error: {path} exists; pick an empty LONGSPEC_RESULTS_OUT folder")
    path.write_text(json.dumps(data, indent=1, default=str))
    return str(path)


def repeated_ngram_share(prompt_ids, new_tokens, n: int = 4) -> float:
    """Share of the generated n-grams that already occurred earlier (in the prompt or the output so
    far): a high share means repetitive text, which a draft guesses easily and which inflates tau."""
    seq = list(prompt_ids) + list(new_tokens)
    start = len(prompt_ids)
    seen = {tuple(seq[i : i + n]) for i in range(max(0, start - n + 1))}
    hits = total = 0
    for i in range(max(start - n + 1, 0), len(seq) - n + 1):
        g = tuple(seq[i : i + n])
        if i + n > start:
            total += 1
            hits += g in seen
        seen.add(g)
    return hits / total if total else 0.0


def prediction_rows(step: StepRecord, tokenizer=None) -> list[dict]:
    """One row per node of a traced step: node, parent, depth, drafted token and the target's
    prediction after the node's path (what a learner needs to find the accepted path by hand)."""
    tree, t = step.tree, step.target_tokens.tolist()
    lab = lambda i: viz_trees.token_label(i, tokenizer, 16)
    return [
        dict(
            node=i,
            parent=int(tree.parents[i]) if i else "–",
            depth=int(tree.depths[i]),
            drafted=lab(int(tree.tokens[i])) if i else f"(root) {lab(int(tree.tokens[0]))}",
            target_predicts_after_it=lab(t[i]),
        )
        for i in range(tree.num_nodes)
    ]


def walk_acceptance(step: StepRecord) -> dict:
    """A traced step's greedy acceptance worked out again node by node from its recorded predictions
    (`kernels/greedy_accept.py: greedy_accept_reference`, the walk the tests hold the one-launch GPU tail to),
    beside what the decoder kept: the path, the tokens emitted, and whether the two agree."""
    from longspec_lab.kernels.greedy_accept import greedy_accept_reference

    tree, preds = step.tree, step.target_tokens.cpu()
    widths = list(tree.shape.widths) or [1]
    logits = torch.nn.functional.one_hot(preds, int(preds.max()) + 1).float()  # [N, V'] argmax = the predictions
    walk = greedy_accept_reference(logits, tree.tokens, tree.parents, tree.depths, tree.mask, len(widths), max(widths))
    n = int(walk["n_acc"])
    path, emitted = walk["path"][:n].tolist(), walk["emitted"][:n].tolist()
    kept = step.result.path.tolist()
    return {"path": path, "emitted": emitted, "decoder_path": kept, "same_as_decoder": path == kept}


# ----------------------------------------------------------------------------- one step, explained


def describe_step(step: StepRecord, tokenizer=None) -> str:
    """HTML: the accepted path node by node, why it stops, the bonus token, the KV commit."""
    tree, t, res = step.tree, step.target_tokens.tolist(), step.result
    tok = lambda i: f"<code>{html.escape(viz_trees.token_label(i, tokenizer, 24))}</code>"
    toks, path = tree.tokens.tolist(), res.path.tolist()
    lines = [
        f"The root (node #0) is the last committed token {tok(toks[0])}; after it the target predicts {tok(t[0])}."
    ]
    for a, b in zip(path, path[1:]):
        lines.append(
            f"Node #{b} (level {int(tree.depths[b])}) drafted {tok(toks[b])} = the target's prediction "
            f"after node #{a}: <b>verified</b>; after it the target predicts {tok(t[b])}."
        )
    w = path[-1]
    kids = tree.children(w)
    if not kids:
        why = f"node #{w} is on the last level ({tree.shape.depth}): the tree has nothing deeper to check."
    else:
        kt = ", ".join(tok(toks[c]) for c in kids[:8]) + (" …" if len(kids) > 8 else "")
        why = (
            f"node #{w} has {len(kids)} drafted children ({kt}) and none of them is {tok(t[w])}, "
            "so no deeper node can be verified."
        )
    lines.append(f"<b>Why the path stops:</b> {why}")
    lines.append(
        f"<b>Bonus token:</b> the target's own prediction after node #{w}, {tok(t[w])}, is emitted too, "
        f"so this step verifies {len(path)} tokens in one target pass ({len(path) - 1} drafted + 1)"
        + (
            f" and emits {len(step.emitted)} of them (the length limit cut the rest)."
            if len(step.emitted) < len(path)
            else " and emits all of them."
        )
    )
    off = sum(bool(v) for v in res.verified.tolist()[1:]) - (len(path) - 1)
    if off:
        lines.append(
            f"{off} other node(s) also matched the target's prediction at their parent, but a parent "
            "of theirs was rejected, so they cannot be used (orange in the diagram)."
        )
    P = step.prefix_len
    lines.append(
        f"<b>KV commit:</b> verification wrote node i's keys and values at cache slot {P} + i. The accepted "
        f"nodes {path} move to slots {P}..{P + len(path) - 1}; the other {tree.num_nodes - len(path)} "
        "entries are simply left behind and overwritten by the next step's tree."
    )
    return "<ol>" + "".join(f"<li>{s}</li>" for s in lines) + "</ol>"


def kv_commit_figure(step: StepRecord, tokenizer=None) -> go.Figure:
    """The target cache slots P..P+N-1 before the commit (node i at P+i, coloured by status) and
    after it (the accepted path packed at P..P+k), with arrows for the moves."""
    tree, path, P = step.tree, step.result.path.tolist(), step.prefix_len
    status = viz_trees.node_statuses(tree, step)
    n = tree.num_nodes
    fig = go.Figure()
    for st in ("root", "accepted", "verified", "rejected"):
        xs = [i for i in range(n) if status[i] == st]
        if xs:
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=[1] * len(xs),
                    mode="markers",
                    name=palette.STATUS_TEXT[st],
                    marker=dict(symbol="square", size=11, color=palette.COLORS[st], line=dict(width=1, color="#555")),
                )
            )
    toks = [viz_trees.token_label(int(tree.tokens[i]), tokenizer, 12) for i in path]
    fig.add_trace(
        go.Scatter(
            x=list(range(len(path))),
            y=[0] * len(path),
            mode="markers",
            name="committed",
            hovertext=[f"node #{i}: {t}" for i, t in zip(path, toks)],
            hoverinfo="text",
            marker=dict(
                symbol="square",
                size=11,
                color=palette.COLORS["accepted"],
                line=dict(width=1.5, color=palette.PATH_EDGE),
            ),
        )
    )
    rest = list(range(len(path), n))
    fig.add_trace(
        go.Scatter(
            x=rest,
            y=[0] * len(rest),
            mode="markers",
            name="free (overwritten next step)",
            marker=dict(symbol="square-open", size=11, color="#bbbbbb"),
        )
    )
    for k, i in enumerate(path):
        fig.add_annotation(
            x=k,
            y=0.08,
            ax=i,
            ay=0.92,
            xref="x",
            yref="y",
            axref="x",
            ayref="y",
            showarrow=True,
            arrowhead=2,
            arrowcolor=palette.PATH_EDGE,
            text="",
        )
    fig.add_annotation(
        x=0,
        y=-0.45,
        xanchor="left",
        showarrow=False,
        font=dict(size=11),
        text="committed tokens: " + " ".join(html.escape(t) for t in toks),
    )
    fig.update_layout(
        title=f"KV commit at step {step.step + 1}: accepted nodes {path} move to slots P..P+{len(path) - 1} (P = {P})",
        height=380,
        width=900,
        legend=dict(title="cache slot holds", orientation="h", y=-0.35, x=0),
        xaxis_title="cache slot − P (before: node id; after: position after the prefix)",
        margin=dict(b=120),
    )
    fig.update_yaxes(tickvals=[0, 1], ticktext=["after commit", "after verify"], range=[-0.7, 1.4], title="")
    fig.update_xaxes(range=[-1, n], zeroline=False)
    return fig


# ----------------------------------------------------------------------------- recorded results

from longspec_lab.paths import RESULTS_DIR  # noqa: E402

PROVENANCE_KEYS = (
    "gpu",
    "device",
    "device_name",
    "torch",
    "triton",
    "cuda",
    "transformers",
    "python",
    "date",
    "git_commit",
    "command",
)


def load_result(name: str, folder=None) -> dict:
    """data/results/<name>.json (name with or without '.json') as a dict."""
    import json
    from pathlib import Path

    folder = Path(folder) if folder is not None else RESULTS_DIR
    path = folder / (name if name.endswith(".json") else name + ".json")
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        raise ValueError(f"no recorded result {path}; pick one of {have} or run the benchmark that writes it")
    return json.loads(path.read_text())


def provenance(result: dict) -> dict:
    """Where a recorded result comes from: the environment block's GPU, versions, date and command
    (top-level 'command' / 'device' when the environment block lacks them)."""
    env = dict(result.get("environment") or {})
    for k in ("command", "device", "dtype"):
        if k not in env and k in result:
            env[k] = result[k]
    if not env:
        raise ValueError("this result has no 'environment' block; it cannot show where it was measured")
    keys = [k for k in PROVENANCE_KEYS if env.get(k) is not None]
    return {k: env[k] for k in keys + [k for k in ("dtype",) if k in env and k not in keys]}


def provenance_html(result: dict, title: str = "Provenance") -> str:
    rows = [{"field": k, "value": v} for k, v in provenance(result).items()]
    return viz_results.html_table(rows, ["field", "value"], title=title)


def shape_points(results: dict, source: str = "") -> list[dict]:
    """One point per ar / chain / tree entry of a bench.run_bench 'results' dict: label, shape,
    num_nodes (root included), tau, tokens_per_s, step_ms (decode seconds per target pass)."""
    pts = []
    for name, r in results.items():
        parsed = parse_method(name)
        shape = parsed[0] if parsed else None
        if shape is None or "tau" not in r:
            continue
        steps = r["tokens"] / r["tau"] if r.get("tau") else None
        pts.append(
            dict(
                label=name,
                shape=shape,
                num_nodes=1 + sum(shape),
                tau=r["tau"],
                tokens_per_s=r["tokens_per_s"],
                step_ms=1e3 * r["seconds"] / steps if steps else None,
                source=source,
                backend=name.rsplit("-", 1)[1]
                if not name.split("-")[-1].isdigit() and name.startswith("tree-")
                else "default",
            )
        )
    return pts


def tune_points(tune: dict) -> tuple[list[dict], list[dict]]:
    """From tune.py's JSON: (validated shapes: label, num_nodes, tau, tokens_per_s, step_ms),
    (calibration shapes: label, num_nodes, step_ms)."""
    import json

    val = [
        dict(
            label=str(json.loads(k)),
            shape=json.loads(k),
            num_nodes=1 + sum(json.loads(k)),
            tau=v["tau"],
            tokens_per_s=v["tokens_per_s"],
            step_ms=1e3 * v["step_seconds"],
            source="tuner, validated",
        )
        for k, v in tune.get("validated", {}).items()
    ]
    cal = [
        dict(
            label=str(json.loads(k)),
            shape=json.loads(k),
            num_nodes=1 + sum(json.loads(k)),
            step_ms=1e3 * s,
            source="tuner, calibration",
        )
        for k, s in tune.get("calibration_step_seconds", {}).items()
    ]
    return sorted(val, key=lambda p: p["num_nodes"]), sorted(cal, key=lambda p: p["num_nodes"])


def tuner_check_rows(record: dict, tuned: dict) -> list[dict]:
    """The tuner's predictions for a recording's own shapes beside what the recording measured: one row per chain
    and tree of `record` (a bench report) with its measured tokens/s and tau, then for each `tuned` report ({label:
    a `tune --latency-from` report}) its `recorded_predicted` tokens/s and acceptance (None where that report did
    not predict the shape), ordered by measured tokens/s."""
    import json

    rows = []
    for name, r in record["results"].items():
        shape = drafted_shape(name)
        if shape is None:  # ar, the peers, other attention backends
            continue
        row = {"shape": name, "measured tok/s": r["tokens_per_s"], "measured τ": r["tau"]}
        for label, rep in tuned.items():
            pred = rep.get("recorded_predicted", {}).get(json.dumps(shape), {})
            row[f"{label} tok/s"] = pred.get("predicted_tokens_per_s")
            row[f"{label} τ"] = pred.get("expected_accept")
        rows.append(row)
    if not rows:
        raise ValueError("the recording has no chain or tree rows to check the tuner against")
    return sorted(rows, key=lambda r: -r["measured tok/s"])


def stage_results(results: dict) -> dict:
    """bench.run_bench 'results' entries that carry a stage breakdown, as the dicts
    viz_results.stage_times_figure takes (draft / verify / commit; 'overhead' becomes the 'other' bar)."""
    out = {}
    for name, r in results.items():
        st = r.get("stage_seconds")
        if not st:
            continue
        out[name] = dict(
            tau=r.get("tau", 1.0),
            tokens_per_s=r["tokens_per_s"],
            stage_seconds=dict(st),
            new_tokens=r["tokens"] + 1,
            wall_seconds=sum(st.values()),
        )
    if not out:
        raise ValueError("no entry has stage_seconds; run bench with stage timing (the default on CUDA)")
    return out


def cache_growth(target, draft, ids, contexts, max_tree_nodes: int = 69) -> list[dict]:
    """Prefill `ids` chunk by chunk up to each length in `contexts` (target pass, then the draft
    ingests the same tokens) and measure, after each: the bytes of the target's KV entries that hold
    the context (all layers, K and V) and the draft cache's `nbytes` (ring of W slots + tree scratch)."""
    contexts = sorted(int(c) for c in contexts)
    if not contexts or contexts[0] < 1 or contexts[-1] > len(ids):
        raise ValueError(
            f"contexts {contexts} must lie in 1..{len(ids)} (the prompt's length); pass a longer "
            "prompt or smaller contexts"
        )
    dev = target.device
    x = torch.as_tensor(ids, device=dev)[None]
    tcache = target.new_cache(contexts[-1])
    if hasattr(draft, "new_ring"):  # the ring-buffer draft cache (models.glide.DraftRing)
        dcache = draft.new_ring(max_pending=1, max_tree_nodes=max_tree_nodes)
        feed = lambda chunk: draft.prefill(chunk[0], dcache)
    else:
        dcache = draft.new_cache(batch=1, max_tree_nodes=max_tree_nodes)
        feed = lambda chunk: draft.ingest(chunk, dcache, tcache)
    rows, done = [], 0
    with torch.inference_mode():
        for n in contexts:
            if n > done:
                target(x[:, done:n], cache=tcache, start=done, last_only=True)
                tcache.length = n
                feed(x[:, done:n])
                done = n
            used = tcache.k[..., :n, :].nbytes + tcache.v[..., :n, :].nbytes
            rows.append(
                dict(context=n, target_kv_bytes=used, draft_cache_bytes=dcache.nbytes, draft_window=draft.config.window)
            )
    return rows
