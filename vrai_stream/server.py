"""uvicorn, told to drain: on SIGTERM or SIGINT, refuse new jobs, finish the running ones.

uvicorn already closes its listener and waits for in-flight requests, up to
`VRAI_DRAIN_SECONDS`, then cancels the rest (which kills their ffmpeg, deletes their
spools and aborts their multipart uploads).  What it cannot know is that a request
waiting in our queue should be turned away at once: that is what `handle_exit` adds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from .settings import Settings

logger = logging.getLogger("vrai_stream.server")

MAX_HEADER_BYTES = 16 * 1024
"""Requests with larger headers are refused by h11 before they reach the app."""


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        services = getattr(self._app.state, "services", None)
        if services is not None and self._loop is not None and not services.admission.closed:
            logger.info("draining: new jobs are refused", extra={"signal": sig})
            # A signal handler interrupts the loop anywhere: let the loop close admission.
            self._loop.call_soon_threadsafe(services.admission.close)
        super().handle_exit(sig, frame)


def serve(app: Starlette, settings: Settings, *, host: str, port: int | None) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=settings.port if port is None else port,
        log_config=None,
        proxy_headers=True,
        server_header=False,
        timeout_graceful_shutdown=int(settings.drain_seconds),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    DrainingServer(config, app).run()
