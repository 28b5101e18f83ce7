"""Finished answers kept by request id, for `GET /v1/transcriptions/{requestId}`: a client that
lost its answer, or was sent to the background after its last byte, gets it later.

Kept on the machine that ran the job, for the result's time to live; bounded in count and
in bytes, oldest dropped first, so memory stays planned whatever clients send.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import anyio

MAX_RESULTS = 10_000
MAX_RESULT_BYTES = 1024 * 1024
"""A 3-hour transcript with its segments is about 200 kB: an answer beyond 1 MiB is not kept."""
MAX_TOTAL_BYTES = 8 * 1024 * 1024
"""A machine answers a few hundred notes an hour (5 kB each for 5 minutes of speech): 8 MiB
keeps an hour of them, and stays small beside the memory plan's 768 MiB."""


@dataclass(frozen=True)
class Result:
    """A finished answer as it can be sent again: its status, media type and body."""

    status: int
    media_type: str
    body: bytes


@dataclass
class Held:
    """A job asked about by its id: running, or finished with its answer."""

    user_id: str
    expires_at: float
    result: Result | None = None
    """None while the job runs."""


class Results:
    def __init__(self, ttl_seconds: float) -> None:
        self._ttl = ttl_seconds
        self._entries: OrderedDict[str, Held] = OrderedDict()
        self._bytes = 0

    def started(self, request_id: str, user_id: str) -> None:
        """A job began: asking for its answer is `202` until it ends."""
        self._drop_expired()
        self._entries[request_id] = Held(user_id, anyio.current_time() + self._ttl)
        while len(self._entries) > MAX_RESULTS:
            self._drop_oldest()

    def finished(self, request_id: str, result: Result | None) -> None:
        """The job ended: keep its answer, or forget it (nothing to send again: an MP3)."""
        entry = self._entries.get(request_id)
        if entry is None:
            return
        if result is None or len(result.body) > MAX_RESULT_BYTES:
            del self._entries[request_id]
            return
        entry.result = result
        entry.expires_at = anyio.current_time() + self._ttl
        self._entries.move_to_end(request_id)
        self._bytes += len(result.body)
        while self._bytes > MAX_TOTAL_BYTES:
            self._drop_oldest()

    def find(self, request_id: str, user_id: str) -> Held | None:
        """The user's job, running (`result` None) or finished; another user's is unknown."""
        self._drop_expired()
        entry = self._entries.get(request_id)
        if entry is None or entry.user_id != user_id:
            return None
        return entry

    def _drop_expired(self) -> None:
        # Entries are in the order they were last touched, each for the same time to live:
        # the oldest expires first.
        now = anyio.current_time()
        while self._entries and next(iter(self._entries.values())).expires_at <= now:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self._forget(next(iter(self._entries)))

    def _forget(self, request_id: str) -> None:
        entry = self._entries.pop(request_id)
        if entry.result is not None:
            self._bytes -= len(entry.result.body)
