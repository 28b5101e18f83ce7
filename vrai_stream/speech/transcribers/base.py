"""What a transcriber takes and gives back, whichever model runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Protocol, runtime_checkable

WHISPER_WINDOW_SECONDS = 30.0
"""What Whisper hears at a time: the most one clip of a batch may hold."""


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str | None = None
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True)
class TranscribeOptions:
    """What a caller may ask of the model beyond the audio itself."""

    language: str | None = None
    """An ISO 639-1 code such as `en`."""
    prompt: str | None = None
    temperature: float | None = None
    keywords: tuple[str, ...] = ()
    """Words and names the speech may hold (jargon, people, products), to spell them right."""


@dataclass(frozen=True)
class Audio:
    """An MP3 ready for transcription: a readable file and what is known about it."""

    file: IO[bytes]
    duration: float
    filename: str = "audio.mp3"
    content_type: str = "audio/mpeg"
    options: TranscribeOptions = field(default_factory=TranscribeOptions)
    request_id: str | None = None
    """Ours, sent upstream so that one request can be traced on both sides."""
    voiced_until: float | None = None
    """Seconds into the audio where its last voiced frame ends, when our segmenter knows:
    a model that stopped well before it has words left to hear."""


class Transcriber(Protocol):
    name: str

    def unsupported_language(self, language: str) -> str | None:
        """Why `language` (an ISO 639-1 code) cannot be transcribed here, in a sentence for
        the caller; None when it can, or when nobody can tell (an upstream API)."""
        ...

    async def transcribe(self, audio: Audio) -> Transcript:
        """Turn speech into text, raising `TranscriptionFailed` or `TranscriptionTimeout`."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class BatchTranscriber(Transcriber, Protocol):
    """A model that hears several clips in one call faster than one after another (the local
    model: its decoder steps through a batch at once)."""

    batch_size: int
    """The most clips one call takes."""

    async def transcribe_batch(self, clips: Sequence[Audio]) -> list[Transcript]:
        """One transcript per clip, in order, each timed from its own clip's start."""
        ...
