"""`make site`: the static HTML site of the executed notebooks has a table of contents and every
page holds every figure its notebook produced (plotly figures drawn from one local plotly.js).

Reuses the notebooks that test_notebooks executed in this session; run alone, it executes them."""

import re
from pathlib import Path

import pytest

from longspec_lab.teach import site

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, executed_dir):
    pytest.importorskip("nbconvert")
    out = tmp_path_factory.mktemp("site")
    entries = site.build_site(out, NOTEBOOKS, executed_dir if executed_dir.is_dir() else None, timeout=300)
    return out, entries


def test_index_links_every_page(built):
    out, entries = built
    index = (out / "index.html").read_text()
    assert len(entries) == len(NOTEBOOKS)
    for nb, e in zip(NOTEBOOKS, entries):
        assert e["file"] == nb.with_suffix(".html").name
        assert f'href="{e["file"]}"' in index and e["title"] in index
        assert "<li>" in index.split(e["file"], 1)[1]  # the notebook's "what you will see" list follows its link
    assert (out / "plotly.min.js").stat().st_size > 1_000_000


@pytest.mark.parametrize("i", range(len(NOTEBOOKS)), ids=[p.name for p in NOTEBOOKS])
def test_every_page_holds_its_figures(built, i):
    out, entries = built
    e = entries[i]
    page = (out / e["file"]).read_text()
    assert "error" not in e["note"], e["note"]
    assert e["figures"] >= 2 and e["page_figures"] >= e["figures"], e
    assert page.count("Plotly.newPlot") >= len(re.findall(r'class="plotly-graph-div"', page)) > 0
    assert page.index('<script src="plotly.min.js">') < page.index("Plotly.newPlot")  # the local copy, loaded first
    assert "application/vnd.jupyter.widget-view+json" not in page  # static snapshots, not dead widget views
    for heading in ("What you will see", "What to remember", "Try this"):
        assert heading in page
    assert 'href="index.html"' in page
