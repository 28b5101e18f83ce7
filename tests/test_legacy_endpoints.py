"""The old app's endpoints through the real server: legacy JSON (base64) and legacy multipart.

The big test sends a recording of about 15 MB as base64 in JSON (about 21 MB), chunked, with
`fileBlob` last (the times are known first: the audio streams into ffmpeg) and first (the
decoded audio waits in a disk spool until the times arrive), while a thread samples the
memory of the server and of its children.  The old service held the whole body, and its
decoded copy, in memory: here the server's own memory must not grow with the body.

The module's server transcribes through the real `openai` SDK against `FakeOpenAI` (which
runs the real local Whisper model, once per distinct MP3), so the server's memory is the
service's alone and repeated transcriptions of the same window cost nothing.  Validation
goes to the shared `server` (local transcriber): none of it reaches a transcriber.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

from .support.audio import SENTENCE_WORDS, has_words, run_ffmpeg
from .support.client import chunked
from .support.fake_openai import TRANSCRIPTIONS_PATH, FakeOpenAI
from .support.server import Server, start_server
from .test_errors import assert_error_response
from .test_real_recordings import REAL_RECORDINGS

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
UPSTREAM_KEY = f"sk-legacy-{secrets.token_hex(8)}"
LEGACY_KEYS = {"success", "transcription", "duration", "fromTime", "toTime", "fileSize"}
JSON_HEADERS = {"Content-Type": "application/json"}

NOISE_SECONDS = 75.0
"""Low noise before the speech: it makes the recording big, and no words come out of it."""


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def legacy_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI
) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("legacy"),
        upstream.server_env(),
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory: pytest.TempPathFactory, media: Path) -> bytes:
    """75 s of low noise, the sentence, 1 s of silence: 48 kHz stereo PCM, about 15 MB."""
    path = tmp_path_factory.mktemp("long") / "long.wav"
    run_ffmpeg(
        "-f", "lavfi", "-i", f"anoisesrc=r=48000:a=0.02:d={NOISE_SECONDS}:seed=7",
        "-i", str(media / "sentence.wav"),
        "-f", "lavfi", "-i", "anullsrc=r=48000:cl=mono:d=1",
        "-filter_complex",
        "[1:a]aresample=48000[speech];[0:a][speech][2:a]concat=n=3:v=0:a=1,"
        "aformat=channel_layouts=stereo",
        "-c:a", "pcm_s16le", str(path),
    )  # fmt: skip
    recording = path.read_bytes()
    assert len(recording) > 14 * MiB
    return recording


def blob(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def legacy_json(fields: dict[str, Any], audio_b64: str, *, blob_first: bool) -> bytes:
    """The old app's body; `fileBlob` written first or last, the rest as `json` writes it."""
    rest = json.dumps(fields)[1:-1]
    blob_member = f'"fileBlob": "{audio_b64}"'
    members = [blob_member, rest] if blob_first else [rest, blob_member]
    return ("{" + ", ".join(member for member in members if member) + "}").encode()


# --- memory sampling --------------------------------------------------------------------------


@dataclass
class MemorySampler:
    """Samples a server's memory from a thread, every few milliseconds, while a request runs.

    - `server`: the server process's RSS: where a buffered body (or its decoded copy) would be.
    - `tree`: that RSS plus each child's USS (memory no other process shares).  Counting a
      child by its RSS would count the server's pages again for a child forked but not yet
      exec'd into ffmpeg; its USS is only what it really added.

    Also counts the spool files the server has open in its temp folder.
    """

    target: Server
    server_base: int = 0
    tree_base: int = 0
    server_peak: int = 0
    tree_peak: int = 0
    spool_files_seen: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _server_rss(self) -> int:
        rss: int = psutil.Process(self.target.process.pid).memory_info().rss
        return rss

    def _children_uss(self) -> int:
        total = 0
        for child in self.target.children():
            try:
                total += child.memory_full_info().uss
            except psutil.Error:
                continue  # it ended while we looked
        return total

    def _sample(self) -> None:
        server = self._server_rss()
        self.server_peak = max(self.server_peak, server)
        self.tree_peak = max(self.tree_peak, server + self._children_uss())
        self.spool_files_seen.update(self.target.open_temp_files())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.005)

    def __enter__(self) -> MemorySampler:
        bases = []
        for _ in range(5):
            bases.append(self._server_rss() + self._children_uss())
            time.sleep(0.01)
        self.tree_base = self.server_base = min(bases)
        self.server_peak = self.tree_peak = self.server_base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(5)

    @property
    def server_rise(self) -> int:
        return self.server_peak - self.server_base

    @property
    def tree_rise(self) -> int:
        return self.tree_peak - self.tree_base


def assert_legacy_success(body: dict[str, Any], *, start: float, end: float) -> None:
    """The old service's success shape (the new fields may come too)."""
    assert set(body) >= LEGACY_KEYS, body
    assert body["success"] is True
    assert isinstance(body["transcription"], str)
    assert has_words(body["transcription"], SENTENCE_WORDS, at_least=4), body["transcription"]
    assert isinstance(body["duration"], float) and body["duration"] > 0
    assert body["fromTime"] == start and isinstance(body["fromTime"], float)
    # The window's actual end: the asked end, or the recording's if it ends sooner.
    assert isinstance(body["toTime"], float)
    if start + body["duration"] < end - 0.1:
        assert body["toTime"] == pytest.approx(start + body["duration"], abs=0.001)
    else:
        assert body["toTime"] == end
    assert isinstance(body["fileSize"], int) and body["fileSize"] > 0
    assert "summary" not in body and "summaryError" not in body


# --- legacy JSON: a big recording, keys in both orders ----------------------------------------


@pytest.mark.alone  # beside other tests, the sampled tree once read 65.5 MiB against 64
@pytest.mark.parametrize("blob_first", [False, True], ids=["fileBlob-last", "fileBlob-first"])
async def test_a_multi_megabyte_recording_in_json_keeps_memory_bounded(
    legacy_server: Server, long_recording: bytes, media: Path, blob_first: bool
) -> None:
    server = legacy_server
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        # Warm up: the first request imports and builds what every later one reuses.
        small = legacy_json(
            {"fromTime": 0, "toTime": 5}, blob(media / "sentence.wav"), blob_first=False
        )
        warm = await client.post("/trim-and-transcribe", content=small, headers=JSON_HEADERS)
        assert warm.status_code == 200, warm.text
        server.wait_idle()

        start = NOISE_SECONDS - 0.5
        end = NOISE_SECONDS + 10.0  # past the recording's end: ffmpeg stops at its end
        fields = {"fromTime": start, "toTime": str(end), "summarizationType": "none"}
        body = legacy_json(fields, base64.b64encode(long_recording).decode(), blob_first=blob_first)
        with MemorySampler(server) as memory:
            response = await client.post(
                "/trim-and-transcribe", content=chunked(body), headers=JSON_HEADERS
            )
            await anyio.sleep(0.05)  # a last sample after the answer

    assert response.status_code == 200, response.text
    assert response.request.headers["transfer-encoding"] == "chunked"
    result = response.json()
    assert_legacy_success(result, start=start, end=end)
    assert result["inputSize"] == len(long_recording)
    recording_seconds = (len(long_recording) - 44) / (48000 * 2 * 2)
    assert abs(result["duration"] - (recording_seconds - start)) < 0.25, result["duration"]

    report = (
        f"body {len(body) / MiB:.1f} MiB; server RSS rose {memory.server_rise / MiB:.1f} MiB, "
        f"server and children {memory.tree_rise / MiB:.1f} MiB"
    )
    assert len(body) > 18 * MiB, report
    # Where a buffered body would live: the server process.  The old service held the base64
    # and the decoded audio (175% of the body); here it is a few pipe buffers.
    assert memory.server_rise < 0.4 * len(body), report
    assert memory.server_rise < 64 * MiB, report
    # With ffmpeg: about 45 MiB of ffmpeg's own (mostly its libraries, which no other process
    # maps here), whatever the body's size.
    assert memory.tree_rise < 64 * MiB, report

    # fileBlob first: the times came after the audio, so the audio waited in a disk spool.
    upload_spools = [path for path in memory.spool_files_seen if path.endswith(".upload")]
    if blob_first:
        assert upload_spools, "the audio came before the times: it should have been spooled"
    else:
        assert not upload_spools, "the times came first: the audio should have streamed"
    server.wait_idle()


async def test_fields_first_the_job_touches_no_disk(
    legacy_server: Server, upstream: FakeOpenAI, media: Path
) -> None:
    """Times first, a short window: the audio streams and its MP3 (12 KB) stays in memory.

    The design keeps the output in a spool held in memory up to `VRAI_SPOOL_MEMORY_BYTES`
    (2 MiB) and charged to the disk budget only when it rolls over.  The upstream answers
    after 1 s, so a spool file that exists while the MP3 is with OpenAI is surely seen.
    """
    server = legacy_server
    upstream.reset()
    upstream.hang(1.0, path=TRANSCRIPTIONS_PATH)
    body = legacy_json({"fromTime": 0, "toTime": 5}, blob(media / "sentence.wav"), blob_first=False)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        with MemorySampler(server) as memory:
            response = await client.post(
                "/trim-and-transcribe", content=chunked(body), headers=JSON_HEADERS
            )
    assert response.status_code == 200, response.text
    assert_legacy_success(response.json(), start=0.0, end=5.0)
    log = next(e for e in server.request_logs() if e["requestId"] == response.json()["requestId"])
    assert log["outputSpooledToDisk"] is False
    assert not memory.spool_files_seen, (
        f"a {response.json()['fileSize']}-byte MP3 went to disk: {memory.spool_files_seen}"
    )
    server.wait_idle()


# --- legacy JSON: validation as the old service did it --------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"fromTime": -1, "toTime": 2}, "fromTime"),
        ({"fromTime": 2, "toTime": 2}, "toTime"),
        ({"fromTime": 3, "toTime": 2}, "toTime"),
        ({"fromTime": 10, "toTime": 301}, "300"),
        ({"fromTime": 0, "toTime": 300.5}, "300"),
        ({"fromTime": "zero", "toTime": 2}, "fromTime"),
        ({"fromTime": 0, "toTime": "soon"}, "toTime"),
    ],
)
@pytest.mark.parametrize("blob_first", [False, True], ids=["fileBlob-last", "fileBlob-first"])
async def test_invalid_windows_are_400_invalid_window(
    server: Server, media: Path, fields: dict[str, Any], named: str, blob_first: bool
) -> None:
    body = legacy_json(fields, blob(media / "sentence.wav"), blob_first=blob_first)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post(
            "/trim-and-transcribe", content=chunked(body), headers=JSON_HEADERS
        )
    assert_error_response(response, expected=400, code="invalid_window")
    assert named in response.json()["message"], response.json()
    server.wait_idle()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json at all", "invalid_json"),
        (b"[1, 2, 3]", "invalid_json"),
        (b'{"fromTime": 0, "toTime": 5, "fileBlob": "UklGRg', "invalid_json"),
        (b'{"fromTime": 0 "toTime": 5, "fileBlob": "UklGRg=="}', "invalid_json"),
        (b'{"fromTime": 0, "toTime": 5, "fileBlob": "UklG*Rg=="}', "invalid_base64"),
        (b'{"fileBlob": "%%%%", "fromTime": 0, "toTime": 5}', "invalid_base64"),
        (b'{"fromTime": 0, "toTime": 5}', "empty_body"),
        (b'{"fromTime": 0, "toTime": 5, "fileBlob": ""}', "empty_body"),
    ],
)
async def test_malformed_bodies_are_400_with_their_code(
    server: Server, body: bytes, code: str
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post(
            "/trim-and-transcribe", content=chunked(body), headers=JSON_HEADERS
        )
    assert_error_response(response, expected=400, code=code)
    server.wait_idle()


@pytest.mark.parametrize("blob_first", [False, True], ids=["fileBlob-last", "fileBlob-first"])
async def test_an_unknown_summarization_type_is_400(
    server: Server, media: Path, blob_first: bool
) -> None:
    fields = {"fromTime": 0, "toTime": 5, "summarizationType": "poem"}
    body = legacy_json(fields, blob(media / "sentence.wav"), blob_first=blob_first)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post("/trim-and-transcribe", content=body, headers=JSON_HEADERS)
    assert_error_response(response, expected=400, code="invalid_parameters")
    assert "summarizationType" in response.json()["message"]
    server.wait_idle()


async def test_null_fields_are_as_if_absent(server: Server, media: Path) -> None:
    """`null` times take their defaults (0 and 300, the old service's limit); `null` type: none."""
    fields = {"fromTime": None, "toTime": None, "summarizationType": None, "note": None}
    body = legacy_json(fields, blob(media / "sentence.wav"), blob_first=False)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await client.post(
            "/trim-and-transcribe", content=chunked(body), headers=JSON_HEADERS
        )
    assert response.status_code == 200, response.text
    result = response.json()
    assert_legacy_success(result, start=0.0, end=300.0)
    assert 2.0 < result["duration"] < 4.0
    server.wait_idle()


# --- legacy multipart -------------------------------------------------------------------------


BOUNDARY = "----vrai-legacy-form-7d93a1"
MULTIPART_HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def form_field(name: str, value: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
    ).encode()


def form_file(name: str, filename: str, data: bytes, content_type: str = "audio/wav") -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    return head + data + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


@pytest.mark.parametrize("fields_first", [True, False], ids=["fields-first", "file-first"])
async def test_multipart_with_fields_before_or_after_the_audio(
    legacy_server: Server, media: Path, fields_first: bool
) -> None:
    server = legacy_server
    audio = (media / "sentence.wav").read_bytes()
    fields = [
        form_field("fromTime", "0"),
        form_field("toTime", "12.5"),
        form_field("summarizationType", "none"),
    ]
    audio_part = form_file("audio", "note.wav", audio)
    parts = [*fields, audio_part] if fields_first else [audio_part, *fields]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await client.post(
            "/trim-and-transcribe-multipart",
            content=chunked(form(*parts), chunk_size=8192),
            headers=MULTIPART_HEADERS,
        )
    assert response.status_code == 200, response.text
    result = response.json()
    assert_legacy_success(result, start=0.0, end=12.5)
    assert result["inputSize"] == len(audio)
    server.wait_idle()


async def test_multipart_without_a_boundary_is_400(server: Server, media: Path) -> None:
    body = form(form_field("fromTime", "0"), form_file("audio", "a.wav", b"RIFF...."))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post(
            "/trim-and-transcribe-multipart",
            content=body,
            headers={"Content-Type": "multipart/form-data"},
        )
    assert_error_response(response, expected=400, code="invalid_multipart")
    assert "boundary" in response.json()["message"]
    server.wait_idle()


async def test_multipart_without_the_audio_part_is_400(server: Server, media: Path) -> None:
    other_file = form_file("recording", "note.wav", (media / "sentence.wav").read_bytes())
    body = form(form_field("fromTime", "0"), form_field("toTime", "5"), other_file)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post(
            "/trim-and-transcribe-multipart", content=chunked(body), headers=MULTIPART_HEADERS
        )
    assert_error_response(response, expected=400, code="missing_audio_part")
    message = response.json()["message"]
    assert "named 'audio'" in message, "the message should name the part the form must carry"
    assert "'recording'" in message, "and the part it carried instead"
    server.wait_idle()


async def test_multipart_windows_are_checked_as_the_old_service_did(
    server: Server, media: Path
) -> None:
    audio = (media / "sentence.wav").read_bytes()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for start, end in (("-1", "2"), ("4", "4"), ("0", "301")):
            body = form(
                form_file("audio", "note.wav", audio),
                form_field("fromTime", start),
                form_field("toTime", end),
            )
            response = await client.post(
                "/trim-and-transcribe-multipart", content=body, headers=MULTIPART_HEADERS
            )
            assert_error_response(response, expected=400, code="invalid_window")
    server.wait_idle()


def test_the_readme_json_example_sends_a_real_recording(server: Server, tmp_path: Path) -> None:
    """The README's legacy JSON example, run as a user would, on a phone's 1.5 MB recording:
    its base64 is far beyond what one shell argument may hold (128 KiB)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = readme.split("`POST /trim-and-transcribe` takes the old JSON body:", 1)[1]
    script = after.split("```sh\n", 1)[1].split("```", 1)[0]
    recording = REAL_RECORDINGS / "ios_lpcm_free_chunk.caf"
    assert len(base64.b64encode(recording.read_bytes())) > 128 * 1024
    (tmp_path / "note.m4a").write_bytes(recording.read_bytes())
    script = script.replace("curl ", "curl -sS --fail-with-body ")
    script = script.replace("http://127.0.0.1:8080", server.url)
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr + done.stdout
    answer = json.loads(done.stdout)
    assert answer["success"] is True and answer["format"] == "caf", answer
    assert answer["inputSize"] == recording.stat().st_size
