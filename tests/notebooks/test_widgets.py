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
