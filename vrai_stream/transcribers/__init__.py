"""Speech to text: OpenAI's API (or any compatible server) and a local Whisper model.

Each backend module imports its heavy SDK at import time; this module imports them only
when one is created, so the service listens before paying for those imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Protocol

from ..settings import Settings


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
    prompt: str | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class Audio:
    """An MP3 ready for transcription: a readable file and what is known about it."""

    file: IO[bytes]
    duration: float
    filename: str = "audio.mp3"
    options: TranscribeOptions = field(default_factory=TranscribeOptions)
    request_id: str | None = None
    """Ours, sent upstream so that one request can be traced on both sides."""


class Transcriber(Protocol):
    name: str

    async def transcribe(self, audio: Audio) -> Transcript:
        """Turn speech into text, raising `TranscriptionFailed` or `TranscriptionTimeout`."""
        ...

    async def aclose(self) -> None: ...


def create_transcriber(settings: Settings) -> Transcriber:
    """Build the configured backend; call it off the event loop, since it imports an SDK."""
    if settings.transcriber == "openai":
        from .openai_api import OpenAITranscriber

        return OpenAITranscriber(settings)
    from .whisper_local import WhisperTranscriber

    return WhisperTranscriber(settings)
