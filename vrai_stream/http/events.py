"""Server-Sent Events: an answer that streams while the upload is still arriving.

`EventStream` is an ASGI response of its own, not Starlette's `StreamingResponse`: under ASGI
spec versions before 2.4 (uvicorn's HTTP protocols say 2.3) that one listens for the client's
disconnect by calling `receive()` in a task of its own while it streams, and a `receive()`
during the upload takes a body chunk that the job was to read.  Here the job alone reads the
body; `receive()` is called only once the job has read the body to its end, when the only
message left to come is the disconnect.  Before that, a client that goes away is noticed by
the body's read itself, which fails the job with `client_disconnected`.

The stream runs the job in its own call, so whether the answer is events or one plain
response is decided as the job goes: until the job calls `Events.open()` (after admission,
once its parameters are known), a failure is the usual JSON error with its HTTP status
(`401`, `400`, `503`...) and a job may still answer with any `Response`; after it, the
headers have gone out, and the job ends with its last event (`done`) or an `error` event.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from vrai_stream import errors
from vrai_stream.speech.transcribers.base import Segment

logger = logging.getLogger("vrai_stream.http.events")

HEARTBEAT_SECONDS = 15.0
"""A comment line (`: keep-alive`) after this long without an event: proxies keep the stream."""
PROGRESS_INTERVAL_SECONDS = 0.2
"""At most one `progress` event this often; a newer one replaces one not yet sent."""
HEARTBEAT = b": keep-alive\n\n"


@dataclass(frozen=True)
class ServerSentEvent:
    name: str
    data: Mapping[str, Any]
    replaceable: bool = False
    """A newer event of the same name may take its place while it waits to be sent."""

    def encode(self) -> bytes:
        # One line of JSON: newlines inside strings are escaped, and so is anything beyond
        # ASCII, which leaves no character a line splitter could take for a line break.
        data = json.dumps(self.data, separators=(",", ":"), allow_nan=False)
        return f"event: {self.name}\ndata: {data}\n\n".encode()


Work = Callable[["Events"], Awaitable["Response | ServerSentEvent"]]
"""The job: it returns its last event once it has opened the events, else its response."""


class Events:
    """What a job tells its client as it goes; never blocks the job (the writer drains it)."""

    def __init__(self) -> None:
        self.opened = False
        self._queue: deque[ServerSentEvent] = deque()
        self._last: ServerSentEvent | None = None
        self._plain: Response | None = None
        self._changed = anyio.Event()

    def open(self) -> None:
        """Answer with events from now on: the headers go out at once."""
        self.opened = True
        self._changed.set()

    def send(self, event: ServerSentEvent) -> None:
        if event.replaceable and self._queue and self._queue[-1].name == event.name:
            self._queue[-1] = event  # not sent yet: only the newest is worth sending
        else:
            self._queue.append(event)
        self._changed.set()

    def _end(self, last: ServerSentEvent) -> None:
        self._last = last
        self._changed.set()

    def _answer(self, response: Response) -> None:
        self._plain = response
        self._changed.set()

    async def _wait(self, seconds: float) -> bool:
        """Wait for news, at most `seconds`; True if something changed."""
        with anyio.move_on_after(seconds):
            await self._changed.wait()
        changed = self._changed.is_set()
        self._changed = anyio.Event()
        return changed

    async def _until_decided(self) -> Response | None:
        """Wait until the job opens its events (None) or answers plainly (the response)."""
        while not self.opened and self._plain is None:
            await self._wait(math.inf)
        return self._plain

    async def _next(self, last_progress_at: float) -> ServerSentEvent | None:
        """The next event to write (the last one once the queue is empty); None: a heartbeat."""
        silent_until = anyio.current_time() + HEARTBEAT_SECONDS
        while True:
            wait_until = silent_until
            if self._queue:
                head = self._queue[0]
                due = last_progress_at + PROGRESS_INTERVAL_SECONDS
                # A replaceable event alone in the queue waits for its interval; one with an
                # event behind it goes at once, so that order is kept.
                if not head.replaceable or len(self._queue) > 1 or self._last is not None:
                    return self._queue.popleft()
                if anyio.current_time() >= due:
                    return self._queue.popleft()
                wait_until = min(due, silent_until)
            elif self._last is not None:
                return self._last
            changed = await self._wait(wait_until - anyio.current_time())
            if not changed and anyio.current_time() >= silent_until:
                return None


class EventStream(Response):
    """The answer of a job that may stream events: see the module's docstring.

    The job runs inside this response's call, so the endpoint wrapper cannot log the request
    when the handler returns: `finished(code, status)` is called exactly once, when the
    answer is over (the last event sent, the client gone, or the job cancelled).
    """

    def __init__(
        self,
        work: Work,
        events: Events,
        *,
        request_id: str,
        body_read: anyio.Event,
        refusal: Callable[[errors.ServiceError], Response],
        error_event: Callable[[errors.ServiceError], ServerSentEvent],
        finished: Callable[[str, int], None],
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(
            {
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a buffering proxy would hold the events back
                "X-Request-Id": request_id,
            }
        )
        self._work = work
        self._events = events
        self._request_id = request_id
        self._body_read = body_read
        self._refusal = refusal
        self._error_event = error_event
        self._finished = finished
        self._outcome = ("cancelled", 500)
        self._client_gone = False
        self._answered = False
        self._logged = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = ("cancelled", 500)  # unless it ends otherwise: cancelled from outside
        try:
            with anyio.CancelScope() as everything:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._hear_disconnect, receive, everything)
                    group.start_soon(self._run)
                    await self._write(scope, receive, send)
                    group.cancel_scope.cancel()  # the disconnect listener: the answer is over
            outcome = ("client_disconnected", 499) if self._client_gone else self._outcome
        finally:
            self._log_once(outcome)

    def _log_once(self, outcome: tuple[str, int]) -> None:
        """Log and count the request, before its last bytes go out (as the endpoint wrapper
        does for a plain answer: a client that has its answer finds it in the log)."""
        if not self._logged:
            self._logged = True
            self._finished(*outcome)

    async def _run(self) -> None:
        """The job, and what becomes of its outcome: the last event, or a plain answer."""
        events = self._events
        failure: errors.ServiceError
        try:
            answer = await self._work(events)
            if events.opened != isinstance(answer, ServerSentEvent):
                raise TypeError("a job ends with an event if it opened its events, else not")
        except errors.ServiceError as exc:
            failure = exc
            self._outcome = (exc.code, exc.status)
        except Exception as exc:
            # A bug, not bad input: logged whole; the client learns as little as possible.
            logger.error("unhandled error", exc_info=exc, extra={"requestId": self._request_id})
            failure = errors.InternalError("Something went wrong on our side")
            self._outcome = ("bug", 500)
        else:
            if isinstance(answer, ServerSentEvent):
                events._end(answer)
                self._outcome = ("ok", 200)
            else:
                events._answer(answer)
                self._outcome = ("ok", answer.status_code)
            return
        if events.opened:
            events._end(self._error_event(failure))
        else:
            events._answer(self._refusal(failure))

    async def _write(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Headers once the job opens its events, then each event; or the job's plain answer."""
        events = self._events
        plain = await events._until_decided()
        if plain is not None:
            self._answered = True  # from here, receive() tells of the answer, not of the client
            self._log_once(self._outcome)
            await plain(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        last_progress_at = -math.inf
        while True:
            event = await events._next(last_progress_at)
            if event is None:
                await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})
                continue
            if event.replaceable:
                last_progress_at = anyio.current_time()
            last = event is events._last
            if last:
                self._answered = True
                self._log_once(self._outcome)
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            if last:
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _hear_disconnect(self, receive: Receive, everything: anyio.CancelScope) -> None:
        """Once the body is read, the only message left is the disconnect: end the job then."""
        await self._body_read.wait()
        message = await receive()
        if message["type"] == "http.disconnect" and not self._answered:
            self._client_gone = True
            everything.cancel()


class SegmentEvents:
    """A job as `/v1/transcriptions` streams it: `progress`, `segment` and `withdrawn` events."""

    can_withdraw = True

    def __init__(self, events: Events) -> None:
        self._events = events

    def progress(self, received_bytes: int, decoded_seconds: float) -> None:
        data = {"receivedBytes": received_bytes, "decodedSeconds": round(decoded_seconds, 3)}
        self._events.send(ServerSentEvent("progress", data, replaceable=True))

    def segment(self, index: int, segment: Segment) -> None:
        start, end = round(segment.start, 3), round(segment.end, 3)
        data = {"index": index, "start": start, "end": end, "text": segment.text}
        self._events.send(ServerSentEvent("segment", data))

    def withdraw(self, reason: str) -> None:
        """Every `segment` sent so far is void; they come again from index 0."""
        self._events.send(ServerSentEvent("withdrawn", {"reason": reason}))


DELTA = "transcript.text.delta"
DONE = "transcript.text.done"


class TextDeltas:
    """A job as OpenAI's API streams a transcription: a `transcript.text.delta` per segment,
    then `transcript.text.done` with the whole text (what OpenAI's SDKs parse).

    Segments are joined with a space, as the stitched transcript joins them, so the deltas
    add up to the final text.
    """

    can_withdraw = False
    """A delta once sent stays sent: deltas decoded on a guess wait for it to be confirmed."""

    def __init__(self, events: Events) -> None:
        self._events = events
        self._sent = 0

    def progress(self, received_bytes: int, decoded_seconds: float) -> None:
        """OpenAI's stream has no progress event: an SDK would not know what to make of it."""

    def segment(self, index: int, segment: Segment) -> None:
        if segment.text:
            self._delta(segment.text if self._sent == 0 else " " + segment.text)

    def withdraw(self, reason: str) -> None:
        """Nothing was sent that rests on the guess (see `can_withdraw`): nothing to do."""

    def _delta(self, text: str) -> None:
        self._events.send(ServerSentEvent(DELTA, {"type": DELTA, "delta": text}))
        self._sent += 1

    def done(self, text: str) -> ServerSentEvent:
        """The last event; the whole text as one delta first if no segment was heard."""
        if self._sent == 0 and text:
            self._delta(text)
        return ServerSentEvent(DONE, {"type": DONE, "text": text})
