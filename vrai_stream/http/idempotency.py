"""`Idempotency-Key` on every audio endpoint: a repeated request gets the first one's answer.

The first request with a key runs, and its answer is recorded as it is sent (`http.answer`).
A repeat reads its own body for its hash (never transcribes it), checks it is the same
request, then gets the first answer.  On the machine that ran it, events are joined as
they go, from the first event, and any other answer is sent once it is whole
(`uploads.idempotency`).  With a shared bucket (`state.claims`), a key is claimed there
too, so a repeat on another machine gets the answer the first left in the bucket, waiting
a little for one still running, then `409` with `Retry-After`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import anyio
from starlette.responses import Response

from vrai_stream import errors, metrics
from vrai_stream.bodies.limits import BodyMeter, limited
from vrai_stream.http.context import RequestContext
from vrai_stream.http.request_body import request_body
from vrai_stream.http.responses import RecordedResponse
from vrai_stream.state.bucket import StateUnavailable
from vrai_stream.state.claims import Claim, HeldElsewhere, KeptAnswer
from vrai_stream.uploads.idempotency import Entry, Fingerprint, check_key
from vrai_stream.uploads.recorded import RecordedAnswer

REPLAYED = {"Idempotent-Replayed": "true"}
ELSEWHERE_WAIT_SECONDS = 10.0
"""How long a repeat waits for the first request running on another machine: a retry after
a lost answer comes when the first is about done."""
ELSEWHERE_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Elsewhere:
    """The key was claimed on another machine: what it holds when this request claimed it."""

    key: str
    standing: KeptAnswer | HeldElsewhere


async def claim(context: RequestContext) -> Entry | Elsewhere | None:
    """Claim the request's key: None when it is the first to use it (the request runs, and
    its answer is recorded for repeats); else the first request's entry on this machine, or
    what another machine's left in the bucket."""
    key = check_key(context.request.headers["idempotency-key"])
    await context.authenticate()
    request = context.request
    context.fingerprint = Fingerprint(
        request.method,
        request.url.path,
        request.url.query,
        request.headers.get("content-type", ""),
    )
    keys = context.services.idempotency
    entry, first = keys.claim(context.user_id, key)
    if not first:
        return entry
    state = context.services.state
    if state is not None:
        try:
            standing = await state.keys.claim(context.user_id, key, context.request_id)
        except StateUnavailable:
            standing = None  # logged; this machine's claim stands alone until the bucket is back
        if isinstance(standing, Claim):
            context.shared_claim = standing
        elif standing is not None:
            keys.settle(entry, errors.IdempotencyKeyInUse.status)  # not this machine's key
            return Elsewhere(key, standing)
    context.key_entry = entry
    return None


async def replay(context: RequestContext, first: Entry | Elsewhere) -> Response:
    """The first request's answer, for a repeat of it."""
    await _read_body(context)
    if isinstance(first, Elsewhere):
        return await _replay_from_bucket(context, first)
    entry = first
    await entry.hashed.wait()  # the first request may still be reading its body
    if entry.fingerprint is None:
        raise _no_answer()
    _check_same_request(context, entry.fingerprint)
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


async def _replay_from_bucket(context: RequestContext, first: Elsewhere) -> Response:
    """The answer another machine left for the key, once it is there."""
    state = context.services.state
    assert state is not None
    standing: KeptAnswer | HeldElsewhere | None = first.standing
    deadline = anyio.current_time() + ELSEWHERE_WAIT_SECONDS
    retry_after = context.services.settings.retry_after_seconds
    while isinstance(standing, HeldElsewhere):
        if anyio.current_time() >= deadline:
            raise errors.IdempotencyKeyInUse(
                "The first request with this Idempotency-Key is still running on another "
                "machine; send the request again later",
                retry_after_seconds=max(1, min(math.ceil(standing.seconds_left), retry_after)),
            )
        await anyio.sleep(ELSEWHERE_POLL_SECONDS)
        try:
            standing = await state.keys.look(context.user_id, first.key)
        except StateUnavailable:
            continue  # logged; try again until the wait is over
    if standing is None:
        raise _no_answer()
    _check_same_request(context, standing.fingerprint)
    metrics.IDEMPOTENT_REPLAYS.inc()
    answer = RecordedAnswer.whole(standing.status, standing.headers, standing.body)
    return RecordedResponse(answer, REPLAYED)


async def _read_body(context: RequestContext) -> None:
    """Read the repeat's body to its end, for its hash only."""
    body = limited(
        context.observed(request_body(context.request)),
        max_bytes=context.services.settings.max_encoded_body_bytes,
        idle_timeout=context.services.settings.idle_timeout_seconds,
        meter=BodyMeter(),
    )
    async for _ in body:
        pass


def _check_same_request(context: RequestContext, first_fingerprint: str) -> None:
    assert context.fingerprint is not None
    if first_fingerprint != context.fingerprint.hexdigest():
        raise errors.IdempotencyKeyReused(
            "This Idempotency-Key was used for a different request; use a new key "
            "for a new recording"
        )


def _no_answer() -> errors.ServiceError:
    return errors.IdempotencyKeyInUse(
        "The first request with this Idempotency-Key ended without an answer to repeat; "
        "send the request again",
        retry_after_seconds=1,
    )
