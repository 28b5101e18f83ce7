"""A machine's life: start-up sweep, graceful drain on SIGTERM, metrics after traffic."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import anyio
import httpx
import psutil
import pytest

from .support.client import chunked, posting
from .support.server import Server, start_server

pytestmark = pytest.mark.anyio

DEAD_PID = 4_000_000  # above pid_max: no process can have it


async def test_sigterm_lets_a_running_upload_finish_and_refuses_new_work(
    tmp_path: Path, media: Path
) -> None:
    server = start_server(tmp_path / "server", {"VRAI_DRAIN_SECONDS": "20"})
    audio = (media / "tone60.wav").read_bytes()  # ~11 MB, paced over ~3 s
    try:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=60) as client,
            posting(
                client,
                "/v1/transcriptions?fromTime=0&toTime=3",
                content=chunked(audio, chunk_size=256 * 1024, delay=0.07),
                headers={"Accept": "audio/mpeg"},
            ) as slow,
        ):
            await anyio.sleep(1.0)
            server.process.send_signal(signal.SIGTERM)
            await anyio.sleep(0.3)
            # A new connection finds no listener (or, racing it, a 503).
            try:
                async with httpx.AsyncClient(base_url=server.url, timeout=5) as fresh:
                    late = await fresh.post("/v1/transcriptions", content=audio[:1000])
                assert late.status_code == 503, late.text
            except httpx.ConnectError:
                pass
        assert slow.response.status_code == 200, slow.response.text
        assert slow.response.headers["content-type"] == "audio/mpeg"
        server.process.wait(timeout=20)
        assert server.temp_files() == []
    finally:
        server.stop()


async def test_drain_gives_up_after_its_grace_and_cleans_up(tmp_path: Path, media: Path) -> None:
    server = start_server(tmp_path / "server", {"VRAI_DRAIN_SECONDS": "1"})
    audio = (media / "tone60.wav").read_bytes()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.move_on_after(15):
                async with anyio.create_task_group() as group:

                    async def endless_upload() -> None:
                        # The server cuts the upload short, as it must.
                        with contextlib.suppress(httpx.HTTPError):
                            await client.post(
                                "/v1/transcriptions",
                                content=chunked(audio, chunk_size=16 * 1024, delay=0.2),
                            )

                    group.start_soon(endless_upload)
                    await anyio.sleep(1.0)
                    ffmpegs = server.children()
                    assert ffmpegs, "ffmpeg should be running mid-upload"
                    stopped_at = time.monotonic()
                    server.process.send_signal(signal.SIGTERM)
                    await anyio.to_thread.run_sync(server.process.wait, 15)
                    group.cancel_scope.cancel()
        assert server.process.returncode is not None
        assert time.monotonic() - stopped_at < 8, "the drain outlived its grace"
        assert server.temp_files() == []
        assert not any(_alive(ffmpeg) for ffmpeg in ffmpegs), "ffmpeg outlived the server"
    finally:
        server.stop()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_start_up_removes_temp_files_of_dead_processes_only(tmp_path: Path) -> None:
    spool_dir = tmp_path / "server" / "spool"
    spool_dir.mkdir(parents=True)
    dead = spool_dir / f"vrai-{DEAD_PID}-abc.input"
    alive = spool_dir / f"vrai-{os.getpid()}-def.input"
    unrelated = spool_dir / "notes.txt"
    for path in (dead, alive, unrelated):
        path.write_bytes(b"x" * 100)
    server = start_server(tmp_path / "server")
    try:
        assert not dead.exists()
        assert alive.exists(), "a running process's file must be kept"
        assert unrelated.exists()
        warnings = [entry for entry in server.logs() if "crashed" in entry.get("message", "")]
        assert warnings and warnings[0]["count"] == 1
    finally:
        server.stop()


async def test_metrics_after_traffic(server: Server, media: Path) -> None:
    audio = (media / "sentence.wav").read_bytes()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        ok = await client.post("/v1/transcriptions?toTime=3", content=chunked(audio))
        bad = await client.post("/v1/transcriptions", content=b"not audio at all" * 10)
        page = await client.get("/metrics")
    assert ok.status_code == 200 and bad.status_code == 422
    assert page.status_code == 200
    text = page.text
    for needle in (
        'vrai_requests_total{code="ok",endpoint="transcriptions"}',
        'vrai_requests_total{code="undecodable_audio",endpoint="transcriptions"}',
        'vrai_stage_seconds_bucket{le="1.0",stage="transcode"}',
        'vrai_stage_seconds_count{stage="transcribe"}',
        'vrai_bytes_total{direction="in"}',
        'vrai_uploads_total{format="wav",mode="stream"}',
        'vrai_ffmpeg_exits_total{status="0"}',
        "vrai_audio_seconds_total ",
        'vrai_jobs{state="running"}',
    ):
        assert needle in text, f"{needle} missing from /metrics"
