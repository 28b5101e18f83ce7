"""How the tests send requests: chunked bodies, multipart forms, a POST in the background."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx


async def chunked(
    data: bytes, *, chunk_size: int = 64 * 1024, delay: float = 0.0
) -> AsyncIterator[bytes]:
    """`data` as a chunked request body (an async generator makes httpx send it chunked)."""
    for offset in range(0, len(data), chunk_size):
        if delay:
            await anyio.sleep(delay)
        yield data[offset : offset + chunk_size]


def form_body(
    boundary: str,
    fields: dict[str, str],
    file_field: str,
    audio: bytes,
    *,
    filename: str,
    content_type: str,
) -> bytes:
    """A whole multipart form as apps send one: the fields first, then the recording."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    return b"".join(parts) + head + audio + b"\r\n" + f"--{boundary}--\r\n".encode()


class Pending:
    """A request sent in a task of its own, so that the test can act while the server works."""

    def __init__(self) -> None:
        self.answer: httpx.Response | None = None

    @property
    def response(self) -> httpx.Response:
        """The answer; asking before the request is over is the test's own mistake."""
        assert self.answer is not None, "the request has not been answered yet"
        return self.answer


@asynccontextmanager
async def posting(
    client: httpx.AsyncClient,
    url: str,
    *,
    content: bytes | AsyncIterable[bytes],
    headers: dict[str, str] | None = None,
) -> AsyncIterator[Pending]:
    """POST in the background while the block runs; leaving the block waits for the answer."""
    pending = Pending()

    async def send() -> None:
        pending.answer = await client.post(url, content=content, headers=headers)

    async with anyio.create_task_group() as group:
        group.start_soon(send)
        yield pending
