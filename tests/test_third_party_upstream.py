"""The service against a real third-party upstream: `faster-whisper-server` from PyPI.

Not our loopback stand-in: someone else's OpenAI-compatible server (FastAPI over
faster-whisper, pinned in the dev extra), run as its own process with the bundled `tiny.en`,
offline (`tests/support/faster_whisper_server.py` says what it does and does not do). Through
it: the default model list, every response format and its timestamps, a missing model as it
really answers one, a hang and a death mid-request. One server transcribes for the module; the
tests that break a server start a cheap one of their own (it loads no model until asked).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import psutil
import pytest

from vrai_stream.speech.transcribers import openai_models

from .support.audio import SENTENCE_WORDS, has_words
from .support.client import chunked
from .support.faster_whisper_server import (
    SERVED_NAME,
    FasterWhisperServer,
    start_faster_whisper_server,
)
from .support.server import Server, start_server

pytestmark = pytest.mark.anyio

SPEECH_FROM, SPEECH_TO = 4.0, 6.8
"""Where the sentence is in `padded.wav` (4 s of silence each side)."""


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory, media: Path
) -> Iterator[FasterWhisperServer]:
    running = start_faster_whisper_server(tmp_path_factory.mktemp("faster-whisper-server"))
    try:
        running.warm_up(media / "sentence.wav")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, upstream: FasterWhisperServer
) -> Iterator[Server]:
    """The service on its defaults (`gpt-transcribe,whisper-1`) in front of the upstream."""
    running = start_server(tmp_path_factory.mktemp("service"), upstream.server_env())
    yield running
    running.stop()


async def upload(server: Server, audio: bytes, **query: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        return await client.post("/v1/transcriptions", params=query, content=chunked(audio))


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert (body["success"], body["status"], body["code"]) == (False, status, code)
    return body


def failed_calls(server: Server, request_id: str | None = None) -> list[dict[str, Any]]:
    return [
        entry
        for entry in server.logs()
        if entry["message"] == "transcription call failed"
        and (request_id is None or entry.get("requestId") == request_id)
    ]


def gone_warnings(server: Server) -> list[dict[str, Any]]:
    return [
        entry
        for entry in server.logs()
        if entry["logger"] == openai_models.__name__ and entry["level"] == "warning"
    ]


def upstream_connections(server: Server, upstream: FasterWhisperServer) -> list[Any]:
    return [
        conn
        for conn in psutil.Process(server.process.pid).net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == upstream.port
    ]


def established(server: Server, upstream: FasterWhisperServer) -> bool:
    return any(conn.status == "ESTABLISHED" for conn in upstream_connections(server, upstream))


# --- the default model list -------------------------------------------------------------------


async def test_the_default_models_are_served_as_the_one_it_has(
    service: Server, media: Path
) -> None:
    """`gpt-transcribe` is asked first, with its fields (`languages`, `keywords`, `json`):
    faster-whisper-server ignores the model's name and the fields it does not know, and
    answers `{"text"}`: words, no missing model, nothing to fall back from."""
    answer = await upload(service, (media / "sentence.wav").read_bytes(), language="en")

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert has_words(body["transcription"], SENTENCE_WORDS, at_least=4), body
    assert body["language"] == "en"
    assert failed_calls(service) == []
    assert gone_warnings(service) == []
    service.wait_idle()


async def test_a_missing_model_is_its_real_400_and_the_list_runs_out(
    tmp_path: Path, media: Path
) -> None:
    """A server without the one name it can be asked for answers every model it is sent
    `400 {"detail": {"error": {"message": "unknown model: whisper-1"}}}`: each model of the
    list is taken for gone in turn, with the server's own words in the log, and the request
    ends in our 502."""
    lacking = start_faster_whisper_server(tmp_path / "upstream", models=("tiny.en",))
    service = start_server(tmp_path / "service", lacking.server_env())
    try:
        answer = await upload(service, (media / "sentence.wav").read_bytes())

        body = assert_error(answer, 502, "transcription_failed")
        assert body["message"] == "The transcription service answered 400"
        calls = failed_calls(service, body["requestId"])
        assert [(c["model"], c["upstreamStatus"]) for c in calls] == [
            ("gpt-transcribe", 400),
            (SERVED_NAME, 400),
        ]
        assert {c["upstreamMessage"] for c in calls} == {"unknown model: whisper-1"}
        assert [(w["model"], w["nextModel"]) for w in gone_warnings(service)] == [
            ("gpt-transcribe", SERVED_NAME),
            (SERVED_NAME, None),
        ]
        service.wait_idle()
    finally:
        service.stop()
        lacking.stop()


# --- formats and timestamps through our OpenAI-compatible endpoint ----------------------------


@pytest.fixture(scope="module")
def whisper_service(
    tmp_path_factory: pytest.TempPathFactory, upstream: FasterWhisperServer
) -> Iterator[Server]:
    """The service asking for `whisper-1` only: the upstream answers `verbose_json`, with its
    own segments and their times."""
    running = start_server(
        tmp_path_factory.mktemp("whisper-service"),
        {**upstream.server_env(), "VRAI_OPENAI_MODEL": SERVED_NAME},
    )
    yield running
    running.stop()


def spans_of(result: Any, response_format: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of each timed part of an answer; [] for the untimed formats."""
    if response_format == "verbose_json":
        return [(s.start, s.end, s.text) for s in result.segments]
    if response_format not in ("srt", "vtt"):
        return []
    spans = []
    for cue in result.strip().split("\n\n"):
        lines = cue.splitlines()
        if lines[0] == "WEBVTT":
            continue
        times = lines[1] if response_format == "srt" else lines[0]
        start, end = (_seconds(part) for part in times.split(" --> "))
        spans.append((start, end, " ".join(lines[2 if response_format == "srt" else 1 :])))
    return spans


def _seconds(stamp: str) -> float:
    hours, minutes, seconds = stamp.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


@pytest.mark.parametrize(
    ("model_list", "response_format"),
    [
        *(("whisper-1", each) for each in ("json", "text", "verbose_json", "srt", "vtt")),
        ("default", "verbose_json"),  # the text comes untimed: the times are our cuts'
    ],
)
def test_every_response_format_carries_the_words_at_their_times(
    service: Server,
    whisper_service: Server,
    media: Path,
    response_format: Any,
    model_list: str,
) -> None:
    """The sentence 4 s into `padded.wav`: with `gpt-transcribe` (`json` upstream) the times
    are our own cuts'; with `whisper-1` (`verbose_json`) the upstream's segments', moved to
    where our cut began. Either way each part lies on the speech, in order."""
    server = service if model_list == "default" else whisper_service
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with (media / "padded.wav").open("rb") as speech:
        result: Any = client.audio.transcriptions.create(
            model="whisper-1", file=speech, response_format=response_format, timeout=60
        )

    text = result if isinstance(result, str) else result.text
    assert has_words(text, SENTENCE_WORDS, at_least=4), result
    spans = spans_of(result, response_format)
    if response_format in ("verbose_json", "srt", "vtt"):
        assert spans, result
        previous_end = 0.0
        for start, end, _ in spans:
            assert SPEECH_FROM - 0.8 <= start < end <= SPEECH_TO + 0.8, spans
            assert start >= previous_end - 0.01, spans
            previous_end = end
    if response_format == "verbose_json":
        assert result.duration == pytest.approx(SPEECH_TO + 4, abs=0.3)
    assert failed_calls(server) == []
    server.wait_idle()


# --- failures ---------------------------------------------------------------------------------


async def test_a_hung_server_is_our_504_and_leaves_nothing(
    make_server: Any, upstream: FasterWhisperServer, media: Path
) -> None:
    """Stopped (SIGSTOP), the server takes the connection and never answers."""
    server = make_server(
        **upstream.server_env(),
        VRAI_OPENAI_MODEL=SERVED_NAME,
        VRAI_OPENAI_TIMEOUT_SECONDS="1",
        VRAI_OPENAI_MAX_RETRIES="0",
    )
    upstream.pause()
    try:
        began = time.monotonic()
        answer = await upload(server, (media / "sentence.wav").read_bytes())
        elapsed = time.monotonic() - began
    finally:
        upstream.resume()

    body = assert_error(answer, 504, "transcription_timeout")
    # At the 1 s timeout, not at the upstream's whim (it never answers): 10 s leaves room for
    # a busy machine's upload and ffmpeg around it.
    assert 1.0 <= elapsed < 10.0, elapsed
    assert [c["failure"] for c in failed_calls(server, body["requestId"])] == ["timeout"]
    server.wait_idle()
    assert upstream_connections(server, upstream) == []


async def test_a_server_killed_mid_request_is_our_502_and_leaves_nothing(
    make_server: Any, tmp_path: Path, media: Path
) -> None:
    """The request reaches the server (its connection is open), then the server dies: the
    connection breaks, the SDK's retry finds nobody listening, and the answer is ours."""
    doomed = start_faster_whisper_server(tmp_path / "doomed")
    try:
        server = make_server(
            **doomed.server_env(), VRAI_OPENAI_MODEL=SERVED_NAME, VRAI_OPENAI_MAX_RETRIES="1"
        )
        doomed.pause()  # holds the request where it is: sent, unanswered
        async with anyio.create_task_group() as tasks:
            answers: list[httpx.Response] = []

            async def send() -> None:
                answers.append(await upload(server, (media / "sentence.wav").read_bytes()))

            tasks.start_soon(send)
            with anyio.fail_after(20):
                while not established(server, doomed):  # noqa: ASYNC110 (psutil has no event)
                    await anyio.sleep(0.05)
            doomed.kill()
    finally:
        doomed.stop()

    [answer] = answers
    body = assert_error(answer, 502, "transcription_failed")
    assert body["message"] == "The transcription service could not be reached"
    assert [c["failure"] for c in failed_calls(server, body["requestId"])] == ["connection"]
    server.wait_idle()
    assert upstream_connections(server, doomed) == []
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/health")).status_code == 200  # and the service goes on
