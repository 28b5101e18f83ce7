"""A client of "Resumable Uploads for HTTP" (draft-ietf-httpbis-resumable-upload), written
from the draft's examples and from what Apple's URLSession sends: interop version 3 (draft
-01, iOS 17: `Upload-Incomplete`) and 5 or 6 (iOS 18: `Upload-Complete`, appends typed
`application/partial-upload` from 6 on); and from the current text (-12) for interop 7 and
8: the creation says the whole length (`Upload-Length`), the 104 and `HEAD` give the
server's limits (`Upload-Limit`, a structured dictionary read as the draft says: unknown
keys ignored, a known key with a value that is not an integer voids the field), and
`OPTIONS` asks for them before any upload.

Test scaffolding: it speaks HTTP/1.1 itself with h11 over `anyio.connect_tcp`, because the
resume URL arrives in a `104` interim response that httpx does not show.  It can cut its
own connection after so many body bytes (a reset, as a dropped link gives the server), and
`ResumableUploader` does what URLSession does when a connection drops: ask the offset
(`HEAD`), send the rest (`PATCH`), again and again.  A relative `Location` is resolved
against the request's URL.

Not done: uploads created incomplete (`Upload-Complete: ?0` on the `POST`), progress 104s,
digests, redirects, keep-alive (one connection per request), HTTP/2, TLS.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
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
Body = bytes | Iterable[bytes]
"""A body whole, or in the chunks to send it in."""


@dataclass
class Attempt:
    """One request: the resume URL its 104 gave, and its final answer unless it was cut."""

    location: str | None = None
    """The upload's URL: the 104's `Location` made absolute (an append's: where it went)."""
    limits: dict[str, int] = field(default_factory=dict)
    """The 104's `Upload-Limit` (interop 7 and 8)."""
    interim: dict[str, str] = field(default_factory=dict)
    """The 104's fields, names in lower case."""
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    """The final answer's, names in lower case."""
    body: bytes = b""
    sent: int = 0
    """Body bytes handed to the socket."""
    cut: bool = False
    """The connection was dropped (by us, or by the link) before the final answer."""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class OffsetReply:
    """A `HEAD`'s answer: `status` 0 and `offset` -1 when the request itself failed."""

    status: int
    offset: int
    complete: bool | None
    headers: dict[str, str]
    length: int | None = None
    limits: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One request `ResumableUploader` made, for tests to assert on."""

    method: str
    status: int | None
    offset: int
    """Where the request began (PATCH) or what it was told (HEAD)."""


LIMIT_KEYS = ("max-size", "min-size", "max-append-size", "min-append-size", "max-age")


def parse_limits(raw: str | None) -> dict[str, int]:
    """`Upload-Limit`, a structured-field dictionary of integers: `max-size=1, max-age=60`.
    Unknown keys are ignored; a known key with another type of value voids the field."""
    limits: dict[str, int] = {}
    for member in (raw or "").split(","):
        key, _, value = member.strip().partition("=")
        if key not in LIMIT_KEYS:
            continue
        if not value.isdigit():
            return {}
        limits[key] = int(value)
    return limits


def draft_fields(version: int, *, complete: bool, length: int | None = None) -> dict[str, str]:
    """The draft's fields: interop 3 says it the other way round (`Upload-Incomplete`);
    from 7 on, the whole length goes with them when it is known."""
    if version >= 5:
        fields = {
            "Upload-Draft-Interop-Version": str(version),
            "Upload-Complete": "?1" if complete else "?0",
        }
        if version >= 7 and length is not None:
            fields["Upload-Length"] = str(length)
        return fields
    return {
        "Upload-Draft-Interop-Version": str(version),
        "Upload-Incomplete": "?0" if complete else "?1",
    }


async def create(
    url: str,
    data: Body,
    *,
    headers: Mapping[str, str],
    version: int = 6,
    cut_after_bytes: int | None = None,
    chunk_size: int = CHUNK,
    pace: float | None = None,
) -> Attempt:
    """The upload's creation: the ordinary POST, chunked, with the draft's fields (and the
    whole length, when `data` is whole).

    `pace`: bytes a second, to send as a slow link would.
    """
    length = len(data) if isinstance(data, bytes) else None
    fields = {**headers, **draft_fields(version, complete=True, length=length)}
    return await exchange(
        "POST",
        url,
        fields,
        data,
        cut_after_bytes=cut_after_bytes,
        chunk_size=chunk_size,
        pace=pace,
        interim=True,
    )


async def offset(location: str, *, headers: Mapping[str, str], version: int = 6) -> OffsetReply:
    """`HEAD` on the upload: how far it has come."""
    fields = {**headers, "Upload-Draft-Interop-Version": str(version)}
    reply = await exchange("HEAD", location, fields, None)
    complete: bool | None = None
    if "upload-complete" in reply.headers:
        complete = reply.headers["upload-complete"] == "?1"
    elif "upload-incomplete" in reply.headers:
        complete = reply.headers["upload-incomplete"] == "?0"
    raw = reply.headers.get("upload-offset", "-1")
    length = reply.headers.get("upload-length")
    return OffsetReply(
        reply.status or 0,
        int(raw),
        complete,
        reply.headers,
        length=int(length) if length is not None else None,
        limits=parse_limits(reply.headers.get("upload-limit")),
    )


async def options(url: str, *, headers: Mapping[str, str]) -> Attempt:
    """`OPTIONS` on the resource an upload would go to: does it take resumable uploads
    (`Accept-Patch` naming `application/partial-upload`), and within what limits."""
    attempt = await exchange("OPTIONS", url, headers, None)
    attempt.limits = parse_limits(attempt.headers.get("upload-limit"))
    return attempt


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
    """`PATCH`: the rest of the body from offset `at` (the caller's `Content-Type` is the
    upload's, not the append's, so it is dropped).  The attempt's `location` is the upload's."""
    fields = {
        **{k: v for k, v in headers.items() if k.lower() != "content-type"},
        **draft_fields(version, complete=complete),
        "Upload-Offset": str(at),
    }
    if version >= 6:
        fields["Content-Type"] = "application/partial-upload"
    attempt = await exchange(
        "PATCH", location, fields, rest, cut_after_bytes=cut_after_bytes, pace=pace, chunked=False
    )
    attempt.location = attempt.location or location
    return attempt


async def cancel(location: str, *, headers: Mapping[str, str], version: int = 6) -> int:
    """`DELETE` on the upload: its status, 0 if the request failed."""
    fields = {**headers, "Upload-Draft-Interop-Version": str(version)}
    return (await exchange("DELETE", location, fields, None)).status or 0


async def exchange(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: Body | None,
    *,
    cut_after_bytes: int | None = None,
    chunk_size: int = CHUNK,
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
    if body is not None and not chunked and not isinstance(body, bytes):
        body = b"".join(body)
    if isinstance(body, bytes) and not chunked:
        fields.append(("Content-Length", str(len(body))))
    elif body is not None:
        fields.append(("Transfer-Encoding", "chunked"))
    request = h11.Request(method=method, target=target.raw_path.decode(), headers=fields)
    async with stream:
        answered = anyio.Event()
        try:
            await stream.send(connection.send(request))
            async with anyio.create_task_group() as group:
                group.start_soon(_read, stream, connection, target, attempt, answered)
                # The link may drop mid-body: the reader keeps what came before.
                with contextlib.suppress(*TRANSPORT_ERRORS):
                    await _send_body(
                        stream,
                        connection,
                        None if body is None else _pieces(body, cut_after_bytes, chunk_size),
                        attempt,
                        answered,
                        cut_after_bytes=cut_after_bytes,
                        pace=pace,
                        interim=interim,
                    )
                if attempt.cut:
                    group.cancel_scope.cancel()  # we dropped it: nothing more will come
        except TRANSPORT_ERRORS:
            attempt.cut = True
    if attempt.status is None:
        attempt.cut = True
    return attempt


async def _send_body(
    stream: anyio.abc.SocketStream,
    connection: h11.Connection,
    pieces: Iterator[bytes] | None,
    attempt: Attempt,
    answered: anyio.Event,
    *,
    cut_after_bytes: int | None,
    pace: float | None,
    interim: bool,
) -> None:
    """The body, then its end; or, at the cut, a dropped connection instead of the end."""
    for piece in pieces or ():
        if answered.is_set():
            return  # answered early (an error): the rest is not wanted
        if pace:
            await anyio.sleep(len(piece) / pace)
        await stream.send(connection.send(h11.Data(data=piece)))
        attempt.sent += len(piece)
    if cut_after_bytes is not None and attempt.sent >= cut_after_bytes:
        await _drop(stream, attempt, interim)
    elif not answered.is_set():
        await stream.send(connection.send(h11.EndOfMessage()))


def _pieces(body: Body, cut_after_bytes: int | None, chunk_size: int) -> Iterator[bytes]:
    """The body in chunks (bytes sliced, chunks given as they are), the last one ending
    exactly where the cut is."""
    chunks = (
        (body[i : i + chunk_size] for i in range(0, len(body), chunk_size))
        if isinstance(body, bytes)
        else body
    )
    position = 0
    for chunk in chunks:
        if cut_after_bytes is not None and position + len(chunk) >= cut_after_bytes:
            if cut_after_bytes > position:
                yield chunk[: cut_after_bytes - position]
            return
        if chunk:
            position += len(chunk)
            yield chunk


async def _drop(stream: anyio.abc.SocketStream, attempt: Attempt, interim: bool) -> None:
    """Drop the connection as a lost link does: a reset, once a 104 expected has come.

    With SO_LINGER 0, closing sends an RST and no FIN (anyio's asyncio `aclose` aborts the
    transport): the server reads a reset, not a clean end of the body.
    """
    with anyio.move_on_after(5 if interim else 0):
        while attempt.location is None and attempt.status is None:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    await anyio.sleep(0.05)  # let the server read what was sent
    if attempt.status is not None and not _streams(attempt):
        return  # answered already (an early error): nothing left to cut
    raw: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    attempt.cut = True
    await stream.aclose()


async def _read(
    stream: anyio.abc.SocketStream,
    connection: h11.Connection,
    base: httpx.URL,
    attempt: Attempt,
    answered: anyio.Event,
) -> None:
    """Read the answer into `attempt`: a 104's Location, then the final status and body."""
    body = bytearray()
    while True:
        try:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                try:
                    connection.receive_data(await stream.receive())
                except anyio.EndOfStream:
                    connection.receive_data(b"")
                continue
        except TRANSPORT_ERRORS:  # reset, or closed before the answer ended
            attempt.body = bytes(body)
            return
        if isinstance(event, h11.InformationalResponse):
            fields = _headers(event.headers)
            if event.status_code == 104 and "location" in fields:
                attempt.location = str(base.join(fields["location"]))
                attempt.limits = parse_limits(fields.get("upload-limit"))
                attempt.interim = fields
        elif isinstance(event, h11.Response):
            attempt.status = event.status_code
            attempt.headers = _headers(event.headers)
            if not _streams(attempt):
                answered.set()  # an early error: the rest of the body is not wanted
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            attempt.body = bytes(body)
            if attempt.status is None:
                attempt.cut = True
            return


def _streams(attempt: Attempt) -> bool:
    """An answer of events, which begins while the body is still being sent: the body goes
    on (and a lost link cuts the answer too)."""
    streaming = attempt.headers.get("content-type", "").startswith("text/event-stream")
    return attempt.status == 200 and streaming


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode().lower(): value.decode() for name, value in raw}


class ResumableUploader:
    """What URLSession does for an upload task: on a dropped connection, ask the offset and
    send the rest, until the upload completes or the server says it is gone.

    `cuts`: where, as fractions of the whole body, the test drops the connection (each
    once, in the attempt that crosses it); `pace`: bytes a second, as a slow link sends.
    `attempts` bounds the resumptions; the wait between them grows by `backoff` up to 5x.
    """

    def __init__(
        self,
        *,
        cuts: Iterable[float] = (),
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
        """The final answer (`cut` if the retries ran out, or if the connection dropped
        before a 104 gave a resume URL); an answer to the HEAD other than 204 ends it too."""
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
            if not reply.cut or location is None:
                return reply
            await anyio.sleep(self._backoff * min(tries, 5))
            where = await offset(location, headers=headers, version=self._version)
            self.requests.append(Step("HEAD", where.status or None, where.offset))
            if where.status == 0:
                continue  # the HEAD's own connection failed: ask again
            if where.status != 204:
                return Attempt(location, status=where.status, headers=where.headers)
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
            position = int(self._cuts.pop(0) * total)
            if position > at:
                return position - at
        return None
