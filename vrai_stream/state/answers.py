"""Answers by request id, shared by every machine: `GET /v1/transcriptions/{id}` anywhere.

`answers/<request id>` says whose job it is and that it runs (under a lease its machine
renews), then holds its finished answer for the results' time to live.  Only the machine
running the job writes it, so its writes need no condition.  They run in the background:
a job never waits on the bucket to begin, nor its answer to end.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field

import anyio

from vrai_stream.background import BackgroundWork
from vrai_stream.state.bucket import StateBucket, StateUnavailable
from vrai_stream.state.leases import Leases

REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class StoredAnswer:
    status: int
    media_type: str
    body: bytes


@dataclass(frozen=True)
class StillRunning:
    seconds_left: float


@dataclass(eq=False)
class RunningJob:
    """A job of this machine's, whose record is renewed while it runs."""

    answers: SharedAnswers
    request_id: str
    user_id: str
    written: anyio.Event = field(default_factory=anyio.Event)
    """Set once the first record was written (or failed to be): later writes come after."""
    over: bool = False
    """The job ended: a renewal still under way must not write `running` over its answer."""
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def renew(self, until: float) -> bool:
        async with self.lock:
            if self.written.is_set() and not self.over:
                await self.answers.write_running(self, until)
        return not self.over


class SharedAnswers:
    def __init__(
        self, bucket: StateBucket, leases: Leases, work: BackgroundWork, *, ttl_seconds: float
    ) -> None:
        self._bucket = bucket
        self._leases = leases
        self._work = work
        self._ttl = ttl_seconds

    def started(self, request_id: str, user_id: str) -> RunningJob:
        """The job began: other machines answer `202` for it, once the record is written."""
        job = RunningJob(self, request_id, user_id)
        self._leases.hold(job)

        async def write() -> None:
            try:
                with contextlib.suppress(StateUnavailable):  # logged
                    await self.write_running(job, self._leases.until())
            finally:
                job.written.set()

        self._work.spawn(write)
        return job

    async def write_running(self, job: RunningJob, until: float) -> None:
        fields = {"state": "running", "userId": job.user_id, "leaseUntil": until}
        await self._bucket.put(_path(job.request_id), fields)

    def finished(self, job: RunningJob, answer: StoredAnswer | None) -> None:
        """Keep the answer for the time to live, or forget the job (no answer to send again)."""
        self._leases.release(job)

        async def write() -> None:
            await job.written.wait()
            async with job.lock:
                job.over = True
                await self._write_final(job, answer)

        self._work.spawn(write)

    async def _write_final(self, job: RunningJob, answer: StoredAnswer | None) -> None:
        with contextlib.suppress(StateUnavailable):  # logged; the lease runs out
            if answer is None:
                await self._bucket.delete(_path(job.request_id))
                return
            fields = {
                "state": "kept",
                "userId": job.user_id,
                "status": answer.status,
                "mediaType": answer.media_type,
                "expiresAt": time.time() + self._ttl,
            }
            await self._bucket.put(_path(job.request_id), fields, answer.body)

    async def find(self, request_id: str, user_id: str) -> StoredAnswer | StillRunning | None:
        """The user's answer, or that its job still runs; None for an id unknown, expired,
        another user's, or whose machine stopped renewing it (the job was lost)."""
        if not REQUEST_ID.fullmatch(request_id):
            return None
        found = await self._bucket.read(_path(request_id))
        if found is None:
            return None
        fields = found.fields
        now = time.time()
        try:
            if fields["userId"] != user_id:
                return None
            if fields["state"] == "kept" and fields["expiresAt"] > now:
                return StoredAnswer(fields["status"], fields["mediaType"], found.body)
            if fields["state"] == "running" and fields["leaseUntil"] > now:
                return StillRunning(fields["leaseUntil"] - now)
        except (KeyError, TypeError):
            return None
        return None


def _path(request_id: str) -> str:
    return f"answers/{request_id}"
