"""The buffered design the service replaced, rebuilt only to be measured against.

The old service read the whole upload into memory, wrote it to /tmp, ran ffmpeg file to
file, read the MP3 back, uploaded both debug copies to S3 one after the other, then
transcribed.  This app does exactly that, in the same stack as the service (Starlette on
uvicorn, anyio), with the same settings and parts, so that a comparison measures the
design and nothing else:

* the same environment variables, read by `vrai_stream.settings.Settings.from_env()`;
* the same ffmpeg command (`vrai_stream.media.ffmpeg.build_command`, memory cap included),
  except that its input is the temp file and its output another temp file;
* the same transcriber (`vrai_stream.speech.transcribers.create_transcriber`), the same S3 SDK
  (aioboto3, `AWS_*` variables) and key names, the same JSON shapes and error codes.

What it deliberately lacks is what the streaming design adds: no admission control, no
streaming, no overlap of upload and transcode, no concurrent copies.  It adds no artificial
slowness either: blocking file I/O runs in worker threads, as Node's `fs` did.

One JSON log line per request on stdout carries the same `request.timings` the service
logs, so `bench/load.py` reads both servers' timings the same way.

Run: .venv/bin/python -m bench.baseline [--host 127.0.0.1] [--port 8090]
(`VRAI_DEBUG_STORE=s3` with a bucket turns on the copies; `dir` is treated as off.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vrai_stream import errors
from vrai_stream.debug_store.base import CopyContext, Keys, metadata
from vrai_stream.http.responses import error_response
from vrai_stream.media.failures import explain_failure
from vrai_stream.media.ffmpeg import build_command, find_ffmpeg
from vrai_stream.media.ffmpeg_process import TranscodeOutcome
from vrai_stream.media.mp3 import mp3_duration
from vrai_stream.media.sniff import SNIFF_LIMIT_BYTES, Layout, sniff
from vrai_stream.media.window import Window, parse_window
from vrai_stream.settings import ANONYMOUS, Settings
from vrai_stream.speech.transcribers import create_transcriber
from vrai_stream.speech.transcribers.base import Audio, Transcriber

TMP_PREFIX = "vrai-baseline-"


def file_to_file_command(
    settings: Settings, ffmpeg: str, window: Window, source: Path, target: Path
) -> list[str]:
    """The service's own ffmpeg command, reading `source` and writing `target`.

    Shared with `bench/load.py`, whose raw ffmpeg runs use it too: the service, the
    baseline and raw ffmpeg then differ only in what surrounds the same process.
    """
    command = build_command(
        ffmpeg,
        window,
        settings.mp3_bitrate_kbps,
        input_path=source,
        memory_limit_bytes=settings.ffmpeg_memory_bytes,
    )
    assert command[-1] == "pipe:1", command
    return [*command[:-1], "-y", str(target)]


@dataclass
class Parts:
    """What every request shares, built once at start-up like the service's `Services`."""

    settings: Settings
    ffmpeg: str
    transcriber: Transcriber
    s3: Any = None


async def _s3_client(settings: Settings, stack: contextlib.AsyncExitStack) -> Any:
    """The same SDK and configuration the service uses, or None when copies are off."""
    if settings.debug_store != "s3":
        return None
    import aioboto3
    from aiobotocore.config import AioConfig

    config = AioConfig(
        connect_timeout=settings.debug_s3_timeout_seconds,
        read_timeout=settings.debug_s3_timeout_seconds,
        retries={"max_attempts": 3, "mode": "standard"},
        signature_version="s3v4",
    )
    return await stack.enter_async_context(aioboto3.Session().client("s3", config=config))


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Load the transcriber before listening: the old service had no background warm-up."""
    settings = Settings.from_env()
    transcriber = await anyio.to_thread.run_sync(create_transcriber, settings)
    async with contextlib.AsyncExitStack() as stack:
        app.state.parts = Parts(
            settings=settings,
            ffmpeg=find_ffmpeg(settings.ffmpeg),
            transcriber=transcriber,
            s3=await _s3_client(settings, stack),
        )
        try:
            yield
        finally:
            await transcriber.aclose()


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "transcriberReady": True, "design": "buffered"})


async def transcriptions(request: Request) -> Response:
    """`POST /v1/transcriptions`, the buffered way; errors in the service's shape."""
    request_id = uuid.uuid4().hex
    started = time.monotonic()
    log: dict[str, Any] = {
        "requestId": request_id,
        "status": 200,
        "design": "buffered",
        "timings": {"receive": 0.0, "transcode": 0.0, "transcribe": 0.0},
    }
    try:
        response = await _transcribe(request, request_id, started, log)
    except errors.ServiceError as failure:
        log.update(status=failure.status, code=failure.code)
        response = error_response(failure, request_id)
    log["timings"]["total"] = round(time.monotonic() - started, 3)
    print(json.dumps({"message": "request", "request": log}), flush=True)
    return response


async def _transcribe(
    request: Request, request_id: str, started: float, log: dict[str, Any]
) -> Response:
    parts: Parts = request.app.state.parts
    settings = parts.settings
    timings = log["timings"]
    window = parse_window(request.query_params, max_window_seconds=settings.max_window_seconds)
    want_mp3 = "audio/mpeg" in request.headers.get("accept", "")
    body = await request.body()  # the whole upload, in memory: the design being measured
    last_byte = time.monotonic()
    timings["receive"] = round(last_byte - started, 3)
    if not body:
        raise errors.EmptyBody("The request has no body; send the audio as the request body")
    layout = sniff(body[:SNIFF_LIMIT_BYTES], complete=True)
    log.update(inputSize=len(body), format=layout.container if layout else None)
    folder = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=settings.tmp_dir))
    try:
        source, target = folder / "input", folder / "output.mp3"
        await anyio.to_thread.run_sync(source.write_bytes, body)
        began = time.monotonic()
        await _ffmpeg(file_to_file_command(settings, parts.ffmpeg, window, source, target), parts)
        timings["transcode"] = round(time.monotonic() - began, 3)
        mp3 = await anyio.to_thread.run_sync(target.read_bytes)
        duration = mp3_duration(mp3)
        if duration <= 0:
            raise errors.NoAudioInWindow(
                f"The recording has no audio between {window.start:g} s and {window.end:g} s"
            )
        await _debug_copies(parts, request_id, window, layout, body, mp3)
        del body
        text, language = "", None
        if not want_mp3:
            began = time.monotonic()
            with target.open("rb") as file:
                transcript = await parts.transcriber.transcribe(Audio(file, duration))
            timings["transcribe"] = round(time.monotonic() - began, 3)
            text, language = transcript.text, transcript.language
    finally:
        await anyio.to_thread.run_sync(shutil.rmtree, folder, True)
    timings["afterLastByte"] = round(time.monotonic() - last_byte, 3)
    log.update(fileSize=len(mp3), duration=duration)
    if want_mp3:
        headers = {"X-Request-Id": request_id, "X-Audio-Duration": f"{duration:.3f}"}
        return Response(mp3, media_type="audio/mpeg", headers=headers)
    timings["total"] = round(time.monotonic() - started, 3)
    return JSONResponse(
        {
            "success": True,
            "requestId": request_id,
            "transcription": text,
            "language": language,
            "duration": duration,
            "fromTime": window.start,
            "toTime": window.end,
            "fileSize": len(mp3),
            "inputSize": log["inputSize"],
            "format": log["format"],
            "mode": "buffered",
            "timings": timings,
        },
        headers={"X-Request-Id": request_id},
    )


async def _ffmpeg(command: list[str], parts: Parts) -> None:
    """Run ffmpeg file to file under the service's timeout; map failures as it does."""
    began = time.monotonic()
    timed_out = False
    done: subprocess.CompletedProcess[bytes] | None = None
    with anyio.move_on_after(parts.settings.ffmpeg_timeout_seconds):
        done = await anyio.run_process(command, check=False, stdin=subprocess.DEVNULL)
    if done is None:
        timed_out = True
    if timed_out or (done is not None and done.returncode != 0):
        raise explain_failure(
            TranscodeOutcome(
                returncode=done.returncode if done else None,
                timed_out=timed_out,
                stderr_tail=done.stderr.decode("utf-8", "replace")[-4096:] if done else "",
                seconds=time.monotonic() - began,
            )
        )


async def _debug_copies(
    parts: Parts,
    request_id: str,
    window: Window,
    layout: Layout | None,
    body: bytes,
    mp3: bytes,
) -> None:
    """Two PUTs, one after the other, before transcribing, as the old service did."""
    if parts.s3 is None:
        return
    settings = parts.settings
    context = CopyContext.now(request_id, ANONYMOUS, window.start, window.end)
    keys = Keys.for_job(settings.debug_prefix, context, layout)
    tags = metadata(context, layout, "ok")
    for key, data, kind in (
        (keys.input, body, layout.content_type if layout else "application/octet-stream"),
        (keys.output, mp3, "audio/mpeg"),
    ):
        await parts.s3.put_object(
            Bucket=settings.debug_bucket, Key=key, Body=data, ContentType=kind, Metadata=tags
        )


def create_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/transcriptions", transcriptions, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args(argv)
    # The same uvicorn as the service, without its draining and access log.
    uvicorn.run(create_app(), host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
