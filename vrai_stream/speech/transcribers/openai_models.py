"""Which OpenAI transcription model to ask, and what each family of models is sent.

OpenAI shuts down `whisper-1` and the `gpt-4o*-transcribe` models on 26 Feb 2027;
`gpt-transcribe` replaces them.  It answers `json` only (no segments, no timestamps), and takes
`languages` (a list of ISO codes) and `keywords` instead of `language`.  `VRAI_OPENAI_MODEL`
lists models in order of preference: when the upstream says one does not exist or is retired,
the next one is asked, by that request and by every later one of the process.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

import openai

from vrai_stream.speech.transcribers.base import TranscribeOptions

logger = logging.getLogger(__name__)

GPT_TRANSCRIBE = "gpt-transcribe"
MODEL_NOT_FOUND = "model_not_found"

_GONE = re.compile(
    r"\bmodels?\b[^.]{0,120}?"
    r"(?:does not exist|doesn't exist|not found|deprecated|retired|decommissioned|discontinued"
    r"|shut ?down|no longer (?:exists?|available|supported|served))",
    re.IGNORECASE,
)
"""What a message says of a model that is gone: "The model `x` does not exist or you do not
have access to it.", "The model `whisper-1` has been deprecated", ... The model comes first, so
that "parameter 'x' is deprecated for this model" is not taken for the model's end."""


def is_gpt_transcribe(model: str) -> bool:
    return model.lower().startswith(GPT_TRANSCRIBE)


def request_fields(model: str, options: TranscribeOptions) -> dict[str, Any]:
    """The SDK's arguments besides `model` and `file`, as this model's family takes them."""
    omit = openai.omit
    temperature = omit if options.temperature is None else options.temperature
    if is_gpt_transcribe(model):
        return {
            "response_format": "json",
            "languages": [options.language] if options.language else omit,
            "keywords": list(options.keywords) or omit,
            "prompt": options.prompt or omit,
            "temperature": temperature,
        }
    # whisper-1 gives segments (verbose_json); gpt-4o*-transcribe answers only json.  Neither
    # takes keywords: a prompt that spells them is OpenAI's advice for getting them right.
    prompt = " ".join(part for part in (options.prompt, ", ".join(options.keywords)) if part)
    return {
        "response_format": "verbose_json" if "whisper" in model.lower() else "json",
        "language": options.language or omit,
        "prompt": prompt or omit,
        "temperature": temperature,
    }


def is_model_gone(error: openai.APIStatusError) -> bool:
    """The upstream says the model does not exist or is retired (404, or 400 for some)."""
    if not isinstance(error, openai.NotFoundError | openai.BadRequestError):
        return False
    if error.code == MODEL_NOT_FOUND:
        return True
    return bool(_GONE.search(upstream_message(error)))


def upstream_message(error: openai.APIStatusError) -> str:
    """The `message` of OpenAI's error body, else the SDK's own summary."""
    body = error.body
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else error.message


_gone: set[tuple[str, str]] = set()
"""(upstream, model) pairs the upstream said are gone: process-wide, since it is the upstream
that retires a model; guarded by `_lock`, as transcriptions run in tasks and threads."""
_lock = threading.Lock()


class ModelList:
    """The models of `VRAI_OPENAI_MODEL` in order, less those the upstream said are gone.

    The last model is never skipped: when it is gone too, its failure reaches the caller.
    """

    def __init__(self, models: Sequence[str], upstream: str) -> None:
        if not models:
            raise ValueError("at least one model is needed")
        self.models = tuple(models)
        self._upstream = upstream

    def current(self) -> str:
        with _lock:
            for model in self.models[:-1]:
                if (self._upstream, model) not in _gone:
                    return model
        return self.models[-1]

    def drop(self, model: str, error: openai.APIStatusError) -> bool:
        """Record that `model` is gone, warning once per process; False if there is no next."""
        with _lock:
            first_time = (self._upstream, model) not in _gone
            _gone.add((self._upstream, model))
            later = self.models[self.models.index(model) + 1 :]
            fallback = later[-1] if later else None
            following = next((m for m in later[:-1] if (self._upstream, m) not in _gone), fallback)
        if first_time:
            logger.warning(
                "transcription model is gone upstream: using the next one"
                if following
                else "transcription model is gone upstream, and it is the last one",
                extra={
                    "model": model,
                    "nextModel": following,
                    "upstreamStatus": error.status_code,
                    "upstreamCode": error.code,
                    "upstreamMessage": upstream_message(error)[:300],
                },
            )
        return following is not None
