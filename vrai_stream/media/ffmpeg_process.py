"""One running ffmpeg: the pumps around it, its deadline and its death.

The upload is fed to ffmpeg's stdin chunk by chunk; its stdout drains into a `Spool` (and,
chunk by chunk as it is written, to whoever else wants the MP3: the debug copy), and the
tail of its stderr is kept to explain a failure (`media.failures`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess  # only its PIPE and DEVNULL constants  # nosec B404
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from vrai_stream.media.child_process import ChildProcess, PipeReader, spawn
from vrai_stream.media.mp3 import Mp3Frames
from vrai_stream.spool import Spool

STDERR_TAIL_BYTES = 4096
KILL_GRACE_SECONDS = 2.0
DEADLINE_STEP_SECONDS = 0.5
"""How finely the deadline tells ffmpeg's own time from time our PCM reader held it back."""


@dataclass(frozen=True)
class TranscodeOutcome:
    returncode: int | None
    timed_out: bool
    stderr_tail: str
    seconds: float


PcmSink = Callable[[bytes], Awaitable[None]]
OutputSink = Callable[[bytes], None]
"""Gets each chunk of the MP3 as it is written; must return at once and never raise."""


class PcmPipe:
    """A second output of ffmpeg's, the decoded window as PCM, on a pipe of its own.

    Build the command with `write_fd` (`pipe:N`); the child inherits that end only.  `sink`
    gets the audio as it comes, `end` is awaited once all of it has.
    """

    def __init__(self, sink: PcmSink, end: Callable[[], Awaitable[None]]) -> None:
        read_fd, self.write_fd = os.pipe()
        self.reader = PipeReader(os.fdopen(read_fd, "rb", buffering=0))
        self.sink = sink
        self.end = end
        self.waiting = False
        """True while the sink holds ffmpeg back: that time is not ffmpeg's own."""

    def close_write_end(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    async def drain(self) -> None:
        async for chunk in self.reader:
            self.waiting = True
            try:
                await self.sink(chunk)
            finally:
                self.waiting = False
        await self.end()


@asynccontextmanager
async def run_ffmpeg(
    command: list[str],
    output: Spool,
    *,
    timeout_after_input: float,
    feeds_stdin: bool = True,
    pcm: PcmPipe | None = None,
    on_output: OutputSink | None = None,
) -> AsyncIterator[FfmpegProcess]:
    """Start ffmpeg, drain it in the background, and make sure it is gone on the way out."""
    try:
        process = await spawn(
            command,
            stdin=subprocess.PIPE if feeds_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            pass_fds=(pcm.write_fd,) if pcm else (),
        )
    except BaseException:
        if pcm is not None:
            await pcm.reader.aclose()
        raise
    finally:
        if pcm is not None:
            pcm.close_write_end()  # the child has its own copy: EOF comes when it exits
    job = FfmpegProcess(
        process, output, timeout_after_input=timeout_after_input, pcm=pcm, on_output=on_output
    )
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


class FfmpegProcess:
    """One running ffmpeg, fed chunk by chunk, its stdout drained into `output`."""

    def __init__(
        self,
        process: ChildProcess,
        output: Spool,
        *,
        timeout_after_input: float,
        pcm: PcmPipe | None = None,
        on_output: OutputSink | None = None,
    ) -> None:
        self._process = process
        self.output = output
        self._on_output = on_output
        self.mp3 = Mp3Frames()
        """The MP3's length as it is written: nobody reads it back to learn it."""
        self._pcm = pcm
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
    def reading(self) -> bool:
        """Still reading its input: False once it has its window (or has gone)."""
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
            async with anyio.create_task_group() as outputs:
                if self._pcm is not None:
                    outputs.start_soon(self._pcm.drain)
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
            self.mp3.feed(chunk)
            if self._on_output is not None:
                self._on_output(chunk)

    async def _drain_stderr(self) -> None:
        assert self._process.stderr is not None
        async for chunk in self._process.stderr:
            self._stderr_tail.append(chunk)
            self._stderr_size += len(chunk)
            while self._stderr_size > STDERR_TAIL_BYTES and len(self._stderr_tail) > 1:
                self._stderr_size -= len(self._stderr_tail.popleft())

    async def _deadline(self) -> None:
        await self._input_done.wait()
        left = self._timeout_after_input
        while left > 0:
            step = min(left, DEADLINE_STEP_SECONDS)
            await anyio.sleep(step)
            if self._pcm is None or not self._pcm.waiting:
                left -= step
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
        pcm = self._pcm.reader if self._pcm else None
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr, pcm):
            if stream is not None:
                with contextlib.suppress(OSError, anyio.BrokenResourceError):
                    await stream.aclose()
