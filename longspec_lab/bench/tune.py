"""Tree-shape tuner: which [w1, ..., wD] gives the most tokens per second on this device?

Method (a model-guided exhaustive search, then measurement):
1. Acceptance. Decode a few held-out prompts with a wide *probe* tree and, at every step, follow
   the target's greedy path through the tree, recording the sibling rank (position inside its beam
   level) of the path's node at each depth. A narrower shape W keeps the path to depth l iff every
   rank r_j <= w_j for j <= l, so its expected accepted length is 1 + mean_steps sum_l
   prod_{j<=l} [r_j < w_j]. (Conservative: in a narrower tree the path's node has fewer rivals.)
2. Latency. Time whole decoding steps for a set of calibration shapes with the decoder in use
   (CUDA-graph fast path on the GPU, the eager loop on the CPU) and fit
       t_step = a + b * depth + c * nodes + d * (nodes drafted from, i.e. w_1 + ... + w_{D-1})
                + e * (beam levels) + f * [nodes > one verify row tile's, 32 for the embedded model]
   by non-negative least squares: the verify pass grows with the node count and steps up where its rows
   outgrow one row tile of the tree kernel, each draft level costs a launch sequence plus its width.
3. Search. Score every shape on a width grid (depth <= max_depth, nodes <= max_nodes) by
   expected accepted length / predicted step time, exhaustively.
4. Validate. Run the top candidates and the default [4, 16, 16, 16, 16] for real and rank them by
   measured tokens per second.

Step 1 is biased: the probe's steps start where the probe's own steps start, right after its rejections,
and a narrower tree's steps start elsewhere; and a sibling rank in the wide beam undercounts a narrow tree,
whose nodes have fewer rivals. With `every_position` (`longspec-lab tune --every-position`) the shortlist of
step 3 is rescored exactly: a probe tree at EVERY root position of each prompt's greedy continuation, each
shape's tree built inside it as the beam builds it (`step_accepts_nested`), and the decoder's walk replayed
over those positions (`renewal_tau`). On the CPU in float32 that reproduces the measured tau of every shape
tried to three decimals (tests/integration/test_tune_exact.py), where the rank model was off by up to 0.45;
it costs one prefill and one probe step per position instead of per probe step. Then hill climbing under the
exact model (`local_search`: one level's width a grid step up or down, a level added or dropped) from the best
few, since the shortlist comes from the biased model and can miss the best shape.

Taught in: notebooks/02_tree_shapes.ipynb (and the tuner results in notebooks/07_timing_real_gpu_runs.ipynb).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from longspec_lab.decoding.timing import drafted_shape
from longspec_lab.spec.tree import DEFAULT_TREE_SHAPE, TreeShape

CALIBRATION_SHAPES = (
    [1],
    [4],
    [16],
    [64],
    [1, 1, 1, 1],
    [4, 4, 4, 4],
    [2, 4, 8, 16, 32],
    [4, 16, 16, 16, 16],
    [8, 8, 8, 8, 8, 8],
    [16, 32, 32],
)
WIDTH_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def path_ranks(trace, depth: int) -> torch.Tensor:
    """[steps, depth] sibling ranks of the target's greedy path through each traced tree (inf where
    the path has left the tree)."""
    out = torch.full((len(trace), depth), float("inf"))
    for s, rec in enumerate(trace):
        tree, preds = rec.tree, rec.target_tokens.tolist()
        off = tree.shape.level_offsets
        toks, pars = tree.tokens.tolist(), tree.parents.tolist()
        node = 0
        for l in range(1, tree.shape.depth + 1):
            nxt = [c for c in range(off[l], off[l + 1]) if pars[c] == node and toks[c] == preds[node]]
            if not nxt:
                break
            node = nxt[0]
            out[s, l - 1] = node - off[l]
    return out


def expected_accept(ranks: torch.Tensor, shapes: list) -> torch.Tensor:
    """Mean accepted length (bonus token included) of each shape under the recorded ranks."""
    D = ranks.shape[1]
    W = torch.full((len(shapes), D), -1.0)
    for i, s in enumerate(shapes):
        W[i, : len(s)] = torch.tensor(s, dtype=torch.float)
    out = []
    for chunk in W.split(4096):
        kept = (ranks[None] < chunk[:, None]).cumprod(-1)  # [S, steps, D]
        out.append(1 + kept.sum(-1).double().mean(-1))
    return torch.cat(out)


def probe_parents(trace, depth: int) -> list[torch.Tensor]:
    """For each level l = 1..depth of the traced probe trees: [steps, N_l] the index of each node's parent inside
    level l - 1 (the root is index 0 of level 0). A level's nodes are in the beam's order, best score first."""
    out = []
    for l in range(1, depth + 1):
        rows = []
        for rec in trace:
            off = rec.tree.shape.level_offsets
            rows.append(rec.tree.parents[off[l] : off[l + 1]].long() - off[l - 1])
        out.append(torch.stack(rows))
    return out


def step_accepts_nested(parents: list, ranks: torch.Tensor, shapes: list, chunk: int = 512) -> torch.Tensor:
    """[shapes, steps] accepted length (bonus token included) of each shape at each traced probe step, building
    the narrower tree inside the probe tree as the beam builds it: level l keeps the first w_l nodes, in the
    probe's score order, whose parent the narrower tree kept at level l - 1. Exact whenever those nodes lie inside
    the probe's beam (the probe is much wider; a parent whose best child the probe dropped has no child in it).
    parents: `probe_parents`; ranks: `path_ranks` (inf where the path left the probe)."""
    D = len(parents)
    path = torch.where(torch.isinf(ranks), -1.0, ranks).long()  # [steps, D] the path node's index in its level
    W = torch.zeros(len(shapes), D, dtype=torch.long)
    for i, s in enumerate(shapes):
        W[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    out = []
    for Wc in W.split(chunk):
        S, steps = Wc.shape[0], path.shape[0]
        kept = torch.ones(S, steps, 1, dtype=torch.bool)  # level 0: the root
        on_path = torch.ones(S, steps, dtype=torch.bool)
        accepted = torch.ones(S, steps, dtype=torch.long)  # the bonus token
        for l in range(D):
            alive = kept.gather(2, parents[l][None].expand(S, -1, -1))  # [S, steps, N_l]: the parent was kept
            kept = alive & (alive.cumsum(-1) <= Wc[:, l, None, None])  # the first w_l of them, in score order
            idx = path[:, l]
            hit = kept.gather(2, idx.clamp(min=0)[None, :, None].expand(S, -1, 1))[..., 0] & (idx >= 0)[None]
            on_path &= hit
            accepted += on_path
        out.append(accepted)
    return torch.cat(out)


def renewal_tau(accepts: list, n_tokens: int) -> torch.Tensor:
    """[shapes] tokens per target pass of each shape when decoding n_tokens, from its accepted length at EVERY
    root position of each prompt's greedy continuation (accepts: per prompt [shapes, roots]): the decoder's own
    walk, a step at root r accepting a(r) tokens and the next step starting at r + a(r), the last step cut at
    n_tokens as the decoder cuts it. Steps then start where each shape's own steps start, not where a probe's did."""
    S = accepts[0].shape[0]
    tokens = torch.zeros(S, dtype=torch.long)
    steps = torch.zeros(S, dtype=torch.long)
    for acc in accepts:
        acc = acc.long()
        out_len = torch.ones(S, dtype=torch.long)  # the prefill's token, the first root
        for _ in range(n_tokens):
            active = out_len < n_tokens
            if not bool(active.any()):
                break
            a = acc.gather(1, (out_len - 1).clamp(max=acc.shape[1] - 1)[:, None])[:, 0]  # root r = out_len - 1
            add = torch.where(active, torch.minimum(a, n_tokens - out_len), 0)
            tokens += add
            steps += active.long()
            out_len += add
    return tokens.double() / steps.clamp_min(1).double()


# The verification pass packs G query rows a node (G query heads share a KV head), and the tree kernel takes up to
# SMALL_TILE_ROWS (64) packed rows in one row tile of 64. Past that the plan changes (kernels/tree_attention.py:
# `_pick_block_m`, `tree_split_applies`), and the H100 records of 2026-12-06 show a step of about 20 us in the verify
# from 33 nodes on for the embedded model (G = 2; docs/RESULTS.md), about 6 us since the rule of two row tiles of 64
# (LONGSPEC_ROW_TILE_RULE=small). The latency model's last feature marks the shapes past it (its coefficient is
# fitted, so it follows the records it is fitted on); DEFAULT_TILE_NODES is the embedded model's bound.
DEFAULT_TILE_NODES = 32
# what each latency coefficient prices (`features_matrix`'s columns), in seconds
LATENCY_FEATURES = ("step", "level", "verified node", "node drafted from", "beam level", "past one verify tile")


def verify_tile_nodes(group_size: int) -> int:
    """The most nodes (root included) whose verification fits one small row tile of the tree kernel
    (SMALL_TILE_ROWS packed rows), for a target with `group_size` query heads a KV head: 32 for the embedded model."""
    from longspec_lab.kernels.tree_attention import SMALL_TILE_ROWS

    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (query heads per KV head), got {group_size!r}")
    return max(1, SMALL_TILE_ROWS // group_size)


def features(shape, tile_nodes: int = DEFAULT_TILE_NODES) -> list[float]:
    """The latency model's features of one shape (`features_matrix`, for a batch of one)."""
    return features_matrix(torch.tensor([list(TreeShape.of(shape).widths)]), tile_nodes)[0].tolist()


def fit_latency(step_times: dict, tile_nodes: int = DEFAULT_TILE_NODES) -> torch.Tensor:
    """Least-squares step-time coefficients, constrained to be >= 0 (no feature makes a step cheaper):
    the exact non-negative solution, by solving every subset of free coefficients and keeping the best
    feasible one (6 features: 64 small solves). Unconstrained least squares on a few collinear shapes
    can give a negative cost per node and predict near-zero step times for big trees."""
    X = torch.tensor([features(json.loads(k), tile_nodes) for k in step_times], dtype=torch.float64)
    y = torch.tensor(list(step_times.values()), dtype=torch.float64)
    n = X.shape[1]
    best, best_err = torch.zeros(n, dtype=torch.float64), float((y**2).sum())
    for subset in itertools.chain.from_iterable(itertools.combinations(range(n), r) for r in range(1, n + 1)):
        cols = list(subset)
        sol = torch.linalg.lstsq(X[:, cols], y[:, None]).solution[:, 0]
        if bool((sol < 0).any()):
            continue
        coef = torch.zeros(n, dtype=torch.float64)
        coef[cols] = sol
        err = float(((X @ coef - y) ** 2).sum())
        if err < best_err - 1e-30:
            best, best_err = coef, err
    return best


def latency_loo(step_times: dict, tile_nodes: int = DEFAULT_TILE_NODES) -> dict:
    """Leave-one-out check of the latency model: {shape json: predicted / measured - 1} for each shape's step time,
    predicted by `fit_latency` fitted to all the other shapes. How well the model prices a shape it was not fitted
    to, which is what the search asks of it. Empty for fewer than 3 shapes."""
    if len(step_times) < 3:
        return {}
    out = {}
    for k, measured in step_times.items():
        coef = fit_latency({j: t for j, t in step_times.items() if j != k}, tile_nodes)
        predicted = float(torch.tensor(features(json.loads(k), tile_nodes), dtype=torch.float64) @ coef)
        out[k] = predicted / measured - 1.0
    return out


def recorded_rows(report: dict) -> dict:
    """{shape json: row} of a recorded end-to-end report's chain-gN and tree-w1-w2-... rows (`longspec-lab bench`,
    bench.h200_speed); ar, the transformers peers and other backends are left out."""
    out = {}
    for name, row in report.get("results", {}).items():
        shape = drafted_shape(name)
        if shape is not None:
            out[json.dumps(shape)] = row
    return out


def recorded_step_times(report: dict) -> dict:
    """{shape json: seconds per decoding step} from a recorded end-to-end report (`recorded_rows`): each row gives
    seconds / (tokens / tau) target passes. Lets the tuner fit its latency model to a GPU run on a machine without
    the GPU."""
    out = {k: row["seconds"] / (row["tokens"] / row["tau"]) for k, row in recorded_rows(report).items()}
    if len(out) < 4:
        raise ValueError(
            f"the report has {len(out)} chain/tree rows with timings; the latency model fits 6 coefficients and "
            "needs at least 4 rows, more to pin them down (run `longspec-lab bench` with more --tree-shapes / --gammas)"
        )
    return out


# The most shapes the exhaustive search scores: depth <= 7 under the default node cap and probe is 8.9M (`search_space`:
# 8.5 s and 1.9 GB on two CPU cores for 150 probe steps); depth 8 would be 88.6M, about 20 GB, so `check_search_size`
# refuses it.
MAX_SEARCH_SHAPES = 10_000_000


def count_shapes(max_depth: int, max_nodes: int, probe, grid=WIDTH_GRID) -> int:
    """How many shapes `candidate_shapes` lists, counted without listing them (a table over levels and nodes)."""
    ways = {max_nodes - 1: 1}  # nodes left after the root -> number of width prefixes reaching it
    total = 0
    for level in range(min(max_depth, len(probe))):
        nxt = {}
        for left, n in ways.items():
            for w in grid:
                if w <= left and w <= probe[level]:
                    nxt[left - w] = nxt.get(left - w, 0) + n
        ways = nxt
        total += sum(ways.values())
    return total


def check_search_size(max_depth: int, max_nodes: int, probe) -> int:
    """The number of shapes the search would score; a ValueError naming it and the fix above MAX_SEARCH_SHAPES."""
    n = count_shapes(max_depth, max_nodes, probe)
    if n > MAX_SEARCH_SHAPES:
        fits = max(d for d in range(1, max_depth + 1) if count_shapes(d, max_nodes, probe) <= MAX_SEARCH_SHAPES)
        raise ValueError(
            f"the search would score {n:,} shapes (depth <= {max_depth}, <= {max_nodes} nodes, widths up to the "
            f"probe's), more than the {MAX_SEARCH_SHAPES:,} it scores in memory; use --max-depth {fits}, a "
            "smaller --max-nodes or a narrower --probe-shape"
        )
    return n


def candidate_shapes(max_depth: int, max_nodes: int, probe) -> list:
    """Every shape on the width grid with depth <= max_depth, at most max_nodes nodes (root included) and no level
    wider than the probe's: shallow first, then in grid order, as itertools.product lists them."""
    shapes, level = [], [((), max_nodes - 1)]  # (widths so far, nodes left)
    for depth in range(min(max_depth, len(probe))):
        level = [(ws + (w,), left - w) for ws, left in level for w in WIDTH_GRID if w <= left and w <= probe[depth]]
        shapes += [list(ws) for ws, _ in level]
    return shapes


def search_space(max_depth: int, max_nodes: int, probe, ranks: torch.Tensor, grid=WIDTH_GRID, bar=None):
    """Every shape of `candidate_shapes`, in its order, as rows of a tensor, with its `expected_accept`: (W [S,
    depth] int64 widths, zero after the shape's last level; acc [S] float64). The same numbers as those two
    functions (tests/unit/bench/test_tune_models.py), in seconds where they take minutes for depth 7 (8.9M shapes
    as Python lists): the candidates form a tree of prefixes (each shape's prefixes are candidates too), so level
    by level each prefix's surviving steps ([steps] booleans: the path kept to that depth) extend by one AND per
    child, and a shape's expected accepted length is its parent's plus the mean of that mask. `bar` (tqdm) moves
    one unit per level."""
    steps, D = ranks.shape
    depth = min(max_depth, len(probe))
    grid_t = torch.tensor(grid, dtype=torch.int64)
    # [D, G, steps] whether a level of each grid width keeps the path's node there (rank < width; inf: never)
    keeps = ranks.T[:, None, :] < grid_t[None, :, None].to(ranks.dtype)
    widths = torch.zeros(1, 0, dtype=torch.int64)  # the prefixes of this level: the root alone
    left = torch.tensor([max_nodes - 1])  # nodes each prefix may still add
    alive = torch.ones(1, steps, dtype=torch.bool)  # [prefixes, steps] the path kept so far
    total = torch.zeros(1, dtype=torch.int64)  # [prefixes] sum over steps of the accepted tokens so far
    rows, accs = [], []
    for level in range(depth):
        ok = (grid_t[None, :] <= left[:, None]) & (grid_t[None, :] <= probe[level])  # [prefixes, G]
        parent, g = ok.nonzero(as_tuple=True)  # row-major: prefix by prefix, then in grid order
        last = level == depth - 1  # the deepest level's masks extend nothing: only their sums are kept
        kids_alive = None if last else torch.empty(len(parent), steps, dtype=torch.bool)
        kept = torch.empty(len(parent), dtype=torch.int64)  # [kids] steps whose path this level keeps
        for lo in range(0, len(parent), 1 << 16):  # [chunk, steps] at a time: the deep levels have millions
            sl = slice(lo, lo + (1 << 16))
            chunk = alive[parent[sl]] & keeps[level, g[sl]]
            kept[sl] = chunk.sum(-1)  # (a sum over the whole level would widen every boolean to int64 at once)
            if not last:
                kids_alive[sl] = chunk
        total = total[parent] + kept
        widths = torch.cat([widths[parent], grid_t[g][:, None]], 1)
        left = left[parent] - grid_t[g]
        alive = kids_alive
        rows.append(widths)
        accs.append(1 + total.double() / steps)
        if bar is not None:
            bar.update()
    W = torch.zeros(sum(len(r) for r in rows), depth, dtype=torch.int64)
    at = 0
    for r in rows:
        W[at : at + len(r), : r.shape[1]] = r
        at += len(r)
    return W, torch.cat(accs) if accs else torch.zeros(0, dtype=torch.float64)


def features_matrix(W: torch.Tensor, tile_nodes: int = DEFAULT_TILE_NODES) -> torch.Tensor:
    """[S, 6] float64, the latency model's features of each row of W [S, L] (level widths, zero past the last
    level; `search_space`'s): [1, depth, nodes (root included), nodes drafted from (all but the last level's), beam
    levels, past one verify tile]. Beam levels count the levels wider than one node, whose selection runs over
    several rows (on the H200 a beam level costs more than a chain level: the record's fit, `fit_latency`). The
    last is 1 for a shape of more than `tile_nodes` nodes, whose verification no longer fits one row tile of the
    tree kernel (`verify_tile_nodes`)."""
    depth = (W > 0).sum(1)
    total = W.sum(1)
    last = W.gather(1, (depth - 1).clamp(min=0)[:, None])[:, 0]
    beams = (W > 1).sum(1)
    past = (1 + total > tile_nodes).to(total.dtype)
    return torch.stack([torch.ones_like(total), depth, 1 + total, total - last, beams, past], 1).double()


def shape_of(row: torch.Tensor) -> list:
    """One row of `search_space`'s W as a shape (its widths up to the first zero)."""
    return [int(w) for w in row.tolist() if w > 0]


def position_probes(dec, prompts, probe, n_tokens, bar=None) -> list:
    """Per prompt: (parents, ranks) of a probe tree at every root position of the prompt's greedy continuation
    (`probe_parents`, `path_ranks`; root r is the prompt's r-th new token, reached by prefilling the prompt and
    the r tokens before it): what `exact_tau` scores any shape inside the probe from."""
    out = []
    for ids in prompts:
        cont = dec.generate(ids, method="ar", max_new_tokens=n_tokens, stop_at_eos=False).new_tokens
        recs = []
        for r in range(n_tokens - 1):
            res = dec.generate(list(ids) + cont[:r], method="tree", tree_shape=probe, max_new_tokens=2, trace=True,
                               stop_at_eos=False)  # fmt: skip
            recs.append(res.trace[0])
            if bar is not None:
                bar.update()
        out.append((probe_parents(recs, probe.depth), path_ranks(recs, probe.depth)))
    return out


def _probe_accepts(probes, shapes: list) -> list:
    """Per prompt of `position_probes`: [shapes, roots] accepted lengths (uint8: at most depth + 1)."""
    return [step_accepts_nested(par, ranks, shapes).to(torch.uint8) for par, ranks in probes]


def position_accepts(dec, prompts, probe, shapes, n_tokens, bar=None) -> list:
    """Per prompt: [shapes, n_tokens - 1] accepted length of each shape at every root position (`position_probes`,
    then `step_accepts_nested`). For `renewal_tau`."""
    return _probe_accepts(position_probes(dec, prompts, probe, n_tokens, bar), shapes)


def exact_tau(probes, shapes: list, n_tokens: int) -> torch.Tensor:
    """[shapes] tau of each shape from `position_probes` (nested beam at every position, the decoder's walk)."""
    return renewal_tau(_probe_accepts(probes, shapes), n_tokens)


def neighbours(shape, probe_widths, max_depth: int, max_nodes: int, grid=WIDTH_GRID) -> list:
    """Shapes one move from `shape` inside the probe: one level's width to the next grid value down or up, a level
    of any grid width appended, or the last level dropped; at most max_depth levels and max_nodes nodes."""
    out = []
    for l, w in enumerate(shape):
        cap = probe_widths[l]
        lower = [g for g in grid if g < w]
        upper = [g for g in grid if w < g <= cap]
        for g in ([lower[-1]] if lower else []) + ([upper[0]] if upper else []):
            out.append(shape[:l] + [g] + shape[l + 1 :])
    if len(shape) < min(max_depth, len(probe_widths)):
        out += [shape + [g] for g in grid if g <= probe_widths[len(shape)]]
    if len(shape) > 1:
        out.append(shape[:-1])
    return [s for s in out if sum(s) + 1 <= max_nodes]


def local_search(
    score, seeds: list, probe_widths, max_depth: int, max_nodes: int, keep: int = 5, rounds: int = 50, known=None
):
    """Hill climbing from `seeds` and the already scored `known` ({shape json: score}): score every unscored
    neighbour of the best `keep` shapes so far, until a round finds nothing better. score(list of shapes) ->
    [shapes] tensor (higher is better). Returns {shape json: score} of every shape scored, `known` included."""
    scored = dict(known or {})

    def add(shapes):
        new = [s for s in dict.fromkeys(json.dumps(s) for s in shapes) if s not in scored]
        if new:
            for k, v in zip(new, score([json.loads(k) for k in new]).tolist()):
                scored[k] = v
        return new

    add(seeds)
    for _ in range(rounds):
        best = sorted(scored, key=scored.get, reverse=True)[:keep]
        top = scored[best[0]]
        frontier = [n for k in best for n in neighbours(json.loads(k), probe_widths, max_depth, max_nodes)]
        if not add(frontier) or max(scored.values()) <= top:
            break
    return scored


def measure(dec, prompts, shape, n_tokens) -> dict:
    toks = secs = calls = 0
    for ids in prompts:
        r = dec.generate(ids, method="tree", tree_shape=shape, max_new_tokens=n_tokens, stop_at_eos=False)
        toks += len(r.new_tokens) - 1
        secs += r.decode_seconds
        calls += r.target_calls - 1
    return {"tokens_per_s": toks / secs, "tau": toks / max(calls, 1), "step_seconds": secs / max(calls, 1)}


def tune(
    target,
    draft,
    prompts,
    probe_shape=(16, 32, 32, 32, 32, 32, 32),
    max_depth=6,
    max_nodes=160,
    n_tokens=64,
    top=5,
    fast=None,
    progress=True,
    calibration=CALIBRATION_SHAPES,
    step_times: dict | None = None,
    every_position: bool = False,
    shortlist: int = 2000,
) -> dict:
    """The four steps of the module docstring. step_times ({shape json: seconds}, e.g. from
    `recorded_step_times`) replaces the calibration runs by recorded ones; the top shapes are then
    predictions for the recording's device and are not validated here. every_position: rescore the best
    `shortlist` shapes of the rank model, every chain and the default by the exact acceptance (module docstring)."""
    from tqdm.auto import tqdm

    from longspec_lab.decoding.eager import SpecDecoder

    probe = TreeShape.of(list(probe_shape))
    tile_nodes = verify_tile_nodes(target.config.group_size)
    eager = SpecDecoder(target, draft)
    recorded = step_times is not None
    if fast is None:
        fast = target.device.type == "cuda"
    timer_dec = None if recorded else eager  # with recorded step times nothing is timed here
    if fast and not recorded:
        from longspec_lab.decoding.graphs import GraphDecoder

        timer_dec = GraphDecoder(target, draft)
    runs = 0 if recorded else len(calibration) + top + 1
    positions = len(prompts) * (n_tokens - 1) if every_position else 0
    search_levels = min(max_depth, probe.depth)
    bar = tqdm(total=len(prompts) + search_levels + positions + runs, disable=not progress, desc="tune")
    trace = []
    for ids in prompts:  # 1. acceptance ranks from probe traces
        trace += eager.generate(
            ids, method="tree", tree_shape=probe, max_new_tokens=n_tokens, trace=True, stop_at_eos=False
        ).trace
        bar.update()
    ranks = path_ranks(trace, probe.depth)
    steps = dict(step_times) if recorded else {}
    if not recorded:
        timer_dec.generate(prompts[0][:256], method="tree", max_new_tokens=8)  # warm-up
    for s in [] if recorded else calibration:  # 2. step latency against tree size
        timer_dec.generate(prompts[0], method="tree", tree_shape=s, max_new_tokens=8, stop_at_eos=False)
        steps[json.dumps(list(s))] = measure(timer_dec, prompts[:1], list(s), n_tokens)["step_seconds"]
        bar.update()
    coef = fit_latency(steps, tile_nodes)
    # 3. exhaustive model search: every shape's acceptance and predicted step time as tensors (`search_space`)
    W, acc = search_space(max_depth, max_nodes, probe.widths, ranks, bar=bar)
    n_searched = len(W)
    t = features_matrix(W, tile_nodes) @ coef
    score = acc / t.clamp_min(1e-9)
    order = score.argsort(descending=True)
    rank_acc = None
    if every_position:  # 3b. the shortlist, every chain and the default, rescored by the exact acceptance
        default = list(DEFAULT_TREE_SHAPE.widths)
        chains = (W <= 1).all(1)  # every level one node wide (W is zero past a shape's depth)
        is_default = torch.zeros(len(W), dtype=torch.bool)
        if len(default) <= W.shape[1]:
            is_default = (W == torch.tensor(default + [0] * (W.shape[1] - len(default)))).all(1)
        keep = order[:shortlist].tolist() + (chains | is_default).nonzero()[:, 0].tolist()
        keep = list(dict.fromkeys(keep))
        shapes, t, rank_acc = [shape_of(W[i]) for i in keep], t[keep], acc[keep]
        probes = position_probes(eager, prompts, probe, n_tokens, bar)
        acc = exact_tau(probes, shapes, n_tokens)
        score = acc / t.clamp_min(1e-9)
        order = score.argsort(descending=True).tolist()

        # 3c. hill climbing from the best few under the exact model: shapes the rank model ranked too low to keep
        def exact_score(ss):
            return exact_tau(probes, ss, n_tokens) / (
                torch.tensor([features(x, tile_nodes) for x in ss], dtype=torch.float64) @ coef
            )

        known = {json.dumps(x): float(v) for x, v in zip(shapes, score)}
        found = local_search(exact_score, [], probe.widths, max_depth, max_nodes, top, known=known)
        extra = [json.loads(k) for k in found if k not in known]
        if extra:  # their tau back from the score the search computed: score = tau / predicted step time
            t_extra = torch.tensor([features(x, tile_nodes) for x in extra], dtype=torch.float64) @ coef
            acc = torch.cat([acc, torch.tensor([found[json.dumps(x)] for x in extra], dtype=torch.float64) * t_extra])
            rank_acc = torch.cat([rank_acc, expected_accept(ranks, extra)])
            shapes, t = shapes + extra, torch.cat([t, t_extra])
            score = acc / t.clamp_min(1e-9)
            order = score.argsort(descending=True).tolist()
        searched_locally = len(extra)
    else:  # only the best `top` rows are needed from here on
        keep = order[:top].tolist()
        shapes, acc, t, score, order = [shape_of(W[i]) for i in keep], acc[keep], t[keep], score[keep], range(len(keep))
    best = [shapes[i] for i in order[:top]]
    model = {
        json.dumps(shapes[i]): {
            "expected_accept": float(acc[i]),
            "predicted_step_s": float(t[i]),
            "predicted_tokens_per_s": float(score[i]),
            **({} if rank_acc is None else {"rank_model_accept": float(rank_acc[i])}),
        }
        for i in order[:top]
    }
    default = list(DEFAULT_TREE_SHAPE.widths)
    validated = {}
    for s in [] if recorded else best + ([default] if default not in best else []):  # 4. measure for real
        validated[json.dumps(s)] = measure(timer_dec, prompts, s, n_tokens)
        bar.update()
    bar.close()
    rep = {
        "probe_shape": list(probe.widths),
        "probe_steps": len(trace),
        "acceptance_by_depth": [
            float((ranks[:, : l + 1] < float("inf")).all(-1).float().mean()) for l in range(probe.depth)
        ],
        "latency_coef": coef.tolist(),
        "latency_leave_one_out": latency_loo(steps, tile_nodes),
        "latency_features": [*LATENCY_FEATURES[:-1], f"more than {tile_nodes} nodes"],
        "acceptance_model": "every position: nested beam, the decoder's walk replayed (exact in float32)"
        if every_position
        else "probe steps: sibling ranks in the wide beam (a bound, biased by where the probe's steps start)",
        "searched_shapes": n_searched,
        "rescored_shapes": len(shapes) if every_position else 0,
        "local_search_shapes": searched_locally if every_position else 0,
        "model_top": model,
        "default_shape": default,
    }
    if recorded:  # predictions only: the best by the model, against the default under the same model
        if every_position and default in shapes:
            d_acc = float(acc[shapes.index(default)])
        elif len(default) <= probe.depth:  # the rank model (also for a default wider than the probe: a bound)
            d_acc = float(expected_accept(ranks, [default])[0])
        else:  # deeper than the probe: nothing recorded says how it accepts
            d_acc = None
        d_t = float(torch.tensor(features(default, tile_nodes), dtype=torch.float64) @ coef)
        d_pred = None if d_acc is None else d_acc / d_t
        # the recording's own shapes under the same models: what a reader checks the predictions against
        inside = [json.loads(k) for k in steps if all(w <= p for w, p in zip(json.loads(k), probe.widths))]
        inside = [x for x in inside if len(x) <= probe.depth]
        if not inside:  # every recorded shape is deeper or wider than the probe
            r_acc, r_t = [], []
        else:
            r_acc = exact_tau(probes, inside, n_tokens) if every_position else expected_accept(ranks, inside)
            r_t = torch.tensor([features(x, tile_nodes) for x in inside], dtype=torch.float64) @ coef
        recorded_predicted = {
            json.dumps(x): {
                "expected_accept": float(a),
                "predicted_step_s": float(b),
                "predicted_tokens_per_s": float(a / b),
            }
            for x, a, b in zip(inside, r_acc, r_t)
        }
        return {
            "method": "exhaustive search on a width grid, scored by recorded path ranks x a latency model fitted "
            "to recorded step times; a prediction for the recording's device, not validated by running",
            **rep,
            "recorded_step_seconds": steps,
            "recorded_predicted": recorded_predicted,
            "recorded_outside_probe": [k for k in steps if k not in recorded_predicted],  # deeper or wider: no tau
            "validated": None,
            "best_shape": best[0],
            "default_predicted": {"expected_accept": d_acc, "predicted_tokens_per_s": d_pred},
            "best_vs_default_predicted": None if d_pred is None else float(score[order[0]]) / d_pred,
            "decoder": "recorded",
        }
    winner = max(validated, key=lambda k: validated[k]["tokens_per_s"])
    return {
        "method": "exhaustive search on a width grid, scored by recorded path ranks x fitted step latency; "
        "top candidates validated by running them",
        **rep,
        "calibration_step_seconds": steps,
        "validated": validated,
        "best_shape": json.loads(winner),
        "best_vs_default": validated[winner]["tokens_per_s"] / validated[json.dumps(default)]["tokens_per_s"],
        "decoder": type(timer_dec).__name__,
    }


def run_cli(args) -> int:
    """`longspec-lab tune` after its flags are parsed and checked (the parser is in longspec_lab.cli)."""
    from longspec_lab.models.pair import load_pair
    from longspec_lab.paths import load_prompts
    from longspec_lab.provenance import environment

    step_times = record = None
    if getattr(args, "latency_from", None):
        record = json.loads(Path(args.latency_from).read_text())
        step_times = recorded_step_times(record)
    target, draft, tok = load_pair(args.model, args.draft, args.device, args.dtype)
    chosen = load_prompts(min_tokens=getattr(args, "min_prompt_tokens", 1000))[: args.num_prompts]
    prompts = [tok.encode(p["text"])[: args.prompt_tokens] for p in chosen]
    rep = tune(
        target,
        draft,
        prompts,
        args.probe_shape,
        args.max_depth,
        args.max_nodes,
        args.max_new_tokens,
        args.top,
        progress=not args.quiet,
        step_times=step_times,
        every_position=getattr(args, "every_position", False),
        shortlist=getattr(args, "shortlist", 2000),
    )
    rep["prompts"] = [{"name": p["name"], "tokens": len(ids)} for p, ids in zip(chosen, prompts)]
    rep["environment"] = environment(target.device)
    if step_times is not None:
        rep["latency_from"] = str(args.latency_from)
        loo = rep["latency_leave_one_out"]
        if loo:  # how well the step-time model prices a recorded shape it was not fitted to
            worst = max(loo, key=lambda k: abs(loo[k]))
            print(f"latency model, each recorded shape left out of the fit in turn: step time off by "
                  f"{100 * sum(abs(v) for v in loo.values()) / len(loo):.1f}% on average, at most "
                  f"{100 * loo[worst]:+.1f}% ({worst})")  # fmt: skip
        print(f"latency model fitted to {args.latency_from}; predicted, not run:")
        print(f"{'shape':<32}{'pred. tok/s':>12}{'E[accept]':>10}")
        for k, v in rep["model_top"].items():
            print(f"{k:<32}{v['predicted_tokens_per_s']:>12.1f}{v['expected_accept']:>10.2f}")
        ratio = rep["best_vs_default_predicted"]
        vs = "the default is deeper than the probe" if ratio is None else f"{ratio:.2f}x the default (predicted)"
        print(f"best {rep['best_shape']}: {vs}")
        rows = recorded_rows(record)
        print(f"the recording's own shapes, predicted here against measured there:\n{'shape':<32}"
              f"{'pred. tok/s':>12}{'measured':>10}{'E[accept]':>10}{'tau':>7}")  # fmt: skip
        for k, v in rep["recorded_predicted"].items():
            print(f"{k:<32}{v['predicted_tokens_per_s']:>12.1f}{rows[k]['tokens_per_s']:>10.1f}"
                  f"{v['expected_accept']:>10.2f}{rows[k]['tau']:>7.2f}")  # fmt: skip
        for k in rep["recorded_outside_probe"]:  # the probe records no acceptance beyond its own depth and widths
            print(f"{k:<32}{'-':>12}{rows[k]['tokens_per_s']:>10.1f}{'-':>10}{rows[k]['tau']:>7.2f}"
                  f"  deeper or wider than the probe {rep['probe_shape']}: not predicted")  # fmt: skip
        return _write_report(rep, args.out)
    print(f"{'shape':<32}{'tokens/s':>10}{'tau':>7}")
    for k, v in sorted(rep["validated"].items(), key=lambda kv: -kv[1]["tokens_per_s"]):
        print(f"{k:<32}{v['tokens_per_s']:>10.1f}{v['tau']:>7.2f}")
    print(f"best {rep['best_shape']}: {rep['best_vs_default']:.2f}x the default {rep['default_shape']}")
    return _write_report(rep, args.out)


def _write_report(rep: dict, out) -> int:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"schema_version": rep["environment"]["schema_version"], **rep}, indent=2)
        Path(out).write_text(text + "\n")
        print(f"wrote the report to {out}")
    return 0


if __name__ == "__main__":  # the old spelling, `python -m longspec_lab.bench.tune`, runs the CLI's subcommand
    import runpy
    import sys

    sys.argv = ["longspec-lab", "tune", *sys.argv[1:]]
    runpy.run_module("longspec_lab", run_name="__main__", alter_sys=True)
