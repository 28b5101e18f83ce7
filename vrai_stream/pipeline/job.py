"""One job's records: what it was asked (`JobSpec`), what it did (`JobResult`), and who
hears it as it goes (`JobListener`), which the HTTP layer reads and renders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from vrai_stream.media.index_last import Certainty, IndexLastStream
from vrai_stream.media.sniff import Layout, Mode
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

    def withdraw(self, reason: str) -> None:
        """Every segment heard so far is void: the audio was decoded on a guess that the
        recording's index proved wrong, and is decoded again; segments start again at 0."""

    @property
    def can_withdraw(self) -> bool:
        """False: hold segments decoded on a guess until the index confirms them."""


class SilentListener:
    """The listener of a job nobody watches."""

    can_withdraw = True

    def progress(self, received_bytes: int, decoded_seconds: float) -> None:
        pass

    def segment(self, index: int, segment: Segment) -> None:
        pass

    def withdraw(self, reason: str) -> None:
        pass


class Provisional:
    """The listener of a job whose audio streams on a guess (`media.index_last`).

    Segments heard while the stream rests on a guess are passed on to a listener that can
    withdraw them (the events say so if the guess fails), and held back from one that
    cannot (OpenAI's stream: a delta once sent stays sent) until `confirm`.
    """

    can_withdraw = True

    def __init__(self, listener: JobListener, stream: IndexLastStream) -> None:
        self._listener = listener
        self._stream = stream
        self._held: list[tuple[int, Segment]] = []
        self._withdrawn = False
        self._confirmed = False

    def progress(self, received_bytes: int, decoded_seconds: float) -> None:
        if not self._withdrawn:
            self._listener.progress(received_bytes, decoded_seconds)

    def segment(self, index: int, segment: Segment) -> None:
        if self._withdrawn:
            return  # a model call that was under way when the guess failed
        guessed = self._stream.certainty is Certainty.GUESSED and not self._confirmed
        if guessed and not self._listener.can_withdraw:
            self._held.append((index, segment))
            return
        self._release()
        self._listener.segment(index, segment)

    def confirm(self) -> None:
        """The index confirmed the guess: what was held back goes out, and what comes next."""
        self._confirmed = True
        self._release()

    def _release(self) -> None:
        held, self._held = self._held, []
        for index, segment in held:
            self._listener.segment(index, segment)

    def withdraw(self, reason: str) -> None:
        """Void what was heard, and anything still to be heard: it is decoded again."""
        self._withdrawn = True
        self._held.clear()
        self._listener.withdraw(reason)


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
    mode: Mode | None = None
    """How the audio was decoded: the layout's mode, or `speculative`, or `seekable` after a
    stream the index did not confirm (`fallback` says why)."""
    fallback: str | None = None
    declared_seconds: float | None = None
    """The recording's length as its container declares it, where it does."""
    truncated: bool = False
    """The container declares audio the window wanted that never arrived: a cut-short file."""
    transcript: Transcript | None = None
    mp3: Spool | None = None
    """For `Accept: audio/mpeg`: the MP3 itself, handed over; whoever sends it closes it."""
    billed_seconds: float = 0.0
    """Audio sent to the transcriber: the window, less segments in which nobody speaks."""
    timings: Timings = field(default_factory=Timings)

    def log_fields(self) -> dict[str, Any]:
        return {
            "format": self.layout.container if self.layout else None,
            "mode": self.mode.value if self.mode else None,
            **({"fallback": self.fallback} if self.fallback else {}),
            **(
                {"truncated": True, "declaredSeconds": self.declared_seconds}
                if self.truncated
                else {}
            ),
            "inputSize": self.input_size,
            "fileSize": self.mp3_size,
            "duration": self.duration,
            "billedSeconds": round(self.billed_seconds, 3),
            "outputSpooledToDisk": self.output_on_disk,
            "timings": self.timings.as_dict(),
        }
