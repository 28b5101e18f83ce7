"""No configured secret ever leaves the server: not in a log line, a response, or a header.

Two servers at `VRAI_LOG_LEVEL=debug`, configured with distinctive secrets (an OpenAI key, an
AWS access key id and secret key, a static bearer token made by `python -m vrai_stream.auth
new-token`, a webhook signing secret, and JWTs signed for a `jwt`-mode server), take a full set
of requests: successes on every endpoint (S3 debug copies stored, summaries, a webhook, whose
delivery is searched too), every kind of auth failure (missing, wrong,
truncated, too long, a Basic header, a JWT where a static token is expected and the reverse,
expired, wrong audience, unknown key, forged signature), an upstream that refuses the key
(OpenAI's 401 names the key it was given) or fails with the key in its message, and an S3
that refuses the credentials (moto with IAM checks on).  Then the server's whole log, every
response's status, headers and body, and `/health`, `/metrics` and `/openapi.json` are searched
for each secret and its obvious transforms: itself, its first 12 characters, URL-encoded, and
base64 (standard and URL-safe, at each of the three alignments it can have inside a longer
encoded string, so `Basic base64(user:token)` is caught too).

Two things are not secrets and are not searched for: the first 12 characters of a whole JWT
(every RS256 JWT starts `eyJhbGciOiJS`: its signature part is checked instead, with every
transform), and the AWS access key id inside `debugFiles` links: a SigV4 presigned URL carries
it in `X-Amz-Credential` by design (AWS documents the key id as an identifier, the secret key
as the secret).  Everywhere else the key id must not appear either.
"""

from __future__ import annotations

import base64
import json
import secrets
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest

from .support.client import form_body
from .support.fake_openai import CHAT_PATH, FakeOpenAI
from .support.jwks_server import JwksServer, SigningKey, claims_from
from .support.s3_server import MotoServer, new_bucket, s3_client, s3_env, start_moto, wait_ready
from .support.server import Server, start_servers
from .support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.anyio

OPENAI_KEY = f"sk-proj-{secrets.token_urlsafe(36)}"
AWS_KEY_ID = "AKIA" + "".join(
    secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16)
)
AWS_SECRET = secrets.token_urlsafe(30)[:40]
WEBHOOK_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
WEBHOOK_SECRET = f"whsec_{WEBHOOK_KEY}"
ISSUER = "https://issuer.secrets.vrai.example"
AUDIENCE = "vrai-secrets-test"
ENDPOINT = "/v1/transcriptions"
BOUNDARY = "----vrai-secrets-1b7e"
GARBAGE = b"not audio at all, just a shopping list\n" * 300


def new_static_token(user: str) -> tuple[str, str]:
    """A token and its VRAI_AUTH_TOKENS entry, made the way the README says."""
    done = subprocess.run(
        [sys.executable, "-m", "vrai_stream.auth", "new-token", user],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
    token = lines[f"token (give it to {user})"].strip()
    entry = lines["VRAI_AUTH_TOKENS entry"].strip()
    return token, entry


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims for the `jwt`-mode server: each bad JWT changes only what makes it bad."""
    return claims_from(ISSUER, AUDIENCE, "jwt-user-42", **changes)


@dataclass
class World:
    token_server: Server
    jwt_server: Server
    fake: FakeOpenAI
    token: str
    jwt: str
    jwts: dict[str, str]
    """Every JWT the tests send, valid or not: none of them may leak."""
    haystacks: list[tuple[str, bytes]] = field(default_factory=list)
    receiver: WebhookReceiver = field(default_factory=WebhookReceiver)
    """Where the token server's webhooks go: what it receives is searched too."""
    """(where, what): every response and log the secrets are searched in."""

    def configured_secrets(self) -> dict[str, str]:
        found = {
            "OPENAI_API_KEY": OPENAI_KEY,
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
            "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
            "static bearer token": self.token,
            "VRAI_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "VRAI_WEBHOOK_SECRET's key": WEBHOOK_KEY,
        }
        for name, token in self.jwts.items():
            found[f"JWT ({name})"] = token
            found[f"JWT signature ({name})"] = token.rsplit(".", 1)[1]
        return found


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("secrets")
    key = SigningKey.rsa("vrai-secrets-key")
    unpublished = SigningKey.rsa("vrai-secrets-unpublished")
    token, entry = new_static_token("phone-user")
    valid = key.sign(claims())
    head, body, signature = valid.split(".")
    forged_signature = ("A" if signature[0] != "A" else "B") + signature[1:]
    jwts = {
        "valid": valid,
        "expired": key.sign(claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)),
        "other audience": key.sign(claims(aud="someone-else")),
        "unknown key": unpublished.sign(claims()),
        "forged": f"{head}.{body}.{forged_signature}",
    }
    moto: MotoServer = start_moto(base / "moto")
    locked: MotoServer = start_moto(base / "moto-locked", {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    jwks = JwksServer([key])
    try:
        bucket = new_bucket(s3_client(moto.url))
        with FakeOpenAI(api_key=OPENAI_KEY) as fake:
            common = {
                "VRAI_LOG_LEVEL": "debug",
                **fake.server_env(),
                "VRAI_OPENAI_MAX_RETRIES": "0",
            }
            credentials = {"AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET}
            servers = start_servers(
                {
                    "token": (
                        base / "token-server",
                        {
                            **s3_env(moto.url, bucket),
                            **credentials,
                            **common,
                            "VRAI_AUTH": "token",
                            "VRAI_AUTH_TOKENS": entry,
                            "VRAI_WEBHOOK_SECRET": WEBHOOK_SECRET,
                            "VRAI_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
                        },
                    ),
                    "jwt": (
                        base / "jwt-server",
                        {
                            # S3 with IAM checks on: these credentials are refused.
                            **s3_env(locked.url, "vrai-locked-bucket"),
                            **credentials,
                            **common,
                            "VRAI_AUTH": "jwt",
                            "VRAI_JWKS_URL": jwks.url,
                            "VRAI_JWT_ISSUER": ISSUER,
                            "VRAI_JWT_AUDIENCE": AUDIENCE,
                        },
                    ),
                }
            )
            try:
                for server in servers.values():
                    wait_ready(server)
                world = World(servers["token"], servers["jwt"], fake, token, valid, jwts)
                yield world
                world.receiver.stop()
            finally:
                for server in servers.values():
                    server.stop()
    finally:
        jwks.stop()
        locked.stop()
        moto.stop()


# --- requests --------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def form(fields: dict[str, str], file_field: str, audio: bytes) -> bytes:
    """A WAV upload as a multipart form, for the endpoints that take one."""
    return form_body(
        BOUNDARY, fields, file_field, audio, filename="note.wav", content_type="audio/wav"
    )


FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


async def call(
    world: World,
    client: httpx.AsyncClient,
    label: str,
    method: str,
    path: str,
    *,
    expected: int | None = None,
    **kwargs: Any,
) -> httpx.Response:
    response = await client.request(method, path, **kwargs)
    head = f"HTTP {response.status_code}\n" + "".join(
        f"{name}: {value}\n" for name, value in response.headers.multi_items()
    )
    world.haystacks.append((f"response to {label}", head.encode() + b"\n" + response.content))
    if expected is not None:
        assert response.status_code == expected, f"{label}: {response.text[:300]}"
    return response


async def token_server_requests(world: World, audio: bytes) -> None:
    server, fake, token = world.token_server, world.fake, world.token
    ok = bearer(token)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        # Successes, on every endpoint (the transcript is computed once: the fake caches it).
        await call(world, client, "raw JSON", "POST", f"{ENDPOINT}?fromTime=0&toTime=8",
                   content=audio, headers=ok, expected=200)  # fmt: skip
        await call(world, client, "raw MP3", "POST", f"{ENDPOINT}?fromTime=0&toTime=8",
                   content=audio, headers={**ok, "Accept": "audio/mpeg"}, expected=200)  # fmt: skip
        legacy = json.dumps(
            {"fromTime": 0, "toTime": 8, "fileBlob": base64.b64encode(audio).decode()}
        )
        await call(world, client, "legacy JSON", "POST", "/trim-and-transcribe",
                   content=legacy, headers={**ok, "Content-Type": "application/json"},
                   expected=200)  # fmt: skip
        await call(world, client, "legacy multipart", "POST", "/trim-and-transcribe-multipart",
                   content=form({"fromTime": "0", "toTime": "8"}, "audio", audio),
                   headers={**ok, **FORM}, expected=200)  # fmt: skip
        await call(world, client, "OpenAI-compatible", "POST", "/v1/audio/transcriptions",
                   content=form({"model": "whisper-1", "toTime": "8"}, "file", audio),
                   headers={**ok, **FORM}, expected=200)  # fmt: skip
        summary = await call(
            world, client, "summary", "POST",
            f"{ENDPOINT}?fromTime=0&toTime=8&summarizationType=summarize",
            content=audio, headers=ok, expected=200,
        )  # fmt: skip
        assert "summary" in summary.json(), summary.json()

        # Every kind of refused credential.
        refused = {
            "no Authorization": {},
            "wrong token": bearer(secrets.token_urlsafe(32)),
            "token cut short": bearer(token[:-1]),
            "token with more": bearer(token + "x"),
            "Basic with the token": {
                "Authorization": "Basic "
                + base64.b64encode(f"phone-user:{token}".encode()).decode()
            },
            "a JWT where a token is expected": bearer(world.jwt),
            "token repeated past the limit": bearer(token * 300),
            "token in another scheme": {"Authorization": f"Token {token}"},
        }
        for label, headers in refused.items():
            await call(world, client, f"token server, {label}", "POST",
                       f"{ENDPOINT}?fromTime=0&toTime=8", content=audio, headers=headers,
                       expected=401)  # fmt: skip

        # A failed job keeps its copies in S3 and links to them (presigned: see the docstring).
        undecodable = await call(world, client, "undecodable", "POST", ENDPOINT,
                                 content=GARBAGE, headers=ok, expected=422)  # fmt: skip
        assert undecodable.json().get("debugFiles"), "no debug links: the S3 path went untested"

        # Webhooks signed with VRAI_WEBHOOK_SECRET; one the server refuses to send.
        hooked = f"{ENDPOINT}?fromTime=0&toTime=8&callbackUrl={world.receiver.url}/hook"
        await call(world, client, "callbackUrl", "POST", hooked, content=audio, headers=ok,
                   expected=200)  # fmt: skip
        await call(world, client, "callbackUrl refused", "POST",
                   f"{ENDPOINT}?callbackUrl=http://127.0.0.2/hook", content=audio, headers=ok,
                   expected=400)  # fmt: skip

        # The upstream refuses the key: OpenAI's 401 message names the key it was given.
        fake.api_key = "sk-someone-elses-key"
        try:
            await call(world, client, "upstream 401", "POST", f"{ENDPOINT}?fromTime=0&toTime=7",
                       content=audio, headers=ok, expected=502)  # fmt: skip
            refused_summary = await call(
                world, client, "summary, upstream 401", "POST",
                f"{ENDPOINT}?fromTime=0&toTime=8&summarizationType=summarize",
                content=audio, headers=ok,
            )  # fmt: skip
        finally:
            fake.api_key = fake.initial_api_key
        assert refused_summary.status_code in (200, 502), refused_summary.text
        transcribed = [r for r in fake.requests if not r.authorized]
        assert transcribed, "the fake never saw the refused key"

        # The upstream fails, quoting the key back in its error message.
        fake.fail_always(500, message=f"upstream broke while using key {OPENAI_KEY}")
        try:
            await call(world, client, "upstream 500", "POST", f"{ENDPOINT}?fromTime=0&toTime=6",
                       content=audio, headers=ok, expected=502)  # fmt: skip
        finally:
            fake.clear_faults()
        fake.fail_always(500, message=f"chat broke with key {OPENAI_KEY}", path=CHAT_PATH)
        try:
            failed_summary = await call(
                world, client, "summary, upstream 500", "POST",
                f"{ENDPOINT}?fromTime=0&toTime=8&summarizationType=summarize",
                content=audio, headers=ok, expected=200,
            )  # fmt: skip
        finally:
            fake.clear_faults()
        assert "summaryError" in failed_summary.json(), failed_summary.json()

        for path in ("/health", "/metrics", "/openapi.json"):
            await call(world, client, f"token server {path}", "GET", path, expected=200)
            await call(world, client, f"token server {path}, with token", "GET", path,
                       headers=ok, expected=200)  # fmt: skip


async def jwt_server_requests(world: World, audio: bytes) -> None:
    server = world.jwt_server
    ok = bearer(world.jwt)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        await call(world, client, "JWT, raw JSON", "POST", f"{ENDPOINT}?fromTime=0&toTime=8",
                   content=audio, headers=ok, expected=200)  # fmt: skip
        await call(world, client, "JWT, raw MP3", "POST", f"{ENDPOINT}?fromTime=0&toTime=8",
                   content=audio, headers={**ok, "Accept": "audio/mpeg"}, expected=200)  # fmt: skip
        for name, token in world.jwts.items():
            if name == "valid":
                continue
            await call(world, client, f"JWT server, {name} JWT", "POST", ENDPOINT,
                       content=audio, headers=bearer(token), expected=401)  # fmt: skip
        await call(world, client, "JWT server, static token", "POST", ENDPOINT,
                   content=audio, headers=bearer(world.token), expected=401)  # fmt: skip
        # S3 refuses these credentials: the copies fail, the job's answer does not.
        await call(world, client, "JWT server, undecodable", "POST", ENDPOINT,
                   content=GARBAGE, headers=ok, expected=422)  # fmt: skip
        for path in ("/health", "/metrics", "/openapi.json"):
            await call(world, client, f"JWT server {path}", "GET", path, headers=ok,
                       expected=200)  # fmt: skip


# --- the search ------------------------------------------------------------------------------


def transforms(secret: str, *, whole_jwt: bool = False) -> dict[str, bytes]:
    """The secret as it could show up: itself, its start, URL-encoded, base64'd anywhere."""
    raw = secret.encode()
    found = {"itself": raw, "URL-encoded": quote(secret, safe="").encode()}
    if not whole_jwt:
        found["first 12 characters"] = raw[:12]
    for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
        for shift in range(3):
            # Inside a longer string the secret starts at any of 3 alignments; the characters
            # at either end also encode its neighbours, the ones between only the secret.
            encoded = encode(b"\0" * shift + raw).rstrip(b"=")
            found[f"{name} at offset {shift}"] = encoded[4 if shift else 0 : -4]
    return {name: value for name, value in found.items() if len(value) >= 12}


def without_presigned_links(text: bytes) -> bytes:
    """A response body with its `debugFiles` links cut out (they carry the key id)."""
    try:
        body = json.loads(text.partition(b"\n\n")[2])
    except ValueError:
        return text
    if not isinstance(body, dict) or not body.get("debugFiles"):
        return text
    for link in body["debugFiles"].values():
        assert f"X-Amz-Credential={AWS_KEY_ID}%2F" in link, link
        text = text.replace(link.encode(), b"<presigned link>")
        text = text.replace(json.dumps(link).encode()[1:-1], b"<presigned link>")
    return text


async def test_no_secret_in_any_log_line_response_or_header(world: World, media: Path) -> None:
    audio = (media / "sentence.wav").read_bytes()
    await token_server_requests(world, audio)
    await jwt_server_requests(world, audio)
    for server in (world.token_server, world.jwt_server):
        server.wait_idle()
    await anyio.sleep(0.5)  # late log lines: S3 copies finishing, the refused ones warning
    logs = {
        "token server's log": world.token_server.log_path.read_bytes(),
        "JWT server's log": world.jwt_server.log_path.read_bytes(),
    }
    # The runs did what they claim: debug lines, S3 refusing the credentials, stored copies.
    for name, text in logs.items():
        assert b'"level": "debug"' in text, f"{name}: no debug line at VRAI_LOG_LEVEL=debug"
    assert b"InvalidAccessKeyId" in logs["JWT server's log"], "S3 never refused the credentials"
    delivered = world.receiver.wait_for("/hook")
    webhooks = [
        (f"webhook {n}", json.dumps(hook.headers).encode() + b"\n\n" + hook.body)
        for n, hook in enumerate(delivered)
    ]
    haystacks = [*world.haystacks, *logs.items(), *webhooks]
    print(
        f"searched {len(haystacks)} places, {sum(len(text) for _, text in haystacks)} bytes "
        f"(logs: {', '.join(f'{n} {len(t)} B' for n, t in logs.items())})"
    )

    leaks = []
    for secret_name, secret in world.configured_secrets().items():
        whole_jwt = secret_name.startswith("JWT (")
        for form_name, needle in transforms(secret, whole_jwt=whole_jwt).items():
            for where, text in haystacks:
                if secret_name == "AWS_ACCESS_KEY_ID" and where.startswith("response"):
                    text = without_presigned_links(text)
                at = text.find(needle)
                if at >= 0:
                    context = text[max(0, at - 80) : at + len(needle) + 40]
                    leaks.append(f"{secret_name} ({form_name}) in {where}: ...{context!r}...")
    assert leaks == [], "\n".join(leaks[:20])
