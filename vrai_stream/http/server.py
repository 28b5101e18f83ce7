"""uvicorn, told to drain: on SIGTERM or SIGINT, refuse new jobs, finish the running ones.

uvicorn already closes its listener and waits for in-flight requests, up to
`VRAI_DRAIN_SECONDS`, then cancels the rest (which kills their ffmpeg, deletes their
spools and aborts their multipart uploads).  What it cannot know is that a request
waiting in our queue should be turned away at once: that is what `handle_exit` adds.

A request refused before its body is read (401, 503) is answered with `Connection: close`,
so the client is not made to upload what nobody will read.  Closing a socket while the client
is still sending makes the kernel answer its next bytes with a reset, and a client that reads
only once it has sent its body (most HTTP/1.1 clients) then loses the response it had already
received.  `StagedCloseProtocol` closes in stages (RFC 9112, 9.6): the response, then FIN,
then up to `LINGER_SECONDS` (or `LINGER_BYTES`) of reading and discarding what still comes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import uuid
from http import HTTPStatus
from types import FrameType
from typing import Any

import httptools
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from vrai_stream import errors, metrics
from vrai_stream.http.context import REQUEST_ID_EXTENSION
from vrai_stream.http.upload_draft import INTERIM_EXTENSION
from vrai_stream.settings import Settings
from vrai_stream.telemetry import log_request

logger = logging.getLogger("vrai_stream.http.server")

MAX_HEADER_BYTES = 16 * 1024
"""A request line and headers larger than this are refused (431) before they reach the app;
httptools itself sets no limit and would buffer headers of any size."""
HEAD_TOO_LARGE = f"The request line and headers exceed {MAX_HEADER_BYTES} bytes"


LINGER_SECONDS = 2.0
"""How long a refused client may go on sending after its answer, before the connection goes."""
LINGER_BYTES = 4 * 1024 * 1024
"""How much of what it sends is read and thrown away meanwhile, at most."""


class _StagedTransport:
    """The transport as uvicorn's request cycle sees it: `close()` closes in stages."""

    def __init__(self, transport: asyncio.Transport, protocol: StagedCloseProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def close(self) -> None:
        self._protocol.close_in_stages()


class StagedCloseProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a staged close when the request body is unread."""

    lingering = False
    _discarded = 0
    _in_head = False
    _head_began = False
    _head_bytes = 0
    _head_parsed = 0
    _refusal: errors.ServiceError | None = None
    _linger_timer: asyncio.TimerHandle | None = None
    _real_transport: asyncio.Transport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._real_transport = transport
        self.transport = _StagedTransport(transport, self)  # type: ignore[assignment]

    def close_in_stages(self) -> None:
        transport = self._real_transport
        cycle = self.cycle
        body_unread = cycle is not None and cycle.more_body and not cycle.disconnected
        if self.lingering or transport.is_closing() or not body_unread:
            self._close_now()
            return
        if not transport.can_write_eof():
            self._close_now()
            return
        self._linger()

    def _linger(self) -> None:
        """FIN once the response has gone out, then read and discard until the client stops."""
        self.lingering = True
        self._real_transport.write_eof()
        self._real_transport.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self._close_now)

    def _close_now(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self._real_transport.close()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self._close_now()
            return
        self._head_began = False
        super().data_received(data)
        if self._in_head and not self._head_began:
            # A read that was all head, and left it unfinished: httptools buffers it whole,
            # so it is capped here.  (A read where a head begins may end the body before it:
            # the parsed size below catches a head that fits in one read.)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES and not self._real_transport.is_closing():
                self._refuse(errors.HeadersTooLarge(HEAD_TOO_LARGE))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_began = True
        self._head_bytes = 0
        self._head_parsed = 0
        self._refusal = None

    def on_url(self, url: bytes) -> None:
        self._head_parsed += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_parsed += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_parsed > MAX_HEADER_BYTES:  # a head that arrived in a single read
            self._refusal = errors.HeadersTooLarge(HEAD_TOO_LARGE)
            raise httptools.HttpParserError  # stops the parser; uvicorn calls send_400_response
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            extensions = self.scope.setdefault("extensions", {})
            # ASGI has no interim responses; the resumable-upload draft needs its 104.
            send = functools.partial(self._send_interim, cycle)
            extensions[INTERIM_EXTENSION] = {"send": send}
            # The request's id, named here: should the parser refuse the rest of its body,
            # the refusal carries the id the app logs it under (`_refuse`).
            extensions[REQUEST_ID_EXTENSION] = {"id": uuid.uuid4().hex, "refused": None}

    def _send_interim(
        self, cycle: RequestResponseCycle, status: int, reason: str, headers: list[tuple[str, str]]
    ) -> bool:
        """Write a 1xx response ahead of the final one; False once that is too late."""
        if cycle.response_started or cycle.disconnected or self._real_transport.is_closing():
            return False
        lines = [f"HTTP/1.1 {status} {reason}"]
        for name, value in headers:
            if any(c in name + value for c in "\r\n\0"):
                raise ValueError(f"{name} holds a line break")
            lines.append(f"{name}: {value}")
        self._real_transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return True

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request its parser refused, in the service's JSON shape."""
        self._refuse(self._refusal or errors.InvalidHttp("The request is not well-formed HTTP/1.1"))

    def _refuse(self, error: errors.ServiceError) -> None:
        """Answer a request the parser rejected, and close.

        A request the app is handling (a chunk size that is not hex, halfway through its
        body) is logged and counted by the app, once, under the same id: the app sees a
        disconnect and learns why here.  Any other (a head too large or malformed) is
        logged and counted here.
        """
        self._in_head = False
        cycle = self.cycle
        named = cycle.scope.get("extensions", {}).get(REQUEST_ID_EXTENSION) if cycle else None
        if cycle is not None and not cycle.response_complete and named is not None:
            named["refused"] = error
            request_id = str(named["id"])
            if cycle.response_started:
                self._close_now()  # its answer is under way: a second one would corrupt it
                return
        else:
            request_id = uuid.uuid4().hex
            fields = {"requestId": request_id, "endpoint": metrics.UNROUTED}
            log_request({**fields, "status": error.status, "code": error.code})
            metrics.REQUESTS.labels(endpoint=metrics.UNROUTED, code=error.code).inc()
        body = json.dumps(error.body(request_id)).encode()
        head = (
            f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            f"x-request-id: {request_id}\r\n"
            "connection: close\r\n\r\n"
        )
        self._real_transport.write(head.encode() + body)
        if self._real_transport.can_write_eof():
            self._linger()  # the client may still be sending its head: let it read the answer
        else:
            self._close_now()

    def eof_received(self) -> None:
        if self.lingering:
            self._close_now()  # the client is done sending
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)


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
            # An upload waiting for its client could only be resumed here: end it now,
            # or the drain would wait out its grace.
            self._loop.call_soon_threadsafe(services.uploads.end_all, "drained")
        super().handle_exit(sig, frame)


def serve(app: Starlette, settings: Settings, *, host: str, port: int | None) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=settings.port if port is None else port,
        log_config=None,
        proxy_headers=True,
        server_header=False,
        ws="none",  # no websockets here; "auto" imports the package at every start (~20 ms)
        timeout_graceful_shutdown=int(settings.drain_seconds),
        http=StagedCloseProtocol,
    )
    DrainingServer(config, app).run()
