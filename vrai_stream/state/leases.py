"""Leases this machine holds on shared records, renewed while it lives.

A record held under a lease says until when (`leaseUntil`, wall-clock seconds).  One loop
renews every lease this machine holds a third of the way in; a machine that dies stops
renewing, and once the time has passed, other machines treat the record as free and take
it over, compare-and-swap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from vrai_stream.state.bucket import StateBucket, StateUnavailable

logger = logging.getLogger("vrai_stream.state")


class Lease(Protocol):
    async def renew(self, until: float) -> bool:
        """Extend the hold to `until`; False when it was lost and should be dropped."""
        ...


@dataclass(eq=False)
class LeasedRecord:
    """A record this machine holds: renewed with `If-Match` until it is let go, so a machine
    that took it over in the meantime (this one stalled past its lease) is never overwritten."""

    bucket: StateBucket
    path: str
    fields: dict[str, Any]
    etag: str
    body: bytes = b""
    lost: bool = False
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def renew(self, until: float) -> bool:
        async with self.lock:
            if not self.lost:
                self.fields = {**self.fields, "leaseUntil": until}
                await self._swap(self.fields, self.body)
            return not self.lost

    async def finish(self, fields: dict[str, Any] | None, body: bytes = b"") -> None:
        """Let the record go: replaced by `fields` (no lease any more), or removed (None)."""
        async with self.lock:
            if self.lost:
                return
            if fields is None:
                await self.bucket.delete(self.path)
            else:
                await self._swap(fields, body)

    async def _swap(self, fields: dict[str, Any], body: bytes) -> None:
        etag = await self.bucket.replace(self.path, fields, self.etag, body)
        if etag is None:
            self.lost = True
            logger.warning(
                "a shared record was taken over by another machine", extra={"key": self.path}
            )
        else:
            self.etag = etag


class Leases:
    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._held: set[Lease] = set()

    def until(self) -> float:
        """Until when a record written now is held."""
        return time.time() + self.lease_seconds

    def hold(self, lease: Lease) -> None:
        self._held.add(lease)

    def release(self, lease: Lease) -> None:
        self._held.discard(lease)

    async def renew_forever(self) -> None:
        while True:
            await anyio.sleep(self.lease_seconds / 3)
            until = self.until()
            async with anyio.create_task_group() as group:
                for lease in list(self._held):
                    group.start_soon(self._renew, lease, until)

    async def _renew(self, lease: Lease, until: float) -> None:
        try:
            kept = await lease.renew(until)
        except StateUnavailable:
            return  # logged; the next round tries again, while the lease still runs
        except Exception as exc:  # a bug: it must not end the loop every lease depends on
            logger.error("lease not renewed", exc_info=exc)
            return
        if not kept:
            self.release(lease)
