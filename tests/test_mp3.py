"""The MP3's length, counted as ffmpeg writes it: the same whatever the pieces."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from vrai_stream.media.mp3 import Mp3Frames, mp3_duration


@pytest.fixture(scope="module")
def mp3(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """What the service writes: 16 kHz mono MP3, no ID3, no Xing header; 37 s of tone."""
    path = tmp_path_factory.mktemp("mp3") / "tone.mp3"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "sine=f=440:d=37:r=44100",
         "-ac", "1", "-ar", "16000", "-c:a", "libmp3lame", "-b:a", "48k", "-map_metadata", "-1",
         "-id3v2_version", "0", "-write_xing", "0", "-f", "mp3", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    return path.read_bytes()


def _ffprobe_seconds(data: bytes, tmp_path: Path) -> float:
    path = tmp_path / "probe.mp3"
    path.write_bytes(data)
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
         str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(out)


def test_the_length_is_what_a_decoder_finds(mp3: bytes, tmp_path: Path) -> None:
    assert mp3_duration(mp3) == pytest.approx(_ffprobe_seconds(mp3, tmp_path), abs=0.05)
    assert mp3_duration(mp3) == pytest.approx(37.0, abs=0.1)


@pytest.mark.parametrize("seed", range(5))
def test_pieces_of_any_size_count_the_same(mp3: bytes, seed: int) -> None:
    rng = random.Random(seed)
    counter = Mp3Frames()
    offset = 0
    while offset < len(mp3):
        size = rng.choice([1, 2, 3, 5, 143, 144, 145, 4096, 32768])
        counter.feed(mp3[offset : offset + size])
        offset += size
    assert counter.seconds == mp3_duration(mp3)


def test_nothing_is_no_audio() -> None:
    counter = Mp3Frames()
    counter.feed(b"")
    counter.feed(b"\x00" * 1000)
    assert counter.seconds == 0.0
