#!/usr/bin/env python3
"""Fail on any import cycle in vrai_stream, and on any import against the layers' direction.

Imports run one way: `cli` -> `http/` -> `services` -> `pipeline` -> the leaf packages -> base.
A leaf package (auth, bodies, media, speech, debug_store, uploads) imports base modules and
itself, never another leaf, the pipeline or HTTP.  Every import counts, those under
`TYPE_CHECKING` and inside functions included.

Run: .venv/bin/python .ci/check_imports.py [package folder]
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "vrai_stream"
BASE = {
    "settings",
    "errors",
    "telemetry",
    "metrics",
    "memory_plan",
    "warmup",
    "admission",
    "heap",
    "spool",
}
BASE_MODULES = {"vrai_stream.auth.config"}
"""Configuration that lives beside its part but is read by `settings`: base, wherever it sits."""
LEAVES = {"auth", "bodies", "media", "speech", "debug_store", "uploads"}
LAYERS = {"pipeline": 2, "services": 3, "http": 4, "cli": 5, "__main__": 5}
"""Rank of each part above the leaves (1) and base (0): a part imports only lower ranks."""


def part(module: str) -> str:
    """`vrai_stream.media.sniff` -> `media`; the package itself is `__init__`."""
    if module in BASE_MODULES:
        return "base"
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def rank(name: str) -> int:
    if name in BASE or name in ("__init__", "base"):
        return 0
    if name in LEAVES:
        return 1
    if name not in LAYERS:
        raise SystemExit(f"{name}: a part of {PACKAGE} that no layer names: add it to a layer")
    return LAYERS[name]


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(module: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """Every package module `module` imports, with the line that does it."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            # `from x import y` imports x.y when y is a module, else x
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == PACKAGE and target in known:
                yield target, node.lineno


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def check(root: Path) -> list[str]:
    known = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    problems = []
    for module, path in known.items():
        for target, line in imports(module, path, known):
            if target == module:
                continue
            graph[module].add(target)
            source, dest = part(module), part(target)
            if source == dest:
                continue
            if rank(dest) > rank(source) or (rank(dest) == rank(source) == 1):
                problems.append(f"{path}:{line}: {module} ({source}) must not import {target}")
    cycle = find_cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else PACKAGE)
    problems = check(root)
    print("\n".join(problems) or f"{root}: no import cycle, every import runs one way")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
