"""One job's records: what it was asked (`JobSpec`), what it did (`JobResult`), and who
hears it as it goes (`JobListener`), which the HTTP layer reads and renders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from vrai_stream.media.sniff import Layout
from vrai_stream.media.window import Window
from vrai_stream.settings import ANONYMOUS
from vrai_stream.speech.transcribers.base import Segment, TranscribeOptions, Transcript
from vrai_stream.spool import Spool


class JobListener(Protocol):
    """Hears a job as it goes, so an answer can stream while the upload still arrives.

    Calls come from the job's own tasks and must not block: a listener queues, never waits.
    """

    def progress(self, received_bytes: int, decoded_seconds: float) -> None:
        """The body so far, and how much of the window ffmpeg has decoded."""

    def segment(self, index: int, segment: Segment) -> None:
        """Segment `index` is transcribed; its times are seconds from the window's start."""


class SilentListener:
    """The listener of a job nobody watches."""

    def progress(self, received_bytes: int, decoded_seconds: float) -> None:
        pass

    def segment(self, index: int, segment: Segment) -> None:
        pass


@dataclass(frozen=True)
class JobSpec:
    request_id: str
    window: Window
    user_id: str = ANONYMOUS
    want_mp3: bool = False
    options: TranscribeOptions = field(default_factory=TranscribeOptions)
    idle_timeout_seconds: float | None = None
    """Longest silence in the body; None: the setting.  A resumable upload times its own."""


@dataclass
class Timings:
    """Seconds, from the moment the job was admitted."""

    receive: float = 0.0
    transcode: float = 0.0
    transcribe: float = 0.0
    total: float = 0.0
    after_last_byte: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "receive": round(self.receive, 3),
            "transcode": round(self.transcode, 3),
            "transcribe": round(self.transcribe, 3),
            "total": round(self.total, 3),
            "afterLastByte": round(self.after_last_byte, 3),
        }


@dataclass
class JobResult:
    spec: JobSpec
    input_size: int = 0
    mp3_size: int = 0
    duration: float = 0.0
    output_on_disk: bool = False
    layout: Layout | None = None
    transcript: Transcript | None = None
    mp3: Spool | None = None
    """For `Accept: audio/mpeg`: the MP3 itself, handed over; whoever sends it closes it."""
    billed_seconds: float = 0.0
    """Audio sent to the transcriber: the window, less segments in which nobody speaks."""
    timings: Timings = field(default_factory=Timings)

    def log_fields(self) -> dict[str, Any]:
        return {
            "format": self.layout.container if self.layout else None,
            "mode": self.layout.mode.value if self.layout else None,
            "inputSize": self.input_size,
            "fileSize": self.mp3_size,
            "duration": self.duration,
            "billedSeconds": round(self.billed_seconds, 3),
            "outputSpooledToDisk": self.output_on_disk,
            "timings": self.timings.as_dict(),
        }
