"""The house's shape, checked on the source (``ast``; nothing is imported):

* no circle of imports between decodekit's modules, lazy imports inside functions included;
* no ``_private`` name imported from another module (packages meet through public names);
* the front doors (CLI, server, Ray, the batch runner, the bench) are above everything else:
  no other module imports them;
* no function over 60 lines, and no module over 500 lines but the few listed in
  ``OVERSIZED``, which may only shrink (issue 25 splits them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FRONT_DOORS = ("decodekit.cli", "decodekit.serve", "decodekit.ray", "decodekit.batch_runner",
               "decodekit.bench", "decodekit.demo", "decodekit.__main__",
               "decodekit.strategies.eagle.train", "decodekit.train_cli")  # training runs generate: a front door
# module -> its line count when this test was written; it may not grow
OVERSIZED: dict[str, int] = {}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted((SRC / "decodekit").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, str, int]]:
    """``(module imported, name imported or "", line)`` for every decodekit import in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "decodekit"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "decodekit":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in known else (base, alias.name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _, _ in imports(name, path, known) if m in known and m != name}
            for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_circle_of_imports():
    assert cycles(graph()) == []


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    private = [f"{known[name].relative_to(SRC)}:{line} imports {module}.{alias}"
               for name, path in known.items() for module, alias, line in imports(name, path, known)
               if alias.startswith("_") and not alias.startswith("__") and module != name]
    assert private == []


def is_front_door(name: str) -> bool:
    return any(name == door or name.startswith(door + ".") for door in FRONT_DOORS)


def test_only_front_doors_import_front_doors():
    upward = [f"{name} imports {target}" for name, targets in graph().items()
              for target in targets if is_front_door(target) and not is_front_door(name)
              and name != "decodekit"]  # the package's __init__ exports every public name
    assert upward == []


def lengths() -> list[tuple[str, int, list[tuple[str, int]]]]:
    out = []
    for path in sorted((SRC / "decodekit").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        funcs = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(text))
                 if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
        out.append((str(path.relative_to(SRC)), len(text.splitlines()), funcs))
    return out


def test_no_function_over_60_lines():
    assert [(f, name, n) for f, _, funcs in lengths() for name, n in funcs if n > MAX_FUNCTION_LINES] == []


@pytest.mark.parametrize("limit_kind", ["new", "listed"])
def test_modules_stay_small(limit_kind):
    sizes = {f: n for f, n, _ in lengths()}
    if limit_kind == "new":
        assert {f: n for f, n in sizes.items() if n > MAX_MODULE_LINES and f not in OVERSIZED} == {}
    else:  # a listed module may shrink, never grow; one back under the limit leaves the list
        assert {f: (sizes.get(f), cap) for f, cap in OVERSIZED.items()
                if sizes.get(f, 0) > cap or sizes.get(f, 0) <= MAX_MODULE_LINES} == {}


def module_level_imports(path: Path) -> set[str]:
    """Top-level package names a module imports when it is loaded (lazy imports excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_the_llama_cpp_backend_loads_no_transformers_cache_code():
    """llamacpp.py and what it loads implement the KV-state interface without transformers."""
    known, todo, seen = modules(), ["decodekit.llamacpp"], set()
    while todo:
        name = todo.pop()
        seen.add(name)
        todo += [m for m in module_level_imports(known[name]) if m in known and m not in seen
                 and m != "decodekit"]
    outside = {m for name in seen for m in module_level_imports(known[name]) if not m.startswith("decodekit")}
    assert "decodekit.kvstate" in seen and "decodekit.cache" not in seen
    assert not any(m.split(".")[0] == "transformers" for m in outside), sorted(outside)
