"""Container sniffing: can ffmpeg read this upload from a pipe, or must it seek?

Only the bytes decide, never a Content-Type or a file name.  Two layouts that iPhones
write cannot be read from a pipe: MP4/M4A with the `moov` index after the audio (`mdat`),
and CAF whose packet table (`pakt`) follows the audio (`data`) when packets vary in size.
Those are spooled to disk (SEEKABLE) and, where `media.index_last` can frame their audio,
streamed to ffmpeg all the same; everything else streams into ffmpeg as it arrives.

A third iPhone layout streams once `pipe_filter` has left out a few of its bytes: CAF with
a `free` chunk (or `uuid`, `mark`, `strg`, ...) before `data`; see `CafChunkFilter`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

SNIFF_LIMIT_BYTES = 256 * 1024
"""Bytes to look at before deciding; an MP4 still undecided by then is treated as seekable."""


class Mode(enum.Enum):
    STREAM = "stream"
    """Decoded as it arrives, nothing guessed."""
    SPECULATIVE = "speculative"
    """Decoded as it arrives on a guessed configuration, which the index confirmed."""
    SEEKABLE = "seekable"
    """Spooled, then decoded after the last byte."""


@dataclass(frozen=True)
class Layout:
    container: str
    """A short name for logs, metrics and the response: caf, mp4, wav, mp3, ogg, ..."""
    mode: Mode

    @property
    def mode_name(self) -> str:
        return self.mode.value

    @property
    def extension(self) -> str:
        return _EXTENSIONS.get(self.container, "bin")

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES.get(self.container, "application/octet-stream")


_EXTENSIONS = {
    "caf": "caf",
    "mp4": "m4a",
    "3gp": "3gp",
    "mov": "mov",
    "wav": "wav",
    "mp3": "mp3",
    "ogg": "ogg",
    "webm": "webm",
    "flac": "flac",
    "amr": "amr",
    "aac": "aac",
    "aiff": "aiff",
}
_CONTENT_TYPES = {
    "caf": "audio/x-caf",
    "mp4": "audio/mp4",
    "3gp": "audio/3gpp",
    "mov": "video/quicktime",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "webm": "audio/webm",
    "flac": "audio/flac",
    "amr": "audio/amr",
    "aac": "audio/aac",
    "aiff": "audio/aiff",
}


def sniff(head: bytes, *, complete: bool) -> Layout | None:
    """Decide from the first bytes of an upload; None means: show me more bytes.

    `complete` says no more bytes will come (the body ended or the sniff limit was hit),
    so an answer is required.
    """
    if len(head) < 12 and not complete:
        return None
    if head[:4] == b"caff":
        return _sniff_caf(head, complete)
    if head[4:8] == b"ftyp" or head[4:8] in _QUICKTIME_FIRST_BOXES:
        return _sniff_mp4(head, complete)
    return Layout(_simple_container(head), Mode.STREAM)


def _simple_container(head: bytes) -> str:
    """Formats ffmpeg reads from a pipe whatever their layout: a name is all we need."""
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:5] == b"#!AMR":
        return "amr"
    if head[:4] == b"FORM" and head[8:11] == b"AIF":
        return "aiff"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF:
        if head[1] & 0xF6 == 0xF0:  # sync, layer 00: ADTS
            return "aac"
        if head[1] & 0xE0 == 0xE0:
            return "mp3"
    return "unknown"


# CAF: "caff", version, flags; then chunks of (type, int64 size, data).
_CAF_HEADER = 8
_CAF_CHUNK_HEADER = 12


def _sniff_caf(head: bytes, complete: bool) -> Layout | None:
    offset = _CAF_HEADER
    constant_packets: bool | None = None
    while True:
        if offset + _CAF_CHUNK_HEADER > len(head):
            return _undecided("caf", complete)  # chunk header beyond the sniffed bytes
        chunk_type = head[offset : offset + 4]
        (size,) = struct.unpack(">q", head[offset + 4 : offset + 12])
        body = offset + _CAF_CHUNK_HEADER
        if chunk_type == b"desc":
            if body + 32 > len(head):
                return _undecided("caf", complete)  # desc beyond the sniffed bytes
            bytes_per_packet, frames_per_packet = struct.unpack(">II", head[body + 16 : body + 24])
            constant_packets = bytes_per_packet > 0 and frames_per_packet > 0
        elif chunk_type == b"pakt":
            return Layout("caf", Mode.STREAM)  # packet table before the audio
        elif chunk_type == b"data":
            if constant_packets:
                return Layout("caf", Mode.STREAM)  # constant packet size
            return Layout("caf", Mode.SEEKABLE)  # packet table after the audio
        if size < 0:
            return Layout("caf", Mode.STREAM)  # chunk of unknown size
        offset = body + size


# MP4/MOV/3GP: boxes of (uint32 size, type), size 1 = a 64-bit size follows, 0 = to the end.
_MP4_BRANDS = {b"3gp": "3gp", b"3g2": "3gp", b"qt ": "mov"}
_QUICKTIME_FIRST_BOXES = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
"""QuickTime files need not start with `ftyp` (older Apple tools begin with these)."""


def _sniff_mp4(head: bytes, complete: bool) -> Layout | None:
    container = _MP4_BRANDS.get(head[8:11], "mp4") if head[4:8] == b"ftyp" else "mov"
    offset = 0
    while True:
        if offset + 8 > len(head):
            return _undecided(container, complete)  # box header beyond the sniffed bytes
        size, box_type = struct.unpack(">I4s", head[offset : offset + 8])
        if size == 1:
            if offset + 16 > len(head):
                return _undecided(container, complete)  # box size beyond the sniffed bytes
            (size,) = struct.unpack(">Q", head[offset + 8 : offset + 16])
        if box_type == b"moov":
            return Layout(container, Mode.STREAM)  # moov before mdat
        if box_type in (b"mdat", b"moof"):
            return Layout(container, Mode.SEEKABLE)  # moov after mdat
        if size == 0 or (size < 8 and size != 1):
            return Layout(container, Mode.SEEKABLE)  # malformed box: let ffmpeg seek
        offset += size


def _undecided(container: str, complete: bool) -> Layout | None:
    """Not enough bytes yet: ask for more, or fall back to the mode that always works."""
    if not complete:
        return None
    return Layout(container, Mode.SEEKABLE)


# --- what ffmpeg reads in STREAM mode ------------------------------------------------------


def pipe_filter(layout: Layout) -> Callable[[bytes], bytes]:
    """What to do to each chunk of the body before ffmpeg reads it from a pipe.

    Only CAF needs anything done; the debug copy and the SEEKABLE spool get the body as sent.
    """
    if layout.container == "caf":
        return CafChunkFilter().feed
    return _unchanged


def _unchanged(chunk: bytes) -> bytes:
    return chunk


class CafChunkFilter:
    """Leaves out of a streamed CAF the chunks before `data` that ffmpeg would choke on.

    ffmpeg 5.1's CAF demuxer moves to the next chunk by seeking to where the chunk's size
    says it ends, and only when the input can seek.  On a pipe it relies on each chunk's
    reader having consumed the chunk exactly.  The readers of `desc`, `kuki` and `pakt` do
    (`chan`'s too, unless it claims more channel descriptions than it holds); `free` and
    every chunk it does not know (`uuid`, `mark`, `strg`, `ovvw`, ...) are not read at all,
    and `info` is read string by string, not up to its size.  The demuxer then takes the
    rest of the chunk for the next chunk header ("skipping CAF chunk: 00000000") and gives
    up ("Invalid data found").  Apple's writers put a `free` chunk before `data` to start
    the audio at byte 4096, so iPhone recordings fail this way.

    Decoding needs only `desc`, `kuki`, `pakt` and `data`, and the packet table holds
    packet sizes, not file offsets: dropping the other chunks before `data` gives ffmpeg
    the same audio.  (`chan` goes too: the service mixes down to mono, and ffmpeg's default
    layout for the channel count serves.)  This keeps such uploads streaming, decoded while
    they arrive, instead of spooling them to disk first (SEEKABLE) only for ffmpeg to seek
    past a few kilobytes of padding.  It is a byte counter over chunk headers: it holds at
    most one 12-byte header, and from the `data` chunk on it hands each chunk back as is.

    A chunk of unknown size (-1) before `data` cannot be skipped by its size: from there on
    the bytes pass unchanged, and ffmpeg answers as it would have without this filter.
    """

    _KEPT = frozenset({b"desc", b"kuki", b"pakt"})

    def __init__(self) -> None:
        self._header = bytearray()
        self._header_size = _CAF_HEADER
        """The file header first, then one chunk header after another."""
        self._keep = 0
        """Bytes of the current chunk still to pass on."""
        self._drop = 0
        """Bytes of the current chunk still to leave out."""
        self._through = False
        """From `data` (or anything unexpected) on, every byte passes."""

    def feed(self, chunk: bytes) -> bytes:
        """The part of `chunk` ffmpeg should read; `chunk` itself once past the head."""
        if self._through:
            return chunk
        out: list[bytes | memoryview] = []
        view = memoryview(chunk)
        position = 0
        end = len(view)
        while position < end:
            if self._through:
                out.append(view[position:])
                break
            if self._keep or self._drop:
                step = min(self._keep or self._drop, end - position)
                if self._keep:
                    out.append(view[position : position + step])
                    self._keep -= step
                else:
                    self._drop -= step
                position += step
                continue
            step = min(self._header_size - len(self._header), end - position)
            self._header += view[position : position + step]
            position += step
            if len(self._header) == self._header_size:
                out.append(self._next_chunk(bytes(self._header)))
                self._header.clear()
        return b"".join(out)

    def _next_chunk(self, header: bytes) -> bytes:
        """Decide on a header that has just arrived; return what of it to pass on."""
        if self._header_size == _CAF_HEADER:
            self._header_size = _CAF_CHUNK_HEADER
            return header
        chunk_type = header[:4]
        (size,) = struct.unpack(">q", header[4:])
        if chunk_type == b"data" or size < 0:
            self._through = True
            return header
        if chunk_type in self._KEPT:
            self._keep = size
            return header
        self._drop = size
        return b""
