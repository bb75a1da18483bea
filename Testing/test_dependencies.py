"""The house's dependency rules, read from the source: nothing imports the `arseg` command (cli.py is the top,
not a library), and ARSegLib's modules import each other without a circle, counting the imports inside
functions too (a lazy import still ties two modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "ARSegLib"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, known) -> set:
    """The ARSegLib modules a file imports (from X import Y counts X.Y where that is a module, else X)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph():
    files = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    return {name: _imported_modules(path, files) for name, path in files.items()}


def test_nothing_imports_the_command():
    importers = sorted(name for name, deps in _graph().items() if "ARSegLib.cli" in deps)
    assert importers == [], f"these import ARSegLib.cli (move what they need into the library): {importers}"


def test_the_library_has_no_import_circle():
    graph = _graph()
    graph = {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}  # a package
    state, path, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def _calls_of(path: Path, names) -> set:
    """The names of `names` this file calls (f(...) or x.f(...))."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in names:
                found.add(name)
    return found


def test_only_the_run_service_runs_the_pipeline():
    """One way through the code: the front ends (the Slicer module, the CLI, the page, the bench) run a click or a
    volume through ARSegLib/runs.py, never pipeline.segment_click / segment_volume themselves, and mrml (the MRML
    adapter) runs nothing. The worker serves requests with runs.compute too. Several inputs likewise: only
    runs.compute calls volume_regions.segment_volume_regions."""
    runners = {"segment_click", "segment_volume", "segment_volume_regions"}
    files = list(LIBRARY.rglob("*.py")) + [ROOT / "ARSeg" / "ARSeg.py"]
    callers = sorted(str(p.relative_to(ROOT)) for p in files
                     if p.name not in ("runs.py", "pipeline.py", "volume_regions.py") and _calls_of(p, runners))
    assert callers == [], f"these run the pipeline themselves (go through ARSegLib/runs.py): {callers}"
    assert "ARSegLib.runs" not in _graph()["ARSegLib.mrml"]  # mrml is below the service, not beside it
    assert not _calls_of(LIBRARY / "mrml.py", {"segment_node", "segment_file", "segment"})


def test_the_default_model_is_named_in_one_place():
    """Issue 21 section 1: the shipped model's name is spelled out once, as models.DEFAULT_MODEL (which imports
    only the standard library at its top, so the worker, the page and Slicer's process take it from there); the CLI's
    defaults, the worker, the page and the Slicer module use the constant. Every ARSegLib file is read (its
    subpackages included) and the module, for a string constant equal to the name."""
    models = LIBRARY / "models.py"
    (definition,) = [node for node in ast.parse(models.read_text()).body if isinstance(node, ast.Assign)
                     and [getattr(t, "id", None) for t in node.targets] == ["DEFAULT_MODEL"]]
    value = definition.value.value
    spelled = []
    for path in sorted(LIBRARY.rglob("*.py")) + sorted((ROOT / "ARSeg").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == value:
                spelled.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}")
    assert spelled == [f"ARSegLib/models.py:{definition.lineno}"], f"{value!r} spelled out besides it: {spelled}"
    top = set()  # what importing models costs the modules that take the constant (Slicer's process among them)
    for node in ast.parse(models.read_text()).body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add("." * node.level + (node.module or "").split(".")[0])
    assert not top & {"torch", "numpy", "scipy", "safetensors"} and not any(n.startswith(".") for n in top), top
