"""Tests for longspec_lab.spec.tree and spec.draft: shapes, masks, beam growth, each against a naive reference."""

import itertools
import math
import re
import zlib

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from longspec_lab.spec.draft import beam_level, grow_beam_tree
from longspec_lab.spec.tree import DEFAULT_TREE_SHAPE, DraftTree, TreeShape, chain_tree, tree_mask, tree_positions

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- TreeShape


def test_default_shape_counts():
    s = DEFAULT_TREE_SHAPE
    assert s.widths == (4, 16, 16, 16, 16)
    assert s.num_nodes == 69 and s.num_draft_nodes == 68 and s.depth == 5  # LONGSPEC.md section 1
    assert s.mask_bytes == 69 * 69
    assert s.level_offsets == (0, 1, 5, 21, 37, 53, 69)


@SETTINGS
@given(st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_shape_properties_match_naive(widths):
    s = TreeShape(widths)
    levels = [0] + [l for l, w in enumerate(widths, start=1) for _ in range(w)]  # level of each node
    assert s.num_nodes == len(levels) and s.depth == len(widths)
    assert s.num_draft_nodes == len(levels) - 1
    assert [s.level_of(i) for i in range(len(levels))] == levels
    off = s.level_offsets
    assert len(off) == s.depth + 2 and off[-1] == s.num_nodes
    for l in range(s.depth + 1):
        assert levels[off[l] : off[l + 1]] == [l] * (off[l + 1] - off[l])
    assert TreeShape.of(",".join(map(str, widths))) == s == TreeShape.of(" ".join(map(str, widths)))
    assert TreeShape.of(tuple(widths)) == s and TreeShape.of(s) is s and TreeShape(s) == s
    assert TreeShape.of(str(s)) == s


def test_shape_accepts_spaced_and_bracketed_strings():
    assert TreeShape("4, 16,16") == TreeShape("[4 16 16]") == TreeShape([4, 16, 16])
    assert TreeShape.chain(3) == TreeShape((1, 1, 1))
    assert TreeShape.chain(0).depth == 0 and TreeShape.chain(0).num_nodes == 1


@pytest.mark.parametrize(
    "bad, needles",
    [
        ([4, 0, 16], ["level 2", "width 0", ">= 1", "e.g."]),
        ([-3], ["level 1", "width -3", ">= 1"]),
        ([4, 2.5], ["level 2", "2.5", "integer"]),
        ([True, 4], ["level 1", "True", "integer"]),
        (["a"], ["level 1", "'a'", "integer"]),
        ("4,a,16", ["level 2", "'a'", "integer"]),
        ("4,0", ["level 2", "width 0"]),
        ([], ["empty", "e.g."]),
        ("", ["empty"]),
        (5, ["list", "[1] * gamma"]),
        (None, ["list"]),
    ],
)
def test_shape_validation_messages(bad, needles):
    with pytest.raises(ValueError) as e:
        TreeShape.of(bad)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_level_of_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        TreeShape([2, 2]).level_of(5)


@SETTINGS
@given(st.lists(st.integers(1, 40), min_size=1, max_size=4), st.integers(1, 8))
def test_check_fits_matches_naive(widths, vocab):
    # naive: level l can hold at most (#nodes of level l-1) * vocab distinct (parent, token) pairs
    prev, first_bad = 1, None
    for l, w in enumerate(widths, start=1):
        if w > prev * vocab and first_bad is None:
            first_bad = l
        prev = w
    if first_bad is None:
        TreeShape(widths).check_fits(vocab)
    else:
        with pytest.raises(ValueError, match=f"level {first_bad} has width"):
            TreeShape(widths).check_fits(vocab)


# ----------------------------------------------------------------------------- masks


@st.composite
def parent_arrays(draw, max_nodes=30):
    n = draw(st.integers(1, max_nodes))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


def brute_mask(parents):
    n = len(parents)
    m = [[False] * n for _ in range(n)]
    for i in range(n):
        j = i
        while j >= 0:
            m[i][j] = True
            j = parents[j]
    return torch.tensor(m, dtype=torch.bool)


@SETTINGS
@given(parent_arrays())
def test_tree_mask_matches_ancestor_walk(parents):
    m = tree_mask(torch.tensor(parents))
    assert m.dtype == torch.bool and torch.equal(m, brute_mask(parents))
    assert bool(m[:, 0].all())  # everyone sees the root


@pytest.mark.parametrize(
    "parents, needle",
    [
        ([0, 0], "parents[0] must be -1"),
        ([-1, 1], "node 1 has parent 1"),
        ([-1, 0, 3, 1], "node 2 has parent 3"),
        ([-1, -1], "node 1 has parent -1"),
    ],
)
def test_tree_mask_rejects_bad_parents(parents, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        tree_mask(torch.tensor(parents))
    with pytest.raises(ValueError, match=re.escape(needle)):
        DraftTree.from_parents([0] * len(parents), parents)


def test_tree_mask_rejects_float_parents():
    with pytest.raises(ValueError, match="integer"):
        tree_mask(torch.tensor([-1.0, 0.0]))


# ----------------------------------------------------------------------------- DraftTree


@st.composite
def level_ordered_parents(draw):
    widths = draw(st.lists(st.integers(1, 4), min_size=0, max_size=4))
    parents, prev = [-1], [0]
    for w in widths:
        level = []
        for _ in range(w):
            parents.append(draw(st.sampled_from(prev)))
            level.append(len(parents) - 1)
        prev = level
    return widths, parents


@SETTINGS
@given(level_ordered_parents(), st.integers(0, 1000))
def test_from_parents_paths_children_positions(wp, prefix_len):
    widths, parents = wp
    n = len(parents)
    tokens = [(7 * i + 3) % 11 for i in range(n)]
    t = DraftTree.from_parents(tokens, parents)
    assert t.num_nodes == n and t.shape.widths == tuple(widths)
    for i in range(n):
        naive_path = [i]
        while parents[naive_path[-1]] >= 0:
            naive_path.append(parents[naive_path[-1]])
        naive_path.reverse()
        assert t.path(i) == naive_path
        assert t.path_tokens(i) == [tokens[j] for j in naive_path]
        assert int(t.depths[i]) == len(naive_path) - 1
        assert t.children(i) == [j for j in range(n) if parents[j] == i]
    naive_pos = [prefix_len + len(t.path(i)) - 1 for i in range(n)]
    assert torch.equal(t.positions(prefix_len), torch.tensor(naive_pos))
    assert torch.equal(tree_positions(t.depths, prefix_len), t.positions(prefix_len))
    assert torch.equal(t.mask, brute_mask(parents))
    t2 = t.to("cpu")
    assert torch.equal(t2.tokens, t.tokens) and t2.shape == t.shape


def test_from_parents_rejects_bad_numbering_and_shape():
    with pytest.raises(ValueError, match="level by level"):
        DraftTree.from_parents([0, 1, 2, 3], [-1, 0, 1, 0])  # depth-1 node after a depth-2 node
    with pytest.raises(ValueError, match="does not match"):
        DraftTree.from_parents([0, 1, 2], [-1, 0, 0], shape=[1, 1])
    with pytest.raises(ValueError, match=r"\[N\]"):
        DraftTree.from_parents([0, 1, 2], [-1, 0])
    with pytest.raises(ValueError, match="1-D tensor of 3 nodes"):
        DraftTree(
            torch.zeros(2, dtype=torch.long),
            torch.tensor([-1, 0]),
            torch.tensor([0, 1]),
            torch.zeros(2),
            TreeShape([2]),
        )


def test_chain_tree():
    t = chain_tree(9, [4, 5, 6], scores=[-0.5, -1.0, -2.0])
    assert t.tokens.tolist() == [9, 4, 5, 6] and t.parents.tolist() == [-1, 0, 1, 2]
    assert t.depths.tolist() == [0, 1, 2, 3] and t.shape == TreeShape((1,) * 3)
    assert t.scores.tolist() == [0.0, -0.5, -1.0, -2.0]
    assert torch.equal(t.mask, torch.ones(4, 4, dtype=torch.bool).tril())
    root_only = chain_tree(9, [])
    assert root_only.num_nodes == 1 and root_only.shape.depth == 0
    with pytest.raises(ValueError, match="one cumulative score per draft token"):
        chain_tree(9, [1, 2], scores=[0.0])


# ----------------------------------------------------------------------------- beam growth


def path_logprobs(path, vocab, seed, ties):
    """Deterministic draft log-probs [V] (float64) as a function of the root..node token path."""
    h = zlib.crc32(repr((seed, tuple(path))).encode())
    g = torch.Generator().manual_seed(h)
    if ties:  # coarse integer values: many exactly tied cumulative scores
        return -torch.randint(0, 3, (vocab,), generator=g).double()
    return torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, -1)


def reference_beam_tree(root, widths, vocab, seed, ties):
    """Naive python beam: enumerate every (node, token) pair of the previous level, sort, keep top w."""
    tokens, parents, scores, paths = [root], [-1], [0.0], [[root]]
    prev = [0]
    for w in widths:
        pairs = []
        for local, node in enumerate(prev):
            lp = path_logprobs(paths[node], vocab, seed, ties).tolist()
            for tok in range(vocab):
                pairs.append((-(scores[node] + lp[tok]), local * vocab + tok, node, tok))
        pairs.sort()
        level = []
        for neg, _, node, tok in pairs[:w]:
            tokens.append(tok)
            parents.append(node)
            scores.append(-neg)
            paths.append(paths[node] + [tok])
            level.append(len(tokens) - 1)
        prev = level
    return tokens, parents, scores, paths


def make_callback(vocab, seed, ties, calls):
    def level_logprobs(partial, node_ids):
        calls.append(node_ids.tolist())
        # the partial tree must be a valid tree holding exactly the nodes built so far
        assert partial.num_nodes == int(node_ids[-1]) + 1
        assert torch.equal(partial.mask, brute_mask(partial.parents.tolist()))
        assert torch.equal(partial.depths[node_ids], torch.full((len(node_ids),), partial.shape.depth))
        return torch.stack([path_logprobs(partial.path_tokens(int(i)), vocab, seed, ties) for i in node_ids])

    return level_logprobs


@SETTINGS
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(5, 12), st.integers(0, 10_000), st.booleans())
def test_grow_beam_tree_matches_reference(widths, vocab, seed, ties):
    assume(all(w <= p * vocab for w, p in zip(widths, [1] + widths)))  # every level fits the vocab
    shape = TreeShape(widths)
    root = seed % vocab
    calls = []
    tree = grow_beam_tree(root, shape, make_callback(vocab, seed, ties, calls))
    tokens, parents, scores, paths = reference_beam_tree(root, widths, vocab, seed, ties)
    assert tree.shape == shape and tree.num_nodes == shape.num_nodes
    assert tree.tokens.tolist() == tokens
    assert tree.parents.tolist() == parents
    assert tree.scores.tolist() == scores  # float64 end to end: same additions, same bits
    assert tree.depths.tolist() == [len(p) - 1 for p in paths]
    assert torch.equal(tree.mask, brute_mask(parents))
    off = shape.level_offsets
    assert calls == [list(range(off[l], off[l + 1])) for l in range(shape.depth)]  # level 1 gets [0]
    for i in range(1, tree.num_nodes):  # score = sum of draft log-probs along the path
        p = tree.path_tokens(i)
        s = sum(float(path_logprobs(p[:k], vocab, seed, ties)[p[k]]) for k in range(1, len(p)))
        assert math.isclose(float(tree.scores[i]), s, rel_tol=1e-12, abs_tol=1e-12)
    for l in range(1, shape.depth + 1):  # beam order inside each level
        lvl = tree.scores[off[l] : off[l + 1]]
        assert bool((lvl[:-1] >= lvl[1:]).all())


def test_beam_level_ties_and_float32():
    lp = torch.tensor([[0.0, -1.0, 0.0], [0.0, -5.0, -1.0]])
    pidx, tok, sc = beam_level(torch.tensor([0.0, 0.0]), lp, 5)
    naive = sorted(((-(lp[i, j].item()), i * 3 + j) for i, j in itertools.product(range(2), range(3))))[:5]
    assert [int(p) * 3 + int(t) for p, t in zip(pidx, tok)] == [f for _, f in naive]
    assert sc.dtype == torch.float32 and sc.tolist() == [-s for s, _ in naive]


def test_beam_level_with_minus_inf():
    lp = torch.full((2, 4), float("-inf"))
    lp[1, 2] = -0.5
    pidx, tok, sc = beam_level(torch.tensor([-1.0, -2.0]), lp, 3)
    assert (pidx.tolist(), tok.tolist()) == ([1, 0, 0], [2, 0, 1])
    assert sc[0] == -2.5 and bool(torch.isinf(sc[1:]).all())


def test_beam_level_errors():
    with pytest.raises(ValueError, match="only 2 nodes x 3 tokens = 6 exist"):
        beam_level(torch.zeros(2), torch.zeros(2, 3), 7)
    with pytest.raises(ValueError, match="NaN"):
        beam_level(torch.zeros(1), torch.tensor([[0.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="parent_scores"):
        beam_level(torch.zeros(3), torch.zeros(2, 3), 1)


def test_grow_beam_tree_too_wide_for_vocab():
    cb = make_callback(5, 0, False, [])
    with pytest.raises(ValueError, match="level 2 has width 20"):
        grow_beam_tree(0, [3, 20], cb)
    with pytest.raises(ValueError, match="level 1 has width 6 but the vocabulary has only 5"):
        grow_beam_tree(0, [6], cb)


def test_grow_beam_tree_bad_callback_shape():
    with pytest.raises(ValueError, match="one row of log-probs per requested node"):
        grow_beam_tree(0, [2, 2], lambda tree, ids: torch.zeros(5))


@pytest.mark.parametrize("n,V,width", [(1, 50, 1), (3, 7, 5), (4, 6, 20), (16, 40, 16), (5, 3, 15)])
def test_beam_level_equals_brute_force_sort(n, V, width):
    """The two-stage top-k (per row, then over the rows' winners) against a brute-force stable sort of
    all n * V pairs by (score desc, flat index asc); coarse log-probs force many exact ties."""
    g = torch.Generator().manual_seed(n * 100 + V)
    lp = torch.randint(-4, 1, (n, V), generator=g).double() / 2  # few distinct values: ties everywhere
    parents = torch.randint(-2, 1, (n,), generator=g).double()
    pidx, tok, sc = beam_level(parents.float(), lp.float(), width)
    pairs = sorted((-(parents[i] + lp[i, j]).item(), i * V + j) for i in range(n) for j in range(V))[:width]
    assert [int(p) * V + int(t) for p, t in zip(pidx, tok)] == [f for _, f in pairs]
    assert sc.tolist() == [-s for s, _ in pairs]
