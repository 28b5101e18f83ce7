"""The audio endpoints: each reads its own request shape, picks its renderer, and shares the
rest (`answer.endpoint`, `renderers.answer_job`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from starlette.responses import JSONResponse, Response

from vrai_stream import errors
from vrai_stream.bodies.forms import BodyDecoder, Submission
from vrai_stream.bodies.legacy_json import BLOB_FIELD, LegacyJsonDecoder
from vrai_stream.bodies.multipart import LEGACY_FILE_FIELD, OPENAI_FILE_FIELD, MultipartDecoder
from vrai_stream.http.answer import Reply, endpoint
from vrai_stream.http.context import RequestContext
from vrai_stream.http.renderers import (
    ContractAnswer,
    Mp3Answer,
    OpenAIAnswer,
    OpenAIDeltas,
    Renderer,
    answer_job,
)
from vrai_stream.http.request_shape import (
    RAW_ENDPOINT,
    check_no_body_fields_in_query,
    check_query,
    check_raw_content_type,
    refuse_forms_and_json,
)
from vrai_stream.media.window import parse_window
from vrai_stream.speech.formats import RESPONSE_FORMATS, ResponseFormat
from vrai_stream.speech.languages import WHISPER_LANGUAGES, language_code
from vrai_stream.speech.summarize import SummarizationType
from vrai_stream.speech.transcribers.base import TranscribeOptions
from vrai_stream.state.answers import StillRunning, StoredAnswer
from vrai_stream.state.bucket import StateUnavailable

RAW_QUERY = (
    "fromTime",
    "toTime",
    "summarizationType",
    "language",
    "prompt",
    "keywords",
    "callbackUrl",  # vetted by the answer (`RequestContext.check_callback`)
)


@endpoint("transcriptions")
async def transcriptions(context: RequestContext) -> Reply:
    """`POST /v1/transcriptions`: raw audio in the body, the window in the query."""
    request = context.request
    await context.authenticate()
    settings = context.services.settings
    query = request.query_params
    # A parameter this endpoint does not read would be silently ignored: say so instead.
    check_query(query.keys(), RAW_QUERY, endpoint=f"POST {RAW_ENDPOINT}")
    check_raw_content_type(request.headers.get("content-type"))
    window = parse_window(query, max_window_seconds=settings.max_window_seconds)
    accept = request.headers.get("accept", "")
    want_mp3 = "audio/mpeg" in accept
    if want_mp3 and context.callback is not None:
        raise errors.InvalidParameters(
            "callbackUrl delivers a JSON answer: it cannot carry the MP3 of Accept: audio/mpeg"
        )
    summary = SummarizationType.parse(query.get("summarizationType"))
    if not want_mp3:
        context.services.summarizer.check(summary)
    context.check_body_length()
    options = _options(
        languages=query.getlist("language"),
        prompt=query.get("prompt"),
        # `keywords=a,b` or `keywords=a&keywords=b`
        keywords=(word for words in query.getlist("keywords") for word in words.split(",")),
    )
    spec = context.job_spec(window=window, want_mp3=want_mp3, options=options)
    await context.check(spec)  # before the queue: a refusal never waits for a slot
    renderer: Renderer = (
        Mp3Answer()
        if want_mp3
        else ContractAnswer(lambda: summary, events="text/event-stream" in accept)
    )
    async with context.admitted():
        audio = refuse_forms_and_json(context.body())
        return await answer_job(context, spec, audio, renderer)


LEGACY_TIMES = ("fromTime", "toTime")
LEGACY_MAX_SECONDS = 300.0
"""The old service's limit, which the app in the field was built against."""
LEGACY_FIELDS = (*LEGACY_TIMES, "summarizationType")


@endpoint("legacy-json")
async def trim_and_transcribe(context: RequestContext) -> Reply:
    """`POST /trim-and-transcribe`: the old app's JSON, the recording base64 in `fileBlob`."""
    fields = (BLOB_FIELD, *LEGACY_FIELDS)
    return await _legacy(context, LegacyJsonDecoder, fields, "JSON body")


@endpoint("legacy-multipart")
async def trim_and_transcribe_multipart(context: RequestContext) -> Reply:
    """`POST /trim-and-transcribe-multipart`: the old app's form, the recording in `audio`."""

    def decoder() -> BodyDecoder:
        return MultipartDecoder(
            context.request.headers.get("content-type"),
            file_field=LEGACY_FILE_FIELD,
            fields=LEGACY_FIELDS,
        )

    return await _legacy(context, decoder, (LEGACY_FILE_FIELD, *LEGACY_FIELDS), "form")


async def _legacy(
    context: RequestContext,
    make_decoder: Callable[[], BodyDecoder],
    body_fields: tuple[str, ...],
    body: str,
) -> Reply:
    request = context.request
    await context.authenticate()
    check_no_body_fields_in_query(
        request.query_params.keys(),
        body_fields,
        endpoint=f"POST {request.url.path}",
        body=body,
    )
    context.check_body_length(encoded=True)
    decoder = make_decoder()  # a malformed Content-Type is a 400 before the body is read
    events = "text/event-stream" in request.headers.get("accept", "")
    async with (
        context.admitted(),
        await context.read_submission(decoder, LEGACY_TIMES) as submission,
    ):
        # As the old service checked it: 0 <= fromTime < toTime <= 300.
        window = parse_window(
            _text_fields(submission),
            max_window_seconds=LEGACY_MAX_SECONDS,
            max_end=LEGACY_MAX_SECONDS,
        )
        # Refuse an unknown or unavailable summary before transcribing, when it came first.
        _requested_summary(context, submission)

        def summary() -> SummarizationType:
            # Sent after the recording, or not at all: known only once the job is over.
            return _requested_summary(context, submission) or SummarizationType.NONE

        spec = context.job_spec(window=window)
        renderer = ContractAnswer(summary, events=events)
        return await answer_job(context, spec, submission.audio, renderer)


def _requested_summary(context: RequestContext, submission: Submission) -> SummarizationType | None:
    """The form's `summarizationType`, checked; None while the field has not arrived."""
    raw = submission.fields.get("summarizationType")
    if raw is None:
        return None
    summary = SummarizationType.parse(raw)
    context.services.summarizer.check(summary)
    return summary


OPENAI_ARRAYS = ("languages", "keywords")
"""Array fields: OpenAI's SDKs send one `keywords[]` field per item; `keywords` is taken too."""
OPENAI_FIELDS = (
    "model",
    "language",
    "prompt",
    "response_format",
    "temperature",
    "stream",
    *(name + suffix for name in OPENAI_ARRAYS for suffix in ("", "[]")),
    *LEGACY_TIMES,
)


@endpoint("openai", error_style="openai")
async def openai_transcriptions(context: RequestContext) -> Reply:
    """`POST /v1/audio/transcriptions`: OpenAI's API, so any OpenAI SDK can point here."""
    request = context.request
    await context.authenticate()
    settings = context.services.settings
    check_no_body_fields_in_query(
        request.query_params.keys(),
        (OPENAI_FILE_FIELD, *OPENAI_FIELDS),
        endpoint=f"POST {request.url.path}",
        body="form",
    )
    context.check_body_length(encoded=True)
    decoder = MultipartDecoder(
        request.headers.get("content-type"), file_field=OPENAI_FILE_FIELD, fields=OPENAI_FIELDS
    )
    # OpenAI SDKs send the form fields before the file, so the audio streams; a client
    # that sends the file first has it spooled until `model` (always sent) arrives.
    async with (
        context.admitted(),
        await context.read_submission(decoder, ("model",)) as submission,
    ):
        fields = _text_fields(submission)
        response_format = _response_format(fields.get("response_format"))
        stream = _stream(fields.get("stream"), response_format)
        window = parse_window(fields, max_window_seconds=settings.max_window_seconds)
        spec = context.job_spec(
            window=window,
            options=_options(
                languages=[*submission.fields.every("language"), *_every(submission, "languages")],
                prompt=fields.get("prompt"),
                keywords=_every(submission, "keywords"),
                temperature=_temperature(fields.get("temperature")),
            ),
        )
        renderer: Renderer = OpenAIDeltas() if stream else OpenAIAnswer(response_format)
        return await answer_job(context, spec, submission.audio, renderer)


def _text_fields(submission: Submission) -> dict[str, str]:
    """The form's fields that have a value, as text (JSON nulls dropped)."""
    return {name: value for name, value in submission.fields.items() if value is not None}


def _every(submission: Submission, array: str) -> list[str]:
    return [*submission.fields.every(array), *submission.fields.every(f"{array}[]")]


def _options(
    *,
    languages: Iterable[str],
    prompt: str | None,
    keywords: Iterable[str],
    temperature: float | None = None,
) -> TranscribeOptions:
    """What the caller asks of the model: one language at most, keywords as a clean list."""
    codes: dict[str, None] = {}
    for raw in languages:
        if not raw.strip():
            continue
        code = language_code(raw.strip().lower())  # a Whisper language's name is taken too
        if code not in WHISPER_LANGUAGES:
            raise errors.InvalidParameters(
                f"language must be the ISO 639-1 code of one of Whisper's languages, such as "
                f"'en'; got {raw[:40]!r}"
            )
        codes[code] = None
    if len(codes) > 1:
        raise errors.InvalidParameters(
            f"Give one language, or none to have it detected; got {', '.join(codes)}"
        )
    return TranscribeOptions(
        language=next(iter(codes), None),
        prompt=prompt or None,
        temperature=temperature,
        keywords=tuple(dict.fromkeys(word.strip() for word in keywords if word.strip())),
    )


def _response_format(raw: str | None) -> ResponseFormat:
    if not raw:
        return "json"
    for known in RESPONSE_FORMATS:
        if raw == known:
            return known
    raise errors.InvalidParameters(
        f"response_format must be one of {', '.join(RESPONSE_FORMATS)}; got {raw[:40]!r}"
    )


def _stream(raw: str | None, response_format: ResponseFormat) -> bool:
    """`stream=true`: OpenAI's transcript events.  Read when the file begins, so, as OpenAI's
    SDKs do, a client sends it before the file (sent after it, it comes too late to count)."""
    if raw is None or raw.lower() in ("", "false", "0"):
        return False
    if raw.lower() not in ("true", "1"):
        raise errors.InvalidParameters(f"stream must be true or false; got {raw[:40]!r}")
    if response_format not in ("json", "text"):
        raise errors.InvalidParameters(
            f"stream=true answers text events; response_format {response_format} cannot stream"
        )
    return True


def _temperature(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise errors.InvalidParameters("temperature must be a number from 0 to 1") from None
    if not 0 <= value <= 1:
        raise errors.InvalidParameters("temperature must be a number from 0 to 1")
    return value


@endpoint("result", idempotent=False)
async def transcription_by_id(context: RequestContext) -> Reply:
    """`GET /v1/transcriptions/{requestId}`: a finished answer again, to the user it is for:
    `202` while its job runs, `404` for an id unknown here or another user's."""
    await context.authenticate()
    request_id = context.request.path_params["request_id"]
    held = context.services.results.find(request_id, context.user_id)
    if held is not None and held.result is not None:
        kept = held.result
        return Response(kept.body, status_code=kept.status, media_type=kept.media_type)
    if held is None:  # not a job of this machine's: perhaps another's
        found = await _shared_answer(context, request_id)
        if isinstance(found, StoredAnswer):
            return Response(found.body, status_code=found.status, media_type=found.media_type)
        if found is None:
            raise errors.NotFound(
                "No answer with this id is kept for you: it never was, it is another "
                "user's, or its time to live is over"
            )
    retry = context.services.settings.retry_after_seconds
    body = {"requestId": request_id, "status": "running"}
    return JSONResponse(body, status_code=202, headers={"Retry-After": str(retry)})


async def _shared_answer(
    context: RequestContext, request_id: str
) -> StoredAnswer | StillRunning | None:
    """The answer, or its running job, as another machine left it in the shared bucket."""
    state = context.services.state
    if state is None:
        return None
    try:
        return await state.answers.find(request_id, context.user_id)
    except StateUnavailable as exc:
        raise errors.SharedStateUnavailable(
            "The answers' store is not reachable; ask again shortly",
            retry_after_seconds=context.services.settings.retry_after_seconds,
        ) from exc
