"""The README lists every setting the service reads and every error code it answers with.

Both are contracts with people who cannot read the code: an operator looking for a knob, a
client developer branching on `code`.
"""

from __future__ import annotations

import re
from pathlib import Path

from vrai_stream import errors

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

_READ = re.compile(
    r"""\b(?:text|integer|optional_integer|number|choice|choice_int|path)\(\s*"([A-Z][A-Z0-9_]+)\""""
)


def table_names(text: str, column: int = 0) -> set[str]:
    """The `names` in one column of the tables in `text` (several may share a cell)."""
    names: set[str] = set()
    for line in text.splitlines():
        cells = line.strip("|").split(" | ")
        if line.startswith("| ") and len(cells) > column:
            names.update(re.findall(r"`([^`]+)`", cells[column]))
    return names


def test_every_setting_is_in_the_readme() -> None:
    read = set(_READ.findall((ROOT / "vrai_stream" / "settings.py").read_text()))
    assert {"VRAI_DEBUG_STORE", "VRAI_DEBUG_DIR_MAX_BYTES", "BUCKET_NAME", "PORT"} <= read
    # A variable read as another's fallback may be named in that one's row.
    missing = read - table_names(README) - table_names(README, column=1)
    assert not missing, f"read by settings.py, not in the README's settings table: {missing}"


def test_every_error_code_is_in_the_readme() -> None:
    # `client_disconnected` is never sent (the client is gone) and `summary_failed` only
    # shows as `summaryError`: the README explains both below its table.
    listed = table_names(README.split("### Errors", 1)[1].split("\n### ", 1)[0], column=1)
    unlisted = {"client_disconnected", "summary_failed"}
    missing = {error.code for error in errors.ALL_ERRORS} - listed - unlisted
    assert not missing, f"error codes missing from the README's errors table: {missing}"
    for code in unlisted:
        assert f"`{code}`" in README, code


def code_map() -> dict[str, str]:
    """The code map's rows: what each `where` cell names, and what its row says it owns."""
    section = README.split("## Code map", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = line.strip("|").split(" | ")
        if line.startswith("| ") and len(cells) == 2 and cells[0] not in ("where", "---"):
            rows[cells[0]] = cells[1]
    return rows


def test_the_code_map_names_every_module() -> None:
    """A module the map does not name is one nobody finds from the README."""
    rows = code_map()
    package = ROOT / "vrai_stream"
    unnamed = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.name == "__init__.py" and relative.parent != Path("pipeline"):
            continue  # a package's docstring, named by its folder's row
        if len(relative.parts) == 1:
            if not any(f"`{relative.name}`" in where for where in rows):
                unnamed.append(str(relative))
            continue
        folder = f"`{relative.parts[0]}/`"
        owns = " ".join(text for where, text in rows.items() if folder in where)
        if f"`{path.stem}`" not in owns:
            unnamed.append(str(relative))
    assert not unnamed, f"modules the README's code map does not name: {unnamed}"
