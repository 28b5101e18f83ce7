"""The OpenAI transcriber: the real server and the real `openai` SDK against a loopback fake.

The fake (`fake_openai.FakeOpenAI`) transcribes with the local Whisper model, so a success
here means real words made it through ffmpeg, the SDK, HTTP and back.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .support.audio import SENTENCE_WORDS, decoded_seconds, has_words
from .support.client import chunked
from .support.fake_openai import CHAT_PREFIX, TRANSCRIPTIONS_PATH, FakeOpenAI
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


async def upload(server: Server, audio: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        return await client.post("/v1/transcriptions", content=chunked(audio))


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


@pytest.mark.parametrize("model", [None, "whisper-large-v3"])
async def test_speech_comes_back_as_its_words(
    make_server: MakeServer, fake: FakeOpenAI, media: Path, tmp_path: Path, model: str | None
) -> None:
    server = start(make_server, fake, **({"VRAI_OPENAI_MODEL": model} if model else {}))
    audio = (media / "sentence.wav").read_bytes()
    response = await upload(server, audio)

    assert response.status_code == 200, response.text
    body = response.json()
    assert has_words(body["transcription"], SENTENCE_WORDS, at_least=4), body["transcription"]
    assert body["language"] == "en"  # OpenAI says "english": the same code either way
    [seen] = fake.transcription_requests
    assert seen.status == 200
    assert seen.form["model"] == (model or "whisper-1")
    assert "authorization" not in seen.headers
    # Our request ID travels upstream: one request can be traced on both sides.
    assert seen.headers["x-client-request-id"] == body["requestId"]
    # What went out is the window as MP3, not the upload.
    sent = seen.file
    assert sent.is_mp3
    assert sent.filename is not None
    assert sent.filename.endswith(".mp3")
    assert sent.content_type == "audio/mpeg"
    assert len(sent.data) == body["fileSize"]
    assert len(sent.data) < len(audio)
    assert abs(decoded_seconds(sent.data, tmp_path) - body["duration"]) < 0.1
    assert_key_hidden(server, response)
    server.wait_idle()


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
    # The retry sent the whole MP3 again, not the rest of an already-read file.
    assert second.file.data == first.file.data
    assert len(second.file.data) == response.json()["fileSize"]
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
    assert 1.0 <= elapsed < 6.0, elapsed
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
