"""The authentication settings: `AuthConfig`, checked as a whole, and the static token table.

`vrai_stream.settings` imports `AuthConfig` from here, so this module imports nothing from
`vrai_stream` (and nothing heavier than the standard library): reading the settings must not
pull in the authenticators, `jwt`, `httpx` or `cryptography`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Literal, cast
from urllib.parse import urlsplit

AuthKind = Literal["off", "token", "firebase", "jwt"]

ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
"""What a JWKS can verify.  HMAC (HS*) needs a shared secret, which a JWKS never holds."""

DEFAULT_LEEWAY_SECONDS = 30.0
DEFAULT_JWKS_TIMEOUT_SECONDS = 5.0
DEFAULT_JWKS_CACHE_MIN_SECONDS = 300.0
DEFAULT_JWKS_CACHE_MAX_SECONDS = 21600.0
DEFAULT_JWKS_REFRESH_INTERVAL_SECONDS = 30.0

FIREBASE_MAX_USER_ID = 128
"""Firebase's own limit on `sub`."""

_DIGEST_SHAPE = re.compile(r"[0-9a-fA-F]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


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
        if not usable_user_id(user_id, FIREBASE_MAX_USER_ID):
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


def usable_user_id(user_id: str, max_chars: int) -> bool:
    """It goes into log lines, metric labels and debug keys: no control characters."""
    return (
        0 < len(user_id) <= max_chars
        and user_id == user_id.strip()
        and not _CONTROL.search(user_id)
    )
