"""Things too slow to build before the server listens, built once in the background."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
import anyio.to_thread

from vrai_stream import errors

T = TypeVar("T")

logger = logging.getLogger("vrai_stream.warmup")


class Lazy(Generic[T]):
    """A value built by `factory` in a worker thread, the first time anyone needs it."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._value: T | None = None
        self._lock = anyio.Lock()

    @property
    def ready(self) -> bool:
        return self._value is not None

    async def get(self) -> T:
        if self._value is None:
            async with self._lock:
                if self._value is None:
                    try:
                        self._value = await anyio.to_thread.run_sync(
                            self._factory, abandon_on_cancel=True
                        )
                    except Exception as exc:
                        logger.error("could not start a component", exc_info=exc)
                        raise errors.TranscriberUnavailable(
                            "Transcription is not available on this server right now"
                        ) from exc
        return self._value

    async def warm_up(self, name: str) -> None:
        """Build the value now, so the first request does not wait for it."""
        started = anyio.current_time()
        try:
            await self.get()
        except errors.ServiceError:
            return
        logger.info(
            "warmed up",
            extra={"component": name, "seconds": round(anyio.current_time() - started, 3)},
        )
