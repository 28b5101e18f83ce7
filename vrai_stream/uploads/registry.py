"""Every resumable upload this machine holds, found by its id and bound to its user."""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from vrai_stream import errors, metrics
from vrai_stream.uploads.session import State, UploadSession

MACHINE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a machine's id may be (Fly's are hex): it goes into a `fly-replay` header, where a
`;` or `=` from a client's path would add fields of its own (`app=`, another app)."""
ID_BYTES = 24
"""192 random bits: an id cannot be guessed, and the path carries nothing else secret."""
REMEMBERED_ENDINGS = 4096
"""How many finished uploads are remembered: a completed one still answers where it stands
(`Upload-Complete: ?1`), one given up is `410`, not `404`."""


@dataclass(frozen=True)
class Finished:
    """An upload whose job is over: what is still known of it."""

    user_id: str
    offset: int
    length: int | None
    complete: bool
    """Every byte arrived (the job answered); else it was given up (`reason`)."""
    reason: str


class Uploads:
    def __init__(
        self,
        *,
        machine: str,
        grace_seconds: float,
        max_waiting: int,
        idle_timeout_seconds: float,
    ) -> None:
        self.machine = machine
        """This machine's id on Fly.io (`FLY_MACHINE_ID`), `local` elsewhere: part of each path."""
        self.grace_seconds = grace_seconds
        self._max_waiting = max_waiting
        self._idle = idle_timeout_seconds
        self._sessions: dict[str, UploadSession] = {}
        self._finished: OrderedDict[str, Finished] = OrderedDict()

    def create(self, *, user_id: str) -> UploadSession:
        upload_id = secrets.token_urlsafe(ID_BYTES)
        session = UploadSession(
            upload_id=upload_id,
            path=f"/v1/uploads/{self.machine}/{upload_id}",
            user_id=user_id,
            grace_seconds=self.grace_seconds,
            idle_timeout_seconds=self._idle,
            on_waiting=self.enforce_cap,
        )
        self._sessions[upload_id] = session
        return session

    def find(self, upload_id: str, user_id: str) -> UploadSession | Finished:
        """The user's upload, or what is left of it once complete; another user's is as
        unknown as one that never was; one given up is `410`."""
        session = self._sessions.get(upload_id)
        finished = self._finished.get(upload_id) if session is None else None
        owner = session.user_id if session else finished.user_id if finished else None
        if owner is None or not secrets.compare_digest(owner, user_id):
            raise errors.UploadNotFound(
                "No upload with this id is held here; send the whole recording again"
            )
        if session is not None and session.state is not State.ENDED:
            return session
        if finished is not None and finished.complete:
            return finished
        reason = session.ended_because if session else finished.reason if finished else ""
        raise errors.UploadExpired(
            f"This upload ended ({reason}) and cannot be resumed; send the whole recording again"
        )

    def resumed(self, session: UploadSession) -> None:
        session.resumptions += 1
        metrics.UPLOAD_RESUMPTIONS.inc()

    def waiting(self) -> list[UploadSession]:
        return [s for s in self._sessions.values() if s.state is State.WAITING]

    def enforce_cap(self) -> None:
        """End the oldest waiting uploads beyond the cap: each holds a job slot and memory."""
        waiting = sorted(self.waiting(), key=lambda s: s.waiting_since or 0.0)
        for session in waiting[: max(0, len(waiting) - self._max_waiting)]:
            session.end("evicted")

    def forget(self, session: UploadSession) -> None:
        """The job is over: the id is remembered only as ended."""
        if self._sessions.pop(session.id, None) is None:
            return
        if session.ended_because is not None:
            metrics.UPLOADS_ENDED.labels(reason=session.ended_because).inc()
        self._finished[session.id] = Finished(
            user_id=session.user_id,
            offset=session.offset,
            length=session.length,
            complete=session.state is State.COMPLETE,
            reason=session.ended_because or "its job ended before its last byte",
        )
        while len(self._finished) > REMEMBERED_ENDINGS:
            self._finished.popitem(last=False)

    def end_all(self, because: str) -> None:
        """The machine is going away: no waiting upload could be resumed here."""
        for session in list(self._sessions.values()):
            if session.state is State.WAITING:
                session.end(because)
