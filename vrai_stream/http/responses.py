"""The bodies of the public contract: one success shape, one error shape, the transcript formats.

Leaves say what they mean (an error's retry delay, its challenge); the headers are made here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import IO, Any

import anyio
import anyio.to_thread
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from vrai_stream import errors
from vrai_stream.pipeline.job import JobResult
from vrai_stream.speech.formats import ResponseFormat, format_transcript
from vrai_stream.speech.transcribers.base import Transcript
from vrai_stream.spool import Spool
from vrai_stream.uploads.recorded import RecordedAnswer

SPOOL_PIECE_BYTES = 256 * 1024


def success_body(result: JobResult) -> dict[str, Any]:
    spec = result.spec
    transcript = result.transcript
    return {
        "success": True,
        "requestId": spec.request_id,
        "transcription": transcript.text if transcript else "",
        "language": transcript.language if transcript else None,
        "segments": [
            {"start": part.start, "end": part.end, "text": part.text}
            for part in (transcript.segments if transcript else ())
        ],
        "duration": result.duration,
        "fromTime": spec.window.start,
        "toTime": result.window_end,
        "fileSize": result.mp3_size,
        "inputSize": result.input_size,
        "format": result.layout.container if result.layout else None,
        "mode": result.mode.value if result.mode else None,
        "truncated": result.truncated,
        "declaredSeconds": _rounded(result.declared_seconds),
        "timings": result.timings.as_dict(),
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def mp3_response(result: JobResult) -> Response:
    """The trimmed MP3 itself, for `Accept: audio/mpeg`, streamed from its spool."""
    assert result.mp3 is not None
    headers = {
        "X-Request-Id": result.spec.request_id,
        "X-Audio-Duration": f"{result.duration:.3f}",
        **({"X-Truncated": "true"} if result.truncated else {}),
        "Content-Length": str(result.mp3.size),
    }
    return SpoolResponse(result.mp3, media_type="audio/mpeg", headers=headers)


class SpoolResponse(StreamingResponse):
    """Streams a spool in pieces, so a long window's MP3 is never whole in memory, and
    closes it however the answer ends: sent, or cut short by a client that left."""

    def __init__(self, spool: Spool, **kwargs: Any) -> None:
        self._spool = spool
        try:
            reader = spool.reader()
        except BaseException:
            spool.close()
            raise
        super().__init__(self._pieces(reader), **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._spool.close()

    @staticmethod
    async def _pieces(reader: IO[bytes]) -> AsyncIterator[bytes]:
        while piece := await anyio.to_thread.run_sync(reader.read, SPOOL_PIECE_BYTES):
            yield piece


def error_response(
    exc: errors.ServiceError, request_id: str, *, openai: bool = False
) -> JSONResponse:
    """The error shape; `openai` adds OpenAI's `error` object, which OpenAI SDKs read."""
    headers = {"X-Request-Id": request_id, **_error_headers(exc)}
    return JSONResponse(error_body(exc, request_id, openai=openai), exc.status, headers=headers)


def error_body(
    exc: errors.ServiceError, request_id: str, *, openai: bool = False
) -> dict[str, Any]:
    """The error response's body (also the data of an `error` event)."""
    body = exc.body(request_id)
    if openai:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        body["error"] = {"message": exc.message, "type": kind, "code": exc.code, "param": None}
    return body


def _error_headers(exc: errors.ServiceError) -> dict[str, str]:
    """What the error says, as headers: when to retry, how to authenticate."""
    headers = {}
    if exc.retry_after_seconds is not None:
        headers["Retry-After"] = str(exc.retry_after_seconds)
    if isinstance(exc, errors.UploadOffsetMismatch):
        headers.update(exc.fields)
    if isinstance(exc, errors.Unauthorized):
        headers["WWW-Authenticate"] = exc.challenge
    return headers


def transcript_response(
    transcript: Transcript, response_format: ResponseFormat, duration: float
) -> Response:
    """The transcript as OpenAI's transcription API answers it (`speech.formats`)."""
    content = format_transcript(transcript, response_format, duration)
    if isinstance(content, dict):
        return JSONResponse(content)
    media_type = "text/vtt" if response_format == "vtt" else "text/plain"
    return PlainTextResponse(content, media_type=media_type)


class RecordedResponse(Response):
    """A recorded answer sent again (`uploads.recorded`): as it was, or, while it is still
    being sent to its first client, as it goes."""

    def __init__(self, recording: RecordedAnswer, extra_headers: Mapping[str, str]) -> None:
        assert recording.status is not None, "a recording is replayed once it has started"
        self.status_code = recording.status
        self.background = None
        self._recording = recording
        pairs = [*recording.headers, *extra_headers.items()]
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        async for chunk in self._recording.follow():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
