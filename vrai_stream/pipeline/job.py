"""One job's records: what it was asked (`JobSpec`), what it did (`JobResult`), and who
hears it as it goes (`JobListener`), which the HTTP layer reads and renders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from vrai_stream.errors import ServiceError
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


ENDS_EARLY_SECONDS = 0.1


@dataclass(frozen=True)
class JobSpec:
    request_id: str
    window: Window
    user_id: str = ANONYMOUS
    want_mp3: bool = False
    options: TranscribeOptions = field(default_factory=TranscribeOptions)
    idle_timeout_seconds: float | None = None
    """Longest silence in the body; None: the setting.  A resumable upload times its own."""
    admitted_at: float | None = None
    """When the request was given its job slot (anyio's clock): `timings` count from it.
    None: from the moment the job starts."""


@dataclass
class Timings:
    """When each stage ended, in seconds since the job was admitted: one clock, so the
    stages read as a timeline (`receive` 23.9, `transcode` 24.1: ffmpeg ended 0.2 s after
    the last byte)."""

    receive: float = 0.0
    """The body's last byte arrived."""
    transcode: float = 0.0
    """ffmpeg exited: the window is decoded."""
    transcribe: float = 0.0
    """The last segment was transcribed (0 for an MP3 answer)."""
    total: float = 0.0
    """The job was over."""
    origin: float = 0.0
    """The admission, on anyio's clock."""

    def since_origin(self, moment: float) -> float:
        return moment - self.origin

    @property
    def after_last_byte(self) -> float:
        """What the client waited after its last byte."""
        return self.total - self.receive

    def as_dict(self) -> dict[str, float]:
        return {
            "receive": round(self.receive, 3),
            "transcode": round(self.transcode, 3),
            "transcribe": round(self.transcribe, 3),
            "total": round(self.total, 3),
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
    model_calls: int = 0
    """Calls to the transcriber: one a segment upstream, one a batch for the local model."""
    timings: Timings = field(default_factory=Timings)
    failure: ServiceError | None = None
    """What ended the job, when it failed; the other fields say how far it got."""

    @property
    def window_end(self) -> float:
        """The window's actual end: the asked end, or where the audio stopped before it (the
        recording is shorter, or no end was asked).  Within `ENDS_EARLY_SECONDS` of the asked
        end the audio is taken to reach it: an MP3's length moves by a frame or so."""
        window = self.spec.window
        audio_end = window.start + self.duration
        if audio_end > window.end - ENDS_EARLY_SECONDS:
            return window.end
        return round(audio_end, 3)

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
            "modelCalls": self.model_calls,
            "outputSpooledToDisk": self.output_on_disk,
            "timings": self.timings.as_dict(),
            "afterLastByte": round(self.timings.after_last_byte, 3),
        }
