"""Resumable uploads through the real server (draft-ietf-httpbis-resumable-upload, as
URLSession speaks it): real speech, real chunked uploads cut by closing the socket, the
draft's own requests to resume, and what is left behind.

The client is `support/resumable_client.py`, written from the draft's examples; the Fly.io
proxy in the two-machine test is `support/fly_proxy.py`, a stand-in for Fly's (test
scaffolding: Fly's own proxy cannot run here).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from vrai_stream.auth.config import hash_token
from vrai_stream.settings import Settings

from .support.fly_proxy import FlyProxy
from .support.resumable_client import (
    Attempt,
    ResumableUploader,
    append,
    cancel,
    create,
    exchange,
    offset,
    options,
    parse_limits,
)
from .support.server import Server, start_server, start_servers
from .test_auth_http import TOKEN_USERS, auth_header

pytestmark = pytest.mark.anyio

SPEECH = Path(__file__).resolve().parents[1].parent / "shared" / "speech"
RECORDING = SPEECH / "L3_osr_harvard_list30.16k.wav"
"""53 s of one reader (real human speech), 1.7 MB as 16 kHz WAV."""
WINDOW = "/v1/transcriptions?fromTime=0&toTime=60"
TOKENS = ",".join(f"{user}:{hash_token(token)}" for user, token in TOKEN_USERS.items())


def alice(**more: str) -> dict[str, str]:
    return {**auth_header(TOKEN_USERS["alice"]), "Content-Type": "audio/wav", **more}


@pytest.fixture(scope="module")
def recording() -> bytes:
    return RECORDING.read_bytes()


@pytest.fixture(scope="module")
def resumable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service with debug copies in a folder (to compare the input byte for byte).

    It transcribes the whole window at once: segments transcribed as they arrive are
    grouped by the upload's timing (a backlog is joined into fuller calls), so only the
    whole window's transcript is the same function of the audio however the upload went.
    """
    base = tmp_path_factory.mktemp("resumable")
    running = start_server(
        base,
        {
            "VRAI_AUTH": "token",
            "VRAI_AUTH_TOKENS": TOKENS,
            "VRAI_DEBUG_STORE": "dir",
            "VRAI_DEBUG_DIR": str(base / "copies"),
            "VRAI_RESUME_GRACE_SECONDS": "20",
            "VRAI_TRANSCRIBE_MODE": "whole",
        },
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def uninterrupted(resumable: Server, recording: bytes) -> dict[str, Any]:
    """The transcript of the same recording sent in one go: what a resumed one must equal."""
    answer = httpx.post(f"{resumable.url}{WINDOW}", content=recording, headers=alice(), timeout=120)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def started(attempt: Attempt) -> str:
    """The resume URL of an upload whose connection was cut after its 104."""
    assert attempt.cut, f"not cut: {attempt.status} {attempt.body[:200]!r}"
    assert attempt.location, "no 104 before the cut"
    return attempt.location


def ffmpeg_runs(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        float(v) for v in re.findall(r"^vrai_ffmpeg_exits_total\{[^}]*\} (\S+)$", text, re.M)
    )


def input_copy(server: Server, request_id: str) -> bytes:
    folder = Path(server.env["VRAI_DEBUG_DIR"])
    (found,) = [p for p in folder.rglob(f"debug-input-*-{request_id}.*") if p.is_file()]
    return found.read_bytes()


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
async def test_an_upload_cut_off_and_resumed_is_transcribed_as_if_nothing_happened(
    resumable: Server, recording: bytes, uninterrupted: dict[str, Any], fraction: float
) -> None:
    runs_before = ffmpeg_runs(resumable)
    url = f"{resumable.url}{WINDOW}"
    location = started(
        await create(
            url, recording, headers=alice(), cut_after_bytes=int(len(recording) * fraction)
        )
    )
    assert "/v1/uploads/local/" in location

    where = await offset(location, headers=alice(), version=6)
    assert where.status == 204
    assert 0 < where.offset <= int(len(recording) * fraction)
    assert where.complete is False

    done = await append(
        location, recording[where.offset :], where.offset, headers=alice(), version=6
    )
    assert done.status == 200, done.body
    body = done.json()
    assert body["transcription"] == uninterrupted["transcription"]
    assert body["inputSize"] == len(recording)
    assert done.headers["upload-offset"] == str(len(recording))
    assert done.headers["upload-complete"] == "?1"

    resumable.wait_idle(15)
    assert ffmpeg_runs(resumable) - runs_before == 1, "ffmpeg ran more than once"
    assert input_copy(resumable, body["requestId"]) == recording
    log = resumable.request_log(body["requestId"])
    assert log["uploadResumptions"] == 1
    # The job is over: the upload still says where it stands, and takes no more bytes.
    after = await offset(location, headers=alice(), version=6)
    assert (after.status, after.offset, after.complete) == (204, len(recording), True)
    more = await append(location, b"more", len(recording), headers=alice(), version=6)
    assert more.status == 409, more.body
    assert more.json()["code"] == "upload_offset_mismatch"
    assert more.headers["upload-offset"] == str(len(recording))
    assert more.headers["upload-complete"] == "?1"


async def test_the_draft_client_resumes_by_itself_through_several_drops(
    resumable: Server, recording: bytes, uninterrupted: dict[str, Any]
) -> None:
    """As URLSession does: on each dropped connection, ask the offset and send the rest."""
    uploader = ResumableUploader(cuts=[0.25, 0.4, 0.5])
    final = await uploader.upload(f"{resumable.url}{WINDOW}", recording, headers=alice())
    assert final.status == 200, final.body
    assert final.json()["transcription"] == uninterrupted["transcription"]
    methods = [request.method for request in uploader.requests]
    assert methods.count("PATCH") == 3 and methods.count("HEAD") == 3, uploader.requests
    resumable.wait_idle(15)


async def test_interop_version_3_as_ios_17_speaks_it(
    resumable: Server, recording: bytes, uninterrupted: dict[str, Any]
) -> None:
    url = f"{resumable.url}{WINDOW}"
    location = started(
        await create(url, recording, headers=alice(), version=3, cut_after_bytes=400_000)
    )
    where = await offset(location, headers=alice(), version=3)
    assert where.headers["upload-incomplete"] == "?1"
    done = await append(
        location, recording[where.offset :], where.offset, headers=alice(), version=3
    )
    assert done.status == 200, done.body
    assert done.json()["transcription"] == uninterrupted["transcription"]
    assert done.headers["upload-incomplete"] == "?0"


async def test_offsets_that_do_not_match_are_refused_and_nothing_is_lost(
    resumable: Server, recording: bytes, uninterrupted: dict[str, Any]
) -> None:
    location = started(
        await create(
            f"{resumable.url}{WINDOW}", recording, headers=alice(), cut_after_bytes=600_000
        )
    )
    where = await offset(location, headers=alice(), version=6)
    for wrong in (where.offset + 1000, where.offset - 1000, len(recording) + 5):
        refused = await append(location, recording[wrong:], wrong, headers=alice(), version=6)
        assert refused.status == 409, refused.body
        assert refused.json()["code"] == "upload_offset_mismatch"
        assert refused.headers["upload-offset"] == str(where.offset)
    done = await append(
        location, recording[where.offset :], where.offset, headers=alice(), version=6
    )
    assert done.status == 200
    assert done.json()["transcription"] == uninterrupted["transcription"]


async def test_someone_elses_upload_is_as_unknown_as_a_guessed_one(
    resumable: Server, recording: bytes
) -> None:
    location = started(
        await create(
            f"{resumable.url}{WINDOW}", recording, headers=alice(), cut_after_bytes=300_000
        )
    )
    bob = {**auth_header(TOKEN_USERS["bob"]), "Content-Type": "audio/wav"}
    guessed = location.rsplit("/", 1)[0] + "/" + secrets.token_urlsafe(24)
    for where, who in ((location, bob), (guessed, alice())):
        head = await offset(where, headers=who, version=6)
        assert head.status == 404
        patch = await append(where, recording[:1000], 0, headers=who, version=6)
        assert patch.status == 404
        assert patch.json()["code"] == "upload_not_found"
        assert await cancel(where, headers=who, version=6) == 404
    nobody = await offset(location, headers={}, version=6)
    assert nobody.status == 401
    assert await cancel(location, headers=alice(), version=6) == 204
    resumable.wait_idle(15)


async def test_an_upload_not_resumed_within_the_grace_is_gone_and_cleaned_up(
    make_server: Any, recording: bytes
) -> None:
    server = make_server(VRAI_RESUME_GRACE_SECONDS="1", VRAI_DEBUG_STORE="off")
    location = started(
        await create(
            f"{server.url}{WINDOW}",
            recording,
            headers={"Content-Type": "audio/wav"},
            cut_after_bytes=500_000,
        )
    )
    await anyio.sleep(2.5)
    head = await offset(location, headers={}, version=6)
    assert head.status == 410
    late = await append(location, recording[500_000:], 500_000, headers={}, version=6)
    assert late.status == 410
    assert late.json()["code"] == "upload_expired"
    server.wait_idle(15)
    jobs = [e for e in server.request_logs() if e.get("endpoint") == "transcriptions"]
    assert [e["code"] for e in jobs] == ["client_disconnected"]
    metrics = httpx.get(f"{server.url}/metrics").text  # noqa: ASYNC210 (a test)
    assert 'vrai_uploads_ended_total{reason="expired"} 1.0' in metrics


async def test_a_flood_of_abandoned_uploads_stays_bounded(
    make_server: Any, recording: bytes
) -> None:
    server = make_server(VRAI_RESUME_MAX_WAITING="2", VRAI_RESUME_GRACE_SECONDS="30")
    locations = []
    for _ in range(5):
        location = started(
            await create(
                f"{server.url}{WINDOW}",
                recording,
                headers={"Content-Type": "audio/wav"},
                cut_after_bytes=200_000,
            )
        )
        locations.append(location)
        await anyio.sleep(0.3)
    await anyio.sleep(0.5)
    statuses = [(await offset(location, headers={}, version=6)).status for location in locations]
    assert statuses == [410, 410, 410, 204, 204]
    for location in locations[3:]:
        assert await cancel(location, headers={}, version=6) == 204
    server.wait_idle(15)
    metrics = httpx.get(f"{server.url}/metrics").text  # noqa: ASYNC210 (a test)
    assert 'vrai_uploads_ended_total{reason="evicted"} 3.0' in metrics
    assert 'vrai_uploads_ended_total{reason="cancelled"} 2.0' in metrics


# --- two machines behind Fly's proxy -------------------------------------------------------


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    base = tmp_path_factory.mktemp("fly")
    servers = start_servers(
        {
            name: (base / name, {"FLY_MACHINE_ID": name, "VRAI_TRANSCRIBE_MODE": "whole"})
            for name in ("m1", "m2")
        }
    )
    yield servers
    for server in servers.values():
        server.stop()


def addresses(servers: dict[str, Server]) -> dict[str, tuple[str, int]]:
    return {name: ("127.0.0.1", httpx.URL(s.url).port or 0) for name, s in servers.items()}


async def begin_on_m1(proxy: FlyProxy, recording: bytes, *, cut_after_bytes: int) -> str:
    """An upload begun through the proxy on machine m1, its connection cut: its resume URL."""
    proxy.route_next("m1")
    attempt = await create(
        f"{proxy.url}{WINDOW}",
        recording,
        headers={"Content-Type": "audio/wav"},
        cut_after_bytes=cut_after_bytes,
    )
    location = started(attempt)
    assert "/v1/uploads/m1/" in location
    return location


async def test_a_resume_that_reaches_another_machine_completes_on_the_first(
    machines: dict[str, Server], recording: bytes, uninterrupted: dict[str, Any]
) -> None:
    async with FlyProxy(addresses(machines)) as proxy:
        location = await begin_on_m1(proxy, recording, cut_after_bytes=700_000)
        proxy.route_next("m2")  # the resume lands on the other machine
        where = await offset(location, headers={}, version=6)
        assert where.status == 204
        # The HEAD's replay was cached: the PATCH, its body over Fly's 1 MB replay limit,
        # goes straight to m1.
        done = await append(
            location, recording[where.offset :], where.offset, headers={}, version=6
        )
        assert done.status == 200, done.body
        assert done.json()["transcription"] == uninterrupted["transcription"]
        hops = [(hop.method, hop.machine, hop.replayed_from, hop.note) for hop in proxy.log]
        assert ("HEAD", "m1", "m2") in [hop[:3] for hop in hops], hops
        assert ("PATCH", "m1", "m2", "replay cache") in hops, hops  # m2 never saw it
        assert not proxy.errors
    job = machines["m1"].request_log(done.json()["requestId"])
    assert job["uploadResumptions"] == 1
    assert not [e for e in machines["m2"].request_logs() if e.get("endpoint") == "transcriptions"]
    for server in machines.values():
        server.wait_idle(15)


async def test_a_resume_for_a_machine_that_stopped_is_told_to_start_over(
    tmp_path: Path, recording: bytes
) -> None:
    servers = start_servers(
        {name: (tmp_path / name, {"FLY_MACHINE_ID": name}) for name in ("m1", "m2")}
    )
    try:
        async with FlyProxy(addresses(servers)) as proxy:
            location = await begin_on_m1(proxy, recording, cut_after_bytes=300_000)
            servers["m1"].stop()
            proxy.route_next("m2")
            head = await offset(location, headers={}, version=6)
            assert head.status == 404
            proxy.route_next("m2")
            patch = await append(
                location, recording[300_000:400_000], 300_000, headers={}, version=6
            )
            assert patch.status == 404
            assert patch.json()["code"] == "upload_not_found"
            assert "start" in patch.json()["message"] or "again" in patch.json()["message"]
    finally:
        for server in servers.values():
            server.stop()


async def test_a_path_cannot_add_fields_to_the_replay(machines: dict[str, Server]) -> None:
    """The machine in the path goes into `fly-replay`: only a machine id may."""
    fields = {"Upload-Draft-Interop-Version": "6"}
    async with httpx.AsyncClient(base_url=machines["m2"].url) as client:
        fine = await client.head("/v1/uploads/m1/abc", headers=fields)
        assert fine.status_code == 421
        assert fine.headers["fly-replay"] == "instance=m1;timeout=5s;fallback=force_self"
        for machine in ("m1;app=other-app", "m1%3Bapp%3Dother-app", "m1%0d%0aX-Evil:%201"):
            hostile = await client.patch(
                f"/v1/uploads/{machine}/abc",
                content=b"x",
                headers={**fields, "Upload-Offset": "0"},
            )
            assert hostile.status_code == 404, machine
            assert hostile.json()["code"] == "upload_not_found"
            assert "fly-replay" not in hostile.headers
            assert "x-evil" not in hostile.headers


# --- the current draft: interop versions 7 and 8 ---------------------------------------------


def max_body_bytes(server: Server) -> int:
    return Settings.from_env(server.env).max_body_bytes


@pytest.mark.parametrize("version", [7, 8])
async def test_the_current_draft_gives_length_and_limits_and_resumes(
    resumable: Server, recording: bytes, uninterrupted: dict[str, Any], version: int
) -> None:
    """As the draft's text has it: the 104 carries `Location` and `Upload-Limit`; `HEAD`
    answers offset, completeness, length, limits and `no-store`; the append completes it."""
    url = f"{resumable.url}{WINDOW}"
    attempt = await create(
        url, recording, headers=alice(), version=version, cut_after_bytes=len(recording) // 2
    )
    location = started(attempt)
    grace = float(resumable.env["VRAI_RESUME_GRACE_SECONDS"])
    assert attempt.limits == {"max-size": max_body_bytes(resumable), "max-age": int(grace)}

    where = await offset(location, headers=alice(), version=version)
    assert (where.status, where.complete, where.length) == (204, False, len(recording))
    assert 0 < where.offset <= len(recording) // 2
    assert where.limits["max-size"] == max_body_bytes(resumable)
    assert 0 < where.limits["max-age"] <= grace  # what is left of the grace
    assert where.headers["cache-control"] == "no-store"
    assert where.headers["upload-draft-interop-version"] == str(version)

    done = await append(
        location, recording[where.offset :], where.offset, headers=alice(), version=version
    )
    assert done.status == 200, done.body
    assert done.json()["transcription"] == uninterrupted["transcription"]
    assert done.headers["upload-complete"] == "?1"
    # The id came with the 104, long before the answer: the answer is that request's.
    assert done.json()["requestId"] == attempt.interim["x-request-id"]
    after = await offset(location, headers=alice(), version=version)
    assert (after.status, after.complete, after.offset, after.length) == (
        204,
        True,
        len(recording),
        len(recording),
    )
    resumable.wait_idle(15)


@pytest.mark.parametrize(
    "path", ["/v1/transcriptions", "/v1/audio/transcriptions", "/trim-and-transcribe"]
)
async def test_options_announces_resumable_uploads_and_their_limits(
    resumable: Server, path: str
) -> None:
    reply = await options(f"{resumable.url}{path}", headers={})
    assert reply.status == 204
    assert "application/partial-upload" in reply.headers["accept-patch"]
    settings = Settings.from_env(resumable.env)
    expected = settings.max_body_bytes if path == "/v1/transcriptions" else None
    assert reply.limits["max-size"] == (expected or settings.max_encoded_body_bytes)
    assert reply.limits["max-age"] == int(float(resumable.env["VRAI_RESUME_GRACE_SECONDS"]))
    assert "8" in reply.headers["upload-draft-interop-version"]


async def test_an_upload_longer_than_its_limit_is_refused_before_its_body(
    resumable: Server,
) -> None:
    too_long = max_body_bytes(resumable) + 1
    fields = {**alice(), "Upload-Draft-Interop-Version": "8", "Upload-Complete": "?1"}
    fields["Upload-Length"] = str(too_long)
    attempt = await exchange("POST", f"{resumable.url}{WINDOW}", fields, [b"RIFF" * 1000])
    assert attempt.status == 413, attempt.body
    assert attempt.location is None, "an upload was made for a body it will refuse"
    assert attempt.json()["code"] == "body_too_large"


def test_the_limits_field_is_read_as_the_draft_says() -> None:
    assert parse_limits("max-size=10, max-age=60, future=?1") == {"max-size": 10, "max-age": 60}
    assert parse_limits('max-size="10", max-age=60') == {}, "a known key of the wrong type"
    assert parse_limits(None) == {}
