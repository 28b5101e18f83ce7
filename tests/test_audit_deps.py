"""The dependency audit's rules (.ci/audit_deps.py), shown with the records PyPI would give.

CI runs the audit against PyPI itself; these tests pin what it concludes from any answer, so
that its verdict is seen to depend on the lock, never on what the index published since.
"""

from __future__ import annotations

from pathlib import Path

from .support.ci_scripts import CI, load

audit = load("audit_deps")
Pin, Record = audit.Pin, audit.Record

ADVISORY = {"id": "PYSEC-2099-1", "fixed_in": ["2.0.1"], "withdrawn": None}
OPENAI = Pin("openai", "3.54.0")
URLLIB3 = Pin("urllib3", "2.0.0")


def test_pins_behind_the_latest_release_are_listed_and_pass() -> None:
    records = {
        OPENAI: Record(latest="3.60.0", latest_vulnerabilities=[]),
        URLLIB3: Record(latest="2.5.0", latest_vulnerabilities=[ADVISORY]),
    }
    report = audit.assess(records, records)
    assert not report.failed
    assert report.checked == []
    text = "\n".join(report.lines("uv.lock"))
    assert "openai==3.54.0 (latest is 3.60.0)" in text
    assert "urllib3==2.0.0 (latest is 2.5.0)" in text
    assert "uv lock --upgrade" in text
    assert "no known vulnerability" in text


def test_the_reason_a_pin_is_held_back_is_named() -> None:
    records = {Pin("botocore", "1.40.61"): Record(latest="1.44.8")}
    report = audit.assess(
        records, records, lambda name, latest: [f"aiobotocore needs {name}<1.40.62"]
    )
    assert not report.failed
    assert report.unchecked == [
        "botocore==1.40.61 (latest is 1.44.8): held back by aiobotocore needs botocore<1.40.62"
    ]


def test_a_known_vulnerability_of_the_pinned_release_fails() -> None:
    records = {URLLIB3: Record(release=[ADVISORY], latest=None)}
    report = audit.assess(records, records)
    assert report.failed
    assert report.vulnerable == ["urllib3==2.0.0: PYSEC-2099-1 (fixed in 2.0.1)"]
    assert "VULNERABLE urllib3==2.0.0" in "\n".join(report.lines("uv.lock"))


def test_a_pin_on_the_latest_release_is_checked_against_the_project_document() -> None:
    pin = Pin("pycrypto", "2.6.1")
    unfixed: dict[str, object] = {"id": "GHSA-6528-wvf6-f6qg", "fixed_in": [], "withdrawn": None}
    records = {pin: Record(latest="2.6.1", latest_vulnerabilities=[unfixed])}
    report = audit.assess(records, records)
    assert report.failed
    assert report.checked == [pin]
    assert report.vulnerable == ["pycrypto==2.6.1: GHSA-6528-wvf6-f6qg (fixed in no release)"]


def test_the_release_record_wins_over_the_project_document() -> None:
    records = {OPENAI: Record(release=[], latest="3.54.0", latest_vulnerabilities=[ADVISORY])}
    report = audit.assess(records, records)
    assert not report.failed and report.checked == [OPENAI]


def test_a_withdrawn_advisory_is_not_a_vulnerability() -> None:
    withdrawn = {**ADVISORY, "withdrawn": "2026-01-01T00:00:00Z"}
    records = {URLLIB3: Record(release=[withdrawn])}
    assert not audit.assess(records, records).failed


def test_a_pin_pypi_could_not_be_asked_about_is_listed_and_passes() -> None:
    records = {OPENAI: Record(error="timed out")}
    report = audit.assess(records, records)
    assert not report.failed
    assert report.unchecked == ["openai==3.54.0: PyPI could not be asked (timed out)"]


def test_pins_come_from_every_index_package_in_uv_lock(tmp_path: Path) -> None:
    lock = tmp_path / "uv.lock"
    lock.write_text(
        """version = 1
requires-python = ">=3.11"

[[package]]
name = "Numpy"
version = "2.4.6"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "numpy"
version = "2.3.0"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "vrai-stream"
version = "0.1.0"
source = { editable = "." }
"""
    )
    assert audit.read_pins(lock) == [Pin("numpy", "2.4.6"), Pin("numpy", "2.3.0")]


def test_the_real_lock_is_read() -> None:
    pins = audit.read_pins(CI.parent / "uv.lock")
    names = {pin.name for pin in pins}
    # the runtime, the `local` extra and the `dev` extra are all in the one lock
    assert {"starlette", "openai", "faster-whisper", "pytest", "moto"} <= names
    assert "vrai-stream" not in names


def test_a_lock_ahead_of_the_index_is_not_a_failure() -> None:
    # a yanked latest release can put the index behind the lock: still information
    records = {OPENAI: Record(latest="3.50.0")}
    assert not audit.assess(records, records).failed
