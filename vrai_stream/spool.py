"""Spools: bytes held in memory up to a cap, then in a temp file, never unbounded.

Each spool has its own memory cap, and all spools together draw from one memory `Budget`
and one disk `Budget`, so what spools hold stays bounded however many jobs run at once.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, cast

from vrai_stream import metrics
from vrai_stream.errors import DiskFull

TEMP_PREFIX = "vrai-"
"""Every temp file the service creates starts with this, so leftovers are recognizable."""


def _own_prefix() -> str:
    """`vrai-<pid>-`: a leftover names the process that made it, dead or alive."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


logger = logging.getLogger("vrai_stream.spool")


class Budget:
    """Bytes that all spools may hold together, in memory or on disk; None is no limit."""

    def __init__(self, total_bytes: int | None) -> None:
        self.total_bytes = total_bytes
        self.reserved_bytes = 0

    def try_reserve(self, nbytes: int) -> bool:
        if self.total_bytes is not None and self.reserved_bytes + nbytes > self.total_bytes:
            return False
        self.reserved_bytes += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.reserved_bytes -= nbytes


class Spool:
    """A write-then-read byte store that rolls over to disk at its cap or the budget's.

    Writes are synchronous: they land in memory or the page cache and take microseconds.
    """

    def __init__(self, *, memory_cap: int, memory: Budget, disk: Budget, tmp_dir: Path) -> None:
        self._memory_cap = memory_cap
        self._memory = memory
        self._disk = disk
        # Rollover is ours to decide (max_size=0 turns off the automatic one).
        self._file = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed by close()
            max_size=0, mode="w+b", dir=str(tmp_dir), prefix=_own_prefix(), suffix=".spool"
        )
        self._reserved = 0
        self._on_disk_bytes = 0
        self.size = 0
        self.on_disk = False
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.on_disk and not self._reserve(len(data)):
            self._roll_over()
        if self.on_disk:
            self._claim_disk(len(data))
        with _disk_full_on_enospc():
            self._file.write(data)
        self.size += len(data)

    def _claim_disk(self, nbytes: int) -> None:
        if not self._disk.try_reserve(nbytes):
            raise _disk_full()
        self._on_disk_bytes += nbytes

    def _reserve(self, nbytes: int) -> bool:
        if self._reserved + nbytes > self._memory_cap:
            return False
        if not self._memory.try_reserve(nbytes):
            return False
        self._reserved += nbytes
        return True

    def _roll_over(self) -> None:
        self._claim_disk(self.size)
        with _disk_full_on_enospc():
            self._file.rollover()
        self.on_disk = True
        self._release_memory()

    def _release_memory(self) -> None:
        self._memory.release(self._reserved)
        self._reserved = 0

    def reset(self) -> None:
        """Forget what was written, and give back its memory and disk: a decode that did not
        hold (a wrong guess, see `media.index_last`) is done again into the same spool."""
        with _disk_full_on_enospc():
            self._file.seek(0)
            self._file.truncate()
        self._release_memory()
        self._disk.release(self._on_disk_bytes)
        self._on_disk_bytes = 0
        self.size = 0

    def reader(self) -> IO[bytes]:
        """Rewind and hand out the data for reading; the spool still owns it.

        While the data is in memory, the reader has no `fileno()`: asked for one, a
        `SpooledTemporaryFile` rolls itself over to disk (httpx asks, to size a multipart
        upload), behind the back of the disk budget and of `on_disk`.
        """
        with _disk_full_on_enospc():
            # On disk, rewinding flushes the file's buffer: the disk may be full only now.
            self._file.seek(0)
        if self.on_disk:
            return self._file
        return cast(IO[bytes], _MemoryReader(self._file))

    def close(self) -> None:
        """Free the memory and delete the temp file; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._release_memory()
        self._disk.release(self._on_disk_bytes)
        self._on_disk_bytes = 0
        try:
            self._file.close()
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                return  # the final flush found the disk full; the file is gone all the same
            metrics.CLEANUP_FAILURES.inc()
            logger.warning("could not delete a spool file", exc_info=True)

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _MemoryReader(io.BufferedIOBase):
    """Reads, seeks and tells through to a file, and has no file descriptor to offer."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__()
        self._file = file

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._file.read(-1 if size is None else size)

    def read1(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


class FileSpool:
    """An upload kept on disk under a name, for ffmpeg to read with seeks (SEEKABLE mode)."""

    def __init__(self, *, disk: Budget, tmp_dir: Path, suffix: str = ".input") -> None:
        self._disk = disk
        self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed by close()
            mode="wb", dir=tmp_dir, prefix=_own_prefix(), suffix=suffix
        )
        self.path = Path(self._file.name)
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self._disk.try_reserve(len(data)):
            raise _disk_full()
        self.size += len(data)
        with _disk_full_on_enospc():
            self._file.write(data)

    def flush(self) -> None:
        """Flush, so whoever reads the file by name (ffmpeg, a framer) sees every byte."""
        with _disk_full_on_enospc():
            self._file.flush()

    def finish(self) -> None:
        """Every byte is written: flush."""
        self.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._disk.release(self.size)
        try:
            self._file.close()
        except OSError:
            metrics.CLEANUP_FAILURES.inc()
            logger.warning("could not delete an input spool file", exc_info=True)

    def __enter__(self) -> FileSpool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _disk_full_on_enospc() -> Iterator[None]:
    """A full disk (or quota) while spooling is the client's 507, not our 500."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _disk_full() from exc
        raise


def _disk_full() -> DiskFull:
    return DiskFull("The server ran out of disk space for spooling audio; retry later")


def usable_tmp_dir(preferred: Path) -> Path:
    """`preferred` if the service can write there, else the system's temp folder."""
    try:
        with tempfile.TemporaryFile(dir=preferred, prefix=_own_prefix()):
            return preferred
    except OSError as exc:
        fallback = Path(tempfile.gettempdir())
        logger.warning(
            "temp folder is not writable; using the system's",
            extra={"tmpDir": str(preferred), "fallback": str(fallback), "error": exc.strerror},
        )
        return fallback


def sweep_leftovers(tmp_dir: Path) -> int:
    """Delete temp files that a crashed predecessor left; returns how many.

    Only files whose name carries the pid of a process that no longer runs: another
    instance sharing the folder keeps its files.  (Spools in memory or unnamed files
    vanish with their process; only named input spools can be left behind.)
    """
    removed = 0
    for path in tmp_dir.glob(f"{TEMP_PREFIX}*"):
        pid_text = path.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)) or not path.is_file():
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            metrics.CLEANUP_FAILURES.inc()
            logger.warning("could not delete a leftover temp file", extra={"path": str(path)})
    if removed:
        logger.warning("removed temp files left by a crashed process", extra={"count": removed})
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
