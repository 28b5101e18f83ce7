"""Debug copies in a local folder: the embedded default, so a newcomer sees them on disk."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import BinaryIO

from anyio.abc import TaskGroup

from ..layout import Layout
from ..settings import Settings
from . import CopyContext, DebugCopies, Keys

logger = logging.getLogger("vrai_stream.debug_store")


class FolderStore:
    kind = "dir"

    def __init__(self, settings: Settings) -> None:
        self.root = settings.debug_dir.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._sample_rate = settings.debug_sample_rate

    def start(self, background: TaskGroup) -> None:
        return None

    def begin(self, context: CopyContext) -> DebugCopies:
        sampled = random.random() < self._sample_rate  # noqa: S311 - sampling, not security  # nosec B311
        return FolderCopies(self.root, context, keep_on_success=sampled)

    async def wait_idle(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class FolderCopies:
    """Writes the upload to `<key>.partial` as it arrives, renamed once it is whole."""

    def __init__(self, root: Path, context: CopyContext, *, keep_on_success: bool) -> None:
        self._root = root
        self._context = context
        self._keep_on_success = keep_on_success
        self._keys: Keys | None = None
        self._partial: BinaryIO | None = None
        self._written: list[Path] = []
        self._broken = False

    def start_input(self, layout: Layout) -> None:
        self._keys = Keys.for_job("", self._context, layout)
        path = self._path(self._keys.input)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._partial = self._partial_path(path).open("wb")
        except OSError:
            self._give_up("could not create the input copy")

    def offer(self, chunk: bytes) -> None:
        if self._partial is None:
            return
        try:
            self._partial.write(chunk)
        except OSError:
            self._give_up("could not write the input copy")

    def end_input(self) -> None:
        if self._partial is None or self._keys is None:
            return
        path = self._path(self._keys.input)
        try:
            self._partial.close()
            self._partial_path(path).replace(path)
            self._written.append(path)
        except OSError:
            self._give_up("could not complete the input copy")
        self._partial = None

    def add_output(self, mp3: bytes) -> None:
        if self._keys is None or self._broken or not mp3:
            return
        path = self._path(self._keys.output)
        try:
            path.write_bytes(mp3)
            self._written.append(path)
        except OSError:
            self._give_up("could not write the output copy")

    def abandon(self) -> None:
        self._discard_partial()
        for path in self._written:
            path.unlink(missing_ok=True)
        self._written.clear()

    async def settle(self, failure_code: str | None) -> dict[str, str] | None:
        self._discard_partial()
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
            try:
                shutil.copyfile(source, self._path(error_key))
            except OSError:
                logger.warning("could not keep an error copy", extra={"key": error_key})
                continue
            links[which] = error_key
        return links or None

    def _path(self, key: str) -> Path:
        return self._root / key

    @staticmethod
    def _partial_path(path: Path) -> Path:
        return path.with_name(path.name + ".partial")

    def _discard_partial(self) -> None:
        if self._partial is not None and self._keys is not None:
            self._partial.close()
            self._partial_path(self._path(self._keys.input)).unlink(missing_ok=True)
            self._partial = None

    def _give_up(self, why: str) -> None:
        logger.warning("debug copy abandoned", extra={"reason": why, "store": "dir"})
        self._broken = True
        self.abandon()
