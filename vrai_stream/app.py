"""The Starlette app: routes, error responses, and the lifespan that owns shared parts.

Heavy parts (the `openai` SDK, a local Whisper model) warm up in the background after the
server listens; a request that needs one before it is ready waits for that one only.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import errors, metrics, routes
from .admission import Admission
from .auth import Authenticator, create_authenticator
from .child_process import kill_unreaped
from .debug_store import DebugStore, create_store
from .heap import trim_when_idle
from .memory_plan import MemoryPlan, detect_memory_limit, plan_memory
from .openapi import build_openapi
from .pipeline import Pipeline
from .responses import error_response
from .settings import Settings
from .spool import Budget, sweep_leftovers, usable_tmp_dir
from .summarize import Summarizer
from .telemetry import log_request
from .transcode import KILL_GRACE_SECONDS, find_ffmpeg
from .transcribers import Transcriber, create_transcriber
from .warmup import Lazy

logger = logging.getLogger("vrai_stream.app")

JOB_CLEANUP_SECONDS = KILL_GRACE_SECONDS + 1.0
"""How long jobs cancelled at the end of the drain get to stop their ffmpeg and clean up."""


@dataclass
class Services:
    """What every request shares; built once by the lifespan."""

    settings: Settings
    plan: MemoryPlan
    admission: Admission
    pipeline: Pipeline
    transcriber: Lazy[Transcriber]
    debug: DebugStore
    summarizer: Summarizer
    auth: Authenticator

    @classmethod
    def create(cls, settings: Settings, ffmpeg: str) -> Services:
        transcriber: Lazy[Transcriber] = Lazy(lambda: create_transcriber(settings))
        debug = create_store(settings)
        plan = plan_memory(settings, *detect_memory_limit(settings))
        logger.info("memory plan", extra={"plan": plan.describe()})
        return cls(
            settings=settings,
            plan=plan,
            admission=Admission(
                max_jobs=plan.max_jobs,
                max_queue=plan.max_queue,
                queue_timeout_seconds=settings.queue_timeout_seconds,
                retry_after_seconds=settings.retry_after_seconds,
            ),
            pipeline=Pipeline(
                settings,
                ffmpeg=ffmpeg,
                memory=Budget(plan.spool_memory_total_bytes),
                disk=Budget(settings.spool_disk_total_bytes),
                transcriber=transcriber.get,
                debug=debug,
                tmp_dir=usable_tmp_dir(settings.tmp_dir),
            ),
            transcriber=transcriber,
            debug=debug,
            summarizer=Summarizer(settings),
            auth=create_authenticator(settings.auth),
        )

    async def aclose(self) -> None:
        await self.debug.aclose()
        await self.summarizer.aclose()
        await self.auth.aclose()
        if self.transcriber.ready:
            await (await self.transcriber.get()).aclose()


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
                try:
                    yield
                finally:
                    # uvicorn has cancelled the jobs the drain did not see end, without
                    # waiting for them: let them stop their ffmpeg and remove their files.
                    with anyio.move_on_after(JOB_CLEANUP_SECONDS):
                        await services.admission.wait_idle()
                    kill_unreaped()
                    # Requests have drained; give their debug uploads the same grace.
                    with anyio.move_on_after(settings.drain_seconds):
                        await services.debug.wait_idle()
                    background.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await services.aclose()

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", prometheus_metrics, methods=["GET"]),
            Route("/openapi.json", openapi_document, methods=["GET"]),
            Route("/v1/transcriptions", routes.transcriptions, methods=["POST"]),
            Route("/v1/audio/transcriptions", routes.openai_transcriptions, methods=["POST"]),
            Route("/trim-and-transcribe", routes.trim_and_transcribe, methods=["POST"]),
            Route(
                "/trim-and-transcribe-multipart",
                routes.trim_and_transcribe_multipart,
                methods=["POST"],
            ),
        ],
        exception_handlers={HTTPException: http_error, Exception: unexpected_error},
        lifespan=lifespan,
    )


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
    """404s and 405s in the service's own error shape."""
    assert isinstance(exc, HTTPException)
    failure: errors.ServiceError
    if exc.status_code == 405:
        failure = errors.MethodNotAllowed("This method is not allowed on this path")
    elif exc.status_code == 404:
        failure = errors.NotFound(f"No endpoint at {request.url.path}")
    else:
        failure = errors.InvalidParameters(str(exc.detail))
        failure.status = exc.status_code
    request_id = uuid.uuid4().hex
    log_request(
        {
            "requestId": request_id,
            "method": request.method,
            "path": request.url.path,
            "status": failure.status,
            "code": failure.code,
        }
    )
    response = error_response(failure, request_id)
    response.headers.update(exc.headers or {})
    return response


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """A bug, not bad input: log it whole, tell the client as little as possible."""
    request_id = uuid.uuid4().hex
    logger.error("unhandled error", exc_info=exc, extra={"requestId": request_id})
    return error_response(errors.InternalError("Something went wrong on our side"), request_id)
