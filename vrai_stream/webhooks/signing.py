"""Standard Webhooks' symmetric signature (https://www.standardwebhooks.com/, version 1.0):
what lets a receiver tell our webhooks from anyone else's POST, with the standard's libraries
or a few lines of its own."""

from __future__ import annotations

import base64
import hashlib
import hmac

SECRET_PREFIX = "whsec_"  # a prefix, not a secret  # noqa: S105  # nosec B105
"""The standard's form of a signing secret: this prefix, then the key's bytes in base64."""
SIGNATURE_VERSION = "v1"
"""HMAC-SHA256 with a shared secret, in the standard's words."""


def signing_key(secret: str) -> bytes:
    """The HMAC key a `whsec_<base64>` secret stands for (settings checked its form)."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`: the id and the time
    are signed with the body, so neither can be replayed under another."""
    if "." in message_id:
        raise ValueError("a webhook id must not hold a '.': the signed text would be ambiguous")
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signed_headers(key: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The standard's three headers for one attempt: the id stays, the time is the attempt's."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, message_id, timestamp, body),
    }
