"""The helpers behind notebooks 04-07: result loading and provenance, shape sweeps, cache growth,
and the figures for kernels, the draft, sampling and GPU runs.

Figures are checked by their data against the inputs (plotted values equal the numbers given, floors
and Pareto points where they belong); the cache measurement against the byte count implied by the
model's shapes; name parsing against hand-written cases.
"""

import json
import math

import numpy as np
import pytest
import torch

from longspec_lab.models.config import PRESETS
from longspec_lab.models.glide import DraftConfig, Glide
from longspec_lab.models.target import Target
from longspec_lab.teach import setup as nb
from longspec_lab.teach import viz_results


def _trace(fig, name):
    return next(t for t in fig.data if t.name == name)


# ----------------------------------------------------------------------------- loading and provenance


def test_load_result_and_provenance(tmp_path):
    rec = {"environment": {"gpu": "G", "torch": "2.x", "date": "d", "command": "c", "noise": 1}, "rows": []}
    (tmp_path / "r.json").write_text(json.dumps(rec))
    got = nb.load_result("r", tmp_path)
    assert got == rec and nb.load_result("r.json", tmp_path) == rec
    prov = nb.provenance(got)
    assert prov == {"gpu": "G", "torch": "2.x", "date": "d", "command": "c"}
    html = nb.provenance_html(got)
    assert all(v in html for v in prov.values()) and "noise" not in html
    with pytest.raises(ValueError, match="pick one of"):
        nb.load_result("missing", tmp_path)
    with pytest.raises(ValueError, match="environment"):
        nb.provenance({"rows": []})
    # top-level command / device complete an environment block that lacks them
    assert nb.provenance({"environment": {"torch": "t"}, "command": "x", "device": "cpu"}) == {
        "device": "cpu",
        "torch": "t",
        "command": "x",
    }


@pytest.mark.parametrize("name", ["tree_attention_h200", "e2e_h200", "tune_h200", "verify_8b_h200", "sampling_tau_cpu"])
def test_recorded_results_carry_provenance(name):
    prov = nb.provenance(nb.load_result(name))
    assert "command" in prov and "torch" in prov


def test_ab_rows_pairs_the_methods_both_runs_have():
    a = {"ar": {"tokens_per_s": 100.0, "stage_us_per_step": {"verify": 10.0}},
         "tree": {"tokens_per_s": 200.0, "stage_us_per_step": {"verify": 30.0, "draft_level": 5.0}},
         "hf": {"tokens_per_s": 9.0}}  # fmt: skip
    b = {"tree": {"tokens_per_s": 300.0, "stage_us_per_step": {"verify": 20.0, "draft_level": 4.0}},
         "ar": {"tokens_per_s": 125.0, "stage_us_per_step": {"verify": 8.0}}}  # fmt: skip
    rows = viz_results.ab_rows(a, b, "off", "on")
    assert [r["method"] for r in rows] == ["ar", "tree"]  # a's order, only the shared methods
    assert rows[0]["on / off"] == 1.25 and rows[1]["on / off"] == 1.5
    assert rows[1]["verify us (off)"] == 30.0 and rows[1]["draft level us (on)"] == 4.0
    assert rows[0]["draft level us (off)"] is None
    with pytest.raises(ValueError, match="share no method"):
        viz_results.ab_rows({"x": a["ar"]}, b)


def test_html_table_formats_and_escapes():
    html = viz_results.html_table(
        [{"a": 1.23456, "b": "<x>"}, {"a": None, "b": "y"}], formats={"a": "{:.2f}"}, title="T"
    )
    assert "1.23" in html and "1.2345" not in html and "&lt;x&gt;" in html and "–" in html and "T" in html
    assert html.count("<tr>") == 3
    with pytest.raises(ValueError, match="no rows"):
        viz_results.html_table([])


# ----------------------------------------------------------------------------- shape sweeps


def test_shape_points_and_stage_results():
    res = {
        "hf-greedy": {"tokens_per_s": 10.0, "tokens": 100, "seconds": 10.0},
        "ar": {
            "tokens_per_s": 50.0,
            "tokens": 100,
            "seconds": 2.0,
            "tau": 1.0,
            "stage_seconds": {"verify": 1.5, "overhead": 0.5},
        },
        "tree-2-4": {
            "tokens_per_s": 100.0,
            "tokens": 100,
            "seconds": 1.0,
            "tau": 4.0,
            "stage_seconds": {"draft": 0.4, "verify": 0.4, "commit": 0.1, "overhead": 0.1},
        },
    }
    pts = {p["label"]: p for p in nb.shape_points(res, "s")}
    assert set(pts) == {"ar", "tree-2-4"}
    assert pts["tree-2-4"]["num_nodes"] == 7 and pts["ar"]["num_nodes"] == 1
    assert math.isclose(pts["tree-2-4"]["step_ms"], 1e3 * 1.0 / (100 / 4.0))  # seconds per target pass
    st = nb.stage_results(res)
    assert set(st) == {"ar", "tree-2-4"}
    fig = viz_results.stage_times_figure(st)
    other = _trace(fig, "other")
    draft = _trace(fig, "draft")
    # ms per new token: stage seconds / tokens; "overhead" is what stage_times_figure calls "other"
    assert np.allclose(list(draft.x), [0.0, 1e3 * 0.4 / 100]) and np.allclose(list(other.x), [5.0, 1.0])
    with pytest.raises(ValueError, match="stage_seconds"):
        nb.stage_results({"hf": {"tokens_per_s": 1.0, "tokens": 1, "seconds": 1.0}})


def test_tune_points():
    tune = {
        "validated": {
            "[4, 8]": {"tokens_per_s": 9.0, "tau": 3.0, "step_seconds": 0.002},
            "[2]": {"tokens_per_s": 5.0, "tau": 2.0, "step_seconds": 0.001},
        },
        "calibration_step_seconds": {"[1]": 0.001, "[16, 32]": 0.003},
    }
    val, cal = nb.tune_points(tune)
    assert [p["num_nodes"] for p in val] == [3, 13] and val[1]["step_ms"] == 2.0
    assert [p["num_nodes"] for p in cal] == [2, 49] and cal[1]["step_ms"] == 3.0


# ----------------------------------------------------------------------------- cache growth


def test_cache_growth_measures_a_constant_draft_cache():
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    target = Target(cfg).eval()
    draft = Glide(DraftConfig.from_target(cfg, window=8), target).eval()
    ids = torch.randint(0, cfg.vocab_size, (40,)).tolist()
    rows = nb.cache_growth(target, draft, ids, [5, 20, 40], max_tree_nodes=7)
    el = target.model.embed_tokens.weight.element_size()
    for r in rows:  # K and V, every layer, every kv head, head_dim values per token
        assert r["target_kv_bytes"] == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * el * r["context"]
    d = draft.config
    assert {r["draft_cache_bytes"] for r in rows} == {2 * d.num_kv_heads * (8 + 7) * d.head_dim * el}
    with pytest.raises(ValueError, match="contexts"):
        nb.cache_growth(target, draft, ids, [41])


# ----------------------------------------------------------------------------- figures


def _cases():
    out = []
    for P in (1024, 4096, 16384):
        out.append(
            dict(
                name="m",
                dtype="fp16",
                P=P,
                T=72,
                Hq=32,
                Hkv=8,
                floor_us=P / 1000,
                compute_floor_us=P / 500,
                methods={
                    "triton_tree": {"us": P / 100, "us_graph": P / 200},
                    "sdpa_dense": {"us": P / 50, "us_graph": P / 60},
                },
            )
        )
    out.append(dict(out[0], dtype="bf16"))
    return out


def test_kernel_timing_figure_plots_the_recorded_numbers():
    cases = _cases()
    fig = viz_results.kernel_timing_figure(cases, "m", "fp16")
    tri = [t for t in fig.data if t.name == viz_results.KERNEL_METHODS["triton_tree"]]
    assert len(tri) == 2  # do_bench and CUDA graph panels
    assert list(tri[0].y) == [c["methods"]["triton_tree"]["us"] for c in cases[:3]]
    assert list(tri[1].y) == [c["methods"]["triton_tree"]["us_graph"] for c in cases[:3]]
    floors = [t for t in fig.data if t.name and t.name.startswith("compute floor")]
    assert list(floors[0].y) == [c["compute_floor_us"] for c in cases[:3]]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    with pytest.raises(ValueError, match="pick one of"):
        viz_results.kernel_timing_figure(cases, "m", "fp8")


def test_glide_diagram_names_the_window_and_shared_parts():
    dot = viz_results.glide_diagram(DraftConfig(window=37), PRESETS["tiny"]).source
    assert "W = 37" in dot and "embed_tokens" in dot and "lm_head" in dot and "-> ca" in dot


def test_anchor_positions_figure_counts_sinks():
    pos = torch.tensor([[0, 1, 50, 51, 52], [10, 11, 12, 13, 14], [0, 1, 2, 3, 4]])
    fig = viz_results.anchor_positions_figure(pos, max_pos=64)
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert names == ["row 0: 2 sink(s), offset 48", "row 1: 0 sink(s), offset 10", "row 2: 5 sink(s), offset 0"]
    assert list(fig.data[0].y) == [0, 1, 50, 51, 52]
    with pytest.raises(ValueError, match="B, T"):
        viz_results.anchor_positions_figure(torch.arange(5))


def test_distribution_figure_and_tau_by_rule():
    exact = [0.5, 0.3, 0.2]
    fig = viz_results.distribution_figure(exact, {"rrs": [0.49, 0.31, 0.2]}, labels=["a", "b", "c"])
    assert list(fig.data[0].y) == exact and list(fig.data[1].y) == [0.49, 0.31, 0.2]
    with pytest.raises(ValueError, match="same length"):
        viz_results.distribution_figure(exact, {"x": [1.0]})
    rows = [
        dict(rule="greedy", temperature=0.0, tau=5.0, lossless=True),
        dict(rule="rrs", temperature=1.0, tau=3.0, lossless=True),
        dict(rule="naive-topk", temperature=1.0, tau=4.0, lossless=False),
    ]
    fig = viz_results.tau_by_rule_figure(rows)
    t1 = _trace(fig, "temperature 1")
    assert list(t1.x) == ["rrs", "naive-topk"] and list(t1.y) == [3.0, 4.0]
    assert list(t1.marker.pattern.shape) == ["", "/"] and "biased" in t1.text[1]


def test_speed_bars_and_verify_decode_figures():
    res = {
        "hf-greedy": {"tokens_per_s": 100.0},
        "ar": {"tokens_per_s": 400.0, "tau": 1.0},
        "tree-4": {"tokens_per_s": 800.0, "tau": 3.0},
    }
    fig = viz_results.speed_bars_figure(res, baseline="hf-greedy")
    assert list(fig.data[0].x) == [100.0, 400.0, 800.0] and fig.data[0].text[2] == "800 · τ 3.00 · 8.0×"
    with pytest.raises(ValueError, match="baseline"):
        viz_results.speed_bars_figure(res, baseline="nope")
    rows = [
        dict(context=c, floor_verify_ms=1.0, triton_verify_graph_ms=2.0 * k, triton_decode_graph_ms=1.5 * k)
        for k, c in enumerate((4096, 32768), start=1)
    ]
    fig = viz_results.verify_decode_figure(rows, backends=("triton",))
    ratio = [t for t in fig.data if t.xaxis == "x2"][0]
    assert np.allclose(list(ratio.y), [2.0 / 1.5, 2.0 / 1.5])
    assert list(_trace(fig, "bandwidth floor (weights + KV / copy BW)").y) == [1.0, 1.0]
    for r in rows:  # compiled in every row: that form is drawn; in one row only: the captured form stays
        r.update(triton_verify_compiled_ms=r["triton_verify_graph_ms"] / 2, triton_decode_compiled_ms=1.0)
    fig = viz_results.verify_decode_figure(rows, backends=("triton",))
    assert list(_trace(fig, "ours + Triton kernel (compiled + CUDA graph)").y) == [1.0, 2.0]
    del rows[0]["triton_decode_compiled_ms"]
    fig = viz_results.verify_decode_figure(rows, backends=("triton",))
    assert list(_trace(fig, "ours + Triton kernel (CUDA graph)").y) == [2.0, 4.0]


def test_tick_helpers_and_spread_labels():
    assert viz_results.log_ticks([3.0, 40.0]) == [2, 5, 10, 20, 50, 100]
    assert viz_results.log_ticks([]) == []
    assert [viz_results.tokens_label(n) for n in (1000, 4096, 131072)] == ["1000", "4k", "128k"]
    fig = viz_results.pareto_figure(
        [{"n": 3, "v": 1.0, "label": "c"}, {"n": 1, "v": 2.0, "label": "a"}, {"n": 2, "v": 1.5, "label": "b"}],
        x="n",
        y="v",
    )
    viz_results.spread_labels(fig)
    assert list(fig.data[0].textposition) == ["top center", "top center", "bottom center"]  # x order: a, b, c


# ----------------------------------------------------------------------------- kernels per stage


def _stage(eager, compiled, replay, launch):
    return dict(eager_kernels=eager, compiled_kernels=compiled, replay_us=replay, launch_bound_us=launch)


def _bars(fig):
    """{(method, stage): (launch-bound, rest, label)} read back from the figure's traces."""
    out = {}
    for launch, rest in zip(fig.data[0::2], fig.data[1::2]):
        method = rest.name.rsplit(", ", 1)[1]
        assert list(launch.x) == list(rest.x)
        for x, a, b, t in zip(rest.x, launch.y, rest.y, rest.text):
            out[(method, x)] = (a, b, t)
    return out


def test_kernel_bars_split_each_stage_into_launches_and_the_rest():
    profile = {
        "schema_version": 1,
        "ar": {"launch_cost_us": 1.0, "stages": {"verify": _stage(40, 10, 30.0, 10.0)}},
        "tree-2-2": {
            "launch_cost_us": 2.0,
            "stages": {
                "draft1": _stage(12, 5, 25.0, 10.0),
                "verify": _stage(60, 20, 35.0, 40.0),  # launch estimate above the replay: capped at it
                "commit": _stage(3, 1, 4.5, 2.0),
            },
        },
        "environment": {"gpu": "G"},
    }
    bars = _bars(viz_results.kernel_bars(profile))
    assert list(bars) == [("ar", "verify"), ("tree-2-2", "draft1"), ("tree-2-2", "verify"), ("tree-2-2", "commit")]
    assert bars[("ar", "verify")] == (10.0, 20.0, "40→10")
    assert bars[("tree-2-2", "draft1")] == (10.0, 15.0, "12→5")
    assert bars[("tree-2-2", "verify")] == (35.0, 0.0, "60→20")
    assert bars[("tree-2-2", "commit")] == (2.0, 2.5, "3→1")


def test_kernel_bars_of_the_recorded_profile_sum_to_each_replay():
    profile = nb.load_result("profile_h200")
    bars = _bars(viz_results.kernel_bars(profile))
    want = {
        (m, s): st for m, v in profile.items() if isinstance(v, dict) and "stages" in v for s, st in v["stages"].items()
    }
    assert set(bars) == set(want) and len(bars) > 3
    for key, st in want.items():
        launch, rest, label = bars[key]
        assert launch + rest == pytest.approx(st["replay_us"], rel=1e-12)
        assert launch == pytest.approx(min(st["launch_bound_us"], st["replay_us"]), rel=1e-12)
        assert label == f"{st['eager_kernels']}→{st['compiled_kernels']}"


@pytest.mark.parametrize(
    "profile, words",
    [
        ({"ar": {"launch_cost_us": 1.0, "stages": {"verify": {"replay_us": 1.0}}}}, ["'verify'", "launch_bound_us"]),
        ({"ar": {"launch_cost_us": 1.0}}, ["'ar'", "stages"]),
        ({"ar": {"stages": {"verify": _stage(1, 1, 1.0, 1.0)}}}, ["'ar'", "launch_cost_us"]),
        ({"schema_version": 1}, ["no method"]),
        ([1, 2], ["list"]),
    ],
)
def test_kernel_bars_names_what_a_malformed_profile_lacks(profile, words):
    with pytest.raises(ValueError) as e:
        viz_results.kernel_bars(profile)
    assert all(w in str(e.value) for w in words)


def test_split_sweep_figure_plots_the_recorded_times():
    """One panel per swept shape; each line's points are exactly the JSON's times for the decoder's config
    (BLOCK_N 64, 4 warps, 3 stages) and 64-row tiles, by split count, and the star is the planner's row."""
    sweep = nb.load_result("tree_attention_sweep_small_h200")
    fig = viz_results.split_sweep_figure(sweep)
    shapes = list(sweep["shapes"])
    by_panel = {}
    for tr in fig.data:
        by_panel.setdefault(tr.xaxis, []).append(tr)
    assert len(by_panel) == len(shapes)
    for axis, name in zip(sorted(by_panel, key=lambda a: int(a[1:] or 1)), shapes):
        rows = [v for v in sweep["shapes"][name]["variants"] if "us" in v and v["config"] == [64, 4, 3]
                and v["BLOCK_M"] == 64]  # fmt: skip
        launch = {v["n_splits"]: v["us"] for v in rows if v["splits_asked"] is not None and not v["fused_merge"]}
        line = next(t for t in by_panel[axis] if t.legendgroup == "merge")
        assert dict(zip(line.x, line.y)) == launch
        star = next(t for t in by_panel[axis] if t.legendgroup == "planned")
        planned = next(v for v in rows if v["splits_asked"] is None and not v["fused_merge"])
        assert (star.x[0], star.y[0]) == (planned["n_splits"], planned["us"])


@pytest.mark.parametrize(
    ("sweep", "words"),
    [
        ({}, "no 'shapes'"),
        ({"shapes": {"a": {"variants": [{"config": [1, 1, 1], "BLOCK_M": 64, "us": 1.0}]}}}, "no timed rows"),
    ],  # fmt: skip
)
def test_split_sweep_figure_names_what_is_missing(sweep, words):
    with pytest.raises(ValueError, match=words):
        viz_results.split_sweep_figure(sweep)


def test_masked_attention_figure_groups_the_forms_by_rows():
    split = {"heads": [4, 2, 64], "keys": 586, "cases": [
        {"rows": 1, "us": {"kernel": 6.9, "math_compiled": 12.3, "sdpa": 14.9}},
        {"rows": 16, "us": {"kernel": 8.2, "math_compiled": 13.5, "sdpa": 24.1}},
    ]}  # fmt: skip
    first = {"cases": [{"rows": 16, "us": {"kernel": 15.7}}, {"rows": 1, "us": {"kernel": 14.1}}]}
    fig = viz_results.masked_attention_figure(split, first)
    names = [t.name for t in fig.data]
    assert names[:2] == [viz_results.MASKED_FORMS["kernel"], viz_results.MASKED_FORMS["kernel_one_program"]]
    assert list(fig.data[1].y) == [14.1, 15.7] and list(fig.data[3].y) == [14.9, 24.1]
    assert list(fig.data[0].x) == ["1 row", "16 rows"] and "586 keys" in fig.layout.title.text
    with pytest.raises(ValueError, match="no masked-attention cases"):
        viz_results.masked_attention_figure({"cases": []})


def test_masked_attention_figure_of_the_recorded_runs():
    split, first = nb.load_result("masked_attention_split_h200"), nb.load_result("masked_attention_h200")
    fig = viz_results.masked_attention_figure(split, first)
    kernel = {t.name: t for t in fig.data}[viz_results.MASKED_FORMS["kernel"]]
    assert list(kernel.y) == [c["us"]["kernel"] for c in split["cases"]]
    assert len(fig.data) == 4  # split kernel, one-program kernel, the written-out form, SDPA


def test_kernel_kind_reads_the_names_the_profiler_records():
    kinds = {
        "_norm_linear_kernel": "fused projection (norm_linear)",
        "_tree_attn_split_kernel": "attention (Triton)",
        "_masked_attn_kernel": "attention (Triton)",
        "_row_topk_kernel": "beam top-k (Triton)",
        "_rope_tables_kernel": "RoPE tables (Triton)",
        "nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT": "cuBLAS matmul",
        "triton_poi_fused_add_copy__4": "Inductor pointwise",
        "triton_red_fused__unsafe_view_argmax_copy__select_5": "Inductor reduction",
        "triton_per_fused__fused_rms_norm__to_copy_mul_view_4": "Inductor reduction",
        "void at::native::vectorized_elementwise_kernel<4>": "other",
    }
    assert {n: viz_results.kernel_kind(n) for n in kinds} == kinds


def test_launch_order_figure_places_every_kernel_once_in_order():
    order = [["_rope_tables_kernel", 1.5], ["triton_poi_fused_x_0", 0.9], ["_norm_linear_kernel", 3.2],
             ["_tree_attn_split_kernel", 4.1], ["_norm_linear_kernel", 2.5], ["nvjet_x", 2.4]]  # fmt: skip
    st = {**_stage(20, 6, 30.0, 7.2), "kernels_in_order": order}
    profile = {"ar": {"launch_cost_us": 1.2, "stages": {"verify": st}}}
    fig = viz_results.launch_order_figure(profile, "ar", "verify")
    placed = sorted((int(x), float(y)) for t in fig.data for x, y in zip(t.x, t.y))
    assert placed == [(i + 1, t) for i, (_, t) in enumerate(order)]
    names = [t.name for t in fig.data]
    assert "fused projection (norm_linear): 2 kernels, 5.7 us" in names and "cuBLAS matmul: 1 kernel, 2.4 us" in names
    title = fig.layout.title.text
    assert (
        "6 kernels in launch order<br><sup>14.6 us of kernel time; the stage replayed from its CUDA graph: 30.0 us"
        in title
    )
    assert fig.layout.shapes[0].y0 == 1.2  # the dashed line: one launch inside a graph
    with pytest.raises(ValueError, match="no stage ar/draft1; it has ar/verify"):
        viz_results.launch_order_figure(profile, "ar", "draft1")
    del st["kernels_in_order"]
    with pytest.raises(ValueError, match="lacks 'kernels_in_order'; re-run bench.profile"):
        viz_results.launch_order_figure(profile, "ar", "verify")


def test_launch_order_figure_of_the_recorded_profile_shows_each_compiled_kernel():
    """For every recorded stage: one bar per compiled kernel, their times those the profiler recorded."""
    profile = nb.load_result("profile_h200")
    for m, v in profile.items():
        if not (isinstance(v, dict) and "stages" in v):
            continue
        for s, st in v["stages"].items():
            fig = viz_results.launch_order_figure(profile, m, s)
            ys = [y for t in fig.data for y in t.y]
            assert len(ys) == len(st["kernels_in_order"]) == st["compiled_kernels"], (m, s)
            assert sum(ys) == pytest.approx(sum(t for _, t in st["kernels_in_order"]))


def test_step_timeline_figure_lays_every_kernel_in_its_stage_lane():
    """The step's time line (bench.profile's step_timeline): one bar per kernel from its start for its duration, in
    the lane of its stage (attributed by count, in order), and each lane labelled with its stage's increment."""
    from longspec_lab.bench.profile import step_timeline

    ks = [("triton_poi_fused_x_0", 0.0, 1.0), ("_norm_linear_kernel", 0.8, 3.0), ("_tree_attn_split_kernel", 2.5, 7.0),
          ("_tree_attn_merge_kernel", 7.5, 9.0), ("triton_red_fused_argmax_1", 8.8, 10.0)]  # fmt: skip
    profile = {"tree": {"stages": {}, "step_timeline": step_timeline(ks, {"draft1": 2, "verify": 3})}}
    fig = viz_results.step_timeline_figure(profile, "tree")
    bars = sorted((float(b), float(x), y) for t in fig.data for b, x, y in zip(t.base, t.x, t.y))
    assert bars == [(0.0, 1.0, "draft1"), (0.8, 2.2, "draft1"), (2.5, 4.5, "verify"), (7.5, 1.5, "verify"),
                    (8.8, 1.2, "verify")]  # fmt: skip
    labels = {a.y: a.text for a in fig.layout.annotations}
    assert labels == {"draft1": "+3.0 us", "verify": "+7.0 us"}  # 3.0 + 4.0 + 2.0 + 1.0 = 10.0 us in all
    assert "10.0 us, 5 kernels" in fig.layout.title.text
    with pytest.raises(ValueError, match="no method 'ar'; it has tree"):
        viz_results.step_timeline_figure(profile, "ar")
    del profile["tree"]["step_timeline"]
    with pytest.raises(ValueError, match="lacks 'step_timeline'; re-run bench.profile"):
        viz_results.step_timeline_figure(profile, "tree")


def test_kernel_count_rows_set_the_cpu_counts_beside_the_record():
    """Each stage's recorded launches with the selection off and by default, and the combo bound, beside the
    profile's compiled kernels; a stage the profile or a variant lacks is None."""
    counts = {
        "variants": {
            "default": {"methods": {"tree": {
                "draft2": {"launches": 11, "launches_combo": 10},
                "commit": {"launches": 9, "launches_combo": 3},
            }}},
            "beam_select_off": {"methods": {"tree": {"draft2": {"launches": 13, "launches_combo": 12}}}},
            "head_select_on": {"methods": {"tree": {"draft2": {"launches": 10, "launches_combo": 9}}}},
            "beam_write_off": {"methods": {"tree": {"draft2": {"launches": 13, "launches_combo": 13}}}},
            "greedy_accept_off": {"methods": {"tree": {"commit": {"launches": 9, "launches_combo": 3}}}},
        }
    }  # fmt: skip
    profile = {"tree": {"stages": {"draft2": {"compiled_kernels": 13}}}}
    rows = viz_results.kernel_count_rows(counts, profile)
    assert rows == [
        {"method": "tree", "stage": "draft2", "H200, both off": 13, "CPU, selection off": 13, "CPU, default": 11,
         "combo bound": 10, "CPU, head + selection in one": 10, "CPU, level written after": 13,
         "combo bound, greedy tail written out": None},
        {"method": "tree", "stage": "commit", "H200, both off": None, "CPU, selection off": None, "CPU, default": 9,
         "combo bound": 3, "CPU, head + selection in one": None, "CPU, level written after": None,
         "combo bound, greedy tail written out": 3},
    ]  # fmt: skip
    del counts["variants"]["head_select_on"]  # a record made before that variant: its column is None
    assert [r["CPU, head + selection in one"] for r in viz_results.kernel_count_rows(counts, profile)] == [None, None]


def test_tuner_check_rows_and_figure_pair_each_recorded_shape_with_its_predictions():
    """Every chain and tree of the recording (not ar, not the peers), ordered by measured tokens/s, beside each
    tune report's prediction for the same shape (None where a report has none); the figure draws one bar group per
    shape, measured first."""
    tuner_check_rows = nb.tuner_check_rows
    record = {"results": {
        "ar": {"tokens_per_s": 100.0, "tau": 1.0}, "hf-greedy": {"tokens_per_s": 20.0},
        "chain-g2": {"tokens_per_s": 150.0, "tau": 2.5}, "tree-2-3": {"tokens_per_s": 180.0, "tau": 3.1},
        "tree-2-3-sdpa": {"tokens_per_s": 90.0, "tau": 3.1}}}  # fmt: skip
    tuned = {
        "a": {"recorded_predicted": {json.dumps([1, 1]): {"predicted_tokens_per_s": 140.0, "expected_accept": 2.4},
                                     json.dumps([2, 3]): {"predicted_tokens_per_s": 170.0, "expected_accept": 3.0}}},
        "b": {"recorded_predicted": {json.dumps([2, 3]): {"predicted_tokens_per_s": 190.0, "expected_accept": 3.3}}},
    }  # fmt: skip
    rows = tuner_check_rows(record, tuned)
    assert [r["shape"] for r in rows] == ["tree-2-3", "chain-g2"]
    assert rows[0] == {"shape": "tree-2-3", "measured tok/s": 180.0, "measured τ": 3.1, "a tok/s": 170.0, "a τ": 3.0,
                       "b tok/s": 190.0, "b τ": 3.3}  # fmt: skip
    assert rows[1]["a tok/s"] == 140.0 and rows[1]["b tok/s"] is None and rows[1]["b τ"] is None
    fig = viz_results.tuner_check_figure(rows, ["a", "b"])
    assert [t.name for t in fig.data] == ["measured", "predicted, a", "predicted, b"]
    assert list(fig.data[0].y) == [180.0, 150.0] and list(fig.data[2].y) == [190.0, None]
    with pytest.raises(ValueError, match="no chain or tree"):
        tuner_check_rows({"results": {"ar": {"tokens_per_s": 1.0, "tau": 1.0}}}, tuned)


def test_class_time_figure_stacks_each_steps_classes_and_marks_its_floors():
    """One bar per profiled step, its classes stacked (the stacks add up to the step's increments), the bar text its
    timed ms and multiple of the floor, the floor marked on every step and the sequential-levels floor where recorded;
    keys that are not steps (context, compile times) are skipped, and nothing to plot is an error."""
    p8d = nb.load_result("profile_8b_draft_h100")["draft"][0]
    steps = dict(p8d)
    steps["draft_compiled"] = {**steps["draft_compiled"], "levels_floor_ms": 2.5}
    fig = viz_results.class_time_figure(steps)
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == list(viz_results.KERNEL_CLASSES)
    names = ["draft", "draft_compiled"]
    assert all(list(t.y) == names for t in bars)
    for i, n in enumerate(names):
        want = sum(c["increment_us"] for c in p8d[n]["classes"].values()) / 1e3
        assert sum(t.x[i] for t in bars) == pytest.approx(want)
        text = next(t for t in fig.data if t.type == "scatter" and t.mode == "text").text[i]
        assert f"timed {p8d[n]['ms']:.2f} ms" in text and f"{p8d[n]['x_floor']:.2f}× floor" in text
    floors = {t.name: (list(t.y), list(t.x)) for t in fig.data if t.type == "scatter" and t.mode == "markers"}
    assert floors["floor (bytes / copy bandwidth)"] == (names, [p8d[n]["floor_ms"] for n in names])
    assert floors["floor of the draft's sequential levels"] == (["draft_compiled"], [2.5])
    with pytest.raises(ValueError, match="no profiled steps"):
        viz_results.class_time_figure({"context": 4096})


# ----------------------------------------------------------------------------- trees against chains


def test_tree_chain_figure_plots_each_tree_at_its_ratios_with_the_two_lines():
    from longspec_lab.bench.e2e import tree_against_chains

    results = nb.load_result("e2e_h100")["results"]
    table = tree_against_chains(results)
    fig = viz_results.tree_chain_figure(table, goal=1.15)
    plotted = {}
    for t in fig.data:
        if t.customdata is not None:  # a depth's trees: each point's name in its customdata
            for row, x, y in zip(t.customdata, t.x, t.y):
                plotted[row[0]] = (x, y)
    labels = {a.text for a in fig.layout.annotations}  # the shapes, placed clear of each other
    assert {n.removeprefix("tree-").replace("-", ",") for n in plotted} <= labels
    # every tree with a chain of its depth, at (step ratio, tau ratio) computed from the raw tokens/s and tau
    with_chain = {n: t for n, t in table["trees"].items() if t["chain"]}
    assert set(plotted) == set(with_chain) and with_chain
    for n, (x, y) in plotted.items():
        c = results[with_chain[n]["chain"]]
        step = lambda r: r["tau"] / r["tokens_per_s"]  # noqa: E731
        assert x == pytest.approx(step(results[n]) / step(c))
        assert y == pytest.approx(results[n]["tau"] / c["tau"])
    # the lines y = x and y = 1.15 x
    for name, ratio in (("as fast as its chain", 1.0), ("1.15x its chain", 1.15)):
        line = _trace(fig, name)
        assert np.allclose(np.asarray(line.y), ratio * np.asarray(line.x))


def test_tree_chain_figure_needs_a_chain_of_a_trees_depth():
    table = {"best_chain": "chain-g1", "trees": {"tree-2-2": {"depth": 2, "chain": None, "vs_best_chain": 0.9}}}
    with pytest.raises(ValueError, match="chain of its depth"):
        viz_results.tree_chain_figure(table)
