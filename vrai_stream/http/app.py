"""The Starlette app: routes, error responses, and the lifespan that owns shared parts.

Heavy parts (the `openai` SDK, a local Whisper model) warm up in the background after the
server listens; a request that needs one before it is ready waits for that one only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vrai_stream import errors, metrics
from vrai_stream.heap import trim_when_idle
from vrai_stream.http import page, routes, uploads
from vrai_stream.http.context import request_id_of
from vrai_stream.http.openapi import build_openapi
from vrai_stream.http.responses import error_response
from vrai_stream.media.child_process import kill_unreaped
from vrai_stream.media.ffmpeg import find_ffmpeg
from vrai_stream.media.ffmpeg_process import KILL_GRACE_SECONDS
from vrai_stream.metrics import UNROUTED
from vrai_stream.services import Services
from vrai_stream.settings import Settings
from vrai_stream.spool import sweep_leftovers
from vrai_stream.telemetry import log_request

logger = logging.getLogger("vrai_stream.http.app")

JOB_CLEANUP_SECONDS = KILL_GRACE_SECONDS + 1.0
"""How long jobs cancelled at the end of the drain get to stop their ffmpeg and clean up."""


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    ffmpeg = find_ffmpeg(settings.ffmpeg)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = Services.create(settings, ffmpeg)
        app.state.services = services
        # One line says where users' recordings go: a bucket, a folder and its limits, or nowhere.
        where, fields = services.debug.describe()
        logger.info(where, extra={"debugCopies": fields})
        sweep_leftovers(services.pipeline.tmp_dir)
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(services.transcriber.warm_up, "transcriber")
                background.start_soon(services.auth.warm_up)
                background.start_soon(trim_when_idle, services.admission)
                services.debug.start(background)
                services.webhooks.start(background)
                if services.state is not None:
                    services.state.start(background)
                try:
                    yield
                finally:
                    # A waiting upload could only be resumed on this machine: end it now.
                    services.uploads.end_all("drained")
                    # uvicorn has cancelled the jobs the drain did not see end, without
                    # waiting for them: let them stop their ffmpeg and remove their files.
                    with anyio.move_on_after(JOB_CLEANUP_SECONDS):
                        await services.admission.wait_idle()
                    kill_unreaped()
                    # Requests have drained; give their debug uploads and shared records
                    # the same grace.
                    with anyio.move_on_after(settings.drain_seconds):
                        await services.debug.wait_idle()
                        await services.webhooks.wait_idle()  # and their webhooks
                        if services.state is not None:
                            await services.state.work.wait_idle()
                    background.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await services.aclose()

    audio = [
        Route("/v1/transcriptions", routes.transcriptions, methods=["POST"]),
        Route("/v1/audio/transcriptions", routes.openai_transcriptions, methods=["POST"]),
        Route("/trim-and-transcribe", routes.trim_and_transcribe, methods=["POST"]),
        Route(
            "/trim-and-transcribe-multipart",
            routes.trim_and_transcribe_multipart,
            methods=["POST"],
        ),
    ]
    return Starlette(
        routes=[
            Route("/", counted("page", page.index), methods=["GET"]),
            Route("/health", counted("health", health), methods=["GET"]),
            Route("/metrics", counted("metrics", prometheus_metrics), methods=["GET"]),
            Route("/openapi.json", counted("openapi", openapi_document), methods=["GET"]),
            Route("/v1/transcriptions/{request_id}", routes.transcription_by_id, methods=["GET"]),
            Route(
                "/v1/uploads/{machine}/{upload_id}",
                uploads.upload_resource,
                methods=["HEAD", "PATCH", "DELETE"],
            ),
            *audio,
            *(
                # The resumable-upload draft: what an audio endpoint takes, before a POST.
                Route(route.path, counted("options", uploads.options), methods=["OPTIONS"])
                for route in audio
            ),
        ],
        exception_handlers={HTTPException: http_error, Exception: unexpected_error},
        lifespan=lifespan,
    )


def counted(
    name: str, handler: Callable[[Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that reads no body, answered as every answer is: with `X-Request-Id`,
    logged and counted once (the audio endpoints' `Answer` does the same for them)."""

    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        request_id = request_id_of(request.scope)
        response = await handler(request)
        response.headers["X-Request-Id"] = request_id
        log_request(
            {
                "requestId": request_id,
                "endpoint": name,
                "method": request.method,
                "path": request.url.path,
                "status": response.status_code,
                "code": "ok",
            }
        )
        metrics.REQUESTS.labels(endpoint=name, code="ok").inc()
        return response

    return run


async def health(request: Request) -> Response:
    services: Services = request.app.state.services
    return JSONResponse(
        {
            "status": "ok",
            "transcriber": services.settings.transcriber,
            "auth": services.settings.auth.kind,
            "transcriberReady": services.transcriber.ready,
            "maxJobs": services.admission.max_jobs,
            "maxQueue": services.admission.max_queue,
            "jobsRunning": services.admission.running,
            "jobsWaiting": services.admission.waiting,
        }
    )


async def openapi_document(request: Request) -> Response:
    return JSONResponse(build_openapi())


async def prometheus_metrics(request: Request) -> Response:
    services: Services = request.app.state.services
    metrics.JOBS.labels(state="running").set(services.admission.running)
    metrics.JOBS.labels(state="queued").set(services.admission.waiting)
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def http_error(request: Request, exc: Exception) -> Response:
    """404s and 405s in the service's own error shape, logged and counted as every answer."""
    assert isinstance(exc, HTTPException)
    failure: errors.ServiceError
    if exc.status_code == 405:
        failure = errors.MethodNotAllowed("This method is not allowed on this path")
    elif exc.status_code == 404:
        failure = errors.NotFound(f"No endpoint at {request.url.path}")
    else:
        failure = errors.InvalidParameters(str(exc.detail))
        failure.status = exc.status_code
    request_id = request_id_of(request.scope)
    log_request(
        {
            "requestId": request_id,
            "endpoint": UNROUTED,
            "method": request.method,
            "path": request.url.path,
            "status": failure.status,
            "code": failure.code,
        }
    )
    metrics.REQUESTS.labels(endpoint=UNROUTED, code=failure.code).inc()
    response = error_response(failure, request_id)
    response.headers.update(exc.headers or {})
    return response


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """A bug, not bad input: log it whole, tell the client as little as possible."""
    request_id = request_id_of(request.scope)
    logger.error("unhandled error", exc_info=exc, extra={"requestId": request_id})
    fields = {"requestId": request_id, "endpoint": UNROUTED, "status": 500, "code": "bug"}
    log_request({**fields, "method": request.method, "path": request.url.path})
    metrics.REQUESTS.labels(endpoint=UNROUTED, code="bug").inc()
    return error_response(errors.InternalError("Something went wrong on our side"), request_id)
