"""The service as its own process on loopback: start it, read its log, wait for it to idle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


PROBES = frozenset({"health", "metrics", "openapi", "page"})
"""Endpoints that read no body, polled by helpers: logged like any other."""


@dataclass
class Server:
    """A `vrai-stream serve` process of its own, with its own temp folder and log."""

    url: str
    process: subprocess.Popen[bytes]
    tmp_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def temp_files(self) -> list[Path]:
        return sorted(self.tmp_dir.iterdir())

    def open_temp_files(self, folder: Path | None = None) -> list[str]:
        """Files the server holds open in its temp folder (or in `folder`).

        Spools roll over to unnamed (O_TMPFILE) files on Linux, which no directory listing
        shows: only the process's descriptors reveal them.
        """
        fd_dir = Path(f"/proc/{self.process.pid}/fd")
        targets = []
        for fd in os.listdir(fd_dir):
            try:
                targets.append(os.readlink(fd_dir / fd))
            except OSError:
                continue  # closed while we looked
        return [target for target in targets if target.startswith(f"{folder or self.tmp_dir}/")]

    def logs(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def metric(self, sample: str) -> float:
        """The value of one sample on /metrics, `name{label="v"}` as written there; 0 if absent."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        prefix = f"{sample} "
        values = [
            float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)
        ]
        return values[0] if values else 0.0

    def all_request_logs(self) -> list[dict[str, Any]]:
        """Every request's log line, the probes' (`/health`, `/metrics`...) included."""
        return [entry["request"] for entry in self.logs() if "request" in entry]

    def request_logs(self) -> list[dict[str, Any]]:
        """The log lines of requests a test makes: not those of the probes a test (or its
        helpers) polls, such as `/health` while waiting for the model."""
        return [line for line in self.all_request_logs() if line.get("endpoint") not in PROBES]

    def request_log(self, request_id: str) -> dict[str, Any]:
        """The request's JSON log line (written just before the response; allow it to land)."""
        deadline = time.monotonic() + 5
        while True:
            found = [line for line in self.all_request_logs() if line["requestId"] == request_id]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, f"{len(found)} log lines for {request_id}"
                return found[0]
            time.sleep(0.02)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no ffmpeg runs and no temp file is left or open, or fail saying which."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.children() and not self.temp_files() and not self.open_temp_files():
                return
            time.sleep(0.05)
        assert self.children() == [], "ffmpeg (or another child) outlived its request"
        assert self.temp_files() == [], "a temp file outlived its request"
        assert self.open_temp_files() == [], "a spool file is still open after its request"

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there 10 s on: no test leaves a process behind."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch(
    args: list[str],
    env: dict[str, str],
    log_path: Path,
    *,
    name: str,
    probe: str,
    status: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server and wait for `probe` (to give `status`, if set): tests never race it."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start-up:\n{log_path.read_text()}")
        try:
            if status in (None, httpx.get(probe, timeout=1).status_code):
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    stop_process(process)
    raise RuntimeError(f"{name} did not answer {probe}:\n{log_path.read_text()}")


def service_env(tmp_dir: Path, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a `vrai_stream` process: no setting of the caller's shell leaks in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VRAI_", "OPENAI_", "AWS_")) and key not in ("BUCKET_NAME",)
    }
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "VRAI_TRANSCRIBER": "local",
            "VRAI_TMP_DIR": str(tmp_dir),
            "VRAI_DEBUG_STORE": "off",
            **(overrides or {}),
        }
    )
    return env


def start_server(base_dir: Path, env: dict[str, str] | None = None) -> Server:
    base_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = base_dir / "spool"
    tmp_dir.mkdir(exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_env = service_env(tmp_dir, {"PYTHONUNBUFFERED": "1", **(env or {})})
    log_path = base_dir / "server.log"
    process = launch(
        [sys.executable, "-m", "vrai_stream.cli", "serve", "--port", str(port)],
        server_env,
        log_path,
        name="server",
        probe=f"{url}/health",
        status=200,
    )
    return Server(url=url, process=process, tmp_dir=tmp_dir, log_path=log_path, env=server_env)


def start_servers(specs: dict[str, tuple[Path, dict[str, str]]]) -> dict[str, Server]:
    """Start several servers at once: each spends its start-up importing, not waiting."""
    started: dict[str, Server] = {}
    failures: list[BaseException] = []

    def start(name: str, folder: Path, env: dict[str, str]) -> None:
        try:
            started[name] = start_server(folder, env)
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=start, args=(name, folder, env))
        for name, (folder, env) in specs.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        for server in started.values():
            server.stop()
        raise failures[0]
    return started
