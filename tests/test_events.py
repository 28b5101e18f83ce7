"""Answers as Server-Sent Events: `Accept: text/event-stream`, and OpenAI's `stream=true`.

Real server on loopback, real chunked uploads, speech transcribed for real (through
`FakeOpenAI`, which runs the local Whisper model, so that a transcription can be made to hang
and summaries are possible).  Requests that must read events while their upload is still being
sent go over a raw connection: httpx sends the whole body before it reads the answer.  The
server admits one job and queues none, so that `503 busy` is easy to reach.

The last tests drive `Answer` with ASGI messages of their own: heartbeats and how
`progress` events are thinned, where a real stream would take 15 s to show them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import anyio
import httpx
import openai
import pytest
from starlette.requests import Request
from starlette.types import Message

from vrai_stream import errors
from vrai_stream.auth.config import hash_token
from vrai_stream.http import answer as answer_module
from vrai_stream.http import events as events_module
from vrai_stream.http.answer import Answer
from vrai_stream.http.context import RequestContext
from vrai_stream.http.events import Events, ServerSentEvent

from .support.audio import SENTENCE_WORDS, has_words
from .support.client import chunked, form_body, posting
from .support.fake_openai import FakeOpenAI
from .support.server import Server, start_server
from .support.sse import Event, RawEvents, parse_events
from .test_errors import CHUNKED, chunk_frame, gated, raw_connection, request_head

pytestmark = pytest.mark.anyio

UPSTREAM_KEY = f"sk-events-{secrets.token_hex(8)}"
TOKEN = f"vrai-{secrets.token_urlsafe(24)}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVENTS = {**AUTH, "Accept": "text/event-stream"}
ENDPOINT = "/v1/transcriptions"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeOpenAI) -> FakeOpenAI:
    upstream.reset()
    return upstream


@pytest.fixture(scope="module")
def events_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI
) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("events"),
        {
            **upstream.server_env(),
            "VRAI_OPENAI_MAX_RETRIES": "0",
            "VRAI_AUTH": "token",
            "VRAI_AUTH_TOKENS": f"events-user:{hash_token(TOKEN)}",
            "VRAI_MAX_JOBS": "1",
            "VRAI_MAX_QUEUE": "0",
        },
    )
    yield running
    running.stop()


def names(events: list[Event]) -> list[str]:
    return [event.name for event in events]


def assert_is_event_stream(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/event-stream", response.headers
    assert response.headers["cache-control"] == "no-cache"


# --- /v1/transcriptions with Accept: text/event-stream -----------------------------------------


async def test_events_end_with_done_carrying_the_json_body(
    events_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    server = events_server
    audio = (media / "padded.wav").read_bytes()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        streamed = await client.post(ENDPOINT, content=chunked(audio), headers=EVENTS)
        plain = await client.post(ENDPOINT, content=chunked(audio), headers=AUTH)
    assert_is_event_stream(streamed)
    assert plain.status_code == 200, plain.text
    events = parse_events(streamed.text)

    # progress and segment events as the job goes, then `done`, once, last.
    assert names(events)[-1] == "done", names(events)
    assert set(names(events)[:-1]) <= {"progress", "segment"}, names(events)
    assert "progress" in names(events)
    for event in events:
        if event.name == "progress":
            assert set(event.data) == {"receivedBytes", "decodedSeconds"}, event
            assert 0 < event.data["receivedBytes"] <= len(audio)
        if event.name == "segment":
            assert set(event.data) == {"index", "start", "end", "text"}, event
            assert 0 <= event.data["start"] < event.data["end"], event
    segments = [event.data for event in events if event.name == "segment"]
    assert [segment["index"] for segment in segments] == sorted(s["index"] for s in segments)

    done = events[-1].data
    body = plain.json()
    assert set(done) == set(body), "done's data is the body the same request gets without events"
    assert done["success"] is True
    assert done["requestId"] == streamed.headers["x-request-id"]
    assert done["inputSize"] == body["inputSize"] == len(audio)
    assert done["transcription"] == body["transcription"]
    assert has_words(done["transcription"], SENTENCE_WORDS, at_least=4), done
    if segments:  # the segments' texts are the transcript's, joined
        assert " ".join(segment["text"] for segment in segments) == done["transcription"]

    line = server.request_log(done["requestId"])
    assert (line["status"], line["code"], line["answer"]) == (200, "ok", "events"), line
    assert line["inputSize"] == len(audio)
    assert "answer" not in server.request_log(body["requestId"])
    server.wait_idle()


async def test_a_summary_comes_as_its_own_event_and_in_done(
    events_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    audio = (media / "sentence.wav").read_bytes()
    async with httpx.AsyncClient(base_url=events_server.url, timeout=60) as client:
        response = await client.post(
            f"{ENDPOINT}?summarizationType=summarize", content=chunked(audio), headers=EVENTS
        )
    assert_is_event_stream(response)
    events = parse_events(response.text)
    assert names(events)[-2:] == ["summary", "done"], names(events)
    summary, done = events[-2].data, events[-1].data
    assert set(summary) == {"summary"}, summary
    assert summary["summary"] == done["summary"]
    assert done["summary"]


async def test_a_bad_recording_ends_the_stream_with_an_error_event(
    events_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    """The stream opens once the job is admitted: what goes wrong after that is an event."""
    server = events_server
    garbage = b"this is not audio at all\n" * 4000
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        streamed = await client.post(ENDPOINT, content=chunked(garbage), headers=EVENTS)
        plain = await client.post(ENDPOINT, content=chunked(garbage), headers=AUTH)
    assert_is_event_stream(streamed)
    assert plain.status_code == 422, plain.text
    [error] = parse_events(streamed.text)
    assert error.name == "error"
    request_id = streamed.headers["x-request-id"]
    assert error.data == {**plain.json(), "requestId": request_id}, error
    assert error.data["code"] == "undecodable_audio" and error.data["status"] == 422
    line = server.request_log(request_id)
    assert (line["status"], line["code"], line["answer"]) == (422, "undecodable_audio", "events")
    assert line["inputSize"] == len(garbage), "the body is read to its end"
    server.wait_idle()


async def test_errors_before_the_job_starts_keep_their_status(
    events_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    """401, 400 and 503 come before the stream opens: plain JSON, so clients can tell."""
    server = events_server
    audio = (media / "sentence.wav").read_bytes()
    release = anyio.Event()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        no_token = await client.post(
            ENDPOINT, content=audio, headers={"Accept": "text/event-stream"}
        )
        bad_window = await client.post(
            f"{ENDPOINT}?fromTime=3&toTime=1", content=audio, headers=EVENTS
        )
        async with posting(
            client, ENDPOINT, content=gated(audio, first=65536, gate=release), headers=EVENTS
        ) as holding:
            # The one job slot is taken by an upload still arriving.
            for _ in range(500):
                if (await client.get("/health")).json()["jobsRunning"] == 1:
                    break
                await anyio.sleep(0.02)
            busy = await client.post(ENDPOINT, content=audio, headers=EVENTS)
            release.set()
    for response, status, code in (
        (no_token, 401, "unauthorized"),
        (bad_window, 400, "invalid_window"),
        (busy, 503, "busy"),
    ):
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json()["code"] == code
    assert "www-authenticate" in no_token.headers
    assert "retry-after" in busy.headers
    assert_is_event_stream(holding.response)
    assert names(parse_events(holding.response.text))[-1] == "done"
    lines = [server.request_log(r.headers["x-request-id"]) for r in (no_token, bad_window, busy)]
    assert [(line["status"], line["code"]) for line in lines] == [
        (401, "unauthorized"),
        (400, "invalid_window"),
        (503, "busy"),
    ]
    assert all("answer" not in line for line in lines)
    server.wait_idle()


async def test_the_legacy_form_endpoint_streams_events_too(
    events_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    """The stream opens once the form's window is known: a bad one is still a plain 400."""
    audio = (media / "sentence.wav").read_bytes()
    boundary = "vrai-events-form"

    def legacy_form(to_time: str) -> bytes:
        fields = {"fromTime": "0", "toTime": to_time}
        return form_body(
            boundary, fields, "audio", audio, filename="a.wav", content_type="audio/wav"
        )

    headers = {**EVENTS, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    path = "/trim-and-transcribe-multipart"
    async with httpx.AsyncClient(base_url=events_server.url, timeout=60) as client:
        streamed = await client.post(path, content=chunked(legacy_form("10")), headers=headers)
        refused = await client.post(path, content=chunked(legacy_form("400")), headers=headers)
    assert_is_event_stream(streamed)
    events = parse_events(streamed.text)
    assert names(events)[-1] == "done", names(events)
    done = events[-1].data
    assert (done["success"], done["fromTime"]) == (True, 0.0)
    # The recording ends before the asked 10 s: the window's actual end is its end.
    assert done["toTime"] == pytest.approx(done["duration"], abs=0.001)
    assert done["toTime"] < 10.0
    assert has_words(done["transcription"], SENTENCE_WORDS, at_least=4), done
    assert refused.status_code == 400, refused.text
    assert refused.json()["code"] == "invalid_window"
    events_server.wait_idle()


# --- events while the upload arrives, and clients that go away -------------------------------


@asynccontextmanager
async def raw_events_request(server: Server, path: str = ENDPOINT) -> AsyncIterator[Any]:
    async with raw_connection(server) as stream:
        await stream.send(request_head(path, {**EVENTS, **CHUNKED}))
        yield stream, RawEvents(stream)


async def test_events_come_while_the_upload_arrives_and_a_hang_up_leaves_nothing(
    events_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    """The headers, then progress, before the body's end; the client then hangs up mid-upload:
    its job ends (no ffmpeg, no temp file) and is logged once as `client_disconnected`."""
    server = events_server
    tone = (media / "tone60.wav").read_bytes()
    frames = [chunk_frame(tone[i : i + 65536]) for i in range(0, len(tone), 65536)]
    async with raw_events_request(server) as (stream, answer):
        await stream.send(frames[0])
        with anyio.fail_after(10):
            await answer.head()  # the stream is open while the upload has barely begun
        assert answer.status == 200, answer.headers
        assert answer.headers["content-type"] == "text/event-stream"
        request_id = answer.headers["x-request-id"]
        sent = 1
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:

                async def upload_slowly() -> None:
                    nonlocal sent
                    for frame in frames[1 : len(frames) // 2]:
                        await stream.send(frame)
                        sent += 1
                        await anyio.sleep(0.05)

                group.start_soon(upload_slowly)
                event = await answer.next_event()
                group.cancel_scope.cancel()
        assert event is not None and event.name == "progress", event
        assert event.data["receivedBytes"] < len(tone)
    # Hung up half way through the upload.
    assert sent < len(frames)
    server.wait_idle()
    line = server.request_log(request_id)
    assert (line["status"], line["code"]) == (499, "client_disconnected"), line


async def test_a_client_gone_after_its_upload_ends_its_job(
    events_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    """The body is whole and the transcription hangs upstream: the hang-up is heard at once
    (not when the upstream answers), the upstream request is given up, nothing is left."""
    server = events_server
    fake.hang(30, times=None)
    audio = (media / "sentence.wav").read_bytes()
    started = anyio.current_time()
    async with raw_events_request(server) as (stream, answer):
        for offset in range(0, len(audio), 65536):
            await stream.send(chunk_frame(audio[offset : offset + 65536]))
        await stream.send(chunk_frame(b""))
        with anyio.fail_after(10):
            await answer.head()
            request_id = answer.headers["x-request-id"]
        for _ in range(500):  # hang up once the segment's transcription is under way
            if fake.transcription_requests:
                break
            await anyio.sleep(0.02)
        assert fake.transcription_requests
    server.wait_idle()
    line = server.request_log(request_id)
    assert (line["status"], line["code"]) == (499, "client_disconnected"), line
    assert line["inputSize"] == len(audio)
    assert anyio.current_time() - started < 15, "the job waited for the upstream's answer"


# --- POST /v1/audio/transcriptions with stream=true: OpenAI's events, for OpenAI's SDK -------


def sdk(server: Server, api_key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def test_openai_sdk_streams_deltas_then_the_whole_text(
    events_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    server = events_server
    with (media / "padded.wav").open("rb") as file:
        stream = sdk(server).audio.transcriptions.create(model="whisper-1", file=file, stream=True)
        received = list(stream)
    *events, done = received
    deltas = [e for e in events if isinstance(e, openai.types.audio.TranscriptionTextDeltaEvent)]
    assert deltas and deltas == events, received
    assert {delta.type for delta in deltas} == {"transcript.text.delta"}
    assert isinstance(done, openai.types.audio.TranscriptionTextDoneEvent), done
    assert done.type == "transcript.text.done"
    assert "".join(delta.delta for delta in deltas) == done.text
    assert has_words(done.text, SENTENCE_WORDS, at_least=4), done.text
    with (media / "padded.wav").open("rb") as file:
        plain = sdk(server).audio.transcriptions.create(model="whisper-1", file=file)
    assert plain.text == done.text
    [streamed_line, plain_line] = server.request_logs()[-2:]
    assert (streamed_line["code"], streamed_line["answer"]) == ("ok", "events"), streamed_line
    assert (plain_line["code"], "answer" in plain_line) == ("ok", False), plain_line
    server.wait_idle()


def test_openai_sdk_stream_failures(events_server: Server, fake: FakeOpenAI) -> None:
    """Refused before the stream opens: the SDK's status errors.  A bad recording once it is
    open: an `error` event with OpenAI's `error` object, which the SDK raises as `APIError`."""
    server = events_server
    garbage = ("note.m4a", b"this is not audio at all\n" * 100)
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        sdk(server, api_key="wrong").audio.transcriptions.create(
            model="whisper-1", file=garbage, stream=True
        )
    with pytest.raises(openai.BadRequestError, match="cannot stream") as bad_request:
        sdk(server).audio.transcriptions.create(
            model="whisper-1", file=garbage, stream=True, response_format="srt"
        )
    with pytest.raises(openai.APIError, match="not a recognizable audio file") as raised:
        list(sdk(server).audio.transcriptions.create(model="whisper-1", file=garbage, stream=True))
    assert not isinstance(raised.value, openai.APIStatusError), "an event, not a status"
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "undecodable_audio"
    for request_id, code in (
        (unauthorized.value.response.headers["x-request-id"], "unauthorized"),
        (bad_request.value.response.headers["x-request-id"], "invalid_parameters"),
    ):
        assert server.request_log(request_id)["code"] == code
    server.wait_idle()
    for _ in range(100):  # written as the stream ends, as the SDK may have raised
        if (streamed := server.request_logs()[-1])["code"] != "invalid_parameters":
            break
        time.sleep(0.05)
    assert (streamed["status"], streamed["code"]) == (422, "undecodable_audio"), streamed
    assert streamed["answer"] == "events"
    server.wait_idle()


# --- Answer itself, with ASGI messages of the test's own -------------------------------------


async def run_stream(
    work: Any, *, disconnect_after: float | None = None
) -> tuple[list[Message], list[tuple[str, int]], anyio.Event]:
    """Run `work` as the handler of an `Answer`; its messages, how it ended (as the request
    log has it), and its body-read flag."""
    sent: list[Message] = []
    finished: list[tuple[str, int]] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        if disconnect_after is None:
            await anyio.sleep_forever()
        else:
            await anyio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    # No services: nothing here needs one (no key, no upload, no job).
    app = SimpleNamespace(state=SimpleNamespace(services=None))
    scope = {"type": "http", "method": "POST", "path": ENDPOINT, "headers": [], "app": app}
    context = RequestContext(Request(scope), "transcriptions", "service")
    answer = Answer(
        context, lambda context: work(context.events, context.body_read), idempotent=False
    )

    def record(context: RequestContext, *, code: str, status: int) -> None:
        finished.append((code, status))

    with anyio.fail_after(5), mock.patch.object(answer_module, "record", record):
        await answer(scope, receive, send)
    return sent, finished, context.body_read


def body_of(sent: list[Message]) -> str:
    return b"".join(message.get("body", b"") for message in sent).decode()


async def test_silence_is_filled_with_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "HEARTBEAT_SECONDS", 0.05)

    async def work(events: Events, body_read: anyio.Event) -> ServerSentEvent:
        events.open()
        await anyio.sleep(0.3)
        return ServerSentEvent("done", {"ok": True})

    sent, finished, _ = await run_stream(work)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    text = body_of(sent)
    assert text.count(": keep-alive\n\n") >= 3, text
    assert text.endswith('event: done\ndata: {"ok":true}\n\n'), text
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert finished == [("ok", 200)]


async def test_progress_is_thinned_but_never_reordered() -> None:
    """Progress a writer has not sent yet is replaced by newer progress; other events queue."""

    async def work(events: Events, body_read: anyio.Event) -> ServerSentEvent:
        events.open()
        for received in range(100):
            events.send(ServerSentEvent("progress", {"n": received}, replaceable=True))
        events.send(ServerSentEvent("segment", {"index": 0}))
        events.send(ServerSentEvent("progress", {"n": 100}, replaceable=True))
        return ServerSentEvent("done", {})

    sent, finished, _ = await run_stream(work)
    assert [(event.name, event.data) for event in parse_events(body_of(sent))] == [
        ("progress", {"n": 99}),
        ("segment", {"index": 0}),
        ("progress", {"n": 100}),
        ("done", {}),
    ]
    assert finished == [("ok", 200)]


async def test_a_refusal_before_the_events_open_is_a_plain_answer() -> None:
    async def work(events: Events, body_read: anyio.Event) -> ServerSentEvent:
        raise errors.Busy("The server is at capacity; retry shortly", retry_after_seconds=2)

    sent, finished, _ = await run_stream(work)
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"2") in sent[0]["headers"]
    assert '"code":"busy"' in body_of(sent)
    assert finished == [("busy", 503)]


async def test_a_disconnect_is_listened_for_only_once_the_body_is_read() -> None:
    """Before the body's end, receive() would take the job's body chunks: it is not called."""
    cancelled = anyio.Event()

    async def work(events: Events, body_read: anyio.Event) -> ServerSentEvent:
        events.open()
        await anyio.sleep(0.2)  # receive() would answer within 0.05 s, if it were called
        body_read.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    sent, finished, _ = await run_stream(work, disconnect_after=0.05)
    assert cancelled.is_set()
    assert finished == [("client_disconnected", 499)]
    assert sent[0]["type"] == "http.response.start"
