"""A static HTML site of the executed notebooks, readable without running anything.

`build_site` executes every notebook in notebooks/ (on CPU with CI=1, the same small mode as the
tests; or takes already executed copies from a folder), converts each with nbconvert's
HTMLExporter, and writes one page per notebook plus index.html, a table of contents with each
notebook's title and its "What you will see" list. Interactive outputs become static:

* plotly figures (their JSON output) become a div drawn by one local copy of plotly.js (from the
  plotly package), so pages work offline and stay small;
* the repository's widgets carry a static HTML snapshot of what they showed (`widgets._Snapshot`),
  which replaces the live widget view, which a static page cannot run;
* graphviz diagrams are SVG already.

    python -m longspec_lab.teach.site --out build/site        # or: make site
    python -m longspec_lab.teach.site --out DIR --executed D  # reuse executed notebooks in D

Taught in: notebooks/01_speculative_decoding_in_one_picture.ipynb
"""

from __future__ import annotations

import argparse
import copy
import html
import importlib
import os
import re
import shutil
import sys
import time
from pathlib import Path

from longspec_lab.paths import NOTEBOOKS_DIR

NOTEBOOKS = NOTEBOOKS_DIR
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
FIGURE_MIMES = (PLOTLY_MIME, "image/svg+xml", "image/png")
PLOTLY_JS = "plotly.min.js"


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(
            f"error: the site needs {module}; install the site extra: .venv/bin/pip install -e '.[site]'"
        ) from None


def execute(path: Path, timeout: int = 600, env: dict | None = None):
    """Run a notebook top to bottom in a fresh python3 kernel (cwd = its folder); returns
    (executed notebook, seconds, errors: list of 'ename: evalue')."""
    nbformat, nbclient = _need("nbformat"), _need("nbclient")
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    t0 = time.perf_counter()
    try:
        client = nbclient.NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            allow_errors=True,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [
        f"{o.get('ename')}: {o.get('evalue')}"
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") == "error"
    ]
    return nb, time.perf_counter() - t0, errors


def count_figures(nb) -> int:
    """Figure outputs of an executed notebook: plotly figures, SVG and PNG images, widget snapshots."""
    n = 0
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        for o in c.outputs:
            data = o.get("data", {})
            if any(m in data for m in FIGURE_MIMES) or "widget-snapshot" in str(data.get("text/html", "")):
                n += 1
    return n


def page_figures(page: str) -> int:
    """Figures on a built page: plotly divs, inline SVG drawings, embedded images."""
    return (
        len(re.findall(r'class="plotly-graph-div"', page))
        + len(re.findall(r'<div class="widget-snapshot"', page))
        + len(re.findall(r'<div class="jp-RenderedSVG', page))
        + len(re.findall(r'<div class="jp-RenderedImage', page))
    )


def static_outputs(nb):
    """A copy of an executed notebook whose outputs a static page can show: plotly JSON -> an HTML
    div, widget views dropped where a snapshot (text/html) exists, widget state removed."""
    pio = _need("plotly.io")
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        for o in c.outputs:
            data = o.get("data")
            if not data:
                continue
            if PLOTLY_MIME in data:
                fig = data.pop(PLOTLY_MIME)
                data["text/html"] = pio.to_html(fig, include_plotlyjs=False, full_html=False, validate=False)
            if WIDGET_MIME in data:
                if "text/html" in data:
                    data.pop(WIDGET_MIME)
                else:
                    data.pop(WIDGET_MIME)
                    data["text/html"] = "<i>(an interactive widget: run the notebook in JupyterLab to use it)</i>"
    return nb


def title_of(nb) -> str:
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", c.source, re.M)
            if m:
                return m.group(1).strip()
    return "notebook"


def what_you_will_see(nb) -> str:
    """The markdown of the notebook's '## What you will see' section (empty if none)."""
    for c in nb.cells:
        if c.cell_type == "markdown" and "## What you will see" in c.source:
            part = c.source.split("## What you will see", 1)[1]
            return part.split("\n## ", 1)[0].strip()
    return ""


def _markdown_list(md: str) -> str:
    items, cur = [], None
    for line in md.splitlines():
        if line.startswith("* "):
            cur = [line[2:].strip()]
            items.append(cur)
        elif cur is not None and line.strip():
            cur.append(line.strip())

    def esc(s: str) -> str:
        s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", html.escape(s))
        s = re.sub(r"\*([^*]+)\*", r"<i>\1</i>", s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    return "<ul>" + "".join(f"<li>{esc(' '.join(i))}</li>" for i in items) + "</ul>"


NAV_CSS = (
    "<style>.lsl-nav{font-family:sans-serif;font-size:14px;padding:8px 16px;border-bottom:1px solid #ddd;"
    "background:#f7f7f7}.lsl-nav a{margin-right:14px}</style>"
)


def page_html(nb, pages: list[tuple[str, str]], here: str) -> str:
    """One notebook as a standalone page: nbconvert's lab template, plotly.js loaded first (before
    any AMD loader the template brings), and a navigation bar to the other pages."""
    nbconvert = _need("nbconvert")
    exporter = nbconvert.HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(static_outputs(nb))
    nav = (
        '<nav class="lsl-nav"><a href="index.html">contents</a>'
        + "".join(
            f'<a href="{f}"{" style=font-weight:bold" if f == here else ""}>{html.escape(t.split("·")[0].strip())}</a>'
            for f, t in pages
        )
        + "</nav>"
    )
    body = re.sub(r"<head>", f'<head>\n<script src="{PLOTLY_JS}"></script>{NAV_CSS}', body, count=1)
    return re.sub(r"(<body[^>]*>)", r"\1" + nav, body, count=1)


GPU_PAGES = "notebooks_h200"  # data/results/<this>/: notebooks executed live on an H200 (teach.run_notebooks)


def copy_gpu_pages(out: Path) -> list[tuple[str, str]]:
    """Copy the recorded GPU executions (HTML) into out/h200/, pointing them at the site's plotly.js.
    Returns (relative file, name) per page."""
    from longspec_lab.paths import RESULTS_DIR

    src = RESULTS_DIR / GPU_PAGES
    pages = []
    for f in sorted(src.glob("*.html")) if src.is_dir() else []:
        (out / "h200").mkdir(exist_ok=True)
        text = f.read_text(encoding="utf-8").replace(f'<script src="{PLOTLY_JS}">', f'<script src="../{PLOTLY_JS}">')
        text = text.replace('href="index.html"', 'href="../index.html"')
        (out / "h200" / f.name).write_text(text, encoding="utf-8")
        pages.append((f"h200/{f.name}", f.stem))
    return pages


def index_html(entries: list[dict], gpu_pages: list[tuple[str, str]] = ()) -> str:
    gpu = "".join(f'<li><a href="{f}">{html.escape(n)}</a></li>' for f, n in gpu_pages)
    gpu = (
        "<h2>Executed live on an H200</h2><p>The same notebooks run in full mode on one NVIDIA H200 "
        f"(<code>python -m longspec_lab.teach.run_notebooks</code>; numbers in data/results/{GPU_PAGES}/):</p>"
        f"<ul>{gpu}</ul>"
        if gpu
        else ""
    )
    rows = "".join(
        f'<li><h2><a href="{e["file"]}">{html.escape(e["title"])}</a></h2>{_markdown_list(e["see"])}'
        f'<p style="color:#777">executed in {e["seconds"]:.0f} s{e["note"]}</p></li>'
        for e in entries
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>longspec_lab notebooks</title>"
        "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto;line-height:1.45}"
        "#toc>li{list-style:none}h2{margin-bottom:0.2em}</style></head><body>"
        "<h1>longspec_lab: long-context tree speculative decoding, notebook by notebook</h1>"
        "<p>Static pages of the notebooks, executed on a CPU in small mode (the GPU results are the "
        "recorded H200 runs). Interactive widgets show a snapshot; run <code>make lab</code> to use them.</p>"
        f'<ol id="toc">{rows}</ol>{gpu}</body></html>'
    )


def build_site(out, notebooks=None, executed_dir=None, timeout: int = 600, small: bool = True, log=print) -> list[dict]:
    """Execute (or reuse) each notebook, write out/<name>.html, out/index.html and out/plotly.min.js.
    Returns one entry per page: file, title, figures (in the notebook), page_figures (on the page)."""
    nbformat = _need("nbformat")
    out = Path(out)
    paths = [Path(p) for p in (notebooks or sorted(NOTEBOOKS.glob("*.ipynb")))]
    if not paths:
        raise SystemExit(f"error: no notebooks found in {NOTEBOOKS}; pass notebook paths")
    out.mkdir(parents=True, exist_ok=True)
    env = {"CI": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"} if small else {"PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    executed = []
    for p in paths:
        ready = Path(executed_dir) / p.name if executed_dir else None
        if ready is not None and ready.is_file():
            nb, secs, errors = nbformat.read(ready, as_version=4), float("nan"), []
            note = " (executed by the notebook tests)"
        else:
            log(f"executing {p.name} ...")
            nb, secs, errors = execute(p, timeout=timeout, env=env)
            note = ""
        if errors:
            note += f"; {len(errors)} cell error(s): {errors[0][:200]}"
        executed.append((p, nb, secs, note))
    pages = [(p.with_suffix(".html").name, title_of(nb)) for p, nb, _, _ in executed]
    entries = []
    for (p, nb, secs, note), (fname, title) in zip(executed, pages):
        page = page_html(nb, pages, fname)
        (out / fname).write_text(page, encoding="utf-8")
        entries.append(
            dict(
                file=fname,
                title=title,
                see=what_you_will_see(nb),
                seconds=0.0 if secs != secs else secs,
                note=note,
                figures=count_figures(nb),
                page_figures=page_figures(page),
            )
        )
        log(f"wrote {out / fname}: {entries[-1]['page_figures']} figures")
    (out / "index.html").write_text(index_html(entries, copy_gpu_pages(out)), encoding="utf-8")
    import plotly

    shutil.copy(Path(plotly.__file__).parent / "package_data" / PLOTLY_JS, out / PLOTLY_JS)
    return entries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build the static HTML site of the executed notebooks.")
    ap.add_argument("--out", default="build/site", help="output folder (default build/site)")
    ap.add_argument("--executed", default=None, help="folder of already executed notebooks to reuse")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ap.add_argument("--full", action="store_true", help="do not set CI=1 (full sizes where the machine allows)")
    ap.add_argument("notebooks", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
    a = ap.parse_args(argv)
    entries = build_site(a.out, a.notebooks or None, a.executed, a.timeout, small=not a.full)
    bad = [e for e in entries if e["page_figures"] < e["figures"] or "error" in e["note"]]
    print(f"site: {Path(a.out) / 'index.html'} ({len(entries)} pages)")
    for e in bad:
        print(f"error: {e['file']}: {e['page_figures']} of {e['figures']} figures on the page{e['note']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
