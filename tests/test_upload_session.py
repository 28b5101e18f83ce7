"""The resumable upload's parts alone: the draft's fields (`http/upload_draft`), a session fed
by one connection after another (`uploads/session`, `uploads/registry`), the keys kept for
retries (`uploads/idempotency`), and the recorded answers both hand on (`uploads/recorded`)."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest

from vrai_stream import errors
from vrai_stream.http.upload_draft import Draft, draft_of
from vrai_stream.uploads.idempotency import (
    MAX_KEPT_ANSWER_BYTES,
    MAX_KEPT_TOTAL_BYTES,
    Entry,
    IdempotencyKeys,
)
from vrai_stream.uploads.recorded import RELAY_BYTES, RecordedAnswer
from vrai_stream.uploads.registry import Uploads
from vrai_stream.uploads.results import MAX_RESULT_BYTES, MAX_TOTAL_BYTES, Result, Results
from vrai_stream.uploads.session import State, UploadSession

pytestmark = pytest.mark.anyio


def test_each_interop_version_reads_and_writes_its_own_fields() -> None:
    v3, v6 = Draft(3), Draft(6)
    assert v3.complete({"upload-incomplete": "?0"}) is True
    assert v3.complete({"upload-complete": "?1"}) is None  # not a field of version 3
    assert v6.complete({"upload-complete": "?0"}) is False
    assert v3.state(offset=7, complete=False) == {
        "Upload-Draft-Interop-Version": "3",
        "Upload-Offset": "7",
        "Upload-Incomplete": "?1",
    }
    assert v6.state(offset=7, complete=True)["Upload-Complete"] == "?1"
    assert draft_of({}) is None
    assert draft_of({"upload-draft-interop-version": "5"}) == Draft(5)


@pytest.mark.parametrize(
    "fields",
    [
        {"upload-draft-interop-version": "4"},
        {"upload-draft-interop-version": "latest"},
    ],
)
def test_an_unknown_version_is_refused(fields: dict[str, str]) -> None:
    with pytest.raises(errors.InvalidParameters):
        draft_of(fields)


@pytest.mark.parametrize("raw", ["-1", "1e3", "0x10", "9" * 16, ""])
def test_a_malformed_offset_is_refused(raw: str) -> None:
    with pytest.raises(errors.InvalidParameters):
        Draft(6).offset({"upload-offset": raw})


@pytest.mark.parametrize("raw", ["1", "true", "?2"])
def test_a_malformed_boolean_is_refused(raw: str) -> None:
    with pytest.raises(errors.InvalidParameters):
        Draft(6).complete({"upload-complete": raw})


def session(*, grace: float = 5.0, idle: float = 5.0) -> UploadSession:
    return UploadSession(
        upload_id="id",
        path="/v1/uploads/local/id",
        user_id="alice",
        grace_seconds=grace,
        idle_timeout_seconds=idle,
    )


async def pieces(*parts: bytes, then_drop: bool = False) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
        await anyio.lowlevel.checkpoint()
    if then_drop:
        raise errors.ClientDisconnected("gone")


async def stalling_after(part: bytes) -> AsyncIterator[bytes]:
    """A connection that sends `part`, then nothing more, and never ends."""
    yield part
    await anyio.sleep_forever()
    yield b""  # pragma: no cover


async def read_all(
    upload: UploadSession, into: list[bytes], failures: list[BaseException] | None = None
) -> None:
    """What the job does: read the body to its end, or fail as a disconnect."""
    try:
        async for chunk in upload.chunks():
            into.append(chunk)
    except errors.ClientDisconnected as exc:
        if failures is None:
            raise
        failures.append(exc)


async def test_a_dropped_connection_waits_and_the_next_one_carries_on() -> None:
    upload = session()
    read: list[bytes] = []
    async with anyio.create_task_group() as group:
        group.start_soon(read_all, upload, read)
        assert not await upload.feed(pieces(b"ab", b"cd", then_drop=True), complete=True)
        assert upload.state is State.WAITING
        assert upload.offset == 4
        assert await upload.feed(pieces(b"ef"), complete=True)
    assert b"".join(read) == b"abcdef"
    assert upload.state is State.COMPLETE


async def test_an_upload_not_resumed_in_time_fails_the_job_as_a_disconnect() -> None:
    upload = session(grace=0.2)
    failures: list[BaseException] = []
    async with anyio.create_task_group() as group:
        group.start_soon(read_all, upload, [], failures)
        await upload.feed(pieces(b"ab", then_drop=True), complete=True)
    assert [str(f) for f in failures] == ["The client did not resume the upload within 0.2 s"]
    assert upload.ended_because == "expired"
    assert not await upload.feed(pieces(b"cd"), complete=True)  # too late: nothing is read
    assert upload.state is State.ENDED


async def test_a_stalled_connection_is_treated_as_dropped() -> None:
    upload = session(idle=0.1, grace=5.0)

    read: list[bytes] = []
    async with anyio.create_task_group() as group:
        group.start_soon(read_all, upload, read)
        # Cut off by the job's idle time:
        assert not await upload.feed(stalling_after(b"ab"), complete=True)
        assert upload.state is State.WAITING
        await upload.feed(pieces(b"cd"), complete=True)
    assert b"".join(read) == b"abcd"


async def test_a_resumption_takes_over_from_a_connection_that_still_seems_alive() -> None:
    upload = session()
    read: list[bytes] = []

    async with anyio.create_task_group() as group:
        group.start_soon(read_all, upload, read)
        group.start_soon(lambda: upload.feed(stalling_after(b"ab"), complete=True))
        with anyio.fail_after(5):
            while upload.offset < 2:  # noqa: ASYNC110 (the reader's progress)
                await anyio.sleep(0.01)
        await upload.take_over()
        assert upload.offset == 2
        await upload.feed(pieces(b"cd"), complete=True)
    assert b"".join(read) == b"abcd"


async def test_a_chunk_withdrawn_as_the_job_reaches_for_it_does_not_end_the_upload() -> None:
    """A resumption cuts off the old connection just as the job goes to take its pending
    chunk: the chunk goes back, and the job waits on (it once read a withdrawn chunk as the
    grace being over, and the resume found the upload `410` expired)."""
    upload = session(grace=30)
    read: list[bytes] = []

    async with anyio.create_task_group() as group:
        group.start_soon(lambda: upload.feed(stalling_after(b"ab"), complete=True))
        await anyio.wait_all_tasks_blocked()  # "ab" is offered; nobody has taken it yet
        # The take-over cuts the feeder off first; the job's read starts in the same
        # instant, before the feeder has withdrawn its chunk.
        group.start_soon(upload.take_over)
        group.start_soon(read_all, upload, read)
        await anyio.wait_all_tasks_blocked()
        assert upload.state is State.WAITING, upload.ended_because
        await upload.feed(pieces(b"abcd"[upload.offset :]), complete=True)
    assert b"".join(read) == b"abcd"


async def test_waiting_uploads_beyond_the_cap_end_oldest_first() -> None:
    uploads = Uploads(machine="local", grace_seconds=60, max_waiting=2, idle_timeout_seconds=5)
    made = [uploads.create(user_id="alice") for _ in range(4)]
    failures: list[BaseException] = []
    async with anyio.create_task_group() as group:
        for upload in made:
            group.start_soon(read_all, upload, [], failures)
        for upload in made:
            await upload.feed(pieces(b"x", then_drop=True), complete=True)
            await anyio.sleep(0.01)
        assert [u.ended_because for u in made] == ["evicted", "evicted", None, None]
        for upload in made[2:]:
            upload.end("cancelled")
    assert len(failures) == 4
    for upload in made:
        uploads.forget(upload)
    with pytest.raises(errors.UploadExpired):
        uploads.find(made[0].id, "alice")
    with pytest.raises(errors.UploadNotFound):
        uploads.find("never-made", "alice")


async def test_an_upload_is_found_only_by_its_user() -> None:
    uploads = Uploads(machine="m1", grace_seconds=60, max_waiting=2, idle_timeout_seconds=5)
    upload = uploads.create(user_id="alice")
    assert upload.path == f"/v1/uploads/m1/{upload.id}"
    assert len(upload.id) >= 32  # 192 random bits, url-safe
    assert uploads.find(upload.id, "alice") is upload
    with pytest.raises(errors.UploadNotFound):
        uploads.find(upload.id, "bob")


async def test_nothing_is_lost_or_doubled_however_often_waits_are_cut_short() -> None:
    """A job whose idle timeout is shorter than the gaps between chunks cuts its feeder off
    again and again, mid hand-off; each time the next one resumes from the offset."""
    data = os.urandom(300_000)
    upload = session(idle=0.002, grace=30)
    read: list[bytes] = []
    generator = random.Random(7)
    feeds = 0

    async def rest(start: int) -> AsyncIterator[bytes]:
        for position in range(start, len(data), 1500):
            await anyio.sleep(generator.choice((0, 0, 0, 0.001, 0.003)))
            yield data[position : position + 1500]

    async with anyio.create_task_group() as group:
        group.start_soon(read_all, upload, read)
        with anyio.fail_after(60):
            while upload.state is not State.COMPLETE:
                feeds += 1
                await upload.feed(rest(upload.offset), complete=True)
    assert b"".join(read) == data
    assert feeds > 5, "the timeouts never cut a feeder off: the test proves nothing"


async def _answered(entry: Entry, status: int, body: bytes) -> None:
    """The first request's answer, recorded as it is sent, its body hashed."""
    entry.hash_known("hash")
    entry.answer.start(status, (("content-type", "application/json"),))
    await entry.answer.write(body)
    entry.answer.finish()


async def test_kept_answers_are_bounded_in_bytes_and_time() -> None:
    keys = IdempotencyKeys(ttl_seconds=0.2)
    for n in range(MAX_KEPT_TOTAL_BYTES // MAX_KEPT_ANSWER_BYTES + 3):
        entry, first = keys.claim("alice", f"key-{n}")
        assert first
        await _answered(entry, 200, bytes(MAX_KEPT_ANSWER_BYTES))
        keys.settle(entry, 200)
        assert entry.kept
    assert len(keys) == MAX_KEPT_TOTAL_BYTES // MAX_KEPT_ANSWER_BYTES, "oldest dropped first"
    assert keys.claim("alice", "key-0")[1], "the oldest was kept beyond the byte cap"
    await anyio.sleep(0.25)
    assert keys.claim("alice", f"key-{n}")[1], "expired with its time to live"


async def test_an_answer_that_may_go_another_way_frees_its_key() -> None:
    keys = IdempotencyKeys(ttl_seconds=60)
    for status in (502, 503, 504, 499, 409, 408, 429):
        entry, _ = keys.claim("alice", "key")
        await _answered(entry, status, b"{}")
        keys.settle(entry, status)
        assert entry.settled.is_set() and not entry.kept
        assert keys.claim("alice", "key")[1], status
        keys.settle(keys.claim("alice", "key")[0], 499)
    entry, _ = keys.claim("alice", "key")
    await _answered(entry, 422, b"{}")
    keys.settle(entry, 422)  # final: kept
    assert keys.claim("alice", "key") == (entry, False)


async def test_an_answer_too_large_to_keep_frees_its_key() -> None:
    keys = IdempotencyKeys(ttl_seconds=60)
    entry, _ = keys.claim("alice", "key")
    await _answered(entry, 200, bytes(MAX_KEPT_ANSWER_BYTES + 1))
    keys.settle(entry, 200)
    assert entry.answer.overflowed and not entry.kept
    assert keys.claim("alice", "key")[1]


async def test_a_kept_answer_is_followed_from_its_first_byte_by_any_reader() -> None:
    answer = RecordedAnswer(max_bytes=1024)
    answer.start(200, (("content-type", "text/event-stream"),))
    await answer.write(b"one ")
    heard: list[list[bytes]] = [[], []]

    async def follow(into: list[bytes]) -> None:
        async for chunk in answer.follow():
            into.append(chunk)

    async with anyio.create_task_group() as group:
        for into in heard:
            group.start_soon(follow, into)
        await anyio.sleep(0.01)
        await answer.write(b"two")
        answer.finish()
    assert [b"".join(chunks) for chunks in heard] == [b"one two", b"one two"]
    assert answer.complete and answer.body == b"one two"


async def test_a_relay_holds_its_writer_back_to_its_reader() -> None:
    """A long MP3 relayed to the request that resumed its upload is never whole in memory."""
    relay = RecordedAnswer(relay=True)
    relay.start(200, ())
    await relay.write(b"head")
    written = 4
    piece = bytes(64 * 1024)

    async def write_all() -> None:
        nonlocal written
        for _ in range(64):  # 4 MiB
            await relay.write(piece)
            written += len(piece)
        relay.finish()

    read = 0
    most_ahead = 0
    reader = relay.follow()
    async with anyio.create_task_group() as group:
        first = await reader.__anext__()  # the resuming request follows as the answer starts
        group.start_soon(write_all)
        read = len(first)
        async for chunk in reader:
            read += len(chunk)
            most_ahead = max(most_ahead, written - read)
            await anyio.sleep(0.001)  # a slow link
    assert read == written == 4 + 64 * len(piece)
    assert most_ahead <= RELAY_BYTES + 2 * len(piece), most_ahead


async def test_results_are_kept_for_their_owner_bounded_in_bytes_and_time() -> None:
    results = Results(ttl_seconds=0.2)
    results.started("r1", "alice")
    running = results.find("r1", "alice")
    assert running is not None and running.result is None
    assert results.find("r1", "bob") is None, "another user's job is unknown"
    results.finished("r1", Result(200, "application/json", b"{}"))
    found = results.find("r1", "alice")
    assert found is not None and found.result == Result(200, "application/json", b"{}")
    big = Result(200, "application/json", bytes(MAX_RESULT_BYTES))
    for n in range(MAX_TOTAL_BYTES // MAX_RESULT_BYTES + 2):
        results.started(f"big-{n}", "alice")
        results.finished(f"big-{n}", big)
    assert results.find("big-0", "alice") is None, "the oldest was kept beyond the byte cap"
    results.started("mp3", "alice")
    results.finished("mp3", None)
    assert results.find("mp3", "alice") is None, "nothing to send again is not kept"
    await anyio.sleep(0.25)
    assert results.find(f"big-{n}", "alice") is None, "expired with its time to live"
