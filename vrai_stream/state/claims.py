"""`Idempotency-Key` claims shared by every machine: a key runs once, wherever it is retried.

The claim is `keys/<hash of user and key>`.  Creating it is conditional, so of two machines
claiming at once, one wins.  While its job runs, its machine renews the claim's lease; when
the job ends, the claim becomes the first answer (kept for the keys' time to live) or is
removed (the answer was not final: the key may be tried again).  A claim whose lease ran
out, or whose answer expired, is taken over by the next request, compare-and-swap.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from vrai_stream.state.bucket import Record, StateBucket, StateUnavailable
from vrai_stream.state.leases import Leases

logger = logging.getLogger("vrai_stream.state")

Headers = tuple[tuple[str, str], ...]
CLAIM_ATTEMPTS = 4
"""Rounds of create, read, take over: each lost round means another machine moved first."""


@dataclass(frozen=True)
class KeptAnswer:
    """The first request's answer, as it was sent."""

    request_id: str
    fingerprint: str
    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class HeldElsewhere:
    """The first request still runs, on the machine holding its lease: for `seconds_left`
    at most, unless that machine renews it."""

    seconds_left: float


@dataclass(eq=False)
class Claim:
    """This machine runs the key: its lease is renewed until `settle`."""

    keys: SharedKeys
    path: str
    request_id: str
    etag: str
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    lost: bool = False

    async def renew(self, until: float) -> bool:
        async with self.lock:
            if self.lost:
                return False
            fields = self.keys.running(self.request_id, until)
            etag = await self.keys.bucket.replace(self.path, fields, self.etag)
            if etag is None:
                self.mark_lost()
                return False
            self.etag = etag
            return True

    def mark_lost(self) -> None:
        # Not renewed in time (this machine stalled), and taken over: the key may run twice.
        self.lost = True
        logger.warning(
            "idempotency claim lost to another machine",
            extra={"requestId": self.request_id, "key": self.path},
        )


class SharedKeys:
    def __init__(self, bucket: StateBucket, leases: Leases, *, ttl_seconds: float) -> None:
        self.bucket = bucket
        self._leases = leases
        self._ttl = ttl_seconds

    def running(self, request_id: str, until: float) -> dict[str, Any]:
        return {"state": "running", "requestId": request_id, "leaseUntil": until}

    async def claim(
        self, user_id: str, key: str, request_id: str
    ) -> Claim | KeptAnswer | HeldElsewhere:
        """Claim the key for `request_id`: a `Claim` when this request runs it, else what
        the first request left (its answer, or that it still runs).

        Raises `StateUnavailable` when the bucket cannot say.
        """
        path = _path(user_id, key)
        fields = self.running(request_id, self._leases.until())
        for _ in range(CLAIM_ATTEMPTS):
            etag = await self.bucket.create(path, fields)
            if etag is not None:
                return self._held(Claim(self, path, request_id, etag))
            found = await self.bucket.read(path)
            if found is None:
                continue  # removed since: create again
            standing = _standing(found)
            if standing is not None:
                return standing
            etag = await self.bucket.replace(path, fields, found.etag)
            if etag is not None:
                return self._held(Claim(self, path, request_id, etag))
        # Every round lost to another machine moving first: it holds the key, or soon will.
        return HeldElsewhere(seconds_left=self._leases.lease_seconds)

    async def look(self, user_id: str, key: str) -> KeptAnswer | HeldElsewhere | None:
        """What the key holds now: an answer, a job running, or nothing (freed or expired)."""
        found = await self.bucket.read(_path(user_id, key))
        return None if found is None else _standing(found)

    async def settle(self, claim: Claim, answer: KeptAnswer | None) -> None:
        """The job is over: the claim becomes its answer, or is removed for another try.
        A bucket that fails is logged, and the claim frees when its lease runs out."""
        self._leases.release(claim)
        with contextlib.suppress(StateUnavailable):
            await self._settle(claim, answer)

    async def _settle(self, claim: Claim, answer: KeptAnswer | None) -> None:
        async with claim.lock:
            if claim.lost:
                return
            if answer is None:
                await self.bucket.delete(claim.path)
                return
            fields = {
                "state": "kept",
                "requestId": answer.request_id,
                "fingerprint": answer.fingerprint,
                "status": answer.status,
                "headers": [list(pair) for pair in answer.headers],
                "expiresAt": time.time() + self._ttl,
            }
            if await self.bucket.replace(claim.path, fields, claim.etag, answer.body) is None:
                claim.mark_lost()

    def _held(self, claim: Claim) -> Claim:
        self._leases.hold(claim)
        return claim


def _path(user_id: str, key: str) -> str:
    digest = hashlib.sha256(f"{user_id}\0{key}".encode()).hexdigest()
    return f"keys/{digest}"


def _standing(record: Record) -> KeptAnswer | HeldElsewhere | None:
    """What a claim found in the bucket stands for; None when it no longer holds the key."""
    fields = record.fields
    now = time.time()
    try:
        if fields["state"] == "kept" and fields["expiresAt"] > now:
            headers = tuple((str(name), str(value)) for name, value in fields["headers"])
            return KeptAnswer(
                fields["requestId"], fields["fingerprint"], fields["status"], headers, record.body
            )
        if fields["state"] == "running" and fields["leaseUntil"] > now:
            return HeldElsewhere(fields["leaseUntil"] - now)
    except (KeyError, TypeError, ValueError):
        logger.warning("state bucket: unreadable idempotency claim, taken over")
    return None
