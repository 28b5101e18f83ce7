"""The one way every audio request is answered, and the wrappers that hold for all of them.

`endpoint` makes a handler a Starlette endpoint whose response is an `Answer`: an ASGI
response of its own that runs the handler inside it, so whether the answer is one plain
response or events is decided as the request goes (`Events.open()`).  Around the handler,
for every endpoint alike:

- an `Idempotency-Key` makes a repeated request get the first one's answer, replayed from
  its recording or joined while it is still being sent (`http.idempotency`);
- a client speaking the resumable-upload draft gets a 104 and an upload that outlives the
  connection, and the request that resumes it gets the answer (`RequestContext.body`,
  `http.uploads`);
- the request is logged and counted exactly once, whatever happened.

Why an ASGI response rather than Starlette's `StreamingResponse`: under ASGI spec versions
before 2.4 (uvicorn's HTTP protocols say 2.3) that one listens for the client's disconnect
by calling `receive()` in a task of its own while it streams, and a `receive()` during the
upload takes a body chunk that the job was to read.  Here the job alone reads the body;
`receive()` is called only once the body has been read to its end, when the only message
left to come is the disconnect.  Before that, a client that goes away is noticed by the
body's read itself, which fails the job with `client_disconnected`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from vrai_stream import errors
from vrai_stream.http import idempotency
from vrai_stream.http.context import ErrorStyle, RequestContext
from vrai_stream.http.events import HEARTBEAT, ServerSentEvent
from vrai_stream.http.request_log import record
from vrai_stream.state.answers import StoredAnswer
from vrai_stream.state.claims import KeptAnswer
from vrai_stream.uploads.recorded import RecordedAnswer
from vrai_stream.uploads.results import Result

logger = logging.getLogger("vrai_stream.http.answer")

Reply = Response | ServerSentEvent
"""A response, or the last event of an answer that opened its events."""
Handler = Callable[[RequestContext], Awaitable[Reply]]

EVENT_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # a buffering proxy would hold the events back
}


def endpoint(
    name: str, *, error_style: ErrorStyle = "service", idempotent: bool = True
) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Make `handler(context)` a Starlette endpoint answered by an `Answer`.

    `idempotent`: an `Idempotency-Key` makes a repeated request get the first answer (not
    for the upload resource, whose requests name their upload instead).
    """

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            context = RequestContext(request, name, error_style)
            return Answer(context, handler, idempotent=idempotent)

        return run

    return wrap


class Answer(Response):
    """The answer to one audio request: see the module's docstring."""

    def __init__(self, context: RequestContext, handler: Handler, *, idempotent: bool) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({**EVENT_HEADERS, "X-Request-Id": context.request_id})
        self._context = context
        self._handler = handler
        self._idempotent = idempotent
        self._outcome = ("cancelled", 500)
        self._kept: Result | None = None
        """The answer as `GET /v1/transcriptions/{id}` sends it again, once it is known."""
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
            self._settle(outcome[1])

    def _log_once(self, outcome: tuple[str, int]) -> None:
        """Log and count the request before its last bytes go out: a client that has its
        answer finds it in the log."""
        if not self._logged:
            self._logged = True
            record(self._context, code=outcome[0], status=outcome[1])

    def _settle(self, status: int) -> None:
        """The answer is over: a kept key's repeats, and a resumed upload's request, learn it;
        so does the shared bucket, for other machines."""
        context = self._context
        services = context.services
        kept_key: KeptAnswer | None = None
        if context.key_entry is not None:
            key = context.key_entry
            context.key_entry = None
            key.answer.finish()
            services.idempotency.settle(key, status)
            recorded = key.answer
            if key.kept and recorded.status is not None and key.fingerprint is not None:
                kept_key = KeptAnswer(
                    context.request_id,
                    key.fingerprint,
                    recorded.status,
                    recorded.headers,
                    recorded.body,
                )
        if context.upload is not None:
            context.upload.job_over()
            services.uploads.forget(context.upload)
        kept: Result | None = None
        if context.result is not None:  # a job ran: its answer can be asked for by its id
            ended = status != 499 and not self._client_gone and self._outcome[0] != "cancelled"
            kept = self._kept if ended else None
            services.results.finished(context.request_id, kept)
        self._settle_shared(kept_key, kept)
        if context.callback is not None and context.body_started and self._outcome[0] != "replayed":
            # The backend learns how it ended, whether or not the client stayed for it.
            context.services.webhooks.send(context.callback, context.request_id, status, self._kept)

    def _settle_shared(self, key: KeptAnswer | None, kept: Result | None) -> None:
        """Leave the key's answer and the job's answer in the shared bucket, if any: in the
        background, as nothing here waits for it (a retry elsewhere waits for the key)."""
        context = self._context
        claim, job = context.shared_claim, context.shared_job
        context.shared_claim = context.shared_job = None
        state = context.services.state if claim or job else None
        if state is None:
            return
        if claim is not None:
            state.work.spawn(functools.partial(state.keys.settle, claim, key))
        if job is not None:
            stored = None if kept is None else StoredAnswer(kept.status, kept.media_type, kept.body)
            state.answers.finished(job, stored)

    async def _run(self) -> None:
        """The handler, and what becomes of its outcome: the last event, or a plain answer."""
        context = self._context
        events = context.events
        failure: errors.ServiceError
        try:
            answer = await self._answer()
            if events.opened != isinstance(answer, ServerSentEvent):
                raise TypeError("a job ends with an event if it opened its events, else not")
        except errors.ServiceError as exc:
            failure = exc
            self._outcome = (exc.code, exc.status)
        except Exception as exc:
            # A bug, not bad input: logged whole; the client learns as little as possible.
            logger.error("unhandled error", exc_info=exc, extra={"requestId": context.request_id})
            failure = errors.InternalError("Something went wrong on our side")
            self._outcome = ("bug", 500)
        else:
            if isinstance(answer, ServerSentEvent):
                events.end(answer)
                self._outcome = ("ok", 200)
                self._kept = _kept_event(answer, 200)
            else:
                # Every answer names its request; one sent again names the first.
                answer.headers.setdefault("X-Request-Id", context.request_id)
                events.answer(answer)
                replayed = answer.headers.get("idempotent-replayed") == "true"
                self._outcome = ("replayed" if replayed else "ok", answer.status_code)
                self._kept = _kept_response(answer)
            return
        if events.opened:
            last = ServerSentEvent("error", context.error_body(failure))
            events.end(last)
            self._kept = _kept_event(last, failure.status)
        else:
            refusal = context.error_response(failure)
            events.answer(refusal)
            self._kept = _kept_response(refusal)

    async def _answer(self) -> Reply:
        """The handler's answer, or the first answer again for a repeated key."""
        context = self._context
        if self._idempotent:  # the audio endpoints, which take a callbackUrl too
            await context.check_callback()
        if self._idempotent and "idempotency-key" in context.request.headers:
            repeat = await idempotency.claim(context)
            if repeat is not None:
                return await idempotency.replay(context, repeat)
        return await self._handle()

    async def _handle(self) -> Reply:
        """The handler, beside the task that feeds a resumable upload from this request."""
        context = self._context
        failure: errors.ServiceError | None = None
        async with anyio.create_task_group() as feeders:
            context.feeders = feeders
            try:
                answer = await self._handler(context)
            except errors.ServiceError as exc:
                failure = exc
            finally:
                context.feeders = None
                feeders.cancel_scope.cancel()  # a body nobody reads any more
        if failure is not None:
            raise failure
        return answer

    def _recording(self, send: Send | None) -> Send:
        """`send` (if any), recording the answer for whoever else may collect it
        (`RecordedAnswer`): repeats of its key, and the request that resumed its upload."""
        context = self._context

        async def recorded(message: Message) -> None:
            keeps: list[RecordedAnswer] = []
            if context.key_entry is not None:
                keeps.append(context.key_entry.answer)
            upload = context.upload
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = tuple(
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, value in message.get("headers", ())
                    if name.lower() not in (b"content-length", b"connection")
                )
                if upload is not None:
                    upload.answer.start(status, headers)
                for keep in keeps:
                    keep.start(status, headers)
            elif message["type"] == "http.response.body":
                if upload is not None and upload.resumptions:
                    keeps.append(upload.answer)  # the client that resumed it waits for this
                for keep in keeps:
                    await keep.write(message.get("body", b""))
            if send is not None:
                await send(message)

        return recorded

    async def _write(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Headers once the job opens its events, then each event; or the job's plain answer."""
        events = self._context.events
        plain = await events.until_decided()
        if plain is not None:
            self._answered = True  # from here, receive() tells of the answer, not of the client
            self._log_once(self._outcome)
            upload = self._context.upload
            if upload is not None and upload.resumptions:
                # The answer goes to the request that resumed the upload; this connection's
                # client gave it up (it streams on, whatever this connection does).
                await plain(scope, _never_disconnected, self._recording(None))
                gone = Response(status_code=204, headers={"Connection": "close"})
                await gone(scope, receive, send)
                return
            await plain(scope, receive, self._recording(send))
            return
        send = self._recording(send)
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        last_progress_at = -math.inf
        while True:
            event = await events.next(last_progress_at)
            if event is None:
                await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})
                continue
            if event.replaceable:
                last_progress_at = anyio.current_time()
            last = events.is_last(event)
            if last:
                self._answered = True
                self._log_once(self._outcome)
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            if last:
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _hear_disconnect(self, receive: Receive, everything: anyio.CancelScope) -> None:
        """Once the body is read, the only message left is the disconnect: end the job then,
        unless someone else may collect its answer (`answer_outlives_connection`)."""
        context = self._context
        await context.body_read.wait()
        if context.upload is not None:
            return  # this connection may be long gone: the upload's own requests carry it
        message = await receive()
        if message["type"] != "http.disconnect" or self._answered:
            return
        if not context.answer_outlives_connection:
            self._client_gone = True
            everything.cancel()


async def _never_disconnected() -> Message:
    """`receive` for an answer played into a recording: no client of its own to lose."""
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


def _kept_response(response: Response) -> Result | None:
    """A plain answer, to be sent again by its id: one whole in memory (not an MP3)."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes):
        return None
    media_type = response.headers.get("content-type", "application/octet-stream")
    return Result(response.status_code, media_type, body)


def _kept_event(event: ServerSentEvent, status: int) -> Result:
    """An answer given as events, sent again by its id as its last event's body: `done`'s
    is the JSON answer itself, `error`'s the error body."""
    body = json.dumps(event.data, separators=(",", ":")).encode()
    return Result(status, "application/json", body)
