"""What a request brings: its window parameters and its body, under size and idle limits."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping

import anyio

from . import errors
from .transcode import Window


def parse_window(
    params: Mapping[str, str], *, max_window_seconds: float, max_end: float | None = None
) -> Window:
    """`fromTime`/`toTime` in seconds; `toTime` defaults to the longest window allowed.

    `max_end` caps `toTime` itself, as the legacy API did (`toTime <= 300`).
    """
    start = _seconds(params, "fromTime") or 0.0
    end = _seconds(params, "toTime")
    if end is None:
        end = start + max_window_seconds if max_end is None else max_end
    if start < 0:
        raise errors.InvalidWindow("fromTime must be 0 or more")
    if end <= start:
        raise errors.InvalidWindow("toTime must be greater than fromTime")
    if end - start > max_window_seconds:
        raise errors.InvalidWindow(
            f"The window is {end - start:g} s long; at most {max_window_seconds:g} s is allowed"
        )
    if max_end is not None and end > max_end:
        raise errors.InvalidWindow(f"toTime must be at most {max_end:g}")
    return Window(start=start, end=end)


def _seconds(params: Mapping[str, str], name: str) -> float | None:
    raw = params.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise errors.InvalidWindow(
            f"{name} must be a number of seconds, got {raw[:40]!r}"
        ) from None
    if not math.isfinite(value):
        raise errors.InvalidWindow(f"{name} must be a finite number of seconds")
    return value


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


class BodyMeter:
    """Counts the bytes of a body as it passes, and when it started and ended."""

    def __init__(self) -> None:
        self.size = 0
        self.first_byte_at: float | None = None
        self.last_byte_at: float | None = None


async def limited(
    chunks: AsyncIterator[bytes],
    *,
    max_bytes: int,
    idle_timeout: float,
    meter: BodyMeter,
) -> AsyncIterator[bytes]:
    """Yield the body's chunks; fail on too many bytes or too long a silence between them."""
    while True:
        try:
            with anyio.fail_after(idle_timeout):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise errors.UploadTimeout(
                f"No data arrived for {idle_timeout:g} s; the upload was abandoned"
            ) from None
        if not chunk:
            continue
        if meter.first_byte_at is None:
            meter.first_byte_at = anyio.current_time()
        meter.size += len(chunk)
        if meter.size > max_bytes:
            raise errors.BodyTooLarge(f"The upload exceeds the limit of {max_bytes} bytes")
        yield chunk
    meter.last_byte_at = anyio.current_time()
    if meter.size == 0:
        raise errors.EmptyBody("The request has no body; send the audio as the request body")
