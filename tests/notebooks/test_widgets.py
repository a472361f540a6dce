"""Widgets driven programmatically: sliders set from Python, then node count, diagram and figure checked.

The expected numbers come from the tree shape arithmetic (1 + sum of widths), not from viz.py.
The StepPlayer and the real-tree explorer run on a real generation of the embedded pair.
"""

import re

import numpy as np
import pytest

from longspec_lab.teach.widgets import PRESETS, StepPlayer, TreeGrowth, TreeShapeExplorer


def count(explorer) -> int:
    return int(re.search(r"nodes: (\d+)", explorer.node_count_label.value).group(1))


def headers(source: str) -> list[str]:
    return re.findall(r'level(\d+) \[label="level', source)


def test_default_explorer_shows_69_nodes():
    e = TreeShapeExplorer()
    assert count(e) == 69
    assert "4,761 bytes" in e.mask_label.value and "9,522" in e.mask_label.value
    assert headers(e.diagram_source) == ["1", "2", "3", "4", "5"]
    assert np.asarray(e.mask_fig.data[0].z).shape == (69, 69)
    assert e.message.value == "" and e.error is None
    assert all(s.continuous_update is False for s in [e.depth_slider, *e.width_sliders])
    assert [s.layout.display for s in e.width_sliders] == [None] * 5 + ["none"] * 3


@pytest.mark.parametrize("level,value", [(0, 2), (1, 9), (4, 1), (2, 33)])
def test_width_slider_updates_count_diagram_and_mask(level, value):
    e = TreeShapeExplorer()
    before = e.diagram_source
    e.width_sliders[level].value = value
    widths = [4, 16, 16, 16, 16]
    widths[level] = value
    n = 1 + sum(widths)
    assert count(e) == n
    assert f"{n * n:,} bytes" in e.mask_label.value
    assert e.diagram_source != before
    assert f"level {level + 1}\\n{value} nodes" in e.diagram_source
    z = np.asarray(e.mask_fig.data[0].z)
    assert z.shape == (n, n) and z[:, 0].all() and np.diag(z).all()


def test_depth_slider_shows_and_hides_levels():
    e = TreeShapeExplorer()
    e.depth_slider.value = 2
    assert count(e) == 1 + 4 + 16 and headers(e.diagram_source) == ["1", "2"]
    assert [s.layout.display for s in e.width_sliders[:3]] == [None, None, "none"]
    e.depth_slider.value = 7  # new levels keep their sliders' values (4 each)
    assert count(e) == 1 + 4 + 16 * 4 + 4 * 2
    assert np.asarray(e.mask_fig.data[0].z).shape == (count(e),) * 2


def test_bad_values_give_a_message_not_an_exception():
    e = TreeShapeExplorer(cache_limit=256)
    e.depth_slider.value = 0
    assert e.error and "depth" in e.message.value and e.shape is None
    assert "—" in e.node_count_label.value and e.diagram_source == ""
    e.depth_slider.value = 3
    assert e.error is None and e.message.value == "" and count(e) == 37
    e.width_sliders[1].value = 0
    assert "level 2" in e.message.value and "width 0" in e.message.value
    e.width_sliders[1].value = 16
    assert count(e) == 37
    e.set_shape([64] * 5)  # 321 nodes > 256 reserved slots
    assert "321 nodes" in e.message.value and "256" in e.message.value and e.shape is None
    e.set_shape([4, 16])
    assert count(e) == 21 and e.error is None
    with pytest.raises(ValueError, match="deeper"):
        e.set_shape([1] * 9)


def test_cache_limit_is_configurable_and_presets_apply():
    e = TreeShapeExplorer(cache_limit=40)
    assert "69 nodes" in e.message.value  # the default tree itself does not fit 40 slots
    for name, widths in PRESETS.items():
        e.preset.value = name
        n = 1 + sum(widths)
        if n <= 40:
            assert count(e) == n and e.widths == list(widths)
        else:
            assert f"{n} nodes" in e.message.value


def test_tree_fn_errors_are_shown():
    def boom(shape):
        raise ValueError(f"cannot draft {shape.widths}; fix: smaller tree")

    e = TreeShapeExplorer([2, 2], tree_fn=boom)
    assert "cannot draft" in e.message.value and e.shape is None


def test_siblings_limit_collapses_the_placeholder():
    e = TreeShapeExplorer([2, 8])
    e.max_children_slider.value = 2
    assert "+2 more" in e.diagram_source  # 8 children over 2 parents: 4 each, 2 drawn
    e.max_children_slider.value = 4
    assert "more" not in e.diagram_source


# ----------------------------------------------------------------------------- real generations


@pytest.fixture(scope="module")
def traced(embedded_pair):
    from longspec_lab.decoding.eager import SpecDecoder
    from longspec_lab.teach.setup import held_out_prompt

    target, draft, tok = embedded_pair
    ids, _ = held_out_prompt(tok, 192)
    dec = SpecDecoder(target, draft, tokenizer=tok)
    return dec, ids, tok, dec.generate(ids, method="tree", max_new_tokens=20, trace=True)


def test_explorer_with_real_trees(traced):
    from longspec_lab.teach.setup import first_step_fn

    dec, ids, tok, _ = traced
    e = TreeShapeExplorer([2, 4], tree_fn=first_step_fn(dec, ids), tokenizer=tok)
    assert count(e) == 7
    assert "accepted path" in e.diagram_source or "rejected" in e.diagram_source  # verified for real
    e.width_sliders[1].value = 6
    assert count(e) == 9 and len(re.findall(r"\bn\d+ \[label", e.diagram_source)) == 9


def test_step_player_walks_the_trace(traced):
    _, _, tok, res = traced
    p = StepPlayer(res, tok)
    n = len(res.trace)
    assert p.slider.max == n - 1 == p.play.max
    seen = set()
    for k in range(n):
        p.slider.value = k
        assert p.play.value == k
        st = res.trace[k]
        assert f"step {k + 1} of {n}" in p.header.value
        seen.add(p.diagram_source)
        before, added = p.committed_tokens()
        assert added == st.emitted
        path_rows = re.findall(r"<tr><td>\d+</td><td>#(\d+)</td>", p.path_table.value)
        assert [int(i) for i in path_rows] == st.result.path.tolist()
    assert len(seen) > 1  # the diagram follows the step
    assert before + added == res.new_tokens
    assert p.tau_so_far(n - 1) == pytest.approx(res.tau)
    p.next_button.click()
    assert p.step == n - 1  # clamped
    p.go(0)
    p.prev_button.click()
    assert p.step == 0
    p.next_button.click()
    assert p.step == 1 and p.play.value == 1
    p.play.value = 0  # the Play widget drives the slider
    assert p.step == 0


def test_step_player_needs_a_trace(traced):
    dec, ids, tok, _ = traced
    plain = dec.generate(ids, method="tree", max_new_tokens=4)
    with pytest.raises(ValueError, match="trace=True"):
        StepPlayer(plain, tok)


def test_tree_growth_adds_levels(traced):
    _, _, tok, res = traced
    g = TreeGrowth(res.trace[0], tok)
    depth = res.trace[0].tree.shape.depth
    for l in range(1, depth + 1):
        g.level_slider.value = l
        assert headers(g.diagram_source) == [str(i) for i in range(1, l + 1)]


# ----------------------------------------------------------------------------- display fixes (issue 15)


def test_diagram_fits_its_box_without_a_scroll_box():
    e = TreeShapeExplorer()
    html = e.diagram.value
    assert "max-height" not in html and "overflow" not in html  # no 620 px scroll box cutting the root off
    svg = re.search(r"<svg[^>]*>", html).group(0)
    assert 'width="100%"' in svg and "height:auto" in svg and 'height="' not in svg
    assert "viewBox" in html


def test_refused_shape_clears_the_mask_and_the_preset_label():
    e = TreeShapeExplorer()
    e.preset.value = "narrow [2, 4, 4, 4]"
    assert count(e) == 15 and e.preset.value == "narrow [2, 4, 4, 4]"
    assert np.asarray(e.mask_fig.data[0].z).shape == (15, 15)
    e.set_shape([64] * 5)  # refused: 321 nodes > 256 slots
    assert e.shape is None and len(e.mask_fig.data) == 0  # the old 15 x 15 mask is gone
    assert "refused" in e.mask_fig.layout.title.text
    assert e.preset.value == "(custom)"  # no stale preset name
    e.preset.value = "chain of 4 [1, 1, 1, 1]"
    assert count(e) == 5 and np.asarray(e.mask_fig.data[0].z).shape == (5, 5)
    e.width_sliders[0].value = 2  # no longer the preset
    assert e.preset.value == "(custom)"
    e.set_shape([4, 16, 16, 16, 16])
    assert e.preset.value == "LongSpec [4, 16, 16, 16, 16]"


def test_widgets_carry_a_static_snapshot():
    e = TreeShapeExplorer([2, 4])
    bundle = e._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "application/vnd.jupyter.widget-view+json" in data  # JupyterLab still gets the live widget
    assert "widget-snapshot" in data["text/html"] and "<svg" in data["text/html"] and "nodes: 7" in data["text/html"]


@pytest.fixture(scope="module")
def cut_run(traced):
    """A generation whose last step is cut by max_new_tokens: it verified more tokens than it emitted."""
    dec, ids, tok, res = traced
    before = 1  # the prefill's token
    for st in res.trace:
        if len(st.result.path) >= 2:
            break
        before += len(st.emitted)
    run = dec.generate(ids, method="tree", max_new_tokens=before + 1, trace=True)
    assert len(run.trace[-1].emitted) < len(run.trace[-1].result.path)
    return tok, run


def test_step_numbers_agree_and_the_last_step_shows_what_it_emitted(cut_run):
    tok, run = cut_run
    p = StepPlayer(run, tok)
    n = len(run.trace)
    for k in range(n):
        p.go(k)
        st = run.trace[k]
        assert f"step {k + 1} of {n}" in p.header.value
        assert f"step {k + 1}:" in p.diagram_source and f"step {k}:" not in p.diagram_source  # 1-based in both
        assert f"emitted <b>{len(st.emitted)}</b>" in p.header.value
    last = run.trace[-1]
    k_path = len(last.result.path)
    assert f"kept <b>{len(last.emitted)}</b> of the {k_path} verified" in p.header.value
    assert f"= {k_path} verified, {len(last.emitted)} emitted" in p.diagram_source
    assert p.path_table.value.count("no (length limit)") == k_path - len(last.emitted)


def test_tree_growth_shows_the_candidates_that_lost(traced):
    from longspec_lab.teach.setup import first_step_with_losers

    dec, ids, tok, _ = traced
    step, losers = first_step_with_losers(dec, ids, [2, 4, 4], n_lost=3)
    tree, off = step.tree, step.tree.shape.level_offsets
    for level, w in enumerate(tree.shape.widths, start=1):
        lost = [c for c in losers if c["level"] == level]
        assert [c["rank"] for c in lost] == [w, w + 1, w + 2]
        winners = tree.scores[off[level] : off[level + 1]]
        won = set(
            zip(tree.parents[off[level] : off[level + 1]].tolist(), tree.tokens[off[level] : off[level + 1]].tolist())
        )
        for c in lost:  # a beam: every loser scores at most the level's worst winner, and is not a winner
            assert c["score"] <= float(winners.min()) + 1e-6
            assert (c["parent"], c["token"]) not in won
            assert off[level - 1] <= c["parent"] < off[level]
    g = TreeGrowth(step, tok, max_children=4, losers=losers)
    for level in (1, 2, 3):
        g.level_slider.value = level
        assert len(re.findall(r"\blost\d+ \[label", g.diagram_source)) == 3 * level
        assert "lost the beam" in g.diagram_source


def test_cost_model_explorer_follows_its_sliders():
    from longspec_lab.teach.widgets import CostModelExplorer

    c = CostModelExplorer()
    before = list(c.fig.data[1].y)
    c.rows_slider.value = 256
    after = list(c.fig.data[1].y)
    assert after[-1] > before[-1] and "256 rows" in c.summary.value
    c.bw_slider.value = 1.0  # slower memory: bytes dominate longer, the extra rows cost relatively less
    assert c.fig.data[1].y[-1] < after[-1]


def test_shape_challenge_on_the_real_pair(embedded_pair):
    """Notebook 2's exercise on its own prompt: the folded solution passes, the plausible [4, 8, 8] does not."""
    from longspec_lab.decoding.eager import SpecDecoder
    from longspec_lab.teach import exercises
    from longspec_lab.teach.setup import held_out_prompt

    target, draft, tok = embedded_pair
    ids, _ = held_out_prompt(tok, 256)  # notebook 2's prompt in small mode, 32 new tokens
    dec = SpecDecoder(target, draft, tokenizer=tok)
    challenge = exercises.ShapeChallenge(dec, ids, 32)
    challenge.text.value = "[2, 2, 4, 4, 4, 4, 4, 4, 4, 4]"
    assert challenge.check() and 'data-ok="true"' in challenge.verdict.value
    assert not exercises.check_small_shape([4, 8, 8], dec, ids, 32)
