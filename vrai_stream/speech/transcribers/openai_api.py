"""Transcription through the `openai` SDK, against OpenAI or any compatible base URL."""

from __future__ import annotations

from typing import Literal

import anyio
import openai
from openai.types.audio import TranscriptionVerbose

from vrai_stream import errors
from vrai_stream.settings import Settings
from vrai_stream.speech.languages import language_code
from vrai_stream.speech.transcribers.base import Audio, Segment, Transcript

CLIENT_REQUEST_ID = "X-Client-Request-Id"
"""OpenAI keeps a caller's own request ID with the request: support can find it by ours."""


class OpenAITranscriber:
    name = "openai"

    def __init__(self, settings: Settings) -> None:
        self._model = settings.openai_model
        # gpt-4o-transcribe and its kin answer only `json`; Whisper models give segments.
        self._response_format: Literal["json", "verbose_json"] = (
            "verbose_json" if "whisper" in self._model.lower() else "json"
        )
        self._deadline = settings.openai_deadline_seconds
        self._client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url,
            timeout=settings.openai_timeout_seconds,
            max_retries=settings.openai_max_retries,
        )

    async def transcribe(self, audio: Audio) -> Transcript:
        try:
            # The SDK's timeout is per attempt; retries honouring Retry-After need a cap too.
            with anyio.fail_after(self._deadline):
                result = await self._create(audio)
        except TimeoutError:
            raise errors.TranscriptionTimeout(
                "The transcription service did not answer in time"
            ) from None
        return _to_transcript(result)

    async def _create(self, audio: Audio) -> object:
        options = audio.options
        try:
            return await self._client.audio.transcriptions.create(
                model=self._model,
                file=(audio.filename, audio.file, "audio/mpeg"),
                response_format=self._response_format,
                language=options.language or openai.omit,
                prompt=options.prompt or openai.omit,
                temperature=openai.omit if options.temperature is None else options.temperature,
                extra_headers={CLIENT_REQUEST_ID: audio.request_id} if audio.request_id else None,
            )
        except openai.APITimeoutError:
            raise errors.TranscriptionTimeout(
                "The transcription service did not answer in time"
            ) from None
        except openai.APIStatusError as exc:
            raise errors.TranscriptionFailed(
                f"The transcription service answered {exc.status_code}"
            ) from None
        except openai.APIConnectionError:
            raise errors.TranscriptionFailed(
                "The transcription service could not be reached"
            ) from None
        except openai.APIResponseValidationError:
            raise errors.TranscriptionFailed(
                "The transcription service sent an answer that could not be read"
            ) from None

    async def aclose(self) -> None:
        await self._client.close()


def _to_transcript(result: object) -> Transcript:
    if isinstance(result, TranscriptionVerbose):
        segments = tuple(
            Segment(start=segment.start, end=segment.end, text=segment.text.strip())
            for segment in result.segments or ()
        )
        return Transcript(
            text=result.text.strip(), language=language_code(result.language), segments=segments
        )
    text = getattr(result, "text", result)
    return Transcript(text=str(text).strip())
