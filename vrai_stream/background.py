"""Work that outlives the request that started it, and that shutdown waits for.

Debug copies still uploading, records for the shared bucket, webhooks on their way: each
runs in the lifespan's task group, counted, so the drain can wait until none is left.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc


class BackgroundWork:
    def __init__(self) -> None:
        self._group: anyio.abc.TaskGroup | None = None
        self._pending = 0
        self._idle = anyio.Event()
        self._idle.set()

    def start(self, group: anyio.abc.TaskGroup) -> None:
        """Run the work in `group`, which outlives requests."""
        self._group = group

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def stopping(self) -> bool:
        """No new work can start: never started, or the lifespan is ending."""
        return self._group is None or self._group.cancel_scope.cancel_called

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        assert self._group is not None, f"{type(self).__name__}.start() was not called"
        if self._pending == 0:
            self._idle = anyio.Event()
        self._pending += 1

        async def tracked() -> None:
            try:
                await work()
            finally:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

        self._group.start_soon(tracked)

    async def wait_idle(self) -> None:
        await self._idle.wait()
