"""Test helpers: a real server process on loopback, real speech, real uploads."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
ESPEAK = shutil.which("espeak-ng") or "espeak-ng"

SENTENCE = "The quick brown fox jumps over the lazy dog."
"""Spoken in the basic fixture; the words a transcript must contain are below."""
SENTENCE_WORDS = ("quick", "brown", "fox", "lazy", "dog")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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

    def request_logs(self) -> list[dict[str, Any]]:
        return [entry["request"] for entry in self.logs() if "request" in entry]

    def request_log(self, request_id: str) -> dict[str, Any]:
        """The request's JSON log line (written just before the response; allow it to land)."""
        deadline = time.monotonic() + 5
        while True:
            found = [entry for entry in self.request_logs() if entry["requestId"] == request_id]
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


def run_ffmpeg(*args: str) -> None:
    subprocess.run(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True, timeout=120
    )


def speak(text: str, path: Path) -> Path:
    """A WAV of `text` spoken by espeak-ng (22.05 kHz mono)."""
    subprocess.run([ESPEAK, "-w", str(path), text], check=True, timeout=60)
    return path


def decoded_seconds(data: bytes, tmp_path: Path) -> float:
    """The length of audio in `data`, as ffprobe decodes it."""
    path = tmp_path / "decoded.mp3"
    path.write_bytes(data)
    probe = subprocess.run(
        [
            shutil.which("ffprobe") or "ffprobe",
            "-v", "error", "-show_entries", "format=duration",
            "-of", "default=noprint_wrappers=1:nokey=1", str(path),
        ],
        check=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return float(probe.stdout.strip())


def ffmpeg_seconds(path: Path) -> float:
    """The length of audio `ffmpeg -i path` decodes from the file (it may seek), in seconds."""
    done = subprocess.run(
        [FFMPEG, "-v", "error", "-nostdin", "-i", str(path), "-map", "0:a:0", "-ac", "1",
         "-ar", "8000", "-f", "s16le", "pipe:1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return len(done.stdout) / 16_000


async def chunked(
    data: bytes, *, chunk_size: int = 64 * 1024, delay: float = 0.0
) -> AsyncIterator[bytes]:
    """`data` as a chunked request body (an async generator makes httpx send it chunked)."""
    for offset in range(0, len(data), chunk_size):
        if delay:
            await anyio.sleep(delay)
        yield data[offset : offset + chunk_size]


def form_body(
    boundary: str,
    fields: dict[str, str],
    file_field: str,
    audio: bytes,
    *,
    filename: str,
    content_type: str,
) -> bytes:
    """A whole multipart form as apps send one: the fields first, then the recording."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    return b"".join(parts) + head + audio + b"\r\n" + f"--{boundary}--\r\n".encode()


def has_words(text: str, words: tuple[str, ...], *, at_least: int | None = None) -> bool:
    lowered = text.lower()
    found = sum(word in lowered for word in words)
    return found >= (len(words) if at_least is None else at_least)


class Pending:
    """A request sent in a task of its own, so that the test can act while the server works."""

    def __init__(self) -> None:
        self.answer: httpx.Response | None = None

    @property
    def response(self) -> httpx.Response:
        """The answer; asking before the request is over is the test's own mistake."""
        assert self.answer is not None, "the request has not been answered yet"
        return self.answer


@asynccontextmanager
async def posting(
    client: httpx.AsyncClient,
    url: str,
    *,
    content: bytes | AsyncIterable[bytes],
    headers: dict[str, str] | None = None,
) -> AsyncIterator[Pending]:
    """POST in the background while the block runs; leaving the block waits for the answer."""
    pending = Pending()

    async def send() -> None:
        pending.answer = await client.post(url, content=content, headers=headers)

    async with anyio.create_task_group() as group:
        group.start_soon(send)
        yield pending
