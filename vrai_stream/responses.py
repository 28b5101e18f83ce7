"""The bodies of the public contract: one success shape, one error shape."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

from . import errors
from .pipeline import JobResult


def success_body(result: JobResult) -> dict[str, Any]:
    spec = result.spec
    transcript = result.transcript
    return {
        "success": True,
        "requestId": spec.request_id,
        "transcription": transcript.text if transcript else "",
        "language": transcript.language if transcript else None,
        "duration": result.duration,
        "fromTime": spec.window.start,
        "toTime": spec.window.end,
        "fileSize": result.mp3_size,
        "inputSize": result.input_size,
        "format": result.layout.container if result.layout else None,
        "mode": result.layout.mode.value if result.layout else None,
        "timings": result.timings.as_dict(),
    }


def mp3_response(result: JobResult) -> Response:
    """The trimmed MP3 itself, for `Accept: audio/mpeg`."""
    headers = {
        "X-Request-Id": result.spec.request_id,
        "X-Audio-Duration": f"{result.duration:.3f}",
    }
    return Response(result.mp3, media_type="audio/mpeg", headers=headers)


def error_response(
    exc: errors.ServiceError, request_id: str, *, openai: bool = False
) -> JSONResponse:
    """The error shape; `openai` adds OpenAI's `error` object, which OpenAI SDKs read."""
    headers = {"X-Request-Id": request_id, **exc.headers}
    body = exc.body(request_id)
    if openai:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        body["error"] = {"message": exc.message, "type": kind, "code": exc.code, "param": None}
    return JSONResponse(body, status_code=exc.status, headers=headers)
