"""The MP3 the service writes: 16 kHz mono MPEG-2 layer III, and its length by frame count."""

from __future__ import annotations

import math

from vrai_stream.settings import MPEG2_L3_KBPS

SAMPLE_RATE = 16_000
"""Of the MP3 ffmpeg writes (`-ar`), and so of every frame counted here."""


SAMPLES_PER_FRAME = 576


def mp3_duration(data: bytes) -> float:
    """Seconds of audio in an MPEG-2 layer III stream at 16 kHz, by counting its frames.

    The service writes neither ID3 nor Xing headers, so every frame is audio.
    """
    counter = Mp3Frames()
    counter.feed(data)
    return counter.seconds


class Mp3Frames:
    """Counts the frames of an MP3 stream as it is written, in pieces of any size.

    The length of a window's MP3 is known without reading it back: memory stays flat
    however long the window.
    """

    def __init__(self) -> None:
        self.frames = 0
        self._skip = 0
        """Bytes of the current frame not seen yet."""
        self._carry = b""
        """The start of a header cut off at the end of the last piece."""

    @property
    def seconds(self) -> float:
        return math.floor(self.frames * SAMPLES_PER_FRAME / SAMPLE_RATE * 1000) / 1000

    def feed(self, piece: bytes) -> None:
        data = self._carry + piece if self._carry else piece
        self._carry = b""
        offset = min(self._skip, len(data))
        self._skip -= offset
        end = len(data)
        while offset + 4 <= end:
            frame_size = _mp3_frame_size(int.from_bytes(data[offset : offset + 4], "big"))
            if frame_size == 0:
                offset += 1
                continue
            self.frames += 1
            if offset + frame_size > end:
                self._skip = offset + frame_size - end
                return
            offset += frame_size
        self._carry = bytes(data[offset:])


_MPEG2_RATES = (22050, 24000, 16000, 0)


def _mp3_frame_size(header: int) -> int:
    """A frame's length in bytes, or 0 when `header` is not an MPEG-2 layer III header."""
    if header >> 21 != 0x7FF or (header >> 19) & 0b11 != 0b10 or (header >> 17) & 0b11 != 0b01:
        return 0
    bitrate = MPEG2_L3_KBPS[(header >> 12) & 0xF] * 1000
    sample_rate = _MPEG2_RATES[(header >> 10) & 0b11]
    if bitrate == 0 or sample_rate == 0:
        return 0
    padding = (header >> 9) & 1
    return 72 * bitrate // sample_rate + padding
