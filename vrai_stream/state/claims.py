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
from dataclasses import dataclass

from vrai_stream.state.bucket import Record, StateBucket, StateUnavailable
from vrai_stream.state.leases import LeasedRecord, Leases

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


Claim = LeasedRecord
"""This machine runs the key: its claim, renewed until `SharedKeys.settle`."""


class SharedKeys:
    def __init__(self, bucket: StateBucket, leases: Leases, *, ttl_seconds: float) -> None:
        self._bucket = bucket
        self._leases = leases
        self._ttl = ttl_seconds

    async def claim(
        self, user_id: str, key: str, request_id: str
    ) -> Claim | KeptAnswer | HeldElsewhere:
        """Claim the key for `request_id`: a `Claim` when this request runs it, else what
        the first request left (its answer, or that it still runs).

        Raises `StateUnavailable` when the bucket cannot say.
        """
        path = _path(user_id, key)
        await self._bucket.ready()  # the lease counts from the write, not from the SDK's import
        for _ in range(CLAIM_ATTEMPTS):
            until = self._leases.until()
            fields = {"state": "running", "requestId": request_id, "leaseUntil": until}
            etag = await self._bucket.create(path, fields)
            if etag is None:
                found = await self._bucket.read(path)
                if found is None:
                    continue  # removed since: create again
                standing = _standing(found)
                if standing is not None:
                    return standing
                etag = await self._bucket.replace(path, fields, found.etag)
            if etag is not None:
                claim = Claim(self._bucket, path, fields, etag)
                self._leases.hold(claim)
                return claim
        # Every round lost to another machine moving first: it holds the key, or soon will.
        return HeldElsewhere(seconds_left=self._leases.lease_seconds)

    async def look(self, user_id: str, key: str) -> KeptAnswer | HeldElsewhere | None:
        """What the key holds now: an answer, a job running, or nothing (freed or expired)."""
        found = await self._bucket.read(_path(user_id, key))
        return None if found is None else _standing(found)

    async def settle(self, claim: Claim, answer: KeptAnswer | None) -> None:
        """The job is over: the claim becomes its answer, or is removed for another try.
        A bucket that fails is logged, and the claim frees when its lease runs out."""
        self._leases.release(claim)
        kept = None
        if answer is not None:
            kept = {
                "state": "kept",
                "requestId": answer.request_id,
                "fingerprint": answer.fingerprint,
                "status": answer.status,
                "headers": [list(pair) for pair in answer.headers],
                "expiresAt": time.time() + self._ttl,
            }
        with contextlib.suppress(StateUnavailable):
            await claim.finish(kept, answer.body if answer else b"")


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
