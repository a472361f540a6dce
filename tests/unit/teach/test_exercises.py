"""Every exercise checker passes the solution and fails a wrong answer (and a malformed one)."""

import itertools

import numpy as np
import pytest
import torch

from longspec_lab.teach import cost, exercises, paper_figures
from longspec_lab.teach.setup import load_result


def test_rows_budget():
    m, hw = cost.ModelCost.llama3_8b(), cost.Hardware.h200()
    one = cost.pass_seconds(m, hw, 1, 32768)
    solution = max(r for r in range(1, 4096) if cost.pass_seconds(m, hw, r, 32768) <= 1.5 * one)
    assert exercises.check_rows_budget(solution)
    assert not exercises.check_rows_budget(72)
    assert not exercises.check_rows_budget(solution * 2)
    bad = exercises.check_rows_budget("many")
    assert not bad and "number" in bad.message
    assert 'data-ok="true"' in exercises.check_rows_budget(solution)._repr_html_()


def test_lse_merge():
    assert exercises.check_lse_merge(lambda parts: paper_figures.lse_merge(parts)[0])
    assert not exercises.check_lse_merge(lambda parts: sum(o for o, _ in parts) / len(parts))
    naive = lambda parts: (
        sum(torch.exp(l)[:, None] * o for o, l in parts) / sum(torch.exp(l) for _, l in parts)[:, None]
    )
    assert exercises.check_lse_merge(naive)  # exact in float64 at these scores: the formula is right
    failing = exercises.check_lse_merge(lambda parts: 1 / 0)
    assert not failing and "ZeroDivisionError" in failing.message
    assert not exercises.check_lse_merge("not a function")


def test_anchor_positions():
    assert exercises.check_anchor_positions(lambda T, k, off: [i if i < k else i + off for i in range(T)])
    assert exercises.check_anchor_positions(
        lambda T, k, off: torch.arange(T) + torch.where(torch.arange(T) >= k, off, 0)
    )
    wrong = exercises.check_anchor_positions(lambda T, k, off: [i + off for i in range(T)])
    assert not wrong and "index 0" in wrong.message
    assert not exercises.check_anchor_positions(lambda T, k, off: [i if i <= k else i + off for i in range(T)])


def _forgets_residual(p, q, children, rng):
    for x in children:
        if rng.random() < min(1.0, p[x] / q[x]):
            return x
    return int(rng.choice(len(p), p=p))


def test_rrs_level():
    assert exercises.check_rrs_level(exercises.rrs_reference, n=6000)
    wrong = exercises.check_rrs_level(_forgets_residual, n=6000)
    assert not wrong and "after a rejection" in wrong.message
    assert not exercises.check_rrs_level(lambda p, q, c, rng: 99, n=10)


def test_rrs_steps_is_exact_by_enumeration():
    """Summed over every ordered triple of children drawn from q without replacement, the token RRS
    emits has exactly the target's distribution p."""
    rng = np.random.default_rng(3)
    V = 5
    p, q = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
    out = np.zeros(V)
    for kids in itertools.permutations(range(V), 3):
        pr, left = 1.0, q.copy()
        for x in kids:  # probability of drawing this ordered triple without replacement
            pr *= left[x] / left.sum()
            left[x] = 0
        steps = paper_figures.rrs_steps(p, q, kids)
        assert sum(s["ends_here"] for s in steps) == pytest.approx(1.0)
        for s in steps[:-1]:
            out[s["child"]] += pr * s["ends_here"]
        out += pr * steps[-1]["ends_here"] * steps[-1]["p"]
    assert np.abs(out - p).max() < 1e-12


def test_projected_speedups():
    v8 = load_result("verify_8b_h200")
    solution = lambda rows, tau: [
        tau
        * r["triton_decode_graph_ms"]
        / (r["draft_step_graph_ms"] + r["triton_verify_graph_ms"] + r["commit_graph_ms"])
        for r in rows
    ]
    assert exercises.check_projected_speedups(solution, v8, tau=4.0)
    no_draft = lambda rows, tau: [tau * r["triton_decode_graph_ms"] / r["triton_verify_graph_ms"] for r in rows]
    assert not exercises.check_projected_speedups(no_draft, v8, tau=4.0)
    assert not exercises.check_projected_speedups(lambda rows, tau: [1.0], v8)


def _step():
    from longspec_lab.spec.trace import StepRecord
    from longspec_lab.spec.tree import DraftTree
    from longspec_lab.spec.verify import accept_greedy

    # root 0 -> children 1 (tok 5), 2 (tok 6); 1 -> 3 (tok 7), 4 (tok 8); 2 -> 5 (tok 7)
    tree = DraftTree.from_parents([9, 5, 6, 7, 8, 7], [-1, 0, 0, 1, 1, 2])
    target = torch.tensor([5, 8, 7, 1, 2, 3])  # after root: 5 (node 1), after node 1: 8 (node 4)
    res = accept_greedy(tree, target)
    return StepRecord(0, 10, tree, target, res, res.emitted.tolist())


def test_accepted_node():
    st = _step()
    assert st.result.path.tolist() == [0, 1, 4]
    assert exercises.check_accepted_node(st, 4)
    assert "not the deepest" in exercises.check_accepted_node(st, 1).message
    wrong = exercises.check_accepted_node(st, 3)
    assert not wrong and "node #3" in wrong.message
    assert not exercises.check_accepted_node(st, 17)


class _FakeDecoder:
    """tau = depth of the shape: deeper trees 'win' (a stand-in for the real check in the notebook tests)."""

    def generate(self, ids, method, tree_shape, max_new_tokens, stop_at_eos):
        return type("R", (), {"tau": float(len(tree_shape))})()


def test_small_shape_rules():
    d = _FakeDecoder()
    assert exercises.check_small_shape([2, 2, 4, 4, 4, 4, 4, 4, 4, 4], d, [1, 2], 8)  # 37 nodes, depth 10 > 5
    assert not exercises.check_small_shape([4, 8, 8], d, [1, 2], 8)
    big = exercises.check_small_shape([8, 8, 8, 8, 8, 8], d, [1, 2], 8)
    assert not big and "49 nodes" in big.message
    assert not exercises.check_small_shape("[2, x]", d, [1, 2], 8)
    assert exercises.parse_shape("2 4 8") == exercises.parse_shape("[2, 4, 8]") == [2, 4, 8]
