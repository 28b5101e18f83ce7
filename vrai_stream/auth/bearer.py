"""The `Authorization` header: the bearer token in it, or the 401 to answer with.

The 401s carry RFC 6750 challenges whose descriptions are fixed phrases, never the token.
"""

from __future__ import annotations

from vrai_stream import errors

REALM = "vrai-stream"

MAX_AUTHORIZATION_CHARS = 8192
"""Longer headers are refused before any parsing; real ID tokens are about 1 KiB."""


def _challenge(description: str | None) -> str:
    """RFC 6750: no error code when no credentials came (or came in another scheme)."""
    value = f'Bearer realm="{REALM}"'
    if description is not None:
        value += f', error="invalid_token", error_description="{description}"'
    return value


def missing_token(message: str = "This endpoint needs a bearer token") -> errors.Unauthorized:
    return errors.Unauthorized(message, challenge=_challenge(None))


def invalid_token(description: str) -> errors.Unauthorized:
    """`description` is one of our fixed phrases: never the token, never a claim's value."""
    assert '"' not in description and "\\" not in description
    return errors.Unauthorized(description, challenge=_challenge(description))


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
