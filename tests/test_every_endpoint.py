"""Every promise on every way of answering (issue 20): one answer path, so each wrapper holds
for all of them by construction, and this table shows it through the real server.

Ways: `/v1/transcriptions` as JSON, as events and as the MP3; both legacy endpoints; the
OpenAI endpoint plain and with `stream=true`.  Promises: an `Idempotency-Key` repeats the
first answer (one job, billed once); a resumable upload cut halfway gets the answer an
uninterrupted one gets; every answer carries `X-Request-Id`, is logged on one line and
counted once, the answers given before any endpoint (404, 405, 431, `invalid_http`) too.

The transcriber is the tests' OpenAI-compatible server (real `openai` SDK, real model behind
it), so every call the service makes upstream is counted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .support.client import form_body
from .support.fake_openai import FakeOpenAI
from .support.resumable_client import append, create, offset
from .support.server import Server, start_server
from .support.sse import RawEvents, parse_events
from .test_auth_http import TOKEN_USERS, auth_header
from .test_errors import CHUNKED, chunk_frame, raw_connection, request_head
from .test_idempotency import keyed_env

pytestmark = pytest.mark.anyio

SPEECH = Path(__file__).resolve().parents[1].parent / "shared" / "speech"
BOUNDARY = "vrai-every-endpoint"


@dataclass(frozen=True)
class Way:
    """One way of asking for a transcript (or the MP3), and how to read its answer."""

    name: str
    endpoint: str
    """The `endpoint` of its log line and of `vrai_requests_total`."""
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "raw"
    """How the recording travels: `raw`, `legacy-json`, `legacy-form` or `openai-form`."""
    fields: dict[str, str] = field(default_factory=dict)

    def encode(self, audio: bytes) -> bytes:
        if self.body == "legacy-json":
            blob = base64.b64encode(audio).decode()
            return json.dumps({"fromTime": 0, "toTime": 30, "fileBlob": blob}).encode()
        if self.body in ("legacy-form", "openai-form"):
            file_field = "audio" if self.body == "legacy-form" else "file"
            return form_body(
                BOUNDARY, self.fields, file_field, audio, filename="a.wav", content_type="audio/wav"
            )
        return audio

    def request_headers(self, user: str = "alice") -> dict[str, str]:
        types = {
            "raw": "audio/wav",
            "legacy-json": "application/json",
            "legacy-form": f"multipart/form-data; boundary={BOUNDARY}",
            "openai-form": f"multipart/form-data; boundary={BOUNDARY}",
        }
        return {
            **auth_header(TOKEN_USERS[user]),
            "Content-Type": types[self.body],
            **self.headers,
        }

    def outcome(self, body: bytes) -> str:
        """What the answer says, for comparing two answers: the transcript, or the MP3's hash."""
        if "audio/mpeg" in self.headers.get("Accept", ""):
            return hashlib.sha256(body).hexdigest()
        text = body.decode()
        if self.fields.get("stream") == "true":
            return str(parse_events(text)[-1].data["text"])
        if "text/event-stream" in self.headers.get("Accept", ""):
            return str(parse_events(text)[-1].data["transcription"])
        document = json.loads(text)
        return str(document.get("transcription", document.get("text")))


EVENTS = {"Accept": "text/event-stream"}
OPENAI_FIELDS = {"model": "whisper-1"}
WAYS = [
    Way("json", "transcriptions", "/v1/transcriptions?fromTime=0&toTime=30"),
    Way("events", "transcriptions", "/v1/transcriptions?fromTime=0&toTime=30", EVENTS),
    Way(
        "mp3", "transcriptions", "/v1/transcriptions?fromTime=0&toTime=30", {"Accept": "audio/mpeg"}
    ),
    Way("legacy-json", "legacy-json", "/trim-and-transcribe", body="legacy-json"),
    Way(
        "legacy-multipart",
        "legacy-multipart",
        "/trim-and-transcribe-multipart",
        body="legacy-form",
        fields={"fromTime": "0", "toTime": "30"},
    ),
    Way("openai", "openai", "/v1/audio/transcriptions", body="openai-form", fields=OPENAI_FIELDS),
    Way(
        "openai-stream",
        "openai",
        "/v1/audio/transcriptions",
        body="openai-form",
        fields={**OPENAI_FIELDS, "stream": "true"},
    ),
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("every-endpoint"), keyed_env(upstream))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def recording() -> bytes:
    """9 s of real speech as 16 kHz WAV: big enough to cut in half, quick to transcribe."""
    return (SPEECH / "s04_librispeech_1995-1837-0001.wav").read_bytes()


def counted(server: Server, way: Way, code: str) -> float:
    return server.metric(f'vrai_requests_total{{code="{code}",endpoint="{way.endpoint}"}}')


def log_lines(server: Server, request_id: str) -> list[dict[str, Any]]:
    server.request_log(request_id)  # waits for it to land
    return [entry for entry in server.all_request_logs() if entry["requestId"] == request_id]


@pytest.mark.parametrize("way", WAYS, ids=lambda way: way.name)
async def test_every_answer_carries_its_id_and_is_logged_and_counted_once(
    service: Server, recording: bytes, way: Way
) -> None:
    before = counted(service, way, "ok")
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
        answer = await client.post(
            way.path, content=way.encode(recording), headers=way.request_headers()
        )
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["x-request-id"]
    [line] = log_lines(service, request_id)
    assert (line["endpoint"], line["status"], line["code"]) == (way.endpoint, 200, "ok")
    assert counted(service, way, "ok") == before + 1
    assert way.outcome(answer.content)


@pytest.mark.parametrize("way", WAYS, ids=lambda way: way.name)
async def test_a_repeated_key_gets_the_first_answer_from_one_job(
    service: Server, upstream: FakeOpenAI, recording: bytes, way: Way
) -> None:
    key = f"every-endpoint-{way.name}-{uuid.uuid4().hex}"
    headers = {**way.request_headers(), "Idempotency-Key": key}
    body = way.encode(recording)
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
        first = await client.post(way.path, content=body, headers=headers)
        calls = len(upstream.transcription_requests)
        again = await client.post(way.path, content=body, headers=headers)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.content == first.content, "the repeat is not the first answer"
    assert again.headers["x-request-id"] == first.headers["x-request-id"]
    assert len(upstream.transcription_requests) == calls, "transcribed twice"
    jobs = [
        entry
        for entry in service.request_logs()
        if entry.get("endpoint") == way.endpoint
        and "audioSeconds" in entry
        and entry["requestId"] == first.headers["x-request-id"]
    ]
    assert len(jobs) == 1, "billed twice"
    replays = [e for e in service.request_logs() if e.get("code") == "replayed"]
    assert any(e["endpoint"] == way.endpoint for e in replays)


@pytest.mark.parametrize("way", WAYS, ids=lambda way: way.name)
async def test_an_upload_cut_halfway_and_resumed_gets_the_same_answer(
    service: Server, recording: bytes, way: Way
) -> None:
    body = way.encode(recording)
    headers = way.request_headers()
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
        whole = await client.post(way.path, content=body, headers=headers)
    assert whole.status_code == 200, whole.text

    cut = await create(
        service.url + way.path, body, headers=headers, cut_after_bytes=len(body) // 2
    )
    assert cut.cut and cut.location, "the creation was not cut, or had no 104"
    where = await offset(cut.location, headers=headers)
    assert where.status == 204 and 0 < where.offset <= len(body) // 2
    assert where.headers["x-request-id"], "the HEAD is an answer too"
    done = await append(cut.location, body[where.offset :], where.offset, headers=headers)
    assert done.status == 200, done.body
    assert way.outcome(done.body) == way.outcome(whole.content)
    assert done.headers["upload-complete"] == "?1"
    [line] = log_lines(service, done.headers["x-request-id"])
    assert line["endpoint"] == way.endpoint and line["uploadResumptions"] == 1
    service.wait_idle()


UNROUTED = [
    ("not-found", "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found"),
    ("method", "GET /v1/transcriptions HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    (
        "head-too-large",
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + "a" * 20_000 + "\r\n\r\n",
        431,
        "headers_too_large",
    ),
    ("not-http", "HELLO THERE\r\n\r\n", 400, "invalid_http"),
]


@pytest.mark.parametrize(
    ("request_text", "status", "code"),
    [case[1:] for case in UNROUTED],
    ids=[case[0] for case in UNROUTED],
)
def test_answers_before_any_endpoint_carry_an_id_and_are_logged_and_counted_once(
    service: Server, request_text: str, status: int, code: str
) -> None:
    metric = f'vrai_requests_total{{code="{code}",endpoint="none"}}'
    before = service.metric(metric)
    head = _raw_exchange(service, request_text.encode())
    assert head.startswith(f"HTTP/1.1 {status} "), head
    fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
    request_id = {k.lower(): v for k, v in fields.items()}["x-request-id"]
    [line] = log_lines(service, request_id)
    assert (line["status"], line["code"], line["endpoint"]) == (status, code, "none")
    assert service.metric(metric) == before + 1


def test_a_bad_chunk_halfway_is_logged_once_as_what_it_is(service: Server) -> None:
    """Not twice (400, then 499 for the client that went): once, as `invalid_http`."""
    way = WAYS[0]
    headers = "".join(f"{k}: {v}\r\n" for k, v in way.request_headers().items())
    request = (
        f"POST {way.path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{headers}\r\n"
        "4\r\nRIFF\r\nzz\r\n"
    ).encode()
    head = _raw_exchange(service, request)
    assert head.startswith("HTTP/1.1 400 "), head
    request_id = next(
        line.split(": ", 1)[1]
        for line in head.split("\r\n")
        if line.lower().startswith("x-request-id")
    )
    [line] = log_lines(service, request_id)
    assert (line["status"], line["code"], line["endpoint"]) == (400, "invalid_http", way.endpoint)
    service.wait_idle()


def _request_id(head: str) -> str:
    fields = [line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line]
    return next(value for name, value in fields if name.lower() == "x-request-id")


def _raw_exchange(server: Server, request: bytes) -> str:
    """Send `request` on a socket of its own; the answer's head."""
    host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
    with socket.create_connection((host, port or 80), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = connection.recv(65536)
            if not piece:
                break
            answer += piece
    return answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [("/health", "health"), ("/metrics", "metrics"), ("/openapi.json", "openapi"), ("/", "page")],
)
async def test_the_other_endpoints_answer_as_every_answer_does(
    service: Server, path: str, endpoint: str
) -> None:
    metric = f'vrai_requests_total{{code="ok",endpoint="{endpoint}"}}'
    before = service.metric(metric)
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        answer = await client.get(path)
    assert answer.status_code == 200
    [line] = log_lines(service, answer.headers["x-request-id"])
    assert (line["endpoint"], line["status"], line["path"]) == (endpoint, 200, path)
    # Reading /metrics counts once more, after the sample: allow for this read itself.
    assert service.metric(metric) == before + 1 + (endpoint == "metrics")


# --- an answer asked for again by its id --------------------------------------------------------


@pytest.mark.parametrize("way", [WAYS[0], WAYS[1], WAYS[5]], ids=lambda way: way.name)
async def test_a_finished_answer_is_had_again_by_its_id_by_its_owner_only(
    service: Server, recording: bytes, way: Way
) -> None:
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as client:
        answer = await client.post(
            way.path, content=way.encode(recording), headers=way.request_headers()
        )
        assert answer.status_code == 200, answer.text
        request_id = answer.headers["x-request-id"]
        again = await client.get(f"/v1/transcriptions/{request_id}", headers=alice_only())
        bob = await client.get(
            f"/v1/transcriptions/{request_id}", headers=auth_header(TOKEN_USERS["bob"])
        )
        unknown = await client.get(f"/v1/transcriptions/{uuid.uuid4().hex}", headers=alice_only())
    assert again.status_code == 200, again.text
    assert again.headers["x-request-id"] not in (request_id, ""), "the GET's own id"
    if way.name == "events":  # the `done` event's body: the JSON answer itself
        assert again.json() == parse_events(answer.text)[-1].data
    else:
        assert again.content == answer.content
    assert (bob.status_code, bob.json()["code"]) == (404, "not_found")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "not_found")


async def test_an_answer_asked_for_while_its_job_runs_is_202(
    service: Server, recording: bytes
) -> None:
    """The id comes with the answer's head (here, events that open before the body's end);
    asked for by it while the upload still arrives, the answer is `202` with `Retry-After`,
    then the answer itself once the job is over."""
    way = WAYS[1]
    fields = {**way.request_headers(), **CHUNKED}
    frames = [chunk_frame(recording[i : i + 65536]) for i in range(0, len(recording), 65536)]
    async with (
        raw_connection(service) as stream,
        httpx.AsyncClient(base_url=service.url, timeout=30) as client,
    ):
        await stream.send(request_head(way.path, fields))
        answer = RawEvents(stream)
        await stream.send(frames[0])
        with anyio.fail_after(10):
            await answer.head()
        request_id = answer.headers["x-request-id"]
        running = await client.get(f"/v1/transcriptions/{request_id}", headers=alice_only())
        for frame in frames[1:]:
            await stream.send(frame)
        await stream.send(chunk_frame(b""))
        events = []
        with anyio.fail_after(60):
            while (event := await answer.next_event()) is not None:
                events.append(event)
        done = await client.get(f"/v1/transcriptions/{request_id}", headers=alice_only())
    assert running.status_code == 202, running.text
    assert int(running.headers["retry-after"]) > 0
    assert running.json() == {"requestId": request_id, "status": "running"}
    assert done.status_code == 200, done.text
    assert done.json() == events[-1].data and events[-1].name == "done"


def alice_only() -> dict[str, str]:
    return auth_header(TOKEN_USERS["alice"])
