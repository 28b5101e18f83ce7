"""Leases this machine holds on shared records, renewed while it lives.

A running job's records say until when they are held (`leaseUntil`, wall-clock seconds).
One loop renews every lease this machine holds a third of the way in; a machine that dies
stops renewing, and once the time has passed, other machines treat the record as free.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import anyio

from vrai_stream.state.bucket import StateUnavailable

logger = logging.getLogger("vrai_stream.state")


class Lease(Protocol):
    async def renew(self, until: float) -> bool:
        """Extend the hold to `until`; False when it was lost and should be dropped."""
        ...


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
        if not kept:
            self.release(lease)
