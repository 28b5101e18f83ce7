"""What every audio endpoint does once it knows its job, and the renderers of its result.

`answer_job` is the one path: refuse what the job cannot do, open the events if the
renderer streams, run the job, and let the renderer chosen when the answer opened turn its
result into the answer.  Renderers: the contract's JSON or events, the MP3 itself, OpenAI's
json/text/srt/vtt/verbose_json, and OpenAI's stream events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from starlette.responses import JSONResponse, Response

from vrai_stream.http.context import RequestContext
from vrai_stream.http.events import Events, SegmentEvents, ServerSentEvent, TextDeltas
from vrai_stream.http.responses import mp3_response, success_body, transcript_response
from vrai_stream.pipeline.job import JobListener, JobResult, JobSpec
from vrai_stream.speech.formats import ResponseFormat
from vrai_stream.speech.summarize import SummarizationType
from vrai_stream.speech.transcribers.base import Transcript

Reply = Response | ServerSentEvent
SummaryChoice = Callable[[], SummarizationType]
"""The summary asked for, read when the job is over: a form may send it after the audio."""


class Renderer(Protocol):
    def open(self, events: Events) -> JobListener | None:
        """Open the events and return the job's listener; None: the answer comes at the end."""

    async def render(self, context: RequestContext, result: JobResult) -> Reply:
        """The answer, or its last event if the events are open."""


async def answer_job(
    context: RequestContext, spec: JobSpec, audio: AsyncIterator[bytes], renderer: Renderer
) -> Reply:
    """Run the job `spec` on `audio`, answered by `renderer`."""
    await context.check(spec)
    listener = renderer.open(context.events)
    result = await context.run(spec, audio, listener)
    return await renderer.render(context, result)


class ContractAnswer:
    """The service's own answer: `success_body`, with `summary` or `summaryError` when asked.

    As events (`events=True`): `progress`, `segment` and `withdrawn` as the job goes, then
    the `summary` event (when asked for), then `done` with the same body as the JSON.
    """

    def __init__(self, summary: SummaryChoice, *, events: bool) -> None:
        self._summary = summary
        self._events = events

    def open(self, events: Events) -> JobListener | None:
        if not self._events:
            return None
        events.open()
        return SegmentEvents(events)

    async def render(self, context: RequestContext, result: JobResult) -> Reply:
        text = result.transcript.text if result.transcript else ""
        extra = await context.summarize(self._summary(), text)
        body = {**success_body(result), **extra}
        if not self._events:
            return JSONResponse(body)
        if extra:
            context.events.send(ServerSentEvent("summary", extra))
        return ServerSentEvent("done", body)


class Mp3Answer:
    """The trimmed MP3 itself (`Accept: audio/mpeg`)."""

    def open(self, events: Events) -> JobListener | None:
        return None

    async def render(self, context: RequestContext, result: JobResult) -> Reply:
        return mp3_response(result)


class OpenAIAnswer:
    """The transcript as OpenAI's API answers it, in the asked `response_format`."""

    def __init__(self, response_format: ResponseFormat) -> None:
        self._format = response_format

    def open(self, events: Events) -> JobListener | None:
        return None

    async def render(self, context: RequestContext, result: JobResult) -> Reply:
        transcript = result.transcript or Transcript(text="")
        response = transcript_response(transcript, self._format, result.duration)
        if result.truncated:
            response.headers["X-Truncated"] = "true"  # OpenAI's bodies have no field for it
        return response


class OpenAIDeltas:
    """OpenAI's `stream=true`: a `transcript.text.delta` per segment, then the whole text."""

    def __init__(self) -> None:
        self._deltas: TextDeltas | None = None

    def open(self, events: Events) -> JobListener | None:
        events.open()
        self._deltas = TextDeltas(events)
        return self._deltas

    async def render(self, context: RequestContext, result: JobResult) -> Reply:
        assert self._deltas is not None, "opened before the job ran"
        return self._deltas.done(result.transcript.text if result.transcript else "")
