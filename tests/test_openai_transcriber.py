"""The OpenAI transcriber: the real server and the real `openai` SDK against a loopback fake.

The fake (`fake_openai.FakeOpenAI`) transcribes with the local Whisper model, so a success
here means real words made it through ffmpeg, the SDK, HTTP and back.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest

from vrai_stream.speech.transcribers import openai_models
from vrai_stream.speech.transcribers.base import TranscribeOptions
from vrai_stream.speech.transcribers.openai_models import (
    ModelList,
    is_model_gone,
    public_message,
    request_fields,
)

from .support.audio import SENTENCE_WORDS, decoded_seconds, has_words
from .support.client import chunked
from .support.fake_openai import CHAT_PREFIX, TRANSCRIPTIONS_PATH, FakeOpenAI, Received
from .support.server import Server

pytestmark = pytest.mark.anyio

API_KEY = f"sk-vrai-test-{secrets.token_hex(16)}"
"""Unique enough that finding it anywhere means it leaked."""

MakeServer = Callable[..., Server]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=API_KEY) as running:
        yield running


@pytest.fixture
def fake(fake_server: FakeOpenAI) -> FakeOpenAI:
    fake_server.reset()
    return fake_server


def start(make_server: MakeServer, fake: FakeOpenAI, **env: str) -> Server:
    return make_server(**{**fake.server_env(), **env})


async def upload(server: Server, audio: bytes, **query: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        return await client.post("/v1/transcriptions", params=query, content=chunked(audio))


def assert_key_hidden(server: Server, *responses: httpx.Response) -> None:
    for response in responses:
        assert API_KEY not in response.text
        assert all(API_KEY not in value for value in response.headers.values())
    assert API_KEY not in server.log_path.read_text()


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert (body["status"], body["code"]) == (status, code)


@pytest.mark.parametrize("model", [None, "whisper-1", "whisper-large-v3"])
async def test_speech_comes_back_as_its_words(
    make_server: MakeServer, fake: FakeOpenAI, media: Path, tmp_path: Path, model: str | None
) -> None:
    server = start(make_server, fake, **({"VRAI_OPENAI_MODEL": model} if model else {}))
    audio = (media / "sentence.wav").read_bytes()
    response = await upload(server, audio)

    assert response.status_code == 200, response.text
    body = response.json()
    assert has_words(body["transcription"], SENTENCE_WORDS, at_least=4), body["transcription"]
    [seen] = fake.transcription_requests
    assert seen.status == 200
    if model is None:
        # gpt-transcribe, the default, names no language unless it is asked for one.
        assert seen.form["model"] == "gpt-transcribe"
        assert seen.form["response_format"] == "json"
        assert body["language"] is None
    else:
        assert seen.form["model"] == model
        assert seen.form["response_format"] == "verbose_json"
        assert body["language"] == "en"  # OpenAI says "english": the same code either way
    assert "authorization" not in seen.headers
    # Our request ID travels upstream: one request can be traced on both sides.
    assert seen.headers["x-client-request-id"] == body["requestId"]
    # What went out is the window's one segment as ffmpeg decoded it (16 kHz mono WAV, no
    # encoder in between), not the upload.
    sent = seen.file
    assert sent.is_wav
    assert sent.filename is not None
    assert sent.filename.endswith(".wav")
    assert sent.content_type == "audio/wav"
    assert abs(decoded_seconds(sent.data, tmp_path) - body["duration"]) < 0.1
    assert_key_hidden(server, response)
    server.wait_idle()


def fields(seen: Received) -> dict[str, list[str]]:
    """A request's form as the upstream saw it, every field as a list of its values."""
    return {
        name: value if isinstance(value, list) else [value] for name, value in seen.form.items()
    }


QUERY = {"language": "en", "prompt": "A pangram.", "keywords": "fox, lazy dog,,fox"}


@pytest.mark.parametrize("models", [None, "whisper-1"])
async def test_query_options_reach_the_upstream_as_each_model_takes_them(
    make_server: MakeServer, fake: FakeOpenAI, media: Path, models: str | None
) -> None:
    server = start(make_server, fake, **({"VRAI_OPENAI_MODEL": models} if models else {}))
    response = await upload(server, (media / "sentence.wav").read_bytes(), **QUERY)

    assert response.status_code == 200, response.text
    body = response.json()
    assert has_words(body["transcription"], SENTENCE_WORDS, at_least=4), body["transcription"]
    assert body["language"] == "en"
    [seen] = fake.transcription_requests
    assert seen.status == 200
    sent = fields(seen)
    sent.pop("temperature", None)
    if models is None:
        assert sent == {
            "model": ["gpt-transcribe"],
            "response_format": ["json"],
            "languages[]": ["en"],  # never `language`, which gpt-transcribe refuses
            "keywords[]": ["fox", "lazy dog"],
            "prompt": ["A pangram."],
        }
    else:
        # whisper-1 as before; it takes no keywords, so the prompt spells them.
        assert sent == {
            "model": ["whisper-1"],
            "response_format": ["verbose_json"],
            "language": ["en"],
            "prompt": ["A pangram. fox, lazy dog"],
        }
    server.wait_idle()


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"languages": "en"}, "'languages'"),
        ({"keyword": "fox"}, "'keyword'"),
        ({"language": "en-US"}, "ISO 639-1"),
        ({"language": ["en", "fr"]}, "en, fr"),
    ],
)
async def test_unknown_or_bad_query_options_are_refused(
    make_server: MakeServer, fake: FakeOpenAI, media: Path, query: dict[str, Any], named: str
) -> None:
    server = start(make_server, fake)
    response = await upload(server, (media / "sentence.wav").read_bytes(), **query)

    assert_error(response, 400, "invalid_parameters")
    assert named in response.json()["message"]
    assert fake.requests == []
    server.wait_idle()


def gone_warnings(server: Server) -> list[dict[str, Any]]:
    return [
        entry
        for entry in server.logs()
        if entry["logger"] == openai_models.__name__ and entry["level"] == "warning"
    ]


@pytest.mark.parametrize(
    "retirement",
    [
        {},  # OpenAI's 404 model_not_found
        {
            "status": 400,
            "code": None,
            "message": "The model `gpt-transcribe` has been deprecated and is no longer served.",
        },
        {  # speaches (FastAPI's `detail`), with the model not downloaded
            "server": "speaches",
            "message": "Model 'gpt-transcribe' is not installed locally. You can download the "
            "model using `POST /v1/models`",
        },
        {  # vLLM serving another model
            "server": "vllm",
            "message": "The model `gpt-transcribe` does not exist.",
        },
        {  # LocalAI without such a model installed
            "server": "localai",
            "message": 'model "gpt-transcribe" not found. To see available models, call '
            "GET /v1/models",
        },
    ],
    ids=["openai-404", "openai-400-deprecated", "speaches", "vllm", "localai"],
)
async def test_a_retired_model_falls_back_to_the_next_for_good(
    make_server: MakeServer, fake: FakeOpenAI, media: Path, retirement: dict[str, Any]
) -> None:
    server = start(make_server, fake)  # the default: gpt-transcribe, then whisper-1
    fake.retire("gpt-transcribe", **retirement)
    audio = (media / "sentence.wav").read_bytes()
    answers = [await upload(server, audio), await upload(server, audio)]

    for answer in answers:
        assert answer.status_code == 200, answer.text
        text = answer.json()["transcription"]
        assert has_words(text, SENTENCE_WORDS, at_least=4), text
    seen = fake.transcription_requests
    assert [(s.form["model"], s.status) for s in seen] == [
        ("gpt-transcribe", retirement.get("status", 404)),
        ("whisper-1", 200),
        ("whisper-1", 200),  # from then on, the retired model is not asked again
    ]
    # The next model got the whole MP3 again, and whisper-1's own fields.
    assert seen[1].file.data == seen[0].file.data
    assert fields(seen[1])["response_format"] == ["verbose_json"]
    [warning] = gone_warnings(server)
    assert (warning["model"], warning["nextModel"]) == ("gpt-transcribe", "whisper-1")
    assert_key_hidden(server, *answers)
    server.wait_idle()


async def test_when_the_last_model_is_gone_the_request_fails(
    make_server: MakeServer, fake: FakeOpenAI, media: Path
) -> None:
    server = start(make_server, fake, VRAI_OPENAI_MODEL="gpt-transcribe")
    fake.retire("gpt-transcribe")
    audio = (media / "sentence.wav").read_bytes()
    answers = [await upload(server, audio), await upload(server, audio)]

    for answer in answers:
        assert_error(answer, 502, "transcription_failed")
        assert "404" in answer.json()["message"]  # which upstream status ended it
    assert [s.form["model"] for s in fake.transcription_requests] == ["gpt-transcribe"] * 2
    [warning] = gone_warnings(server)
    assert (warning["model"], warning["nextModel"]) == ("gpt-transcribe", None)
    # Each failed call is logged with the upstream's own reason, under the request's id.
    for answer in answers:
        [failed] = [
            entry
            for entry in server.logs()
            if entry["message"] == "transcription call failed"
            and entry.get("requestId") == answer.json()["requestId"]
        ]
        assert failed["upstreamStatus"] == 404
        assert failed["model"] == "gpt-transcribe"
        assert "does not exist" in failed["upstreamMessage"]
    server.wait_idle()


def api_error(status: int, message: str, code: str | None = None) -> openai.APIStatusError:
    """The exception the SDK raises for OpenAI's error body with this status."""
    request = httpx2.Request("POST", "https://api.openai.com/v1/audio/transcriptions")
    body = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    response = httpx2.Response(status, request=request, json={"error": body})
    kind = {400: openai.BadRequestError, 404: openai.NotFoundError}.get(status)
    if kind is None:
        kind = openai.InternalServerError if status >= 500 else openai.APIStatusError
    return kind(f"Error code: {status} - {body}", response=response, body=body)


@pytest.mark.parametrize(
    ("status", "message", "code", "gone"),
    [
        (404, "The model `gpt-transcribe` does not exist or you do not have access to it.",
         "model_not_found", True),
        (400, "Invalid model", "model_not_found", True),
        (400, "The model `whisper-1` has been deprecated", None, True),
        (400, "The model whisper-1 was retired on 2027-02-26.", None, True),
        (404, "This model is no longer available.", None, True),
        (404, "The model `whisper-large-v3.5` does not exist.", None, True),  # a dot in a name
        (404, "Not Found", None, False),  # a wrong base URL is not a retired model
        (400, "The 'language' parameter is deprecated for this model; use 'languages'.", None,
         False),
        (400, "response_format 'verbose_json' is not compatible with model 'gpt-transcribe'.",
         "unsupported_value", False),
        (500, "The model `x` does not exist", "model_not_found", False),
    ],
)  # fmt: skip
def test_what_counts_as_a_model_gone(
    status: int, message: str, code: str | None, gone: bool
) -> None:
    assert is_model_gone(api_error(status, message, code)) is gone


def test_a_missing_model_is_recognised_whatever_the_server() -> None:
    """Each server's body for a model it lacks, as the SDK raises it (which unwraps a
    top-level `error`), and the text the log line carries."""
    request = httpx2.Request("POST", "http://127.0.0.1:8000/v1/audio/transcriptions")
    localai = 'model "tiny.en" not found. To see available models, call GET /v1/models'
    fws = "unknown model: whisper-1"
    cases: list[tuple[int, dict[str, Any], str, bool]] = [
        # speaches: FastAPI's `detail`
        (404, {"detail": "Model 'x' is not installed locally."}, "Model 'x' is", True),
        # vLLM before its errors took OpenAI's envelope
        (404, {"object": "error", "message": "The model `x` does not exist.", "code": 404},
         "The model `x`", True),
        # LocalAI (core/http/middleware/request.go): OpenAI's envelope, `code` the status
        (404, {"error": {"code": 404, "message": localai, "type": "invalid_request_error"}},
         localai, True),
        # faster-whisper-server 0.0.3: OpenAI's envelope inside FastAPI's `detail`, a 400
        (400, {"detail": {"error": {"message": fws, "type": "invalid_request_error"}}}, fws,
         True),
        (404, {"detail": "Not Found"}, "Not Found", False),  # a wrong base URL
    ]  # fmt: skip
    for status, body, text, gone in cases:
        response = httpx2.Response(status, request=request, json=body)
        kind = openai.NotFoundError if status == 404 else openai.BadRequestError
        unwrapped = body.get("error", body)  # as the SDK does
        error = kind(f"Error code: {status} - {body}", response=response, body=unwrapped)
        assert is_model_gone(error) is gone, body
        assert public_message(error).startswith(text), body


def test_an_upstream_message_is_logged_without_anything_like_a_key() -> None:
    body = {"message": "Incorrect API key provided: sk-proj-abc123XYZ. " + "x" * 400}
    request = httpx2.Request("POST", "https://api.openai.com/v1/audio/transcriptions")
    response = httpx2.Response(401, request=request, json={"error": body})
    error = openai.AuthenticationError("Error code: 401", response=response, body=body)
    logged = public_message(error, secret="sk-proj-abc123XYZ")
    assert "abc123XYZ" not in logged
    assert logged.startswith("Incorrect API key provided: ***")
    assert len(logged) <= 300


def test_each_family_is_sent_the_fields_it_takes() -> None:
    options = TranscribeOptions(language="fr", prompt="Notes.", keywords=("Vrai", "ffmpeg"))
    newer = request_fields("gpt-transcribe-2", options)
    assert {name: value for name, value in newer.items() if value is not openai.omit} == {
        "response_format": "json",
        "languages": ["fr"],
        "keywords": ["Vrai", "ffmpeg"],
        "prompt": "Notes.",
    }
    older = request_fields("gpt-4o-mini-transcribe", TranscribeOptions(temperature=0.0))
    assert {name: value for name, value in older.items() if value is not openai.omit} == {
        "response_format": "json",
        "temperature": 0.0,
    }


def test_a_model_gone_is_warned_about_once_whatever_the_threads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = f"https://upstream-{secrets.token_hex(4)}.test/v1"  # its own, in this process
    models = ModelList(("a", "b", "c"), upstream=upstream)
    again = ModelList(("a", "b", "c"), upstream=upstream)  # another transcriber, same process
    error = api_error(404, "The model `a` does not exist", "model_not_found")
    start = threading.Barrier(8)
    answers: list[bool] = []

    def drop() -> None:
        start.wait()
        answers.append(models.drop("a", error))

    with caplog.at_level(logging.WARNING, logger=openai_models.__name__):
        threads = [threading.Thread(target=drop) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == [True] * 8
        assert models.current() == again.current() == "b"
        assert again.drop("c", error) is False  # the last one: nothing follows it
        assert models.current() == "b"
        assert models.drop("b", error) is True
        assert models.current() == "c"  # the last is asked even when it is gone
    assert [(r.model, r.nextModel) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("a", "b"),
        ("c", None),
        ("b", "c"),
    ]


async def test_rate_limit_is_retried_by_the_sdk(
    make_server: MakeServer, fake: FakeOpenAI, media: Path
) -> None:
    server = start(make_server, fake, VRAI_OPENAI_MAX_RETRIES="2")
    fake.fail_next(1, status=429, retry_after=0)
    response = await upload(server, (media / "sentence.wav").read_bytes())

    assert response.status_code == 200, response.text
    assert has_words(response.json()["transcription"], SENTENCE_WORDS, at_least=4)
    first, second = fake.transcription_requests
    assert (first.status, second.status) == (429, 200)
    # The retry sent the whole segment again, not the rest of an already-read file.
    assert second.file.data == first.file.data
    assert second.file.is_wav
    assert_key_hidden(server, response)
    server.wait_idle()


@pytest.mark.parametrize("retries", [0, 2])
async def test_persistent_server_error_is_a_502(
    make_server: MakeServer, fake: FakeOpenAI, media: Path, retries: int
) -> None:
    server = start(make_server, fake, VRAI_OPENAI_MAX_RETRIES=str(retries))
    fake.fail_always(500)
    response = await upload(server, (media / "sentence.wav").read_bytes())

    assert_error(response, 502, "transcription_failed")
    seen = fake.transcription_requests
    assert len(seen) == 1 + retries
    assert {received.status for received in seen} == {500}
    assert_key_hidden(server, response)
    server.wait_idle()


async def test_hung_api_is_a_504_after_the_timeout(
    make_server: MakeServer, fake: FakeOpenAI, media: Path
) -> None:
    server = start(make_server, fake, VRAI_OPENAI_TIMEOUT_SECONDS="1", VRAI_OPENAI_MAX_RETRIES="0")
    fake.hang(30, times=None)
    began = time.monotonic()
    response = await upload(server, (media / "sentence.wav").read_bytes())
    elapsed = time.monotonic() - began

    assert_error(response, 504, "transcription_timeout")
    # At the 1 s timeout, not at the upstream's whim (it never answers): 10 s leaves room for
    # a busy machine's upload and ffmpeg around it.
    assert 1.0 <= elapsed < 10.0, elapsed
    assert len(fake.transcription_requests) == 1
    assert_key_hidden(server, response)
    server.wait_idle()


async def test_wrong_key_is_a_502_that_does_not_name_it(
    make_server: MakeServer, fake: FakeOpenAI, media: Path
) -> None:
    server = start(make_server, fake)
    fake.api_key = "sk-the-right-one"
    response = await upload(server, (media / "sentence.wav").read_bytes())

    assert_error(response, 502, "transcription_failed")
    assert API_KEY not in response.json()["message"]
    [seen] = fake.transcription_requests  # a 401 is not retried
    assert seen.status == 401
    assert not seen.authorized
    assert_key_hidden(server, response)
    server.wait_idle()


async def test_key_stays_out_of_debug_logs_and_every_answer(
    make_server: MakeServer, fake: FakeOpenAI, media: Path
) -> None:
    """At debug level the SDK and httpx log their requests: the key must not be among them."""
    server = start(make_server, fake, VRAI_LOG_LEVEL="debug", VRAI_OPENAI_MAX_RETRIES="1")
    audio = (media / "sentence.wav").read_bytes()
    answers = [await upload(server, audio)]
    fake.fail_always(500)
    answers.append(await upload(server, audio))
    fake.clear_faults()
    fake.api_key = "sk-the-right-one"
    answers.append(await upload(server, audio))
    async with httpx.AsyncClient(base_url=server.url) as client:
        answers.append(await client.get("/health"))

    assert [answer.status_code for answer in answers] == [200, 502, 502, 200]
    assert_key_hidden(server, *answers)
    assert server.log_path.stat().st_size > 0
    server.wait_idle()


async def test_fake_speaks_openai_to_the_sdk(fake: FakeOpenAI, media: Path) -> None:
    """The fake itself, straight through the SDK: every response format, chat, faults."""
    audio = (media / "sentence.wav").read_bytes()
    client = openai.AsyncOpenAI(api_key=API_KEY, base_url=fake.base_url, max_retries=1)
    async with client:
        texts = {}
        for response_format in ("json", "text", "verbose_json", "srt", "vtt"):
            result = await client.audio.transcriptions.create(
                model="whisper-1",
                file=("sentence.wav", audio, "audio/wav"),
                response_format=response_format,
                language="en",
                temperature=0,
            )
            texts[response_format] = result if isinstance(result, str) else result.text
        # tiny.en hears a little less in espeak's 22 kHz WAV than in the service's MP3.
        assert all(has_words(text, SENTENCE_WORDS, at_least=3) for text in texts.values()), texts
        assert texts["srt"].startswith("1\n00:00:0")
        assert texts["vtt"].startswith("WEBVTT\n\n00:00:0")

        with pytest.raises(openai.BadRequestError):
            await client.audio.transcriptions.create(
                model="gpt-4o-transcribe",
                file=("sentence.wav", audio, "audio/wav"),
                response_format="verbose_json",
            )

        fake.fail_next(1, status=503, path="/v1/chat/completions")
        chat = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "system", "content": "Summarize."},
                {"role": "user", "content": "the quick brown fox"},
            ],
        )
        assert chat.choices[0].message.content == f"{CHAT_PREFIX}the quick brown fox"
        assert [received.status for received in fake.chat_requests] == [503, 200]
        assert fake.chat_requests[-1].json["model"] == "gpt-4o-mini"

        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "streamed words"}],
            stream=True,
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
        assert "".join(pieces) == f"{CHAT_PREFIX}streamed words"

    with pytest.raises(openai.AuthenticationError):
        async with openai.AsyncOpenAI(api_key="sk-wrong", base_url=fake.base_url) as wrong:
            await wrong.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
    assert all(received.path.startswith("/v1/") for received in fake.requests)
    assert len(fake.requests_to(TRANSCRIPTIONS_PATH)) == 6


async def test_fake_speaks_gpt_transcribe_as_openai_does(fake: FakeOpenAI, media: Path) -> None:
    """Straight through the SDK: what gpt-transcribe takes and refuses, and a retired model."""
    audio = ("sentence.wav", (media / "sentence.wav").read_bytes(), "audio/wav")
    client = openai.AsyncOpenAI(api_key=API_KEY, base_url=fake.base_url, max_retries=0)
    async with client:
        result = await client.audio.transcriptions.create(
            model="gpt-transcribe",
            file=audio,
            languages=["en"],
            keywords=["fox", "dog"],
            prompt="A pangram.",
            response_format="json",
        )
        assert has_words(result.text, SENTENCE_WORDS, at_least=3), result.text
        [seen] = fake.transcription_requests
        # The SDK sends an array as one `name[]` field per item.
        assert fields(seen) == {
            "model": ["gpt-transcribe"],
            "languages[]": ["en"],
            "keywords[]": ["fox", "dog"],
            "prompt": ["A pangram."],
            "response_format": ["json"],
        }

        refused: list[dict[str, Any]] = [
            {"model": "gpt-transcribe", "language": "en"},
            {"model": "gpt-transcribe", "response_format": "verbose_json"},
            {"model": "gpt-transcribe", "timestamp_granularities": ["segment"]},
            {"model": "whisper-1", "keywords": ["fox"]},
        ]
        for arguments in refused:
            with pytest.raises(openai.BadRequestError):
                await client.audio.transcriptions.create(file=audio, **arguments)

        fake.retire("whisper-1")
        with pytest.raises(openai.NotFoundError) as caught:
            await client.audio.transcriptions.create(model="whisper-1", file=audio)
        assert caught.value.code == "model_not_found"
        assert is_model_gone(caught.value)
    assert [s.status for s in fake.transcription_requests] == [200, 400, 400, 400, 400, 404]
