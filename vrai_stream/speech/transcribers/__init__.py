"""Speech to text: OpenAI's API (or any compatible server) and a local Whisper model.

Each backend module imports its heavy SDK at import time; this module imports them only
when one is created, so the service listens before paying for those imports.
"""

from __future__ import annotations

from vrai_stream.settings import Settings
from vrai_stream.speech.transcribers.base import Transcriber


def create_transcriber(settings: Settings) -> Transcriber:
    """Build the configured backend; call it off the event loop, since it imports an SDK."""
    if settings.transcriber == "openai":
        from vrai_stream.speech.transcribers.openai_api import OpenAITranscriber

        return OpenAITranscriber(settings)
    from vrai_stream.speech.transcribers.whisper_local import WhisperTranscriber

    return WhisperTranscriber(settings)
