"""The paper's figures: the LSE merge against one float64 softmax, the stepped merge, the block
matrix, the stacked speedup terms, acceptance plots and the position-remapping context manager."""

import math
import types

import pytest
import torch

from longspec_lab.teach import cost, palette, paper_figures
from longspec_lab.teach.setup import load_result
from longspec_lab.teach.viz_trees import balanced_tree


def _parts(seed=0, sizes=(30, 9, 4), n=6, D=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, D, generator=g, dtype=torch.float64)
    k = 4 * torch.randn(sum(sizes), D, generator=g, dtype=torch.float64)
    v = torch.randn(sum(sizes), D, generator=g, dtype=torch.float64)
    s = q @ k.T / math.sqrt(D)
    ref = torch.softmax(s, -1) @ v
    parts, lo = [], 0
    for m in sizes:
        ss = s[:, lo : lo + m]
        parts.append((torch.softmax(ss, -1) @ v[lo : lo + m], torch.logsumexp(ss, -1)))
        lo += m
    return parts, ref, torch.logsumexp(s, -1)


def test_lse_merge_and_merge_steps_equal_one_softmax():
    parts, ref, ref_lse = _parts()
    o, lse = paper_figures.lse_merge(parts)
    assert (o - ref).abs().max() < 1e-12 and (lse - ref_lse).abs().max() < 1e-12
    steps = paper_figures.merge_steps(parts)
    assert len(steps) == 3 and (steps[-1]["o"] - ref).abs().max() < 1e-12
    for s in steps[1:]:
        assert torch.allclose(s["w_old"] + s["w_new"], torch.ones_like(s["w_new"]))
    with pytest.raises(ValueError):
        paper_figures.lse_merge([])


def test_hybrid_split_figure_blocks_and_steps():
    tree = balanced_tree([2, 4])
    T = tree.num_nodes
    lp, lt = torch.zeros(T), torch.full((T,), math.log(3.0))
    fig = paper_figures.hybrid_split_figure(tree.mask, 500, lp, lt, prefix_columns=10, row=T - 1)
    z = fig.data[0].z
    assert len(z) == T and len(z[0]) == 10 + T
    assert all(v == 1 for r in z for v in r[:10])  # the prefix block: every row, every key, no mask
    assert [[v // 2 for v in r[10:]] for r in z] == tree.mask.int().tolist()  # the tree block is the mask
    steps = fig.layout.sliders[0].steps
    assert len(steps) == 4 and "0.2500" in steps[2].args[1]["title.text"]  # w = sigmoid(0 - log 3) = 1/4
    assert all(v in (0, 2) for r in steps[1].args[0]["z"][0] for v in r)  # step 2: the tree part alone


def test_speedup_figure_stacks_the_terms():
    v8 = load_result("verify_8b_h200")
    terms = cost.speedup_terms(v8, 5.0)
    fig = paper_figures.speedup_figure(terms, 5.0)
    bars = {t.name: t for t in fig.data if t.type == "bar"}
    assert {n.split(" ")[0] for n in bars} >= {"draft", "verify", "commit", "one"}
    assert bars["draft / τ"].marker.color == palette.STAGE["draft"]
    line = next(t for t in fig.data if t.type == "scatter")
    assert list(line.y) == [t["speedup"] for t in terms]


def _fake_result(depth, rank):
    return types.SimpleNamespace(
        acceptance_by_depth=depth, acceptance_by_rank=rank, depth_tried=[10] * len(depth), rank_tried=[10] * len(rank)
    )


def test_acceptance_figure_one_colour_per_method():
    fig = paper_figures.acceptance_figure(
        {"tree [4,16]": _fake_result([0.9, 0.8], [0.7, 0.2, None]), "chain γ = 4": _fake_result([0.8, 0.6], [0.7])}
    )
    cols = {t.name: t.marker.color for t in fig.data}
    assert cols == {"tree [4,16]": palette.METHOD["tree"], "chain γ = 4": palette.METHOD["chain"]}
    rank_bars = [t for t in fig.data if t.xaxis == "x2" and t.name == "tree [4,16]"][0]
    assert list(rank_bars.x) == [0, 1]  # None (never tried) is not drawn as 0
    with pytest.raises(ValueError, match="acceptance counts"):
        paper_figures.acceptance_figure({"ar": _fake_result([], [])})


def test_draft_positions_remaps_only_inside_the_block():
    seen = []
    target = types.SimpleNamespace(rotary=lambda pos, dtype: seen.append(pos.tolist()), other=7)
    draft = types.SimpleNamespace()
    object.__setattr__(draft, "target", target)
    with paper_figures.draft_positions(draft, lambda p: p % 4):
        draft.target.rotary(torch.tensor([3, 4, 9]), None)
        assert draft.target.other == 7
    draft.target.rotary(torch.tensor([9]), None)
    assert seen == [[3, 0, 1], [9]] and draft.target is target
