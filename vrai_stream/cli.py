"""`vrai-stream serve` and `vrai-stream transcribe FILE`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio

from vrai_stream.media.ffmpeg import FfmpegNotFound
from vrai_stream.settings import Settings, SettingsError
from vrai_stream.telemetry import configure_logging

READ_CHUNK_BYTES = 64 * 1024


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vrai-stream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="address to listen on (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: PORT or 8080)")

    transcribe = commands.add_parser("transcribe", help="transcribe a file, print the API's JSON")
    transcribe.add_argument("file", type=Path)
    transcribe.add_argument("--from-time", type=float, default=0.0, metavar="S")
    transcribe.add_argument("--to-time", type=float, default=None, metavar="S")

    bucket = commands.add_parser("debug-bucket", help="manage the S3 bucket of debug copies")
    bucket_commands = bucket.add_subparsers(dest="bucket_command", required=True)
    setup = bucket_commands.add_parser(
        "setup", help="put the recommended lifecycle rules on the bucket"
    )
    setup.add_argument(
        "--expire-days", type=int, default=30, help="delete debug copies after N days"
    )

    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"vrai-stream: configuration error: {exc}", file=sys.stderr)
        return 2
    # Commands that print JSON keep stdout for it; their logs go to stderr.
    configure_logging(settings.log_level, sys.stdout if args.command == "serve" else sys.stderr)
    try:
        if args.command == "serve":
            return _serve(settings, host=args.host, port=args.port)
        if args.command == "debug-bucket":
            return anyio.run(_setup_bucket, settings, args.expire_days)
        return anyio.run(_transcribe, settings, args.file, args.from_time, args.to_time)
    except FfmpegNotFound as exc:
        print(f"vrai-stream: {exc}", file=sys.stderr)
        return 2


def _serve(settings: Settings, *, host: str | None, port: int | None) -> int:
    from vrai_stream.http.app import create_app
    from vrai_stream.http.server import serve

    serve(create_app(settings), settings, host=host or settings.host, port=port)
    return 0


async def _transcribe(
    settings: Settings, file: Path, from_time: float, to_time: float | None
) -> int:
    from vrai_stream import errors
    from vrai_stream.http.responses import success_body
    from vrai_stream.media.ffmpeg import find_ffmpeg
    from vrai_stream.media.window import parse_window
    from vrai_stream.pipeline.job import JobSpec
    from vrai_stream.services import Services

    request_id = uuid.uuid4().hex
    # A file on this machine needs no debug copy of itself.
    settings = dataclasses.replace(settings, debug_store="off")
    services = Services.create(settings, find_ffmpeg(settings.ffmpeg))
    try:
        params = {"fromTime": str(from_time)}
        if to_time is not None:
            params["toTime"] = str(to_time)
        window = parse_window(params, max_window_seconds=settings.max_window_seconds)
        result = await services.pipeline.run(
            JobSpec(request_id=request_id, window=window), _read_file(file)
        )
        if result.failure is not None:
            raise result.failure
    except errors.ServiceError as exc:
        print(json.dumps(exc.body(request_id), indent=2))
        return 1
    except OSError as exc:
        print(f"vrai-stream: cannot read {file}: {exc.strerror}", file=sys.stderr)
        return 2
    finally:
        await services.aclose()
    print(json.dumps(success_body(result), indent=2))
    return 0


async def _setup_bucket(settings: Settings, expire_days: int) -> int:
    if settings.debug_store != "s3":
        print(
            "vrai-stream: debug copies do not go to S3: set VRAI_DEBUG_BUCKET (or BUCKET_NAME)",
            file=sys.stderr,
        )
        return 2
    if expire_days < 1:
        print("vrai-stream: --expire-days must be at least 1", file=sys.stderr)
        return 2
    from vrai_stream.debug_store.s3 import apply_lifecycle

    rules = await apply_lifecycle(settings, expire_days)
    print(json.dumps(rules, indent=2, default=str))
    return 0


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as file:
        while chunk := await file.read(READ_CHUNK_BYTES):
            yield chunk


if __name__ == "__main__":
    raise SystemExit(main())
