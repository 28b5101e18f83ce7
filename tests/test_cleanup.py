"""What a request leaves behind, how soon it ends, and what it logs.

Nothing left: no ffmpeg child, no temp file in VRAI_TMP_DIR, and no spool file held open by
the server (spools roll over to unnamed files, which only the process's descriptors show),
after a success (with the output spooled to disk, and the early-finish test below) and after
a client that vanished mid-upload; every error test in test_errors.py checks the same.
Early finish: a window at the start of a long, slow upload is answered at the last byte.
Logs: one JSON line per request, findable by the requestId the client was given.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .support.audio import SENTENCE_WORDS, has_words
from .support.client import chunked, posting
from .support.server import Server, start_server
from .test_errors import (
    CHUNKED,
    ENDPOINT,
    chunk_frame,
    gated,
    m4a_without_index,
    raw_connection,
    request_head,
)

pytestmark = pytest.mark.anyio


def log_lines_for(server: Server, request_id: str, within: float = 5.0) -> list[dict[str, Any]]:
    """The request log lines carrying `request_id`, once at least one has been written."""
    deadline = time.monotonic() + within
    while True:
        lines = [line for line in server.request_logs() if line.get("requestId") == request_id]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def new_log_lines(server: Server, before: int, within: float = 10.0) -> list[dict[str, Any]]:
    """Request log lines written after the first `before`, waiting for at least one."""
    deadline = time.monotonic() + within
    while True:
        lines = server.request_logs()[before:]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# --- nothing left behind -------------------------------------------------------------------


async def wait_for_spool_file(server: Server, folder: Path | None = None) -> list[str]:
    """Poll the server's open files until a spool file shows up in its temp folder."""
    for _ in range(250):
        if found := server.open_temp_files(folder):
            return found
        await anyio.sleep(0.02)
    raise AssertionError("no spool file appeared in the temp folder")


@pytest.fixture(scope="module")
def disk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Spools get no memory at all: every MP3 rolls over to a file in VRAI_TMP_DIR."""
    running = start_server(tmp_path_factory.mktemp("disk"), {"VRAI_SPOOL_MEMORY_BYTES": "0"})
    yield running
    running.stop()


async def test_output_spooled_to_disk_is_removed_after_success(
    disk_server: Server, media: Path
) -> None:
    """With no memory for spools, the MP3 lives in a file in VRAI_TMP_DIR, then nowhere."""
    server = disk_server
    audio = (media / "padded.wav").read_bytes()  # 4 s of silence, the sentence, 4 s more
    release = anyio.Event()

    async with (
        httpx.AsyncClient(base_url=server.url, timeout=60) as client,
        posting(
            client, ENDPOINT, content=gated(audio, first=len(audio) * 7 // 10, gate=release)
        ) as upload,
    ):
        # ffmpeg has had 7 s of audio: its MP3 so far must be in a file, not in memory.
        await wait_for_spool_file(server)
        release.set()

    response = upload.response
    assert response.status_code == 200, response.text
    body = response.json()
    assert has_words(body["transcription"], SENTENCE_WORDS, at_least=3), body
    [line] = log_lines_for(server, body["requestId"])
    assert line["outputSpooledToDisk"] is True, line
    server.wait_idle()


async def _raw_disconnect(server: Server, head: bytes, frames: list[bytes]) -> None:
    """Send a request's head and part of its body, then hang up."""
    async with raw_connection(server) as stream:
        await stream.send(head)
        for frame in frames:
            await stream.send(frame)
            await anyio.sleep(0.05)
        await anyio.sleep(0.2)  # let the server start its job before the hang-up


@pytest.mark.parametrize("upload", ["chunked", "content-length", "chunked-seekable-m4a"])
async def test_client_that_hangs_up_mid_upload_leaves_nothing(
    server: Server, media: Path, upload: str
) -> None:
    """ffmpeg reading stdin, or the seekable layout's input file on disk: both must go."""
    tone = (media / "tone60.wav").read_bytes()
    before = len(server.request_logs())
    if upload == "chunked":
        head = request_head(ENDPOINT, CHUNKED)
        frames = [chunk_frame(tone[i : i + 65536]) for i in range(0, 4 * 65536, 65536)]
    elif upload == "content-length":
        head = request_head(ENDPOINT, {"Content-Length": str(len(tone))})
        frames = [tone[i : i + 65536] for i in range(0, 4 * 65536, 65536)]
    else:
        m4a = m4a_without_index(300_000)
        head = request_head(ENDPOINT, CHUNKED)
        frames = [chunk_frame(m4a[i : i + 65536]) for i in range(0, 4 * 65536, 65536)]
    await _raw_disconnect(server, head, frames)
    server.wait_idle()
    lines = new_log_lines(server, before)
    assert [line["code"] for line in lines] == ["client_disconnected"], lines


async def test_cancelled_httpx_upload_with_its_output_on_disk_leaves_nothing(
    disk_server: Server, media: Path
) -> None:
    server = disk_server
    before = len(server.request_logs())
    audio = (media / "tone60.wav").read_bytes()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        with anyio.move_on_after(10) as gave_up:
            async with anyio.create_task_group() as group:

                async def upload() -> None:
                    await client.post(ENDPOINT, content=chunked(audio, delay=0.05))

                group.start_soon(upload)
                await wait_for_spool_file(server)  # hang up once the output is on disk
                group.cancel_scope.cancel()
        assert not gave_up.cancelled_caught
    server.wait_idle()
    [line] = new_log_lines(server, before)
    assert line["code"] == "client_disconnected", line


# --- early finish --------------------------------------------------------------------------


async def test_window_at_the_start_is_answered_at_the_last_byte(
    server: Server, media: Path
) -> None:
    """A 60 s recording uploaded over ~3 s, window 0-2 s: ffmpeg is done almost at once, the
    body is still read to its end, and the answer follows the last byte within a second."""
    audio = (media / "tone60.wav").read_bytes()
    chunk_size = 64 * 1024
    last_byte_sent: list[float] = []

    async def paced() -> AsyncIterator[bytes]:
        async for chunk in chunked(audio, chunk_size=chunk_size, delay=3 / (len(audio) / 65536)):
            yield chunk
        # httpx asks for the next chunk only once it has sent this one.
        last_byte_sent.append(time.monotonic())

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await client.post(f"{ENDPOINT}?fromTime=0&toTime=2", content=paced())
    answered = time.monotonic()
    assert response.status_code == 200, response.text
    body = response.json()
    assert answered - last_byte_sent[0] < 1.0, (
        f"answered {answered - last_byte_sent[0]:.2f} s after the last byte"
    )
    assert body["inputSize"] == len(audio), "the body must be read to its end"
    assert abs(body["duration"] - 2.0) <= 0.25, body
    assert body["timings"]["receive"] > 2.0, body["timings"]
    [line] = log_lines_for(server, body["requestId"])
    assert line["inputSize"] == len(audio), line
    assert line["timings"]["transcode"] < line["timings"]["receive"], line["timings"]
    server.wait_idle()


# --- one log line per request --------------------------------------------------------------


async def test_one_json_log_line_per_request(server: Server, media: Path) -> None:
    audio = (media / "sentence.wav").read_bytes()
    before = len(server.request_logs())
    log_offset = server.log_path.stat().st_size
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        responses = [
            await client.post(ENDPOINT, content=chunked(audio)),
            await client.post(f"{ENDPOINT}?fromTime=3&toTime=1", content=audio),
            await client.post(ENDPOINT, content=b"not audio at all\n" * 100),
            await client.post(ENDPOINT, content=b""),
        ]
    expected = [(200, "ok"), (400, "invalid_window"), (422, "undecodable_audio")]
    expected.append((400, "empty_body"))
    assert [(r.status_code, r.json().get("code", "ok")) for r in responses] == expected

    with server.log_path.open("rb") as log:
        log.seek(log_offset)
        written = log.read().decode().splitlines()
    for raw in written:
        assert isinstance(json.loads(raw), dict), f"not a JSON log line: {raw!r}"
    logged = server.request_logs()[before:]
    assert len(logged) == len(responses), logged
    for response, (status, code) in zip(responses, expected, strict=True):
        body = response.json()
        [line] = [entry for entry in logged if entry.get("requestId") == body["requestId"]]
        assert line["status"] == status
        assert line["code"] == code
        assert line["path"] == ENDPOINT
    success = responses[0].json()
    [line] = [entry for entry in logged if entry["requestId"] == success["requestId"]]
    assert line["inputSize"] == len(audio) == success["inputSize"]
    assert line["fileSize"] == success["fileSize"] > 0
    assert line["outputSpooledToDisk"] is False  # 2 MiB of memory holds a few seconds of MP3
    assert set(line["timings"]) >= {"receive", "transcode", "transcribe", "total"}
    assert line["timings"]["total"] > 0


async def test_log_line_of_an_abandoned_upload_says_how_much_arrived(
    server: Server, media: Path
) -> None:
    """An operator reading why an upload failed needs to know how far it got."""
    m4a = m4a_without_index(300_000)  # spooled to disk as it arrives: no ffmpeg yet
    sent = 3 * 65536
    before = len(server.request_logs())
    frames = [chunk_frame(m4a[i : i + 65536]) for i in range(0, sent, 65536)]
    await _raw_disconnect(server, request_head(ENDPOINT, CHUNKED), frames)
    server.wait_idle()
    [line] = new_log_lines(server, before)
    assert line["code"] == "client_disconnected", line
    assert line["inputSize"] == sent, line
