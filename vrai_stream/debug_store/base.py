"""What every debug store offers the pipeline, and how copies are named and labelled."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

from anyio.abc import TaskGroup

from vrai_stream.settings import ANONYMOUS


class InputFormat(Protocol):
    """What a copy needs to know of the input's container (`media.sniff.Layout` is one)."""

    @property
    def container(self) -> str: ...

    @property
    def mode_name(self) -> str: ...

    @property
    def extension(self) -> str: ...

    @property
    def content_type(self) -> str: ...


@dataclass(frozen=True)
class CopyContext:
    """What names and describes one job's copies."""

    request_id: str
    user_id: str
    from_time: float
    to_time: float
    timestamp: str

    @classmethod
    def now(cls, request_id: str, user_id: str, from_time: float, to_time: float) -> CopyContext:
        return cls(
            request_id=request_id,
            user_id=user_id,
            from_time=from_time,
            to_time=to_time,
            timestamp=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        )


class DebugCopies(Protocol):
    """One job's copies.  Every method but `settle` returns at once and never raises."""

    def start_input(self, layout: InputFormat) -> None:
        """The upload's container is known: its copy can be named and started."""

    def offer(self, chunk: bytes) -> None:
        """The next bytes of the upload."""

    def end_input(self) -> None:
        """The upload ended; its copy can be completed."""

    def start_output(self) -> None:
        """ffmpeg starts writing the MP3 (after `start_input`): its copy can be started."""

    def offer_output(self, chunk: bytes) -> None:
        """The next bytes of the MP3, as ffmpeg writes them."""

    def end_output(self) -> None:
        """The MP3 is whole and holds audio: its copy can be completed.

        An output copy never ended (ffmpeg failed, no audio in the window, the job went
        wrong meanwhile) is dropped by `settle` or `abandon`, and leaves nothing behind.
        """

    def discard_output(self) -> None:
        """The MP3 so far is void (decoded on a guess the index proved wrong): its copy is
        dropped, and `start_output` begins another."""

    def abandon(self) -> None:
        """The job ended without a whole upload: drop everything, leave nothing half-done."""

    async def settle(self, failure_code: str | None) -> dict[str, str] | None:
        """The job's outcome is known.  On failure, keep error copies and return links to them."""


class DebugStore(Protocol):
    kind: str

    def start(self, background: TaskGroup) -> None:
        """Begin work that outlives requests (uploads finishing after the response)."""

    def begin(self, context: CopyContext) -> DebugCopies: ...

    def describe(self) -> tuple[str, dict[str, Any]]:
        """Where copies go, for the one line start-up logs: a sentence, and its fields."""

    async def wait_idle(self) -> None:
        """Return once no upload is under way (at shutdown, before cancelling the rest)."""

    async def aclose(self) -> None: ...


class NoCopies:
    """`VRAI_DEBUG_STORE=off`: copies of nothing."""

    def start_input(self, layout: InputFormat) -> None:
        return None

    def offer(self, chunk: bytes) -> None:
        return None

    def end_input(self) -> None:
        return None

    def start_output(self) -> None:
        return None

    def offer_output(self, chunk: bytes) -> None:
        return None

    def end_output(self) -> None:
        return None

    def discard_output(self) -> None:
        return None

    def abandon(self) -> None:
        return None

    async def settle(self, failure_code: str | None) -> dict[str, str] | None:
        return None


class OffStore:
    kind = "off"

    def __init__(
        self,
        why: str = "set VRAI_DEBUG_BUCKET for copies in S3, or VRAI_DEBUG_STORE=dir for a folder",
    ) -> None:
        self._why = why

    def start(self, background: TaskGroup) -> None:
        return None

    def begin(self, context: CopyContext) -> DebugCopies:
        return NoCopies()

    def describe(self) -> tuple[str, dict[str, Any]]:
        return (
            f"debug copies are not kept: nothing of a request stays on this machine ({self._why})",
            {"store": "off"},
        )

    async def wait_idle(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


logger = logging.getLogger("vrai_stream.debug_store")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_segment(value: str, fallback: str = ANONYMOUS) -> str:
    """A user id or code as one path segment that cannot climb out of its prefix."""
    cleaned = _UNSAFE.sub("_", value).strip("._")[:128]
    return cleaned or fallback


@dataclass(frozen=True)
class Keys:
    """Where one job's copies live, relative to the store's prefix."""

    input: str
    output: str
    context: CopyContext
    extension: str

    @classmethod
    def for_job(cls, prefix: str, context: CopyContext, layout: InputFormat | None) -> Keys:
        extension = layout.extension if layout else "bin"
        folder = f"{prefix}{safe_segment(context.user_id)}/"
        stem = f"{context.timestamp}-{safe_segment(context.request_id, 'request')}"
        return cls(
            input=f"{folder}debug-input-{stem}.{extension}",
            output=f"{folder}debug-output-{stem}.mp3",
            context=context,
            extension=extension,
        )

    def error_input(self, code: str) -> str:
        return self._error(self.input, "input", code, self.extension)

    def error_output(self, code: str) -> str:
        return self._error(self.output, "output", code, "mp3")

    @staticmethod
    def _error(key: str, which: str, code: str, extension: str) -> str:
        renamed = key.replace(f"/debug-{which}-", f"/error-{which}-", 1)
        return f"{renamed.removesuffix('.' + extension)}-{safe_segment(code, 'error')}.{extension}"


def metadata(context: CopyContext, layout: InputFormat | None, outcome: str) -> dict[str, str]:
    """Object metadata: enough to find and replay the job later."""
    return {
        "request-id": context.request_id,
        "user-id": safe_segment(context.user_id),
        "from-time": f"{context.from_time:g}",
        "to-time": f"{context.to_time:g}",
        "format": layout.container if layout else "unknown",
        "mode": layout.mode_name if layout else "unknown",
        "outcome": outcome,
    }
