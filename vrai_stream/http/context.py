"""One request to an audio endpoint: who asks, its body, its job's result, and its log line.

Handlers read their request shape and call `answers.answer_job`; this object carries what
the wrappers around them (`http.answer`: idempotency, resumable uploads, logging) and the
job share about the one request.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup
from starlette.requests import Request
from starlette.responses import Response

from vrai_stream import errors
from vrai_stream.bodies.forms import BodyDecoder, Submission, read_submission
from vrai_stream.bodies.limits import BodyMeter, limited
from vrai_stream.http.events import Events
from vrai_stream.http.request_body import check_declared_length, request_body
from vrai_stream.http.responses import error_body, error_response
from vrai_stream.http.resumable import begin_upload
from vrai_stream.pipeline.job import JobListener, JobResult, JobSpec
from vrai_stream.services import Services
from vrai_stream.settings import ANONYMOUS
from vrai_stream.speech.summarize import SummarizationType
from vrai_stream.state.answers import RunningJob
from vrai_stream.state.claims import Claim
from vrai_stream.uploads.idempotency import Entry, Fingerprint
from vrai_stream.uploads.session import UploadSession
from vrai_stream.webhooks.destinations import Destination

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
        self.callback: Destination | None = None
        """Where the answer is POSTed too (`callbackUrl`), once vetted."""
        self.shared_claim: Claim | None = None
        """The key's claim in the shared bucket, when there is one and this request won it."""
        self.shared_job: RunningJob | None = None
        """The job's record in the shared bucket, asked for by its id from any machine."""
        self.fingerprint: Fingerprint | None = None
        """The request's hash as its body streams, when it carries an `Idempotency-Key`."""
        self.feeders: TaskGroup | None = None
        """Where the task feeding a resumable upload from this connection runs."""
        self.body_limit = 0
        """The most bytes this request's body may hold: set by `check_body_length`, which
        every audio handler calls before it reads the body."""
        self._authenticated = False

    async def authenticate(self) -> None:
        """Who is asking, from the Authorization header; a 401 never reads the body."""
        if self._authenticated:
            return
        principal = await self.services.auth.authenticate(self.request.headers.get("authorization"))
        self.user_id = principal.user_id
        self._authenticated = True

    def check_body_length(self, *, encoded: bool = False) -> None:
        """Refuse a body too large by its `Content-Length`; `encoded`: it carries the audio
        as base64 or in a form.  The limit checked is the one a resumable upload announces."""
        settings = self.services.settings
        self.body_limit = (
            self.services.settings.max_encoded_body_bytes if encoded else settings.max_body_bytes
        )
        check_declared_length(self.request.headers, self.body_limit)

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """A job slot: the answer's `timings` count from the moment it is given."""
        async with self.services.admission.slot():
            self.admitted_at = anyio.current_time()
            yield

    async def check_callback(self) -> None:
        """Vet the `callbackUrl`, if any, before the body is read (after authentication: a
        caller without a token learns that first)."""
        urls = self.request.query_params.getlist("callbackUrl")
        if not urls:
            return
        await self.authenticate()
        if len(urls) > 1:
            raise errors.CallbackNotAllowed("Give one callbackUrl")
        self.callback = await self.services.webhooks.vet(urls[0])

    @property
    def answer_outlives_connection(self) -> bool:
        """Someone other than this connection may collect the answer: a retry with the same
        key, the request that resumes the upload, or the `callbackUrl`.  The job then runs to
        its end even if this client leaves after its last byte."""
        return self.key_entry is not None or self.upload is not None or self.callback is not None

    def body(self) -> AsyncIterator[bytes]:
        """The body, read once the request is authenticated and admitted.

        When the client speaks the resumable-upload draft, the body becomes an upload that
        outlives this connection: a 104 tells the client where to resume it.  Call it before
        the answer's events open: the 104 must go out before the answer's head.
        """
        if self.feeders is not None and self.upload is None:
            assert self.body_limit > 0, "check_body_length comes before the body"
            self.upload = begin_upload(
                self.request,
                self.services.uploads,
                self.user_id,
                self.feeders,
                max_size=self.body_limit,
                request_id=self.request_id,
            )
        upload = self.upload
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

    def idle_timeout(self) -> float:
        """A resumable upload times its own silences (and waits out a dropped connection)."""
        return math.inf if self.upload else self.services.settings.idle_timeout_seconds

    async def read_submission(self, decoder: BodyDecoder, required: Collection[str]) -> Submission:
        """Read a form or JSON body until the fields in `required` are known (`bodies.forms`)."""
        raw = limited(
            self.body(),
            max_bytes=self.services.settings.max_encoded_body_bytes,
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
        self.services.results.started(self.request_id, self.user_id)
        state = self.services.state
        if state is not None:
            self.shared_job = state.answers.started(self.request_id, self.user_id)
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
