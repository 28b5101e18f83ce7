"""Where webhooks on their way are kept, so that one cut short on this machine is delivered
from another (`state.outbox` keeps them in the shared bucket; without one, nowhere)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

from vrai_stream.webhooks.payload import Event

Held = TypeVar("Held")


@dataclass(frozen=True)
class Parcel:
    """One webhook as it is kept: whose, where to, and its signed body."""

    request_id: str
    url: str
    event: Event


class Outbox(Protocol[Held]):
    @property
    def look_every_seconds(self) -> float:
        """How often to look for webhooks other machines left undelivered."""
        ...

    async def keep(self, parcel: Parcel) -> Held | None:
        """Keep `parcel` until it is released; None when it could not be kept."""
        ...

    async def release(self, held: Held) -> None:
        """Delivered, or given up: nobody sends it again."""
        ...

    async def orphans(self) -> list[tuple[Held, Parcel]]:
        """Webhooks whose machine stopped before they landed, now this machine's."""
        ...
