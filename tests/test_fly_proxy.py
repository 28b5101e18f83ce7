"""The Fly.io stand-in (`support/fly_proxy`) and the flaky link (`support/flaky_link`).

Machines here are tiny h11 servers that answer as each test decides and record what they
saw; the big bodies go to a real uvicorn + Starlette app, the server the service runs on.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType

import anyio
import anyio.abc
import anyio.from_thread
import h11
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .support.flaky_link import FlakyLink
from .support.fly_proxy import REPLAY_BODY_LIMIT, FlyProxy, Hop, fly_proxy_in_thread
from .support.server import free_port

MiB = 1024 * 1024
BLOCK = bytes(range(256)) * 256
BLOCKS = 480
"""30 MiB in 64 KiB blocks: far over the replay limit."""


@dataclass
class Seen:
    """A request as a machine saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    complete: bool = False
    """The whole body arrived (False: the connection ended first, or it was not read)."""
    finished: bool = False
    """The machine is done with it."""


@dataclass
class Reply:
    """How a machine answers: 1xx responses on the request's head, the final one once the
    body is in."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    """None: `<machine> <method> <path> <body size>`, so tests can tell who answered."""
    interim: Sequence[tuple[int, Mapping[str, str]]] = ()
    early: bool = False
    """Answer on the head, without reading the body."""


Decide = Callable[[Seen], Reply]


class Machine:
    """A backend on loopback, raw h11: answers as `decide` says, records every request."""

    def __init__(self, name: str, decide: Decide = lambda seen: Reply()) -> None:
        self.name = name
        self.decide = decide
        self.seen: list[Seen] = []
        self.address = ("127.0.0.1", 0)
        self._group: anyio.abc.TaskGroup | None = None

    @property
    def paths(self) -> list[str]:
        return [seen.path for seen in self.seen]

    async def __aenter__(self) -> Machine:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.address = ("127.0.0.1", listener.extra(anyio.abc.SocketAttribute.local_port))
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(listener.serve, self._serve)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._group is not None
        self._group.cancel_scope.cancel()
        await self._group.__aexit__(None, None, None)

    async def _serve(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            try:
                request = await _next_event(conn, stream)
                if isinstance(request, h11.Request):
                    await self._answer(conn, stream, request)
            except (h11.RemoteProtocolError, anyio.BrokenResourceError):
                pass  # the proxy went away: `Seen.complete` stays False

    async def _answer(
        self, conn: h11.Connection, stream: anyio.abc.SocketStream, request: h11.Request
    ) -> None:
        headers = {name.decode(): value.decode() for name, value in request.headers}
        seen = Seen(request.method.decode(), request.target.decode(), headers)
        self.seen.append(seen)
        try:
            reply = self.decide(seen)
            for status, interim_headers in reply.interim:
                interim = h11.InformationalResponse(
                    status_code=status, headers=list(interim_headers.items())
                )
                await stream.send(conn.send(interim) or b"")
            while not reply.early and not seen.complete:
                event = await _next_event(conn, stream)
                if isinstance(event, h11.Data):
                    seen.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    seen.complete = True
                else:
                    return
            body = reply.body
            if body is None:
                body = f"{self.name} {seen.method} {seen.path} {len(seen.body)}".encode()
            response_headers = [*reply.headers.items(), ("content-length", str(len(body)))]
            response = h11.Response(status_code=reply.status, headers=response_headers)
            await stream.send(conn.send(response) or b"")
            if seen.method != "HEAD":
                await stream.send(conn.send(h11.Data(data=body)) or b"")
            await stream.send(conn.send(h11.EndOfMessage()) or b"")
        finally:
            seen.finished = True


async def _next_event(conn: h11.Connection, stream: anyio.abc.SocketStream) -> object:
    while (event := conn.next_event()) is h11.NEED_DATA:
        try:
            conn.receive_data(await stream.receive())
        except anyio.EndOfStream:
            conn.receive_data(b"")
    return event


def stopped() -> tuple[str, int]:
    """The address of a machine that is down: nothing listens there."""
    return ("127.0.0.1", free_port())


def routes(proxy: FlyProxy) -> list[tuple[str | None, str | None, int | None]]:
    """(machine, replayed from, status) of each hop: the path a request took."""
    return [(hop.machine, hop.replayed_from, hop.status) for hop in proxy.log]


async def eventually(check: Callable[[], object], seconds: float = 5.0) -> None:
    """Wait for what other tasks record (lists, flags): polled, as they set no event."""
    with anyio.fail_after(seconds):
        while not check():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def replays_unless_replayed(header: str, **extra: str) -> Decide:
    """A machine that asks for a replay, but answers requests that are replays (or fell back)."""

    def decide(seen: Seen) -> Reply:
        if "fly-replay-src" in seen.headers or "fly-replay-failed" in seen.headers:
            return Reply()
        return Reply(status=202, headers={"fly-replay": header, **extra})

    return decide


# Routing new requests


def test_round_robin_and_route_next_from_a_synchronous_test() -> None:
    """New requests take turns; `route_next` names the machine for the next one."""
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(Machine("m1")) as m1,
        portal.wrap_async_context_manager(Machine("m2")) as m2,
        fly_proxy_in_thread({"m1": m1.address, "m2": m2.address}) as proxy,
        httpx.Client(base_url=proxy.url) as client,
    ):
        answers = [client.get(f"/r{n}").text for n in range(4)]
        assert answers == ["m1 GET /r0 0", "m2 GET /r1 0", "m1 GET /r2 0", "m2 GET /r3 0"]
        proxy.route_next("m2")
        proxy.route_next("m2")
        assert [client.get("/forced").text[:2] for _ in range(3)] == ["m2", "m2", "m1"]
        assert proxy.log[4] == Hop("GET", "/forced", "m2", 200, note="route_next")
        assert proxy.errors == []


@pytest.mark.anyio
async def test_a_stopped_machine_is_skipped() -> None:
    """A machine that refuses gets no requests; one forced there gets the client a 502."""
    async with (
        Machine("m1") as m1,
        FlyProxy({"m1": m1.address, "down": stopped()}) as proxy,
        httpx.AsyncClient(base_url=proxy.url) as client,
    ):
        assert [(await client.get("/")).text[:2] for _ in range(3)] == ["m1"] * 3
        proxy.route_next("down")
        answer = await client.get("/")
        assert answer.status_code == 502 and "refused" in answer.text


# fly-replay


@pytest.mark.anyio
async def test_replay_to_an_instance() -> None:
    """The request goes again, body and headers, to the machine named; the client only sees
    that machine's answer, and the machine learns where it came from."""
    async with (
        Machine("m1", replays_unless_replayed("instance=m2;state=upload-7")) as m1,
        Machine("m2") as m2,
        FlyProxy({"m1": m1.address, "m2": m2.address}) as proxy,
        httpx.AsyncClient(base_url=proxy.url) as client,
    ):
        answer = await client.post("/v1/x?q=1", content=b"hello", headers={"x-test": "kept"})
        assert (answer.status_code, answer.text) == (200, "m2 POST /v1/x?q=1 5")
        assert "fly-replay" not in answer.headers
        replayed = m2.seen[0]
        assert (replayed.body, replayed.headers["x-test"]) == (b"hello", "kept")
        src = re.fullmatch(
            r"instance=m1;region=local;t=(\d+);state=upload-7", replayed.headers["fly-replay-src"]
        )
        assert src is not None and abs(int(src[1]) / 1e6 - time.time()) < 60
        assert routes(proxy) == [("m1", None, 202), ("m2", "m1", 200)]
        assert proxy.log[0].replay == "instance=m2;state=upload-7"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("header", "landed"),
    [
        ("prefer_instance=gone", {"m1", "m2"}),
        ("prefer_instance=m3;elsewhere=true", {"m2"}),
        ("prefer_instance=m2", {"m2"}),
    ],
)
async def test_prefer_instance(header: str, landed: set[str]) -> None:
    """The preferred machine if it is up; when missing or stopped, any other machine."""
    async with (
        Machine("m1", replays_unless_replayed(header)) as m1,
        Machine("m2") as m2,
        FlyProxy({"m1": m1.address, "m2": m2.address, "m3": stopped()}) as proxy,
        httpx.AsyncClient(base_url=proxy.url) as client,
    ):
        proxy.route_next("m1")
        answer = await client.post("/", content=b"body")
        assert answer.status_code == 200 and answer.text[:2] in landed
        assert routes(proxy) == [("m1", None, 202), (answer.text[:2], "m1", 200)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "header",
    ["instance=m3;fallback=force_self;timeout=2s", "instance=gone;fallback=prefer_self"],
)
async def test_fallback_returns_to_the_origin(header: str) -> None:
    """A replay that cannot reach its target goes back to the machine that asked for it,
    which is told why in `fly-replay-failed`."""
    async with (
        Machine("m1", replays_unless_replayed(header)) as m1,
        Machine("m2") as m2,
        FlyProxy({"m1": m1.address, "m2": m2.address, "m3": stopped()}) as proxy,
        httpx.AsyncClient(base_url=proxy.url) as client,
    ):
        proxy.route_next("m1")
        answer = await client.post("/", content=b"body")
        assert (answer.status_code, answer.text) == (200, "m1 POST / 4")
        assert [seen.body for seen in m1.seen] == [b"body", b"body"]
        failed = m1.seen[1].headers["fly-replay-failed"]
        assert "m3 refused" in failed or "no machine gone" in failed
        assert routes(proxy) == [("m1", None, 202), ("m1", "m1", 200)]
        assert proxy.log[1].note.startswith("fallback: ")
        assert m2.seen == []


@pytest.mark.anyio
async def test_without_fallback_an_unreachable_target_is_a_502() -> None:
    """Fly's curt 5xx: the machine asked for a target that is down and gave no fallback."""
    async with (
        Machine("m1", replays_unless_replayed("instance=m3")) as m1,
        FlyProxy({"m1": m1.address, "m3": stopped()}) as proxy,
        httpx.AsyncClient(base_url=proxy.url) as client,
    ):
        proxy.route_next("m1")
        answer = await client.get("/")
        assert answer.status_code == 502 and "replay failed" in answer.text
        assert routes(proxy) == [("m1", None, 202), (None, None, 502)]


@pytest.mark.anyio
async def test_a_request_that_fell_back_is_not_replayed_again() -> None:
    """Fly: once a replayed request has hit its fallback, it cannot be replayed again."""

    def always_replays(seen: Seen) -> Reply:
        return Reply(status=202, headers={"fly-replay": "instance=m3;fallback=force_self"})

    async with (
        Machine("m1", always_replays) as m1,
        FlyProxy({"m1": m1.address, "m3": stopped()}) as proxy,
        httpx.AsyncClient(base_url=proxy.url) as client,
    ):
        answer = await client.get("/")
        assert answer.status_code == 502 and "fell back" in answer.text
        assert routes(proxy) == [("m1", None, 202), ("m1", "m1", 202), (None, None, 502)]


@pytest.mark.anyio
@pytest.mark.parametrize("early", [False, True], ids=["after-body", "on-head"])
@pytest.mark.parametrize("size", [REPLAY_BODY_LIMIT, REPLAY_BODY_LIMIT + 1], ids=["1MiB", "over"])
async def test_only_bodies_up_to_1_mib_are_replayed(size: int, early: bool) -> None:
    """Fly cannot replay requests over 1 MB: the client gets a 502 instead, whether the
    machine asked once it had the body or on the request's head."""

    def decide(seen: Seen) -> Reply:
        reply = replays_unless_replayed("instance=m2")(seen)
        reply.early = early
        return reply

    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    async with (
        Machine("m1", decide) as m1,
        Machine("m2") as m2,
        FlyProxy({"m1": m1.address, "m2": m2.address}) as proxy,
        httpx.AsyncClient(base_url=proxy.url) as client,
    ):
        proxy.route_next("m1")
        answer = await client.post("/upload", content=body)
        if size <= REPLAY_BODY_LIMIT:
            assert (answer.status_code, answer.text) == (200, f"m2 POST /upload {size}")
            assert m2.seen[0].body == body
        else:
            assert answer.status_code == 502 and "over 1 MiB" in answer.text
            assert m2.seen == []
        assert proxy.errors == []


# Streaming


@asynccontextmanager
async def uvicorn_machine(app: Starlette) -> AsyncIterator[tuple[str, int]]:
    """A real uvicorn on loopback, on this event loop: the server the service runs on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve, [sock])
        await eventually(lambda: server.started)
        try:
            yield sock.getsockname()
        finally:
            server.should_exit = True


async def digest(request: Request) -> JSONResponse:
    """The body's size and SHA-256, read as it streams in."""
    hasher, size = hashlib.sha256(), 0
    async for piece in request.stream():
        hasher.update(piece)
        size += len(piece)
    framing = request.headers.get("transfer-encoding")
    return JSONResponse({"size": size, "sha256": hasher.hexdigest(), "framing": framing})


def numbered_blocks() -> Iterator[bytes]:
    """`BLOCKS` blocks, each numbered, so that a lost, repeated or reordered one shows."""
    for n in range(BLOCKS):
        yield n.to_bytes(4, "big") + BLOCK[4:]


async def numbered_blocks_async() -> AsyncIterator[bytes]:
    for block in numbered_blocks():
        yield block


def sha256_of_blocks() -> str:
    hasher = hashlib.sha256()
    for block in numbered_blocks():
        hasher.update(block)
    return hasher.hexdigest()


async def download(request: Request) -> StreamingResponse:
    return StreamingResponse(numbered_blocks_async(), media_type="application/octet-stream")


BIG_BODIES = Starlette(
    routes=[Route("/digest", digest, methods=["POST"]), Route("/download", download)]
)


async def peak_memory(work: Awaitable[None]) -> int:
    """The most memory Python held while `work` ran (client, proxy and server alike)."""
    tracemalloc.start()
    try:
        await work
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.anyio
async def test_a_30_mb_chunked_upload_streams_through() -> None:
    """A body far over the replay limit goes through to uvicorn, chunked, byte for byte,
    and no one holds much more than the MiB kept for a replay."""
    async with (
        uvicorn_machine(BIG_BODIES) as address,
        FlyProxy({"m1": address}) as proxy,
        httpx.AsyncClient(base_url=proxy.url, timeout=60) as client,
    ):
        answers: list[httpx.Response] = []

        async def upload() -> None:
            answers.append(await client.post("/digest", content=numbered_blocks_async()))

        assert await peak_memory(upload()) < 8 * MiB
        expected = {"size": BLOCKS * len(BLOCK), "sha256": sha256_of_blocks(), "framing": "chunked"}
        assert answers[0].json() == expected
        assert routes(proxy) == [("m1", None, 200)]
        assert proxy.errors == []


@pytest.mark.anyio
async def test_a_30_mb_answer_streams_back() -> None:
    """Answers are relayed as they come (chunked here), never held whole."""
    async with (
        uvicorn_machine(BIG_BODIES) as address,
        FlyProxy({"m1": address}) as proxy,
        httpx.AsyncClient(base_url=proxy.url, timeout=60) as client,
    ):
        hasher = hashlib.sha256()

        async def read() -> None:
            async with client.stream("GET", "/download") as answer:
                assert answer.headers["transfer-encoding"] == "chunked"
                async for piece in answer.aiter_raw():
                    hasher.update(piece)

        assert await peak_memory(read()) < 8 * MiB
        assert hasher.hexdigest() == sha256_of_blocks()
        assert proxy.errors == []


@pytest.mark.anyio
async def test_interim_104_is_forwarded_while_the_upload_goes_on() -> None:
    """A 104 reaches the client as the machine sends it, before the body is even all there
    (as a resumable upload's server answers), and the final answer follows."""
    upload_url = {"location": "/uploads/7", "upload-draft-interop-version": "6"}
    async with (
        Machine("m1", lambda seen: Reply(interim=[(104, upload_url)])) as m1,
        FlyProxy({"m1": m1.address}) as proxy,
        await anyio.connect_tcp("127.0.0.1", proxy.port) as raw,
    ):
        await raw.send(b"POST /uploads HTTP/1.1\r\nhost: fly.test\r\ncontent-length: 5\r\n\r\n")
        await raw.send(b"hel")
        received = b""
        with anyio.fail_after(5):
            while b"\r\n\r\n" not in received:
                received += await raw.receive()
        lines = received.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 104 " and b"location: /uploads/7" in lines
        await raw.send(b"lo")
        with anyio.fail_after(5):
            while not received.endswith(b"m1 POST /uploads 5"):
                received += await raw.receive()
        assert b"\r\n\r\nHTTP/1.1 200 " in received
        assert routes(proxy) == [("m1", None, 200)]


@pytest.mark.anyio
async def test_a_client_that_goes_away_mid_upload_closes_the_machine_connection() -> None:
    """The machine must see the phone's upload end, as it would without the proxy."""
    async with (
        Machine("m1") as m1,
        FlyProxy({"m1": m1.address}) as proxy,
    ):
        async with await anyio.connect_tcp("127.0.0.1", proxy.port) as raw:
            await raw.send(
                b"PUT /big HTTP/1.1\r\nhost: fly.test\r\ncontent-length: 10000000\r\n\r\n"
            )
            await raw.send(b"x" * 100_000)
            await eventually(lambda: m1.seen and len(m1.seen[0].body) == 100_000)
        await eventually(lambda: m1.seen[0].finished)
        assert not m1.seen[0].complete
        await eventually(lambda: proxy.log)
        assert proxy.log == [Hop("PUT", "/big", "m1", None, note="client disconnected")]


# The replay cache


@pytest.mark.anyio
async def test_replay_cache_goes_straight_to_the_target() -> None:
    """Once m1 caches its replay, matching requests skip it until the TTL ends or the
    target invalidates the entry."""
    now = [1000.0]
    cache = {"fly-replay-cache": "127.0.0.1/files/*", "fly-replay-cache-ttl-secs": "30"}

    def m1_decides(seen: Seen) -> Reply:
        if seen.path.startswith("/files/") and "fly-replay-src" not in seen.headers:
            return Reply(status=202, headers={"fly-replay": "instance=m2", **cache})
        return Reply()

    def m2_decides(seen: Seen) -> Reply:
        if seen.path == "/files/moved":
            invalidate = {"fly-replay": "instance=m1", "fly-replay-cache": "invalidate"}
            return Reply(status=202, headers=invalidate)
        return Reply()

    async with (
        Machine("m1", m1_decides) as m1,
        Machine("m2", m2_decides) as m2,
        FlyProxy(
            {"m1": m1.address, "m2": m2.address},
            picker=lambda candidates: candidates[0],
            clock=lambda: now[0],
        ) as proxy,
        httpx.AsyncClient(base_url=proxy.url) as client,
    ):
        assert (await client.get("/files/a")).text == "m2 GET /files/a 0"
        assert (await client.get("/files/b")).text == "m2 GET /files/b 0"
        assert m1.paths == ["/files/a"]
        assert proxy.log[-1] == Hop("GET", "/files/b", "m2", 200, "m1", note="replay cache")
        assert m2.seen[1].headers["fly-replay-src"].startswith("instance=m1;")
        assert (await client.get("/other")).text == "m1 GET /other 0"

        now[0] += 31  # the entry expires: m1 is asked again
        await client.get("/files/c")
        assert (await client.get("/files/moved")).text.startswith("m1 ")
        await client.get("/files/d")  # invalidated by m2: m1 again
        assert m1.paths == ["/files/a", "/other", "/files/c", "/files/moved", "/files/d"]
        assert m2.paths == ["/files/a", "/files/b", "/files/c", "/files/moved", "/files/d"]


# The flaky link


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("after_bytes", "after_seconds", "reason"), [(100_000, None, "bytes"), (None, 0.2, "time")]
)
async def test_flaky_link_cuts_every_connection(
    after_bytes: int | None, after_seconds: float | None, reason: str
) -> None:
    """Both ends see a reset once the link's limit is reached; exactly `after_bytes` get
    through; the next connection is carried again."""
    received: list[tuple[int, str]] = []

    async def sink(stream: anyio.abc.SocketStream) -> None:
        size, end = 0, "reset"
        async with stream:
            try:
                while True:
                    size += len(await stream.receive())
            except anyio.EndOfStream:
                end = "closed"
            except anyio.BrokenResourceError:
                pass
        received.append((size, end))

    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as group,
    ):
        group.start_soon(listener.serve, sink)
        server = ("127.0.0.1", listener.extra(anyio.abc.SocketAttribute.local_port))
        link = FlakyLink(server, after_bytes=after_bytes, after_seconds=after_seconds)
        async with link:
            async with await anyio.connect_tcp("127.0.0.1", link.port) as client:
                with pytest.raises(anyio.BrokenResourceError):
                    await client.send(b"x" * (1_000_000 if reason == "bytes" else 10))
                    await client.receive()
            async with await anyio.connect_tcp("127.0.0.1", link.port) as client:
                await client.send(b"y" * 10)
            await eventually(lambda: len(received) == 2 and len(link.cuts) == 2)
            group.cancel_scope.cancel()
    uploaded = 100_000 if reason == "bytes" else 10
    assert received == [(uploaded, "reset"), (10, "closed")]
    assert [(cut.uploaded, cut.reason) for cut in link.cuts] == [(uploaded, reason), (10, "closed")]
    if reason == "time":
        assert 0.2 <= link.cuts[0].seconds < 2
