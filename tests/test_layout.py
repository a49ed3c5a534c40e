"""The package's layout: the library never imports the application, no import cycle, one owner of run files."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdgraph"
APPLICATION = ("kdgraph.app", "kdgraph.ui")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_application(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in APPLICATION)


LIBRARY = [m for m in MODULES if not is_application(m) and m != "kdgraph.__main__"]


def imports(name: str) -> set[str]:
    """The kdgraph modules ``name`` imports anywhere in its code (inside functions too), as module names:
    ``from X import a`` counts as ``X.a`` where that is a module, else as ``X``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def test_the_library_imports_no_application_module_in_a_fresh_interpreter():
    code = ("import json, sys\n"
            f"for name in {LIBRARY!r}:\n"
            "    __import__(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kdgraph'))))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert set(LIBRARY) <= set(loaded)
    assert [m for m in loaded if is_application(m)] == []


def test_no_library_module_names_the_application_even_lazily():
    wrong = {m: sorted(i for i in imports(m) if is_application(i)) for m in LIBRARY}
    assert {m: i for m, i in wrong.items() if i} == {}


def test_the_package_has_no_import_cycle():
    graph = {m: imports(m) for m in MODULES}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in graph:
        if m not in index:
            visit(m)
    assert cycles == []
    assert "kdgraph.app.engine" in graph["kdgraph.app.cli"]  # the walk sees lazy (function-level) imports


def test_only_the_run_directory_module_names_run_files():
    owner = PACKAGE / "app" / "rundir.py"
    for name in ("summary.json", "metrics.jsonl", "last.pt", "best.pt", "130"):
        spelled = sorted(str(p.relative_to(ROOT)) for p in MODULES.values() if name in p.read_text())
        assert spelled == [str(owner.relative_to(ROOT))], name
