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
    r"\bmodels?\b(?:[^.]|\.(?=\S)){0,120}?"
    r"(?:does not exist|doesn't exist|not found|deprecated|retired|decommissioned|discontinued"
    r"|shut ?down|no longer (?:exists?|available|supported|served)|not installed"
    r"|is not (?:available|loaded|downloaded|known))"
    r"|\b(?:unknown|missing)\s+models?\b",
    re.IGNORECASE,
)
"""What a message says of a model that is gone or missing, whichever OpenAI-compatible server
says it: OpenAI's "The model `x` does not exist or you do not have access to it.", "The model
`whisper-1` has been deprecated", vLLM's "The model `x` does not exist.", speaches' "Model 'x'
is not installed locally.", LocalAI's 'model "x" not found.', faster-whisper-server's
"unknown model: x"... The model comes first (but for "unknown model"), so that "parameter 'x'
is deprecated for this model" is not taken for the model's end; the text between stays within
a sentence, where a dot inside a name ("tiny.en", "whisper-large-v3.5") ends none."""


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
    """The upstream's own error text (the SDK unwraps OpenAI's `error` envelope): OpenAI's,
    vLLM's and LocalAI's `message`, FastAPI's `detail` (speaches), or OpenAI's envelope inside
    FastAPI's `detail` (faster-whisper-server: `{"detail": {"error": {"message": ...}}}`);
    else the SDK's own summary."""
    text = _text_in(error.body)
    return text if text is not None else error.message


def _text_in(body: object, depth: int = 0) -> str | None:
    if not isinstance(body, dict) or depth > 2:
        return None
    for key in ("message", "detail", "error"):
        value = body.get(key)
        text = value if isinstance(value, str) else _text_in(value, depth + 1)
        if text is not None:
            return text
    return None


MESSAGE_CHARS = 300
"""The most of an upstream's error text a log line carries."""
_KEY_SHAPED = re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_*.-]{4,}")
"""What looks like an API key: OpenAI's 401 names the key it was given."""


def public_message(error: openai.APIStatusError, secret: str | None = None) -> str:
    """The upstream's error text for a log line: bounded, with the API key (`secret`) and
    anything shaped like one blotted out, and never the audio (error bodies do not echo it)."""
    text = upstream_message(error)
    if secret:
        text = text.replace(secret, "***")
    return _KEY_SHAPED.sub("***", text)[:MESSAGE_CHARS]


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
                    "upstreamMessage": public_message(error),
                },
            )
        return following is not None
