"""The package's imports point one way: no cycles, and no module imports from a layer above it.

Layers, bottom to top (a module may import its own layer's package-mates and anything lower, except
that siblings on one layer stay independent):
    paths, provenance  <-  kernels  <-  ops  <-  models | spec  <-  decoding  <-  teach | bench | train  <-  cli
Every import counts, also those inside functions. Each module docstring also names the notebook that
teaches it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYER = {"paths": 0, "provenance": 0, "kernels": 1, "ops": 2, "models": 3, "spec": 3, "decoding": 4}
LAYER.update({"teach": 5, "bench": 5, "train": 5, "cli": 6, "bench_verify": 6, "__main__": 7, "__init__": 8})


def _modules():
    mods = {}
    for path in sorted((ROOT / "longspec_lab").rglob("*.py")):
        rel = path.relative_to(ROOT / "longspec_lab").with_suffix("")
        mods["longspec_lab." + ".".join(rel.parts).removesuffix(".__init__")] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        mods["longspec_lab.kernels." + path.stem if path.stem != "__init__" else "longspec_lab.kernels"] = path
    return mods


def _imports(path, name, known):
    """The package modules `path` imports (absolute or relative, at any depth of the file)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            base = base.replace("kernels.", "longspec_lab.kernels.") if base.startswith("kernels.") else base
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                out.add(t)
    return out


def _layer(mod):
    part = mod.split(".")[1] if mod.count(".") else "__init__"
    return part, LAYER[part]


GRAPH = {name: _imports(path, name, set(_modules())) for name, path in _modules().items()}


def test_every_module_has_a_layer():
    for name in GRAPH:
        if name != "longspec_lab":
            _layer(name)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_upward_or_sideways_imports(name):
    if name == "longspec_lab":
        return  # the public API at the top imports from every layer
    part, level = _layer(name)
    for dep in GRAPH[name]:
        dpart, dlevel = _layer(dep) if dep != "longspec_lab" else ("__init__", LAYER["__init__"])
        assert dlevel < level or dpart == part, f"{name} (layer {part}) imports {dep} (layer {dpart})"


def test_no_import_cycles():
    seen, stack, on_stack = set(), [], set()

    def visit(n):
        seen.add(n)
        stack.append(n)
        on_stack.add(n)
        for m in sorted(GRAPH[n]):
            assert m not in on_stack, "import cycle: " + " -> ".join(stack[stack.index(m) :] + [m])
            if m not in seen:
                visit(m)
        stack.pop()
        on_stack.discard(n)

    for n in sorted(GRAPH):
        if n not in seen:
            visit(n)


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.count(".") >= 1 and not n.endswith("__main__")))
def test_module_docstring_names_its_notebook(name):
    path = _modules()[name]
    if path.name == "__init__.py":
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert doc, f"{name} has no module docstring"
    last = doc.strip().splitlines()[-1]
    assert last.startswith("Taught in:") and "notebooks/" in last, f"{name}: docstring must end with 'Taught in: ...'"


def test_nothing_points_outside_the_repository():
    notes = "sha" + "red/"
    bad = []
    for path in list(ROOT.rglob("*.py")) + list(ROOT.rglob("*.md")) + list(ROOT.rglob("*.ipynb")):
        if any(p in path.parts for p in (".venv", ".git", "build", "node_modules")):
            continue
        text = path.read_text(errors="ignore")
        if notes + "LONGSPEC" in text or ".." + "/" + notes in text or notes + "ANCHORS" in text:
            bad.append(str(path.relative_to(ROOT)))
    assert not bad, f"these files point at notes outside the repository: {bad}"
