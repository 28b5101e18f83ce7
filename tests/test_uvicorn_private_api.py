"""What http/server.py relies on in uvicorn's httptools protocol, which is not public API.

uvicorn is pinned to one minor release (pyproject.toml); these tests fail loudly, naming
what changed, when a new release moves what the subclass overrides or reads.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from vrai_stream.http.server import StagedCloseProtocol

ROOT = Path(__file__).resolve().parents[1]

OVERRIDDEN = [
    "connection_made",
    "data_received",
    "eof_received",
    "connection_lost",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "send_400_response",
]


def test_uvicorn_is_pinned_below_its_next_minor_release() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (uvicorn,) = [Requirement(r) for r in project["dependencies"] if r.startswith("uvicorn")]
    installed = Version(metadata.version("uvicorn"))
    assert installed in uvicorn.specifier
    next_minor = Version(f"{installed.major}.{installed.minor + 1}")
    assert next_minor not in uvicorn.specifier, "the pin must stop before the next minor"


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_each_overridden_method_keeps_its_signature(name: str) -> None:
    ours = inspect.signature(getattr(StagedCloseProtocol, name))
    theirs = inspect.signature(getattr(HttpToolsProtocol, name))
    assert list(ours.parameters) == list(theirs.parameters), f"uvicorn changed {name}"


@pytest.mark.parametrize(
    ("owner", "attribute"),
    [
        (HttpToolsProtocol, "cycle"),
        (HttpToolsProtocol, "loop"),
        (HttpToolsProtocol, "transport"),
        (RequestResponseCycle, "more_body"),
        (RequestResponseCycle, "disconnected"),
    ],
)
def test_the_attributes_read_are_still_set(owner: type, attribute: str) -> None:
    source = inspect.getsource(owner)
    assert re.search(rf"self\.{attribute}\b\s*(:[^=]*)?=", source), f"{owner.__name__}.{attribute}"
