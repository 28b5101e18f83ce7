"""Server-Sent Events: an answer that streams while the upload is still arriving.

`http.answer.Answer` writes them.  Until a request calls `Events.open()` (after admission,
once its parameters are known), a failure is the usual JSON error with its HTTP status
(`401`, `400`, `503`...) and a request may still answer with any `Response`; after it, the
headers have gone out, and the answer ends with its last event (`done`) or an `error` event.
The listeners here turn a job's progress into the events of `/v1/transcriptions`
(`SegmentEvents`) and of OpenAI's `stream=true` (`TextDeltas`).
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.responses import Response

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

    def end(self, last: ServerSentEvent) -> None:
        """The answer's last event: it goes once every event before it has gone."""
        self._last = last
        self._changed.set()

    def answer(self, response: Response) -> None:
        """Answer with `response` instead: the events never opened."""
        self._plain = response
        self._changed.set()

    def is_last(self, event: ServerSentEvent) -> bool:
        return event is self._last

    async def _wait(self, seconds: float) -> bool:
        """Wait for news, at most `seconds`; True if something changed."""
        with anyio.move_on_after(seconds):
            await self._changed.wait()
        changed = self._changed.is_set()
        self._changed = anyio.Event()
        return changed

    async def until_decided(self) -> Response | None:
        """Wait until the job opens its events (None) or answers plainly (the response)."""
        while not self.opened and self._plain is None:
            await self._wait(math.inf)
        return self._plain

    async def next(self, last_progress_at: float) -> ServerSentEvent | None:
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
