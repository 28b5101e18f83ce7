"""A TCP link that drops: each connection through it is cut after so many seconds or bytes.

For benchmarks of uploads over a link that keeps dropping, as a phone's does: put it
between the client and the server (or a `FlyProxy`), and every connection ends with a reset,
both ways, once it has been open `after_seconds` or has carried `after_bytes` of upload
(client to server; exactly that many reach the server). New connections go through as
before, so a client that resumes its upload makes progress one connection at a time.

    async with FlakyLink(("127.0.0.1", 8000), after_bytes=1_000_000) as link:
        ...                 # requests to link.url
        link.cuts           # one `Cut` per connection that ended, in order

`flaky_link_in_thread(...)` runs it on an event loop of its own, for synchronous code.

It drives its sockets itself (non-blocking, with `anyio.wait_readable`/`wait_writable`)
so that a cut is a bare reset (SO_LINGER 0): closing an anyio stream would send a FIN first,
and the peer would read a clean end of stream instead of a dropped link.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread

Address = tuple[str, int]
READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Cut:
    """How one connection through the link ended."""

    uploaded: int
    """Bytes carried from the client to the server."""
    downloaded: int
    seconds: float
    reason: str
    """`bytes` or `time`: the link cut it; `closed`: a side closed or reset it first;
    `refused`: the server could not be reached."""


@dataclass
class _Tally:
    uploaded: int = 0
    downloaded: int = 0
    reason: str = "closed"


class FlakyLink:
    """The link: an async context manager listening on a free loopback port."""

    def __init__(
        self,
        upstream: Address,
        *,
        after_seconds: float | None = None,
        after_bytes: int | None = None,
    ) -> None:
        self.upstream = upstream
        self.after_seconds = after_seconds
        self.after_bytes = after_bytes
        self.cuts: list[Cut] = []
        self.port = 0
        self.url = ""
        self._listener: socket.socket | None = None
        self._group: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> FlakyLink:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setblocking(False)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self._accept, listener, self._group)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._group is not None and self._listener is not None
        self._group.cancel_scope.cancel()
        await self._group.__aexit__(None, None, None)
        self._listener.close()

    async def _accept(self, listener: socket.socket, group: anyio.abc.TaskGroup) -> None:
        while True:
            await anyio.wait_readable(listener)
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                continue
            client.setblocking(False)
            group.start_soon(self._carry, client)

    async def _carry(self, client: socket.socket) -> None:
        """One connection: carried both ways until a side ends it or the link cuts it."""
        started = time.monotonic()
        tally = _Tally()
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            try:
                await _connect(upstream, self.upstream)
            except OSError:
                tally.reason = "refused"
                return
            with anyio.move_on_after(self.after_seconds) as timer:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._pump, client, upstream, tally, True, group.cancel_scope)
                    group.start_soon(self._pump, upstream, client, tally, False, group.cancel_scope)
            if timer.cancelled_caught:
                tally.reason = "time"
        finally:
            for sock in (client, upstream):
                if tally.reason in ("bytes", "time", "refused"):
                    _reset_on_close(sock)
                sock.close()
            elapsed = time.monotonic() - started
            self.cuts.append(Cut(tally.uploaded, tally.downloaded, elapsed, tally.reason))

    async def _pump(
        self,
        source: socket.socket,
        target: socket.socket,
        tally: _Tally,
        upload: bool,
        scope: anyio.CancelScope,
    ) -> None:
        """One direction; passes an end of stream on, ends the connection on a reset."""
        try:
            while True:
                size = READ_SIZE
                if upload and self.after_bytes is not None:
                    size = min(size, self.after_bytes - tally.uploaded)
                    if size <= 0:
                        tally.reason = "bytes"
                        scope.cancel()
                        return
                data = await _receive(source, size)
                if not data:
                    target.shutdown(socket.SHUT_WR)
                    return
                await _send_all(target, data)
                if upload:
                    tally.uploaded += len(data)
                else:
                    tally.downloaded += len(data)
        except OSError:
            scope.cancel()


@contextmanager
def flaky_link_in_thread(upstream: Address, **options: Any) -> Iterator[FlakyLink]:
    """A `FlakyLink` on an event loop in a background thread, for synchronous code."""
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(FlakyLink(upstream, **options)) as link,
    ):
        yield link


def _reset_on_close(sock: socket.socket) -> None:
    """Linger 0: close() sends a reset, as a dropped link looks to both ends."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _connect(sock: socket.socket, address: Address) -> None:
    error = sock.connect_ex(address)
    if error == errno.EINPROGRESS:
        await anyio.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


async def _receive(sock: socket.socket, size: int) -> bytes:
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            await anyio.wait_readable(sock)


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await anyio.wait_writable(sock)
