"""`Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header): a retried request gets the
first one's answer instead of a second transcription.

Keys are per user.  A request is known by its fingerprint: method, path, query, media
type and a hash of its body, so the same key with another recording is refused (422).
The answer is recorded as it is sent (`RecordedAnswer`), events and MP3 alike, so a
repeat arriving while the first request runs joins its answer as it goes.  Only a final
answer is kept (not a 5xx, a timeout or a vanished client: those may go another way next
time), and only one of at most `MAX_KEPT_ANSWER_BYTES`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import anyio

from vrai_stream import errors
from vrai_stream.memory_plan import ANSWER_RECORDING_BYTES, KEPT_ANSWERS_BYTES
from vrai_stream.uploads.recorded import RecordedAnswer

MAX_KEY_LENGTH = 255
MAX_ENTRIES = 10_000
"""Keys kept at most, oldest dropped first: memory stays bounded whatever clients send."""
MAX_KEPT_ANSWER_BYTES = ANSWER_RECORDING_BYTES
MAX_KEPT_TOTAL_BYTES = KEPT_ANSWERS_BYTES
"""All kept answers together, oldest dropped first: counted in the memory plan, so memory
stays planned whatever clients send (a 3-hour transcript with its segments is about 200 kB)."""
TRANSIENT_STATUSES = frozenset({408, 409, 429, 499})


@dataclass
class Entry:
    user_id: str
    key: str
    expires_at: float
    answer: RecordedAnswer = field(
        default_factory=lambda: RecordedAnswer(max_bytes=MAX_KEPT_ANSWER_BYTES)
    )
    """The first request's answer, recorded as it is sent."""
    fingerprint: str | None = None
    hashed: anyio.Event = field(default_factory=anyio.Event)
    """Set once the first request's body is read (`fingerprint` known), or it ended."""
    settled: anyio.Event = field(default_factory=anyio.Event)
    """Set when the first request has ended, with or without an answer to keep."""
    kept: bool = False
    """The first answer is final and whole: a repeat gets it."""

    def hash_known(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.hashed.set()


class Fingerprint:
    """The hash of a request, fed its body as it streams."""

    def __init__(self, method: str, path: str, query: str, content_type: str) -> None:
        self._hash = hashlib.sha256()
        for part in (method, path, query, content_type):
            self._hash.update(part.encode() + b"\0")

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def check_key(raw: str) -> str:
    key = raw.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise errors.InvalidParameters(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters"
        )
    return key


class IdempotencyKeys:
    def __init__(self, ttl_seconds: float) -> None:
        self._ttl = ttl_seconds
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._kept_bytes = 0

    def claim(self, user_id: str, key: str) -> tuple[Entry, bool]:
        """The entry for this key, and whether this request is the first to use it."""
        self._drop_expired()
        existing = self._entries.get((user_id, key))
        if existing is not None:
            return existing, False
        entry = Entry(user_id, key, expires_at=anyio.current_time() + self._ttl)
        self._entries[(user_id, key)] = entry
        while len(self._entries) > MAX_ENTRIES:
            self._drop_oldest()
        return entry, True

    def settle(self, entry: Entry, outcome_status: int) -> None:
        """The first request is over, with `outcome_status` (that of an error event, for an
        answer that ended with one): keep its answer, or free the key for another try."""
        user_id, key = entry.user_id, entry.key
        held = self._entries.get((user_id, key)) is entry
        final = outcome_status < 500 and outcome_status not in TRANSIENT_STATUSES
        entry.kept = final and entry.fingerprint is not None and entry.answer.complete
        if not entry.kept:
            if held:
                del self._entries[(user_id, key)]
        elif held:
            self._kept_bytes += entry.answer.size
            while self._kept_bytes > MAX_KEPT_TOTAL_BYTES:
                self._drop_oldest()
        entry.hashed.set()
        entry.settled.set()

    def _drop_expired(self) -> None:
        now = anyio.current_time()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires_at > now:
                break
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        if entry.kept:
            self._kept_bytes -= entry.answer.size

    def __len__(self) -> int:
        return len(self._entries)
