"""`POST /v1/audio/transcriptions` as any OpenAI SDK meets it: the real `openai` package.

Most requests go to a server of this module that authenticates static tokens (so the SDK's
`api_key` is the bearer token) and transcribes through `FakeOpenAI` upstream (the real
local Whisper model, once per distinct MP3 and options): every `response_format` costs one
transcription in all, and the upstream's records show what the service passed on.  One
request goes to the shared `server` (local Whisper, no auth) with `AsyncOpenAI`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from vrai_stream.auth.config import hash_token
from vrai_stream.speech.languages import language_code, language_name

from .support.audio import SENTENCE_WORDS, has_words
from .support.fake_openai import FakeOpenAI
from .support.server import Server, start_server

pytestmark = pytest.mark.anyio

UPSTREAM_KEY = f"sk-upstream-{secrets.token_hex(8)}"
USER_TOKEN = f"vrai-{secrets.token_urlsafe(24)}"
USER = "sdk-user"
SENTENCE_SECONDS = 2.8

CUE = re.compile(
    r"(\d{2}):(\d{2}):(\d{2})([,.])(\d{3}) --> (\d{2}):(\d{2}):(\d{2})([,.])(\d{3})\n(.+)"
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeOpenAI) -> FakeOpenAI:
    upstream.reset()
    return upstream


@pytest.fixture(scope="module")
def sdk_server(tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("openai-endpoint"),
        {
            **upstream.server_env(),
            "VRAI_AUTH": "token",
            "VRAI_AUTH_TOKENS": f"{USER}:{hash_token(USER_TOKEN)}",
        },
    )
    yield running
    running.stop()


def client_for(server: Server, api_key: str = USER_TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def cues(text: str, separator: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue of an SRT or WebVTT document."""
    found = []
    for match in CUE.finditer(text):
        h1, m1, s1, sep1, ms1, h2, m2, s2, sep2, ms2, words = match.groups()
        assert sep1 == sep2 == separator, match.group(0)
        start = int(h1) * 3600 + int(m1) * 60 + int(s1) + int(ms1) / 1000
        end = int(h2) * 3600 + int(m2) * 60 + int(s2) + int(ms2) / 1000
        found.append((start, end, words))
    return found


def assert_timed(spans: list[tuple[float, float, str]]) -> None:
    assert spans, "no timed segments"
    previous_end = 0.0
    for start, end, _ in spans:
        assert previous_end - 0.01 <= start < end <= SENTENCE_SECONDS + 0.5, spans
        previous_end = end
    assert has_words(" ".join(text for _, _, text in spans), SENTENCE_WORDS, at_least=4), spans


# --- every response_format -------------------------------------------------------------------


@pytest.mark.parametrize("response_format", ["json", "text", "verbose_json", "srt", "vtt"])
def test_every_response_format_carries_the_words(
    sdk_server: Server, fake: FakeOpenAI, media: Path, response_format: Any
) -> None:
    client = client_for(sdk_server)
    with (media / "sentence.wav").open("rb") as speech:
        result: Any = client.audio.transcriptions.create(
            model="whisper-1", file=speech, response_format=response_format
        )

    if response_format == "json":
        assert isinstance(result, openai.types.audio.Transcription)
        assert has_words(result.text, SENTENCE_WORDS, at_least=4), result.text
    elif response_format == "text":
        assert isinstance(result, str)
        assert has_words(result, SENTENCE_WORDS, at_least=4), result
    elif response_format == "verbose_json":
        assert isinstance(result, openai.types.audio.TranscriptionVerbose)
        assert result.language == "english", "OpenAI's form of the language"
        assert has_words(result.text, SENTENCE_WORDS, at_least=4), result.text
        assert result.duration == pytest.approx(SENTENCE_SECONDS, abs=0.3)
        assert result.segments
        assert_timed([(s.start, s.end, s.text) for s in result.segments])
    else:
        assert isinstance(result, str)
        if response_format == "vtt":
            assert result.startswith("WEBVTT\n\n"), result
        else:
            assert re.match(r"1\n\d{2}:", result), result
        assert_timed(cues(result, "," if response_format == "srt" else "."))

    # Through the service's own pipeline: ffmpeg decoded it, the segmenter cut it.
    [sent] = fake.transcription_requests
    assert sent.file.is_wav
    entry = sdk_server.request_logs()[-1]
    assert (entry["endpoint"], entry["status"], entry["userId"]) == ("openai", 200, USER)
    sdk_server.wait_idle()


@pytest.mark.parametrize("languages", [{"language": "en"}, {"languages": ["en"]}])
def test_language_keywords_prompt_and_temperature_reach_the_transcriber(
    sdk_server: Server, fake: FakeOpenAI, media: Path, languages: dict[str, Any]
) -> None:
    """The SDK sends arrays as one `name[]` field per item; upstream is `gpt-transcribe`."""
    client = client_for(sdk_server)
    with (media / "sentence.wav").open("rb") as speech:
        result = client.audio.transcriptions.create(
            model="gpt-transcribe",
            file=speech,
            keywords=["fox", "lazy dog"],
            prompt="A pangram about a fox and a dog.",
            temperature=0.2,
            **languages,
        )
    assert has_words(result.text, SENTENCE_WORDS, at_least=4), result.text
    [sent] = fake.transcription_requests
    assert sent.status == 200
    assert sent.form["model"] == "gpt-transcribe"
    assert "language" not in sent.form  # gpt-transcribe refuses it
    assert sent.form["languages[]"] == "en"
    assert sent.form["keywords[]"] == ["fox", "lazy dog"]
    assert sent.form["prompt"] == "A pangram about a fox and a dog."
    assert sent.form["response_format"] == "json"
    assert float(str(sent.form["temperature"])) == pytest.approx(0.2)
    sdk_server.wait_idle()


def test_two_languages_are_refused(sdk_server: Server, fake: FakeOpenAI, media: Path) -> None:
    client = client_for(sdk_server)
    with (
        (media / "sentence.wav").open("rb") as speech,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        client.audio.transcriptions.create(
            model="gpt-transcribe", file=speech, languages=["en", "fr"]
        )
    body: Any = caught.value.body
    assert body["code"] == "invalid_parameters", body
    assert "en, fr" in body["message"]
    assert fake.requests == []
    sdk_server.wait_idle()


def test_the_sdk_api_key_is_the_bearer_token(
    sdk_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    client = client_for(sdk_server, api_key="not-a-known-token")
    with (
        (media / "sentence.wav").open("rb") as speech,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        client.audio.transcriptions.create(model="whisper-1", file=speech)
    assert caught.value.status_code == 401
    body: Any = caught.value.body
    assert body["code"] == "unauthorized", body
    assert caught.value.response.headers["www-authenticate"].startswith("Bearer ")
    assert fake.requests == [], "a refused request must not reach the transcriber"


async def test_the_async_sdk_with_a_wrong_key_gets_the_401(
    sdk_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    """`AsyncOpenAI` sends a form in several writes; a refusal must reach it every time.

    The server answers 401 before reading and closes at once: a client still writing then
    gets a connection reset, and the SDK reports `APIConnectionError` (a network failure,
    so an app retries instead of asking its user to sign in again).  See
    `test_auth_http.test_an_async_client_still_sending_sees_the_401`.
    """
    audio = (media / "sentence.wav").read_bytes()
    outcomes = []
    async with openai.AsyncOpenAI(
        base_url=sdk_server.url + "/v1", api_key="not-a-known-token", max_retries=0
    ) as client:
        for _ in range(10):
            try:
                await client.audio.transcriptions.create(
                    model="whisper-1", file=("note.wav", audio, "audio/wav")
                )
            except openai.APIError as exc:
                outcomes.append(type(exc).__name__)
    assert outcomes == ["AuthenticationError"] * 10, outcomes
    assert fake.requests == []


def test_an_undecodable_file_is_the_sdks_422_with_our_message(
    sdk_server: Server, fake: FakeOpenAI
) -> None:
    client = client_for(sdk_server)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.audio.transcriptions.create(
            model="whisper-1", file=("note.m4a", b"this is not audio at all\n" * 200)
        )
    failure = caught.value
    assert isinstance(failure, openai.APIStatusError)
    assert failure.status_code == 422
    body: Any = failure.body
    assert body["code"] == "undecodable_audio", body
    assert body["message"] == "The upload is not a recognizable audio file", body
    assert body["message"] in failure.message
    assert fake.requests == []
    sdk_server.wait_idle()


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"response_format": "xml"}, "response_format"),
        ({"temperature": 1.5}, "temperature"),
    ],
)
def test_bad_options_are_the_sdks_400(
    sdk_server: Server, media: Path, arguments: dict[str, Any], words: str
) -> None:
    client = client_for(sdk_server)
    with (
        (media / "sentence.wav").open("rb") as speech,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        client.audio.transcriptions.create(model="whisper-1", file=speech, **arguments)
    body: Any = caught.value.body
    assert body["code"] == "invalid_parameters", body
    assert words in body["message"]
    sdk_server.wait_idle()


# --- the local transcriber, with the async SDK ------------------------------------------------


async def test_the_async_sdk_against_the_local_transcriber(server: Server, media: Path) -> None:
    """No auth on the shared server: any api_key will do."""
    client = openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60
    )
    async with client:
        result = await client.audio.transcriptions.create(
            model="whisper-1",
            file=("note.wav", (media / "sentence.wav").read_bytes(), "audio/wav"),
            response_format="verbose_json",
        )
    assert has_words(result.text, SENTENCE_WORDS, at_least=4), result.text
    assert result.language == "english", "the local model's `en`, in OpenAI's form"
    assert result.segments
    assert_timed([(s.start, s.end, s.text) for s in result.segments])
    server.wait_idle()


@pytest.mark.parametrize(
    ("reported", "code", "name"),
    [("en", "en", "english"), ("english", "en", "english"), ("French", "fr", "french"),
     ("yue", "yue", "cantonese"), ("klingon", "klingon", "klingon")],
)  # fmt: skip
def test_languages_are_codes_in_transcripts_and_names_in_verbose_json(
    reported: str, code: str, name: str
) -> None:
    """The local model reports `en`, OpenAI `english`: transcripts always carry the code,
    the OpenAI-compatible `verbose_json` always the name; unknown values pass unchanged."""
    assert language_code(reported) == code
    assert language_name(reported) == name
