"""The steps every audio endpoint shares, in the order they must happen.

Authentication and admission come before one byte of the body is read; then the
pipeline; then the optional summary.  Leaving the `HttpJob` block turns a `ServiceError`
into its JSON response, and logs and counts the request whatever happened.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from . import errors, metrics
from .auth import ANONYMOUS
from .ingest import BodyMeter, check_declared_length, limited
from .pipeline import JobResult, JobSpec
from .responses import error_response
from .settings import MiB
from .summarize import SummarizationType
from .telemetry import log_request
from .uploads import BodyDecoder, Upload, read_upload

if TYPE_CHECKING:
    from .app import Services


ErrorStyle = Literal["service", "openai"]


class HttpJob:
    def __init__(self, request: Request, endpoint: str, *, error_style: ErrorStyle = "service"):
        self.request = request
        self.endpoint = endpoint
        self.error_style = error_style
        self.services: Services = request.app.state.services
        self.request_id = uuid.uuid4().hex
        self.user_id = ANONYMOUS
        self.started = anyio.current_time()
        self.result: JobResult | None = None
        self.response: Response | None = None
        self.failure: errors.ServiceError | None = None
        self.summary_fields: dict[str, str] = {}
        self._body_started = False

    async def __aenter__(self) -> HttpJob:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if isinstance(exc, errors.ServiceError):
            self.failure = exc
            self.response = error_response(
                exc, self.request_id, openai=self.error_style == "openai"
            )
            if not self._body_started:
                # Refused before reading: close, or the client would upload it all for nothing.
                self.response.headers["Connection"] = "close"
        elif exc is not None:
            code = "cancelled" if isinstance(exc, anyio.get_cancelled_exc_class()) else "bug"
            self._record(code=code, status=500)
            return False
        self._record(
            code=self.failure.code if self.failure else "ok",
            status=self.failure.status if self.failure else 200,
        )
        return exc is not None

    async def authenticate(self) -> None:
        """Who is asking, from the Authorization header; a 401 never reads the body."""
        principal = await self.services.auth.authenticate(self.request.headers.get("authorization"))
        self.user_id = principal.user_id

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
        self._body_started = True
        return request_body(self.request)

    async def read_upload(self, decoder: BodyDecoder, required: Collection[str]) -> Upload:
        """Read a form or JSON body until the fields in `required` are known (see `uploads`)."""
        settings = self.services.settings
        raw = limited(
            self.body(),
            max_bytes=self.encoded_body_limit,
            idle_timeout=settings.idle_timeout_seconds,
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

    async def run(self, spec: JobSpec, audio: AsyncIterator[bytes]) -> JobResult:
        result = self.new_result(spec)
        await self.services.pipeline.run(spec, audio, result)
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

    def _record(self, *, code: str, status: int) -> None:
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
    if result.layout is not None:
        metrics.LAYOUTS.labels(format=result.layout.container, mode=result.layout.mode.value).inc()
    if result.duration > 0:
        metrics.AUDIO_SECONDS.labels(user=user_id).inc(result.duration)


async def request_body(request: Request) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; a vanished client becomes a `ClientDisconnected`."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise errors.ClientDisconnected("The client disconnected during the upload") from None
