#!/usr/bin/env python3
"""The house's floors, checked from the code's imports (run by scripts/test).

Every module of `protocol/` and `replicator/` is parsed (nothing is run). The check fails when:
- `protocol/` imports I/O (trio, socket, sqlite3, structlog) or `replicator`: it stays sans-IO;
- a module imports a package of a higher floor (see FLOORS; same floor is fine);
- modules import each other in a circle. Imports made only for type checking count too, except
  any listed in ALLOWED_CIRCLE_EDGES.

    scripts/check_imports.py          # prints the floors and exits 1 on any breach
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# From the ground up; a module may import its own floor or any below it.
FLOORS: list[tuple[str, ...]] = [
    ("protocol",),
    ("replicator", "replicator.log", "replicator.errors", "replicator.config", "replicator.clock"),
    ("replicator.harness",),
    ("replicator.capture",),
    ("replicator.state", "replicator.app_migrations"),
    ("replicator.apply",),
    ("replicator.sync",),
    ("replicator.durability",),
    ("replicator.ops",),
    ("replicator.node",),
    ("replicator.demo",),
    ("replicator.cli", "replicator.__main__"),
]
SANS_IO_FORBIDDEN = ("trio", "socket", "sqlite3", "structlog", "replicator")
# Type-checking imports that may run up a floor (none: the node's children name narrow ports).
ALLOWED_CIRCLE_EDGES: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, name: str, modules: set[str]) -> Iterator[tuple[str, bool]]:
    """(imported module, only for type checking) for every import anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in typing_only
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from pkg import module` needs the module, not the face
                named = f"{base}.{alias.name}"
                yield (named if named in modules else base), id(node) in typing_only


def floor_of(name: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, floor)
    for floor, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), floor)
    return None if best is None else best[1]


def main() -> int:
    modules = {
        module_name(path): path
        for top in ("protocol", "replicator")
        for path in sorted((ROOT / top).rglob("*.py"))
    }
    edges: dict[str, set[str]] = {name: set() for name in modules}
    problems: list[str] = []
    for name, path in modules.items():
        for target, typing_only in imports(path, name, set(modules)):
            if name.startswith("protocol") and target.split(".")[0] in SANS_IO_FORBIDDEN:
                problems.append(f"{name} imports {target}: protocol/ stays sans-IO")
            if target not in modules or target == name:
                continue
            if typing_only and (name, target) in ALLOWED_CIRCLE_EDGES:
                continue
            here, there = floor_of(name), floor_of(target)
            if here is None:
                problems.append(f"{name} is on no floor: add it to FLOORS")
            elif there is not None and there > here:
                problems.append(f"{name} (floor {here}) imports {target} (floor {there})")
            edges[name].add(target)
    problems += [f"modules in a circle: {', '.join(members)}" for members in circles(edges)]
    for problem in sorted(set(problems)):
        print(f"check_imports: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_imports: {len(modules)} modules, no circle, every import down or level")
    return 1 if problems else 0


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The modules of each strongly connected component larger than one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


if __name__ == "__main__":
    sys.exit(main())
