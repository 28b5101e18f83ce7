"""The import-direction check (.ci/check_imports.py) catches what it exists to catch."""

from __future__ import annotations

from pathlib import Path

import pytest

from .support.ci_scripts import CI, load

ROOT = CI.parent


check_imports = load("check_imports")


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "vrai_stream"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_package_itself_passes() -> None:
    assert check_imports.check(ROOT / "vrai_stream") == []


def test_a_leaf_importing_http_is_refused(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "http/__init__.py": "",
            "http/responses.py": "",
            "media/__init__.py": "",
            "media/sniff.py": "from vrai_stream.http import responses\n",
        },
    )
    (problem,) = check_imports.check(root)
    assert "vrai_stream.media.sniff (media) must not import vrai_stream.http.responses" in problem


def test_one_leaf_importing_another_is_refused(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "media/__init__.py": "",
            "media/spool.py": "",
            "debug_store/__init__.py": "",
            "debug_store/s3.py": "def f():\n    from ..media import spool\n",
        },
    )
    (problem,) = check_imports.check(root)
    assert "debug_store.s3 (debug_store) must not import vrai_stream.media.spool" in problem


def test_a_type_only_cycle_inside_a_package_is_found(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "speech/__init__.py": "from vrai_stream.speech import whisper\n",
            "speech/whisper.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from vrai_stream.speech import Transcript\n"
            ),
        },
    )
    problems = check_imports.check(root)
    assert problems == [
        "import cycle: vrai_stream.speech -> vrai_stream.speech.whisper -> vrai_stream.speech"
    ]


def test_base_importing_a_job_part_is_refused(tmp_path: Path) -> None:
    root = _package(tmp_path, {"settings.py": "import vrai_stream.pipeline\n", "pipeline.py": ""})
    (problem,) = check_imports.check(root)
    assert "vrai_stream.settings (settings) must not import vrai_stream.pipeline" in problem


def test_a_cycle_through_a_package_init_is_found(tmp_path: Path) -> None:
    """`settings` imports `auth.config`, which runs `auth/__init__` first: an `__init__` that
    imports the authenticators (which import the settings) breaks `import vrai_stream.settings`
    although no module names another in a circle."""
    root = _package(
        tmp_path,
        {
            "settings.py": "from vrai_stream.auth.config import AuthConfig\nANONYMOUS = 'a'\n",
            "auth/__init__.py": "from vrai_stream.auth.tokens import OffAuthenticator\n",
            "auth/config.py": "class AuthConfig: ...\n",
            "auth/tokens.py": "from vrai_stream.settings import ANONYMOUS\n",
        },
    )
    assert check_imports.check(root) == [
        "import cycle: vrai_stream.auth -> vrai_stream.auth.tokens -> vrai_stream.settings "
        "-> vrai_stream.auth"
    ]


def test_a_submodule_importing_its_sibling_is_no_cycle(tmp_path: Path) -> None:
    """The package a module lives in is under way before it runs: not an edge back."""
    root = _package(
        tmp_path,
        {
            "pipeline/__init__.py": "from vrai_stream.pipeline.segments import Live\n",
            "pipeline/job.py": "class Spec: ...\n",
            "pipeline/segments.py": "from vrai_stream.pipeline.job import Spec\nLive = Spec\n",
        },
    )
    assert check_imports.check(root) == []


@pytest.mark.parametrize("framework", ["starlette.responses", "uvicorn"])
def test_the_web_framework_below_http_is_refused(tmp_path: Path, framework: str) -> None:
    root = _package(
        tmp_path,
        {
            "http/__init__.py": "",
            "http/app.py": f"import {framework}\n",
            "uploads/__init__.py": "",
            "uploads/session.py": f"def f():\n    from {framework} import Response\n",
        },
    )
    (problem,) = check_imports.check(root)
    top = framework.split(".")[0]
    assert problem.endswith(
        f"vrai_stream.uploads.session (uploads) must not import {top}: "
        "the web framework stays in http/"
    ), problem
