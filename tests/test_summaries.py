"""Summaries through the real server and the real `openai` SDK, against `FakeOpenAI`.

The module's server has `OPENAI_API_KEY` and `OPENAI_BASE_URL` pointing at the fake, and
`VRAI_TRANSCRIBER=openai`: the fake transcribes with the real local Whisper model (once per
distinct MP3, so the many requests here cost one transcription) and answers chat completions
deterministically (`CHAT_PREFIX` + the last user message).  What the fake received shows what
the service sent: the bundled prompt as the system message, the transcript as the user one,
the model from `VRAI_SUMMARY_MODEL`.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest

from .support.audio import SENTENCE_WORDS, has_words
from .support.client import chunked
from .support.fake_openai import CHAT_PATH, CHAT_PREFIX, FakeOpenAI, Fault
from .support.server import Server, start_server
from .test_errors import (
    assert_error_response,
    assert_raw_error,
    raw_connection,
    read_response,
    request_head,
)

pytestmark = pytest.mark.anyio

UPSTREAM_KEY = f"sk-summaries-{secrets.token_hex(8)}"
SUMMARY_MODEL = "gpt-vrai-summary-test"
KINDS = ("summarize", "simple-cleanup", "whatsapp-cleanup")
ENDPOINTS = ("transcriptions", "legacy-json", "legacy-multipart")
BOUNDARY = "vrai-summary-form"


def bundled_prompt(kind: str) -> str:
    return (
        resources.files("vrai_stream.speech").joinpath("prompts", f"{kind}.txt").read_text("utf-8")
    )


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`VRAI_PROMPTS_DIR`, empty at first: the bundled prompts apply until a test adds one."""
    return tmp_path_factory.mktemp("prompts")


@pytest.fixture(scope="module")
def summary_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI, prompts_dir: Path
) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("summaries"),
        {
            **upstream.server_env(),
            "VRAI_SUMMARY_MODEL": SUMMARY_MODEL,
            "VRAI_PROMPTS_DIR": str(prompts_dir),
            "VRAI_OPENAI_MAX_RETRIES": "2",
        },
    )
    yield running
    running.stop()


@pytest.fixture
def fake(upstream: FakeOpenAI) -> Iterator[FakeOpenAI]:
    upstream.reset()
    yield upstream
    upstream.reset()


async def ask(
    server: Server, endpoint: str, audio: bytes, kind: str, *, type_last: bool = True
) -> httpx.Response:
    """One request for `kind` on `endpoint`, the recording sent chunked.

    In the multipart form, `summarizationType` comes after the file (`type_last`) or first.
    """
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        if endpoint == "transcriptions":
            return await client.post(
                f"/v1/transcriptions?fromTime=0&toTime=8&summarizationType={kind}",
                content=chunked(audio),
            )
        if endpoint == "legacy-json":
            fields = json.dumps({"fromTime": 0, "toTime": 8, "summarizationType": kind})[1:-1]
            blob = base64.b64encode(audio).decode()
            body = ("{" + fields + f', "fileBlob": "{blob}"' + "}").encode()
            return await client.post(
                "/trim-and-transcribe",
                content=chunked(body),
                headers={"Content-Type": "application/json"},
            )
        type_part = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="summarizationType"'
            f"\r\n\r\n{kind}\r\n"
        ).encode()
        body = b"" if type_last else type_part
        body += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="fromTime"\r\n\r\n0\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="toTime"\r\n\r\n8\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="audio"; filename="n.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        body += audio + b"\r\n" + (type_part if type_last else b"")
        body += f"--{BOUNDARY}--\r\n".encode()
        return await client.post(
            "/trim-and-transcribe-multipart",
            content=chunked(body),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )


def chat_messages(fake: FakeOpenAI) -> list[dict[str, Any]]:
    [chat] = fake.chat_requests
    assert chat.authorized
    assert chat.json["model"] == SUMMARY_MODEL
    messages: list[dict[str, Any]] = chat.json["messages"]
    return messages


# --- each type, on each endpoint --------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("kind", KINDS)
async def test_each_type_is_summarized_with_its_bundled_prompt(
    summary_server: Server, fake: FakeOpenAI, media: Path, endpoint: str, kind: str
) -> None:
    audio = (media / "sentence.wav").read_bytes()
    response = await ask(summary_server, endpoint, audio, kind)

    assert response.status_code == 200, response.text
    body = response.json()
    transcript = body["transcription"]
    assert has_words(transcript, SENTENCE_WORDS, at_least=4), transcript
    assert body["summary"] == CHAT_PREFIX + transcript
    assert "summaryError" not in body
    assert chat_messages(fake) == [
        {"role": "system", "content": bundled_prompt(kind)},
        {"role": "user", "content": transcript},
    ]
    summary_server.wait_idle()


async def test_none_asks_for_no_summary(
    summary_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    audio = (media / "sentence.wav").read_bytes()
    response = await ask(summary_server, "legacy-json", audio, "none")
    assert response.status_code == 200, response.text
    assert "summary" not in response.json()
    assert fake.chat_requests == []


async def test_a_prompt_in_the_prompts_dir_replaces_the_bundled_one(
    summary_server: Server, fake: FakeOpenAI, media: Path, prompts_dir: Path
) -> None:
    audio = (media / "sentence.wav").read_bytes()
    custom = "Summarize this voice note as a haiku.\n"
    (prompts_dir / "summarize.txt").write_text(custom, encoding="utf-8")
    try:
        replaced = await ask(summary_server, "transcriptions", audio, "summarize")
        replaced_messages = chat_messages(fake)
        fake.reset()
        # The other types keep their bundled prompts.
        other = await ask(summary_server, "transcriptions", audio, "simple-cleanup")
        other_messages = chat_messages(fake)
    finally:
        (prompts_dir / "summarize.txt").unlink()
    assert replaced.status_code == 200, replaced.text
    assert replaced_messages[0] == {"role": "system", "content": custom}
    assert replaced.json()["summary"] == CHAT_PREFIX + replaced.json()["transcription"]
    assert other.status_code == 200, other.text
    assert other_messages[0] == {"role": "system", "content": bundled_prompt("simple-cleanup")}


# --- a failing chat endpoint ------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["transcriptions", "legacy-json"])
async def test_a_failing_summary_still_returns_the_transcript(
    summary_server: Server, fake: FakeOpenAI, media: Path, endpoint: str
) -> None:
    # Only chat completions fail (with a tiny Retry-After: the SDK's retries are quick).
    fake.inject(Fault(status=500, path=CHAT_PATH, retry_after=0.001), times=None)
    audio = (media / "sentence.wav").read_bytes()
    response = await ask(summary_server, endpoint, audio, "summarize")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    assert has_words(body["transcription"], SENTENCE_WORDS, at_least=4), body["transcription"]
    assert "summary" not in body
    assert isinstance(body["summaryError"], str) and "500" in body["summaryError"]
    assert UPSTREAM_KEY not in response.text
    # One attempt and VRAI_OPENAI_MAX_RETRIES=2 retries, each one answered 500.
    assert [chat.status for chat in fake.chat_requests] == [500, 500, 500]
    log = next(
        entry for entry in summary_server.request_logs() if entry["requestId"] == body["requestId"]
    )
    assert log["status"] == 200
    assert log["summaryError"] == body["summaryError"]
    summary_server.wait_idle()


async def test_a_chat_endpoint_refusing_the_key_is_a_summary_error_without_the_key(
    summary_server: Server, fake: FakeOpenAI, media: Path
) -> None:
    """The fake's 401 names the key it was given, as OpenAI's does: it must not reach a user."""
    fake.inject(Fault(status=401, path=CHAT_PATH, message=f"Bad key {UPSTREAM_KEY}"), times=None)
    audio = (media / "sentence.wav").read_bytes()
    response = await ask(summary_server, "transcriptions", audio, "whatsapp-cleanup")
    assert response.status_code == 200, response.text
    assert "401" in response.json()["summaryError"]
    assert UPSTREAM_KEY not in response.text
    assert UPSTREAM_KEY not in summary_server.log_path.read_text()


# --- no key: a summary cannot be made ---------------------------------------------------------


async def test_no_key_means_503_before_the_body_is_read(server: Server) -> None:
    """The shared server: local transcriber, no OpenAI key.  The body is declared, never sent."""
    path = "/v1/transcriptions?fromTime=0&toTime=5&summarizationType=summarize"
    for expect in ({}, {"Expect": "100-continue"}):
        async with raw_connection(server) as stream:
            await stream.send(request_head(path, {"Content-Length": "10000000", **expect}))
            response = await read_response(stream, within=5)
        assert_raw_error(response, expected=503, code="summary_unavailable")
        assert "summarizationType=none" in response.json()["message"]
    server.wait_idle()


@pytest.mark.parametrize("kind", KINDS)
async def test_no_key_means_503_on_the_legacy_endpoints(
    server: Server, media: Path, kind: str
) -> None:
    """The type comes before the audio here, so the refusal comes before any work."""
    audio = (media / "sentence.wav").read_bytes()
    for endpoint in ("legacy-json", "legacy-multipart"):
        response = await ask(server, endpoint, audio, kind, type_last=False)
        assert_error_response(response, expected=503, code="summary_unavailable")
    assert not any(
        entry.get("transcription") or entry.get("audioSeconds")
        for entry in server.request_logs()
        if entry["code"] == "summary_unavailable"
    ), "a refused summary must not have run the job"
    server.wait_idle()
