"""What a webhook says: whether the transcription completed, and the answer the client got.

The body is Standard Webhooks' recommended envelope, `{"type", "timestamp", "data"}`, with
`data` the answer's JSON body as it was sent (an answer given as events: its last event's
data, `done`'s body or the error body).  A text answer (the OpenAI-compatible endpoint's
`text`, `srt`, `vtt`) comes as `{"contentType", "content"}`; a request that ended with no
answer at all (its client left mid-upload, the server stopped) as the error body it would
have had.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from vrai_stream import errors

COMPLETED = "transcription.completed"
FAILED = "transcription.failed"


class Answered(Protocol):
    """A finished answer as the web layer keeps it (its status, media type and body)."""

    @property
    def status(self) -> int: ...

    @property
    def media_type(self) -> str: ...

    @property
    def body(self) -> bytes: ...


@dataclass(frozen=True)
class Event:
    """One webhook's content: its type, and its body exactly as it is signed and sent."""

    type: str
    body: bytes


def event_for(
    request_id: str, status: int, answer: Answered | None, *, now: datetime | None = None
) -> Event:
    """The webhook for a request that ended with `answer` (None: it had none), `status`."""
    if answer is None:
        kind, data = FAILED, _unanswered(request_id, status)
    else:
        kind = COMPLETED if 200 <= answer.status < 300 else FAILED
        data = _data(answer)
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    envelope = {
        "type": kind,
        "timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": data,
    }
    # Compact, and sent as signed: a receiver verifies these exact bytes.
    return Event(kind, json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode())


def _data(answer: Answered) -> Any:
    media_type = answer.media_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json":
        try:
            return json.loads(answer.body)
        except ValueError:
            pass
    return {"contentType": answer.media_type, "content": answer.body.decode("utf-8", "replace")}


def _unanswered(request_id: str, status: int) -> dict[str, Any]:
    """The error body of a request that ended before it had an answer to give."""
    failure: errors.ServiceError
    if status == errors.ClientDisconnected.status:
        failure = errors.ClientDisconnected("The client left before the upload ended")
    else:
        failure = errors.InternalError(
            "The request ended without an answer: the server stopped before its job did"
        )
    return failure.body(request_id)
