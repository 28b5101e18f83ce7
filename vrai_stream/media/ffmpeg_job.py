"""One running ffmpeg: the pumps around it, its deadline and its death.

The upload is fed to ffmpeg's stdin chunk by chunk; its stdout drains into a `Spool`, and
the tail of its stderr is kept to explain a failure (`media.failures`).
"""

from __future__ import annotations

import contextlib
import subprocess  # only its PIPE and DEVNULL constants  # nosec B404
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from vrai_stream.media.child_process import ChildProcess, spawn
from vrai_stream.spool import Spool

STDERR_TAIL_BYTES = 4096
KILL_GRACE_SECONDS = 2.0


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
