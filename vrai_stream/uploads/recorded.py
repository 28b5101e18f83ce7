"""An answer as it is sent: its status, its header pairs and its body's bytes, plain data.

A request's answer is recorded as it goes out, so another request can get it: a retry with
the same `Idempotency-Key` (again, or joining the answer while it is still being sent), or
the request that resumes an upload.  Nothing here knows HTTP beyond a status and pairs of
strings; `http/` writes the recording and plays it back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

Headers = tuple[tuple[str, str], ...]


RELAY_BYTES = 1024 * 1024
"""How far a relay's writer may run ahead of its reader before it waits."""


class RecordedAnswer:
    """One answer, recorded while it is sent and followed by its readers.

    Kept (`max_bytes`): any number of readers, each from the first byte; beyond `max_bytes`
    the recording is void (`overflowed`).  A relay (`relay=True`): one reader, who takes
    what was recorded and what follows; what it has read is dropped, and while it follows
    the writer waits whenever it is more than `RELAY_BYTES` behind, so memory stays flat
    whatever the answer's size (a long MP3).  (A writer never waits for a reader to come:
    one that never came would hold the answer up for good.)
    """

    def __init__(self, *, max_bytes: int | None = None, relay: bool = False) -> None:
        self.status: int | None = None
        self.headers: Headers = ()
        self.size = 0
        self.finished = False
        self.overflowed = False
        self._max_bytes = max_bytes
        self._relay = relay
        self._chunks: list[bytes] = []
        self._unread = 0
        self._reader = False
        self._abandoned = False
        self._changed = anyio.Event()

    @classmethod
    def whole(cls, status: int, headers: Headers, body: bytes) -> RecordedAnswer:
        """An answer recorded elsewhere (another machine), whole."""
        answer = cls()
        answer.start(status, headers)
        answer._chunks.append(body)
        answer.size = len(body)
        answer.finish()
        return answer

    @property
    def started(self) -> bool:
        return self.status is not None

    @property
    def body(self) -> bytes:
        return b"".join(self._chunks)

    @property
    def complete(self) -> bool:
        """Sent to its end and kept whole: it can be sent again as it is."""
        return self.finished and not self.overflowed

    def start(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers
        self._tell()

    async def write(self, chunk: bytes) -> None:
        """Record `chunk`; a relay waits here while its reader is far behind, and drops it
        once its reader has left (nobody else will ever read it)."""
        if self.overflowed or self._abandoned or not chunk:
            return
        self.size += len(chunk)
        if self._max_bytes is not None and self.size > self._max_bytes:
            self.overflowed = True
            self._chunks.clear()  # a reader following it cannot go on: it ends short
            self._tell()
            return
        self._chunks.append(chunk)
        self._unread += len(chunk)
        self._tell()
        while self._relay and self._reader and self._unread > RELAY_BYTES and not self.finished:
            await self._wait()

    def finish(self) -> None:
        """The answer is over (sent, or given up): readers end, and a waiting writer goes on."""
        self.finished = True
        self._tell()

    async def until_started(self) -> None:
        """Wait until the answer's head is known, or the answer ended without one."""
        while not self.started and not self.finished:
            await self._wait()

    async def follow(self) -> AsyncIterator[bytes]:
        """The body from its first byte, as it is recorded, until it finishes.

        Ends early if the recording overflows: the reader cannot have the whole answer.
        """
        sent = 0
        self._reader = True
        try:
            while True:
                if self.overflowed:
                    return
                while sent < len(self._chunks):
                    chunk = self._chunks[sent]
                    if self._relay:
                        del self._chunks[0]
                        self._unread -= len(chunk)
                        self._tell()
                    else:
                        sent += 1
                    yield chunk
                if self.finished:
                    return
                await self._wait()
        finally:
            self._reader = False
            if self._relay and not self.finished:
                self._abandoned = True
                self._chunks.clear()
            self._tell()

    async def _wait(self) -> None:
        await self._changed.wait()

    def _tell(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
