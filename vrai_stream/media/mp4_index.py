"""What an MP4/M4A/3GP index says about its audio: codec, configuration, sample sizes, priming.

Read from a `moov` (the index a moov-last file writes at its end), from a Voice Memos `hoov`
(the same box by another name, written early inside the audio), and from a `moof` (a
fragment's sample sizes).  Only what streaming an index-last upload needs is read, and a
box that does not hold together raises `IndexError_`, never anything else.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

from vrai_stream.media.aac import AacConfig, ConfigError, audio_specific_config_of
from vrai_stream.media.aac import parse_audio_specific_config as _parse_asc

BOX_HEADER = 8
LARGE_BOX_HEADER = 16

_CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"mvex", b"traf"})
AMR_ENTRIES = {b"samr": "amr_nb", b"sawb": "amr_wb"}


class IndexError_(ValueError):
    """A box that does not hold together."""


@dataclass
class TrackIndex:
    """The first audio track of an index, as far as streaming its samples needs."""

    codec: str = ""
    """`aac`, `amr_nb`, `amr_wb`, or the sample entry's own type for anything else."""
    config: AacConfig | None = None
    sample_sizes: array[int] = field(default_factory=lambda: array("I"))
    """4 bytes a sample, as in the `stsz` (a long recording has hundreds of thousands)."""
    priming: int = 0
    """Samples the edit list skips at the start (the encoder's priming), in the track's rate."""
    timescale: int = 0
    duration: int = 0
    """The track's length in `timescale` units (mdhd)."""
    plain_edit_list: bool = True
    """False for an edit list other than one edit from `priming` on: not streamed."""

    @property
    def declared_seconds(self) -> float | None:
        """What plays: the track's length less the priming the edit list skips."""
        return (self.duration - self.priming) / self.timescale if self.timescale else None


def box_header(data: bytes | memoryview, offset: int = 0) -> tuple[bytes, int, int] | None:
    """(type, total size, header size) of the box at `offset`; None if the header is not all
    there.  A size of 0 (to the end of the file) comes back as -1."""
    if len(data) < offset + BOX_HEADER:
        return None
    size, kind = struct.unpack_from(">I4s", data, offset)
    if size == 1:
        if len(data) < offset + LARGE_BOX_HEADER:
            return None
        (size,) = struct.unpack_from(">Q", data, offset + BOX_HEADER)
        if size < LARGE_BOX_HEADER:
            raise IndexError_(f"box {kind!r} is smaller than its header")
        return bytes(kind), size, LARGE_BOX_HEADER
    if size == 0:
        return bytes(kind), -1, BOX_HEADER
    if size < BOX_HEADER:
        raise IndexError_(f"box {kind!r} is smaller than its header")
    return bytes(kind), size, BOX_HEADER


def children(data: bytes | memoryview) -> Iterator[tuple[bytes, memoryview]]:
    """The boxes inside a box's payload: (type, payload)."""
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        header = box_header(view, offset)
        if header is None:
            raise IndexError_("a box header is cut short")
        kind, size, header_size = header
        end = len(view) if size < 0 else offset + size
        if end > len(view):
            raise IndexError_(f"box {kind!r} runs past its parent")
        yield kind, view[offset + header_size : end]
        offset = end


def _find(data: bytes | memoryview, *path: bytes) -> memoryview | None:
    current: memoryview | None = memoryview(data)
    for kind in path:
        assert current is not None
        current = next((payload for found, payload in children(current) if found == kind), None)
        if current is None:
            return None
    return current


def read_track(index: bytes | memoryview) -> TrackIndex:
    """The first audio track of a `moov` (or `hoov`) payload."""
    try:
        for kind, trak in children(index):
            if kind == b"trak" and _handler(trak) == b"soun":
                return _read_trak(trak)
    except (struct.error, ConfigError) as exc:
        raise IndexError_(str(exc)) from None
    raise IndexError_("no audio track in the index")


def _handler(trak: memoryview) -> bytes | None:
    hdlr = _find(trak, b"mdia", b"hdlr")
    return bytes(hdlr[8:12]) if hdlr is not None and len(hdlr) >= 12 else None


def _read_trak(trak: memoryview) -> TrackIndex:
    track = TrackIndex()
    mdhd = _find(trak, b"mdia", b"mdhd")
    if mdhd is not None:
        if mdhd[0] == 1:
            track.timescale, track.duration = struct.unpack_from(">IQ", mdhd, 20)
        else:
            track.timescale, track.duration = struct.unpack_from(">II", mdhd, 12)
    stbl = _find(trak, b"mdia", b"minf", b"stbl")
    if stbl is None:
        raise IndexError_("the audio track has no sample table")
    stsd = _find(stbl, b"stsd")
    if stsd is None or len(stsd) < 16:
        raise IndexError_("the audio track has no sample description")
    entry_kind, entry = next(children(stsd[8:]))
    if entry_kind in AMR_ENTRIES:
        track.codec = AMR_ENTRIES[entry_kind]
    elif entry_kind == b"mp4a":
        esds = _esds_in(entry)
        track.codec = "aac"
        track.config = _parse_asc(audio_specific_config_of(bytes(esds[4:])))
    else:
        track.codec = entry_kind.decode("latin-1")
    stsz = _find(stbl, b"stsz")
    if stsz is not None:
        track.sample_sizes = _sample_sizes(stsz)
    elst = _find(trak, b"edts", b"elst")
    if elst is not None:
        track.priming, track.plain_edit_list = _priming(elst)
    return track


_SOUND_ENTRY = 28
"""A sound sample entry's fixed fields, before its child boxes (QuickTime v0 and ISO)."""
_QUICKTIME_EXTRA = {1: 16, 2: 36}
"""Bytes QuickTime's sound description versions 1 and 2 add to those fields."""


def _esds_in(entry: memoryview) -> memoryview:
    if len(entry) < _SOUND_ENTRY:
        raise IndexError_("the mp4a sample entry is cut short")
    (version,) = struct.unpack_from(">H", entry, 8)
    boxes = entry[_SOUND_ENTRY + _QUICKTIME_EXTRA.get(version, 0) :]
    esds = _find(boxes, b"esds") or _find(boxes, b"wave", b"esds")
    if esds is None:
        raise IndexError_("the mp4a sample entry has no esds")
    return esds


def _sample_sizes(stsz: memoryview) -> array[int]:
    constant, count = struct.unpack_from(">II", stsz, 4)
    if constant:
        repeated: array[int] = array("I", [constant]) * count
        return repeated
    if len(stsz) < 12 + 4 * count:
        raise IndexError_("stsz is cut short")
    return big_endian_words(stsz[12 : 12 + 4 * count])


def big_endian_words(data: bytes | memoryview) -> array[int]:
    """32-bit big-endian integers, as an array: 4 bytes each, not a Python int each."""
    words = array("I")
    assert words.itemsize == 4
    words.frombytes(data)
    if sys.byteorder == "little":
        words.byteswap()
    return words


def _priming(elst: memoryview) -> tuple[int, bool]:
    version = elst[0]
    (count,) = struct.unpack_from(">I", elst, 4)
    layout, width = (">Qq", 16) if version == 1 else (">Ii", 8)
    edits = [struct.unpack_from(layout, elst, 8 + i * (width + 4)) for i in range(count)]
    if len(edits) == 1 and edits[0][1] >= 0:
        return edits[0][1], True
    return 0, not edits


def fragment_sample_sizes(moof: bytes | memoryview) -> list[int]:
    """The sizes of the samples a `moof` describes (its `trun`s, or `tfhd`'s default)."""
    sizes: list[int] = []
    try:
        for kind, traf in children(moof):
            if kind != b"traf":
                continue
            default = 0
            for inner, payload in children(traf):
                if inner == b"tfhd":
                    default = _default_sample_size(payload)
                elif inner == b"trun":
                    sizes.extend(_trun_sizes(payload, default))
    except struct.error as exc:
        raise IndexError_(str(exc)) from None
    return sizes


def _default_sample_size(tfhd: memoryview) -> int:
    (flags,) = struct.unpack_from(">I", tfhd, 0)
    offset = 8  # version and flags, track id
    for bit, width in ((0x01, 8), (0x02, 4), (0x08, 4)):
        if flags & bit:
            offset += width
    if flags & 0x10:
        (size,) = struct.unpack_from(">I", tfhd, offset)
        return int(size)
    return 0


def _trun_sizes(trun: memoryview, default: int) -> list[int]:
    flags, count = struct.unpack_from(">II", trun, 0)
    flags &= 0xFFFFFF
    offset = 8 + (4 if flags & 0x001 else 0) + (4 if flags & 0x004 else 0)
    fields = [bit for bit in (0x100, 0x200, 0x400, 0x800) if flags & bit]
    if 0x200 not in fields:
        if not default:
            raise IndexError_("a fragment's samples have no size")
        return [default] * count
    if len(trun) < offset + 4 * len(fields) * count:
        raise IndexError_("trun is cut short")
    values = struct.unpack_from(f">{count * len(fields)}I", trun, offset)
    column = fields.index(0x200)
    return list(values[column :: len(fields)])
