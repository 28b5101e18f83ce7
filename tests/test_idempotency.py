"""`Idempotency-Key` through the real server: a retry after a lost response gets the first
answer, concurrent duplicates share one job, and nothing is transcribed or billed twice.

The transcriber is the tests' OpenAI-compatible server (real `openai` SDK, real model
behind it), so every call the service makes upstream is counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from vrai_stream.auth.config import hash_token

from .support.audio import SENTENCE_WORDS, has_words
from .support.client import chunked
from .support.fake_openai import FakeOpenAI
from .support.server import Server, start_server
from .test_auth_http import TOKEN_USERS, auth_header
from .test_errors import CHUNKED, chunk_frame, raw_connection, request_head

pytestmark = pytest.mark.anyio

WINDOW = "/v1/transcriptions?fromTime=0&toTime=30"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def keyed_env(upstream: FakeOpenAI) -> dict[str, str]:
    """A server's settings: the test users' tokens, transcribed through `upstream`."""
    table = ",".join(f"{user}:{hash_token(token)}" for user, token in TOKEN_USERS.items())
    return {**upstream.server_env(), "VRAI_AUTH": "token", "VRAI_AUTH_TOKENS": table}


@pytest.fixture(scope="module")
def keyed_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI
) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("idempotency"), keyed_env(upstream))
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream: FakeOpenAI) -> None:
    upstream.reset()


@pytest.fixture(scope="module")
def speech(media: Path) -> bytes:
    return (media / "sentence.wav").read_bytes()


def headers(user: str, key: str, **more: str) -> dict[str, str]:
    return {
        **auth_header(TOKEN_USERS[user]),
        "Idempotency-Key": key,
        "Content-Type": "audio/wav",
        **more,
    }


def audio_seconds_billed(server: Server, user: str) -> float:
    """A user's audio, as billing reads it: the request log's `audioSeconds` per `userId`."""
    return sum(
        entry.get("audioSeconds", 0.0)
        for entry in server.request_logs()
        if entry.get("userId") == user
    )


async def test_a_retry_after_a_lost_response_gets_the_first_answer(
    keyed_server: Server, upstream: FakeOpenAI, speech: bytes
) -> None:
    key = "lost-response-1"
    billed_before = audio_seconds_billed(keyed_server, "alice")
    jobs_before = len(_jobs(keyed_server, "alice"))
    # The first attempt sends its whole body, then the connection dies before the answer.
    async with raw_connection(keyed_server) as stream:
        await stream.send(request_head(WINDOW, {**headers("alice", key), **CHUNKED}))
        await stream.send(chunk_frame(speech) + chunk_frame(b""))
    first = await _next_job(keyed_server, "alice", jobs_before)
    calls = len(upstream.transcription_requests)
    assert calls >= 1

    async with httpx.AsyncClient(base_url=keyed_server.url, timeout=60) as client:
        retry = await client.post(WINDOW, content=chunked(speech), headers=headers("alice", key))
    assert retry.status_code == 200, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["requestId"] == first["requestId"]
    assert has_words(retry.json()["transcription"], SENTENCE_WORDS, at_least=3)
    assert len(upstream.transcription_requests) == calls, "transcribed twice"
    billed = audio_seconds_billed(keyed_server, "alice") - billed_before
    assert billed == pytest.approx(first["audioSeconds"], abs=0.01), "billed twice"
    keyed_server.wait_idle()


async def test_concurrent_duplicates_share_one_job(
    keyed_server: Server, upstream: FakeOpenAI, speech: bytes
) -> None:
    answers: list[httpx.Response] = []

    async def send(client: httpx.AsyncClient) -> None:
        body = chunked(speech, chunk_size=16 * 1024, delay=0.05)  # both are still uploading
        answers.append(
            await client.post(WINDOW, content=body, headers=headers("alice", "double-tap"))
        )

    async with (
        httpx.AsyncClient(base_url=keyed_server.url, timeout=60) as client,
        anyio.create_task_group() as group,
    ):
        group.start_soon(send, client)
        group.start_soon(send, client)
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert answers[0].json() == answers[1].json()
    assert sorted(a.headers.get("idempotent-replayed", "no") for a in answers) == ["no", "true"]
    jobs = [
        entry
        for entry in keyed_server.request_logs()
        if entry["requestId"] == answers[0].json()["requestId"]
    ]
    assert len(jobs) == 1
    single = len(upstream.transcription_requests)
    async with httpx.AsyncClient(base_url=keyed_server.url, timeout=60) as client:
        fresh = await client.post(WINDOW, content=speech, headers=headers("alice", "another-key"))
    assert fresh.status_code == 200
    assert len(upstream.transcription_requests) == 2 * single, "the duplicate was transcribed"
    keyed_server.wait_idle()


async def test_the_same_key_with_another_body_is_refused(
    keyed_server: Server, speech: bytes
) -> None:
    async with httpx.AsyncClient(base_url=keyed_server.url, timeout=60) as client:
        first = await client.post(WINDOW, content=speech, headers=headers("alice", "reused"))
        assert first.status_code == 200
        other = speech[:-4000] + bytes(4000)
        again = await client.post(WINDOW, content=other, headers=headers("alice", "reused"))
        window = await client.post(
            "/v1/transcriptions?fromTime=0&toTime=20",
            content=speech,
            headers=headers("alice", "reused"),
        )
    for refused in (again, window):
        assert refused.status_code == 422
        assert refused.json()["code"] == "idempotency_key_reused"
        assert "idempotent-replayed" not in refused.headers


async def test_keys_belong_to_their_user(
    keyed_server: Server, upstream: FakeOpenAI, speech: bytes
) -> None:
    async with httpx.AsyncClient(base_url=keyed_server.url, timeout=60) as client:
        alice = await client.post(WINDOW, content=speech, headers=headers("alice", "shared-key"))
        calls = len(upstream.transcription_requests)
        bob = await client.post(WINDOW, content=speech, headers=headers("bob", "shared-key"))
    assert alice.status_code == bob.status_code == 200
    assert "idempotent-replayed" not in bob.headers
    assert bob.json()["requestId"] != alice.json()["requestId"]
    assert len(upstream.transcription_requests) == 2 * calls


async def test_a_failed_first_request_leaves_the_key_free(
    keyed_server: Server, upstream: FakeOpenAI, speech: bytes
) -> None:
    upstream.fail_always(status=500)
    async with httpx.AsyncClient(base_url=keyed_server.url, timeout=120) as client:
        failed = await client.post(WINDOW, content=speech, headers=headers("alice", "retry-me"))
        assert failed.status_code == 502
        upstream.clear_faults()
        retried = await client.post(WINDOW, content=speech, headers=headers("alice", "retry-me"))
    assert retried.status_code == 200, retried.text
    assert "idempotent-replayed" not in retried.headers
    assert has_words(retried.json()["transcription"], SENTENCE_WORDS, at_least=3)


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
async def test_a_malformed_key_is_refused(keyed_server: Server, speech: bytes, key: str) -> None:
    async with httpx.AsyncClient(base_url=keyed_server.url, timeout=60) as client:
        response = await client.post(WINDOW, content=speech, headers=headers("alice", key))
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_parameters"
    assert "Idempotency-Key" in response.json()["message"]


def _jobs(server: Server, user: str) -> list[dict[str, Any]]:
    return [
        entry
        for entry in server.request_logs()
        if entry.get("userId") == user and entry.get("endpoint") == "transcriptions"
    ]


async def _next_job(server: Server, user: str, seen: int) -> dict[str, Any]:
    """The log line of the user's next job, once it has finished."""
    with anyio.fail_after(60):
        while len(jobs := _jobs(server, user)) <= seen:  # noqa: ASYNC110 (another process)
            await anyio.sleep(0.05)
    assert jobs[seen]["status"] == 200, jobs[seen]
    return jobs[seen]
