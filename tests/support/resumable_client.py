"""A client of "Resumable Uploads for HTTP" (draft-ietf-httpbis-resumable-upload), written
from the draft's examples and from what Apple's URLSession sends: interop version 3 (draft
-01, iOS 17: `Upload-Incomplete`) and 5 or 6 (iOS 18: `Upload-Complete`, appends typed
`application/partial-upload`).

Test scaffolding: it speaks HTTP/1.1 itself with h11 over a plain socket, because the
resume URL arrives in a `104` interim response that httpx does not show.  It can cut its
own connection after so many body bytes (a reset, as a dropped link gives the server), and
`ResumableUploader` does what URLSession does when a connection drops: ask the offset
(`HEAD`), send the rest (`PATCH`), again and again.  Not done: `OPTIONS`, uploads created
incomplete (`Upload-Complete: ?0` on the `POST`), HTTP/2, TLS.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import h11
import httpx

CHUNK = 64 * 1024
TRANSPORT_ERRORS = (
    OSError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    h11.RemoteProtocolError,
)


@dataclass
class Attempt:
    """One request: the resume URL its 104 gave, and its final answer unless it was cut."""

    location: str | None = None
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    sent: int = 0
    """Body bytes handed to the socket."""
    cut: bool = False
    """The connection was dropped (by us, or by the link) before the final answer."""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Offset:
    status: int
    offset: int
    complete: bool | None
    headers: dict[str, str]


@dataclass(frozen=True)
class Step:
    method: str
    status: int | None
    offset: int
    """Where the request began (PATCH) or what it was told (HEAD)."""


def draft_fields(version: int, *, complete: bool) -> dict[str, str]:
    if version >= 5:
        return {
            "Upload-Draft-Interop-Version": str(version),
            "Upload-Complete": "?1" if complete else "?0",
        }
    return {
        "Upload-Draft-Interop-Version": str(version),
        "Upload-Incomplete": "?0" if complete else "?1",
    }


async def create(
    url: str,
    data: bytes,
    *,
    headers: Mapping[str, str],
    version: int = 6,
    cut_after_bytes: int | None = None,
    pace: float | None = None,
) -> Attempt:
    """The upload's creation: the ordinary POST, chunked, with the draft's fields."""
    fields = {**headers, **draft_fields(version, complete=True)}
    return await exchange(
        "POST", url, fields, data, cut_after_bytes=cut_after_bytes, pace=pace, interim=True
    )


async def offset(location: str, *, headers: Mapping[str, str], version: int = 6) -> Offset:
    """`HEAD` on the upload: how far it has come."""
    fields = {**headers, "Upload-Draft-Interop-Version": str(version)}
    reply = await exchange("HEAD", location, fields, None)
    complete: bool | None = None
    if "upload-complete" in reply.headers:
        complete = reply.headers["upload-complete"] == "?1"
    elif "upload-incomplete" in reply.headers:
        complete = reply.headers["upload-incomplete"] == "?0"
    raw = reply.headers.get("upload-offset", "-1")
    return Offset(reply.status or 0, int(raw), complete, reply.headers)


async def append(
    location: str,
    rest: bytes,
    at: int,
    *,
    headers: Mapping[str, str],
    version: int = 6,
    complete: bool = True,
    cut_after_bytes: int | None = None,
    pace: float | None = None,
) -> Attempt:
    """`PATCH`: the rest of the body from offset `at`."""
    fields = {
        **{k: v for k, v in headers.items() if k.lower() != "content-type"},
        **draft_fields(version, complete=complete),
        "Upload-Offset": str(at),
    }
    if version >= 6:
        fields["Content-Type"] = "application/partial-upload"
    return await exchange(
        "PATCH", location, fields, rest, cut_after_bytes=cut_after_bytes, pace=pace, chunked=False
    )


async def cancel(location: str, *, headers: Mapping[str, str], version: int = 6) -> int:
    fields = {**headers, "Upload-Draft-Interop-Version": str(version)}
    return (await exchange("DELETE", location, fields, None)).status or 0


async def exchange(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    cut_after_bytes: int | None = None,
    pace: float | None = None,
    chunked: bool = True,
    interim: bool = False,
) -> Attempt:
    """One request on a connection of its own; a transport failure marks the attempt cut.

    `interim`: a 104 is expected, and a cut waits for it (a resume URL to come back to).
    """
    target = httpx.URL(url)
    attempt = Attempt()
    try:
        stream = await anyio.connect_tcp(target.host, target.port or 80)
    except OSError:
        attempt.cut = True
        return attempt
    connection = h11.Connection(h11.CLIENT)
    fields = [("Host", target.netloc.decode()), *headers.items()]
    if body is not None:
        fields.append(
            ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body)))
        )
    path = target.raw_path.decode()
    async with stream:
        answered = anyio.Event()
        try:
            await stream.send(
                connection.send(h11.Request(method=method, target=path, headers=fields))
            )
            async with anyio.create_task_group() as group:
                group.start_soon(_read, stream, connection, attempt, answered)
                if body is not None:
                    try:
                        await _send_body(
                            stream,
                            connection,
                            body,
                            attempt,
                            answered,
                            cut_after_bytes,
                            pace,
                            interim,
                        )
                    except TRANSPORT_ERRORS:
                        attempt.cut = attempt.status is None  # the link dropped mid-body
                if attempt.cut:
                    group.cancel_scope.cancel()
        except TRANSPORT_ERRORS:
            attempt.cut = True
    if attempt.status is None:
        attempt.cut = True
    return attempt


async def _send_body(
    stream: anyio.abc.SocketStream,
    connection: h11.Connection,
    body: bytes,
    attempt: Attempt,
    answered: anyio.Event,
    cut_after_bytes: int | None,
    pace: float | None,
    interim: bool,
) -> None:
    for piece in _pieces(body, cut_after_bytes):
        if answered.is_set():
            return  # answered early (an error): the rest is not wanted
        if pace:
            await anyio.sleep(len(piece) / pace)
        await stream.send(connection.send(h11.Data(data=piece)))
        attempt.sent += len(piece)
        if cut_after_bytes is not None and attempt.sent >= cut_after_bytes:
            await _drop(stream, attempt, interim)
            return
    await stream.send(connection.send(h11.EndOfMessage()))


def _pieces(body: bytes, cut_after_bytes: int | None) -> Iterator[bytes]:
    """The body in chunks, one of them ending exactly where the cut is."""
    position = 0
    while position < len(body):
        end = min(position + CHUNK, len(body))
        if cut_after_bytes is not None and position < cut_after_bytes < end:
            end = cut_after_bytes
        yield body[position:end]
        position = end


async def _drop(stream: anyio.abc.SocketStream, attempt: Attempt, interim: bool) -> None:
    """Drop the connection as a lost link does: a reset, once a 104 expected has come."""
    with anyio.move_on_after(5 if interim else 0):
        while attempt.location is None and attempt.status is None:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    with anyio.move_on_after(1):
        await anyio.sleep(0.05)  # let the server read what was sent
    raw: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    attempt.cut = True
    await stream.aclose()


async def _read(
    stream: anyio.abc.SocketStream,
    connection: h11.Connection,
    attempt: Attempt,
    answered: anyio.Event,
) -> None:
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                data = b""
            except TRANSPORT_ERRORS:
                return
            connection.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            fields = _headers(event.headers)
            if event.status_code == 104 and "location" in fields:
                attempt.location = fields["location"]
        elif isinstance(event, h11.Response):
            attempt.status = event.status_code
            attempt.headers = _headers(event.headers)
            answered.set()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            attempt.body = bytes(body)
            if attempt.status is None:
                attempt.cut = True
            return


def _headers(raw: Any) -> dict[str, str]:
    return {name.decode().lower(): value.decode() for name, value in raw}


class ResumableUploader:
    """What URLSession does for an upload task: on a dropped connection, ask the offset and
    send the rest, until the upload completes or the server says it is gone.

    `cuts`: where, as fractions of the whole recording, the test drops the connection
    (each once); `pace`: bytes a second, to send as a slow link would.
    """

    def __init__(
        self,
        *,
        cuts: tuple[float, ...] | list[float] = (),
        version: int = 6,
        pace: float | None = None,
        attempts: int = 20,
        backoff: float = 0.1,
    ) -> None:
        self._cuts = sorted(cuts)
        self._version = version
        self._pace = pace
        self._attempts = attempts
        self._backoff = backoff
        self.requests: list[Step] = []
        self.bytes_sent = 0
        """Body bytes sent, over every request: what resuming costs the phone's data plan."""

    async def upload(self, url: str, data: bytes, *, headers: Mapping[str, str]) -> Attempt:
        reply = await create(
            url,
            data,
            headers=headers,
            version=self._version,
            cut_after_bytes=self._cut_after(0, len(data)),
            pace=self._pace,
        )
        self.requests.append(Step("POST", reply.status, 0))
        self.bytes_sent += reply.sent
        location = reply.location
        for tries in range(self._attempts):
            if not reply.cut:
                return reply
            if location is None:
                return reply  # dropped before the 104: nothing to resume
            await anyio.sleep(self._backoff * min(tries, 5))
            where = await offset(location, headers=headers, version=self._version)
            self.requests.append(Step("HEAD", where.status, where.offset))
            if where.status != 204:
                return Attempt(location, where.status, where.headers)
            reply = await append(
                location,
                data[where.offset :],
                where.offset,
                headers=headers,
                version=self._version,
                cut_after_bytes=self._cut_after(where.offset, len(data)),
                pace=self._pace,
            )
            self.requests.append(Step("PATCH", reply.status, where.offset))
            self.bytes_sent += reply.sent
            if reply.status == 409:
                reply.cut = True  # the offset moved: ask again
        return reply

    def _cut_after(self, at: int, total: int) -> int | None:
        """Bytes of this request after which the next planned cut falls, if any."""
        while self._cuts:
            position = int(self._cuts[0] * total)
            self._cuts.pop(0)
            if position > at:
                return position - at
        return None
