"""Tests for greedy acceptance (longspec_lab.spec.verify.accept_greedy) against brute force, and losslessness."""

import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longspec_lab.spec.draft import grow_beam_tree
from longspec_lab.spec.tree import DraftTree, chain_tree
from longspec_lab.spec.verify import accept_greedy

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def trees_and_targets(draw):
    """A level-ordered random tree over a tiny vocab, and target predictions, some built to agree."""
    vocab = draw(st.integers(2, 4))
    widths = draw(st.lists(st.integers(1, 4), min_size=0, max_size=5))
    parents, tokens, prev = [-1], [draw(st.integers(0, vocab - 1))], [0]
    for w in widths:
        level = []
        for _ in range(w):
            parents.append(draw(st.sampled_from(prev)))
            tokens.append(draw(st.integers(0, vocab - 1)))
            level.append(len(parents) - 1)
        prev = level
    n = len(parents)
    target = [draw(st.integers(0, vocab - 1)) for _ in range(n)]
    chosen = draw(st.integers(0, n - 1))
    if draw(st.booleans()):  # make the target agree with the draft along root..chosen
        j = chosen
        while parents[j] >= 0:
            target[parents[j]] = tokens[j]
            j = parents[j]
    return tokens, parents, target, chosen


def brute_accept(tokens, parents, target):
    """Enumerate all root-to-node paths; keep the longest fully verified one (ties: lowest node id)."""
    best = None
    for i in range(len(tokens)):
        path = [i]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path.reverse()
        ok = all(tokens[path[k]] == target[path[k - 1]] for k in range(1, len(path)))
        if ok and (best is None or len(path) > len(best)):
            best = path
    verified = [True] + [tokens[i] == target[parents[i]] for i in range(1, len(tokens))]
    accepted = []
    for i in range(len(tokens)):
        j, a = i, True
        while j >= 0:
            a &= verified[j]
            j = parents[j]
        accepted.append(a)
    return best, [target[i] for i in best], verified, accepted


@SETTINGS
@given(trees_and_targets())
def test_accept_greedy_matches_brute_force(case):
    tokens, parents, target, chosen = case
    tree = DraftTree.from_parents(tokens, parents)
    r = accept_greedy(tree, torch.tensor(target))
    path, emitted, verified, accepted = brute_accept(tokens, parents, target)
    assert r.path.tolist() == path and r.winner == path[-1]
    assert r.emitted.tolist() == emitted
    assert r.verified.tolist() == verified and r.accepted.tolist() == accepted
    assert r.accept_length == len(path) == int(tree.depths[r.winner]) + 1
    assert r.num_draft_accepted == r.accept_length - 1
    # the emitted draft part repeats the tree's tokens along the path; the last one is the bonus
    assert r.emitted[:-1].tolist() == [tokens[i] for i in path[1:]]
    assert r.emitted[-1].item() == target[path[-1]]


def test_accept_greedy_full_and_empty_acceptance():
    # chain root=5 -> 1 -> 2 -> 3; target agrees all the way and adds bonus 4
    tree = chain_tree(5, [1, 2, 3])
    r = accept_greedy(tree, torch.tensor([1, 2, 3, 4]))
    assert r.path.tolist() == [0, 1, 2, 3] and r.emitted.tolist() == [1, 2, 3, 4] and r.accept_length == 4
    r = accept_greedy(tree, torch.tensor([0, 2, 3, 4]))  # first draft token wrong: only the root's prediction
    assert r.path.tolist() == [0] and r.emitted.tolist() == [0] and r.accept_length == 1
    assert r.verified.tolist() == [True, False, True, True]
    assert r.accepted.tolist() == [True, False, False, False]
    r = accept_greedy(chain_tree(5, []), torch.tensor([7]))  # root-only tree = plain decoding
    assert r.emitted.tolist() == [7]


def test_accept_greedy_tie_goes_to_lowest_index():
    # root -> {1: tok 3, 2: tok 3}; both verified at depth 1, node 1 (better beam) must win
    tree = DraftTree.from_parents([0, 3, 3], [-1, 0, 0])
    r = accept_greedy(tree, torch.tensor([3, 8, 9]))
    assert r.path.tolist() == [0, 1] and r.emitted.tolist() == [3, 8]


def test_accept_greedy_input_errors():
    tree = chain_tree(5, [1, 2])
    with pytest.raises(ValueError, match=r"\[N\] = \[3\]"):
        accept_greedy(tree, torch.tensor([[1, 2, 3]]))
    with pytest.raises(TypeError, match="argmax"):
        accept_greedy(tree, torch.randn(3, 10))


# ----------------------------------------------------------------------------- losslessness

VOCAB = 6


def target_next(seq):
    """A deterministic toy 'target model': next token from a hash of the last three tokens."""
    return zlib.crc32(repr(tuple(seq[-3:])).encode()) % VOCAB


def greedy_decode(prompt, n):
    seq = list(prompt)
    while len(seq) < len(prompt) + n:
        seq.append(target_next(seq))
    return seq


def draft_logprobs(seq, hit_rate, g):
    """A noisy draft: with probability hit_rate it favours the target's token, else random scores."""
    lp = torch.randn(VOCAB, generator=g, dtype=torch.float64)
    if torch.rand((), generator=g) < hit_rate:
        lp[target_next(seq)] += 5.0
    return torch.log_softmax(lp, -1)


def tree_decode(prompt, n, widths, hit_rate, seed):
    """Speculative decoding with random beam trees and greedy acceptance; returns (seq, target passes)."""
    g = torch.Generator().manual_seed(seed)
    seq, passes = list(prompt), 0
    while len(seq) < len(prompt) + n:

        def level_logprobs(partial, node_ids):
            return torch.stack([draft_logprobs(seq + partial.path_tokens(int(i))[1:], hit_rate, g) for i in node_ids])

        tree = grow_beam_tree(seq[-1], widths, level_logprobs)
        # "one target pass": the target's next token after every node's path
        target = torch.tensor([target_next(seq + tree.path_tokens(i)[1:]) for i in range(tree.num_nodes)])
        seq += accept_greedy(tree, target).emitted.tolist()
        passes += 1
    return seq[: len(prompt) + n], passes


@pytest.mark.parametrize(
    "widths, hit_rate", [([1, 1, 1, 1], 0.8), ([3, 4, 4], 0.6), ([2, 2, 2, 2, 2], 0.3), ([4], 0.0)]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_decoding_is_lossless(widths, hit_rate, seed):
    prompt = [seed % VOCAB, 1, 2]
    n = 60
    seq, passes = tree_decode(prompt, n, widths, hit_rate, seed)
    assert seq == greedy_decode(prompt, n)
    if hit_rate >= 0.6:  # a useful draft must actually save target passes (otherwise the test is vacuous)
        assert passes < n


def _draw_tree_and_path(data):
    """A random tree (levels of 1-4 nodes, each parent drawn from the level above, so siblings need not be
    adjacent) and the path root .. a random node: (widths, parents, depths, path) as lists."""
    widths = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    parents, prev = [-1], [0]
    for w in widths:
        level = [len(parents) + i for i in range(w)]
        parents += [data.draw(st.sampled_from(prev)) for _ in range(w)]
        prev = level
    depths = [0] * len(parents)
    for i in range(1, len(parents)):
        depths[i] = depths[parents[i]] + 1
    path = [data.draw(st.integers(0, len(parents) - 1))]
    while path[-1] != 0:
        path.append(parents[path[-1]])
    return widths, parents, depths, path[::-1]


@SETTINGS
@given(st.data())
def test_acceptance_stats_equal_brute_force_counts(data):
    """acceptance_stats (one-hot sums on static buffers) against counting node by node in Python."""
    from longspec_lab.spec.verify import acceptance_stats

    widths, parents, depths, path = _draw_tree_and_path(data)
    N, D, R = len(parents), len(widths), max(widths)
    n = len(path)
    tried = [data.draw(st.booleans()) for _ in range(N)]
    ranks = [sum(parents[j] == parents[i] for j in range(i)) for i in range(N)]
    ranks[0] = 0
    want_d_tried = [int(any(tried[i] and depths[i] == d for i in range(N))) for d in range(1, D + 1)]
    want_reached = [int(d + 1 < n) for d in range(D)]
    want_r_tried = [sum(tried[i] for i in range(1, N) if ranks[i] == r) for r in range(R)]
    want_r_acc = [sum(1 for j in range(1, n) if ranks[path[j]] == r) for r in range(R)]
    padded = path + [path[-1]] * (D + 1 - n)
    got = acceptance_stats(
        torch.tensor(parents), torch.tensor(depths), torch.tensor(padded), torch.tensor([n]), torch.tensor(tried), D, R
    )
    assert got.tolist() == want_d_tried + want_reached + want_r_tried + want_r_acc


@SETTINGS
@given(st.data())
def test_path_children_equal_the_children_of_the_path_set(data):
    """path_children (a gather by depth) against the definition: nodes whose parent is one of the path's nodes."""
    from longspec_lab.spec.verify import path_children

    widths, parents, depths, path = _draw_tree_and_path(data)
    padded = path + [path[-1]] * (len(widths) + 1 - len(path))
    got = path_children(torch.tensor(parents), torch.tensor(depths), torch.tensor(padded))
    assert got.tolist() == [p >= 0 and p in path for p in parents]
