#!/usr/bin/env python3
"""Audit uv.lock against PyPI's vulnerability records: pip-audit's own source.

pip-audit asks PyPI's per-release JSON API (`/pypi/NAME/VERSION/json`) for each pin.  Where
that answers, so does this script, with the same data.  Where it does not (this project's
build network serves only the per-project document, `/pypi/NAME/json`, whose
`vulnerabilities` are those of the latest release), a pin on the latest release is still
checked exactly; a pin behind it cannot be, and is listed with why.

The verdict depends on the commit, not on what the index published since: it fails only on
a known, unwithdrawn vulnerability of a pinned release.  A pin behind the latest release,
or one PyPI could not be asked about, is information and never a failure.  `assess` holds
these rules and is tested with records given to it (tests/test_audit_deps.py).

Run: .venv/bin/python .ci/audit_deps.py [uv.lock]
"""

from __future__ import annotations

import json
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PYPI = "https://pypi.org/pypi"
ATTEMPTS = 3
REFRESH = ".venv/bin/uv lock --upgrade"


@dataclass(frozen=True)
class Pin:
    name: str
    version: str


@dataclass(frozen=True)
class Record:
    """What PyPI answered about one pin; any part may be missing."""

    release: list[dict[str, Any]] | None = None
    """The pinned release's own `vulnerabilities`, when its document could be had."""
    latest: str | None = None
    """The project's latest release, from the project document."""
    latest_vulnerabilities: list[dict[str, Any]] = field(default_factory=list)
    """The project document's `vulnerabilities`: those of the latest release."""
    error: str | None = None
    """Why PyPI could not be asked at all."""


@dataclass
class Report:
    checked: list[Pin] = field(default_factory=list)
    vulnerable: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.vulnerable)

    def lines(self, source: str) -> list[str]:
        total = len(self.checked) + len(self.unchecked)
        out = [f"{source}: {total} pins; {len(self.checked)} checked against their own record"]
        out += [f"  not checked exactly: {line}" for line in self.unchecked]
        out += [f"  VULNERABLE {line}" for line in self.vulnerable]
        if not self.failed:
            out.append("no known vulnerability in any checked pin")
        return out


def describe(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Each live advisory as `ID (fixed in ...)`; withdrawn ones are not advisories."""
    return [
        f"{record['id']} (fixed in {', '.join(record.get('fixed_in') or []) or 'no release'})"
        for record in records
        if not record.get("withdrawn")
    ]


def assess(
    pins: Iterable[Pin],
    records: Mapping[Pin, Record],
    held_by: Callable[[str, str], list[str]] = lambda name, latest: [],
) -> Report:
    """The audit's rules: fail on a known vulnerability of a pin, list what cannot be checked."""
    report = Report()
    for pin in sorted(set(pins), key=lambda p: (p.name, p.version)):
        record = records.get(pin, Record(error="not asked"))
        label = f"{pin.name}=={pin.version}"
        if record.release is not None:
            advisories = describe(record.release)
        elif record.latest == pin.version:
            advisories = describe(record.latest_vulnerabilities)
        elif record.latest is not None:
            holders = held_by(pin.name, record.latest)
            reason = (
                f"held back by {'; '.join(holders)}"
                if holders
                else f"the lock predates it (`{REFRESH}` moves it)"
            )
            report.unchecked.append(f"{label} (latest is {record.latest}): {reason}")
            continue
        else:
            report.unchecked.append(f"{label}: PyPI could not be asked ({record.error})")
            continue
        report.checked.append(pin)
        if advisories:
            report.vulnerable.append(f"{label}: {'; '.join(advisories)}")
    return report


def read_pins(lock: Path) -> list[Pin]:
    """Every release uv.lock takes from a package index (the project itself is not one)."""
    document = tomllib.loads(lock.read_text())
    return [
        Pin(canonicalize_name(package["name"]), package["version"])
        for package in document["package"]
        if "registry" in package.get("source", {})
    ]


def fetch(url: str) -> dict[str, Any] | None:
    """The JSON document at `url`; None when PyPI has none; raises when PyPI cannot be asked."""
    for attempt in range(ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (https only)
                return json.load(response)  # type: ignore[no-any-return]
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            if attempt == ATTEMPTS - 1:
                raise
        except OSError:
            if attempt == ATTEMPTS - 1:
                raise
        time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def ask(pin: Pin) -> Record:
    try:
        release = fetch(f"{PYPI}/{pin.name}/{pin.version}/json")
        if release is not None:
            return Record(release=release.get("vulnerabilities") or [])
        project = fetch(f"{PYPI}/{pin.name}/json")
    except OSError as error:
        return Record(error=str(error))
    if project is None:
        return Record(error="PyPI has no such project")
    return Record(
        latest=project["info"]["version"],
        latest_vulnerabilities=project.get("vulnerabilities") or [],
    )


def installed_holders(name: str, latest: str) -> list[str]:
    """Installed distributions whose requirements (their extras' too) exclude `name`'s latest."""
    found = []
    for dist in metadata.distributions():
        extras = ["", *(dist.metadata.get_all("Provides-Extra") or [])]
        for text in dist.requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({"extra": e}) for e in extras):
                continue
            if canonicalize_name(requirement.name) != name:
                continue
            if not requirement.specifier.contains(Version(latest), prereleases=False):
                found.append(f"{dist.metadata['Name']} needs {name}{requirement.specifier}")
    return sorted(set(found))


def main() -> int:
    lock = Path(sys.argv[1] if len(sys.argv) > 1 else "uv.lock")
    pins = read_pins(lock)
    with ThreadPoolExecutor(8) as pool:
        records = dict(zip(pins, pool.map(ask, pins), strict=True))
    report = assess(pins, records, installed_holders)
    print("\n".join(report.lines(str(lock))))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
