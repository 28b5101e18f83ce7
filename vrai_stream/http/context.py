"""One request to an audio endpoint: who asks, its body, its job's result, and its log line.

Handlers read their request shape and call `answers.answer_job`; this object carries what
the wrappers around them (`http.answer`: idempotency, resumable uploads, logging) and the
job share about the one request.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from vrai_stream import errors, metrics
from vrai_stream.bodies.forms import BodyDecoder, Submission, read_submission
from vrai_stream.bodies.limits import BodyMeter, limited
from vrai_stream.http.events import Events
from vrai_stream.http.responses import error_body, error_response
from vrai_stream.http.upload_draft import INTERIM_EXTENSION, INTERIM_REASON, draft_of
from vrai_stream.pipeline.job import JobListener, JobResult, JobSpec
from vrai_stream.services import Services
from vrai_stream.settings import ANONYMOUS, MiB
from vrai_stream.speech.summarize import SummarizationType
from vrai_stream.telemetry import log_request
from vrai_stream.uploads.idempotency import Entry, Fingerprint
from vrai_stream.uploads.session import UploadSession

ErrorStyle = Literal["service", "openai"]
REQUEST_ID_EXTENSION = "vrai.request_id"
"""The scope extension through which the server's protocol names the request (`server`):
a request its parser refuses halfway is answered there, under the same id."""


def request_id_of(scope: Mapping[str, Any]) -> str:
    """The id the server gave the request, or a new one (a server without our protocol)."""
    given = scope.get("extensions", {}).get(REQUEST_ID_EXTENSION, {}).get("id")
    return given if isinstance(given, str) else uuid.uuid4().hex


class RequestContext:
    """One request to an audio endpoint, as its handler and the wrappers around it see it."""

    def __init__(self, request: Request, endpoint: str, error_style: ErrorStyle) -> None:
        self.request = request
        self.endpoint = endpoint
        self.error_style = error_style
        self.services: Services = request.app.state.services
        self.request_id = request_id_of(request.scope)
        self.user_id = ANONYMOUS
        self.started = anyio.current_time()
        self.admitted_at: float | None = None
        self.result: JobResult | None = None
        self.summary_fields: dict[str, str] = {}
        self.events = Events()
        """The answer's events, should the handler open them."""
        self.body_started = False
        self.body_read = anyio.Event()
        """Set once the body has been read to its end."""
        self.upload: UploadSession | None = None
        """The resumable upload this request began, when its client speaks the draft."""
        self.key_entry: Entry | None = None
        """This request's `Idempotency-Key`, when it is the first to use it."""
        self.fingerprint: Fingerprint | None = None
        """The request's hash as its body streams, when it carries an `Idempotency-Key`."""
        self.feeders: TaskGroup | None = None
        """Where the task feeding a resumable upload from this connection runs."""
        self._authenticated = False

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
        """A job slot: the answer's `timings` count from the moment it is given."""
        async with self.services.admission.slot():
            self.admitted_at = anyio.current_time()
            yield

    @property
    def answer_outlives_connection(self) -> bool:
        """Someone other than this connection may collect the answer: a retry with the same
        key, or the request that resumes the upload.  The job then runs to its end even if
        this client leaves after its last byte."""
        return self.key_entry is not None or self.upload is not None

    def body(self) -> AsyncIterator[bytes]:
        """The body, read once the request is authenticated and admitted.

        When the client speaks the resumable-upload draft, the body becomes an upload that
        outlives this connection: a 104 tells the client where to resume it.  Call it before
        the answer's events open: the 104 must go out before the answer's head.
        """
        upload = self._begin_upload()
        return self.observed(upload.chunks() if upload else request_body(self.request))

    async def observed(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The body as it is read: hashed for an `Idempotency-Key`, its end noted."""
        # Started when the job first asks for a chunk: a job refused before that (a language
        # the model cannot do) is answered without reading the body.
        self.body_started = True
        async for chunk in chunks:
            if self.fingerprint is not None:
                self.fingerprint.update(chunk)
            yield chunk
        if self.fingerprint is not None and self.key_entry is not None:
            self.key_entry.hash_known(self.fingerprint.hexdigest())
        self.body_read.set()

    def _begin_upload(self) -> UploadSession | None:
        headers = self.request.headers
        draft = draft_of(headers)
        interim = self.request.scope.get("extensions", {}).get(INTERIM_EXTENSION)
        if draft is None or interim is None or self.feeders is None:
            return None  # a plain request, or a server that cannot send a 104
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
        self.feeders.start_soon(
            functools.partial(upload.feed, complete=True), request_body(self.request)
        )
        return upload

    def idle_timeout(self) -> float:
        """A resumable upload times its own silences (and waits out a dropped connection)."""
        return math.inf if self.upload else self.services.settings.idle_timeout_seconds

    async def read_submission(self, decoder: BodyDecoder, required: Collection[str]) -> Submission:
        """Read a form or JSON body until the fields in `required` are known (`bodies.forms`)."""
        raw = limited(
            self.body(),
            max_bytes=self.encoded_body_limit,
            idle_timeout=self.idle_timeout(),
            meter=BodyMeter(),
        )
        return await read_submission(
            raw,
            decoder,
            required=required,
            make_spool=lambda: self.services.pipeline.new_file_spool(".upload"),
        )

    def job_spec(self, **fields: Any) -> JobSpec:
        """The job this request asks for, under its id and for its user."""
        return JobSpec(request_id=self.request_id, user_id=self.user_id, **fields)

    async def check(self, spec: JobSpec) -> None:
        """Refuse what the job could not do, before its body is read or its events open."""
        await self.services.pipeline.check(spec)

    async def run(
        self, spec: JobSpec, audio: AsyncIterator[bytes], listener: JobListener | None
    ) -> JobResult:
        """The job; its result is kept for the log line, and its failure raised."""
        spec = dataclasses.replace(
            spec,
            admitted_at=self.admitted_at,
            idle_timeout_seconds=math.inf if self.upload else spec.idle_timeout_seconds,
        )
        result = await self.services.pipeline.run(spec, audio, listener, watch=self._watch)
        if result.failure is not None:
            raise result.failure
        return result

    def _watch(self, result: JobResult) -> None:
        self.result = result  # the log line reports how far the job got, however it ends

    async def summarize(self, kind: SummarizationType, transcript: str) -> dict[str, str]:
        """`summary`, or `summaryError` when it failed: a summary never fails the request."""
        if kind is SummarizationType.NONE:
            return {}
        try:
            self.summary_fields = {"summary": await self.services.summarizer.run(kind, transcript)}
        except errors.SummaryFailed as exc:
            self.summary_fields = {"summaryError": exc.message}
        return self.summary_fields

    def error_body(self, exc: errors.ServiceError) -> dict[str, Any]:
        return error_body(exc, self.request_id, openai=self.error_style == "openai")

    def error_response(self, exc: errors.ServiceError) -> Response:
        response = error_response(exc, self.request_id, openai=self.error_style == "openai")
        if not self.body_started:
            # Refused before reading: close, or the client would upload it all for nothing.
            response.headers["Connection"] = "close"
        return response

    def record(self, *, code: str, status: int) -> None:
        """The request's one log line and its count."""
        named = self.request.scope.get("extensions", {}).get(REQUEST_ID_EXTENSION, {})
        refused = named.get("refused")
        if isinstance(refused, errors.ServiceError):
            code, status = refused.code, refused.status  # the parser's refusal, not a leaver
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
            fields["toTime"] = result.window_end
            fields.update(result.log_fields())
            fields["audioSeconds"] = result.duration
            count_job(result)
        if self.events.opened:
            fields["answer"] = "events"
        if self.upload is not None:
            fields["uploadResumptions"] = self.upload.resumptions
        metrics.REQUESTS.labels(endpoint=self.endpoint, code=code).inc()
        log_request(fields)


def count_job(result: JobResult) -> None:
    timings = result.timings
    durations = (
        ("receive", timings.receive),
        ("transcode", timings.transcode),
        ("transcribe", timings.transcribe),
        ("total", timings.total),
        ("after_last_byte", timings.after_last_byte),
    )
    for stage, seconds in durations:
        if seconds > 0:
            metrics.STAGE_SECONDS.labels(stage=stage).observe(seconds)
    metrics.BYTES.labels(direction="in").inc(result.input_size)
    metrics.BYTES.labels(direction="out").inc(result.mp3_size)
    if result.layout is not None and result.mode is not None:
        metrics.LAYOUTS.labels(format=result.layout.container, mode=result.mode.value).inc()
    if result.duration > 0:
        metrics.AUDIO_SECONDS.inc(result.duration)


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
