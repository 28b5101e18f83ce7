"""The request's body as the audio endpoints read it, and its declared length checked first."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from starlette.requests import ClientDisconnect, Request

from vrai_stream import errors


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


async def request_body(request: Request) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; a vanished client becomes a `ClientDisconnected`."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise errors.ClientDisconnected("The client disconnected during the upload") from None
