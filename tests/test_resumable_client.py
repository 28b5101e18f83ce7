"""The draft's client (`support/resumable_client.py`) alone, against a fake server.

The fake is the service's side of the contract in miniature: an h11 server on loopback that
answers the creation with a 104, keeps what each connection delivered, and serves HEAD,
PATCH and DELETE on the upload.  It records every request and each piece of body it
received (where it was written, by which method), so a test can tell a byte sent twice or
out of order.  The real service is tested with this client in `test_resumable_uploads.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import h11
import pytest

from .support.resumable_client import (
    Attempt,
    ResumableUploader,
    append,
    cancel,
    create,
    offset,
)

pytestmark = pytest.mark.anyio

AUDIO = random.Random(7).randbytes(300_000)
"""Not periodic: a piece written at the wrong offset cannot match by chance."""
WINDOW = "/v1/transcriptions?fromTime=0&toTime=60"
AUTH = {"Authorization": "Bearer secret", "Content-Type": "audio/wav"}
ENDED = (anyio.BrokenResourceError, anyio.EndOfStream, h11.RemoteProtocolError)


@dataclass
class Upload:
    version: int
    data: bytearray = field(default_factory=bytearray)
    pieces: list[tuple[str, int, bytes]] = field(default_factory=list)
    """(method, offset, bytes) of each piece of body, as it arrived."""
    complete: bool = False
    expired: bool = False
    busy: anyio.Lock = field(default_factory=anyio.Lock)
    """Held by the request writing to it: a HEAD waits for a dropped one to be over."""

    def assert_every_byte_once_in_order(self, expected: bytes) -> None:
        position = 0
        for method, at, piece in self.pieces:
            assert at == position, (method, at, position)
            position += len(piece)
        assert bytes(self.data) == expected


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    ended: str = ""
    """How its body ended: `complete`, `reset` (an RST), `closed` (a FIN mid-body)."""


class FakeService:
    """The server's side of the contract, enough to test the client on its own.

    `relative`: the 104 gives a path, not a URL; `stale_heads`: so many HEADs understate the
    offset by 1000 (as if bytes arrived after the answer), so the PATCH that follows gets a
    409; `refuse`: answer the creation with this status and no 104; `drop_heads`: so many
    HEADs have their connection closed unanswered; `expire`: an upload whose connection
    dropped is gone at once (a grace of zero), 410.
    """

    def __init__(
        self,
        *,
        relative: bool = False,
        stale_heads: int = 0,
        refuse: int | None = None,
        drop_heads: int = 0,
        expire: bool = False,
    ) -> None:
        self.relative = relative
        self.stale_heads = stale_heads
        self.refuse = refuse
        self.drop_heads = drop_heads
        self.expire = expire
        self.base = ""
        self.uploads: dict[str, Upload] = {}
        self.seen: list[Seen] = []

    def upload(self, location: str) -> Upload:
        return self.uploads[location.removeprefix(self.base)]

    def methods(self) -> list[str]:
        return [seen.method for seen in self.seen]

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        async with stream:
            with contextlib.suppress(*ENDED):
                request = await next_event(stream, connection)
                if isinstance(request, h11.Request):
                    seen = Seen(
                        request.method.decode(), request.target.decode(), fields(request.headers)
                    )
                    self.seen.append(seen)
                    await self.dispatch(stream, connection, seen)

    async def dispatch(
        self, stream: anyio.abc.SocketStream, connection: h11.Connection, seen: Seen
    ) -> None:
        path = seen.target.split("?")[0]
        version = int(seen.headers.get("upload-draft-interop-version", "0"))
        upload = self.uploads.get(path)

        async def answer(status: int, headers: dict[str, str], payload: Any = None) -> None:
            await respond(stream, connection, seen.method, status, headers, payload)

        if seen.method == "POST" and path == "/v1/transcriptions":
            if self.refuse:
                await answer(self.refuse, {}, {"code": "refused"})
                return
            path = f"/v1/uploads/local/{secrets.token_urlsafe(12)}"
            upload = self.uploads[path] = Upload(version)
            async with upload.busy:
                location = path if self.relative else self.base + path
                interim = [("Location", location), ("Upload-Draft-Interop-Version", str(version))]
                await stream.send(
                    connection.send(h11.InformationalResponse(status_code=104, headers=interim))
                )
                if not await receive(stream, connection, seen, upload):
                    upload.expired = self.expire
                elif wants_complete(seen):
                    await self.finish(stream, connection, seen, upload, path)
        elif upload is None:
            await answer(404, {}, {"code": "upload_not_found"})
        elif upload.expired:
            await answer(410, {}, {"code": "upload_expired"})
        elif seen.method == "HEAD":
            if self.drop_heads:
                self.drop_heads -= 1
                return
            async with upload.busy:
                at = len(upload.data)
                if self.stale_heads:
                    self.stale_heads -= 1
                    at = max(0, at - 1000)
                progress = progress_fields(version, upload.complete)
                await answer(
                    204, {"Upload-Offset": str(at), **progress, "Cache-Control": "no-store"}
                )
        elif seen.method == "PATCH":
            async with upload.busy:
                if int(seen.headers.get("upload-offset", "-1")) != len(upload.data):
                    await answer(
                        409,
                        {"Upload-Offset": str(len(upload.data))},
                        {"code": "upload_offset_mismatch"},
                    )
                    await drain(stream, connection)
                elif await receive(stream, connection, seen, upload):
                    if wants_complete(seen):
                        await self.finish(stream, connection, seen, upload, path)
                    else:
                        progress = progress_fields(version, False)
                        await answer(204, {"Upload-Offset": str(len(upload.data)), **progress})
        elif seen.method == "DELETE":
            del self.uploads[path]
            await answer(204, {})

    async def finish(
        self,
        stream: anyio.abc.SocketStream,
        connection: h11.Connection,
        seen: Seen,
        upload: Upload,
        path: str,
    ) -> None:
        """The endpoint's own answer, with the draft's fields."""
        upload.complete = True
        headers = {
            "Location": self.base + path,
            "Upload-Offset": str(len(upload.data)),
            **progress_fields(upload.version, True),
        }
        payload = {"bytes": len(upload.data), "sha256": hashlib.sha256(upload.data).hexdigest()}
        await respond(stream, connection, seen.method, 200, headers, payload)


async def next_event(stream: anyio.abc.SocketStream, connection: h11.Connection) -> Any:
    while (event := connection.next_event()) is h11.NEED_DATA:
        try:
            connection.receive_data(await stream.receive())
        except anyio.EndOfStream:
            connection.receive_data(b"")
    return event


async def drain(stream: anyio.abc.SocketStream, connection: h11.Connection) -> None:
    """Read a refused body to its end: closing with it unread would reset the answer."""
    with anyio.move_on_after(2):
        while not isinstance(await next_event(stream, connection), h11.EndOfMessage):
            pass


async def receive(
    stream: anyio.abc.SocketStream, connection: h11.Connection, seen: Seen, upload: Upload
) -> bool:
    """Append the request's body to the upload as it comes: True if it all came."""
    try:
        while True:
            event = await next_event(stream, connection)
            if isinstance(event, h11.Data):
                upload.pieces.append((seen.method, len(upload.data), bytes(event.data)))
                upload.data += event.data
            elif isinstance(event, h11.EndOfMessage):
                seen.ended = "complete"
                return True
    except anyio.BrokenResourceError:
        seen.ended = "reset"
    except h11.RemoteProtocolError:
        seen.ended = "closed"
    return False


async def respond(
    stream: anyio.abc.SocketStream,
    connection: h11.Connection,
    method: str,
    status: int,
    headers: dict[str, str],
    payload: Any = None,
) -> None:
    body = b"" if payload is None or method == "HEAD" else json.dumps(payload).encode()
    if body:
        headers = {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}
    await stream.send(connection.send(h11.Response(status_code=status, headers=[*headers.items()])))
    if body:
        await stream.send(connection.send(h11.Data(data=body)))
    await stream.send(connection.send(h11.EndOfMessage()))


def fields(raw: Any) -> dict[str, str]:
    return {name.decode().lower(): value.decode() for name, value in raw}


def wants_complete(seen: Seen) -> bool:
    if "upload-complete" in seen.headers:
        return seen.headers["upload-complete"] == "?1"
    return seen.headers.get("upload-incomplete") == "?0"


def progress_fields(version: int, complete: bool) -> dict[str, str]:
    if version >= 5:
        return {"Upload-Complete": "?1" if complete else "?0"}
    return {"Upload-Incomplete": "?0" if complete else "?1"}


@asynccontextmanager
async def serving(fake: FakeService) -> AsyncIterator[str]:
    """The fake on a free loopback port: its base URL, for at most 10 s."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    fake.base = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, fake.handle)
        with anyio.fail_after(10):
            yield fake.base
        group.cancel_scope.cancel()


def steps(uploader: ResumableUploader) -> list[tuple[str, int | None]]:
    return [(step.method, step.status) for step in uploader.requests]


def assert_transcribed(final: Attempt) -> None:
    assert final.status == 200, final
    assert not final.cut
    assert final.json() == {"bytes": len(AUDIO), "sha256": hashlib.sha256(AUDIO).hexdigest()}


async def test_a_whole_upload_gets_a_104_and_the_endpoints_answer() -> None:
    fake = FakeService()
    async with serving(fake) as base:
        attempt = await create(f"{base}{WINDOW}", AUDIO, headers=AUTH)
    assert_transcribed(attempt)
    assert attempt.sent == len(AUDIO)
    assert attempt.location is not None
    assert attempt.location.startswith(f"{base}/v1/uploads/local/")
    assert attempt.headers["location"] == attempt.location
    assert attempt.headers["upload-offset"] == str(len(AUDIO))
    assert attempt.headers["upload-complete"] == "?1"
    (post,) = fake.seen
    assert post.target == WINDOW
    assert post.headers["transfer-encoding"] == "chunked"
    assert post.headers["upload-draft-interop-version"] == "6"
    assert post.headers["upload-complete"] == "?1"
    assert "upload-incomplete" not in post.headers
    assert post.headers["authorization"] == "Bearer secret"
    assert post.headers["content-type"] == "audio/wav"
    fake.upload(attempt.location).assert_every_byte_once_in_order(AUDIO)


async def test_a_body_given_in_chunks_goes_as_it_is_and_a_cut_falls_inside_one() -> None:
    fake = FakeService()
    chunks = [AUDIO[i : i + 7000] for i in range(0, len(AUDIO), 7000)]
    async with serving(fake) as base:
        whole = await create(f"{base}{WINDOW}", iter(chunks), headers=AUTH)
        cut = await create(f"{base}{WINDOW}", iter(chunks), headers=AUTH, cut_after_bytes=10_000)
    assert_transcribed(whole)
    assert cut.cut and cut.status is None and cut.sent == 10_000
    assert cut.location is not None
    assert fake.upload(cut.location).data == AUDIO[:10_000]


async def test_a_cut_at_half_is_a_reset_and_head_then_patch_sends_the_rest_once() -> None:
    fake = FakeService()
    half = len(AUDIO) // 2
    async with serving(fake) as base:
        cut = await create(f"{base}{WINDOW}", AUDIO, headers=AUTH, cut_after_bytes=half)
        assert cut.cut and cut.status is None and cut.sent == half
        assert cut.location is not None
        where = await offset(cut.location, headers=AUTH, version=6)
        assert (where.status, where.complete) == (204, False)
        assert 0 < where.offset <= half
        assert where.headers["cache-control"] == "no-store"
        done = await append(cut.location, AUDIO[where.offset :], where.offset, headers=AUTH)
    assert_transcribed(done)
    post, head, patch = fake.seen
    assert post.ended == "reset", "the cut should be an RST, not a clean close"
    assert head.method == "HEAD" and head.headers["authorization"] == "Bearer secret"
    assert patch.headers["upload-offset"] == str(where.offset)
    assert patch.headers["content-length"] == str(len(AUDIO) - where.offset)
    upload = fake.upload(cut.location)
    upload.assert_every_byte_once_in_order(AUDIO)
    assert {method for method, *_ in upload.pieces} == {"POST", "PATCH"}


async def test_the_uploader_resumes_after_a_cut_at_half() -> None:
    fake = FakeService()
    uploader = ResumableUploader(cuts=[0.5])
    async with serving(fake) as base:
        final = await uploader.upload(f"{base}{WINDOW}", AUDIO, headers=AUTH)
    assert_transcribed(final)
    assert steps(uploader) == [("POST", None), ("HEAD", 204), ("PATCH", 200)]
    head, patch = uploader.requests[1:]
    assert 0 < head.offset <= len(AUDIO) // 2 and patch.offset == head.offset
    assert uploader.bytes_sent == len(AUDIO) // 2 + len(AUDIO) - head.offset
    assert final.location is not None
    fake.upload(final.location).assert_every_byte_once_in_order(AUDIO)


async def test_the_uploader_resumes_through_several_drops_and_a_failed_head() -> None:
    fake = FakeService(drop_heads=1)
    uploader = ResumableUploader(cuts=[0.2, 0.5, 0.9], backoff=0.01)
    async with serving(fake) as base:
        final = await uploader.upload(f"{base}{WINDOW}", AUDIO, headers=AUTH)
    assert_transcribed(final)
    assert steps(uploader) == [
        ("POST", None),
        ("HEAD", None),  # its connection closed unanswered: asked again
        ("HEAD", 204),
        ("PATCH", None),
        ("HEAD", 204),
        ("PATCH", None),
        ("HEAD", 204),
        ("PATCH", 200),
    ]
    assert final.location is not None
    fake.upload(final.location).assert_every_byte_once_in_order(AUDIO)


async def test_a_409_makes_the_uploader_read_the_offset_again() -> None:
    fake = FakeService(stale_heads=1)
    uploader = ResumableUploader(cuts=[0.5])
    async with serving(fake) as base:
        final = await uploader.upload(f"{base}{WINDOW}", AUDIO, headers=AUTH)
    assert_transcribed(final)
    assert steps(uploader) == [
        ("POST", None),
        ("HEAD", 204),
        ("PATCH", 409),
        ("HEAD", 204),
        ("PATCH", 200),
    ]
    stale, _, fresh, resumed = uploader.requests[1:]
    assert fresh.offset == stale.offset + 1000 == resumed.offset
    assert final.location is not None
    fake.upload(final.location).assert_every_byte_once_in_order(AUDIO)


async def test_a_wrong_offset_is_refused_with_the_right_one() -> None:
    fake = FakeService()
    async with serving(fake) as base:
        cut = await create(f"{base}{WINDOW}", AUDIO, headers=AUTH, cut_after_bytes=100_000)
        assert cut.location is not None
        where = await offset(cut.location, headers=AUTH)
        wrong = where.offset + 500
        refused = await append(cut.location, AUDIO[wrong:], wrong, headers=AUTH)
    assert refused.status == 409 and not refused.cut
    assert refused.headers["upload-offset"] == str(where.offset)
    assert refused.json() == {"code": "upload_offset_mismatch"}
    assert len(fake.upload(cut.location).data) == where.offset


@pytest.mark.parametrize("version", [3, 5, 6])
async def test_the_draft_fields_of_each_interop_version(version: int) -> None:
    """3 (draft -01, iOS 17) says `Upload-Incomplete`; 5 and 6 (iOS 18) `Upload-Complete`;
    6 types its appends `application/partial-upload`."""
    fake = FakeService()
    async with serving(fake) as base:
        cut = await create(
            f"{base}{WINDOW}", AUDIO, headers=AUTH, version=version, cut_after_bytes=50_000
        )
        assert cut.location is not None
        where = await offset(cut.location, headers=AUTH, version=version)
        assert where.complete is False
        done = await append(
            cut.location, AUDIO[where.offset :], where.offset, headers=AUTH, version=version
        )
    assert_transcribed(done)
    post, _, patch = fake.seen
    for seen in fake.seen:
        assert seen.headers["upload-draft-interop-version"] == str(version)
    if version == 3:
        assert post.headers["upload-incomplete"] == patch.headers["upload-incomplete"] == "?0"
        assert "upload-complete" not in post.headers and "upload-complete" not in patch.headers
        assert where.headers["upload-incomplete"] == "?1"
        assert done.headers["upload-incomplete"] == "?0"
    else:
        assert post.headers["upload-complete"] == patch.headers["upload-complete"] == "?1"
        assert "upload-incomplete" not in post.headers and "upload-incomplete" not in patch.headers
        assert where.headers["upload-complete"] == "?0"
        assert done.headers["upload-complete"] == "?1"
    expected_type = "application/partial-upload" if version >= 6 else None
    assert patch.headers.get("content-type") == expected_type
    assert post.headers["content-type"] == "audio/wav"


@pytest.mark.parametrize("version", [3, 6])
async def test_the_uploader_speaks_the_version_it_is_given(version: int) -> None:
    fake = FakeService()
    uploader = ResumableUploader(cuts=[0.5], version=version)
    async with serving(fake) as base:
        final = await uploader.upload(f"{base}{WINDOW}", AUDIO, headers=AUTH)
    assert_transcribed(final)
    name = "upload-incomplete" if version == 3 else "upload-complete"
    assert [seen.headers.get(name) for seen in fake.seen] == [
        "?0" if version == 3 else "?1",
        None,
        "?0" if version == 3 else "?1",
    ]


async def test_a_relative_location_is_resolved_against_the_request() -> None:
    fake = FakeService(relative=True)
    uploader = ResumableUploader(cuts=[0.5])
    async with serving(fake) as base:
        final = await uploader.upload(f"{base}{WINDOW}", AUDIO, headers=AUTH)
        cut = await create(f"{base}{WINDOW}", AUDIO, headers=AUTH, cut_after_bytes=1000)
    assert_transcribed(final)
    assert steps(uploader) == [("POST", None), ("HEAD", 204), ("PATCH", 200)]
    assert final.location is not None and final.location.startswith(f"{base}/v1/uploads/")
    _, head, patch, _ = fake.seen
    assert head.target == patch.target == final.location.removeprefix(base)
    assert cut.location is not None and cut.location.startswith(f"{base}/v1/uploads/")


async def test_a_refusal_before_the_104_is_the_answer_and_nothing_is_resumed() -> None:
    fake = FakeService(refuse=401)
    uploader = ResumableUploader(cuts=[0.5])
    async with serving(fake) as base:
        final = await uploader.upload(f"{base}{WINDOW}", AUDIO, headers=AUTH)
    assert (final.status, final.location, final.cut) == (401, None, False)
    assert final.json() == {"code": "refused"}
    assert steps(uploader) == [("POST", 401)]


async def test_an_unknown_or_cancelled_upload() -> None:
    fake = FakeService()
    async with serving(fake) as base:
        cut = await create(f"{base}{WINDOW}", AUDIO, headers=AUTH, cut_after_bytes=1000)
        assert cut.location is not None
        assert await cancel(cut.location, headers=AUTH) == 204
        gone = await offset(cut.location, headers=AUTH)
        assert (gone.status, gone.offset, gone.complete) == (404, -1, None)
        late = await append(cut.location, AUDIO[1000:], 1000, headers=AUTH)
        assert late.status == 404 and late.json() == {"code": "upload_not_found"}
        assert await cancel(cut.location, headers=AUTH) == 404
    nobody = await offset(f"{base}/v1/uploads/local/x", headers=AUTH)  # the server is gone
    assert nobody.status == 0


async def test_an_upload_gone_ends_the_uploaders_attempts() -> None:
    """410 (or 404) to the HEAD: the upload cannot be resumed, and the uploader says so."""
    fake = FakeService(expire=True)
    uploader = ResumableUploader(cuts=[0.5])
    async with serving(fake) as base:
        final = await uploader.upload(f"{base}{WINDOW}", AUDIO, headers=AUTH)
    assert final.status == 410 and not final.cut
    assert steps(uploader) == [("POST", None), ("HEAD", 410)]
