"""A request that creates a resumable upload (draft-ietf-httpbis-resumable-upload).

Its body becomes an upload that outlives the connection: a 104 tells the client where to
resume it, and a task feeds the upload from this connection while the job reads the upload.
The upload's own requests (`HEAD`, `PATCH`, `DELETE`) are `http.uploads`.
"""

from __future__ import annotations

import functools

from anyio.abc import TaskGroup
from starlette.requests import Request

from vrai_stream import errors
from vrai_stream.http.request_body import request_body
from vrai_stream.http.upload_draft import (
    INTERIM_EXTENSION,
    INTERIM_REASON,
    WITH_LIMITS,
    Limits,
    draft_of,
)
from vrai_stream.uploads.registry import Uploads
from vrai_stream.uploads.session import UploadSession


def begin_upload(
    request: Request,
    uploads: Uploads,
    user_id: str,
    feeders: TaskGroup,
    *,
    max_size: int,
    request_id: str,
) -> UploadSession | None:
    """The upload this request creates, its 104 sent; None for a plain request, or where
    a 104 cannot be sent.  Called once the request is authenticated and admitted, and
    before the answer's head (a 104 after it would come too late).  The 104 names the
    request too (`X-Request-Id`): a client that loses the answer knows which it was."""
    headers = request.headers
    draft = draft_of(headers)
    interim = request.scope.get("extensions", {}).get(INTERIM_EXTENSION)
    if draft is None or interim is None:
        return None  # a plain request, or a server that cannot send a 104
    complete = draft.complete(headers)
    if complete is None:
        return None  # the draft's creation names whether the body is complete
    if not complete:
        raise errors.InvalidParameters(
            "Send the whole recording in the request that creates the upload "
            "(Upload-Complete: ?1); resume it with PATCH if the connection drops"
        )
    length = draft.length(headers)
    if length is not None and length > max_size:
        raise errors.BodyTooLarge(
            f"The upload is {length} bytes; at most {max_size} bytes are accepted"
        )
    upload = uploads.create(user_id=user_id)
    upload.length, upload.max_size = length, max_size
    location = str(request.base_url).rstrip("/") + upload.path
    fields = [
        ("Location", location),
        ("Upload-Draft-Interop-Version", str(draft.version)),
        ("X-Request-Id", request_id),
    ]
    if draft.version >= WITH_LIMITS:
        fields.append(("Upload-Limit", limits_of(upload).field()))
    if not interim["send"](104, INTERIM_REASON, fields):
        uploads.forget(upload)
        return None
    feeders.start_soon(functools.partial(upload.feed, complete=True), request_body(request))
    return upload


def limits_of(upload: UploadSession) -> Limits:
    """What the upload is held to, as `Upload-Limit` says it."""
    assert upload.max_size is not None, "set when the upload is created"
    return Limits(max_size=upload.max_size, max_age=upload.seconds_left())
