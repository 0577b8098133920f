"""The import graph of edgevlm, read from the source (no module is imported).

    python3 tools/imports.py build/export_onnx.py     # the edgevlm files that script reads

The Makefile uses it so that each build stage reruns when, and only when, code it reads
changed; tests/test_layout.py uses it to keep the package free of import cycles. An import
anywhere in a file counts (inside a function or under TYPE_CHECKING too): it ties the two
modules together as much as a top-level one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "edgevlm"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, module: str | None, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that the file imports (`module`: its own dotted name, for
    relative imports; None for a script)."""
    package = (module if path.name == "__init__.py" else module.rpartition(".")[0]) if module else ""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from the module's package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from m import sub` may name a module
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules it imports (a package and its own submodules left out)."""
    known = modules(root)
    return {m: {d for d in imports(p, m, known) if not (d.startswith(m + ".") or m.startswith(d + "."))}
            for m, p in known.items()}


def cycles(root: Path = ROOT) -> list[list[str]]:
    """Each import cycle found by a depth-first walk, as the path that closes it."""
    g, state, found = graph(root), {}, []  # state: 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2
    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return found


def reads(script: Path, root: Path = ROOT) -> list[Path]:
    """The package files a script reads: what it imports, transitively, with the packages'
    __init__ files on the way."""
    known = modules(root)
    todo, seen = sorted(imports(script, None, known)), set()
    while todo:
        m = todo.pop()
        for name in [m] + [m.rsplit(".", i)[0] for i in range(1, m.count(".") + 1)]:
            if name not in seen and name in known:
                seen.add(name)
                todo.extend(imports(known[name], name, known) - seen)
    return sorted(known[m] for m in seen)


if __name__ == "__main__":
    print(" ".join(str(p.relative_to(ROOT)) for script in sys.argv[1:] for p in reads(ROOT / script)))
