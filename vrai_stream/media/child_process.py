"""A child process started from a worker thread, its pipes served by the event loop.

Starting a process blocks its caller until the child has exec'd: asyncio and uvloop both
fork on the event loop's thread and wait there, which on a busy machine stalls every
request for as long as the new child waits for a CPU (tens to hundreds of milliseconds).
Here `subprocess.Popen` runs in a worker thread; the loop only reads and writes the
non-blocking pipes and learns of the child's exit from a pidfd.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess  # argv lists only, never a shell  # nosec B404
from collections.abc import Sequence
from typing import IO

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

READ_SIZE = 64 * 1024
PIPE_BYTES = 1024 * 1024
"""ffmpeg's stdin pipe (64 KiB by default; 1 MiB is Linux's limit for unprivileged users):
uvicorn hands over the body in reads of up to 256 KiB, and a small pipe splits each into
several writes, each a wake-up of both processes."""
_unreaped: set[subprocess.Popen[bytes]] = set()
"""Children not yet reaped: whatever outlives its job is killed as the server shuts down."""
EXIT_POLL_SECONDS = 0.05
"""How often to look for the child's exit where no pidfd can be had (see `_open_pidfd`)."""


class _Pipe:
    """One end of a pipe to the child, non-blocking, closed at most once."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._fd = file.fileno()
        self._closed = False
        os.set_blocking(self._fd, False)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._fd)  # wakes a task still waiting on it
            self._file.close()

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError


class PipeReader(_Pipe, anyio.abc.ByteReceiveStream):
    """The parent's end of the child's stdout or stderr."""

    async def receive(self, max_bytes: int = READ_SIZE) -> bytes:
        while True:
            self._check_open()
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                continue
            if not data:
                raise anyio.EndOfStream
            return data


class PipeWriter(_Pipe, anyio.abc.ByteSendStream):
    """The parent's end of the child's stdin."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            self._check_open()
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                await anyio.wait_writable(self._fd)
                continue
            except BrokenPipeError as exc:
                raise anyio.BrokenResourceError from exc
            view = view[written:]
        await anyio.lowlevel.checkpoint()


class ChildProcess:
    """The parts of `anyio.abc.Process` a job uses: its pipes, signals, and its exit."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        _unreaped.add(popen)
        self.stdin = PipeWriter(popen.stdin) if popen.stdin else None
        self.stdout = PipeReader(popen.stdout) if popen.stdout else None
        self.stderr = PipeReader(popen.stderr) if popen.stderr else None
        self._exit_fd = _open_pidfd(popen.pid)
        self._waiting = anyio.Lock()

    @property
    def returncode(self) -> int | None:
        return self._poll()

    def terminate(self) -> None:
        self._popen.terminate()  # a no-op once the child is reaped: never a recycled PID

    def kill(self) -> None:
        self._popen.kill()

    async def wait(self) -> int:
        """Wait for the child to exit and reap it, without holding a thread meanwhile."""
        async with self._waiting:  # one task at a time may wait on the pidfd
            while (code := self._poll()) is None:
                if self._exit_fd is None:
                    await anyio.sleep(EXIT_POLL_SECONDS)
                    continue
                with contextlib.suppress(anyio.ClosedResourceError):
                    await anyio.wait_readable(self._exit_fd)
            return code

    def _poll(self) -> int | None:
        """Reap the child if it has exited; its pidfd is closed with it."""
        code = self._popen.poll()
        if code is not None:
            _unreaped.discard(self._popen)
            if self._exit_fd is not None:
                anyio.notify_closing(self._exit_fd)
                os.close(self._exit_fd)
                self._exit_fd = None
        return code


def _open_pidfd(pid: int) -> int | None:
    """A descriptor that turns readable when the child exits; None where the kernel has none
    (not Linux, Linux before 5.3, or a sandbox that refuses it): then its exit is polled."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


async def spawn(
    command: Sequence[str],
    *,
    stdin: int,
    stdout: int,
    stderr: int,
    start_new_session: bool,
    pass_fds: Sequence[int] = (),
) -> ChildProcess:
    """Start `command` from a worker thread; the event loop never waits for the exec."""

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # an argv list built by the service  # nosec B603
            list(command),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            bufsize=0,
            start_new_session=start_new_session,
            pass_fds=tuple(pass_fds),
        )

    popen = await anyio.to_thread.run_sync(start)
    try:
        return ChildProcess(popen)
    except BaseException:
        _unreaped.discard(popen)
        popen.kill()
        popen.wait()
        raise


def kill_unreaped() -> None:
    """Kill and reap every child still running: the last step of the server's shutdown."""
    for popen in list(_unreaped):
        popen.kill()
        popen.wait()
        _unreaped.discard(popen)
