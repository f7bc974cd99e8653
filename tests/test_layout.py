"""The package's layout rules, read from the source with `ast` (nothing is imported):

* no import cycle among the modules of python/sslkernels (and kernels/, installed as
  sslkernels.kernels), counting the imports inside functions too;
* the distributed code (distributed.py, _ring.py) builds on the ops layer: it never
  imports `functional`, the public package or the modules, so nothing re-enters the
  public API (and its validation) from inside it;
* `import sslkernels` does not import Lightning (the monitor's callback is made on
  first access).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"sslkernels": ROOT / "python" / "sslkernels", "sslkernels.kernels": ROOT / "kernels"}
PUBLIC_API = ("sslkernels", "sslkernels.functional", "sslkernels.nn")
EXTENSIONS = ("sslkernels._C",)  # compiled from csrc/: imports nothing of ours


def _module_files() -> Dict[str, Path]:
    files = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package] + parts)] = path
    return files


def _resolve(module: str, is_package: bool, level: int, name: Optional[str]) -> str:
    """The absolute name of `from <level dots><name> import ...` inside `module`."""
    if level == 0:
        return name or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path, known: Set[str]) -> Set[str]:
    """The sslkernels modules `module` imports anywhere in its source (module level and
    inside functions): `from a import b` counts as a.b when that is a module, else a;
    `importlib.import_module("a.b")` with a literal name counts too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {name for name in found if name in known and name != module}


def import_graph() -> Dict[str, Set[str]]:
    files = _module_files()
    known = set(files) | set(EXTENSIONS)
    graph = {module: imports_of(module, path, known) for module, path in files.items()}
    graph.update({name: set() for name in EXTENSIONS})
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle of `graph` as [a, b, ..., a], or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_module_list_is_complete():
    graph = import_graph()
    for name in ("sslkernels", "sslkernels.functional", "sslkernels.distributed", "sslkernels._ring",
                 "sslkernels.ops.contrastive", "sslkernels.kernels.contrastive", "sslkernels.monitor"):
        assert name in graph, name
    # the reader sees function-level imports (today's ring code imports the ops inside functions)
    assert graph["sslkernels.functional"], "no import of functional.py was read"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", ["sslkernels.distributed", "sslkernels._ring"])
def test_distributed_code_builds_on_the_ops_layer(module):
    imported = import_graph()[module]
    public = sorted(imported & set(PUBLIC_API))
    assert not public, f"{module} imports the public API {public}; call the ops layer instead"


def test_the_checks_see_a_cycle_and_a_public_import():
    """The two checks above fail on the layout they forbid (a cycle through a function-level
    import, distributed code importing functional)."""
    graph = {k: set(v) for k, v in import_graph().items()}
    graph["sslkernels.distributed"].add("sslkernels.functional")
    graph["sslkernels.functional"].add("sslkernels.distributed")
    assert find_cycle(graph) is not None
    src = "def f():\n    from sslkernels import functional\n    return functional\n"
    path = ROOT / "build" / "_layout_probe.py"
    path.parent.mkdir(exist_ok=True)
    try:
        path.write_text(src)
        assert imports_of("sslkernels.distributed", path, set(graph)) == {"sslkernels.functional"}
    finally:
        path.unlink()


def test_import_sslkernels_does_not_import_lightning():
    """Lightning is probed on first access of `sslkernels.monitor.RankMeCallback`, not at import;
    where Lightning is installed, that access does import it (so the first check can fail)."""
    code = ("import importlib.util, sys\n"
            "import sslkernels, sslkernels.monitor\n"
            "def loaded():\n"
            "    return sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
            "assert not loaded(), loaded()[:5]\n"
            "installed = any(importlib.util.find_spec(m) for m in ('lightning', 'pytorch_lightning'))\n"
            "assert hasattr(sslkernels.monitor, 'RankMeCallback') == installed\n"
            "assert bool(loaded()) == installed, loaded()[:5]\n"
            "print('installed' if installed else 'absent')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
