"""A JWKS endpoint on loopback, serving keys the tests make, for the auth tests.

* `SigningKey` is a private key of the tests' own (RSA or EC, made with `cryptography`) with
  its `kid`: `jwk()` is what an issuer publishes, `sign()` makes a token with it.
* `JwksServer` serves `GET /jwks.json` from a thread, on a free loopback port.  Between
  requests a test may publish other keys (`publish`: a key rotation), add raw JWK entries,
  answer with another status, answer slowly, or `stop()` listening altogether (the issuer's
  endpoint is down).  `fetches` counts the requests it answered.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: PrivateKey
    alg: str

    @classmethod
    def rsa(cls, kid: str, *, bits: int = 2048, alg: str = "RS256") -> SigningKey:
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=bits), alg)

    @classmethod
    def ec(cls, kid: str, *, alg: str = "ES256") -> SigningKey:
        return cls(kid, ec.generate_private_key(ec.SECP256R1()), alg)

    def jwk(self, *, with_alg: bool = True) -> dict[str, Any]:
        """The public half as an issuer publishes it (Google's carry `alg` and `use`)."""
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            published: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            published = ECAlgorithm.to_jwk(public, as_dict=True)
        published.update(kid=self.kid, use="sig")
        if with_alg:
            published["alg"] = self.alg
        return published

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(
        self,
        claims: Mapping[str, Any],
        *,
        alg: str | None = None,
        kid: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A token signed by this key; `kid` defaults to this key's, `alg` to its own."""
        return jwt.encode(
            dict(claims),
            self.private_key,
            algorithm=alg or self.alg,
            headers={"kid": self.kid if kid is None else kid, **(headers or {})},
        )


def claims_from(issuer: str, audience: str, subject: str, **changes: Any) -> dict[str, Any]:
    """Claims valid for ten minutes, so a test changes only what it checks; `None` drops one."""
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": now - 10,
        "exp": now + 600,
    }
    values.update(changes)
    return {name: value for name, value in values.items() if value is not None}


def b64url(data: bytes) -> str:
    """Unpadded base64url, the encoding of each of a JWT's three parts."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A JWT assembled by hand, for the algorithms and forms no honest library signs."""
    return ".".join(
        (
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(payload).encode()),
            b64url(signature),
        )
    )


def hs256(payload: dict[str, Any], secret: bytes, kid: str) -> str:
    """An HMAC-signed JWT: with a public key as `secret`, the HS/RS confusion attack."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64url(json.dumps(payload).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


class JwksServer:
    """`GET /jwks.json` on `127.0.0.1`, from a thread; settable between requests."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self._lock = threading.Lock()
        self._entries: list[Any] = [key.jwk() for key in keys]
        self._fetches = 0
        self.stopping = threading.Event()
        self.cache_control: str | None = "public, max-age=3600"
        self.status = 200
        self.delay_seconds = 0.0
        self.raw_body: bytes | None = None
        """When set, served as the body instead of the keys (for broken documents)."""
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/jwks.json"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    @property
    def fetches(self) -> int:
        with self._lock:
            return self._fetches

    def publish(self, *keys: SigningKey, extra: list[Any] | None = None) -> None:
        """Serve exactly these keys (and raw `extra` entries) from now on."""
        with self._lock:
            self._entries = [key.jwk() for key in keys] + list(extra or [])

    def stop(self) -> None:
        """Stop listening: later fetches get a refused connection."""
        self.stopping.set()
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()

    def _respond(self) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self._fetches += 1
            body = self.raw_body or json.dumps({"keys": self._entries}).encode()
            headers = {"Content-Type": "application/json"}
            if self.cache_control is not None:
                headers["Cache-Control"] = self.cache_control
            return self.status, headers, body


def _handler_for(server: JwksServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/jwks.json":
                self.send_error(404)
                return
            if server.delay_seconds and server.stopping.wait(server.delay_seconds):
                return
            status, headers, body = server._respond()
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (a timeout test)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    return Handler


@contextmanager
def jwks_server(*keys: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer(list(keys))
    try:
        yield server
    finally:
        server.stop()
