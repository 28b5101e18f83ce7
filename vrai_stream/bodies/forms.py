"""Bodies that carry fields and audio together (legacy JSON, multipart), read as they stream.

A body decoder (`legacy_json`, `multipart`) turns raw body chunks into events: `Field`s,
then one audio part (`AudioStart`, `AudioData`..., `AudioEnd`), maybe more `Field`s after it.
`read_submission` turns those events into what a job needs: the fields that fix its window, and
the audio as an async iterator.  When the fields come first the audio streams as the body
arrives; when the audio comes first nothing can start until the fields are known, so the audio
waits in a disk spool (never in memory) until the body has ended, and is read back from there.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

import anyio
import anyio.lowlevel

from vrai_stream import errors
from vrai_stream.errors import FieldTooLarge as FieldTooLarge  # re-exported: the decoders raise it

READ_BACK_BYTES = 64 * 1024
"""Chunk size when spooled audio is read back: the same as uvicorn's high-water mark."""
FEED_BYTES = 16 * 1024
"""The most a decoder is fed at once: dense hostile JSON costs up to about 1 us a byte, and
the event loop gets a turn between feeds."""


@dataclass(frozen=True)
class Field:
    """A small field of the upload; `value` is its text (a JSON number as written), or None."""

    name: str
    value: str | None


@dataclass(frozen=True)
class AudioStart:
    """The audio part begins; the decoders subclass it (`BlobStart`, `FileStart`)."""

    field_name: str = ""
    filename: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class AudioData:
    """Decoded audio bytes, in body order; never empty."""

    data: bytes


@dataclass(frozen=True)
class AudioEnd:
    """The audio part is over; fields may still follow."""


Event = Field | AudioStart | AudioData | AudioEnd


class Fields(dict[str, str | None]):
    """Each field's value by name (the last, when a field is repeated), and all of them in order.

    Array fields come as one field per item, as OpenAI's SDKs send them (`keywords[]`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._every: dict[str, list[str]] = {}

    def add(self, field: Field) -> None:
        self[field.name] = field.value
        if field.value is not None:
            self._every.setdefault(field.name, []).append(field.value)

    def every(self, name: str) -> list[str]:
        """Every value `name` was given, in body order (JSON nulls left out)."""
        return list(self._every.get(name, ()))


class BodyDecoder(Protocol):
    """Pure, synchronous parsing: bytes in, events out, memory bounded by the chunk size.

    Failures are `ServiceError`s; `close` checks that the body was whole and had audio.
    """

    def feed(self, data: bytes) -> Sequence[Event]: ...

    def close(self) -> Sequence[Event]: ...


class DiskSpool(Protocol):
    """What `read_submission` needs of a spool: `spool.FileSpool` fits."""

    path: Path

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


class Submission:
    """A form or JSON body: its fields and its audio; an async context manager that cleans up.

    `fields` holds every field seen so far: all of `required` that the body has by the time
    `read_submission` returns, the rest by the time `audio` is exhausted.  Closing it
    (or exhausting `audio`) deletes the spool, if there is one; it never closes `chunks`,
    which stays the caller's.
    """

    def __init__(
        self,
        fields: Fields,
        audio: AsyncGenerator[bytes, None],
        *,
        start: AudioStart,
        spool: DiskSpool | None,
        events: AsyncGenerator[Event, None],
    ) -> None:
        self.fields = fields
        self.audio: AsyncIterator[bytes] = audio
        self.start = start
        """The audio part's field name, file name and content type, as the client sent them."""
        self._audio = audio
        self._spool = spool
        self._events = events

    @property
    def spooled(self) -> bool:
        """True when the audio came before the fields and went through a disk spool."""
        return self._spool is not None

    async def aclose(self) -> None:
        """Stop reading, and delete the spool; safe to call twice."""
        try:
            await self._audio.aclose()
            await self._events.aclose()
        finally:
            if self._spool is not None:
                self._spool.close()

    async def __aenter__(self) -> Submission:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def read_submission(
    chunks: AsyncIterator[bytes],
    decoder: BodyDecoder,
    *,
    required: Collection[str],
    make_spool: Callable[[], DiskSpool],
    read_size: int = READ_BACK_BYTES,
) -> Submission:
    """Read the body until the audio can start; return its fields and audio.

    If every name in `required` has arrived when the audio starts, the audio streams: the
    returned `audio` pulls the rest of the body through the decoder as it is read.  Otherwise
    the whole body is read now, the audio into a spool from `make_spool`, and `audio` reads
    it back.  Decoder and spool failures propagate as `ServiceError`s; on any failure or
    cancellation the spool is gone before this returns.
    """
    fields = Fields()
    events = _events(chunks, decoder)
    try:
        async for event in events:
            if isinstance(event, Field):
                fields.add(event)
            elif isinstance(event, AudioStart):
                if all(name in fields for name in required):
                    # Leaving the loop keeps `events` where it is: the audio goes on from there.
                    audio = _stream(events, fields, frozenset(required))
                    return Submission(fields, audio, start=event, spool=None, events=events)
                spool = make_spool()
                try:
                    await _spool_rest(events, fields, spool)
                except BaseException:
                    spool.close()
                    raise
                audio = _read_back(spool, read_size)
                return Submission(fields, audio, start=event, spool=spool, events=events)
    except BaseException:
        await events.aclose()
        raise
    raise errors.InternalError("the body decoder ended without reporting a missing audio part")


async def _events(
    chunks: AsyncIterator[bytes], decoder: BodyDecoder
) -> AsyncGenerator[Event, None]:
    """The decoder's events over the whole body, pulled one chunk at a time."""
    async for chunk in chunks:
        for start in range(0, len(chunk), FEED_BYTES):
            if start:
                await anyio.lowlevel.checkpoint()
            for event in decoder.feed(chunk[start : start + FEED_BYTES]):
                yield event
    for event in decoder.close():
        yield event


async def _stream(
    events: AsyncGenerator[Event, None], fields: Fields, required: frozenset[str]
) -> AsyncGenerator[bytes, None]:
    """Audio as the body arrives, then the fields after it, to the body's end."""
    try:
        async for event in events:
            if isinstance(event, AudioData):
                yield event.data
            elif isinstance(event, Field):
                if event.name in required and fields.get(event.name, event.value) != event.value:
                    raise errors.InvalidParameters(
                        f"{event.name} is given twice, before and after the audio"
                    )
                fields.add(event)
    finally:
        await events.aclose()


async def _spool_rest(
    events: AsyncGenerator[Event, None], fields: Fields, spool: DiskSpool
) -> None:
    async for event in events:
        if isinstance(event, AudioData):
            # Spool writes land in the page cache; as in the pipeline, they are synchronous.
            spool.write(event.data)
        elif isinstance(event, Field):
            fields.add(event)
    spool.finish()


async def _read_back(spool: DiskSpool, read_size: int) -> AsyncGenerator[bytes, None]:
    """The spooled audio in chunks; the spool is deleted once read, or when closed early."""
    try:
        file = await anyio.open_file(spool.path, "rb")
        try:
            while chunk := await file.read(read_size):
                yield chunk
        finally:
            with anyio.CancelScope(shield=True):  # closing is a thread call: cancelled, it'd leak
                await file.aclose()
    finally:
        spool.close()
