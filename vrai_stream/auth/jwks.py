"""The issuer's signing keys: fetching and caching its JWKS, and reading the keys in it.

Only public signature keys of the algorithms we allow survive `parse_jwks`: symmetric
(`oct`), encryption-only, weak and broken keys are skipped.  `httpx`, `jwt` and
`cryptography` are imported only when keys are fetched or parsed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio

from vrai_stream import errors
from vrai_stream.auth.bearer import invalid_token
from vrai_stream.auth.config import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_JWKS_CACHE_MAX_SECONDS,
    DEFAULT_JWKS_CACHE_MIN_SECONDS,
    DEFAULT_JWKS_REFRESH_INTERVAL_SECONDS,
    DEFAULT_JWKS_TIMEOUT_SECONDS,
)

if TYPE_CHECKING:
    import httpx
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
    from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    PublicKey: TypeAlias = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey

logger = logging.getLogger("vrai_stream.auth")

MAX_JWKS_BYTES = 1024 * 1024
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class VerificationKey:
    """One public key from a JWKS, with the algorithms it may verify."""

    kid: str
    public_key: PublicKey = field(repr=False)
    algorithms: frozenset[str]


class _JwksFailure(Exception):
    """The JWKS endpoint gave nothing usable; the message is for logs."""


class JwksCache:
    """The issuer's signing keys, fetched with httpx and kept per Cache-Control.

    - Fresh keys are used as they are; expired ones are refetched on the next use.
    - An unknown `kid` triggers a refetch (the issuer may have rotated its keys).
    - At most one fetch attempt per `refresh_interval` seconds, whatever the reason, and one at
      a time: a flood of made-up `kid`s costs the issuer almost nothing.
    - A failed fetch keeps the keys we have, expired or not: an outage of the issuer's JWKS
      endpoint must not lock out users whose tokens we can still verify.
    - With no keys at all, callers get `AuthUnavailable` (503), not a 401.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float = DEFAULT_JWKS_TIMEOUT_SECONDS,
        min_ttl_seconds: float = DEFAULT_JWKS_CACHE_MIN_SECONDS,
        max_ttl_seconds: float = DEFAULT_JWKS_CACHE_MAX_SECONDS,
        refresh_interval_seconds: float = DEFAULT_JWKS_REFRESH_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._timeout = timeout_seconds
        self._min_ttl = min_ttl_seconds
        self._max_ttl = max_ttl_seconds
        self._interval = refresh_interval_seconds
        self._clock = clock
        self._keys: dict[str, VerificationKey] = {}
        self._expires_at = -math.inf
        self._last_attempt = -math.inf
        self._lock = anyio.Lock()
        self._client: httpx.AsyncClient | None = None
        self.attempts = 0
        """Fetch attempts ended so far, successful or not (for tests and logs)."""

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    async def key(self, kid: str) -> VerificationKey:
        """The key named `kid`; `AuthUnavailable` with no keys, 401 for a kid not published."""
        if self._clock() >= self._expires_at or kid not in self._keys:
            await self._refresh()
        found = self._keys.get(kid)
        if found is not None:
            return found
        if not self._keys:
            raise errors.AuthUnavailable(
                "Sign-in cannot be checked right now; retry shortly",
                retry_after_seconds=max(1, math.ceil(self._interval)),
            )
        raise invalid_token("The token is signed with an unknown key")

    async def warm_up(self) -> None:
        await self._refresh()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _refresh(self) -> None:
        """Fetch once, unless an attempt ended too recently or ended while we waited our turn.

        The interval counts from the end of the last attempt, so a slow endpoint is not
        asked again the moment its last answer arrives.  A cancelled attempt counts for
        nothing: nobody learned anything, so the next caller may try at once.
        """
        seen = self.attempts
        async with self._lock:
            if self.attempts != seen:
                return
            if self._clock() - self._last_attempt < self._interval:
                return
            try:
                await self._fetch()
            except Exception as exc:
                logger.warning(
                    "could not fetch the JWKS",
                    extra={"url": self.url, "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
            self._last_attempt = self._clock()
            self.attempts += 1

    async def _fetch(self) -> None:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        body = bytearray()
        with anyio.fail_after(self._timeout):
            async with self._client.stream(
                "GET", self.url, headers={"Accept": "application/json"}
            ) as response:
                if response.status_code != 200:
                    raise _JwksFailure(f"HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise _JwksFailure(f"larger than {MAX_JWKS_BYTES} bytes")
                cache_control = response.headers.get("cache-control")
        keys = parse_jwks(bytes(body))
        if not keys:
            raise _JwksFailure("no usable signing keys in the document")
        ttl = cache_ttl(cache_control, self._min_ttl, self._max_ttl)
        self._keys = keys
        self._expires_at = self._clock() + ttl
        logger.info("fetched the JWKS", extra={"url": self.url, "keys": len(keys), "ttl": ttl})


def cache_ttl(cache_control: str | None, min_seconds: float, max_seconds: float) -> float:
    """`max-age` from Cache-Control, clamped; `no-store`/`no-cache` or none at all: the floor."""
    max_age: float | None = None
    for directive in (cache_control or "").split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return min_seconds
        if name == "max-age":
            try:
                max_age = float(int(value.strip().strip('"')))
            except ValueError:
                return min_seconds
    if max_age is None:
        return min_seconds
    return min(max(max_age, min_seconds), max_seconds)


def parse_jwks(body: bytes) -> dict[str, VerificationKey]:
    """The usable signature keys of a JWKS document, by `kid`; anything odd is skipped."""
    try:
        document = json.loads(body)
    except ValueError:
        raise _JwksFailure("not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _JwksFailure("not a JWKS document")
    keys: dict[str, VerificationKey] = {}
    for jwk in document["keys"]:
        key = _parse_jwk(jwk)
        if key is not None and key.kid not in keys:
            keys[key.kid] = key
    return keys


def _parse_jwk(jwk: object) -> VerificationKey | None:
    """A public key, or None for symmetric (`oct`), encryption-only, weak or broken keys."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

    if not isinstance(jwk, dict):
        return None
    kid, kty, use, alg = jwk.get("kid"), jwk.get("kty"), jwk.get("use"), jwk.get("alg")
    if not isinstance(kid, str) or not kid or use not in (None, "sig"):
        return None
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        return None
    key: Any
    try:
        if kty == "RSA":
            key = RSAAlgorithm.from_jwk(jwk)
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(jwk)
        elif kty == "OKP":
            key = OKPAlgorithm.from_jwk(jwk)
        else:
            return None
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    private_types = (
        rsa.RSAPrivateKey,
        ec.EllipticCurvePrivateKey,
        ed25519.Ed25519PrivateKey,
        ed448.Ed448PrivateKey,
    )
    if isinstance(key, private_types):
        key = key.public_key()
    usable: set[str]
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return None
        usable = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    elif isinstance(key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        usable = {curves[key.curve.name]} if key.curve.name in curves else set()
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        usable = {"EdDSA"}
    else:
        return None
    if alg is not None:
        usable &= {alg}
    if not usable:
        return None
    return VerificationKey(kid=kid, public_key=key, algorithms=frozenset(usable))
