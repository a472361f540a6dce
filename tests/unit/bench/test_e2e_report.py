"""bench/e2e.py's tree-against-chain table, checked against the raw counts a run accumulates."""

import pytest

from longspec_lab.bench.e2e import _depth, format_tree_against_chains, tree_against_chains

# name: (tokens, seconds, target passes) as run_bench accumulates them
RAW = {
    "ar": (1000, 0.125, 1000),
    "chain-g5": (1000, 0.070, 200),
    "chain-g7": (1000, 0.062, 160),
    "tree-4-16-16-16-16": (1000, 0.072, 170),
    "tree-1-2-3-4-2-1-3": (1000, 0.058, 144),
    "tree-1-2-3-3-3-2-2-2-2": (1000, 0.057, 120),
    "hf-greedy": (1000, 9.0, None),
}


def _results():
    out = {}
    for name, (tokens, seconds, passes) in RAW.items():
        out[name] = {"tokens_per_s": tokens / seconds}
        if passes is not None:
            out[name]["tau"] = tokens / passes
    return out


def _step(name):  # seconds a target pass, straight from the counts
    tokens, seconds, passes = RAW[name]
    return seconds / passes


def test_each_tree_is_set_against_the_chain_of_its_depth_and_the_fastest_chain():
    table = tree_against_chains(_results())
    assert table["best_chain"] == "chain-g7"  # 1000 / 0.062 s beats 1000 / 0.070 s
    best_tps = RAW["chain-g7"][0] / RAW["chain-g7"][1]
    t = table["trees"]["tree-4-16-16-16-16"]
    assert t["depth"] == 5 and t["chain"] == "chain-g5"
    assert t["step_us"] == pytest.approx(_step("tree-4-16-16-16-16") * 1e6)
    assert t["step_ratio"] == pytest.approx(_step("tree-4-16-16-16-16") / _step("chain-g5"))
    assert t["tau_ratio"] == pytest.approx((1000 / 170) / (1000 / 200))
    # the tree's tokens a pass at the chain's time a pass
    assert t["at_chain_cost_tokens_per_s"] == pytest.approx((1000 / 170) / _step("chain-g5"))
    assert t["at_chain_cost_vs_best_chain"] == pytest.approx((1000 / 170) / _step("chain-g5") / best_tps)
    assert t["vs_best_chain"] == pytest.approx((1000 / 0.072) / best_tps)
    # speed = tau / step, so the ceiling is the measured ratio divided by the step ratio
    assert t["at_chain_cost_vs_best_chain"] == pytest.approx(t["vs_best_chain"] * t["step_ratio"])


def test_a_tree_without_a_chain_of_its_depth_gets_no_ceiling():
    t = tree_against_chains(_results())["trees"]["tree-1-2-3-3-3-2-2-2-2"]
    assert t["depth"] == 9 and t["chain"] is None
    assert "tau_ratio" not in t and "at_chain_cost_vs_best_chain" not in t
    assert t["vs_best_chain"] == pytest.approx((1000 / 0.057) / (1000 / 0.062))


def test_rows_that_are_not_our_chains_or_trees_are_left_out():
    table = tree_against_chains(_results())
    assert set(table["trees"]) == {"tree-4-16-16-16-16", "tree-1-2-3-4-2-1-3", "tree-1-2-3-3-3-2-2-2-2"}
    assert _depth("ar") is None and _depth("hf-greedy") is None and _depth("tree-4-16-sdpa") is None
    assert _depth("chain-g12") == 12 and _depth("tree-2-4-8") == 3


def test_a_run_without_chains_has_no_best_chain_and_prints():
    res = {k: v for k, v in _results().items() if not k.startswith("chain-")}
    table = tree_against_chains(res)
    assert table["best_chain"] is None
    assert all(t["vs_best_chain"] is None and t["chain"] is None for t in table["trees"].values())
    lines = format_tree_against_chains(table)
    assert len(lines) == 1 + 3 and "best chain: None" in lines[0]


def test_the_printed_table_has_a_line_per_tree_with_its_ceiling():
    lines = format_tree_against_chains(tree_against_chains(_results()))
    line = next(x for x in lines if "tree-1-2-3-4-2-1-3" in x)
    assert "vs chain-g7" in line and "at its cost" in line
