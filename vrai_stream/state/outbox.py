"""Webhooks on their way, kept in the shared bucket until they land: a delivery cut short
because its machine stopped (scaled down, suspended, replaced) is taken up by another.

`webhooks/<request id>` holds the webhook's URL and signed body under a lease its machine
renews while it retries.  Delivered or given up, it is removed.  Every machine looks for
records whose lease ran out, takes each over compare-and-swap, and delivers it: at least
once, under the same `webhook-id`, whichever machine sends it.
"""

from __future__ import annotations

import contextlib
import logging
import time

from vrai_stream.state.bucket import StateBucket, StateUnavailable
from vrai_stream.state.leases import LeasedRecord, Leases
from vrai_stream.webhooks.outbox import Parcel
from vrai_stream.webhooks.payload import Event

logger = logging.getLogger("vrai_stream.state")

PREFIX = "webhooks/"
MAX_TAKEN_AT_ONCE = 32
"""Orphans taken over in one look: the rest wait for the next, on this machine or another."""


class SharedOutbox:
    """`webhooks.outbox.Outbox` in the shared bucket."""

    def __init__(self, bucket: StateBucket, leases: Leases) -> None:
        self._bucket = bucket
        self._leases = leases

    @property
    def look_every_seconds(self) -> float:
        return self._leases.lease_seconds

    async def keep(self, parcel: Parcel) -> LeasedRecord | None:
        fields = {
            "requestId": parcel.request_id,
            "url": parcel.url,
            "type": parcel.event.type,
            "leaseUntil": self._leases.until(),
        }
        path = PREFIX + parcel.request_id
        try:
            etag = await self._bucket.create(path, fields, parcel.event.body)
        except StateUnavailable:
            return None  # logged; this machine alone delivers it
        if etag is None:
            return None  # kept already: a request id names one webhook
        return self._held(LeasedRecord(self._bucket, path, fields, etag, parcel.event.body))

    async def release(self, held: LeasedRecord) -> None:
        self._leases.release(held)
        with contextlib.suppress(StateUnavailable):  # logged; another machine sends it again
            await held.finish(None)

    async def orphans(self) -> list[tuple[LeasedRecord, Parcel]]:
        """Webhooks whose machine stopped renewing them, now this machine's to deliver."""
        taken: list[tuple[LeasedRecord, Parcel]] = []
        with contextlib.suppress(StateUnavailable):
            for path in await self._bucket.keys(PREFIX):
                if len(taken) >= MAX_TAKEN_AT_ONCE:
                    break
                orphan = await self._take_over(path)
                if orphan is not None:
                    taken.append(orphan)
        return taken

    async def _take_over(self, path: str) -> tuple[LeasedRecord, Parcel] | None:
        found = await self._bucket.read(path)
        if found is None:
            return None
        fields = found.fields
        try:
            if fields["leaseUntil"] > time.time():
                return None  # its machine still delivers it
            parcel = Parcel(fields["requestId"], fields["url"], Event(fields["type"], found.body))
        except (KeyError, TypeError):
            logger.warning("state bucket: unreadable webhook record", extra={"key": path})
            return None
        fields = {**fields, "leaseUntil": self._leases.until()}
        etag = await self._bucket.replace(path, fields, found.etag, found.body)
        if etag is None:
            return None  # another machine took it first
        return self._held(LeasedRecord(self._bucket, path, fields, etag, found.body)), parcel

    def _held(self, record: LeasedRecord) -> LeasedRecord:
        self._leases.hold(record)
        return record
