"""Pure figure functions: the DOT source and plotly data are checked against the trees they draw.

References are independent of viz.py: node/edge counts from the tree itself, statuses by brute
force over ancestors, Pareto fronts from the definition of dominance.
"""

import random
import re
import shutil

import numpy as np
import pytest
import torch

from longspec_lab.spec.trace import GenerationResult, StepRecord
from longspec_lab.spec.tree import DraftTree, TreeShape
from longspec_lab.spec.verify import accept_greedy
from longspec_lab.teach import palette, viz_results, viz_trees

NODE = re.compile(r"^\s*(\w+) \[(.*)\]\s*$")
EDGE = re.compile(r"^\s*(\w+) -> (\w+)(?: \[(.*)\])?\s*$")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` not installed")


def parse(dot):
    """{node name: attr string}, [(tail, head, attr string)] from a DOT source."""
    nodes, edges = {}, []
    for line in dot.source.splitlines():
        if m := EDGE.match(line):
            edges.append((m.group(1), m.group(2), m.group(3) or ""))
        elif (m := NODE.match(line)) and m.group(1) not in ("node", "edge", "graph"):
            nodes[m.group(1)] = m.group(2)
    return nodes, edges


def random_tree(seed, shape=None, vocab=50):
    rng = random.Random(seed)
    shape = shape or [rng.randint(1, 6) for _ in range(rng.randint(1, 5))]
    off, parents = TreeShape(shape).level_offsets, [-1]
    for l, w in enumerate(shape, start=1):
        parents += sorted(rng.randrange(off[l - 1], off[l]) for _ in range(w))
    tokens = [rng.randrange(vocab) for _ in parents]
    scores = [0.0] + [-rng.random() * 5 * (1 + i) for i in range(len(parents) - 1)]
    return DraftTree.from_parents(tokens, parents, scores)


def random_step(seed, tree):
    """A verification in which a random root-to-node path is verified (plus random other matches)."""
    rng = random.Random(seed + 1)
    n = tree.num_nodes
    target = [rng.randrange(50) for _ in range(n)]
    node = rng.randrange(n)
    for a in tree.path(node)[1:]:
        target[int(tree.parents[a])] = int(tree.tokens[a])
    t = torch.tensor(target)
    res = accept_greedy(tree, t)
    return StepRecord(0, 100, tree, t, res, res.emitted.tolist())


def brute_status(tree, target):
    par, tok = tree.parents.tolist(), tree.tokens.tolist()
    ver = [True] + [tok[i] == target[par[i]] for i in range(1, tree.num_nodes)]
    out = ["root"]
    for i in range(1, tree.num_nodes):
        anc, ok = i, True
        while anc > 0:
            ok &= ver[anc]
            anc = par[anc]
        out.append("accepted_any" if ok else ("verified" if ver[i] else "rejected"))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_diagram_counts_equal_the_tree_without_collapsing(seed):
    tree = random_tree(seed)
    dot = viz_trees.tree_diagram(tree, max_children=tree.num_nodes)
    nodes, edges = parse(dot)
    real = {k for k in nodes if k.startswith("n")}
    assert real == {f"n{i}" for i in range(tree.num_nodes)}
    assert not [k for k in nodes if k.startswith("more")]
    tree_edges = {(t, h) for t, h, a in edges if "invis" not in a}
    assert tree_edges == {(f"n{int(p)}", f"n{i}") for i, p in enumerate(tree.parents.tolist()) if p >= 0}
    headers = [k for k in nodes if k.startswith("level")]
    assert len(headers) == tree.shape.depth + 1


@pytest.mark.parametrize("seed,max_children", [(s, m) for s in range(10) for m in (1, 2, 3)])
def test_collapsed_diagram_accounts_for_every_node(seed, max_children):
    tree = random_tree(seed, shape=[4, 8, 8, 6])
    step = random_step(seed, tree)
    nodes, edges = parse(viz_trees.tree_diagram(step, max_children=max_children))
    shown = sorted(int(k[1:]) for k in nodes if re.fullmatch(r"n\d+", k))
    hidden = 0
    for name, attrs in nodes.items():
        if name.startswith("more"):
            k = int(re.search(r"\+(\d+) more", attrs).group(1))
            below = re.search(r"\+(\d+) below", attrs)
            hidden += k + (int(below.group(1)) if below else 0)
            assert (f"n{name[4:]}", name) in {(t, h) for t, h, _ in edges}
    assert len(shown) + hidden == tree.num_nodes
    par = tree.parents.tolist()
    path = set(step.result.path.tolist())
    assert path <= set(shown), "accepted-path nodes are never collapsed"
    for i in shown[1:]:
        assert par[i] in shown
        kids = [c for c in shown if par[c] == par[i]]
        assert len([c for c in kids if c not in path]) <= max_children
    real_edges = [(t, h) for t, h, a in edges if t.startswith("n") and h.startswith("n")]
    assert len(real_edges) == len(shown) - 1


@pytest.mark.parametrize("seed", range(15))
def test_status_colours_match_brute_force(seed):
    tree = random_tree(seed)
    step = random_step(seed, tree)
    dot = viz_trees.tree_diagram(step, max_children=tree.num_nodes)
    nodes, edges = parse(dot)
    fill = {
        int(k[1:]): re.search(r'fillcolor="([^"]+)"', a).group(1) for k, a in nodes.items() if re.fullmatch(r"n\d+", k)
    }
    path = step.result.path.tolist()
    want = brute_status(tree, step.target_tokens.tolist())
    # the accepted colour is on exactly the path's nodes (root excluded: it has its own colour)
    assert {i for i, c in fill.items() if c == palette.COLORS["accepted"]} == set(path[1:])
    assert fill[0] == palette.COLORS["root"]
    for i in range(1, tree.num_nodes):
        if want[i] in ("verified", "rejected"):
            assert fill[i] == palette.COLORS[want[i]], (i, want[i])
    thick = {(t, h) for t, h, a in edges if palette.PATH_EDGE in a}
    assert thick == {(f"n{a}", f"n{b}") for a, b in zip(path, path[1:])}
    for s in {want[i] for i in range(1, tree.num_nodes)} - {"accepted_any"}:
        assert palette.STATUS_TEXT[s] in dot.source  # the legend names every colour used


def test_placeholder_shape_diagram_and_bad_inputs():
    nodes, edges = parse(viz_trees.tree_diagram([4, 16, 16, 16, 16], max_children=16))
    assert len([k for k in nodes if re.fullmatch(r"n\d+", k)]) == 69
    assert len([e for e in edges if "invis" not in e[2]]) == 68
    with pytest.raises(ValueError, match="width"):
        viz_trees.tree_diagram([4, 0, 16])
    with pytest.raises(ValueError, match="max_children"):
        viz_trees.tree_diagram([4, 16], max_children=0)
    with pytest.raises(ValueError, match="DraftTree"):
        viz_trees.tree_diagram(3.5)


def test_balanced_tree_and_children_per_node():
    for shape in ([4, 16, 16, 16, 16], [3, 7, 2], [1, 1, 1], [5]):
        t = viz_trees.balanced_tree(shape)
        assert list(t.shape.widths) == shape
        for l in range(1, len(shape) + 1):
            kids = viz_trees.children_per_node(t, l)
            assert sum(kids) == shape[l - 1] and max(kids) - min(kids) <= 1
    real = random_tree(3, shape=[3, 9])
    assert viz_trees.children_per_node(real, 2) == [real.parents.tolist().count(p) for p in (1, 2, 3)]
    with pytest.raises(ValueError, match="level"):
        viz_trees.children_per_node(real, 3)


class FakeTok:
    def __init__(self, table):
        self.table = table

    def decode(self, ids):
        return "".join(self.table[i] for i in ids)


def test_token_label_makes_whitespace_visible():
    tok = FakeTok({0: "\n", 1: "  x", 2: "\tif", 3: "", 4: "a\x00b", 5: "abcdefghijklmnopqrstuvwxyz"})
    assert viz_trees.token_label(0, tok) == "↵"
    assert viz_trees.token_label(1, tok) == "··x"
    assert viz_trees.token_label(2, tok) == "⇥if"
    assert viz_trees.token_label(3, tok) == "∅"
    assert viz_trees.token_label(4, tok) == "a\\x00b"
    assert viz_trees.token_label(5, tok, max_len=6) == "abcde…"
    assert viz_trees.token_label(7) == "<7>"


@needs_dot
def test_awkward_tokens_render_through_dot():
    table = {0: "\n", 1: 'say "hi"', 2: "back\\slash", 3: "<b>html</b>", 4: "{rec|ord}", 5: "\\n"}
    tree = DraftTree.from_parents([0, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 1, 2])
    svg = viz_trees.diagram_svg(viz_trees.tree_diagram(tree, tokenizer=FakeTok(table)))
    for text in ("say·&quot;hi&quot;", "back\\slash", "&lt;b&gt;html&lt;/b&gt;", "{rec|ord}", "\\n"):
        assert text in svg, text
    assert svg.startswith("<svg")


@pytest.mark.parametrize("seed", range(8))
def test_mask_figure_z_is_the_mask(seed):
    tree = random_tree(seed)
    step = random_step(seed, tree)
    fig = viz_trees.mask_figure(step)
    m = tree.mask
    # independent reference: j is i or an ancestor of i
    ref = np.zeros((tree.num_nodes,) * 2, dtype=int)
    for i in range(tree.num_nodes):
        for j in tree.path(i):
            ref[i, j] = 1
    assert np.array_equal(np.asarray(fig.data[0].z), ref)
    assert np.array_equal(ref, m.int().numpy())
    assert list(fig.data[0].x) == list(range(tree.num_nodes)) == list(fig.data[0].y)
    assert len(fig.layout.shapes) == 2 * tree.shape.depth  # one line per level boundary (root included) per axis
    k = len(step.result.path)
    hl = [t for t in fig.data if t.name == "accepted path"][0]
    assert len(hl.x) == k * (k + 1) // 2  # the path is a chain: lower triangle incl. diagonal
    assert fig.layout.title.text and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_mask_figure_plain_arrays_and_errors():
    m = [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    fig = viz_trees.mask_figure(m, levels=[2], path=[0, 1])
    assert np.array_equal(np.asarray(fig.data[0].z), np.array(m))
    assert len(fig.layout.shapes) == 2  # root | level 1, on both axes
    fig = viz_trees.mask_figure(torch.tensor(m, dtype=torch.bool), levels=[1, 1])
    assert len(fig.layout.shapes) == 4
    with pytest.raises(ValueError, match="square"):
        viz_trees.mask_figure([[1, 0, 0], [1, 1, 0]])


def fake_result(method, n_new, calls, stages, wall):
    return GenerationResult(method, list(range(n_new)), calls, [1] * (calls - 1), stages, wall)


def test_tau_and_stage_figures_show_the_numbers():
    rs = {
        "ar": fake_result("ar", 33, 33, {"prefill": 0.5, "verify": 3.2}, 4.0),
        "tree": fake_result("tree", 33, 11, {"prefill": 0.5, "draft": 0.9, "verify": 1.1, "commit": 0.1}, 2.8),
    }
    fig = viz_results.tau_figure(rs)
    bars = {(t.name, t.xaxis): t.y[0] for t in fig.data}
    assert bars[("ar", "x")] == pytest.approx(1.0) and bars[("tree", "x")] == pytest.approx(3.0)
    assert bars[("tree", "x2")] == pytest.approx(32 / 2.3)
    assert fig.layout.title.text and fig.layout.legend.title.text == "method"
    fig = viz_results.stage_times_figure(rs)
    per = {t.name: dict(zip(t.y, t.x)) for t in fig.data}
    assert per["draft"]["tree"] == pytest.approx(900 / 32)
    total_tree = sum(per[s]["tree"] for s in per)
    assert total_tree == pytest.approx((2.8 - 0.5) * 1000 / 32)
    assert fig.layout.xaxis.title.text and fig.layout.legend.title.text == "stage"
    with pytest.raises(ValueError, match="no results"):
        viz_results.tau_figure({})


@pytest.mark.parametrize("seed", range(6))
def test_pareto_front_matches_the_definition(seed):
    rng = random.Random(seed)
    pts = [dict(x=rng.randint(1, 20), y=rng.randint(1, 20), label=str(i)) for i in range(30)]
    front = viz_results.pareto_front(pts, "x", "y")

    def beats(a, b):  # a dominates b: x no larger, y no smaller, one strictly
        return a["x"] <= b["x"] and a["y"] >= b["y"] and (a["x"] < b["x"] or a["y"] > b["y"])

    for i in range(len(pts)):
        dominated = any(beats(q, pts[i]) for q in pts)
        assert (i in front) == (not dominated)
    fig = viz_results.pareto_figure(pts, x="x", y="y")
    line = [t for t in fig.data if t.name == "Pareto front"][0]
    assert list(line.x) == sorted(pts[i]["x"] for i in front)


def test_line_and_accepted_lengths_figures():
    fig = viz_results.line_figure({"a": ([1, 2], [3, 4]), "b": ([1, 2], [5, 6])}, "t", "x", "y", log_x=True)
    assert [t.name for t in fig.data] == ["a", "b"] and fig.layout.xaxis.type == "log"
    r = fake_result("tree", 10, 4, {}, 1.0)
    r.accepted_lengths = [3, 4, 2]
    fig = viz_results.accepted_lengths_figure(r)
    assert list(fig.data[0].y) == [3, 4, 2] and fig.data[1].y[0] == pytest.approx(3.0)
