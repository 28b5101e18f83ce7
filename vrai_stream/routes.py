"""The audio endpoints: each reads its own request shape and shares `HttpJob` for the rest."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .ingest import parse_window
from .jobs import HttpJob
from .pipeline import JobSpec
from .responses import mp3_response, success_body
from .summarize import SummarizationType


async def transcriptions(request: Request) -> Response:
    """`POST /v1/transcriptions`: raw audio in the body, the window in the query."""
    async with HttpJob(request, "transcriptions") as job:
        await job.authenticate()
        settings = job.services.settings
        query = request.query_params
        window = parse_window(query, max_window_seconds=settings.max_window_seconds)
        want_mp3 = "audio/mpeg" in request.headers.get("accept", "")
        summary = SummarizationType.parse(query.get("summarizationType"))
        if not want_mp3:
            job.services.summarizer.check(summary)
        job.check_body_length()
        spec = JobSpec(
            request_id=job.request_id, window=window, user_id=job.user_id, want_mp3=want_mp3
        )
        async with job.admitted():
            result = await job.run(spec, job.body())
        if result.mp3 is not None:
            job.response = mp3_response(result)
        else:
            text = result.transcript.text if result.transcript else ""
            extra = await job.summarize(summary, text)
            job.response = JSONResponse(
                {**success_body(result), **extra}, headers={"X-Request-Id": job.request_id}
            )
    assert job.response is not None
    return job.response
