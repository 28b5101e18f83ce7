"""Debug copies in a local folder, held to a byte cap and a maximum age.

Only on request (`VRAI_DEBUG_STORE=dir`): recordings are users' data, and by default nothing
of a request stays on the machine.  The folder never keeps more than
`VRAI_DEBUG_DIR_MAX_BYTES` of copies, nor a copy older than `VRAI_DEBUG_DIR_MAX_AGE_SECONDS`:
the oldest go first, checked each time a copy is written (and every so often, so that a
server with no requests forgets too).  Files already in the folder at start-up count.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import anyio
from anyio.abc import TaskGroup

from vrai_stream.debug_store.base import CopyContext, DebugCopies, InputFormat, Keys
from vrai_stream.settings import MiB, Settings

logger = logging.getLogger("vrai_stream.debug_store")

MAX_EXPIRY_INTERVAL_SECONDS = 60.0
"""How often at most the folder is checked for old copies while no copy is written."""


class Retention:
    """Every file under the folder, oldest first, and the limits it is held to.

    The store writes every file itself, so it keeps the list in memory (one scan at
    start-up): checking the limits costs nothing per copy, whatever the folder holds.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int | None,
        max_age_seconds: float | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._files: OrderedDict[Path, tuple[float, int]] = OrderedDict()
        """Path -> (modification time, size), oldest first."""
        self.total_bytes = 0

    def scan(self) -> None:
        """Take in what earlier runs left in the folder, then hold it to the limits."""
        found = []
        for path in self.root.rglob("*"):
            try:
                if path.is_symlink() or not path.is_file():
                    continue
                stat = path.stat()
            except OSError:
                continue
            found.append((stat.st_mtime, path, stat.st_size))
        for mtime, path, size in sorted(found, key=lambda entry: entry[0]):
            self._files[path] = (mtime, size)
            self.total_bytes += size
        self.enforce()

    def add(self, path: Path) -> bool:
        """`path` was just written: count it, then drop the oldest files over the limits.

        Returns whether `path` itself is still kept (a file larger than the cap is not).
        """
        try:
            stat = path.stat()
        except OSError:
            return False
        self.forget(path)
        self._files[path] = (stat.st_mtime, stat.st_size)
        self.total_bytes += stat.st_size
        self.enforce()
        return path in self._files

    def forget(self, path: Path) -> None:
        """`path` is gone (or going): it no longer counts."""
        entry = self._files.pop(path, None)
        if entry is not None:
            self.total_bytes -= entry[1]

    def enforce(self) -> int:
        """Remove the oldest files until none is too old and the total fits; return how many."""
        now = self._clock()
        removed = 0
        while self._files:
            path, (mtime, _) = next(iter(self._files.items()))
            too_old = self.max_age_seconds is not None and now - mtime > self.max_age_seconds
            too_big = self.max_bytes is not None and self.total_bytes > self.max_bytes
            if not (too_old or too_big):
                break
            try:
                path.unlink(missing_ok=True)
                if path.parent != self.root:
                    with contextlib.suppress(OSError):  # not empty: another copy is there
                        path.parent.rmdir()
            except OSError as exc:
                logger.warning(
                    "could not remove an old debug copy",
                    extra={"path": str(path), "error": exc.strerror},
                )
            self.forget(path)
            removed += 1
        if removed:
            logger.debug(
                "old debug copies removed",
                extra={"removed": removed, "folderBytes": self.total_bytes},
            )
        return removed

    def describe(self) -> dict[str, Any]:
        return {
            "store": "dir",
            "folder": str(self.root),
            "maxBytes": self.max_bytes,
            "maxAgeSeconds": self.max_age_seconds,
        }


class FolderStore:
    kind = "dir"

    def __init__(self, settings: Settings) -> None:
        self.root = settings.debug_dir.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._sample_rate = settings.debug_sample_rate
        self.retention = Retention(
            self.root,
            max_bytes=settings.debug_dir_max_bytes,
            max_age_seconds=settings.debug_dir_max_age_seconds,
        )
        self.retention.scan()

    def start(self, background: TaskGroup) -> None:
        max_age = self.retention.max_age_seconds
        if max_age is not None:
            interval = min(MAX_EXPIRY_INTERVAL_SECONDS, max(max_age / 10, 1.0))
            background.start_soon(self._expire, interval)

    async def _expire(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            self.retention.enforce()

    def begin(self, context: CopyContext) -> DebugCopies:
        sampled = random.random() < self._sample_rate  # noqa: S311 - sampling, not security  # nosec B311
        return FolderCopies(self.root, context, self.retention, keep_on_success=sampled)

    def describe(self) -> tuple[str, dict[str, Any]]:
        limits = self.retention
        cap = "no size limit" if limits.max_bytes is None else f"at most {_mib(limits.max_bytes)}"
        age = (
            "no age limit"
            if limits.max_age_seconds is None
            else f"none older than {limits.max_age_seconds:g} s"
        )
        message = f"debug copies go to the folder {self.root} ({cap}, {age}; oldest removed first)"
        return message, limits.describe()

    async def wait_idle(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _mib(size: int) -> str:
    return f"{size / MiB:.4g} MiB"


class _PartialFile:
    """A copy written to `<path>.partial` as its bytes arrive, renamed to `path` once whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = self.partial.open("wb")
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)

    def complete(self) -> None:
        self._file.close()
        self.partial.replace(self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self.partial.unlink(missing_ok=True)


class FolderCopies:
    """Writes the upload and the MP3 to `<key>.partial` as they arrive, each renamed once whole."""

    def __init__(
        self, root: Path, context: CopyContext, retention: Retention, *, keep_on_success: bool
    ) -> None:
        self._root = root
        self._context = context
        self._retention = retention
        self._keep_on_success = keep_on_success
        self._keys: Keys | None = None
        self._input: _PartialFile | None = None
        self._output: _PartialFile | None = None
        self._written: list[Path] = []
        self._broken = False

    def start_input(self, layout: InputFormat) -> None:
        self._keys = Keys.for_job("", self._context, layout)
        try:
            self._input = _PartialFile(self._path(self._keys.input))
        except OSError:
            self._give_up("could not create the input copy")

    def offer(self, chunk: bytes) -> None:
        if self._input is None:
            return
        if self._grows_over_cap(self._input, chunk):
            # The folder could not keep it anyway: stop filling the disk with it now.
            self._give_up("the upload is larger than VRAI_DEBUG_DIR_MAX_BYTES")
            return
        try:
            self._input.write(chunk)
        except OSError:
            self._give_up("could not write the input copy")

    def end_input(self) -> None:
        if self._input is None:
            return
        try:
            self._input.complete()
            self._kept(self._input.path)
        except OSError:
            self._give_up("could not complete the input copy")
        self._input = None

    def start_output(self) -> None:
        if self._keys is None or self._broken or self._output is not None:
            return
        try:
            self._output = _PartialFile(self._path(self._keys.output))
        except OSError:
            self._give_up("could not write the output copy")

    def offer_output(self, chunk: bytes) -> None:
        if self._output is None:
            return
        if self._grows_over_cap(self._output, chunk):
            self._give_up("the MP3 is larger than VRAI_DEBUG_DIR_MAX_BYTES")
            return
        try:
            self._output.write(chunk)
        except OSError:
            self._give_up("could not write the output copy")

    def end_output(self) -> None:
        if self._output is None:
            return
        try:
            self._output.complete()
            self._kept(self._output.path)
        except OSError:
            self._give_up("could not write the output copy")
        self._output = None

    def discard_output(self) -> None:
        if self._output is not None:
            self._output.discard()
            self._output = None

    def abandon(self) -> None:
        self._discard_partials()
        for path in self._written:
            path.unlink(missing_ok=True)
            self._retention.forget(path)
        self._written.clear()

    async def settle(self, failure_code: str | None) -> dict[str, str] | None:
        # What was never ended (an MP3 with no audio, or whose ffmpeg failed) keeps no copy.
        self._discard_partials()
        if failure_code is None:
            if not self._keep_on_success:
                self.abandon()
            return None
        if self._keys is None:
            return None
        links: dict[str, str] = {}
        for which, key, error_key in (
            ("input", self._keys.input, self._keys.error_input(failure_code)),
            ("output", self._keys.output, self._keys.error_output(failure_code)),
        ):
            source = self._path(key)
            if source not in self._written:
                continue
            target = self._path(error_key)
            try:
                shutil.copyfile(source, target)
            except OSError:
                logger.warning("could not keep an error copy", extra={"key": error_key})
                continue
            if self._retention.add(target):
                links[which] = error_key
        return links or None

    def _kept(self, path: Path) -> None:
        self._written.append(path)
        self._retention.add(path)

    def _path(self, key: str) -> Path:
        return self._root / key

    def _grows_over_cap(self, copy: _PartialFile, chunk: bytes) -> bool:
        copy.size += len(chunk)
        cap = self._retention.max_bytes
        return cap is not None and copy.size > cap

    def _discard_partials(self) -> None:
        for copy in (self._input, self._output):
            if copy is not None:
                copy.discard()
        self._input = self._output = None

    def _give_up(self, why: str) -> None:
        logger.warning("debug copy abandoned", extra={"reason": why, "store": "dir"})
        self._broken = True
        self.abandon()
