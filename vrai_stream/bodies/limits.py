"""A body read under a size limit and an idle timeout, metered as it arrives."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

from vrai_stream import errors


class BodyMeter:
    """Counts the bytes of a body as it passes, and when it ended."""

    def __init__(self) -> None:
        self.size = 0
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
        meter.size += len(chunk)
        if meter.size > max_bytes:
            raise errors.BodyTooLarge(f"The upload exceeds the limit of {max_bytes} bytes")
        yield chunk
    meter.last_byte_at = anyio.current_time()
    if meter.size == 0:
        raise errors.EmptyBody("The request has no body; send the audio as the request body")
