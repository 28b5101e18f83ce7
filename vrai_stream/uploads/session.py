"""One resumable upload: the body its job reads, fed by one connection at a time.

The job reads `chunks()` as it would read a request's body.  A connection that drops
leaves the job waiting, ffmpeg and all, for up to `grace` seconds; a request that resumes
at the right offset feeds the rest, and the answer goes to whichever request ends the
upload (relayed through `answer`, a `RecordedAnswer`).  The offset counts what the job has
taken, so a byte is never read twice or lost.
"""

from __future__ import annotations

import enum
import math
from collections.abc import AsyncIterator, Callable

import anyio

from vrai_stream import errors
from vrai_stream.uploads.recorded import RecordedAnswer


class State(enum.Enum):
    RECEIVING = "receiving"
    WAITING = "waiting"
    """No connection feeds it: its client may come back until the grace ends."""
    COMPLETE = "complete"
    """Every byte has arrived; the job may still be running."""
    ENDED = "ended"
    """Given up (grace over, cancelled, evicted): nothing more can be sent."""


class _Handoff:
    """One chunk at a time from a connection to the job.

    A chunk is the job's only once the job's own code has taken it, so a wait cut short on
    either side (a deadline, a connection cut off) loses nothing and doubles nothing: a
    chunk not taken is withdrawn by its sender.  (A memory stream hands the item over when
    the sender runs, and a receive cancelled just after loses it.)
    """

    def __init__(self) -> None:
        self._chunk: bytes | None = None
        self._ready = anyio.Event()
        """A chunk waits, or the hand-off has closed."""
        self._taken = anyio.Event()
        self.closed = False
        """Nothing more will come: the upload is complete or given up, or the job is over."""
        self._wait: anyio.CancelScope | None = None

    def retime(self, deadline: float) -> None:
        """Move the deadline of a `take` under way (the upload's state changed)."""
        if self._wait is not None:
            self._wait.deadline = deadline

    async def put(self, chunk: bytes) -> None:
        """Wait until the job has taken `chunk`; BrokenResourceError if it never will."""
        if self.closed:
            raise anyio.BrokenResourceError
        self._chunk = chunk
        self._taken = anyio.Event()
        self._ready.set()
        try:
            await self._taken.wait()
        finally:
            taken = self._chunk is not chunk
            if not taken:
                self._withdraw()  # cut short, or closed: the chunk was never the job's
        if not taken:
            raise anyio.BrokenResourceError

    def _withdraw(self) -> None:
        self._chunk = None
        if not self.closed:
            self._ready = anyio.Event()

    async def take(self, deadline: float) -> bytes | None:
        """The next chunk; None once closed; TimeoutError when none came by `deadline`."""
        with anyio.CancelScope(deadline=deadline) as self._wait:
            # A chunk offered may be withdrawn while this wakes: wait for the next offer.
            while self._chunk is None and not self.closed:
                await self._ready.wait()
        self._wait = None
        if self._chunk is not None:
            chunk, self._chunk = self._chunk, None
            self._ready = anyio.Event()
            self._taken.set()
            return chunk
        if self.closed:
            return None
        raise TimeoutError

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._taken.set()  # a sender still waiting learns it now


class UploadSession:
    def __init__(
        self,
        *,
        upload_id: str,
        path: str,
        user_id: str,
        grace_seconds: float,
        idle_timeout_seconds: float,
        on_waiting: Callable[[], None] = lambda: None,
    ) -> None:
        self.id = upload_id
        self.path = path
        """The upload's resource, as clients address it (`/v1/uploads/<machine>/<id>`)."""
        self.user_id = user_id
        self.state = State.RECEIVING
        self.offset = 0
        self.waiting_since: float | None = None
        self.resumptions = 0
        self.ended_because: str | None = None
        self.length: int | None = None
        """The whole upload's length, once a request has said it (`Upload-Length`)."""
        self.max_size: int | None = None
        """The most bytes the upload may hold: its endpoint's body limit."""
        self._grace = grace_seconds
        self._idle = idle_timeout_seconds
        self._handoff = _Handoff()
        self._feeder: anyio.CancelScope | None = None
        self._feeder_gone = anyio.Event()
        self._feeder_gone.set()
        self.answer = RecordedAnswer(relay=True)
        """The job's answer, relayed to the request that resumed the upload (if one did)."""
        self._job_over = anyio.Event()
        self._on_waiting = on_waiting

    # --- the job's side ---------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as the job sees it: one stream, whatever connections carried it."""
        while True:
            try:
                chunk = await self._handoff.take(self._deadline())
            except TimeoutError:
                if self.state is State.RECEIVING:
                    self._drop_feeder()  # stalled: as good as dropped, and it may come back
                    continue
                if self.state is State.WAITING:
                    self.end("expired")
                continue  # the state changed meanwhile: wait again on its own terms
            if chunk is None:
                if self.state is State.COMPLETE:
                    return
                raise errors.ClientDisconnected(self._why_ended())
            self.offset += len(chunk)
            yield chunk

    def seconds_left(self) -> float:
        """How long the upload resource lives at most: a waiting one, what is left of its
        grace; one being fed, a whole grace after its connection drops."""
        if self.state is State.WAITING and self.waiting_since is not None:
            return max(0.0, self.waiting_since + self._grace - anyio.current_time())
        return self._grace

    def _deadline(self) -> float:
        if self.state is State.WAITING and self.waiting_since is not None:
            return self.waiting_since + self._grace
        if self.state is State.RECEIVING:
            return anyio.current_time() + self._idle
        return math.inf

    def _why_ended(self) -> str:
        if self.ended_because == "expired":
            return f"The client did not resume the upload within {self._grace:g} s"
        if self.ended_because == "cancelled":
            return "The client cancelled the upload"
        if self.ended_because == "evicted":
            return "Too many uploads were waiting to be resumed; this one, the oldest, ended"
        if self.ended_because == "drained":
            return "The server is shutting down; the upload cannot be resumed here"
        return "The client disconnected during the upload"

    # --- the connections' side --------------------------------------------------------

    async def feed(self, chunks: AsyncIterator[bytes], *, complete: bool) -> bool:
        """Pass one request's body to the job; True when it was read to its end.

        The request before it, if it still seems to be sending, is cut off first: a client
        resumes only once it has given up on the old connection.
        """
        await self.take_over()
        if self.state in (State.ENDED, State.COMPLETE):
            return False
        self.state = State.RECEIVING
        self.waiting_since = None
        self._retime()
        self._feeder_gone = anyio.Event()
        try:
            with anyio.CancelScope() as scope:
                self._feeder = scope
                try:
                    async for chunk in chunks:
                        await self._handoff.put(chunk)
                except errors.ClientDisconnected:
                    pass
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return False  # the job is over: nothing more to read
                else:
                    if complete:
                        self.state = State.COMPLETE
                        self._handoff.close()
                    else:
                        self._wait_for_more()
                    return True
            self._wait_for_more()
            return False
        finally:
            self._feeder = None
            self._feeder_gone.set()

    async def take_over(self) -> None:
        """Cut off the request feeding the job now, and wait until it has let go."""
        self._drop_feeder()
        await self._feeder_gone.wait()

    def _drop_feeder(self) -> None:
        if self._feeder is not None:
            self._feeder.cancel()
        self._wait_for_more()

    def _wait_for_more(self) -> None:
        if self.state is State.RECEIVING:
            self.state = State.WAITING
            self.waiting_since = anyio.current_time()
            self._retime()
            self._on_waiting()

    def _retime(self) -> None:
        self._handoff.retime(self._deadline())

    def end(self, because: str) -> None:
        """Give the upload up: its job fails as if the client had gone, and cleans up."""
        if self.state in (State.ENDED, State.COMPLETE):
            return
        self.state = State.ENDED
        self.ended_because = because
        if self._feeder is not None:
            self._feeder.cancel()
        self._handoff.close()

    # --- the answer -------------------------------------------------------------------

    def job_over(self) -> None:
        """The job has answered: a request still sending is told the job reads no more."""
        self._job_over.set()
        self._handoff.close()
        self.answer.finish()

    @property
    def over(self) -> bool:
        return self._job_over.is_set()
