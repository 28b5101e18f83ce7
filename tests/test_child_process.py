"""The child process behind every ffmpeg: spawned off the loop, pipes served by the loop.

Real processes (`cat`, `sh`); each test checks that the child is reaped and that no
descriptor of ours (pipes, pidfd) outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess

import anyio
import pytest

from vrai_stream.media.child_process import ChildProcess, kill_unreaped, spawn

pytestmark = pytest.mark.anyio


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def spawn_quiet(command: list[str]) -> ChildProcess:
    """A child with no pipes, in a session of its own as ffmpeg's are: only its exit matters."""
    return await spawn(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


async def test_bytes_go_through_a_child_and_it_is_reaped() -> None:
    before = open_fds()
    child = await spawn(
        ["cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    payload = os.urandom(3 * 1024 * 1024)  # many times a pipe's buffer: writes must wait
    received = bytearray()

    async def read_all() -> None:
        assert child.stdout is not None
        async for chunk in child.stdout:
            received.extend(chunk)

    async with anyio.create_task_group() as group:
        group.start_soon(read_all)
        await child.stdin.send(payload)
        await child.stdin.aclose()
    assert bytes(received) == payload
    assert await child.wait() == 0
    await child.stdout.aclose()
    await child.stderr.aclose()
    assert open_fds() == before, "a pipe or the pidfd was left open"


async def test_writing_to_a_child_that_exited_is_a_broken_resource() -> None:
    child = await spawn(
        ["sh", "-c", "exit 3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert await child.wait() == 3
    assert child.stdin is not None
    with pytest.raises(anyio.BrokenResourceError):
        await child.stdin.send(b"x" * 1024 * 1024)
    await child.stdin.aclose()


async def test_two_waiters_and_a_signal() -> None:
    child = await spawn_quiet(["sleep", "30"])
    codes: list[int] = []

    async def wait() -> None:
        codes.append(await child.wait())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            group.start_soon(wait)
            await anyio.sleep(0.1)
            child.terminate()
    assert codes == [-signal.SIGTERM, -signal.SIGTERM]
    child.kill()  # reaped already: a no-op, never a signal to a recycled PID


async def test_without_a_pidfd_the_exit_is_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", refuse)
    child = await spawn_quiet(["sh", "-c", "sleep 0.2; exit 7"])
    with anyio.fail_after(5):
        assert await child.wait() == 7


async def test_kill_unreaped_ends_children_a_cancelled_job_left() -> None:
    child = await spawn_quiet(["sleep", "30"])
    assert child.returncode is None
    kill_unreaped()  # what the server's shutdown does last
    assert child.returncode == -signal.SIGKILL
    assert await child.wait() == -signal.SIGKILL


async def test_the_stdin_pipe_holds_a_whole_read_of_the_body() -> None:
    """uvicorn hands over up to 256 KiB at a time: ffmpeg's stdin takes it in one write."""
    child = await spawn(
        ["sleep", "5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert child.stdin is not None
    with anyio.fail_after(2):  # a 64 KiB pipe would block here: nobody reads it
        await child.stdin.send(b"x" * 256 * 1024)
    child.kill()
    await child.wait()
    await child.stdin.aclose()
