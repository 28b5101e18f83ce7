"""How many jobs run at once, and how many may wait: the rest are turned away early.

A job is admitted or refused before one byte of its body is read, so a refused client
never has to upload anything, and a waiting one is held back by TCP, not by our memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from . import errors


class Admission:
    def __init__(
        self,
        *,
        max_jobs: int,
        max_queue: int,
        queue_timeout_seconds: float,
        retry_after_seconds: int,
    ) -> None:
        self.max_jobs = max_jobs
        self.max_queue = max_queue
        self._queue_timeout = queue_timeout_seconds
        self._retry_after = retry_after_seconds
        self._slots = anyio.Semaphore(max_jobs)
        self.running = 0
        self.waiting = 0
        self.closed = False

    def close(self) -> None:
        """Refuse every new job from now on (the machine is shutting down)."""
        self.closed = True

    def _busy(self, message: str) -> errors.Busy:
        return errors.Busy(message, headers={"Retry-After": str(self._retry_after)})

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one job slot for the duration of the block, or raise `Busy`."""
        if self.closed:
            raise self._busy("The server is shutting down; retry on another machine")
        if self._slots.value == 0 and self.waiting >= self.max_queue:
            raise self._busy("The server is at capacity; retry shortly")
        self.waiting += 1
        try:
            with anyio.fail_after(self._queue_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise self._busy("The server stayed at capacity; retry shortly") from None
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()
