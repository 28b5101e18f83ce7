"""Server-Sent Events as a client reads them: a whole stream parsed strictly, or events read one
by one off a raw connection while the upload is still being sent (httpx sends the whole body
before it reads a byte of the answer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any]


def parse_event(block: str) -> Event | None:
    """One event: exactly one `event:` line and one line of JSON `data:`; None for comments."""
    lines = [line for line in block.split("\n") if line and not line.startswith(":")]
    if not lines:
        return None
    assert len(lines) == 2, f"an event is one event: line and one data: line, not {block!r}"
    name, data = lines
    assert name.startswith("event: "), block
    assert data.startswith("data: "), block
    parsed = json.loads(data.removeprefix("data: "))
    assert isinstance(parsed, dict), block
    return Event(name.removeprefix("event: "), parsed)


def parse_events(text: str) -> list[Event]:
    """Every event of a whole stream, which must end with a blank line."""
    assert text.endswith("\n\n"), f"the stream ends mid-event: {text[-200:]!r}"
    events = [parse_event(block) for block in text.split("\n\n")]
    return [event for event in events if event is not None]


class RawEvents:
    """The answer to a request sent over `stream` by hand: its head, then its events as they
    come (the body chunked, as the service sends events)."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self._stream = stream
        self._buffer = b""
        self._text = ""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.comments = 0

    async def _more(self) -> None:
        self._buffer += await self._stream.receive()

    async def head(self) -> None:
        while b"\r\n\r\n" not in self._buffer:
            await self._more()
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        assert self.headers.get("transfer-encoding") == "chunked", self.headers

    async def _chunk(self) -> bytes:
        """The next chunk of the body; b"" at its end."""
        while b"\r\n" not in self._buffer:
            await self._more()
        size_line, _, self._buffer = self._buffer.partition(b"\r\n")
        size = int(size_line, 16)
        while len(self._buffer) < size + 2:
            await self._more()
        chunk, self._buffer = self._buffer[:size], self._buffer[size + 2 :]
        return chunk

    async def next_event(self) -> Event | None:
        """The next event; None once the stream has ended."""
        while True:
            while "\n\n" not in self._text:
                chunk = await self._chunk()
                if not chunk:
                    assert self._text == "", f"the stream ends mid-event: {self._text!r}"
                    return None
                self._text += chunk.decode()
            block, _, self._text = self._text.partition("\n\n")
            event = parse_event(block)
            if event is not None:
                return event
            self.comments += 1
