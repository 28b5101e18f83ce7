"""How many jobs run at once, and how many may wait: the rest are turned away early.

A job is admitted or refused before one byte of its body is read, so a refused client
never has to upload anything, and a waiting one is held back by TCP, not by our memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from vrai_stream import errors


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
        self.finished = 0
        """Jobs that held a slot and let it go, since start-up."""
        self._closing = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def close(self) -> None:
        """Refuse every new job from now on, queued ones included (the machine is stopping)."""
        self._closing.set()

    async def wait_idle(self) -> None:
        """Return once no job holds a slot."""
        await self._idle.wait()

    def _busy(self, message: str) -> errors.Busy:
        return errors.Busy(message, retry_after_seconds=self._retry_after)

    async def _acquire_unless_closing(self) -> bool:
        acquired = False
        async with anyio.create_task_group() as group:

            async def give_up_when_closing() -> None:
                await self._closing.wait()
                group.cancel_scope.cancel()

            group.start_soon(give_up_when_closing)
            await self._slots.acquire()
            acquired = True
            group.cancel_scope.cancel()
        return acquired

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one job slot for the duration of the block, or raise `Busy`."""
        if self.closed:
            raise self._busy("The server is shutting down; retry on another machine")
        try:
            # A free slot is taken at once: a job holding one never counts as waiting
            # (counting it until its acquire returned refused a burst's queued jobs).
            self._slots.acquire_nowait()
            acquired = True
        except anyio.WouldBlock:
            if self.waiting >= self.max_queue:
                raise self._busy("The server is at capacity; retry shortly") from None
            self.waiting += 1
            try:
                with anyio.fail_after(self._queue_timeout):
                    acquired = await self._acquire_unless_closing()
            except TimeoutError:
                raise self._busy("The server stayed at capacity; retry shortly") from None
            finally:
                self.waiting -= 1
        if not acquired:
            raise self._busy("The server is shutting down; retry on another machine")
        self.running += 1
        if self.running == 1:
            self._idle = anyio.Event()
        try:
            yield
        finally:
            self.running -= 1
            self.finished += 1
            self._slots.release()
            if self.running == 0:
                self._idle.set()
