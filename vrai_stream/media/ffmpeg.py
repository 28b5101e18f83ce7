"""The ffmpeg binary and its command line.

ffmpeg reads the upload from stdin (or, for layouts that need seeking, from the service's
own spool file), trims the window and writes 16 kHz mono MP3 to stdout.  Only the demuxers
and protocols listed here are allowed: HLS, concat and their kin would otherwise open other
files or URLs named inside an upload.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vrai_stream.media.mp3 import SAMPLE_RATE
from vrai_stream.media.window import Window

AUDIO_DEMUXERS = (
    "wav",
    "w64",
    "aiff",
    "mp3",
    "ogg",
    "matroska",
    "flac",
    "amr",
    "aac",
    "caf",
    "mov",
)
"""Demuxers an upload may use.  ffmpeg matches any alias, so `mov` admits MP4, M4A and 3GP."""


class FfmpegNotFound(RuntimeError):
    """No usable ffmpeg binary: the service cannot start."""


def find_ffmpeg(configured: str | None) -> str:
    """`VRAI_FFMPEG`, else `ffmpeg` on PATH, else the imageio-ffmpeg wheel's binary."""
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise FfmpegNotFound(f"VRAI_FFMPEG={configured!r} is not an executable file")
        return found
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg

        bundled: str = imageio_ffmpeg.get_ffmpeg_exe()
        return bundled
    except (ImportError, RuntimeError):
        raise FfmpegNotFound(
            "ffmpeg not found: install it (apt-get install ffmpeg), set VRAI_FFMPEG, "
            "or pip install imageio-ffmpeg"
        ) from None


def build_command(
    ffmpeg: str,
    window: Window,
    bitrate_kbps: int,
    input_path: Path | None = None,
    memory_limit_bytes: int | None = None,
    pcm_fd: int | None = None,
) -> list[str]:
    """ffmpeg's argv.  `input_path` is the service's own spool; otherwise stdin is read.

    With `pcm_fd`, the same window also goes to that descriptor as 16 kHz mono s16le, for
    the segmenter: one decode serves both outputs.

    The trim options come after `-i`: ffmpeg cannot seek a pipe, and an input-side `-ss`
    on a pipe silently drops audio instead of decoding up to the start.
    """
    if input_path is None:
        source = ["-protocol_whitelist", "pipe", "-i", "pipe:0"]
    else:
        source = ["-nostdin", "-protocol_whitelist", "file", "-i", f"file:{input_path}"]
    return [
        *_memory_limit(memory_limit_bytes),
        ffmpeg,
        "-hide_banner",
        "-loglevel",
        "error",
        "-format_whitelist",
        ",".join(AUDIO_DEMUXERS),
        *source,
        "-map",
        "0:a:0",
        "-ss",
        f"{window.start:.3f}",
        "-t",
        f"{window.length:.3f}",
        "-ac",
        "1",
        "-ar",
        str(SAMPLE_RATE),
        "-c:a",
        "libmp3lame",
        "-b:a",
        f"{bitrate_kbps}k",
        "-map_metadata",
        "-1",
        "-id3v2_version",
        "0",
        "-write_xing",
        "0",
        # Write whole 32 KiB buffers, not each 144-byte frame: one wake-up of the service
        # per frame cost it a third of a second per 5 minutes of audio.
        "-flush_packets",
        "0",
        "-f",
        "mp3",
        "pipe:1",
        *_pcm_output(window, pcm_fd),
    ]


def _pcm_output(window: Window, fd: int | None) -> list[str]:
    if fd is None:
        return []
    trim = ["-ss", f"{window.start:.3f}", "-t", f"{window.length:.3f}"]
    pcm = ["-ac", "1", "-ar", str(SAMPLE_RATE), "-flush_packets", "0", "-f", "s16le"]
    return ["-map", "0:a:0", *trim, *pcm, f"pipe:{fd}"]


def _memory_limit(limit_bytes: int | None) -> list[str]:
    """Cap ffmpeg's memory: a few kilobytes of MP4 tables can declare millions of packets,
    and ffmpeg builds every track's index up front.  `prlimit` (util-linux, in every
    Debian image) sets RLIMIT_DATA and execs ffmpeg, so the PID stays the same.
    """
    prlimit = shutil.which("prlimit")
    if not limit_bytes or prlimit is None:
        return []
    return [prlimit, f"--data={limit_bytes}", "--"]
