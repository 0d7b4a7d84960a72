"""replica/ is two sides: host-side modules (what `python -m siterecovery.replica.agent` loads on a host:
stdlib, xxhash, zstandard) and replica/orchestrator/ (endpoints, transfers over paramiko). The host side
never imports the orchestrator side, no module needs a lazy import to dodge a cycle, and the agent loads
neither paramiko nor pydantic nor prefect."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import siterecovery.replica

REPLICA = Path(siterecovery.replica.__file__).parent
HOST_THIRD_PARTY = {"xxhash", "zstandard", "qemu"}  # qemu.qmp: only inside qemu.py's QMP session


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(REPLICA.rglob("*.py")):
        rel = path.relative_to(REPLICA).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.append((".".join(["siterecovery.replica", *parts]), path))
    return out


def _host_side(name: str) -> bool:
    return not name.startswith("siterecovery.replica.orchestrator")


def _imports(path: Path, name: str) -> list[tuple[str, bool]]:
    """(absolute module imported, at module level?) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            # `from .x import y` imports x and, when y is a module, x.y (resolved against real modules later)
            names = ([mod] if node.module else []) + [f"{mod}.{a.name}" for a in node.names]
            found += [(m, id(node) in top) for m in names]
    return found


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_importing_the_agent_loads_no_orchestrator_library() -> None:
    r = _run("import sys, json, siterecovery.replica.agent\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('paramiko', 'pydantic', 'prefect', 'jinja2') or m.startswith('siterecovery.replica.orchestrator'))))")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_the_agent_answers_without_them(tmp_path: Path) -> None:
    """A real command line, as a host runs it, in an interpreter where those libraries cannot load."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\n"
                       "class _No:\n"
                       "    def find_spec(self, name, path=None, target=None):\n"
                       "        if name.split('.')[0] in ('paramiko', 'pydantic', 'prefect'):\n"
                       "            raise ImportError('the agent must not import ' + name)\n"
                       "sys.meta_path.insert(0, _No())\n")
    env = {"PYTHONPATH": f"{tmp_path}:{':'.join(sys.path)}", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "siterecovery.replica.agent", "exists", "--path", str(blocker)],
                       capture_output=True, text=True, timeout=120, check=False, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exists"] is True


@pytest.mark.parametrize("name", [n for n, _ in _modules()])
def test_each_module_imports_alone(name: str) -> None:
    """A fresh interpreter per module: an import cycle shows up as a partially initialised module."""
    r = _run(f"import {name}")
    assert r.returncode == 0, r.stderr[-2000:]


def test_host_side_never_imports_the_orchestrator_side() -> None:
    bad = []
    for name, path in _modules():
        if not _host_side(name):
            continue
        for mod, _ in _imports(path, name):
            top = mod.split(".")[0]
            if mod.startswith("siterecovery."):
                if not mod.startswith("siterecovery.replica") or not _host_side(mod):
                    bad.append(f"{name} imports {mod}")
            elif top not in sys.stdlib_module_names and top not in HOST_THIRD_PARTY:
                bad.append(f"{name} imports {mod} (host side: stdlib, xxhash, zstandard only)")
    assert bad == []


def test_no_lazy_imports_of_project_modules() -> None:
    """Every import of a siterecovery module in replica/ sits at the top of its file: none is tucked into
    a function to dodge a cycle."""
    lazy = [f"{name} imports {mod} inside a function" for name, path in _modules()
            for mod, top in _imports(path, name) if mod.startswith("siterecovery") and not top]
    assert lazy == []


def test_the_import_graph_has_no_cycle() -> None:
    names = {n for n, _ in _modules()}
    graph = {}
    for name, path in _modules():
        deps = set()
        for mod, _ in _imports(path, name):
            while mod and mod not in names:
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not name.startswith(mod + "."):  # a package's own __init__ is no edge
                deps.add(mod)
        graph[name] = deps
    done: set[str] = set()

    def visit(n: str, stack: list[str]) -> None:
        if n in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n):], n]))
        if n in done:
            return
        for d in sorted(graph.get(n, ())):
            visit(d, [*stack, n])
        done.add(n)

    for n in sorted(graph):
        visit(n, [])
