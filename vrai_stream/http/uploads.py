"""`/v1/uploads/<machine>/<id>`: a resumable upload (draft-ietf-httpbis-resumable-upload).

`HEAD` tells how far the upload has come, `PATCH` sends the rest from there, `DELETE` gives
it up.  The request that completes the upload gets the answer the first request would have
had, relayed as it is written (`UploadSession.answer`).  Once complete, an upload still
answers `HEAD` with where it stood (`Upload-Complete: ?1`) and a `PATCH` with `409`.

On Fly.io a request that reaches another machine is sent to the one holding the upload
with `fly-replay`, before its body is read (Fly replays at most 1 MB of body), and the
replay is cached for the upload's path, so the `PATCH` after a `HEAD` goes straight there.
"""

from __future__ import annotations

import math

from starlette.requests import Request
from starlette.responses import Response

from vrai_stream import errors
from vrai_stream.http.answer import Reply, endpoint
from vrai_stream.http.context import RequestContext
from vrai_stream.http.request_body import request_body
from vrai_stream.http.request_shape import RAW_ENDPOINT
from vrai_stream.http.responses import RecordedResponse
from vrai_stream.http.resumable import limits_of
from vrai_stream.http.upload_draft import PARTIAL_UPLOAD, VERSIONS, Draft, Limits, draft_of
from vrai_stream.services import Services
from vrai_stream.uploads.registry import MACHINE_ID, Finished
from vrai_stream.uploads.session import State, UploadSession

REPLAY_TIMEOUT = "5s"
"""How long Fly's proxy tries the machine holding the upload before sending the request back."""


@endpoint("uploads", idempotent=False)
async def upload_resource(context: RequestContext) -> Reply:
    request = context.request
    services = context.services
    machine = request.path_params["machine"]
    if machine != services.uploads.machine:
        return _elsewhere(request, machine, services)
    await context.authenticate()
    draft = draft_of(request.headers) or Draft(VERSIONS[-1])
    upload = services.uploads.find(request.path_params["upload_id"], context.user_id)
    if request.method == "HEAD":
        # A client asks where to resume once it has given up its connection: if the server
        # still reads that one, it stops, so the offset it answers holds for the PATCH.
        if isinstance(upload, UploadSession) and upload.state is State.RECEIVING:
            await upload.take_over()
        fields = _state(draft, upload)
        return Response(status_code=204, headers={**fields, "Cache-Control": "no-store"})
    if request.method == "DELETE":
        if isinstance(upload, UploadSession):
            upload.end("cancelled")
        return Response(
            status_code=204, headers={"Upload-Draft-Interop-Version": str(draft.version)}
        )
    return await _append(context, upload, draft)


async def _append(
    context: RequestContext, upload: UploadSession | Finished, draft: Draft
) -> Response:
    """`PATCH`: the rest of the body, from exactly where the upload stands."""
    headers = context.request.headers
    offset = draft.offset(headers)
    if offset is None:
        raise errors.InvalidParameters("A PATCH to an upload needs Upload-Offset")
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if draft.version >= 6 and media_type != PARTIAL_UPLOAD:
        raise errors.InvalidParameters(f"A PATCH to an upload is typed {PARTIAL_UPLOAD}")
    complete = draft.complete(headers)
    if isinstance(upload, UploadSession) and upload.state is not State.COMPLETE:
        await upload.take_over()  # the old connection may still seem alive: it is not
        if upload.state is State.ENDED:
            raise errors.UploadExpired("This upload ended and cannot be resumed; send it again")
    if _is_complete(upload) or offset != upload.offset:
        raise errors.UploadOffsetMismatch(
            f"The upload stands at byte {upload.offset}"
            + (" and is complete" if _is_complete(upload) else "; resume from there"),
            fields=_state(draft, upload),
        )
    assert isinstance(upload, UploadSession)
    _learn_length(upload, draft.length(headers, offset=offset))
    context.services.uploads.resumed(upload)
    context.body_started = True
    finished = complete is not False
    fed = await upload.feed(request_body(context.request), complete=finished)
    if upload.over or (fed and finished):
        await upload.answer.until_started()
        if not upload.answer.started:
            raise errors.UploadExpired("The upload's job ended without an answer; send it again")
        return RecordedResponse(upload.answer, _state(draft, upload))
    if not fed:
        raise errors.ClientDisconnected("The client disconnected during the upload")
    return Response(status_code=204, headers=_state(draft, upload))


def _learn_length(upload: UploadSession, length: int | None) -> None:
    """The upload's length as this append says it: it must agree with what was said."""
    if length is None:
        return
    if upload.length is not None and length != upload.length:
        raise errors.InvalidParameters(
            f"The upload's length was given as {upload.length} bytes; this request says {length}"
        )
    if upload.max_size is not None and length > upload.max_size:
        raise errors.BodyTooLarge(
            f"The upload is {length} bytes; at most {upload.max_size} bytes are accepted"
        )
    upload.length = length


def _is_complete(upload: UploadSession | Finished) -> bool:
    if isinstance(upload, Finished):
        return upload.complete
    return upload.state is State.COMPLETE


def _state(draft: Draft, upload: UploadSession | Finished) -> dict[str, str]:
    """Where the upload stands; a live one's limits too (a finished one takes no more)."""
    limits = limits_of(upload) if isinstance(upload, UploadSession) else None
    complete = _is_complete(upload)
    return draft.state(offset=upload.offset, complete=complete, length=upload.length, limits=limits)


def _elsewhere(request: Request, machine: str, services: Services) -> Response:
    """Another machine's upload: Fly's proxy is asked to replay the request there."""
    replayed = "fly-replay-src" in request.headers or "fly-replay-failed" in request.headers
    if not services.on_fly or replayed or not MACHINE_ID.fullmatch(machine):
        raise errors.UploadNotFound(
            "The machine that held this upload has stopped or cannot be reached; "
            "send the whole recording again"
        )
    headers = {"fly-replay": f"instance={machine};timeout={REPLAY_TIMEOUT};fallback=force_self"}
    host = request.headers.get("host", "").rsplit(":", 1)[0]
    if host:
        headers["fly-replay-cache"] = f"{host}/v1/uploads/{machine}/*"
        ttl = max(10, math.ceil(services.uploads.grace_seconds))
        headers["fly-replay-cache-ttl-secs"] = str(ttl)
    # 421 Misdirected Request: what a client sees if no proxy acts on the replay.
    return Response(status_code=421, headers=headers)


async def options(request: Request) -> Response:
    """`OPTIONS` on an audio endpoint: it takes resumable uploads, and on what terms."""
    services: Services = request.app.state.services
    settings = services.settings
    raw = request.url.path == RAW_ENDPOINT
    limit = settings.max_body_bytes if raw else settings.max_encoded_body_bytes
    limits = Limits(max_size=limit, max_age=services.uploads.grace_seconds)
    headers = {
        "Allow": "POST, OPTIONS",
        "Accept-Patch": PARTIAL_UPLOAD,
        "Upload-Limit": limits.field(),
        "Upload-Draft-Interop-Version": ", ".join(map(str, VERSIONS)),
    }
    return Response(status_code=204, headers=headers)
