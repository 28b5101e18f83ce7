"""A Voice Memos recording, laid out as iOS 16+ and iPadOS 26 write one, built from AAC.

Voice Memos records a crash-safe fragmented MP4 and, once done, wraps it in one `mdat` and
appends a real `moov` (see ../shared/DESIGN.md; the real files are held out of the repo).
Inside the outer `mdat`: the first few seconds of raw AAC, then a `hoov` (the fragmented
file's `moov` by another name, with the esds), then a `moof` every ~16 KB and an inner
`mdat` with a 64-bit size before its samples.  The `moov` at the end indexes every sample
where it lies, so a decoder that can seek reads the whole recording; one fed the outer
`mdat` raw stops at the `hoov`.

Built here as DESIGN.md says: ffmpeg's fragmented MP4 of all but the first access units,
its `moov` renamed `hoov`, the first units raw before it, and a `moov` (ffmpeg's own for the
whole stream, its chunk offsets rewritten) after.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from .phone_media import box, ffmpeg, full_box

VOICE_MEMOS_FTYP = box(b"ftyp", b"M4A ", b"\0\0\0\0", b"M4A isommp42")
RAW_UNITS = 192
"""Access units before the `hoov`: 4 s at 48 kHz, as in a 234-s note of the held-out set."""
_CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl"})


def adts_frames(data: bytes) -> list[bytes]:
    """Each ADTS frame of `data`, header included."""
    frames = []
    offset = 0
    while offset + 7 <= len(data):
        length = (
            ((data[offset + 3] & 0x3) << 11) | (data[offset + 4] << 3) | (data[offset + 5] >> 5)
        )
        frames.append(data[offset : offset + length])
        offset += length
    return frames


def top_boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each box at the top of `data` (32-bit sizes only)."""
    boxes = []
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        boxes.append((kind, data[offset + 8 : offset + size]))
        offset += size
    return boxes


def _rebuilt(payload: bytes, replace: dict[bytes, bytes]) -> bytes:
    out = []
    for kind, body in top_boxes(payload):
        if kind in replace:
            out.append(replace[kind])
        elif kind in _CONTAINERS:
            out.append(box(kind, _rebuilt(body, replace)))
        else:
            out.append(box(kind, body))
    return b"".join(out)


def _fragmented(adts: list[bytes], folder: Path) -> list[tuple[bytes, bytes]]:
    source, target = folder / "rest.aac", folder / "fragmented.mp4"
    source.write_bytes(b"".join(adts))
    ffmpeg(
        "-i", str(source), "-c", "copy", "-bsf:a", "aac_adtstoasc", "-f", "mp4",
        "-movflags", "empty_moov+default_base_moof", "-frag_size", "16384", str(target),
    )  # fmt: skip
    return top_boxes(target.read_bytes())


def _moov_last(adts: list[bytes], folder: Path) -> bytes:
    source, target = folder / "all.aac", folder / "moov-last.m4a"
    source.write_bytes(b"".join(adts))
    ffmpeg("-i", str(source), "-c", "copy", "-bsf:a", "aac_adtstoasc", str(target))
    return next(body for kind, body in top_boxes(target.read_bytes()) if kind == b"moov")


def voice_memo(adts_data: bytes, *, raw_units: int = RAW_UNITS) -> bytes:
    """The bytes of a Voice Memos file holding the AAC of `adts_data` (an ADTS stream)."""
    frames = adts_frames(adts_data)
    header_sizes = [7 if frame[1] & 1 else 9 for frame in frames]
    units = [frame[size:] for frame, size in zip(frames, header_sizes, strict=True)]
    with tempfile.TemporaryDirectory() as folder:
        fragmented = _fragmented(frames[raw_units:], Path(folder))
        moov = _moov_last(frames, Path(folder))
    inner = b"".join(units[:raw_units])
    offsets = list(_running_offsets(units[:raw_units], 0))
    for kind, body in fragmented:
        if kind == b"moov":
            # ffmpeg writes an empty_moov before it has the AAC configuration: give the
            # `hoov` the esds Voice Memos writes there.
            inner += box(b"hoov", _rebuilt(body, {b"stsd": _sample_description(moov)}))
        elif kind == b"moof":
            inner += box(b"moof", body)
        elif kind == b"mdat":
            start = len(inner) + 16
            inner += struct.pack(">I4sQ", 1, b"mdat", 16 + len(body)) + body
            count = len(offsets)
            offsets.extend(
                _running_offsets(units[count : count + _fitting(units, count, body)], start)
            )
    assert len(offsets) == len(units), (len(offsets), len(units))
    base = len(VOICE_MEMOS_FTYP) + 8  # where the outer mdat's payload starts
    chunk_offsets = full_box(
        b"co64",
        0,
        0,
        struct.pack(">I", len(units)),
        *(struct.pack(">Q", base + o) for o in offsets),
    )
    one_sample_per_chunk = full_box(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, 1, 1))
    index = _rebuilt(
        moov, {b"stco": chunk_offsets, b"co64": chunk_offsets, b"stsc": one_sample_per_chunk}
    )
    return VOICE_MEMOS_FTYP + box(b"mdat", inner) + box(b"moov", index)


def _sample_description(moov: bytes) -> bytes:
    """The whole `stsd` box of a `moov`'s first track."""
    payload = moov
    for kind in (b"trak", b"mdia", b"minf", b"stbl", b"stsd"):
        payload = next(body for found, body in top_boxes(payload) if found == kind)
    return box(b"stsd", payload)


def _running_offsets(units: list[bytes], start: int) -> list[int]:
    offsets = []
    for unit in units:
        offsets.append(start)
        start += len(unit)
    return offsets


def _fitting(units: list[bytes], first: int, body: bytes) -> int:
    """How many units from `first` on make up a fragment's samples, `body`."""
    size = count = 0
    while size < len(body):
        size += len(units[first + count])
        count += 1
    assert size == len(body), "a fragment's samples are not whole access units"
    return count
