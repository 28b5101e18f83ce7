"""The ffmpeg process: its command line, the pumps around it, its deadline and its death.

ffmpeg reads the upload from stdin (or, for layouts that need seeking, from the service's
own spool file), trims the window and writes 16 kHz mono MP3 to stdout, which drains into
a `Spool`.  Only the demuxers and protocols listed here are allowed: HLS, concat and their
kin would otherwise open other files or URLs named inside an upload.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import signal
import subprocess  # only its PIPE and DEVNULL constants  # nosec B404
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from . import errors
from .child_process import ChildProcess, spawn
from .spool import Spool

SAMPLE_RATE = 16_000

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

STDERR_TAIL_BYTES = 4096
KILL_GRACE_SECONDS = 2.0


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


@dataclass(frozen=True)
class Window:
    """The part of the recording to keep, in seconds from its start."""

    start: float
    end: float

    @property
    def length(self) -> float:
        return self.end - self.start


def build_command(
    ffmpeg: str,
    window: Window,
    bitrate_kbps: int,
    input_path: Path | None = None,
    memory_limit_bytes: int | None = None,
) -> list[str]:
    """ffmpeg's argv.  `input_path` is the service's own spool; otherwise stdin is read.

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
    ]


def _memory_limit(limit_bytes: int | None) -> list[str]:
    """Cap ffmpeg's memory: a few kilobytes of MP4 tables can declare millions of packets,
    and ffmpeg builds every track's index up front.  `prlimit` (util-linux, in every
    Debian image) sets RLIMIT_DATA and execs ffmpeg, so the PID stays the same.
    """
    prlimit = shutil.which("prlimit")
    if not limit_bytes or prlimit is None:
        return []
    return [prlimit, f"--data={limit_bytes}", "--"]


@dataclass(frozen=True)
class TranscodeOutcome:
    returncode: int | None
    timed_out: bool
    stderr_tail: str
    seconds: float


@asynccontextmanager
async def run_ffmpeg(
    command: list[str],
    output: Spool,
    *,
    timeout_after_input: float,
    feeds_stdin: bool = True,
) -> AsyncIterator[FfmpegJob]:
    """Start ffmpeg, drain it in the background, and make sure it is gone on the way out."""
    process = await spawn(
        command,
        stdin=subprocess.PIPE if feeds_stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    job = FfmpegJob(process, output, timeout_after_input=timeout_after_input)
    try:
        if not feeds_stdin:
            await job.finish_input()
        async with anyio.create_task_group() as group:
            group.start_soon(job.supervise)
            try:
                yield job
            finally:
                group.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            # EOF on stdin and EPIPE on stdout end ffmpeg at once, even mid-read, where
            # SIGTERM would wait out the grace period.
            await job.close_pipes()
            await job.stop()


class FfmpegJob:
    """One running ffmpeg, fed chunk by chunk, its stdout drained into `output`."""

    def __init__(self, process: ChildProcess, output: Spool, *, timeout_after_input: float) -> None:
        self._process = process
        self.output = output
        self._timeout_after_input = timeout_after_input
        self._stderr_tail: deque[bytes] = deque()
        self._stderr_size = 0
        self._stdin_open = process.stdin is not None
        self._exited = anyio.Event()
        self._input_done = anyio.Event()
        self._timed_out = False
        self._started_at = anyio.current_time()
        self._finished_at = 0.0

    @property
    def accepts_input(self) -> bool:
        """False once ffmpeg stopped reading: it has its window, or it failed."""
        return self._stdin_open

    async def feed(self, chunk: bytes) -> None:
        """Write to ffmpeg's stdin; once ffmpeg stops reading, chunks are dropped."""
        if not self._stdin_open:
            return
        assert self._process.stdin is not None
        try:
            await self._process.stdin.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            # ffmpeg exits as soon as it has written its window: a broken pipe is normal.
            self._stdin_open = False

    async def finish_input(self) -> None:
        """Close stdin, so ffmpeg sees the end of the upload; start its deadline."""
        if self._stdin_open:
            self._stdin_open = False
            assert self._process.stdin is not None
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await self._process.stdin.aclose()
        self._input_done.set()

    async def wait(self) -> TranscodeOutcome:
        """Wait for ffmpeg to exit and its output to be drained."""
        await self._exited.wait()
        return TranscodeOutcome(
            returncode=self._process.returncode,
            timed_out=self._timed_out,
            stderr_tail=self.stderr_tail(),
            seconds=self._finished_at - self._started_at,
        )

    def stderr_tail(self) -> str:
        return b"".join(self._stderr_tail).decode("utf-8", "replace").strip()

    async def supervise(self) -> None:
        """Drain both pipes, enforce the deadline, and reap the process."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._drain_stderr)
            group.start_soon(self._deadline)
            await self._drain_stdout()
            await self._process.wait()
            group.cancel_scope.cancel()
        self._stdin_open = False
        self._finished_at = anyio.current_time()
        self._exited.set()

    async def _drain_stdout(self) -> None:
        assert self._process.stdout is not None
        async for chunk in self._process.stdout:
            self.output.write(chunk)

    async def _drain_stderr(self) -> None:
        assert self._process.stderr is not None
        async for chunk in self._process.stderr:
            self._stderr_tail.append(chunk)
            self._stderr_size += len(chunk)
            while self._stderr_size > STDERR_TAIL_BYTES and len(self._stderr_tail) > 1:
                self._stderr_size -= len(self._stderr_tail.popleft())

    async def _deadline(self) -> None:
        await self._input_done.wait()
        await anyio.sleep(self._timeout_after_input)
        self._timed_out = True
        await self.stop()

    async def stop(self) -> None:
        """Terminate, then kill: ffmpeg must never outlive its job."""
        process = self._process
        if process.returncode is None:
            process.terminate()  # Popen's: a no-op for a child already gone
            with anyio.move_on_after(KILL_GRACE_SECONDS):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()

    async def close_pipes(self) -> None:
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError, anyio.BrokenResourceError):
                    await stream.aclose()


KILLED_FROM_OUTSIDE = (-signal.SIGKILL, -signal.SIGTERM)
"""Exit statuses of an ffmpeg killed by someone else: the OOM killer sends SIGKILL."""


def explain_failure(outcome: TranscodeOutcome, retry_after_seconds: int = 5) -> errors.ServiceError:
    """Turn ffmpeg's stderr into an error a user can act on."""
    if outcome.timed_out:
        return errors.TranscodeTimeout(
            "Decoding the audio took too long; the file may be damaged or unusually complex"
        )
    if outcome.returncode in KILLED_FROM_OUTSIDE:
        # Not the recording's fault (the service kills ffmpeg only after its deadline, or
        # once the job is gone): most likely the machine ran short of memory.  Retry.
        return errors.TranscodeInterrupted(
            "Decoding was interrupted on the server; please retry shortly",
            headers={"Retry-After": str(retry_after_seconds)},
        )
    tail = outcome.stderr_tail
    lowered = tail.lower()
    last_line = _last_line(tail)
    if "not on whitelist" in lowered:
        return errors.UnsupportedFormat(
            "This file's container is not an audio format the service accepts "
            "(WAV, MP3, M4A/MP4, CAF, 3GP/AMR, WebM, OGG, FLAC, AAC)"
        )
    if "matches no streams" in lowered or "does not contain any stream" in lowered:
        return errors.UndecodableAudio("The file contains no audio stream")
    if any(
        sign in lowered for sign in ("moov atom not found", "partial file", "missing packet table")
    ):
        return errors.UndecodableAudio(
            "The file is incomplete or its index is missing (truncated upload?)"
        )
    if "invalid data found" in lowered:
        return errors.UndecodableAudio("The upload is not a recognizable audio file")
    reason = f" (ffmpeg: {last_line})" if last_line else ""
    return errors.UndecodableAudio(f"The audio could not be decoded{reason}")


_NOISE = re.compile(r"^(?:\[\w+ @ 0x[0-9a-f]+\] |(?:pipe|file):\S*: )")


def _last_line(text: str) -> str:
    """ffmpeg's last complaint, without its internal addresses or the spool's path."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    return _NOISE.sub("", lines[-1])[:300]


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


_MPEG2_L3_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 0)
_MPEG2_RATES = (22050, 24000, 16000, 0)


def _mp3_frame_size(header: int) -> int:
    """A frame's length in bytes, or 0 when `header` is not an MPEG-2 layer III header."""
    if header >> 21 != 0x7FF or (header >> 19) & 0b11 != 0b10 or (header >> 17) & 0b11 != 0b01:
        return 0
    bitrate = _MPEG2_L3_KBPS[(header >> 12) & 0xF] * 1000
    sample_rate = _MPEG2_RATES[(header >> 10) & 0b11]
    if bitrate == 0 or sample_rate == 0:
        return 0
    padding = (header >> 9) & 1
    return 72 * bitrate // sample_rate + padding
