"""Raw AAC, framed: where each access unit ends, and the ADTS header that says so to ffmpeg.

Raw AAC (what an MP4 `mdat` or a CAF `data` chunk holds) carries no frame lengths: the sizes
are in the container's index (`stsz`, `pakt`), which phones write after the audio.  Where one
access unit ends is known only by parsing it, and libavcodec's decoder does exactly that: a
truncated unit is an error to it, never a frame, so the shortest prefix that decodes is one
access unit.  `UnitFinder` finds that prefix by bisection with a decoder of its own, flushed
between tries.  ffmpeg stays the decoder of record: it gets each unit behind an ADTS header.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import av.audio.codeccontext

SAMPLING_RATES = (
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
)  # fmt: skip
"""The rates an AudioSpecificConfig names by index (ISO/IEC 14496-3, 1.6.3.4)."""

FRAMES_PER_UNIT = 1024
ADTS_HEADER_BYTES = 7
MAX_UNIT_BYTES_PER_CHANNEL = 768
"""6144 bits per channel: the most one AAC access unit may hold (14496-3, 4.5.3.2)."""
ADTS_MAX_FRAME_BYTES = (1 << 13) - 1

_ADTS_OBJECT_TYPES = frozenset({1, 2, 3, 4})
"""What ADTS's 2-bit profile can name: Main, LC, SSR, LTP."""
_SBR, _PS = 5, 29
"""HE-AAC v1 and v2: an LC core at half the rate, found again by the decoder (implicit SBR)."""


class ConfigError(ValueError):
    """An AudioSpecificConfig this module cannot frame as ADTS."""


@dataclass(frozen=True)
class AacConfig:
    """What decoding raw AAC needs: the AudioSpecificConfig's first fields."""

    object_type: int
    sampling_index: int
    channels: int
    extension_object_type: int = 0
    """5 (SBR) or 29 (PS) when the config names HE-AAC explicitly, else 0."""

    @property
    def sample_rate(self) -> int:
        return SAMPLING_RATES[self.sampling_index]

    @property
    def adts_ready(self) -> bool:
        return self.object_type in _ADTS_OBJECT_TYPES and 1 <= self.channels <= 7

    def audio_specific_config(self) -> bytes:
        """Two bytes: object type, sampling index, channel configuration (no extension)."""
        value = (self.object_type << 11) | (self.sampling_index << 7) | (self.channels << 3)
        return value.to_bytes(2, "big")

    def adts_header(self, unit_size: int) -> bytes:
        """The 7-byte ADTS header (no CRC) of one access unit of `unit_size` bytes."""
        length = unit_size + ADTS_HEADER_BYTES
        if length > ADTS_MAX_FRAME_BYTES:
            raise ConfigError(f"an access unit of {unit_size} bytes does not fit ADTS")
        profile = self.object_type - 1
        return bytes(
            (
                0xFF,
                0xF1,  # sync, MPEG-4, layer 0, no CRC
                (profile << 6) | (self.sampling_index << 2) | (self.channels >> 2),
                ((self.channels & 3) << 6) | (length >> 11),
                (length >> 3) & 0xFF,
                ((length & 7) << 5) | 0x1F,  # buffer fullness 0x7FF: variable rate
                0xFC,  # ... and one raw data block
            )
        )

    def describe(self) -> str:
        kind = {_SBR: "HE-AAC", _PS: "HE-AAC v2"}.get(self.extension_object_type, "AAC")
        return (
            f"{kind} (object type {self.object_type}), {self.sample_rate} Hz, "
            f"{self.channels} channel(s)"
        )


class _Bits:
    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._left = len(data) * 8

    def read(self, count: int) -> int:
        if count > self._left:
            raise ConfigError("AudioSpecificConfig is cut short")
        self._left -= count
        return (self._value >> self._left) & ((1 << count) - 1)


def parse_audio_specific_config(data: bytes) -> AacConfig:
    """The fields of an AudioSpecificConfig; an explicit HE-AAC one is reduced to its core."""
    bits = _Bits(data)

    def object_type() -> int:
        value = bits.read(5)
        return 32 + bits.read(6) if value == 31 else value

    def sampling_index() -> int:
        index = bits.read(4)
        if index == 15:  # an explicit 24-bit rate: map it to its index, if it has one
            rate = bits.read(24)
            if rate not in SAMPLING_RATES:
                raise ConfigError(f"sampling rate {rate} Hz has no ADTS index")
            return SAMPLING_RATES.index(rate)
        if index >= len(SAMPLING_RATES):
            raise ConfigError(f"reserved sampling frequency index {index}")
        return index

    kind = object_type()
    index = sampling_index()
    channels = bits.read(4)
    if kind in (_SBR, _PS):
        sampling_index()  # the extension's (output) rate: the decoder finds SBR by itself
        return AacConfig(object_type(), index, channels, extension_object_type=kind)
    return AacConfig(kind, index, channels)


def audio_specific_config_of(descriptors: bytes) -> bytes:
    """The DecoderSpecificInfo (tag 5) inside an ES_Descriptor: an `esds` box's payload
    after its version and flags, or a CAF `kuki` chunk of AAC."""
    found = _find_descriptor(memoryview(descriptors), 0x05)
    if found is None:
        raise ConfigError("no DecoderSpecificInfo in the codec configuration")
    return bytes(found)


def _find_descriptor(data: memoryview, wanted: int) -> memoryview | None:
    position = 0
    while position + 2 <= len(data):
        tag = data[position]
        position += 1
        size = 0
        for _ in range(4):
            if position >= len(data):
                return None
            byte = data[position]
            position += 1
            size = (size << 7) | (byte & 0x7F)
            if not byte & 0x80:
                break
        payload = data[position : position + size]
        if tag == wanted:
            return payload
        skip = {0x03: 3, 0x04: 13}.get(tag)  # ES_ID and flags; the decoder config's fields
        if skip is not None:
            if tag == 0x03 and len(payload) >= 3:
                flags = payload[2]
                skip += (2 if flags & 0x80 else 0) + (2 if flags & 0x20 else 0)
                if flags & 0x40 and len(payload) > skip:
                    skip += 1 + payload[skip]  # a URL: its length, then its bytes
            inner = _find_descriptor(payload[skip:], wanted)
            if inner is not None:
                return inner
        position += size
    return None


# --- finding access units --------------------------------------------------------------------


class Outcome(enum.Enum):
    UNIT = "unit"
    NEED_MORE = "need more bytes"
    INVALID = "not AAC in this configuration"


def _may_end_unit(data: bytes | memoryview, end: int) -> bool:
    """Could an access unit end just before `end`?  A raw data block ends with the END
    element (`111`) and zero bits up to the next byte: a cheap filter before any decode."""
    last = data[end - 1]
    if last == 0:
        return False
    before = data[end - 2] if end >= 2 else 0
    trailing_zeros = (last & -last).bit_length() - 1
    return ((before << 8 | last) >> trailing_zeros) & 0b111 == 0b111


class UnitFinder:
    """Finds access units one after another with a private decoder (PyAV, libavcodec)."""

    def __init__(self, config: AacConfig) -> None:
        import av  # PyAV: imported when an upload first needs it (~0.1 s)

        if not config.adts_ready:
            raise ConfigError(f"{config.describe()} cannot be framed as ADTS")
        self.config = config
        self._max_unit = MAX_UNIT_BYTES_PER_CHANNEL * config.channels
        self._av = av
        codec: av.audio.codeccontext.AudioCodecContext = av.CodecContext.create("aac", "r")
        codec.extradata = config.audio_specific_config()
        codec.open()
        self._decoder = codec

    def _decodes(self, data: bytes | memoryview) -> bool:
        self._decoder.flush_buffers()
        try:
            return bool(self._decoder.decode(self._av.Packet(bytes(data))))
        except self._av.error.FFmpegError:
            return False

    def next_unit(self, data: bytes | memoryview, *, final: bool) -> tuple[Outcome, int]:
        """The size of the access unit at the start of `data`.

        `final`: no byte will follow `data`, so a unit must end within it.
        """
        available = min(len(data), self._max_unit)
        if available == 0:
            return Outcome.NEED_MORE, 0
        if not self._decodes(data[:available]):
            # Encoders overshoot the standard's bound at low rates (ffmpeg's, at 8 kHz): a
            # unit may take what ADTS can carry.
            available = min(len(data), ADTS_MAX_FRAME_BYTES - ADTS_HEADER_BYTES)
            if available == self._max_unit or not self._decodes(data[:available]):
                if available == len(data) and not final:
                    return Outcome.NEED_MORE, 0
                return Outcome.INVALID, 0
        low, high = 1, available  # the unit's size is in [low, high]; `high` decodes
        while low < high:
            middle = (low + high) // 2
            probe = middle  # the last position in [low, middle] where a unit may end
            while probe >= low and not _may_end_unit(data, probe):
                probe -= 1
            if probe >= low and self._decodes(data[:probe]):
                high = probe
            else:
                low = middle + 1
        return Outcome.UNIT, high

    def units(self, data: bytes | memoryview, *, final: bool) -> Iterator[int]:
        """Sizes of the whole units at the start of `data`, one after another; stops at the
        first that needs more bytes.  Raises ConfigError where `data` is not AAC."""
        position = 0
        while position < len(data):
            outcome, size = self.next_unit(memoryview(data)[position:], final=final)
            if outcome is Outcome.NEED_MORE:
                return
            if outcome is Outcome.INVALID:
                raise ConfigError(f"no {self.config.describe()} access unit at this point")
            yield size
            position += size
