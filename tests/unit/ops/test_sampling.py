"""sampling.py against transformers' warpers; validation; the samplers; sampled trees; the rule registry."""

import math
import zlib

import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from longspec_lab.ops.sampling import (
    SamplingParams,
    gumbel_topk,
    make_generator,
    probs_from_logits,
    sample_categorical,
    warp_logits,
)
from longspec_lab.spec.draft import (
    allocate_children,
    grow_beam_tree,
    grow_sampled_tree,
    sampled_parents,
)
from longspec_lab.spec.tree import DraftTree, TreeBatch
from longspec_lab.spec.verify import (
    VERIFY_RULES,
    acceptance_counts,
    sibling_ranks,
    verify_batch,
    verify_chain,
    verify_rrs,
)


def hf_warp(logits, t, k, p):
    """The warpers in the order generate(do_sample=True) builds them (temperature, top-k, top-p)."""
    procs = LogitsProcessorList()
    if t != 1.0:
        procs.append(TemperatureLogitsWarper(t))
    if k is not None:
        procs.append(TopKLogitsWarper(k))
    if p is not None and p < 1.0:
        procs.append(TopPLogitsWarper(p))
    return procs(torch.zeros(logits.shape[0], 1, dtype=torch.long), logits.clone())


@pytest.mark.parametrize(
    "t,k,p",
    [
        (1.0, None, None),
        (0.7, None, None),
        (1.3, 5, None),
        (0.9, None, 0.8),
        (0.6, 20, 0.9),
        (2.0, 1, 0.5),
        (1.0, 50, 0.95),
        (0.8, 3, 1.0),
    ],
)
def test_warpers_match_transformers(t, k, p):
    g = torch.Generator().manual_seed(zlib.crc32(repr((t, k, p)).encode()))
    logits = 3 * torch.randn(16, 40, generator=g)
    ours, ref = warp_logits(logits, SamplingParams(t, k, p)), hf_warp(logits, t, k, p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours, ref)
    assert torch.allclose(probs_from_logits(logits, SamplingParams(t, k, p)), torch.softmax(ref, -1))
    if k is not None:
        assert bool(((~torch.isinf(ours)).sum(-1) <= k).all())


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    assert torch.equal(warp_logits(logits, SamplingParams(1.0, 2)), hf_warp(logits, 1.0, 2, None))


def test_log_probs_give_the_same_distribution():
    logits = 4 * torch.randn(8, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = SamplingParams(0.8, 10, 0.9)
    assert torch.allclose(probs_from_logits(logits, params), probs_from_logits(logits.log_softmax(-1), params))


def test_temperature_zero_is_one_hot_argmax():
    logits = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    p = probs_from_logits(logits, SamplingParams(0.0, 3, 0.5))
    assert torch.equal(p.argmax(-1), logits.argmax(-1)) and torch.equal(p.sum(-1), torch.ones(5))
    assert torch.equal(sample_categorical(p, make_generator(0)), logits.argmax(-1))


@pytest.mark.parametrize(
    "kw,words",
    [
        ({"temperature": -0.5}, ["temperature", "negative", "e.g."]),
        ({"temperature": float("nan")}, ["temperature", "finite"]),
        ({"temperature": float("inf")}, ["temperature", "finite"]),
        ({"temperature": "hot"}, ["temperature", "not a number"]),
        ({"temperature": 1.0, "top_p": 0.0}, ["top_p", "(0, 1]", "None"]),
        ({"temperature": 1.0, "top_p": 1.5}, ["top_p", "(0, 1]"]),
        ({"temperature": 1.0, "top_p": float("nan")}, ["top_p"]),
        ({"temperature": 1.0, "top_k": 0}, ["top_k", ">= 1", "None"]),
        ({"temperature": 1.0, "top_k": -3}, ["top_k"]),
        ({"temperature": 1.0, "top_k": 2.5}, ["top_k", "integer"]),
        ({"temperature": 1.0, "top_k": True}, ["top_k"]),
    ],
)
def test_bad_settings_raise_naming_the_fix(kw, words):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    for w in words:
        assert w in str(e.value)


def test_sample_categorical_frequencies_and_zero_mass():
    p = torch.tensor([0.0, 0.1, 0.0, 0.4, 0.2, 0.3, 0.0], dtype=torch.float64)
    x = sample_categorical(p.expand(40_000, -1), make_generator(0))
    counts = np.bincount(x.numpy(), minlength=7)
    assert counts[p.numpy() == 0].sum() == 0
    assert stats.chisquare(counts[p.numpy() > 0], 40_000 * p.numpy()[p.numpy() > 0]).pvalue > 1e-3
    # the same seed reproduces, another seed does not
    assert torch.equal(x, sample_categorical(p.expand(40_000, -1), make_generator(0)))
    assert not torch.equal(x, sample_categorical(p.expand(40_000, -1), make_generator(1)))


def test_gumbel_topk_is_ordered_sampling_without_replacement():
    q = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    n = 40_000
    pairs = gumbel_topk(q.expand(n, -1), 2, make_generator(0))
    assert bool((pairs[:, 0] != pairs[:, 1]).all())
    exact = torch.tensor(
        [[0.0 if a == b else float(q[a] * q[b] / (1 - q[a])) for b in range(5)] for a in range(5)], dtype=torch.float64
    )
    obs = np.bincount((pairs[:, 0] * 5 + pairs[:, 1]).numpy(), minlength=25)
    keep = exact.flatten().numpy() > 0
    assert obs[~keep].sum() == 0
    e = exact.flatten().numpy()[keep]
    assert stats.chisquare(obs[keep], n * e / e.sum()).pvalue > 1e-3


def test_gumbel_topk_pads_with_zero_mass_tokens():
    q = torch.tensor([[0.0, 0.7, 0.0, 0.3, 0.0]])
    for seed in range(20):
        t = gumbel_topk(q, 4, make_generator(seed))[0].tolist()
        assert sorted(t[:2]) == [1, 3] and len(set(t)) == 4


def test_allocation_is_round_robin_and_fixed_by_the_shape():
    assert allocate_children(1, 4) == [4]
    assert allocate_children(4, 16) == [4, 4, 4, 4]
    assert allocate_children(3, 4) == [2, 1, 1]
    assert allocate_children(4, 2) == [1, 1, 0, 0]
    par = sampled_parents([3, 4, 2])
    assert par.tolist() == [-1, 0, 0, 0, 1, 1, 2, 3, 4, 5]
    tree = DraftTree.from_parents(torch.zeros(10, dtype=torch.long), par)
    assert tree.shape.widths == (3, 4, 2)


def _table_draft(V=12, seed=0):
    table = torch.randn(64, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def level_logprobs(partial, node_ids):  # depends on the node's whole path
        rows = [sum(partial.path_tokens(int(i))) * 7 % 64 for i in node_ids]
        return torch.log_softmax(table[rows], -1)

    return level_logprobs


def test_sampled_tree_records_q_and_distinct_children():
    lp = _table_draft()
    params = SamplingParams(0.9, 6)
    tree = grow_sampled_tree(5, [3, 4, 2], lp, params, make_generator(0))
    q = tree.q
    assert tree.drafting == "sampled"
    assert tree.parents.tolist() == sampled_parents([3, 4, 2]).tolist()
    off = tree.shape.level_offsets
    for node in range(off[-2]):  # every expanded node: q is the processed draft distribution there
        assert torch.allclose(q[node], probs_from_logits(lp(tree, torch.tensor([node])), params)[0])
        kids = tree.children(node)
        assert len(set(tree.tokens[kids].tolist())) == len(kids)
    assert bool((q[off[-2] :] == 0).all())
    for i in range(1, tree.num_nodes):  # scores = cumulative log q
        want = tree.scores[int(tree.parents[i])] + torch.log(q[int(tree.parents[i]), tree.tokens[i]])
        assert math.isclose(float(tree.scores[i]), float(want), rel_tol=1e-5)  # float32 scores


def test_beam_tree_q_is_the_beam_tree():
    lp = _table_draft()
    tree = grow_beam_tree(2, [3, 3], lp, params=SamplingParams(1.2))
    q = tree.q
    ref = grow_beam_tree(2, [3, 3], lp)
    assert torch.equal(tree.tokens, ref.tokens) and torch.equal(tree.parents, ref.parents)
    assert torch.allclose(q[0], probs_from_logits(lp(tree, torch.tensor([0])), SamplingParams(1.2))[0])


def test_registry_and_rule_errors():
    assert list(VERIFY_RULES) == ["greedy", "target-sample", "rrs", "chain", "naive-topk"]
    from longspec_lab.cli import VERIFY_CHOICES

    assert tuple(VERIFY_RULES) == VERIFY_CHOICES
    tree = grow_sampled_tree(1, [2, 2], _table_draft(), SamplingParams(1.0), make_generator(0))
    q = tree.q
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(tree.num_nodes, 12, dtype=torch.float64, generator=g), -1)
    with pytest.raises(ValueError, match="chain"):
        verify_chain(tree, p, q, make_generator(0))
    beam = grow_beam_tree(1, [2, 2], _table_draft())
    with pytest.raises(ValueError, match="draft distribution q"):  # a beam tree keeps no q
        verify_rrs(beam, p, None, make_generator(0))
    with pytest.raises(ValueError, match="drafted by 'beam'"):  # rrs on beam siblings would be biased
        verify_rrs(beam, p, q, make_generator(0))
    with pytest.raises(ValueError, match="look like logits"):  # logits where probabilities are needed
        verify_rrs(tree, torch.log(p), None, make_generator(0))
    with pytest.raises(ValueError, match="look like logits"):
        VERIFY_RULES["target-sample"](tree, torch.log(p) * 3, None, make_generator(0))
    assert verify_rrs(tree, p, None, make_generator(0)).accept_length >= 1  # q taken from tree.q
    with pytest.raises(ValueError, match="unknown"):
        verify_batch("nucleus", TreeBatch.of(tree), p[None], q[None])


def test_rule_results_are_consistent_and_reproducible():
    tree = grow_sampled_tree(1, [3, 2, 2], _table_draft(), SamplingParams(1.0), make_generator(0))
    beam = grow_beam_tree(1, [3, 2, 2], _table_draft(), params=SamplingParams(1.0))
    q = tree.q
    noise = torch.softmax(
        torch.randn(tree.num_nodes, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), -1
    )
    p = 0.6 * q + 0.4 * noise + 0.6 * noise * (q.sum(-1, keepdim=True) == 0)  # near the draft, leaves random
    for rule in ("target-sample", "rrs", "naive-topk"):
        lengths = set()
        t, pr = (beam, 0.6 * beam.q + 0.4 * noise + 0.6 * noise * (beam.q.sum(-1, keepdim=True) == 0)) if (
            rule == "naive-topk") else (tree, p)  # fmt: skip
        for seed in range(30):
            one = VERIFY_RULES[rule](t, pr, None, make_generator(seed))
            again = VERIFY_RULES[rule](t, pr, None, make_generator(seed))
            assert one.emitted.tolist() == again.emitted.tolist()
            path = one.path.tolist()
            assert path[0] == 0 and one.accept_length == len(path) == one.emitted.numel()
            assert all(int(t.parents[b]) == a for a, b in zip(path[:-1], path[1:]))
            assert t.tokens[path[1:]].tolist() == one.emitted[:-1].tolist()
            assert bool(one.tried[path[1:]].all()) and one.accepted.sum() == len(path)
            lengths.add(len(path))
        assert len(lengths) > 1  # the walk does go down the tree sometimes, and stops early sometimes


def test_acceptance_counts_brute_force():
    # root 0 -> 1, 2 ; 1 -> 3, 4 ; 2 -> 5   target predicts token 7 at root, 9 at node 1, 4 at node 4
    tree = DraftTree.from_parents([0, 8, 7, 5, 9, 6], [-1, 0, 0, 1, 1, 2])
    assert sibling_ranks(tree.parents).tolist() == [0, 0, 1, 0, 1, 0]
    res = VERIFY_RULES["greedy"](tree, torch.nn.functional.one_hot(torch.tensor([7, 9, 4, 0, 4, 0]), 10).float())
    assert res.path.tolist() == [0, 2]
    c = acceptance_counts(tree, res)
    # depth 1: tried (root's children), accepted (node 2); depth 2: node 2's child 5 tried, rejected
    # ranks 0..2 (the widest level has 3 nodes)
    assert c == {"depth_tried": [1, 1], "depth_accepted": [1, 0], "rank_tried": [2, 1, 0], "rank_accepted": [0, 1, 0]}
