"""The cost model against the recorded H200 run's own floors and projections, repeated timings, and
one palette colour per method / rule / stage in every figure that draws them."""

import itertools

import pytest
import torch

from longspec_lab.teach import cost, palette, viz_results
from longspec_lab.teach.setup import load_result


@pytest.fixture(scope="module")
def v8():
    return load_result("verify_8b_h200")


@pytest.fixture(scope="module", params=["verify_8b_h200", "verify_8b_h100"])
def any_v8(request):
    return load_result(request.param)


def test_bytes_match_the_recorded_floors():
    """The run whose floor reads the input embedding table a row per token, as the cost model does (the H200
    record's floor counted the whole table: 1.05 GB more)."""
    v8 = load_result("verify_8b_h100")
    m = cost.ModelCost.llama3_8b()
    assert m.kv_bytes_per_token == v8["kv_bytes_per_token"]
    assert m.params * m.bytes_per_param == pytest.approx(v8["weight_bytes"], rel=2e-3)
    bw = v8["copy_bandwidth_TBps"] * 1e12
    for r in v8["rows"]:  # decode floor = (weights + KV of the context) / copy bandwidth
        assert 1e3 * cost.pass_bytes(m, 1, r["context"]) / bw == pytest.approx(r["floor_decode_ms"], rel=3e-3)


def test_recorded_points_sit_between_the_two_bounds(v8):
    m, hw = cost.ModelCost.llama3_8b(), cost.Hardware.h200()
    for p in cost.recorded_ratio_points(v8):
        c = cost.ratio_curve(m, hw, v8["verify_rows"], [p["context"]])
        assert c["floor"][0] <= p["ratio"] <= c["no_overlap"][0], (p, c)


def test_ratio_bounds_and_ridge_by_brute_force():
    m, hw = cost.ModelCost.llama3_8b(), cost.Hardware.h200()
    c = cost.ratio_curve(m, hw, 72, [1024, 8192, 65536, 131072])
    assert all(1 <= a <= b for a, b in zip(c["floor"], c["no_overlap"]))
    assert c["no_overlap"] == sorted(c["no_overlap"])  # the rows' attention arithmetic grows with context
    for L in (0, 4096, 131072):
        ridge = cost.ridge_rows(m, hw, L)
        compute = [
            r for r in range(1, 600) if cost.pass_flops(m, r, L) / hw.flops >= cost.pass_bytes(m, r, L) / hw.bandwidth
        ]
        assert ridge == compute[0]
    with pytest.raises(ValueError, match="rows"):
        cost.pass_seconds(m, hw, 0, 10)


def test_speedup_terms_reproduce_the_recorded_projection(any_v8):
    """Each step in its fastest recorded form, as the benchmark's own projection takes it: the H100 runs compiled
    their decode and verify (and the later one its draft step), the H200 record only captured them."""
    compiled = 0
    for t, r in zip(cost.speedup_terms(any_v8, 5.0), any_v8["rows"]):
        assert t["speedup"] == pytest.approx(r["triton_projected_speedup"], rel=1e-9)
        forms = {"compiled + CUDA graph": "triton_verify_compiled_ms", "CUDA graph": "triton_verify_graph_ms",
                 "eager": "triton_verify_ms"}  # fmt: skip
        verify, form = min((r[k], f) for f, k in forms.items() if k in r)
        compiled += forms["compiled + CUDA graph"] in r
        draft = min(r[k] for k in ("draft_step_graph_ms", "draft_step_compiled_ms") if k in r)
        assert (t["draft"] + t["verify"] + t["commit"]) * 5.0 == pytest.approx(draft + verify + r["commit_graph_ms"])
        assert cost.step_ms(r, "draft")[0] == draft
        assert cost.step_ms(r, "verify") == (verify, form)
    assert compiled in (0, len(any_v8["rows"]))
    with pytest.raises(ValueError, match="tau"):
        cost.speedup_terms(any_v8, 0.5)
    with pytest.raises(ValueError, match="no triton_verify timing"):
        cost.step_ms({"context": 1}, "verify")


def test_repeat_keeps_every_run_and_the_median():
    calls = itertools.count()
    out = cost.repeat(lambda: next(calls), n=5, warmup=2)
    assert next(calls) == 7 and len(out["runs"]) == 5
    assert out["min"] <= out["median"] <= out["max"] and sorted(out["runs"])[2] == out["median"]


def test_one_colour_per_method_rule_and_stage():
    for names in (["ar", "chain", "tree", "hf-greedy", "hf-prompt-lookup"], list(palette.RULE), list(palette.STAGE)):
        table = {**palette.METHOD, **palette.RULE} if names[0] == "ar" or names[0] == "greedy" else palette.STAGE
        cols = [table[n] for n in names]
        assert len(set(cols)) == len(cols), names
    assert palette.method_color("chain (γ = 4)") == palette.method_color("chain-g5") == palette.METHOD["chain"]
    assert palette.method_color("tree [4,16,16,16,16]") == palette.method_color("tree-4-8-8") == palette.METHOD["tree"]
    assert palette.method_color("tree-4-16-sdpa") == palette.METHOD["tree-sdpa"]
    assert palette.method_color("hf-prompt-lookup") != palette.method_color("hf-greedy")
    with pytest.raises(ValueError, match="no palette colour"):
        palette.method_color("beam-search")
    with pytest.raises(ValueError, match="pick one of"):
        palette.rule_color("top-k")


def _fake(method, tau, tps):
    return dict(method=method, tau=tau, tokens_per_s=tps, new_tokens=33, stage_seconds={"draft": 0.1, "verify": 0.2})


def test_figures_take_their_colours_from_the_palette():
    res = {"ar": _fake("ar", 1, 100), "chain (γ = 4)": _fake("chain", 3, 150), "tree [4,16]": _fake("tree", 4, 120)}
    fig = viz_results.tau_figure(res)
    for t in fig.data:
        assert t.marker.color == palette.method_color(t.name)
    stages = viz_results.stage_times_figure(res)
    assert {t.name: t.marker.color for t in stages.data} == {
        s: palette.STAGE[s] for s in ("draft", "verify", "commit", "other")
    }
    bars = viz_results.speed_bars_figure(
        {"hf-greedy": {"tokens_per_s": 10}, "ar": {"tokens_per_s": 50}, "tree-4-16": {"tokens_per_s": 80, "tau": 4}},
        title="Decoding speed on a GPU with a rather long name: embedded pair, 256 new tokens",
        baseline="hf-greedy",
    )
    assert list(bars.data[0].marker.color) == [palette.METHOD[k] for k in ("hf-greedy", "ar", "tree")]
    assert all(len(line) <= 100 for line in bars.layout.title.text.split("<br>"))  # not cut off at 980 px
    rows = [dict(rule=r, temperature=t, tau=2.0, lossless=r != "naive-topk") for r in palette.RULE for t in (0.5, 1.0)]
    tbr = viz_results.tau_by_rule_figure(rows)
    for t in tbr.data:
        assert list(t.marker.color) == [palette.RULE[x] for x in t.x]


def test_declutter_labels_leaves_no_overlap():
    pts = [
        dict(label=lbl, num_nodes=n, tokens_per_s=y)
        for lbl, n, y in [
            ("4·8·8·8", 29, 2402),
            ("2·4·8·8·8·8", 39, 2500),
            ("4·16·16·16·16", 69, 2429),
            ("8·16·32", 57, 2286),
            ("4·16·16·16·16 sdpa", 69, 1795),
            ("chain-g4", 5, 2553),
            ("chain-g5", 6, 2812),
            ("ar", 1, 1776),
        ]
    ]
    fig = viz_results.pareto_figure(pts, x="num_nodes", y="tokens_per_s", label="label", log_x=True)
    fig = viz_results.declutter_labels(fig)
    boxes = viz_results.label_boxes(fig)
    assert len(boxes) == len(pts)
    for a, b in itertools.combinations(boxes, 2):
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert all(t.text is None for t in fig.data)


def test_draft_levels_floor_is_what_the_benchmark_counts():
    """Derived from the goal's floor, the sequential levels' floor equals the bytes bench.verify_cost counts level
    by level (each level: the draft layer, the LM head, one layer of KV) on a small model, and the recorded 8B run's
    draft step sits above it."""
    import dataclasses

    from longspec_lab.bench import verify_cost as vc
    from longspec_lab.models.config import PRESETS

    small = dataclasses.replace(PRESETS["llama3-8b"], vocab_size=96, hidden_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=16, intermediate_size=128)  # fmt: skip
    target = vc.random_target(small, torch.device("cpu"), torch.float32, seed=1)
    cache = target.new_cache(128)
    _, nbytes = vc.draft_levels(target, cache, 50, torch.float32, torch.device("cpu"))
    bw = 2.0  # TB/s
    got = cost.draft_levels_floor_ms(nbytes["floor"] / (bw * 1e12) * 1e3, bw, head_bytes=96 * 64 * 4)
    assert got == pytest.approx(nbytes["levels"] / (bw * 1e12) * 1e3, rel=1e-12)
    p8d = load_result("profile_8b_draft_h100")
    for st in (p8d["draft"][0]["draft"], p8d["draft"][0]["draft_compiled"]):
        levels = cost.draft_levels_floor_ms(st["floor_ms"], p8d["copy_bandwidth_TBps"])
        assert st["floor_ms"] < levels < st["ms"]  # 1.35x the goal's floor at 4k: the compiled step is above it
    with pytest.raises(ValueError, match="levels >= 1"):
        cost.draft_levels_floor_ms(1.0, 2.0, levels=0)
