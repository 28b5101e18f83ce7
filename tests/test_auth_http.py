"""Authentication as a client meets it: the real server in `jwt`, `token` and `firebase` modes.

Tokens are signed with keys the tests make and published by a JWKS on loopback
(`jwks_server`), which the servers fetch for real; in `firebase` mode `VRAI_JWKS_URL`
points there instead of Google.  The servers transcribe through the `openai` SDK against
`FakeOpenAI` (the real local Whisper model, once per distinct MP3), so the valid requests
here cost one transcription in all.

Besides the 401s themselves, this checks *when* they come: before one byte of the body is
read, so a phone on a slow network never uploads a recording only to be refused, and a
client sending `Expect: 100-continue` never gets the `100 Continue` that would make it send.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from vrai_stream.auth.config import hash_token
from vrai_stream.auth.jwt import FIREBASE_ISSUER_PREFIX

from .support.audio import SENTENCE_WORDS, has_words
from .support.client import chunked
from .support.fake_openai import FakeOpenAI
from .support.jwks_server import JwksServer, SigningKey, claims_from, hand_made, hs256, jwks_server
from .support.server import Server, start_server
from .test_errors import CHUNKED, chunk_frame, raw_connection, read_response, request_head

pytestmark = pytest.mark.anyio

UPSTREAM_KEY = f"sk-auth-{secrets.token_hex(8)}"
ISSUER = "https://issuer.vrai.example"
AUDIENCE = "vrai-notes-app"
PROJECT = "vrai-notes-test"
TOKEN_USERS = {"alice": f"alice-{secrets.token_urlsafe(24)}", "bob": secrets.token_urlsafe(24)}
AUDIO_ENDPOINTS = (
    "/v1/transcriptions",
    "/trim-and-transcribe",
    "/trim-and-transcribe-multipart",
    "/v1/audio/transcriptions",
)
ERROR_KEYS = {"success", "status", "code", "message", "requestId"}
MiB = 1024 * 1024


# --- keys, tokens, servers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.rsa("vrai-key-1")


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    """Never published."""
    return SigningKey.rsa("vrai-key-unpublished")


@pytest.fixture(scope="module")
def jwks(key: SigningKey) -> Iterator[JwksServer]:
    with jwks_server(key) as server:
        yield server


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


def _start(factory: pytest.TempPathFactory, name: str, upstream: FakeOpenAI, **env: str) -> Server:
    return start_server(
        factory.mktemp(name),
        {
            **upstream.server_env(),
            **env,
        },
    )


@pytest.fixture(scope="module")
def jwt_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI, jwks: JwksServer
) -> Iterator[Server]:
    running = _start(
        tmp_path_factory,
        "auth-jwt",
        upstream,
        VRAI_AUTH="jwt",
        VRAI_JWKS_URL=jwks.url,
        VRAI_JWT_ISSUER=ISSUER,
        VRAI_JWT_AUDIENCE=AUDIENCE,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def token_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI
) -> Iterator[Server]:
    table = ",".join(f"{user}:{hash_token(token)}" for user, token in TOKEN_USERS.items())
    running = _start(
        tmp_path_factory, "auth-token", upstream, VRAI_AUTH="token", VRAI_AUTH_TOKENS=table
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def firebase_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI, jwks: JwksServer
) -> Iterator[Server]:
    running = _start(
        tmp_path_factory,
        "auth-firebase",
        upstream,
        VRAI_AUTH="firebase",
        VRAI_FIREBASE_PROJECT_ID=PROJECT,
        VRAI_JWKS_URL=jwks.url,
    )
    yield running
    running.stop()


def claims(**changes: Any) -> dict[str, Any]:
    """Valid `jwt`-mode claims; a change to `None` drops that claim."""
    return claims_from(ISSUER, AUDIENCE, "user-jwt-1", **changes)


def firebase_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": FIREBASE_ISSUER_PREFIX + PROJECT,
        "aud": PROJECT,
        "sub": "firebase-uid-7",
        "auth_time": now - 3600,
    }
    return claims(**{**base, **changes})


# --- requests ---------------------------------------------------------------------------------


def auth_header(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def request_for(
    endpoint: str, audio: bytes, headers: dict[str, str], *, stream: bool = True
) -> tuple[str, dict[str, Any]]:
    """The URL and `post` arguments of a well-formed request to `endpoint` for `audio`.

    The raw and JSON bodies go chunked when `stream` (an async generator), else with a
    Content-Length; the forms always have one.
    """
    if endpoint == "/v1/transcriptions":
        content = chunked(audio) if stream else audio
        return f"{endpoint}?fromTime=0&toTime=8", {"content": content, "headers": headers}
    if endpoint == "/trim-and-transcribe":
        body = json.dumps(
            {"fromTime": 0, "toTime": 8, "fileBlob": base64.b64encode(audio).decode()}
        ).encode()
        return endpoint, {
            "content": chunked(body) if stream else body,
            "headers": {**headers, "Content-Type": "application/json"},
        }
    if endpoint == "/trim-and-transcribe-multipart":
        return endpoint, {
            "data": {"fromTime": "0", "toTime": "8"},
            "files": {"audio": ("note.wav", audio, "audio/wav")},
            "headers": headers,
        }
    return endpoint, {
        "data": {"model": "whisper-1", "toTime": "8"},
        "files": {"file": ("note.wav", audio, "audio/wav")},
        "headers": headers,
    }


async def call(
    client: httpx.AsyncClient,
    endpoint: str,
    audio: bytes,
    headers: dict[str, str],
    *,
    stream: bool = True,
) -> httpx.Response:
    url, arguments = request_for(endpoint, audio, headers, stream=stream)
    return await client.post(url, **arguments)


async def refused_by(
    server: Server, endpoint: str, audio: bytes, token: str | None
) -> httpx.Response:
    """A request that will be refused, sent by httpx's blocking client (in a thread).

    The async client may never see the 401 when the server closes while it is still writing
    (see `test_an_async_client_still_sending_sees_the_401`); the blocking one reads it anyway.
    """

    def send() -> httpx.Response:
        url, arguments = request_for(endpoint, audio, auth_header(token), stream=False)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return client.post(url, **arguments)

    return await anyio.to_thread.run_sync(send)


def text_of(endpoint: str, response: httpx.Response) -> str:
    body = response.json()
    return str(body["text"] if endpoint == "/v1/audio/transcriptions" else body["transcription"])


def assert_unauthorized(response: httpx.Response, *, invalid: bool, token: str | None) -> None:
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="vrai-stream"'), challenge
    assert ('error="invalid_token"' in challenge) is invalid, challenge
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) - {"error"} == ERROR_KEYS, body
    assert (body["success"], body["status"], body["code"]) == (False, 401, "unauthorized")
    if token and len(token) > 3:
        assert token not in response.text and token not in challenge


def log_of(server: Server, response: httpx.Response) -> dict[str, Any]:
    request_id = response.headers["x-request-id"]
    [entry] = [e for e in server.request_logs() if e.get("requestId") == request_id]
    return entry


def audio_seconds_by_user(server: Server) -> dict[str, float]:
    """Each user's audio, as billing reads it: the request log's `audioSeconds` by `userId`
    (the metric has no user label: one series per user would grow without bound)."""
    found: dict[str, float] = {}
    for entry in server.request_logs():
        if "audioSeconds" in entry:
            found[entry["userId"]] = found.get(entry["userId"], 0.0) + entry["audioSeconds"]
    return found


# --- valid tokens -----------------------------------------------------------------------------


async def test_a_valid_jwt_opens_every_audio_endpoint_and_is_billed_to_its_user(
    jwt_server: Server, key: SigningKey, media: Path
) -> None:
    audio = (media / "sentence.wav").read_bytes()
    token = key.sign(claims(sub="user-jwt-1"))
    durations = 0.0
    async with httpx.AsyncClient(base_url=jwt_server.url, timeout=60) as client:
        for endpoint in AUDIO_ENDPOINTS:
            response = await call(client, endpoint, audio, auth_header(token))
            assert response.status_code == 200, (endpoint, response.text)
            assert has_words(text_of(endpoint, response), SENTENCE_WORDS, at_least=4)
            entry = log_of(jwt_server, response)
            assert entry["userId"] == "user-jwt-1"
            assert entry["audioSeconds"] > 2.0
            durations += entry["audioSeconds"]
        usage = audio_seconds_by_user(jwt_server)
    assert usage.get("user-jwt-1") == pytest.approx(durations, abs=0.01), usage
    assert token not in jwt_server.log_path.read_text()
    jwt_server.wait_idle()


async def test_a_valid_static_token_names_its_user(token_server: Server, media: Path) -> None:
    audio = (media / "sentence.wav").read_bytes()
    async with httpx.AsyncClient(base_url=token_server.url, timeout=60) as client:
        for user in ("alice", "bob"):
            response = await call(
                client, "/v1/transcriptions", audio, auth_header(TOKEN_USERS[user])
            )
            assert response.status_code == 200, response.text
            assert log_of(token_server, response)["userId"] == user
        usage = audio_seconds_by_user(token_server)
        refused = await refused_by(
            token_server, "/v1/transcriptions", audio[:2000], TOKEN_USERS["alice"] + "x"
        )
    assert usage.keys() >= {"alice", "bob"}, usage
    assert usage["alice"] > 2.0 and usage["bob"] > 2.0
    assert_unauthorized(refused, invalid=True, token=TOKEN_USERS["alice"] + "x")
    # The setting holds hashes only: no usable token in the server's environment.
    assert all(token not in token_server.env["VRAI_AUTH_TOKENS"] for token in TOKEN_USERS.values())
    token_server.wait_idle()


async def test_a_valid_firebase_id_token_names_its_user(
    firebase_server: Server, key: SigningKey, media: Path
) -> None:
    audio = (media / "sentence.wav").read_bytes()
    async with httpx.AsyncClient(base_url=firebase_server.url, timeout=60) as client:
        response = await call(
            client, "/trim-and-transcribe", audio, auth_header(key.sign(firebase_claims()))
        )
        assert response.status_code == 200, response.text
        assert has_words(response.json()["transcription"], SENTENCE_WORDS, at_least=4)
        assert log_of(firebase_server, response)["userId"] == "firebase-uid-7"
        usage = audio_seconds_by_user(firebase_server)
        assert usage.get("firebase-uid-7", 0) > 2.0, usage

        # Firebase's own rules: the project is the audience and names the issuer, and
        # `auth_time` is required; a token for the generic `jwt` issuer is not one.
        for bad in (
            firebase_claims(aud="another-project"),
            firebase_claims(iss=FIREBASE_ISSUER_PREFIX + "another-project"),
            firebase_claims(auth_time=None),
            claims(),
        ):
            token = key.sign(bad)
            refused = await refused_by(firebase_server, "/v1/transcriptions", audio[:2000], token)
            assert_unauthorized(refused, invalid=True, token=token)
    firebase_server.wait_idle()


# --- bad tokens -------------------------------------------------------------------------------


def bad_tokens(key: SigningKey, other_key: SigningKey) -> dict[str, tuple[str | None, bool]]:
    """name: (the Authorization header's token, or None for no header; a token was given)."""
    now = int(time.time())
    return {
        "missing": (None, False),
        "expired": (key.sign(claims(iat=now - 7200, exp=now - 3600)), True),
        "not-yet-valid": (key.sign(claims(nbf=now + 3600)), True),
        "wrong-aud": (key.sign(claims(aud="someone-else")), True),
        "wrong-iss": (key.sign(claims(iss="https://evil.example")), True),
        "alg-none": (hand_made({"alg": "none", "typ": "JWT", "kid": key.kid}, claims()), True),
        "hs256-public-key": (hs256(claims(sub="attacker"), key.public_pem(), key.kid), True),
        "unknown-kid": (other_key.sign(claims()), True),
        "forged-signature": (other_key.sign(claims(), kid=key.kid), True),
        "no-sub": (key.sign(claims(sub=None)), True),
        "garbage": ("this-is-not-a-token", True),
        "garbage-dots": ("abc.def.ghi", True),
    }


BAD_TOKEN_NAMES = (
    "missing", "expired", "not-yet-valid", "wrong-aud", "wrong-iss", "alg-none",
    "hs256-public-key", "unknown-kid", "forged-signature", "no-sub", "garbage", "garbage-dots",
)  # fmt: skip


@pytest.mark.parametrize("name", BAD_TOKEN_NAMES)
async def test_a_bad_jwt_is_401_on_every_audio_endpoint(
    jwt_server: Server, key: SigningKey, other_key: SigningKey, media: Path, name: str
) -> None:
    token, given = bad_tokens(key, other_key)[name]
    audio = (media / "sentence.wav").read_bytes()[:2000]
    for endpoint in AUDIO_ENDPOINTS:
        response = await refused_by(jwt_server, endpoint, audio, token)
        assert_unauthorized(response, invalid=given, token=token)
        if endpoint == "/v1/audio/transcriptions":
            # OpenAI's error object too, which OpenAI SDKs read.
            assert response.json()["error"]["code"] == "unauthorized"
        entry = log_of(jwt_server, response)
        assert (entry["status"], entry["code"], entry["userId"]) == (
            401,
            "unauthorized",
            "anonymous",
        )
    jwt_server.wait_idle()


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "Bearer", "bearer" + " x" * 5000, "Token abc", "Bearer a b"]
)
async def test_malformed_authorization_headers_are_401(jwt_server: Server, header: str) -> None:
    async with httpx.AsyncClient(base_url=jwt_server.url, timeout=30) as client:
        response = await client.post("/v1/transcriptions", headers={"Authorization": header})
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert response.json()["code"] == "unauthorized"


@pytest.mark.parametrize("path", ["/health", "/metrics", "/openapi.json"])
async def test_health_metrics_and_the_description_stay_open(
    jwt_server: Server, token_server: Server, firebase_server: Server, path: str
) -> None:
    for server in (jwt_server, token_server, firebase_server):
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            response = await client.get(path)
        assert response.status_code == 200, (server.env["VRAI_AUTH"], response.text)
        assert "www-authenticate" not in response.headers


# --- a 401 never waits for the body -----------------------------------------------------------


async def test_a_slow_large_upload_gets_its_401_at_once_and_is_not_read(
    jwt_server: Server, key: SigningKey
) -> None:
    """50 MB paced at 1 MB/s, with an expired token: refused before the second chunk."""
    now = int(time.time())
    token = key.sign(claims(iat=now - 7200, exp=now - 3600))
    chunk = bytes(64 * 1024)
    total = 50 * 1000 * 1000
    sent = 0
    sent_at_answer: int | None = None
    closed = False
    async with raw_connection(jwt_server) as stream:
        began = time.monotonic()
        await stream.send(
            request_head(
                "/trim-and-transcribe",
                {**CHUNKED, "Content-Type": "application/json", **auth_header(token)},
            )
        )

        async def upload() -> None:
            nonlocal sent
            while sent < total and sent_at_answer is None:
                try:
                    await stream.send(chunk_frame(chunk))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return  # the server closed the connection: nothing more to send
                sent += len(chunk)
                await anyio.sleep(len(chunk) / 1_000_000)  # 1 MB/s

        async with anyio.create_task_group() as group:
            group.start_soon(upload)
            response = await read_response(stream, within=5)
            sent_at_answer = sent
            answered_after = time.monotonic() - began
            # The server hangs up rather than read what the client still has to send.
            with anyio.fail_after(5):
                try:
                    while await stream.receive():
                        pass
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    closed = True
            group.cancel_scope.cancel()

    assert response.status == 401, response.body
    assert response.json()["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert response.headers.get("connection") == "close"
    assert answered_after < 1.0, f"the 401 took {answered_after:.2f} s"
    assert sent_at_answer is not None
    assert sent_at_answer < 1 * MiB, f"{sent_at_answer} bytes were sent before the 401"
    assert closed
    jwt_server.wait_idle()


async def after_a_pause(body: bytes, pause: float = 0.05) -> AsyncIterator[bytes]:
    """`body` in 64 KiB pieces, its first one `pause` seconds after the request's head.

    A phone's head and body go in separate segments, with the network's delay between them.
    """
    await anyio.sleep(pause)
    async for piece in chunked(body):
        yield piece


def small_form(size: int) -> tuple[bytes, str]:
    boundary = "vrai-auth-form"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="fromTime"\r\n\r\n0\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + bytes(size)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    ("endpoint", "size", "framing"),
    [
        ("/v1/transcriptions", 1000, "chunked"),
        ("/v1/transcriptions", 120_000, "content-length"),
        ("/trim-and-transcribe-multipart", 2000, "chunked"),
    ],
    ids=["raw-chunked-1KB", "raw-sized-120KB", "form-chunked-2KB"],
)
async def test_an_async_client_still_sending_sees_the_401(
    token_server: Server, endpoint: str, size: int, framing: str
) -> None:
    """A refused upload, from a client that reads the answer once it has sent the body.

    That is how HTTP/1.1 clients work: httpx here, the OpenAI SDKs (over httpx), the app's
    chunked uploads.  The server answers 401 before reading and closes at once; a client
    still writing then meets a connection reset, and asyncio's transport drops the 401 that
    had already arrived (RFC 9112, 9.6: the "TCP reset problem", which a staged close, FIN
    then a short drain, avoids).  A small body should always get its 401.
    """
    headers = auth_header("not-a-known-token")
    if endpoint == "/v1/transcriptions":
        body = bytes(size)
    else:
        body, headers["Content-Type"] = small_form(size)
    if framing == "content-length":
        headers["Content-Length"] = str(len(body))
    async with httpx.AsyncClient(base_url=token_server.url, timeout=30) as client:
        try:
            response = await client.post(endpoint, content=after_a_pause(body), headers=headers)
        except httpx.TransportError as exc:
            pytest.fail(f"{exc!r} instead of the 401")
    assert response.request.headers.get("transfer-encoding") == (
        "chunked" if framing == "chunked" else None
    )
    assert_unauthorized(response, invalid=True, token="not-a-known-token")


async def read_until_closed(stream: Any, within: float = 5.0) -> bytes:
    received = b""
    with anyio.fail_after(within):
        try:
            while True:
                received += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return received


async def test_expect_100_continue_gets_the_401_and_no_100_continue(
    jwt_server: Server, token_server: Server
) -> None:
    for server, headers in (
        (jwt_server, {}),
        (jwt_server, auth_header("abc.def.ghi")),
        (token_server, auth_header("not-a-known-token")),
    ):
        async with raw_connection(server) as stream:
            await stream.send(
                request_head(
                    "/v1/transcriptions",
                    {"Content-Length": str(50 * 1000 * 1000), "Expect": "100-continue", **headers},
                )
            )
            received = await read_until_closed(stream)
        assert received.startswith(b"HTTP/1.1 401 "), received[:200]
        assert b"100 Continue" not in received
        assert b'"code":"unauthorized"' in received


async def test_expect_100_continue_with_a_valid_token_is_invited_to_send(
    jwt_server: Server, key: SigningKey, media: Path
) -> None:
    """The other side of the coin: the server does say `100 Continue` once it will read."""
    audio = (media / "sentence.wav").read_bytes()
    headers = {
        "Content-Length": str(len(audio)),
        "Expect": "100-continue",
        **auth_header(key.sign(claims(sub="user-expect"))),
    }
    async with raw_connection(jwt_server) as stream:
        await stream.send(request_head("/v1/transcriptions?fromTime=0&toTime=8", headers))
        with anyio.fail_after(5):
            interim = await stream.receive()
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        await stream.send(audio)
        response = await read_response(stream, within=60)
    assert response.status == 200, response.body
    assert has_words(response.json()["transcription"], SENTENCE_WORDS, at_least=4)
    jwt_server.wait_idle()
