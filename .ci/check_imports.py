#!/usr/bin/env python3
"""Fail on any import cycle in vrai_stream, and on any import against the layers' direction.

Imports run one way: `cli` -> `http/` -> `services` -> `pipeline` and `state` -> the leaf
packages -> base.  A leaf package (auth, bodies, media, speech, debug_store, uploads, webhooks)
imports base modules and itself, never another leaf, the pipeline or HTTP.  Every import
counts, those under `TYPE_CHECKING` and inside functions included, and so does what Python
imports on the way: importing `a.b.c` runs `a/__init__` and `a/b/__init__` first, so a cycle
through a package's `__init__` is a cycle.  The web framework (starlette, uvicorn) is imported
in `http/` only.  Exemptions are in `EXEMPTIONS`, each with its reason.

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
    "s3_client",
    "background",
}
EXEMPTIONS = {
    "vrai_stream.auth.config": (
        "base, wherever it sits: configuration that lives beside its part (auth) but is "
        "read by `settings`"
    ),
}
"""Modules that rank other than their folder says, and why."""
BASE_MODULES = set(EXEMPTIONS)
WEB_FRAMEWORK = {"starlette", "uvicorn"}
WEB_PART = "http"
"""The only part that imports the web framework: everything below it stays plain Python."""
LEAVES = {"auth", "bodies", "media", "speech", "debug_store", "uploads", "webhooks"}
LAYERS = {"pipeline": 2, "state": 2, "services": 3, "http": 4, "cli": 5, "__main__": 5}
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


def imports(module: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int, bool]]:
    """Every package module `module` imports, with the line that does it, and whether it is
    run on the way only: each named module, then the packages Python runs first (`a.b.c`
    runs `a.b`), except those `module` itself lives in (under way, or done, before it runs).
    A package run on the way counts for cycles; the direction rules judge what is named."""
    for target, line in _named_imports(path, module, known, package_only=True):
        yield target, line, False
        for ancestor in _ancestors(target):
            if ancestor in known and ancestor not in _ancestors(module):
                yield ancestor, line, True


def _ancestors(module: str) -> list[str]:
    """`a.b.c` -> `a.b`, `a` (the root package is every module's, and never counts)."""
    pieces = module.split(".")
    return [".".join(pieces[:end]) for end in range(len(pieces) - 1, 1, -1)]


def third_party(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """The top-level name of every outside package `module` imports, with its line."""
    for target, line in _named_imports(path, module, {}, package_only=False):
        top = target.split(".")[0]
        if top and top != PACKAGE:
            yield top, line


def _named_imports(
    path: Path, module: str, known: dict[str, Path], *, package_only: bool
) -> Iterator[tuple[str, int]]:
    """The modules an import statement names, resolved (relative imports too)."""
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
            if not package_only or (target.split(".")[0] == PACKAGE and target in known):
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
        if part(module) != WEB_PART:
            for outside, line in third_party(path, module):
                if outside in WEB_FRAMEWORK:
                    problems.append(
                        f"{path}:{line}: {module} ({part(module)}) must not import {outside}: "
                        f"the web framework stays in {WEB_PART}/"
                    )
        for target, line, on_the_way in imports(module, path, known):
            if target == module:
                continue
            graph[module].add(target)
            source, dest = part(module), part(target)
            if source == dest or on_the_way:
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
