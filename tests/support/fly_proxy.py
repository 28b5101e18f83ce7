"""A stand-in for Fly.io's HTTP proxy on loopback: machines, round-robin and `fly-replay`.

Test scaffolding, not Fly's code: it implements what Fly's "Dynamic Request Routing" page
(fly.io/docs/networking/dynamic-request-routing) says Fly Proxy does, so the service's own
`fly-replay` answers (uploads bound to one machine, 104 interim responses) can be tested.

* Machines are `{machine id: (host, port)}` (`proxy.machines`, changeable between requests).
  A new request goes to the machine `route_next` named, else to a cached replay target, else
  to `picker(candidates)` (round-robin by default); a machine that refuses is skipped.
* An answer carrying `fly-replay` is not passed on: the request (method, target, headers,
  body) is replayed where its fields say: `instance`, `prefer_instance`, `elsewhere`,
  `state`, `timeout`, `fallback` (`force_self` | `prefer_self`). The replay carries
  `fly-replay-src: instance=<origin>;region=local;t=<µs>[;state=<s>]`. A target that does not
  exist or refuses gets the request back to its origin with `fly-replay-failed` when a
  fallback is given (and it is not replayed again), else the client gets a 502.
* Bodies stream through (chunked or Content-Length, any size); only their first MiB is kept
  for a replay. Replaying a larger body (Fly: "requests larger than 1MB cannot be replayed")
  answers 502.
* `fly-replay-cache: <host>/<path>/*` with `fly-replay-cache-ttl-secs: N` (N >= 10) sends
  matching requests straight to the target for N s; `fly-replay-cache: invalidate` from a
  machine forgets the entries that point at it.
* Interim responses (1xx but 100) are forwarded as they come; answers stream back. A client
  that goes away (closing, even half-closing, its side) closes the machine's connection too.

Not modelled: regions and apps (all machines are one app in region `local`; `region` and
`app` fields are ignored), the JSON replay format, keep-alive (one request per connection).

    async with FlyProxy({"m1": ("127.0.0.1", 8001), "m2": ("127.0.0.1", 8002)}) as proxy:
        proxy.route_next("m2")  # the next request goes to m2
        ...                     # requests to proxy.url
        proxy.log               # one `Hop` per answer seen, in order

Synchronous tests use `fly_proxy_in_thread(machines)`, which runs it on a loop of its own.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import h11

Address = tuple[str, int]
Picker = Callable[[Sequence[str]], str]
"""Chooses a machine among candidate ids (never empty) for a request."""
Headers = list[tuple[bytes, bytes]]

REPLAY_BODY_LIMIT = 1024 * 1024
"""The most of a body kept for a replay: Fly cannot replay requests over 1 MB."""
MAX_REPLAYS = 5
"""Replays of one request before the proxy gives up with a 502 (a loop between machines)."""
CACHE_MIN_TTL = 10
"""Fly ignores `fly-replay-cache-ttl-secs` under 10 s."""
READ_SIZE = 64 * 1024
DRAIN_SECONDS = 5.0
"""How long the rest of an upload answered early is read and dropped, so that the client,
still sending, gets to read the answer instead of a reset."""

_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)
_PROXY_REQUEST_HEADERS = frozenset({b"expect", b"fly-replay-src", b"fly-replay-failed"})
"""Request headers the proxy handles or sets itself; a client's copies are dropped."""
_PROXY_RESPONSE_HEADERS = frozenset(
    {b"fly-replay", b"fly-replay-cache", b"fly-replay-cache-ttl-secs"}
)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)")


class RoundRobin:
    """The default picker: each candidate in turn."""

    def __init__(self) -> None:
        self._turn = 0

    def __call__(self, candidates: Sequence[str]) -> str:
        choice = candidates[self._turn % len(candidates)]
        self._turn += 1
        return choice


@dataclass(frozen=True)
class Hop:
    """One answer from a machine to one request, or the proxy's own (`machine` None)."""

    method: str
    path: str
    machine: str | None
    status: int | None
    """The machine's status, also for an answer the client never saw (a `fly-replay`);
    None when the exchange ended before an answer (`note` says why)."""
    replayed_from: str | None = None
    """The machine whose `fly-replay` (or cached replay) sent the request here."""
    replay: str | None = None
    """The `fly-replay` header of this answer."""
    note: str = ""
    """`route_next`, `replay cache`, `fallback: ...`, `client disconnected`, an error."""


@dataclass(frozen=True)
class Replay:
    """A `fly-replay` header's fields, those this proxy acts on."""

    instance: str | None = None
    prefer_instance: str | None = None
    elsewhere: bool = False
    state: str | None = None
    timeout: float | None = None
    fallback: str | None = None

    @classmethod
    def parse(cls, header: str) -> Replay:
        fields: dict[str, str] = {}
        for part in header.split(";"):
            key, _, value = part.partition("=")
            fields[key.strip().lower()] = value.strip().strip('"')
        fallback = fields.get("fallback")
        return cls(
            instance=fields.get("instance") or None,
            prefer_instance=fields.get("prefer_instance") or None,
            elsewhere=fields.get("elsewhere", "").lower() == "true",
            state=fields.get("state"),
            timeout=parse_duration(fields.get("timeout", "")),
            fallback=fallback if fallback in ("force_self", "prefer_self") else None,
        )

    @property
    def targets(self) -> set[str]:
        return {m for m in (self.instance, self.prefer_instance) if m is not None}


def parse_duration(text: str) -> float | None:
    """Seconds in Fly's `10s` / `800ms` / `1m`; None for anything else."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        return None
    return float(match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match[2]]


@dataclass(frozen=True)
class _Cached:
    """A cached replay: requests for `host` under `prefix` go where `replay` says."""

    host: str
    prefix: str
    origin: str
    replay: Replay
    expires: float

    def matches(self, host: str, path: str) -> bool:
        return host == self.host and path.startswith(self.prefix)


class FlyProxy:
    """The proxy: an async context manager listening on a free loopback port."""

    def __init__(
        self,
        machines: Mapping[str, Address],
        *,
        picker: Picker | None = None,
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.machines: dict[str, Address] = dict(machines)
        self.picker: Picker = picker or RoundRobin()
        self.connect_timeout = connect_timeout
        """Seconds to reach a machine, unless a `fly-replay` gives a `timeout`."""
        self.clock = clock
        """Time for the replay cache's TTLs (a test can move it on)."""
        self.log: list[Hop] = []
        self.errors: list[str] = []
        """Exceptions that ended a connection unexpectedly (a bug here, or a broken peer)."""
        self.url = ""
        self.port = 0
        self._forced: deque[str] = deque()
        self._cache: list[_Cached] = []
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._group: anyio.abc.TaskGroup | None = None

    def route_next(self, machine: str) -> None:
        """Send the next new request to `machine` (a 502 if it is missing or stopped).

        It wins over the picker and the replay cache; replays still go where they are told.
        """
        self._forced.append(machine)

    async def __aenter__(self) -> FlyProxy:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self._listener = listener
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.url = f"http://127.0.0.1:{self.port}"
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(listener.serve, self._serve)
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
        await self._listener.aclose()

    async def _serve(self, stream: anyio.abc.SocketStream) -> None:
        """One client connection: one request, answered, then closed."""
        async with stream:
            client = _Peer(stream, h11.SERVER, "client")
            try:
                request = await client.next_event()
            except _Gone:
                return  # not HTTP, or closed mid-head
            if not isinstance(request, h11.Request):
                return
            try:
                await _Exchange(self, client, request).run()
            except Exception as exc:  # one broken exchange must not stop the listener
                self.errors.append(f"{type(exc).__name__}: {exc}")

    # The replay cache

    def _cached_route(self, host: str, path: str) -> _Cached | None:
        now = self.clock()
        self._cache = [entry for entry in self._cache if entry.expires > now]
        return next((entry for entry in self._cache if entry.matches(host, path)), None)

    def _forget(self, entry: _Cached) -> None:
        self._cache = [kept for kept in self._cache if kept is not entry]

    def _update_cache(
        self, headers: Headers, machine: str, replay: Replay | None, host: str, path: str
    ) -> None:
        """Act on an answer's `fly-replay-cache` (and its TTL), if any."""
        pattern = _header(headers, b"fly-replay-cache")
        if pattern is None:
            return
        if pattern.strip().lower() == "invalidate":
            self._cache = [entry for entry in self._cache if machine not in entry.replay.targets]
            return
        ttl = (_header(headers, b"fly-replay-cache-ttl-secs") or "").strip()
        cache_host, slash, rest = pattern.strip().lower().partition("/")
        if replay is None or not ttl.isdigit() or int(ttl) < CACHE_MIN_TTL:
            return
        if not slash or not rest.endswith("*") or ":" in cache_host:
            return
        entry = _Cached(cache_host, "/" + rest[:-1], machine, replay, self.clock() + int(ttl))
        if entry.matches(host, path):
            same = (entry.host, entry.prefix)
            self._cache = [e for e in self._cache if (e.host, e.prefix) != same] + [entry]


@contextmanager
def fly_proxy_in_thread(machines: Mapping[str, Address], **options: Any) -> Iterator[FlyProxy]:
    """A `FlyProxy` on an event loop in a background thread, for synchronous tests."""
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(FlyProxy(machines, **options)) as proxy,
    ):
        yield proxy


class _Unreachable(Exception):
    """No connection could be made to a machine (Fly's "failed" replay)."""


class _ClientLeft(Exception):
    """The client went away during a visit to a machine (already in the log)."""


class _Gone(Exception):
    """A peer closed, reset or broke HTTP; `peer` says which."""

    def __init__(self, peer: _Peer, why: str) -> None:
        super().__init__(f"{peer.name}: {why}")
        self.peer = peer


class _Peer:
    """One side of an exchange: a TCP stream and h11's view of the HTTP/1.1 on it."""

    def __init__(
        self, stream: anyio.abc.SocketStream, role: type[h11.CLIENT | h11.SERVER], name: str
    ) -> None:
        self.stream = stream
        self.conn = h11.Connection(role)
        self.name = name
        self._sending = anyio.Lock()
        self._ended = False

    async def next_event(self) -> object:
        """The next h11 event (or PAUSED); `_Gone` when the peer broke off mid-message."""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                why = "closed the connection mid-message" if self._ended else f"bad HTTP: {exc}"
                raise _Gone(self, why) from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                data, self._ended = b"", True
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise _Gone(self, repr(exc)) from exc
            self.conn.receive_data(data)

    async def send(self, event: h11.Event) -> None:
        """One event out; locked, as two tasks may answer a client (`100 Continue`, a 104)."""
        try:
            async with self._sending:
                if data := self.conn.send(event):
                    await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise _Gone(self, repr(exc)) from exc

    async def wait_closed(self) -> None:
        """Returns once the peer has closed its side (what it sends meanwhile is kept)."""
        while True:
            try:
                data = await self.stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            self.conn.receive_data(data)


class _Body:
    """The client's request body: read once, as the first machine takes it; its first MiB
    kept so the request can be replayed."""

    def __init__(self, client: _Peer) -> None:
        self.client = client
        self.kept = bytearray()
        self.size = 0
        self.started = False
        self.complete = False

    @property
    def replayable(self) -> bool:
        return self.complete and self.size <= REPLAY_BODY_LIMIT

    async def read(self) -> bytes | None:
        """The next piece from the client, None at the end; `_Gone` if it goes away."""
        if self.complete:
            return None
        if not self.started and self.client.conn.they_are_waiting_for_100_continue:
            await self.client.send(h11.InformationalResponse(status_code=100, headers=[]))
        self.started = True
        event = await self.client.next_event()
        if isinstance(event, h11.EndOfMessage):
            self.complete = True
            return None
        if not isinstance(event, h11.Data):
            raise _Gone(self.client, "closed mid-request")
        self.size += len(event.data)
        if self.size <= REPLAY_BODY_LIMIT:
            self.kept += event.data
        elif self.kept:
            self.kept = bytearray()  # too large to replay: nothing more worth keeping
        return bytes(event.data)

    async def finish(self) -> None:
        """Read on to the end while the body can still be replayed."""
        while not self.complete and self.size <= REPLAY_BODY_LIMIT:
            await self.read()


class _Exchange:
    """One client connection's request: routed, maybe replayed, answered once."""

    def __init__(self, proxy: FlyProxy, client: _Peer, request: h11.Request) -> None:
        self.proxy = proxy
        self.client = client
        self.request = request
        self.body = _Body(client)
        self.method = request.method.decode()
        self.path = request.target.decode()
        # What the replay cache matches: the host without its port, the path without query.
        self.host = _host(request.headers)
        self.route_path = self.path.split("?", 1)[0]
        self.client_gone: _Gone | None = None

    async def run(self) -> None:
        try:
            await self._route()
        except _ClientLeft:
            return
        except _Gone as exc:
            if exc.peer is not self.client:
                raise
            self._log(None, None, note="client disconnected")
            return
        if not self.body.complete:
            await self._drain()

    async def _route(self) -> None:
        """The first machine (named, cached or picked), then the replays it asks for."""
        proxy = self.proxy
        forced = proxy._forced.popleft() if proxy._forced else None
        cached = None if forced else proxy._cached_route(self.host, self.route_path)
        first: tuple[str, anyio.abc.SocketStream] | None = None
        if cached is not None:
            try:
                first = await self._reach(
                    self._replay_target(cached.replay, cached.origin), cached.replay.timeout
                )
            except _Unreachable:
                proxy._forget(cached)  # only an optimisation: route as if it were not there
                cached = None
        if first is None:
            candidates = [forced] if forced is not None else list(proxy.machines)
            try:
                first = await self._reach(self._connect_any(candidates), None)
            except _Unreachable as exc:
                await self._answer(502, f"no machine to route to: {exc}")
                return
        machine, stream = first
        if cached is not None:
            src = _replay_src(cached.origin, cached.replay.state)
            replay = await self._hop(machine, stream, src, cached.origin, "replay cache")
        else:
            replay = await self._hop(machine, stream, [], None, "route_next" if forced else "")
        if replay is not None:
            await self._replays(replay, machine)

    async def _replays(self, replay: Replay, origin: str) -> None:
        """Replay the request as each `fly-replay` says, until a machine answers for good."""
        fell_back = False
        for _ in range(MAX_REPLAYS):
            await self.body.finish()
            if not self.body.replayable:
                await self._answer(502, "request body over 1 MiB: it cannot be replayed")
                return
            try:
                machine, stream = await self._reach(
                    self._replay_target(replay, origin), replay.timeout
                )
                extra, note = _replay_src(origin, replay.state), ""
            except _Unreachable as exc:
                if replay.fallback is None:
                    await self._answer(502, f"replay failed: {exc}")
                    return
                try:
                    machine, stream = await self._reach(self._fall_back(origin, replay), None)
                except _Unreachable as again:
                    await self._answer(502, f"replay failed: {exc}; so did its fallback: {again}")
                    return
                extra, note = [(b"fly-replay-failed", str(exc).encode())], f"fallback: {exc}"
                fell_back = True
            replay_again = await self._hop(machine, stream, extra, origin, note)
            if replay_again is None:
                return
            if fell_back:
                await self._answer(502, "a request that fell back cannot be replayed again")
                return
            replay, origin = replay_again, machine
        await self._answer(502, f"more than {MAX_REPLAYS} replays")

    # Reaching machines

    async def _reach(
        self, attempt: Awaitable[tuple[str, anyio.abc.SocketStream]], seconds: float | None
    ) -> tuple[str, anyio.abc.SocketStream]:
        """`attempt` within `seconds` (None: the proxy's connect timeout)."""
        seconds = seconds or self.proxy.connect_timeout
        try:
            with anyio.fail_after(seconds):
                return await attempt
        except TimeoutError:
            raise _Unreachable(f"no connection within {seconds:g} s") from None

    async def _connect(self, machine: str) -> tuple[str, anyio.abc.SocketStream]:
        address = self.proxy.machines.get(machine)
        if address is None:
            raise _Unreachable(f"no machine {machine}")
        try:
            return machine, await anyio.connect_tcp(*address)
        except OSError as exc:
            raise _Unreachable(f"machine {machine} refused: {exc}") from exc

    async def _connect_any(self, candidates: Sequence[str]) -> tuple[str, anyio.abc.SocketStream]:
        """A machine the picker chooses among `candidates`; the next if it refuses."""
        left, failures = list(candidates), []
        while left:
            machine = left[0] if len(left) == 1 else self.proxy.picker(left)
            try:
                return await self._connect(machine)
            except _Unreachable as exc:
                failures.append(str(exc))
                left.remove(machine)
        raise _Unreachable("; ".join(failures) or "no machines")

    async def _replay_target(
        self, replay: Replay, origin: str
    ) -> tuple[str, anyio.abc.SocketStream]:
        if replay.instance is not None:
            return await self._connect(replay.instance)
        others = [m for m in self.proxy.machines if not (replay.elsewhere and m == origin)]
        if replay.prefer_instance is not None:
            with contextlib.suppress(_Unreachable):  # "if possible"
                return await self._connect(replay.prefer_instance)
            others = [m for m in others if m != replay.prefer_instance]
        return await self._connect_any(others)

    async def _fall_back(self, origin: str, replay: Replay) -> tuple[str, anyio.abc.SocketStream]:
        """Back to the machine that asked for the replay (`prefer_self`: or any other)."""
        try:
            return await self._connect(origin)
        except _Unreachable:
            if replay.fallback == "force_self":
                raise
            return await self._connect_any([m for m in self.proxy.machines if m != origin])

    # One visit to a machine

    async def _hop(
        self,
        machine: str,
        stream: anyio.abc.SocketStream,
        extra: Headers,
        replayed_from: str | None,
        note: str,
    ) -> Replay | None:
        """The request to `machine` and its answer back, unless the answer is a `fly-replay`
        (returned). The machine's connection is closed on return, as the client's went."""
        backend = _Peer(stream, h11.CLIENT, machine)
        self.client_gone = None
        failure: _Gone | None = None
        async with stream, anyio.create_task_group() as group:
            try:
                await backend.send(self._request_head(extra))
                group.start_soon(self._upload, backend, group.cancel_scope)
                replay = await self._relay(backend, replayed_from, note)
                # Relayed: a client that leaves now (it read its answer) is no failure here.
                group.cancel_scope.cancel()
                return replay
            except _Gone as exc:
                failure = exc
            group.cancel_scope.cancel()
        # Only the uploader's cancel (the client left) stops the relay without an exception.
        failure = failure or self.client_gone
        assert failure is not None
        if failure.peer is self.client:
            self._log(machine, None, replayed_from, note="client disconnected")
            raise _ClientLeft from failure
        if self.client.conn.our_state is h11.SEND_RESPONSE:
            await self._answer(502, f"machine broke off: {failure}")
        else:
            self._log(machine, None, replayed_from, note=f"machine broke off mid-answer: {failure}")
        return None

    def _request_head(self, extra: Headers) -> h11.Request:
        headers = [
            (name, value)
            for name, value in self.request.headers
            if name not in _HOP_BY_HOP and name not in _PROXY_REQUEST_HEADERS
        ]
        headers += [*extra, (b"connection", b"close")]
        return h11.Request(method=self.request.method, target=self.request.target, headers=headers)

    async def _upload(self, backend: _Peer, scope: anyio.CancelScope) -> None:
        """The body to the machine (live from the client, or the kept copy on a replay), then
        watch the client: if it goes away, the exchange is cancelled."""
        try:
            try:
                if self.body.started:
                    if self.body.kept:
                        await backend.send(h11.Data(data=bytes(self.body.kept)))
                else:
                    while (piece := await self.body.read()) is not None:
                        await backend.send(h11.Data(data=piece))
                await backend.send(h11.EndOfMessage())
            except _Gone as exc:
                if exc.peer is self.client:
                    raise
                return  # the machine stopped reading: its answer (or breakage) comes the other way
            await self.client.wait_closed()
            raise _Gone(self.client, "closed while waiting for the answer")
        except _Gone as exc:
            self.client_gone = exc
            scope.cancel()

    async def _relay(self, backend: _Peer, replayed_from: str | None, note: str) -> Replay | None:
        """The machine's answer: interim ones forwarded, the final one streamed to the client
        unless it carries `fly-replay` (then the parsed header is returned)."""
        while True:
            event = await backend.next_event()
            if isinstance(event, h11.Response):
                break
            if not isinstance(event, h11.InformationalResponse):
                raise _Gone(backend, "closed without answering")
            if event.status_code != 100:  # the proxy answers `Expect: 100-continue` itself
                interim = h11.InformationalResponse(
                    status_code=event.status_code,
                    headers=_strip(event.headers, _HOP_BY_HOP),
                    reason=event.reason,
                )
                await self.client.send(interim)
        headers = list(event.headers)
        header = _header(headers, b"fly-replay")
        replay = Replay.parse(header) if header is not None else None
        self.proxy._update_cache(headers, backend.name, replay, self.host, self.route_path)
        self._log(backend.name, event.status_code, replayed_from, header, note)
        if replay is not None:
            return replay
        response_headers = _strip(headers, _HOP_BY_HOP | _PROXY_RESPONSE_HEADERS)
        response_headers.append((b"connection", b"close"))
        await self.client.send(
            h11.Response(
                status_code=event.status_code, headers=response_headers, reason=event.reason
            )
        )
        while True:
            event = await backend.next_event()
            if isinstance(event, h11.Data):
                await self.client.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self.client.send(h11.EndOfMessage())
                return None
            else:
                raise _Gone(backend, "closed mid-answer")

    # The proxy's own answers

    async def _answer(self, status: int, text: str) -> None:
        """An error from the proxy itself, as Fly's curt 5xx."""
        self._log(None, status, note=text)
        if self.client.conn.our_state is not h11.SEND_RESPONSE:
            return
        body = f"fly-proxy: {text}\n".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await self.client.send(h11.Response(status_code=status, headers=headers))
        await self.client.send(h11.Data(data=body))
        await self.client.send(h11.EndOfMessage())

    async def _drain(self) -> None:
        """Read and drop what is left of an upload answered early: a client still sending
        could not read the answer if the connection closed under it."""
        with anyio.move_on_after(DRAIN_SECONDS), contextlib.suppress(_Gone):
            while await self.body.read() is not None:
                pass

    def _log(
        self,
        machine: str | None,
        status: int | None,
        replayed_from: str | None = None,
        replay: str | None = None,
        note: str = "",
    ) -> None:
        hop = Hop(self.method, self.path, machine, status, replayed_from, replay, note)
        self.proxy.log.append(hop)


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    return next((value.decode("latin-1") for key, value in headers if key == name), None)


def _strip(headers: Sequence[tuple[bytes, bytes]], names: frozenset[bytes]) -> Headers:
    return [(name, value) for name, value in headers if name not in names]


def _host(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The request's Host without its port, as replay cache patterns name it."""
    host = (_header(headers, b"host") or "").strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


def _replay_src(origin: str, state: str | None) -> Headers:
    value = f"instance={origin};region=local;t={time.time_ns() // 1000}"
    if state is not None:
        value += f";state={state}"
    return [(b"fly-replay-src", value.encode())]
