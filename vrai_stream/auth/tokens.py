"""The `off` mode (everyone is `anonymous`) and the `token` mode (static tokens, as hashes)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from vrai_stream.auth.bearer import bearer_token, invalid_token
from vrai_stream.auth.config import AuthKind, TokenEntry
from vrai_stream.auth.principal import Principal
from vrai_stream.settings import ANONYMOUS


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
