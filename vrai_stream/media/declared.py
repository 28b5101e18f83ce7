"""How long a recording says it is, read from its first bytes: to tell a cut-short upload.

A phone that uploads a file still being written, or one cut on its disk, sends a container
that declares more audio than it holds.  ffmpeg decodes what is there and stops without a
word, so the answer would look whole.  Where the head declares a length (an MP4 `moov` up
front, a CAF packet table or sized `data` chunk, a WAV `data` chunk), it is compared with
what was decoded.  Layouts that declare nothing (Ogg, WebM, MP3, ADTS, AMR) say nothing.
"""

from __future__ import annotations

import struct

from vrai_stream.media.mp4_index import IndexError_, box_header, read_track

_WAV_UNKNOWN_SIZES = (0, 0xFFFFFFFF)
"""Streaming writers leave the size at one of these: the length is unknown."""


def declared_seconds(container: str, head: bytes) -> float | None:
    """The length the head declares, in seconds; None where it declares none (or lies)."""
    try:
        if container in ("mp4", "3gp", "mov"):
            return _mp4(head)
        if container == "caf":
            return _caf(head)
        if container == "wav":
            return _wav(head)
    except (IndexError_, struct.error, ValueError, ZeroDivisionError):
        return None
    return None


def _mp4(head: bytes) -> float | None:
    offset = 0
    while (found := box_header(head, offset)) is not None:
        kind, size, header_size = found
        if size < 0 or offset + size > len(head):
            return None  # the moov, if any, is not all in the head
        if kind == b"moov":
            return read_track(
                memoryview(head)[offset + header_size : offset + size]
            ).declared_seconds
        offset += size
    return None


def _caf(head: bytes) -> float | None:
    offset = 8
    rate = bytes_per_packet = frames_per_packet = 0.0
    while offset + 12 <= len(head):
        kind, size = struct.unpack_from(">4sq", head, offset)
        body = offset + 12
        if kind == b"desc" and body + 32 <= len(head):
            (rate,) = struct.unpack_from(">d", head, body)
            bytes_per_packet, frames_per_packet = struct.unpack_from(">II", head, body + 16)
        elif kind == b"pakt" and body + 24 <= len(head):
            _, valid_frames = struct.unpack_from(">qq", head, body)
            return float(valid_frames) / rate
        elif kind == b"data":
            if size < 4 or not (bytes_per_packet and frames_per_packet):
                return None
            packets = (size - 4) // bytes_per_packet
            return float(packets * frames_per_packet / rate)
        if size < 0:
            return None
        offset = body + size
    return None


def _wav(head: bytes) -> float | None:
    offset = 12
    byte_rate = 0
    while offset + 8 <= len(head):
        kind, size = struct.unpack_from("<4sI", head, offset)
        if kind == b"fmt " and offset + 20 <= len(head):
            (byte_rate,) = struct.unpack_from("<I", head, offset + 16)
        elif kind == b"data":
            if size in _WAV_UNKNOWN_SIZES or not byte_rate:
                return None
            return float(size / byte_rate)
        offset += 8 + size + (size & 1)
    return None
