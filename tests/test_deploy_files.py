"""The Dockerfile and fly.toml, checked without Docker: lint, and agreement with the service."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from vrai_stream.app import create_app
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


def test_the_lock_pins_every_runtime_dependency() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    pinned = {line.split("==")[0].lower() for line in lock.splitlines() if "==" in line}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower()
        assert name in pinned, f"{name} is not in requirements.lock"
    assert "--hash=sha256:" in lock
