"""Real audio for the tests: the spoken sentence (espeak-ng) and the words its transcript must
hold, ffmpeg, and how many seconds of audio a result decodes to."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
ESPEAK = shutil.which("espeak-ng") or "espeak-ng"

SENTENCE = "The quick brown fox jumps over the lazy dog."
"""Spoken in the basic fixture; the words a transcript must contain are below."""
SENTENCE_WORDS = ("quick", "brown", "fox", "lazy", "dog")


def run_ffmpeg(*args: str) -> None:
    subprocess.run(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True, timeout=120
    )


def speak(text: str, path: Path) -> Path:
    """A WAV of `text` spoken by espeak-ng (22.05 kHz mono)."""
    subprocess.run([ESPEAK, "-w", str(path), text], check=True, timeout=60)
    return path


def decoded_seconds(data: bytes, tmp_path: Path) -> float:
    """The length of audio in `data`, as ffprobe decodes it."""
    path = tmp_path / "decoded.mp3"
    path.write_bytes(data)
    probe = subprocess.run(
        [
            shutil.which("ffprobe") or "ffprobe",
            "-v", "error", "-show_entries", "format=duration",
            "-of", "default=noprint_wrappers=1:nokey=1", str(path),
        ],
        check=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return float(probe.stdout.strip())


def ffmpeg_seconds(path: Path) -> float:
    """The length of audio `ffmpeg -i path` decodes from the file (it may seek), in seconds."""
    done = subprocess.run(
        [FFMPEG, "-v", "error", "-nostdin", "-i", str(path), "-map", "0:a:0", "-ac", "1",
         "-ar", "8000", "-f", "s16le", "pipe:1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return len(done.stdout) / 16_000


def has_words(text: str, words: tuple[str, ...], *, at_least: int | None = None) -> bool:
    lowered = text.lower()
    found = sum(word in lowered for word in words)
    return found >= (len(words) if at_least is None else at_least)
