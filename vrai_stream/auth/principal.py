"""Who the caller is once authenticated, and what every authenticator offers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vrai_stream.auth.config import AuthKind


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
