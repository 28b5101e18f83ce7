"""Who is asking: the bearer token, checked before one byte of a request's body is read.

`VRAI_AUTH` picks one of four modes:

- `off`: everyone is `anonymous` (the embedded default, for local use).
- `token`: static tokens mapped to user ids, stored in the setting as SHA-256 hashes, so the
  environment never holds a usable token; compared in constant time.
- `firebase`: Firebase ID tokens, RS256 against Google's published keys, with Firebase's own
  rules for `iss`, `aud`, `auth_time` and `sub`.
- `jwt`: any issuer that publishes a JWKS, with the algorithms pinned by a setting.

A missing or bad token is a 401 whose `WWW-Authenticate` says what is wrong in fixed words,
never echoing the token.  Keys that cannot be fetched are a 503 `auth_unavailable`: the user
did nothing wrong, so a 401 would send the app to its sign-in screen for no reason.

The token's header only ever chooses a key by `kid` from our own JWKS, and only among the
algorithms we allow for that key's type: `alg: none`, HMAC algorithms (the HS/RS confusion),
and embedded `jwk`/`jku`/`x5u` headers are never trusted.

`jwt`, `httpx` and `cryptography` are imported only when a JWKS authenticator runs, so the
settings (which import `AuthConfig` from here) and the `off`/`token` modes never pay for them.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, cast
from urllib.parse import urlsplit

import anyio

from . import errors

if TYPE_CHECKING:
    import httpx
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
    from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    PublicKey: TypeAlias = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey

AuthKind = Literal["off", "token", "firebase", "jwt"]

logger = logging.getLogger("vrai_stream.auth")

REALM = "vrai-stream"
ANONYMOUS = "anonymous"
FIREBASE_JWKS_URL = (
    "https://www.googleapis.com/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com"
)
FIREBASE_ISSUER_PREFIX = "https://securetoken.google.com/"

ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
"""What a JWKS can verify.  HMAC (HS*) needs a shared secret, which a JWKS never holds."""

DEFAULT_LEEWAY_SECONDS = 30.0
DEFAULT_JWKS_TIMEOUT_SECONDS = 5.0
DEFAULT_JWKS_CACHE_MIN_SECONDS = 300.0
DEFAULT_JWKS_CACHE_MAX_SECONDS = 21600.0
DEFAULT_JWKS_REFRESH_INTERVAL_SECONDS = 30.0

MAX_AUTHORIZATION_CHARS = 8192
"""Longer headers are refused before any parsing; real ID tokens are about 1 KiB."""
MAX_JWKS_BYTES = 1024 * 1024
FIREBASE_MAX_USER_ID = 128
"""Firebase's own limit on `sub`."""
MAX_USER_ID = 255
MIN_RSA_BITS = 2048

_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_DIGEST_SHAPE = re.compile(r"[0-9a-fA-F]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Principal:
    """The caller, once authenticated.  `user_id` goes into logs, metrics and debug keys."""

    user_id: str
    kind: AuthKind


class Authenticator(Protocol):
    kind: AuthKind

    async def authenticate(self, authorization_header: str | None) -> Principal:
        """The caller named by the `Authorization` header, or `errors.Unauthorized`."""
        ...

    async def warm_up(self) -> None:
        """Prefetch what the first request would wait for; never raises."""
        ...

    async def aclose(self) -> None: ...


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEntry:
    """One static token: whose it is, and the SHA-256 of the token itself."""

    user_id: str
    digest: bytes = field(repr=False)


@dataclass(frozen=True)
class AuthConfig:
    """What the settings read for authentication; checked as a whole when built.

    Errors are `ValueError`s naming the variables, for `Settings.from_env` to report.  In
    `firebase` mode the issuer, audience, algorithm and user claim follow from the project
    id, so the `jwt` fields are ignored there.
    """

    kind: AuthKind = "off"
    tokens: tuple[TokenEntry, ...] = field(default=(), repr=False)
    firebase_project_id: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS256",)
    user_claim: str = "sub"
    leeway_seconds: float = DEFAULT_LEEWAY_SECONDS
    jwks_timeout_seconds: float = DEFAULT_JWKS_TIMEOUT_SECONDS
    jwks_cache_min_seconds: float = DEFAULT_JWKS_CACHE_MIN_SECONDS
    jwks_cache_max_seconds: float = DEFAULT_JWKS_CACHE_MAX_SECONDS
    jwks_refresh_interval_seconds: float = DEFAULT_JWKS_REFRESH_INTERVAL_SECONDS

    def __post_init__(self) -> None:
        if self.kind not in ("off", "token", "firebase", "jwt"):
            raise ValueError(
                f"VRAI_AUTH must be one of off, token, firebase, jwt; got {self.kind!r}"
            )
        if self.kind == "token" and not self.tokens:
            raise ValueError("VRAI_AUTH=token needs VRAI_AUTH_TOKENS (user:sha256:<hex>, ...)")
        if self.kind == "firebase":
            project = self.firebase_project_id
            if not project:
                raise ValueError("VRAI_AUTH=firebase needs VRAI_FIREBASE_PROJECT_ID")
            if re.search(r"[\s/]", project) or _CONTROL.search(project):
                raise ValueError(f"VRAI_FIREBASE_PROJECT_ID is not a project id: {project!r}")
        if self.kind == "jwt":
            missing = [
                name
                for name, value in (
                    ("VRAI_JWKS_URL", self.jwks_url),
                    ("VRAI_JWT_ISSUER", self.issuer),
                    ("VRAI_JWT_AUDIENCE", self.audience),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"VRAI_AUTH=jwt needs {', '.join(missing)}")
            if not self.user_claim:
                raise ValueError("VRAI_JWT_USER_CLAIM must not be empty")
            _check_algorithms(self.algorithms)
        if self.kind in ("firebase", "jwt") and self.jwks_url is not None:
            _check_jwks_url(self.jwks_url)
        if not 0 <= self.leeway_seconds <= 300:
            raise ValueError("VRAI_AUTH_LEEWAY_SECONDS must be between 0 and 300")
        if self.jwks_timeout_seconds <= 0:
            raise ValueError("VRAI_JWKS_TIMEOUT_SECONDS must be above 0")
        if not 0 <= self.jwks_cache_min_seconds <= self.jwks_cache_max_seconds:
            raise ValueError(
                "VRAI_JWKS_CACHE_MIN_SECONDS must be at least 0 and at most "
                "VRAI_JWKS_CACHE_MAX_SECONDS"
            )
        if self.jwks_refresh_interval_seconds < 0:
            raise ValueError("VRAI_JWKS_REFRESH_INTERVAL_SECONDS must be at least 0")

    @classmethod
    def parse(
        cls,
        kind: str,
        *,
        tokens: str | None = None,
        firebase_project_id: str | None = None,
        jwks_url: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        algorithms: str | None = None,
        user_claim: str | None = None,
        leeway_seconds: float = DEFAULT_LEEWAY_SECONDS,
        jwks_timeout_seconds: float = DEFAULT_JWKS_TIMEOUT_SECONDS,
        jwks_cache_min_seconds: float = DEFAULT_JWKS_CACHE_MIN_SECONDS,
        jwks_cache_max_seconds: float = DEFAULT_JWKS_CACHE_MAX_SECONDS,
        jwks_refresh_interval_seconds: float = DEFAULT_JWKS_REFRESH_INTERVAL_SECONDS,
    ) -> AuthConfig:
        """Build from the variables' raw text (`None` where unset)."""
        return cls(
            kind=cast(AuthKind, kind),  # checked with the rest, in __post_init__
            tokens=parse_token_table(tokens) if tokens else (),
            firebase_project_id=firebase_project_id,
            jwks_url=jwks_url,
            issuer=issuer,
            audience=_split_list(audience),
            algorithms=_split_list(algorithms) or ("RS256",),
            user_claim=user_claim or "sub",
            leeway_seconds=leeway_seconds,
            jwks_timeout_seconds=jwks_timeout_seconds,
            jwks_cache_min_seconds=jwks_cache_min_seconds,
            jwks_cache_max_seconds=jwks_cache_max_seconds,
            jwks_refresh_interval_seconds=jwks_refresh_interval_seconds,
        )


def _split_list(raw: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (raw or "").split(",") if item.strip())


def _check_algorithms(algorithms: tuple[str, ...]) -> None:
    if not algorithms:
        raise ValueError("VRAI_JWT_ALGORITHMS must name at least one algorithm")
    for name in algorithms:
        if name.lower() == "none":
            raise ValueError("VRAI_JWT_ALGORITHMS: `none` is never allowed")
        if name.upper().startswith("HS"):
            raise ValueError(
                f"VRAI_JWT_ALGORITHMS: {name} needs a shared secret; a JWKS only has public keys"
            )
        if name not in ASYMMETRIC_ALGORITHMS:
            allowed = ", ".join(ASYMMETRIC_ALGORITHMS)
            raise ValueError(f"VRAI_JWT_ALGORITHMS: {name!r} is not one of {allowed}")


def _check_jwks_url(url: str) -> None:
    """HTTPS only: keys fetched in the clear could be swapped on the way.  Loopback is exempt."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return
    raise ValueError(f"VRAI_JWKS_URL must be an https:// URL (http:// only on loopback): {url!r}")


def parse_token_table(raw: str) -> tuple[TokenEntry, ...]:
    """`alice:sha256:<hex>,bob:sha256:<hex>`; a user may hold several tokens (for rotation)."""
    entries: list[TokenEntry] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.rsplit(":", 2)
        if len(parts) != 3 or parts[1].lower() != "sha256" or not _DIGEST_SHAPE.fullmatch(parts[2]):
            raise ValueError(
                "VRAI_AUTH_TOKENS entries must look like user:sha256:<64 hex digits> "
                "(make one with `python -m vrai_stream.auth new-token USER`)"
            )
        user_id = parts[0]
        if not _usable_user_id(user_id, FIREBASE_MAX_USER_ID):
            raise ValueError(
                f"VRAI_AUTH_TOKENS: user id {user_id!r} must be 1 to {FIREBASE_MAX_USER_ID} "
                "characters, without control characters or surrounding spaces"
            )
        digest = bytes.fromhex(parts[2])
        if any(hmac.compare_digest(digest, entry.digest) for entry in entries):
            raise ValueError("VRAI_AUTH_TOKENS: the same token hash is listed twice")
        entries.append(TokenEntry(user_id=user_id, digest=digest))
    if not entries:
        raise ValueError("VRAI_AUTH_TOKENS lists no tokens")
    return tuple(entries)


def hash_token(token: str) -> str:
    """The form a token takes in `VRAI_AUTH_TOKENS` (after `user:`)."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def _usable_user_id(user_id: str, max_chars: int) -> bool:
    """It goes into log lines, metric labels and debug keys: no control characters."""
    return (
        0 < len(user_id) <= max_chars
        and user_id == user_id.strip()
        and not _CONTROL.search(user_id)
    )


# --- the Authorization header ----------------------------------------------------------------


def _challenge(description: str | None) -> dict[str, str]:
    """RFC 6750: no error code when no credentials came (or came in another scheme)."""
    value = f'Bearer realm="{REALM}"'
    if description is not None:
        value += f', error="invalid_token", error_description="{description}"'
    return {"WWW-Authenticate": value}


def missing_token(message: str = "This endpoint needs a bearer token") -> errors.Unauthorized:
    return errors.Unauthorized(message, headers=_challenge(None))


def invalid_token(description: str) -> errors.Unauthorized:
    """`description` is one of our fixed phrases: never the token, never a claim's value."""
    assert '"' not in description and "\\" not in description
    return errors.Unauthorized(description, headers=_challenge(description))


def bearer_token(authorization_header: str | None) -> str:
    """The token in `Authorization: Bearer <token>`, or the 401 to answer with."""
    if authorization_header is None or not authorization_header.strip():
        raise missing_token()
    if len(authorization_header) > MAX_AUTHORIZATION_CHARS:
        raise invalid_token("The Authorization header is too long")
    scheme, _, token = authorization_header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise missing_token("This endpoint needs a bearer token (Authorization: Bearer ...)")
    token = token.strip()
    if not token:
        raise invalid_token("The bearer token is empty")
    if any(char.isspace() for char in token) or not token.isascii():
        raise invalid_token("The bearer token is malformed")
    return token


# --- off and static tokens -------------------------------------------------------------------


class OffAuthenticator:
    """No authentication: every request is `anonymous`, whatever it sends."""

    kind: AuthKind = "off"

    async def authenticate(self, authorization_header: str | None) -> Principal:
        return Principal(user_id=ANONYMOUS, kind="off")

    async def warm_up(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class TokenAuthenticator:
    """Static tokens, held only as hashes.

    Every stored hash is compared with `hmac.compare_digest`, all of them every time, so how
    long a check takes says nothing about which entry (if any) matched.
    """

    kind: AuthKind = "token"

    def __init__(self, entries: Sequence[TokenEntry]) -> None:
        self._entries = tuple(entries)

    async def authenticate(self, authorization_header: str | None) -> Principal:
        token = bearer_token(authorization_header)
        digest = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for entry in self._entries:
            matched = hmac.compare_digest(digest, entry.digest)
            if matched and found is None:
                found = entry.user_id
        if found is None:
            raise invalid_token("The bearer token is not recognized")
        return Principal(user_id=found, kind="token")

    async def warm_up(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# --- JWKS ------------------------------------------------------------------------------------


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
                headers={"Retry-After": str(max(1, math.ceil(self._interval)))},
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


# --- JWT verification ------------------------------------------------------------------------


class JwtAuthenticator:
    """Signed JWTs (Firebase ID tokens, or any issuer's) checked against a JWKS."""

    def __init__(
        self,
        *,
        kind: Literal["firebase", "jwt"],
        keys: JwksCache,
        issuer: str,
        audience: tuple[str, ...],
        algorithms: tuple[str, ...],
        user_claim: str = "sub",
        leeway_seconds: float = DEFAULT_LEEWAY_SECONDS,
    ) -> None:
        self.kind: AuthKind = kind
        self.keys = keys
        self._issuer = issuer
        self._audience = list(audience)
        self._algorithms = frozenset(algorithms) & frozenset(ASYMMETRIC_ALGORITHMS)
        self._user_claim = user_claim
        self._leeway = leeway_seconds
        self._firebase = kind == "firebase"
        self._max_user_id = FIREBASE_MAX_USER_ID if self._firebase else MAX_USER_ID
        required = {"exp", "iat", "iss", "aud", user_claim}
        if self._firebase:
            required.add("auth_time")
        self._required = sorted(required)

    async def authenticate(self, authorization_header: str | None) -> Principal:
        import jwt

        token = bearer_token(authorization_header)
        if not _JWT_SHAPE.fullmatch(token):
            raise invalid_token("The token is malformed")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise invalid_token("The token is malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise invalid_token("The token's signing algorithm is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise invalid_token("The token does not name its signing key")
        key = await self.keys.key(kid)
        if alg not in key.algorithms:
            raise invalid_token("The token's signing algorithm does not match its key")
        claims = self._decode(token, key, alg)
        user_id = claims.get(self._user_claim)
        if not isinstance(user_id, str) or not _usable_user_id(user_id, self._max_user_id):
            raise invalid_token("The token names no usable user")
        if self._firebase:
            auth_time = claims.get("auth_time")
            if not isinstance(auth_time, int | float) or isinstance(auth_time, bool):
                raise invalid_token("The token's sign-in time is malformed")
            if auth_time > time.time() + self._leeway:
                raise invalid_token("The token's sign-in time is in the future")
        return Principal(user_id=user_id, kind=self.kind)

    def _decode(self, token: str, key: VerificationKey, alg: str) -> dict[str, Any]:
        """Signature, then `exp`, `nbf`, `iat`, `iss` and `aud`, each failure in its own words."""
        import jwt

        try:
            return jwt.decode(
                token,
                key.public_key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": self._required},
            )
        except jwt.ExpiredSignatureError:
            raise invalid_token("The token has expired") from None
        except jwt.ImmatureSignatureError:
            raise invalid_token("The token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise invalid_token("The token is meant for another audience") from None
        except jwt.InvalidIssuerError:
            raise invalid_token("The token comes from another issuer") from None
        except jwt.InvalidSignatureError:
            raise invalid_token("The token's signature is invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise invalid_token(f"The token lacks the {exc.claim} claim") from None
        except jwt.InvalidAlgorithmError:
            raise invalid_token("The token's signing algorithm is not accepted") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise invalid_token("The token is malformed") from None

    async def warm_up(self) -> None:
        await self.keys.warm_up()

    async def aclose(self) -> None:
        await self.keys.aclose()


def create_authenticator(config: AuthConfig) -> Authenticator:
    """The authenticator for `config.kind`; cheap, fetches nothing until `warm_up` or use."""
    if config.kind == "off":
        return OffAuthenticator()
    if config.kind == "token":
        return TokenAuthenticator(config.tokens)
    if config.kind == "firebase":
        assert config.firebase_project_id
        url = config.jwks_url or FIREBASE_JWKS_URL
        issuer = FIREBASE_ISSUER_PREFIX + config.firebase_project_id
        audience: tuple[str, ...] = (config.firebase_project_id,)
        algorithms: tuple[str, ...] = ("RS256",)
        user_claim = "sub"
    else:
        assert config.jwks_url and config.issuer
        url, issuer, audience = config.jwks_url, config.issuer, config.audience
        algorithms, user_claim = config.algorithms, config.user_claim
    keys = JwksCache(
        url,
        timeout_seconds=config.jwks_timeout_seconds,
        min_ttl_seconds=config.jwks_cache_min_seconds,
        max_ttl_seconds=config.jwks_cache_max_seconds,
        refresh_interval_seconds=config.jwks_refresh_interval_seconds,
    )
    return JwtAuthenticator(
        kind=config.kind,
        keys=keys,
        issuer=issuer,
        audience=audience,
        algorithms=algorithms,
        user_claim=user_claim,
        leeway_seconds=config.leeway_seconds,
    )


# --- python -m vrai_stream.auth --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`new-token USER` makes a token and its entry; `hash-token [TOKEN]` hashes one."""
    parser = argparse.ArgumentParser(
        prog="python -m vrai_stream.auth", description="Static tokens for VRAI_AUTH=token."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new-token", help="print a new random token and its entry")
    new.add_argument("user", help="the user id the token stands for")
    hashing = commands.add_parser("hash-token", help="print the sha256:<hex> of a token")
    hashing.add_argument(
        "value",
        metavar="TOKEN",
        nargs="?",
        default="-",
        help="the token; `-` or nothing reads it from stdin",
    )
    args = parser.parse_args(argv)
    if args.command == "new-token":
        token = secrets.token_urlsafe(32)
        entry = f"{args.user}:{hash_token(token)}"
        parse_token_table(entry)  # the same check the settings will make
        print(f"token (give it to {args.user}): {token}")
        print(f"VRAI_AUTH_TOKENS entry:        {entry}")
        return 0
    given: str = sys.stdin.readline().strip() if args.value == "-" else args.value
    if not given:
        parser.error("the token is empty")
    print(hash_token(given))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
