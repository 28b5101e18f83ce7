"""multipart/form-data bodies, decoded as they stream: small fields, and one audio file part.

Starlette's `request.form()` spools every file part before the handler sees any of it; the
legacy multipart endpoint and the OpenAI-compatible one need the audio while it arrives.  So
this drives `python-multipart`'s low-level `MultipartParser` (a push parser that finds
boundaries with `bytes.find` and keeps no more than a boundary's length between feeds) and
turns its callbacks into events.  What it keeps is bounded: one text field at a time (capped),
the current part's headers (the parser caps their count and size), and nothing of the audio
or of the file parts it skips.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import TYPE_CHECKING

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from vrai_stream import errors
from vrai_stream.bodies.forms import AudioData, AudioEnd, AudioStart, Event, Field
from vrai_stream.errors import FieldTooLarge, InvalidMultipart

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

LEGACY_FILE_FIELD = "audio"
OPENAI_FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
"""Text fields reported per body: each is held in memory, so their number is capped too."""

_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
"""RFC 2046's boundary: 1-70 of these characters, not ending with a space.

python-multipart relies on it: a boundary with a CR in it could hide part of the data.
"""


class FileStart(AudioStart):
    """The audio file part begins: its field name, file name and Content-Type, if any."""


class FileData(AudioData):
    """The audio file's bytes, as many as the chunk carried."""


class FileEnd(AudioEnd):
    """The audio file part is over."""


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type, checked against RFC 2046."""
    if not content_type:
        raise InvalidMultipart("Content-Type is missing; send multipart/form-data with a boundary")
    try:  # headers arrive as Latin-1; python-multipart would fail on anything else
        raw = content_type.encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidMultipart("Content-Type has characters outside Latin-1") from None
    media, params = parse_options_header(raw)
    if media != b"multipart/form-data":
        shown = media.decode("latin-1")[:60] or "empty"
        raise InvalidMultipart(f"Content-Type must be multipart/form-data, not {shown}")
    boundary = {key.lower(): value for key, value in params.items()}.get(b"boundary")
    if boundary is None:
        raise InvalidMultipart("Content-Type multipart/form-data has no boundary parameter")
    if not _BOUNDARY.fullmatch(boundary):
        raise InvalidMultipart(
            "The multipart boundary must be 1 to 70 letters, digits or '()+_,-./:=? "
            "(not ending with a space)"
        )
    return boundary


# What a part is for.
_SKIP = 0
_FIELD = 1
_FILE = 2


class MultipartDecoder:
    """Feed the body's chunks; get `Field`s and `FileStart`, `FileData`..., `FileEnd`.

    The part named `file_field` is the audio, with or without a file name; other file parts
    are skipped unread.  Text fields are reported when their part ends (only those in
    `fields`, unless it is None), each capped at `max_field_bytes`.  Every failure is a
    `ServiceError`: `InvalidMultipart`, `FieldTooLarge`, `errors.MissingAudioPart` (no part
    named `file_field`), or `errors.EmptyBody` (no body, or an empty audio part).
    """

    def __init__(
        self,
        content_type: str | None,
        *,
        file_field: str = LEGACY_FILE_FIELD,
        fields: Collection[str] | None = None,
        max_field_bytes: int = MAX_FIELD_BYTES,
        max_fields: int = MAX_FIELDS,
    ) -> None:
        self._parser = MultipartParser(boundary_of(content_type), self._callbacks())
        self._file_field = file_field
        self._fields = None if fields is None else frozenset(fields)
        self._max_field_bytes = max_field_bytes
        self._max_fields = max_fields
        self._events: list[Event] = []
        self._offset = 0
        self._started = False  # past the line breaks that may precede the first boundary
        self._headers: dict[bytes, bytes] = {}
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._role = _SKIP
        self._name = ""
        self._value = bytearray()
        self._audio: list[bytes] = []  # the audio of the current feed, sent as one FileData
        self._audio_size = 0
        self._file_seen = False
        self._other_parts: dict[str, None] = {}  # names of skipped parts, for the hint
        self._field_count = 0
        self._ended = False
        self._failure: errors.ServiceError | None = None
        self._closed = False

    def feed(self, data: bytes) -> list[Event]:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise RuntimeError("feed() after close()")
        body = data
        if not self._started:
            # python-multipart skips from a leading CR or LF to the next `-` within a chunk,
            # whatever lies between, but not across chunks.  Taking the line breaks here
            # makes the verdict the same however the body is cut (the fuzz test found it).
            body = data.lstrip(b"\r\n")
            self._started = bool(body)
        try:
            self._parser.write(body)
        except FormParserError as exc:
            at = self._offset + len(data) - len(body) + max(getattr(exc, "offset", 0), 0)
            self._fail(InvalidMultipart(f"Invalid multipart body near byte {at}: {exc}"))
        except errors.ServiceError as failure:
            self._fail(failure)
        self._offset += len(data)
        self._flush_audio()
        events, self._events = self._events, []
        return events

    def close(self) -> list[Event]:
        """Check that the body ended with its closing boundary and had the audio part."""
        if self._failure is not None:
            raise self._failure
        self._closed = True
        self._parser.finalize()
        if self._offset == 0:
            self._fail(errors.EmptyBody("The request has no body; send the audio as a form"))
        if not self._ended:
            self._fail(
                InvalidMultipart(
                    f"The multipart body ends at byte {self._offset}, before its closing boundary"
                )
            )
        if not self._file_seen:
            self._fail(errors.MissingAudioPart(self._missing_audio_message()))
        return []

    def _missing_audio_message(self) -> str:
        message = (
            f"The form has no '{self._file_field}' part: send the recording as a file part "
            f"named '{self._file_field}'"
        )
        if self._other_parts:
            shown = ", ".join(f"'{name[:40]}'" for name in self._other_parts)
            message += f" (this form's other parts: {shown})"
        return message

    def _fail(self, failure: errors.ServiceError) -> None:
        self._failure = failure
        raise failure

    def _callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def _on_part_begin(self) -> None:
        self._headers.clear()
        self._role = _SKIP

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition")
        if disposition is None:
            raise InvalidMultipart("A part of the form has no Content-Disposition header")
        _, params = parse_options_header(disposition)
        raw_name = params.get(b"name")
        if raw_name is None:
            raise InvalidMultipart("A part of the form has no name in its Content-Disposition")
        name = _text(raw_name)
        filename = params.get(b"filename")
        if name == self._file_field:
            if self._file_seen:
                raise InvalidMultipart(f"The form has more than one '{name}' part")
            self._file_seen = True
            self._role = _FILE
            content_type = self._headers.get(b"content-type")
            self._events.append(
                FileStart(
                    field_name=name,
                    filename=None if filename is None else _text(filename),
                    content_type=None if content_type is None else _text(content_type.strip()),
                )
            )
        elif filename is None and (self._fields is None or name in self._fields):
            self._field_count += 1
            if self._field_count > self._max_fields:
                raise InvalidMultipart(f"The form has more than {self._max_fields} fields")
            self._role = _FIELD
            self._name = name
            self._value.clear()
        elif len(self._other_parts) < 3:
            self._other_parts[name] = None

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._role == _FILE:
            self._audio.append(data[start:end])
            self._audio_size += end - start
        elif self._role == _FIELD:
            if len(self._value) + end - start > self._max_field_bytes:
                raise FieldTooLarge(
                    f"The form field '{self._name}' is longer than {self._max_field_bytes} bytes"
                )
            self._value += data[start:end]

    def _on_part_end(self) -> None:
        if self._role == _FILE:
            self._flush_audio()
            if self._audio_size == 0:
                raise errors.EmptyBody(f"The '{self._file_field}' part of the form is empty")
            self._events.append(FileEnd())
        elif self._role == _FIELD:
            self._events.append(Field(self._name, self._value.decode("utf-8", "replace")))
            self._value.clear()
        self._role = _SKIP

    def _on_end(self) -> None:
        self._ended = True

    def _flush_audio(self) -> None:
        if self._audio:
            self._events.append(FileData(b"".join(self._audio)))
            self._audio.clear()


def _text(raw: bytes) -> str:
    """Header text: python-multipart hands it over as Latin-1 bytes; clients send UTF-8."""
    return raw.decode("utf-8", "replace")
