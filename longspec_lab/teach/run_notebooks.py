"""Execute notebooks with nbclient and keep what they produced: the executed HTML page of each and
the fresh numbers its live cells saved, in one output folder.

On a CUDA machine notebooks 04 and 07 measure live (full mode): 04 runs the tree-attention
benchmark, 07 the end-to-end sweep and the live timer. Their cells call `setup.save_live_result`,
which writes JSON into $LONGSPEC_RESULTS_OUT; this script points that at the output folder, runs
each notebook in a fresh kernel, converts it with `teach.site.page_html` (falling back to the
executed .ipynb where nbconvert is missing) and writes run_notebooks.json: per notebook the
seconds, the errors and the device, with the environment.

    python -m longspec_lab.teach.run_notebooks notebooks/04_*.ipynb notebooks/07_*.ipynb --out OUT

A GPU machine without jupyter takes `--wheels DIR`: the wheels in DIR (carried there) are unpacked
into a private folder, put on the path of this process and of the kernels it starts, and their
`share/jupyter` on JUPYTER_PATH. Unpacking needs no pip and no network.

Taught in: notebooks/07_timing_real_gpu_runs.ipynb
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path


def unpack_wheels(wheels, dest) -> Path:
    """Unpack every *.whl in `wheels` into `dest` as an installer would lay it out (packages at the top,
    `*.data/{purelib,platlib}` merged in, `*.data/data` at the top: share/jupyter/...), put `dest` on
    sys.path and on the PYTHONPATH and JUPYTER_PATH that started kernels inherit. Returns `dest`."""
    dest = Path(dest)
    found = sorted(Path(wheels).glob("*.whl"))
    if not found:
        raise SystemExit(f"error: no .whl files in {wheels}; download the wheels the machine lacks into it first")
    dest.mkdir(parents=True, exist_ok=True)
    for whl in found:
        with zipfile.ZipFile(whl) as z:
            z.extractall(dest)
    for data in dest.glob("*.data"):
        for part in data.iterdir():
            target = dest if part.name in ("purelib", "platlib", "data") else None
            if target is not None:
                shutil.copytree(part, target, dirs_exist_ok=True)
        shutil.rmtree(data)
    sys.path.insert(0, str(dest))
    paths = [str(dest), os.getcwd(), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        filter(None, [str(dest / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")])
    )
    return dest


def run(paths, out, timeout: int = 900, small: bool | None = None) -> dict:
    from longspec_lab.provenance import environment
    from longspec_lab.teach import site

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"LONGSPEC_RESULTS_OUT": str(out), "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    if small is not None:
        env["LONGSPEC_SMALL"] = "1" if small else "0"
    report = {"notebooks": {}, "environment": environment(), "command": " ".join(sys.argv)}
    pages = [(Path(p).with_suffix(".html").name, Path(p).stem) for p in paths]
    for p in map(Path, paths):
        if not p.is_file():
            raise SystemExit(f"error: no notebook {p}; pass paths like notebooks/04_*.ipynb")
        print(f"executing {p.name} ...", flush=True)
        nb, secs, errors = site.execute(p, timeout=timeout, env=env)
        try:
            page = site.page_html(nb, pages, p.with_suffix(".html").name)
            (out / p.with_suffix(".html").name).write_text(page, encoding="utf-8")
            kept = p.with_suffix(".html").name
        except SystemExit:  # nbconvert missing: keep the executed notebook itself
            import nbformat

            nbformat.write(nb, out / p.name)
            kept = p.name
        report["notebooks"][p.name] = dict(seconds=round(secs, 1), errors=errors, output=kept)
        print(f"{p.name}: {secs:.0f} s, {len(errors)} error(s) {errors[:1]}", flush=True)
        # after every notebook, so that a run stopped by a time limit still says what finished
        (out / "run_notebooks.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Execute notebooks; write executed HTML and their live results.")
    ap.add_argument("notebooks", nargs="+")
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    ap.add_argument("--small", choices=["auto", "0", "1"], default="auto", help="force LONGSPEC_SMALL")
    ap.add_argument("--wheels", default=None, help="a folder of .whl files to unpack and use (no pip needed)")
    ap.add_argument("--site-dir", default="/tmp/longspec_site", help="where --wheels unpacks (default: %(default)s)")
    a = ap.parse_args(argv)
    if a.wheels:
        unpack_wheels(a.wheels, a.site_dir)
    rep = run(a.notebooks, a.out, a.timeout, None if a.small == "auto" else a.small == "1")
    return 1 if any(v["errors"] for v in rep["notebooks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
