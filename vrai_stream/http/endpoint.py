"""The steps every audio endpoint shares, and the one wrapper that ends each request.

Authentication and admission come before one byte of the body is read; then the
pipeline; then the optional summary.  `endpoint` wraps a handler: the handler returns its
`Response`, a `ServiceError` it raises becomes the JSON error, and every request is logged
and counted once, whatever happened.

A request that may be answered with events (`Accept: text/event-stream`, or an endpoint
whose form says so) runs its handler inside an `EventStream` instead, which outlives the
handler's call: the stream logs and counts the request when its answer is over.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

import anyio
from anyio.abc import TaskGroup
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from vrai_stream import errors, metrics
from vrai_stream.bodies.forms import BodyDecoder, Upload, read_upload
from vrai_stream.bodies.limits import BodyMeter, limited
from vrai_stream.http.events import Events, EventStream, ServerSentEvent
from vrai_stream.http.responses import error_body, error_response
from vrai_stream.pipeline.job import JobListener, JobResult, JobSpec
from vrai_stream.services import Services
from vrai_stream.settings import ANONYMOUS, MiB
from vrai_stream.speech.summarize import SummarizationType
from vrai_stream.telemetry import log_request
from vrai_stream.uploads.idempotency import (
    MAX_KEPT_ANSWER_BYTES,
    Entry,
    Fingerprint,
    KeptAnswer,
    check_key,
)
from vrai_stream.uploads.protocol import INTERIM_EXTENSION, INTERIM_REASON, draft_of
from vrai_stream.uploads.session import UploadSession

ErrorStyle = Literal["service", "openai"]
Answer = Response | ServerSentEvent
"""A response, or the last event of an answer that opened its events (`Job.open_events`)."""
Handler = Callable[["Job"], Awaitable[Answer]]
Listener = TypeVar("Listener", bound=JobListener)


def endpoint(
    name: str,
    *,
    error_style: ErrorStyle = "service",
    events_in_form: bool = False,
    idempotent: bool = True,
) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Make `handler(job)` a Starlette endpoint that renders errors, logs and counts.

    `events_in_form`: whether to answer with events is a form field, known only once the
    body is being read, so every request to the endpoint runs in an `EventStream`.
    `idempotent`: an `Idempotency-Key` makes a repeated request get the first answer.
    """

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            job = Job(request, name, error_style, idempotent=idempotent)
            if events_in_form or job.wants_events:
                return job.answer_later(handler)
            return await job.answer_now(handler)

        return run

    return wrap


class Job:
    """One request to an audio endpoint: who asks, its body, its result, its log line."""

    def __init__(
        self,
        request: Request,
        endpoint: str,
        error_style: ErrorStyle = "service",
        *,
        idempotent: bool = False,
    ):
        self.request = request
        self.idempotent = idempotent
        self.endpoint = endpoint
        self.error_style = error_style
        self.services: Services = request.app.state.services
        self.request_id = uuid.uuid4().hex
        self.user_id = ANONYMOUS
        self.started = anyio.current_time()
        self.result: JobResult | None = None
        self.failure: errors.ServiceError | None = None
        self.summary_fields: dict[str, str] = {}
        self.body_started = False
        self.body_read = anyio.Event()
        """Set once the body has been read to its end."""
        self.events: Events | None = None
        """The answer's events, when it may be events (see `answer_later`)."""
        self.listener: JobListener | None = None
        self.upload: UploadSession | None = None
        """The resumable upload this request began, when its client speaks the draft."""
        self.fingerprint: Fingerprint | None = None
        """The request's hash, when it carries an Idempotency-Key."""
        self.replayed = False
        self._authenticated = False
        self._feeders: TaskGroup | None = None

    async def authenticate(self) -> None:
        """Who is asking, from the Authorization header; a 401 never reads the body."""
        if self._authenticated:
            return
        principal = await self.services.auth.authenticate(self.request.headers.get("authorization"))
        self.user_id = principal.user_id
        self._authenticated = True

    @property
    def encoded_body_limit(self) -> int:
        """A body carrying the audio as base64 or in a form: 4/3 of it, plus room for fields."""
        return self.services.settings.max_body_bytes * 4 // 3 + MiB

    def check_body_length(self, *, encoded: bool = False) -> None:
        limit = self.encoded_body_limit if encoded else self.services.settings.max_body_bytes
        check_declared_length(self.request.headers, limit)

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        async with self.services.admission.slot():
            yield

    def body(self) -> AsyncIterator[bytes]:
        """The body, read once the request is authenticated and admitted.

        When the client speaks the resumable-upload draft, the body becomes an upload that
        outlives this connection: a 104 tells the client where to resume it.
        """
        upload = self._begin_upload()
        return self._observed(upload.chunks() if upload else request_body(self.request))

    async def _observed(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        # Started when the job first asks for a chunk: a job refused before that (a language
        # the model cannot do) is answered without reading the body.
        self.body_started = True
        async for chunk in chunks:
            if self.fingerprint is not None:
                self.fingerprint.update(chunk)
            yield chunk
        self.body_read.set()

    def _begin_upload(self) -> UploadSession | None:
        headers = self.request.headers
        draft = draft_of(headers)
        interim = self.request.scope.get("extensions", {}).get(INTERIM_EXTENSION)
        if draft is None or interim is None or self._feeders is None:
            return None  # a plain request, or a server or answer that cannot resume
        complete = draft.complete(headers)
        if complete is None:
            return None  # the draft's creation names whether the body is complete
        if not complete:
            raise errors.InvalidParameters(
                "Send the whole recording in the request that creates the upload "
                "(Upload-Complete: ?1); resume it with PATCH if the connection drops"
            )
        upload = self.services.uploads.create(user_id=self.user_id)
        location = str(self.request.base_url).rstrip("/") + upload.path
        fields = [("Location", location), ("Upload-Draft-Interop-Version", str(draft.version))]
        if not interim["send"](104, INTERIM_REASON, fields):
            self.services.uploads.forget(upload)
            return None
        self.upload = upload
        self._feeders.start_soon(
            functools.partial(upload.feed, complete=True), request_body(self.request)
        )
        return upload

    async def answer_now(self, handler: Handler) -> Response:
        """Run `handler` and answer; log and count the request once, whatever happened."""
        answer: Response | None = None
        try:
            answer = await self._answer(handler)
            self.record(code="replayed" if self.replayed else "ok", status=answer.status_code)
        except errors.ServiceError as exc:
            self.record(code=exc.code, status=exc.status)
            answer = self.error_response(exc)
        except BaseException as exc:
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            self.record(code="cancelled" if cancelled else "bug", status=500)
            raise
        finally:
            if self.upload is not None:
                self._hand_over(self.upload, answer)
        if self.upload is not None and self.upload.resumptions:
            # The answer went to the request that resumed the upload; this one's client left.
            return Response(status_code=204, headers={"Connection": "close"})
        return answer

    def _hand_over(self, upload: UploadSession, answer: Response | None) -> None:
        if answer is None:
            answer = self.error_response(errors.InternalError("The job failed unexpectedly"))
        upload.deliver(answer)
        self.services.uploads.forget(upload)

    async def _answer(self, handler: Handler) -> Response:
        raw_key = self.request.headers.get("idempotency-key")
        if raw_key is None or not self.idempotent:
            return await self._run(handler)
        key = check_key(raw_key)
        await self.authenticate()
        request = self.request
        self.fingerprint = Fingerprint(
            request.method,
            request.url.path,
            request.url.query,
            request.headers.get("content-type", ""),
        )
        keys = self.services.idempotency
        entry, first = keys.claim(self.user_id, key)
        if not first:
            return await self._repeat(entry)
        kept: KeptAnswer | None = None
        try:
            answer = await self._run(handler)
            kept = self._keepable(answer)
            return answer
        except errors.ServiceError as exc:
            kept = self._keepable(error_response(exc, self.request_id, openai=self._openai))
            raise
        finally:
            if kept is not None and self.body_read.is_set():
                entry.fingerprint = self.fingerprint.hexdigest()
            else:
                kept = None  # known only with the whole body: else the key is free again
            keys.settle(self.user_id, key, entry, kept)

    async def _run(self, handler: Handler) -> Response:
        """The handler, beside the tasks that feed a resumable upload from this request."""
        failure: errors.ServiceError | None = None
        async with anyio.create_task_group() as feeders:
            self._feeders = feeders
            try:
                answer = await handler(self)
            except errors.ServiceError as exc:
                failure = exc
            finally:
                self._feeders = None
                feeders.cancel_scope.cancel()  # a body nobody reads any more
        if failure is not None:
            raise failure
        assert isinstance(answer, Response), "events are opened only in an EventStream"
        return answer

    async def _repeat(self, entry: Entry) -> Response:
        """A request repeating a key: its body is read for its hash, never transcribed."""
        settings = self.services.settings
        body = limited(
            self._observed(request_body(self.request)),
            max_bytes=self.encoded_body_limit,
            idle_timeout=settings.idle_timeout_seconds,
            meter=BodyMeter(),
        )
        async for _ in body:
            pass
        await entry.settled.wait()  # the first request may still be running: attach to it
        assert self.fingerprint is not None
        if entry.answer is None:
            raise errors.IdempotencyKeyInUse(
                "The first request with this Idempotency-Key ended without an answer to "
                "repeat; send the request again"
            )
        if entry.fingerprint != self.fingerprint.hexdigest():
            raise errors.IdempotencyKeyReused(
                "This Idempotency-Key was used for a different request; use a new key "
                "for a new recording"
            )
        metrics.IDEMPOTENT_REPLAYS.inc()
        self.replayed = True
        headers = dict(entry.answer.headers)
        headers["Idempotent-Replayed"] = "true"
        return Response(entry.answer.body, status_code=entry.answer.status, headers=headers)

    @staticmethod
    def _keepable(answer: Response) -> KeptAnswer | None:
        """An answer that can be sent again as it is: a body in memory, not a stream."""
        body = getattr(answer, "body", None)
        if not isinstance(body, bytes) or len(body) > MAX_KEPT_ANSWER_BYTES:
            return None
        skip = {"content-length", "connection"}
        headers = tuple((k, v) for k, v in answer.headers.items() if k.lower() not in skip)
        return KeptAnswer(answer.status_code, headers, body)

    @property
    def _openai(self) -> bool:
        return self.error_style == "openai"

    @property
    def wants_events(self) -> bool:
        return "text/event-stream" in self.request.headers.get("accept", "")

    def answer_later(self, handler: Handler) -> EventStream:
        """Run `handler` inside the answer, which it may turn into events (`open_events`)."""
        self.events = Events()
        return EventStream(
            lambda events: handler(self),
            self.events,
            request_id=self.request_id,
            body_read=self.body_read,
            refusal=self.error_response,
            error_event=lambda exc: ServerSentEvent("error", self.error_body(exc)),
            finished=lambda code, status: self.record(code=code, status=status),
        )

    def open_events(self, make_listener: Callable[[Events], Listener]) -> Listener:
        """Answer with events from now on (the headers go out), told by the job's listener."""
        assert self.events is not None, "only an answer given later can be events"
        self.events.open()
        self.listener = make_listener(self.events)
        return self.listener

    def error_body(self, exc: errors.ServiceError) -> dict[str, Any]:
        return error_body(exc, self.request_id, openai=self.error_style == "openai")

    def error_response(self, exc: errors.ServiceError) -> Response:
        self.failure = exc
        response = error_response(exc, self.request_id, openai=self.error_style == "openai")
        if not self.body_started:
            # Refused before reading: close, or the client would upload it all for nothing.
            response.headers["Connection"] = "close"
        return response

    async def read_upload(self, decoder: BodyDecoder, required: Collection[str]) -> Upload:
        """Read a form or JSON body until the fields in `required` are known (see `uploads`)."""
        raw = limited(
            self.body(),
            max_bytes=self.encoded_body_limit,
            idle_timeout=self._idle_timeout(),
            meter=BodyMeter(),
        )
        return await read_upload(
            raw,
            decoder,
            required=required,
            make_spool=lambda: self.services.pipeline.new_file_spool(".upload"),
        )

    def new_result(self, spec: JobSpec) -> JobResult:
        self.result = JobResult(spec=spec)
        return self.result

    def _idle_timeout(self) -> float:
        """A resumable upload times its own silences (and waits out a dropped connection)."""
        return math.inf if self.upload else self.services.settings.idle_timeout_seconds

    async def check(self, spec: JobSpec) -> None:
        """Refuse what the job could not do, before its body is read or its events open."""
        await self.services.pipeline.check(spec)

    async def run(self, spec: JobSpec, audio: AsyncIterator[bytes]) -> JobResult:
        if self.upload is not None:
            spec = dataclasses.replace(spec, idle_timeout_seconds=self._idle_timeout())
        result = self.new_result(spec)
        await self.services.pipeline.run(spec, audio, result, self.listener)
        return result

    async def summarize(self, kind: SummarizationType, transcript: str) -> dict[str, str]:
        """`summary`, or `summaryError` when it failed: a summary never fails the request."""
        if kind is SummarizationType.NONE:
            return {}
        try:
            self.summary_fields = {"summary": await self.services.summarizer.run(kind, transcript)}
        except errors.SummaryFailed as exc:
            self.summary_fields = {"summaryError": exc.message}
        return self.summary_fields

    def record(self, *, code: str, status: int) -> None:
        fields: dict[str, Any] = {
            "requestId": self.request_id,
            "endpoint": self.endpoint,
            "method": self.request.method,
            "path": self.request.url.path,
            "userId": self.user_id,
            "status": status,
            "code": code,
            "seconds": round(anyio.current_time() - self.started, 3),
        }
        if "summaryError" in self.summary_fields:
            fields["summaryError"] = self.summary_fields["summaryError"]
        result = self.result
        if result is not None:
            fields["fromTime"] = result.spec.window.start
            fields["toTime"] = result.spec.window.end
            fields.update(result.log_fields())
            fields["audioSeconds"] = result.duration
            _count_job(result, self.user_id)
        if self.events is not None and self.events.opened:
            fields["answer"] = "events"
        if self.upload is not None:
            fields["uploadResumptions"] = self.upload.resumptions
        metrics.REQUESTS.labels(endpoint=self.endpoint, code=code).inc()
        log_request(fields)


def _count_job(result: JobResult, user_id: str) -> None:
    timings = result.timings
    for stage, seconds in (
        ("receive", timings.receive),
        ("transcode", timings.transcode),
        ("transcribe", timings.transcribe),
        ("total", timings.total),
        ("after_last_byte", timings.after_last_byte),
    ):
        if seconds > 0:
            metrics.STAGE_SECONDS.labels(stage=stage).observe(seconds)
    metrics.BYTES.labels(direction="in").inc(result.input_size)
    metrics.BYTES.labels(direction="out").inc(result.mp3_size)
    if result.layout is not None and result.mode is not None:
        metrics.LAYOUTS.labels(format=result.layout.container, mode=result.mode.value).inc()
    if result.duration > 0:
        metrics.AUDIO_SECONDS.labels(user=user_id).inc(result.duration)


def check_declared_length(headers: Mapping[str, str], max_body_bytes: int) -> None:
    """Refuse a body too large by its Content-Length before reading a byte of it."""
    declared = headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise errors.InvalidParameters("Content-Length is not a number") from None
    if length > max_body_bytes:
        raise errors.BodyTooLarge(
            f"The upload is {length} bytes; at most {max_body_bytes} bytes are accepted"
        )
    if length == 0:
        raise errors.EmptyBody("The request has no body; send the audio as the request body")


async def request_body(request: Request) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; a vanished client becomes a `ClientDisconnected`."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise errors.ClientDisconnected("The client disconnected during the upload") from None
