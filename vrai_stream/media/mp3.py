"""The MP3 the service writes: 16 kHz mono MPEG-2 layer III, and its length by frame count."""

from __future__ import annotations

import math

from vrai_stream.settings import MPEG2_L3_KBPS

SAMPLE_RATE = 16_000
"""Of the MP3 ffmpeg writes (`-ar`), and so of every frame counted here."""


def mp3_duration(data: bytes) -> float:
    """Seconds of audio in an MPEG-2 layer III stream at 16 kHz, by counting its frames.

    The service writes neither ID3 nor Xing headers, so every frame is audio.
    """
    frames = 0
    offset = 0
    end = len(data)
    while offset + 4 <= end:
        header = int.from_bytes(data[offset : offset + 4], "big")
        frame_size = _mp3_frame_size(header)
        if frame_size == 0:
            offset += 1
            continue
        frames += 1
        offset += frame_size
    samples_per_frame = 576
    return math.floor(frames * samples_per_frame / SAMPLE_RATE * 1000) / 1000


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
