"""Faults injected into a running server: each ends in a clear answer, in time, leaving nothing.

* ffmpeg killed (SIGKILL, as the kernel's OOM killer does) in the middle of a job, while it
  reads a chunked upload from its stdin, and while it decodes a seekable file from the spool:
  the user gets one clear JSON error, the rest of the body is still read, nothing is left.
* The spool's disk full: over `VRAI_SPOOL_DISK_TOTAL_BYTES`, and for real (`ENOSPC`) on a
  2 MB tmpfs mounted for the test, for the input spool (seekable layouts) and the output
  spool, including the write that only fails when the last buffered bytes are flushed.
  Where no tmpfs can be mounted (no root), the same checks run against the setting instead.
* Uploads that stall, in every body shape (raw stream, seekable spool, sized, legacy JSON,
  legacy multipart, no byte at all): `408` once `VRAI_IDLE_TIMEOUT_SECONDS` is up, not before,
  and not much later.
* An upstream that hangs: `504` within the SDK's per-attempt timeout times its attempts, or
  within `VRAI_OPENAI_DEADLINE_SECONDS`, whichever is shorter; the fake's record shows when
  each attempt was given up.
* The event loop under load: a separate process polls `/health` every 10 ms while 8 uploads
  run at once, twice over (seekable and stream layouts, legacy JSON base64 and multipart, S3
  debug copies in 5 MiB parts, transcription through the `openai` SDK).  The poller splits
  each answer's latency using the kernel's accounting: waiting for a CPU (this machine's load,
  not the server's doing), and the rest, the loop blocked by a step (starting an ffmpeg
  included), which must stay under 100 ms; so must the loop's CPU time per poll.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

from .support.audio import SENTENCE_WORDS, has_words
from .support.client import chunked, form_body, posting
from .support.fake_openai import FakeOpenAI
from .support.phone_media import PhoneFile, phone_files
from .support.s3_server import (
    MotoServer,
    new_bucket,
    no_transcriber,
    s3_client,
    s3_env,
    wait_no_multipart,
    wait_ready,
)
from .support.server import Server, start_server, start_servers
from .test_errors import (
    CHUNKED,
    ENDPOINT,
    RawResponse,
    assert_error,
    assert_raw_error,
    chunk_frame,
    gated,
    raw_connection,
    read_response,
    request_head,
)

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
IDLE_SECONDS = 1.0
UPSTREAM_KEY = "sk-faults-upstream"
BOUNDARY = "----vrai-faults-b6c1"
DISK_CAP = 7_000_000
"""Room for one 6.5 MB seekable spool, not for two, nor for a 7.7 MB one."""
MP3 = {"Accept": "audio/mpeg"}


@pytest.fixture(scope="session")
def phones(media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhoneFile]:
    # The same folder as test_phone_formats': the matrix is built once per session.
    return phone_files(tmp_path_factory.getbasetemp() / "phones", media / "sentence.wav")


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Short idle timeout, a disk cap for spools, and no transcriber to warm up."""
    running = start_server(
        tmp_path_factory.mktemp("faults"),
        {
            **no_transcriber(),
            "VRAI_IDLE_TIMEOUT_SECONDS": f"{IDLE_SECONDS:g}",
            "VRAI_SPOOL_DISK_TOTAL_BYTES": str(DISK_CAP),
        },
    )
    yield running
    running.stop()


def error_of(response: httpx.Response | RawResponse) -> tuple[int, str]:
    if isinstance(response, httpx.Response):
        return response.status_code, response.json().get("code", "")
    return response.status, response.json().get("code", "")


def assert_clear_message(message: str, server: Server) -> None:
    """A sentence for people: no internals, no paths, no tracebacks."""
    assert message and message[0].isupper(), message
    for noise in ("Traceback", "0x", "pipe:", "file:", "Errno", "vrai-", str(server.tmp_dir)):
        assert noise not in message, f"{noise!r} in a user-facing message: {message}"


# --- ffmpeg killed mid-job -----------------------------------------------------------------------


def ffmpeg_children(server: Server) -> list[psutil.Process]:
    found = []
    for child in server.children():
        try:
            if "ffmpeg" in child.name() or any("ffmpeg" in part for part in child.cmdline()[:4]):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


async def kill_ffmpeg_when_it_runs(server: Server, within: float = 10.0) -> int:
    """SIGKILL the job's ffmpeg as soon as it shows up; returns its pid."""
    with anyio.fail_after(within):
        while True:
            running = ffmpeg_children(server)
            if running:
                running[0].send_signal(signal.SIGKILL)
                return running[0].pid
            await anyio.sleep(0.002)


# Which answer a killed ffmpeg gets.  Today: 422 undecodable_audio ("The audio could not be
# decoded"), which tells the user their recording is bad and not to retry, and files the
# debug copy as an undecodable input, though nothing was wrong with it.  A SIGKILL the
# service did not send is the machine's fault (the OOM killer): it should be a 503 with
# Retry-After (the proposed `transcode_interrupted`).  Both are accepted here; see the report.
KILLED_ANSWERS = {(422, "undecodable_audio"), (503, "transcode_interrupted")}


async def test_ffmpeg_killed_while_reading_a_chunked_upload(
    limits_server: Server, media: Path
) -> None:
    server = limits_server
    tone = (media / "tone60.wav").read_bytes()  # 60 s: ffmpeg needs all of it for the window
    release = anyio.Event()
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=60) as client,
        posting(
            client,
            f"{ENDPOINT}?fromTime=0&toTime=60",
            content=gated(tone, first=512 * 1024, gate=release),
            headers=MP3,
        ) as upload,
    ):
        killed = await kill_ffmpeg_when_it_runs(server)
        await anyio.sleep(0.2)
        assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == "zombie"
        release.set()  # the rest of the body goes up after the kill, and must be read

    response = upload.response
    status, code = error_of(response)
    assert (status, code) in KILLED_ANSWERS, response.text
    assert_error(
        response.status_code, response.headers, response.json(), expected=status, code=code
    )
    assert_clear_message(response.json()["message"], server)
    server.wait_idle()
    [line] = [
        entry
        for entry in server.request_logs()
        if entry["requestId"] == response.headers["x-request-id"]
    ]
    assert line["inputSize"] == len(tone), "the body must be read to its end after the kill"


async def test_ffmpeg_killed_while_decoding_a_seekable_spool(
    limits_server: Server, phones: dict[str, PhoneFile]
) -> None:
    """moov after mdat: the body goes to the spool and its audio streams to ffmpeg, which is
    killed while it decodes (a window 200-500 s into a 9-minute recording keeps it busy for a
    while): a server's fault, answered as one, not decoded again from the spool."""
    server = limits_server
    m4a = phones["m4a-moov-last"].read()
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=60) as client,
        posting(
            client, f"{ENDPOINT}?fromTime=200&toTime=500", content=chunked(m4a), headers=MP3
        ) as upload,
    ):
        await kill_ffmpeg_when_it_runs(server, within=30)
    response = upload.response
    status, code = error_of(response)
    assert (status, code) in KILLED_ANSWERS, response.text
    assert_clear_message(response.json()["message"], server)
    server.wait_idle()


# --- the spool's disk full -------------------------------------------------------------------


async def post_mp3(client: httpx.AsyncClient, query: str, data: bytes) -> httpx.Response:
    """POST `data` chunked for the window's MP3: an MP3 answer goes through the output spool."""
    return await client.post(f"{ENDPOINT}?{query}", content=chunked(data), headers=MP3)


def assert_disk_full(response: httpx.Response, server: Server) -> None:
    """A full disk must be a clear 507 that leaves nothing behind, whichever spool filled it."""
    assert error_of(response) == (507, "disk_full"), response.text
    assert_clear_message(response.json()["message"], server)
    server.wait_idle()


async def full_then_fits(server: Server, full: tuple[str, bytes], fits: tuple[str, bytes]) -> None:
    """(query, body) that overflows the disk, then one that fits: a failed job frees its room."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        assert_disk_full(await post_mp3(client, *full), server)
        fitted = await post_mp3(client, *fits)
    assert fitted.status_code == 200, fitted.text
    server.wait_idle()


async def test_disk_cap_setting_is_507_mid_upload_and_gives_its_share_back(
    limits_server: Server, phones: dict[str, PhoneFile]
) -> None:
    """Over VRAI_SPOOL_DISK_TOTAL_BYTES (7 MB): one upload too large, two that fit only one
    at a time; then each share is back and a large seekable upload fits again."""
    server = limits_server
    too_large = phones["caf-alac"].read()  # 7.7 MB
    pair = [phones["m4a-moov-last"].read(), phones["caf-aac-pakt-last"].read()]  # 6.5 MB each
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        assert_disk_full(await post_mp3(client, "fromTime=0&toTime=4", too_large), server)

        answers: list[httpx.Response] = []

        async def collect(data: bytes) -> None:
            answers.append(await post_mp3(client, "fromTime=0&toTime=4", data))

        async with anyio.create_task_group() as group:
            for data in pair:
                group.start_soon(collect, data)
        outcomes = sorted(error_of(a) if a.status_code != 200 else (200, "") for a in answers)
        assert (507, "disk_full") in outcomes, outcomes
        assert set(outcomes) <= {(200, ""), (507, "disk_full")}, outcomes
        server.wait_idle()

        # Every failed job gave its share back: a 6.5 MB spool fits again, twice in a row.
        for data in pair:
            fits = await post_mp3(client, "fromTime=0&toTime=4", data)
            assert fits.status_code == 200, fits.text
    server.wait_idle()


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _unmount(folder: Path) -> None:
    for args in (["umount", str(folder)], ["umount", "-l", str(folder)]):
        if subprocess.run(args, capture_output=True, timeout=10).returncode == 0:
            return


class SmallDisk:
    """A server whose spools live on a 2 MB tmpfs, filled until `leave_free` bytes are left.

    Without root (no mount), `VRAI_SPOOL_DISK_TOTAL_BYTES` stands in for the small disk, at
    the same room: the same answers are checked, through the budget instead of ENOSPC.
    """

    def __init__(self, base: Path, leave_free: int | None = None) -> None:
        self.root = base / "small-disk"
        self.mounted = _mount_tmpfs(self.root, "2m")
        if not self.mounted:
            self.root.mkdir(parents=True, exist_ok=True)
            print("no tmpfs could be mounted here: VRAI_SPOOL_DISK_TOTAL_BYTES stands in")
        self.spool = self.root / "spool"
        self.spool.mkdir()
        env = {
            **no_transcriber(),
            "VRAI_TMP_DIR": str(self.spool),
            "VRAI_SPOOL_MEMORY_BYTES": "0",  # every MP3 goes to the small disk too
        }
        if not self.mounted:
            room = 2 * MiB if leave_free is None else max(1, leave_free)
            env["VRAI_SPOOL_DISK_TOTAL_BYTES"] = str(room)
        self.ballast = self.root / "ballast"
        try:
            self.server = start_server(base / "small-disk-server", env)
        except BaseException:
            self._unmount()
            raise
        self.server.tmp_dir = self.spool  # so wait_idle() looks where the spools are
        if self.mounted and leave_free is not None:
            # Outside the spool folder, so nothing the server made is mistaken for it.
            with self.ballast.open("wb") as file:
                file.write(b"\0" * max(0, self.free_bytes() - leave_free))

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def _unmount(self) -> None:
        if self.mounted:
            _unmount(self.root)

    def close(self) -> None:
        self.server.stop()
        self.ballast.unlink(missing_ok=True)
        self._unmount()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[..., SmallDisk]]:
    made: list[SmallDisk] = []

    def make(leave_free: int | None = None) -> SmallDisk:
        made.append(SmallDisk(tmp_path / f"disk{len(made)}", leave_free))
        return made[-1]

    yield make
    for disk in made:
        disk.close()


async def test_real_enospc_on_the_input_spool_is_507(
    small_disk: Callable[..., SmallDisk], phones: dict[str, PhoneFile]
) -> None:
    disk = small_disk()
    server = disk.server
    large = phones["caf-aac-pakt-last"].read()  # 6.5 MB, seekable: spooled before ffmpeg
    # The failed job's file is gone, so the disk has room again.
    await full_then_fits(
        server, ("fromTime=0&toTime=4", large), ("fromTime=0&toTime=4", phones["3gp-amr"].read())
    )
    if disk.mounted:
        assert disk.free_bytes() > 1.9 * MiB, "the spool files were not freed"


async def test_real_enospc_on_the_output_spool_is_507(
    small_disk: Callable[..., SmallDisk], media: Path
) -> None:
    """The MP3 rolls to disk at once (no spool memory); the disk has 100 KB left for it.

    60 s of MP3 is 240 KB or more (32 kbps and up): the spool's writes fail with ENOSPC part
    way; a 5 s window's 20-30 KB fits afterwards, in the room the failed job gave back.
    """
    disk = small_disk(leave_free=100 * 1024)
    server = disk.server
    tone = (media / "tone60.wav").read_bytes()
    await full_then_fits(server, ("fromTime=0&toTime=60", tone), ("fromTime=0&toTime=5", tone))


async def test_enospc_at_the_output_spools_last_flush_is_507_not_500(
    small_disk: Callable[..., SmallDisk], media: Path
) -> None:
    """ENOSPC that surfaces only when the spool's buffered bytes are flushed (when it is
    rewound to be read) must be a 507 too, never a 500; and a full disk is not a failure to
    delete a spool file (no warning, no `vrai_cleanup_failures_total`).

    0.3 s of MP3 is about 11 frames (1.6 KB at 32 kbps, 2.4 KB at 48), which ffmpeg writes
    at once when it ends: the spool's file takes it into its buffer (a 4 KiB block on tmpfs)
    without touching the disk, and the disk (filled to the last byte here) is only asked for
    room at the rewind.
    """
    disk = small_disk(leave_free=0)
    server = disk.server
    tone = (media / "tone60.wav").read_bytes()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await post_mp3(client, "fromTime=0&toTime=0.3", tone[:400_000])
        metrics = (await client.get("/metrics")).text
    assert_disk_full(response, server)
    failures = [
        entry
        for entry in server.logs()
        if entry.get("level") in ("error", "warning") and "spool" in entry.get("message", "")
    ]
    assert failures == [], "a full disk is not a failure to delete a spool file"
    assert "vrai_cleanup_failures_total 0.0" in metrics, "a full disk counted as a cleanup failure"


# --- uploads that stall ------------------------------------------------------------------------


def _form(fields: dict[str, str], file_field: str, audio: bytes) -> bytes:
    """A phone's M4A upload as a multipart form, for the endpoints that take one."""
    return form_body(
        BOUNDARY, fields, file_field, audio, filename="note.m4a", content_type="audio/mp4"
    )


def stalled_uploads(media: Path, phones: dict[str, PhoneFile]) -> dict[str, tuple[bytes, bytes]]:
    """name -> (request head, the body bytes sent before the stall)."""
    tone = (media / "tone60.wav").read_bytes()
    m4a = phones["m4a-moov-last"].read()
    b64 = base64.b64encode(tone).decode()
    legacy_json = ('{"fromTime": 0, "toTime": 5, "fileBlob": "' + b64).encode()
    form = _form({"fromTime": "0", "toTime": "5"}, "audio", tone)
    multipart = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    return {
        "stream": (request_head(ENDPOINT, CHUNKED), chunk_frame(tone[:200_000])),
        "seekable-spool": (request_head(ENDPOINT, CHUNKED), chunk_frame(m4a[:1_000_000])),
        "sized": (
            request_head(ENDPOINT, {"Content-Length": str(len(tone))}),
            tone[:300_000],
        ),
        "no-byte-yet": (request_head(ENDPOINT, CHUNKED), b""),
        "legacy-json": (
            request_head("/trim-and-transcribe", {**CHUNKED, "Content-Type": "application/json"}),
            chunk_frame(legacy_json[:150_000]),
        ),
        "legacy-multipart": (
            request_head("/trim-and-transcribe-multipart", {**CHUNKED, **multipart}),
            chunk_frame(form[:250_000]),
        ),
    }


async def test_every_kind_of_stalled_upload_is_408_when_the_idle_time_is_up(
    limits_server: Server, media: Path, phones: dict[str, PhoneFile]
) -> None:
    server = limits_server
    slack = 1.0  # a loaded 2-core machine: the timer fires late, never early
    results: dict[str, tuple[RawResponse, float]] = {}

    async def stall(name: str, head: bytes, body: bytes) -> None:
        async with raw_connection(server) as stream:
            await stream.send(head + body)
            stalled_at = anyio.current_time()
            response = await read_response(stream, within=IDLE_SECONDS + 10)
            results[name] = (response, anyio.current_time() - stalled_at)

    async with anyio.create_task_group() as group:
        for name, (head, body) in stalled_uploads(media, phones).items():
            group.start_soon(stall, name, head, body)

    for name, (response, waited) in sorted(results.items()):
        assert_raw_error(response, expected=408, code="upload_timeout")
        assert waited >= IDLE_SECONDS - 0.1, f"{name}: 408 after {waited:.2f} s, too early"
        assert waited < IDLE_SECONDS + slack, (
            f"{name}: 408 came {waited:.2f} s after the last byte; the idle time is "
            f"{IDLE_SECONDS:g} s"
        )
        print(f"{name}: 408 after {waited:.2f} s of silence")
    server.wait_idle()


# --- an upstream that hangs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


PER_ATTEMPT = {"timeout": 1.0, "retries": 1, "deadline": 30.0}
DEADLINE = {"timeout": 30.0, "retries": 2, "deadline": 1.5}


def openai_env(fake: FakeOpenAI, limits: dict[str, float]) -> dict[str, str]:
    return {
        **fake.server_env(),
        "VRAI_OPENAI_TIMEOUT_SECONDS": f"{limits['timeout']:g}",
        "VRAI_OPENAI_MAX_RETRIES": f"{limits['retries']:g}",
        "VRAI_OPENAI_DEADLINE_SECONDS": f"{limits['deadline']:g}",
    }


@pytest.fixture(scope="module")
def hang_servers(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI
) -> Iterator[dict[str, Server]]:
    base = tmp_path_factory.mktemp("hang")
    servers = start_servers(
        {
            "per-attempt": (base / "per-attempt", openai_env(upstream, PER_ATTEMPT)),
            "deadline": (base / "deadline", openai_env(upstream, DEADLINE)),
        }
    )
    for server in servers.values():
        wait_ready(server)
    yield servers
    for server in servers.values():
        server.stop()


async def transcribe_timed(server: Server, audio: bytes) -> tuple[httpx.Response, float]:
    """POST a small sized body; seconds from the request to the answer."""
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        started = anyio.current_time()
        response = await client.post(f"{ENDPOINT}?fromTime=0&toTime=8", content=audio)
        return response, anyio.current_time() - started


def transcribe_seconds(server: Server, request_id: str) -> float:
    [line] = [entry for entry in server.request_logs() if entry["requestId"] == request_id]
    return float(line["timings"]["transcribe"])


def settled_attempts(fake: FakeOpenAI, within: float = 5.0) -> list[Any]:
    """The fake's records once every attempt is over (it notices a gone client within 50 ms)."""
    deadline = time.monotonic() + within
    while True:
        attempts = fake.transcription_requests
        if all(a.answered_at is not None for a in attempts) or time.monotonic() > deadline:
            return attempts
        time.sleep(0.02)


async def prime_the_fakes_cache(server: Server, fake: FakeOpenAI, audio: bytes) -> None:
    """Have the fake transcribe this request's audio once, exactly as the service sends it
    (its segments, as WAV), so a later attempt is answered from its cache at once: a 1 s
    per-attempt timeout measures the timeout, not how long Whisper takes on a loaded machine.
    The priming call has that timeout too: on a busy machine it may run out, and the fake
    keeps what it heard all the same, so the next try is answered from the cache."""
    for _ in range(5):
        response, _ = await transcribe_timed(server, audio)
        if response.status_code != 504:
            break
        await anyio.sleep(1.0)  # the fake is still hearing the attempt the SDK gave up
    assert response.status_code == 200, response.text
    assert fake.transcription_requests, "the service never called the fake"


async def hung_upstream_504(
    server: Server, upstream: FakeOpenAI, media: Path
) -> tuple[float, list[Any]]:
    """The 504 when no attempt is ever answered: seconds spent transcribing, attempts made."""
    upstream.reset()
    upstream.hang(60, times=None, status=500)  # answers (to nobody) once the SDK gave up
    response, _ = await transcribe_timed(server, (media / "sentence.wav").read_bytes())
    assert_error(
        response.status_code,
        response.headers,
        response.json(),
        expected=504,
        code="transcription_timeout",
    )
    waited = transcribe_seconds(server, response.headers["x-request-id"])
    attempts = settled_attempts(upstream)
    upstream.reset()
    return waited, attempts


async def test_hanging_upstream_is_504_after_the_attempts_time_out(
    hang_servers: dict[str, Server], upstream: FakeOpenAI, media: Path
) -> None:
    """Timeout 1 s per attempt, 1 retry: 504 after 2 attempts of 1 s and the SDK's backoff."""
    server = hang_servers["per-attempt"]
    waited, attempts = await hung_upstream_504(server, upstream, media)
    # 2 attempts of 1 s each, and the SDK's backoff between them (0.375-1 s).
    timeout = PER_ATTEMPT["timeout"]
    assert 2 * timeout <= waited <= 2 * timeout + 1.0 + 1.0, waited
    assert len(attempts) == PER_ATTEMPT["retries"] + 1, attempts
    for attempt in attempts:
        assert attempt.client_disconnected, "the SDK should have given up on the attempt"
        gave_up_after = attempt.answered_at - attempt.received_at
        assert timeout - 0.1 <= gave_up_after <= timeout + 0.6, gave_up_after
    server.wait_idle()


async def test_one_hung_attempt_is_retried_and_the_request_succeeds(
    hang_servers: dict[str, Server], upstream: FakeOpenAI, media: Path
) -> None:
    server = hang_servers["per-attempt"]
    audio = (media / "sentence.wav").read_bytes()
    upstream.reset()
    await prime_the_fakes_cache(server, upstream, audio)
    upstream.reset()
    upstream.hang(60, times=1, status=500)
    response, _ = await transcribe_timed(server, audio)
    attempts = settled_attempts(upstream)
    upstream.reset()
    assert response.status_code == 200, response.text
    assert has_words(response.json()["transcription"], SENTENCE_WORDS, at_least=3)
    assert [attempt.client_disconnected for attempt in attempts] == [True, False]
    server.wait_idle()


async def test_hanging_upstream_is_504_at_the_deadline(
    hang_servers: dict[str, Server], upstream: FakeOpenAI, media: Path
) -> None:
    """Timeout 30 s per attempt but a 1.5 s deadline on the whole: 504 at 1.5 s."""
    server = hang_servers["deadline"]
    waited, attempts = await hung_upstream_504(server, upstream, media)
    assert DEADLINE["deadline"] - 0.05 <= waited <= DEADLINE["deadline"] + 0.5, waited
    assert len(attempts) == 1, "the deadline ends the first (and only) attempt"
    server.wait_idle()


# --- the event loop under load ---------------------------------------------------------------

POLLER = r"""
import http.client, json, os, sys, time
port, pid, stop_file, interval = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
thread = f"/proc/{pid}/task/{pid}"  # the server's main thread: its event loop
own_stat = f"/proc/{os.getpid()}/schedstat"

def sched(path):
    with open(path) as file:
        on_cpu, waiting, _ = file.read().split()
    return int(on_cpu), int(waiting)

conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
samples = []
while not os.path.exists(stop_file):
    server_before, own_before = sched(thread + "/schedstat"), sched(own_stat)
    sent = time.monotonic()
    conn.request("GET", "/health")
    conn.getresponse().read()
    received = time.monotonic()
    server_after, own_after = sched(thread + "/schedstat"), sched(own_stat)
    samples.append([
        sent,
        received,
        (server_after[0] - server_before[0]) / 1e9,  # the loop's thread on a CPU
        (server_after[1] - server_before[1]) / 1e9,  # ... runnable, waiting for a CPU
        (own_after[1] - own_before[1]) / 1e9,  # the poller waiting for a CPU
    ])
    time.sleep(interval)
json.dump(samples, sys.stdout)
"""
"""Polls `/health` every `interval` s until `stop_file` exists.  Per request: when it was
sent and answered; from /proc/PID/task/TID/schedstat, how long the server's event-loop thread
ran on a CPU and how long it and the poller sat runnable with no CPU."""


@dataclass
class LoopLag:
    latencies: list[float]
    stalls: list[float]
    """Per request: its latency less the time the server's loop thread and the poller were
    runnable but given no CPU: what the loop itself could have caused, computing or blocked
    in a system call.  The two waits are added: they fall at different times (the poller
    sleeps in `recv` while the server works, and is runnable only around it)."""
    loop_cpu: list[float]
    gaps: list[float]

    @classmethod
    def from_samples(cls, samples: list[list[float]], interval: float) -> LoopLag:
        latencies = [received - sent for sent, received, *_ in samples]
        stalls = [
            max(0.0, (received - sent) - server_wait - own_wait)
            for sent, received, _, server_wait, own_wait in samples
        ]
        gaps = [
            max(0.0, later[1] - earlier[1] - interval)
            for earlier, later in itertools.pairwise(samples)
        ]
        return cls(latencies, stalls, [s[2] for s in samples], gaps)

    @staticmethod
    def _ms(values: list[float], pct: float) -> str:
        ordered = sorted(values)
        return f"{1000 * ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]:.1f}"

    def describe(self) -> str:
        ms = self._ms
        return (
            f"{len(self.latencies)} polls of /health: latency p50 {ms(self.latencies, 50)} ms, "
            f"p99 {ms(self.latencies, 99)} ms, max {ms(self.latencies, 100)} ms (worst gap "
            f"beyond the 10 ms pause {ms(self.gaps, 100)} ms); less the waits for a CPU: p99 "
            f"{ms(self.stalls, 99)} ms, max {ms(self.stalls, 100)} ms; loop "
            f"thread on a CPU within one poll: p99 {ms(self.loop_cpu, 99)} ms, max "
            f"{ms(self.loop_cpu, 100)} ms"
        )


@pytest.fixture(scope="module")
def busy_server(
    tmp_path_factory: pytest.TempPathFactory, moto: MotoServer, upstream: FakeOpenAI
) -> Iterator[tuple[Server, Any, str]]:
    """S3 debug copies on (5 MiB parts), OpenAI transcription: every step a job can take."""
    s3 = s3_client(moto.url)
    bucket = new_bucket(s3)
    running = start_server(
        tmp_path_factory.mktemp("busy"),
        {**s3_env(moto.url, bucket), **openai_env(upstream, {"timeout": 60, "retries": 2,
                                                              "deadline": 150})},
    )  # fmt: skip
    wait_ready(running)
    yield running, s3, bucket
    running.stop()


def _legacy_json(audio: bytes, start: float, end: float) -> bytes:
    head = json.dumps({"fromTime": start, "toTime": end, "summarizationType": "none"})[:-1]
    return f'{head}, "fileBlob": "'.encode() + base64.b64encode(audio) + b'"}'


def load_mix(
    phones: dict[str, PhoneFile],
) -> list[tuple[str, str, dict[str, str], Callable[[], bytes | AsyncIterator[bytes]]]]:
    """Eight uploads: (name, path, headers, body factory)."""
    mp3 = {"Accept": "audio/mpeg"}
    form = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def raw(name: str, chunk: int = 64 * 1024) -> Callable[[], AsyncIterator[bytes]]:
        return lambda: chunked(phones[name].read(), chunk_size=chunk)

    return [
        ("m4a-moov-last (seekable, S3 parts)", f"{ENDPOINT}?fromTime=0&toTime=30", mp3,
         raw("m4a-moov-last")),
        ("caf-alac (seekable, S3 parts)", f"{ENDPOINT}?fromTime=0&toTime=30", mp3,
         raw("caf-alac")),
        ("caf-aac-pakt-last as legacy JSON base64", "/trim-and-transcribe",
         {"Content-Type": "application/json"},
         lambda: chunked(_legacy_json(phones["caf-aac-pakt-last"].read(), 0, 4))),
        ("webm-opus legacy multipart", "/trim-and-transcribe-multipart", form,
         lambda: _form({"fromTime": "0", "toTime": "4"}, "audio", phones["webm-opus"].read())),
        ("wav transcribed", f"{ENDPOINT}?fromTime=0&toTime=4", {}, raw("wav")),
        ("flac in 1 KiB chunks", f"{ENDPOINT}?fromTime=0&toTime=10", mp3, raw("flac", 1024)),
        ("caf-lpcm sized", f"{ENDPOINT}?fromTime=0&toTime=10", mp3,
         lambda: phones["caf-lpcm"].read()),
        ("mp4-fragmented stream", f"{ENDPOINT}?fromTime=0&toTime=10", mp3,
         raw("mp4-fragmented", 4096)),
    ]  # fmt: skip


@pytest.mark.alone
async def test_event_loop_is_never_blocked_under_load(
    busy_server: tuple[Server, Any, str],
    phones: dict[str, PhoneFile],
    tmp_path: Path,
) -> None:
    """No step of any job holds the event loop: /health answers within 100 ms throughout.

    On a shared machine the raw latency also carries the time the server's thread waited
    for a CPU that other processes (ffmpeg, other tests, other machines' work) held: the
    poller reads both threads' schedstat around each request, and asserts on what is left.
    Starting ffmpeg counts: asyncio and uvloop would fork on the loop and wait there for the
    exec (up to 700 ms seen on a starved CPU), so the service spawns from a worker thread.
    """
    server, s3, bucket = busy_server
    stop_file = tmp_path / "stop-polling"
    interval = 0.010
    poller = await anyio.open_process(
        [
            sys.executable, "-c", POLLER, str(httpx.URL(server.url).port),
            str(server.process.pid), str(stop_file), str(interval),
        ],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    statuses: dict[str, int] = {}
    output = bytearray()
    async with poller:

        async def collect() -> None:
            assert poller.stdout is not None
            async for chunk in poller.stdout:
                output.extend(chunk)

        async with anyio.create_task_group() as reader:
            reader.start_soon(collect)
            try:
                await anyio.sleep(0.5)  # a quiet baseline first
                async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

                    async def one(name: str, path: str, headers: dict[str, str], body: Any) -> None:
                        response = await client.post(path, content=body(), headers=headers)
                        statuses[name] = response.status_code

                    for _round in range(2):
                        async with anyio.create_task_group() as group:
                            for name, path, headers, body in load_mix(phones):
                                group.start_soon(one, name, path, headers, body)
                await anyio.sleep(0.3)
            finally:
                stop_file.touch()
            await poller.wait()
    assert statuses == {name: 200 for name, *_ in load_mix(phones)}, statuses
    lag = LoopLag.from_samples(json.loads(output), interval)
    print(lag.describe())
    assert len(lag.latencies) > 100, "the poller hardly ran"
    assert max(lag.loop_cpu) < 0.100, f"a step computed on the loop too long: {lag.describe()}"
    worst = max(lag.stalls)
    assert worst < 0.100, f"the event loop stalled for {worst * 1000:.0f} ms: {lag.describe()}"
    server.wait_idle()
    wait_no_multipart(s3, bucket, timeout=20)
