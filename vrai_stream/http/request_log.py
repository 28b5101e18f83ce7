"""Each request's one log line and its count: what it asked, how it ended, what it cost.

Per-user usage lives here (`userId`, `audioSeconds`), where it scales: a metric labelled by
user would keep one series per user for the life of the process.
"""

from __future__ import annotations

from typing import Any

import anyio

from vrai_stream import errors, metrics
from vrai_stream.http.context import REQUEST_ID_EXTENSION, RequestContext
from vrai_stream.pipeline.job import JobResult
from vrai_stream.telemetry import log_request


def record(context: RequestContext, *, code: str, status: int) -> None:
    """The request's one log line and its count."""
    named = context.request.scope.get("extensions", {}).get(REQUEST_ID_EXTENSION, {})
    refused = named.get("refused")
    if isinstance(refused, errors.ServiceError):
        code, status = refused.code, refused.status  # the parser's refusal, not a leaver
    fields: dict[str, Any] = {
        "requestId": context.request_id,
        "endpoint": context.endpoint,
        "method": context.request.method,
        "path": context.request.url.path,
        "userId": context.user_id,
        "status": status,
        "code": code,
        "seconds": round(anyio.current_time() - context.started, 3),
    }
    if "summaryError" in context.summary_fields:
        fields["summaryError"] = context.summary_fields["summaryError"]
    result = context.result
    if result is not None:
        fields["fromTime"] = result.spec.window.start
        fields["toTime"] = result.window_end
        fields.update(result.log_fields())
        fields["audioSeconds"] = result.duration
        count_job(result)
    if context.events.opened:
        fields["answer"] = "events"
    if context.upload is not None:
        fields["uploadResumptions"] = context.upload.resumptions
    metrics.REQUESTS.labels(endpoint=context.endpoint, code=code).inc()
    log_request(fields)


def count_job(result: JobResult) -> None:
    """The job's share of the service's metrics: its stages, bytes, layout and audio."""
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
