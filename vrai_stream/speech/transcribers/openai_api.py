"""Transcription through the `openai` SDK, against OpenAI or any compatible base URL."""

from __future__ import annotations

import logging
from typing import IO

import anyio
import httpx
import openai
from openai.types.audio import TranscriptionVerbose

from vrai_stream import errors
from vrai_stream.settings import Settings
from vrai_stream.speech.languages import language_code
from vrai_stream.speech.transcribers.base import Audio, Segment, TranscribeOptions, Transcript
from vrai_stream.speech.transcribers.openai_models import (
    ModelList,
    is_model_gone,
    public_message,
    request_fields,
)
from vrai_stream.speech.upstream_limit import UpstreamLimit

logger = logging.getLogger(__name__)

CLIENT_REQUEST_ID = "X-Client-Request-Id"
"""OpenAI keeps a caller's own request ID with the request: support can find it by ours."""

OVERLOADED = frozenset({429, 503})
"""What an upstream answers when it has more calls than it can take."""


class _ModelGone(Exception):
    def __init__(self, error: openai.APIStatusError) -> None:
        self.error = error


class OpenAITranscriber:
    name = "openai"

    def __init__(self, settings: Settings) -> None:
        self._deadline = settings.openai_deadline_seconds
        self._api_key = settings.openai_api_key
        self.limit = UpstreamLimit(
            settings.openai_concurrency, adaptive=settings.openai_concurrency_mode == "adaptive"
        )
        """Every job's calls in flight to this upstream, together."""
        self._client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url,
            timeout=settings.openai_timeout_seconds,
            max_retries=settings.openai_max_retries,
            # Every answer, the SDK's own retries' too: a 429 it retries is still a sign.
            http_client=openai.DefaultAsyncHttpxClient(
                event_hooks={"response": [self._heard_answer]}
            ),
        )
        self._models = ModelList(settings.openai_models, upstream=str(self._client.base_url))
        # The SDK imports its audio resources on first use: here, in the warm-up's worker
        # thread, rather than on the event loop under the first request (tens of ms).
        _ = self._client.audio.transcriptions

    def unsupported_language(self, language: str) -> str | None:
        return None  # the upstream answers for its models' languages itself

    async def transcribe(self, audio: Audio) -> Transcript:
        async with self.limit.call(audio.duration):
            return await self._transcribe(audio)

    async def _transcribe(self, audio: Audio) -> Transcript:
        start = _position(audio.file)
        try:
            # The SDK's timeout is per attempt; retries honouring Retry-After need a cap too.
            with anyio.fail_after(self._deadline):
                while True:
                    model = self._models.current()
                    try:
                        result = await self._create(model, audio)
                        break
                    except _ModelGone as gone:
                        if not self._models.drop(model, gone.error):
                            raise _failed(gone.error) from None
                    if start is None:
                        raise errors.TranscriptionFailed(
                            "The transcription model is gone, and the audio cannot be sent again"
                        )
                    audio.file.seek(start)  # the next model gets the whole file again
        except TimeoutError:
            self.limit.overloaded("timeout")
            raise errors.TranscriptionTimeout(
                "The transcription service did not answer in time"
            ) from None
        return _to_transcript(result, audio.options)

    async def _create(self, model: str, audio: Audio) -> object:
        try:
            result: object = await self._client.audio.transcriptions.create(
                model=model,
                file=(audio.filename, audio.file, audio.content_type),
                extra_headers={CLIENT_REQUEST_ID: audio.request_id} if audio.request_id else None,
                **request_fields(model, audio.options),
            )
        except openai.APITimeoutError:
            self._log_failure(model, audio, "timeout")
            self.limit.overloaded("timeout")
            raise errors.TranscriptionTimeout(
                "The transcription service did not answer in time"
            ) from None
        except openai.APIStatusError as exc:
            self._log_failure(model, audio, "status", exc)
            if is_model_gone(exc):
                raise _ModelGone(exc) from None
            raise _failed(exc) from None
        except openai.APIConnectionError:
            self._log_failure(model, audio, "connection")
            raise errors.TranscriptionFailed(
                "The transcription service could not be reached"
            ) from None
        except openai.APIResponseValidationError:
            self._log_failure(model, audio, "unreadable answer")
            raise errors.TranscriptionFailed(
                "The transcription service sent an answer that could not be read"
            ) from None
        return result

    async def _heard_answer(self, response: httpx.Response) -> None:
        if response.status_code in OVERLOADED:
            self.limit.overloaded(str(response.status_code))

    def _log_failure(
        self, model: str, audio: Audio, failure: str, error: openai.APIStatusError | None = None
    ) -> None:
        """Every failed call, with the upstream's own reason: a self-hosted server's log is
        not the first place its operator should have to look."""
        fields: dict[str, object] = {
            "requestId": audio.request_id,
            "model": model,
            "failure": failure,
        }
        if error is not None:
            fields["upstreamStatus"] = error.status_code
            fields["upstreamCode"] = error.code if isinstance(error.code, str) else None
            fields["upstreamMessage"] = public_message(error, self._api_key)
        logger.warning("transcription call failed", extra=fields)

    async def aclose(self) -> None:
        await self._client.close()


def _failed(error: openai.APIStatusError) -> errors.TranscriptionFailed:
    # Never the upstream's message: a 401's names the key it was given.
    return errors.TranscriptionFailed(f"The transcription service answered {error.status_code}")


def _position(file: IO[bytes]) -> int | None:
    """Where the audio starts in `file`, to send it again; None if it cannot be sought."""
    try:
        return file.tell() if file.seekable() else None
    except (OSError, ValueError):
        return None


def _to_transcript(result: object, options: TranscribeOptions) -> Transcript:
    """The text; the language the model heard, else the one asked; segments if it gave them."""
    asked = language_code(options.language)
    if isinstance(result, TranscriptionVerbose):
        segments = tuple(
            Segment(start=segment.start, end=segment.end, text=segment.text.strip())
            for segment in result.segments or ()
        )
        return Transcript(
            text=result.text.strip(),
            language=language_code(result.language) or asked,
            segments=segments,
        )
    text = getattr(result, "text", result)
    return Transcript(text=str(text).strip(), language=asked)
