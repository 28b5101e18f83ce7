"""`Idempotency-Key` on every audio endpoint: a repeated request gets the first one's answer.

The first request with a key runs, and its answer is recorded as it is sent (`http.answer`).
A repeat reads its own body for its hash (never transcribes it), checks it is the same
request, then gets the first answer: events are joined as they go, from the first event;
any other answer is sent once it is whole.  The store itself is `uploads.idempotency`.
"""

from __future__ import annotations

from starlette.responses import Response

from vrai_stream import errors, metrics
from vrai_stream.bodies.limits import BodyMeter, limited
from vrai_stream.http.context import RequestContext
from vrai_stream.http.request_body import request_body
from vrai_stream.http.responses import RecordedResponse
from vrai_stream.uploads.idempotency import Entry, Fingerprint, check_key

REPLAYED = {"Idempotent-Replayed": "true"}


async def claim(context: RequestContext) -> Entry | None:
    """Claim the request's key: None when it is the first to use it (the request runs, and
    its answer is recorded for repeats); else the first request's entry."""
    key = check_key(context.request.headers["idempotency-key"])
    await context.authenticate()
    request = context.request
    context.fingerprint = Fingerprint(
        request.method,
        request.url.path,
        request.url.query,
        request.headers.get("content-type", ""),
    )
    entry, first = context.services.idempotency.claim(context.user_id, key)
    if first:
        context.key_entry = entry
        return None
    return entry


async def replay(context: RequestContext, entry: Entry) -> Response:
    """The first request's answer, for a repeat of it."""
    body = limited(
        context.observed(request_body(context.request)),
        max_bytes=context.services.settings.max_encoded_body_bytes,
        idle_timeout=context.services.settings.idle_timeout_seconds,
        meter=BodyMeter(),
    )
    async for _ in body:
        pass
    assert context.fingerprint is not None
    await entry.hashed.wait()  # the first request may still be reading its body
    if entry.fingerprint is None:
        raise _no_answer()
    if entry.fingerprint != context.fingerprint.hexdigest():
        raise errors.IdempotencyKeyReused(
            "This Idempotency-Key was used for a different request; use a new key "
            "for a new recording"
        )
    answer = entry.answer
    await answer.until_started()
    streams = dict(answer.headers).get("content-type", "").startswith("text/event-stream")
    if not streams:
        await entry.settled.wait()  # a plain answer is sent again only once it is whole
        if not entry.kept:
            raise _no_answer()
    elif not answer.started or answer.overflowed:
        raise _no_answer()
    metrics.IDEMPOTENT_REPLAYS.inc()
    return RecordedResponse(answer, REPLAYED)


def _no_answer() -> errors.ServiceError:
    return errors.IdempotencyKeyInUse(
        "The first request with this Idempotency-Key ended without an answer to repeat; "
        "send the request again"
    )
