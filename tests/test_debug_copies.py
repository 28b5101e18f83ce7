"""Debug copies in S3, through the real server, against moto's S3 API on loopback.

What the phone sent and the MP3 it became are kept in the bucket while the request runs:
byte for byte, under keys that cannot leave their prefix, with their content types and the
request's metadata.  A failed request keeps error copies and answers with presigned links.
Whatever S3 does (dies mid-upload, refuses our credentials, crawls) the user's request is as
fast and as green as with copies off, and no multipart upload is left behind.

Most servers here answer `Accept: audio/mpeg` and never transcribe; they are configured with
an OpenAI transcriber whose API is not there (`NO_TRANSCRIBER`): it warms up in a fraction of
the local model's time and, when a JSON transcript is asked for, fails for real with
`transcription_failed`, a failure that comes after the MP3 exists.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import boto3
import httpx
import psutil
import pytest

from vrai_stream.debug_store.base import CopyContext, Keys, safe_segment
from vrai_stream.media.sniff import Layout, Mode
from vrai_stream.settings import Settings

from .support.audio import decoded_seconds, run_ffmpeg
from .support.resumable_client import Attempt, append, create, offset
from .support.s3_server import (
    GARBAGE,
    REGION,
    SECRET_ACCESS_KEY,
    MotoServer,
    PeakRss,
    Reply,
    ThrottlingProxy,
    disconnect_mid_upload,
    make_recordings,
    multipart_uploads,
    new_bucket,
    no_transcriber,
    objects,
    presigned_signature_ok,
    read_object,
    request_log,
    s3_client,
    s3_env,
    sha256,
    start_moto,
    upload,
    wait_for,
    wait_no_multipart,
    wait_ready,
    warnings,
)
from .support.server import Server, free_port, start_server

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
PART = 5 * MiB
STAMP = r"\d{8}T\d{6}Z"
NO_TRANSCRIBER = no_transcriber()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3(moto: MotoServer) -> Any:
    """The tests' own client, straight to moto (never through a test's proxy)."""
    return s3_client(moto.url)


@pytest.fixture
def bucket(s3: Any) -> str:
    return new_bucket(s3)


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[ThrottlingProxy]:
    """A transparent proxy to moto: it shows which S3 requests the server made."""
    with ThrottlingProxy(moto.url) as running:
        yield running


@pytest.fixture(scope="session")
def recordings(tmp_path_factory: pytest.TempPathFactory, media: Path) -> dict[str, bytes]:
    paths = make_recordings(tmp_path_factory.mktemp("recordings"), media / "sentence.wav")
    loaded = {name: path.read_bytes() for name, path in paths.items()}
    loaded["sentence.wav"] = (media / "sentence.wav").read_bytes()
    loaded["padded.wav"] = (media / "padded.wav").read_bytes()
    return loaded


LONG_TONE_SECONDS = 320
"""At 160 kb/s, the MP3 of this much audio is 6.4 MB: more than one 5 MiB part."""


@pytest.fixture(scope="session")
def long_tone(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 440 Hz tone over noise (noise: the transcriber is sent it, and fails), 8 kHz mono
    16-bit WAV: 5.1 MB, one PUT for the input's copy."""
    path = tmp_path_factory.mktemp("tone") / "tone.wav"
    run_ffmpeg(
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=8000:duration={LONG_TONE_SECONDS}",
        "-f", "lavfi", "-i", f"anoisesrc=r=8000:a=0.3:s=5:d={LONG_TONE_SECONDS}",
        "-filter_complex", "[0:a][1:a]amix=inputs=2:duration=first:normalize=0",
        "-ac", "1", "-c:a", "pcm_s16le", str(path),
    )  # fmt: skip
    return path.read_bytes()


@pytest.fixture(scope="module")
def off_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Copies off: the baseline every S3 failure's latency is held to."""
    running = start_server(
        tmp_path_factory.mktemp("off"), {"VRAI_DEBUG_STORE": "off", **NO_TRANSCRIBER}
    )
    wait_ready(running)
    yield running
    running.stop()


def s3_server(make_server: Any, endpoint: str, bucket: str, **extra: str) -> Server:
    server: Server = make_server(**s3_env(endpoint, bucket, **{**NO_TRANSCRIBER, **extra}))
    return server


# --- helpers --------------------------------------------------------------------------------


def copy_keys(s3: Any, bucket: str, request_id: str) -> dict[str, str]:
    """This request's objects by kind: `debug-input`, `error-output`, ..."""
    found = {}
    for key in objects(s3, bucket):
        if request_id in key:
            found["-".join(posixpath.basename(key).split("-")[:2])] = key
    return found


def wait_copies(
    s3: Any, bucket: str, request_id: str, kinds: set[str], timeout: float = 10.0
) -> dict[str, str]:
    def probe() -> dict[str, str] | None:
        found = copy_keys(s3, bucket, request_id)
        return found if kinds <= set(found) else None

    keys: dict[str, str] = wait_for(
        probe, timeout=timeout, what=f"copies {sorted(kinds)} of {request_id}"
    )
    return keys


def wait_outcome(s3: Any, bucket: str, key: str, outcome: str, timeout: float = 10.0) -> Any:
    """The object's head once its metadata says `outcome` (stamped just after the response)."""

    def probe() -> Any:
        head = s3.head_object(Bucket=bucket, Key=key)
        return head if head["Metadata"].get("outcome") == outcome else None

    return wait_for(probe, timeout=timeout, what=f"{key} to be stamped {outcome!r}")


async def fetch(url: str) -> httpx.Response:
    """A plain GET, as a developer's browser or curl would do with a link."""
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url)


def assert_fast(reply: Reply, baseline: Reply) -> None:
    """S3's trouble never reaches the user: as fast as with copies off, within a wide margin."""
    assert reply.status == 200, reply.content[:500]
    assert baseline.status == 200, baseline.content[:500]
    assert reply.seconds < 2 * baseline.seconds + 1.0, (reply.seconds, baseline.seconds)


def assert_presigned(url: str, endpoint: str, expiry: int) -> None:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert f"{parts.scheme}://{parts.netloc}" == endpoint, url
    assert query["X-Amz-Expires"] == [str(expiry)], url
    assert query["X-Amz-Signature"][0], url
    assert presigned_signature_ok(url, SECRET_ACCESS_KEY), f"not signed with our key: {url}"


def debug_objects_of(s3: Any, bucket: str, request_id: str) -> list[str]:
    return [key for key in objects(s3, bucket) if request_id in key]


# --- keys cannot leave their prefix ---------------------------------------------------------

HOSTILE = ["../", "..", "/", "", "../../etc/passwd", "a/../../b", "/abs", ".", "..\\..\\x"]
HOSTILE += ["üsér-名前", "\x00null", "%2e%2e%2f", " ", "user\nname", "x" * 500, ".hidden"]


@pytest.mark.parametrize("value", HOSTILE)
def test_safe_segment_is_one_harmless_path_segment(value: str) -> None:
    segment = safe_segment(value)
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", segment), segment
    assert segment not in (".", "..")
    assert not segment.startswith("."), segment


@pytest.mark.parametrize("user_id", HOSTILE)
def test_keys_stay_under_the_prefix(user_id: str) -> None:
    for prefix in ("", "debug/", "tenants/a/debug/"):
        context = CopyContext.now("../" + "r" * 32, user_id, 1.5, 9)
        keys = Keys.for_job(prefix, context, Layout("caf", Mode.SEEKABLE))
        hostile_code = "../x/y"
        every = [keys.input, keys.output, keys.error_input(hostile_code), keys.error_output("")]
        for key in every:
            assert key.startswith(prefix), key
            folder, _, name = key.removeprefix(prefix).partition("/")
            assert folder == safe_segment(user_id), key
            assert "/" not in name, key
            assert posixpath.normpath(key) == key, key
            assert ".." not in key.split("/"), key
        assert re.fullmatch(rf"debug-input-{STAMP}-r+\.caf", posixpath.basename(keys.input))
        assert re.fullmatch(rf"debug-output-{STAMP}-r+\.mp3", posixpath.basename(keys.output))
        error_name = posixpath.basename(keys.error_input(hostile_code))
        assert re.fullmatch(rf"error-input-{STAMP}-r+-x_y\.caf", error_name), error_name


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", ""), ("/", ""), ("debug", "debug/"), ("/debug/copies/", "debug/copies/")],
)
def test_prefix_setting_is_normalized(raw: str, expected: str) -> None:
    settings = Settings.from_env(
        {"VRAI_DEBUG_STORE": "s3", "VRAI_DEBUG_BUCKET": "b", "VRAI_DEBUG_PREFIX": raw}
    )
    assert settings.debug_prefix == expected


# --- what is kept, and how ------------------------------------------------------------------


async def test_small_upload_goes_up_in_one_put_whole_and_described(
    make_server: Any, proxy: ThrottlingProxy, s3: Any, bucket: str,
    recordings: dict[str, bytes], tmp_path: Path,
) -> None:  # fmt: skip
    """Under a part: one PUT.  A JSON transcript: the request id is its `requestId`."""
    audio = recordings["sentence.wav"]
    server = make_server(**s3_env(proxy.url, bucket))  # the local model transcribes
    reply = await upload(server, audio, window=(0, 10), mp3=False)
    assert reply.status == 200, reply.content
    body = reply.json()
    request_id = body["requestId"]

    keys = wait_copies(s3, bucket, request_id, {"debug-input", "debug-output"})
    assert re.fullmatch(rf"anonymous/debug-input-{STAMP}-{request_id}\.wav", keys["debug-input"])
    assert re.fullmatch(rf"anonymous/debug-output-{STAMP}-{request_id}\.mp3", keys["debug-output"])
    head = wait_outcome(s3, bucket, keys["debug-input"], "ok")
    assert sha256(read_object(s3, bucket, keys["debug-input"])) == sha256(audio)
    assert head["ContentType"] == "audio/wav"
    assert head["Metadata"] == {
        "request-id": request_id,
        "user-id": "anonymous",
        "from-time": "0",
        "to-time": "10",
        "format": "wav",
        "mode": "stream",
        "outcome": "ok",
    }
    # One PUT, then the stamp (a copy onto itself, with `outcome: ok`); never a multipart.
    assert proxy.requests_for(keys["debug-input"])[0] == "PUT"
    assert not any("upload" in line for line in proxy.requests_for(keys["debug-input"]))

    out = wait_outcome(s3, bucket, keys["debug-output"], "ok")
    assert out["ContentType"] == "audio/mpeg"
    assert out["Metadata"]["request-id"] == request_id
    mp3 = read_object(s3, bucket, keys["debug-output"])
    assert len(mp3) == body["fileSize"]
    assert abs(decoded_seconds(mp3, tmp_path) - body["duration"]) < 0.1
    assert multipart_uploads(s3, bucket) == []
    server.wait_idle()


async def test_upload_over_a_part_streams_up_in_parts_while_it_arrives(
    make_server: Any, proxy: ThrottlingProxy, s3: Any, bucket: str,
    recordings: dict[str, bytes], tmp_path: Path,
) -> None:  # fmt: skip
    """12 MB at a brisk phone's pace: 5 MiB parts go up while the body arrives, and the
    copy is byte for byte what was sent."""
    audio = recordings["12MB.wav"]
    server = s3_server(
        make_server, proxy.url, bucket,
        VRAI_DEBUG_PART_BYTES=str(PART), VRAI_DEBUG_BUFFER_BYTES=str(8 * MiB),
    )  # fmt: skip
    wait_ready(server)  # a cold S3 client takes a second or two: the buffer would fill
    parts_done_mid_upload: list[int] = []

    def look(sent: int) -> None:
        # From the first part's worth on, until one is seen: on a busy machine moto takes
        # its time over a 5 MiB part, and one look near the end could come just before it.
        if sent >= PART + MiB and not any(parts_done_mid_upload):
            uploads = multipart_uploads(s3, bucket)
            if not uploads:
                return  # not begun yet
            assert len(uploads) == 1, uploads
            listed = s3.list_parts(
                Bucket=bucket, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"]
            )
            parts_done_mid_upload.append(len(listed.get("Parts", [])))

    reply = await upload(server, audio, window=(2, 7), rate=6_000_000, on_sent=look)
    assert reply.status == 200, reply.content
    assert reply.headers["content-type"] == "audio/mpeg"
    assert any(parts_done_mid_upload), "no part went up mid-upload"
    request_id = reply.request_id
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)

    keys = wait_copies(s3, bucket, request_id, {"debug-input", "debug-output"})
    head = wait_outcome(s3, bucket, keys["debug-input"], "ok")
    assert head["ContentLength"] == len(audio)
    assert sha256(read_object(s3, bucket, keys["debug-input"])) == sha256(audio)
    assert head["ContentType"] == "audio/wav"
    assert head["Metadata"]["from-time"] == "2" and head["Metadata"]["to-time"] == "7"
    assert head["Metadata"]["request-id"] == request_id
    sent = proxy.requests_for(keys["debug-input"])
    assert sent[0] == "POST ?uploads", sent
    part_numbers = [re.search(r"partNumber=(\d+)", line) for line in sent]
    assert [int(found[1]) for found in part_numbers if found] == [1, 2, 3], sent  # 12 MB
    assert any(line.startswith("POST ?uploadId=") for line in sent), "never completed"

    wait_outcome(s3, bucket, keys["debug-output"], "ok")
    mp3 = read_object(s3, bucket, keys["debug-output"])
    assert mp3 == reply.content
    assert abs(decoded_seconds(mp3, tmp_path) - 5.0) <= 0.25
    assert multipart_uploads(s3, bucket) == []
    server.wait_idle()


async def test_an_mp3_over_a_part_streams_up_in_parts_as_ffmpeg_writes_it(
    make_server: Any, proxy: ThrottlingProxy, s3: Any, bucket: str, long_tone: bytes,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The MP3's copy is teed from ffmpeg's output as it is written, never read back whole:
    6.4 MB of it go up as a multipart upload, and the object is byte for byte the MP3 that
    `Accept: audio/mpeg` answered."""
    server = s3_server(make_server, proxy.url, bucket, VRAI_MP3_BITRATE_KBPS="160")
    wait_ready(server)
    reply = await upload(server, long_tone, window=(0, LONG_TONE_SECONDS))
    assert reply.status == 200, reply.content[:500]
    assert len(reply.content) > PART, len(reply.content)

    keys = wait_copies(s3, bucket, reply.request_id, {"debug-input", "debug-output"})
    out = wait_outcome(s3, bucket, keys["debug-output"], "ok")
    assert out["ContentType"] == "audio/mpeg"
    assert out["ContentLength"] == len(reply.content)
    mp3 = read_object(s3, bucket, keys["debug-output"])
    assert mp3 == reply.content
    assert abs(decoded_seconds(mp3, tmp_path) - LONG_TONE_SECONDS) <= 0.25
    sent = proxy.requests_for(keys["debug-output"])
    assert sent[0] == "POST ?uploads", sent
    part_numbers = [re.search(r"partNumber=(\d+)", line) for line in sent]
    assert [int(found[1]) for found in part_numbers if found] == [1, 2], sent
    assert any(line.startswith("POST ?uploadId=") for line in sent), "never completed"
    # The input (under a part) went up in one PUT, beside it.
    assert read_object(s3, bucket, keys["debug-input"]) == long_tone
    assert proxy.requests_for(keys["debug-input"])[0] == "PUT"
    assert multipart_uploads(s3, bucket) == []
    server.wait_idle()


async def test_an_unsampled_mp3_is_held_on_disk_and_kept_whole_when_the_job_fails(
    make_server: Any, moto: MotoServer, s3: Any, bucket: str, long_tone: bytes,
    tmp_path: Path,
) -> None:  # fmt: skip
    """VRAI_DEBUG_SAMPLE_RATE=0: the MP3, like the input, is held in a file until the outcome
    is known; the transcriber failing after it was written keeps it whole, the file goes.
    (The whole window is transcribed once ffmpeg is done: a segment failing mid-stream would
    end the job before its MP3 is whole, and an MP3 never whole keeps no copy.)"""
    server = s3_server(
        make_server, moto.url, bucket,
        VRAI_DEBUG_SAMPLE_RATE="0", VRAI_MP3_BITRATE_KBPS="160", VRAI_TRANSCRIBE_MODE="whole",
    )  # fmt: skip
    failed = await upload(server, long_tone, window=(0, LONG_TONE_SECONDS), mp3=False)
    assert failed.status == 502, failed.content
    body = failed.json()
    files = body["debugFiles"]
    assert set(files) == {"input", "output"}, files
    mp3 = (await fetch(files["output"])).content
    assert len(mp3) > PART, len(mp3)
    assert abs(decoded_seconds(mp3, tmp_path) - LONG_TONE_SECONDS) <= 0.25
    assert (await fetch(files["input"])).content == long_tone
    kept = objects(s3, bucket)
    assert all(posixpath.basename(key).startswith("error-") for key in kept), kept
    assert multipart_uploads(s3, bucket) == []
    server.wait_idle()  # the held files are gone


async def test_an_mp3_cut_short_by_ffmpeg_dying_aborts_its_multipart_upload(
    make_server: Any, moto: MotoServer, s3: Any, bucket: str, long_tone: bytes
) -> None:
    """ffmpeg is killed once the MP3's copy has begun a multipart upload: the job fails with
    the input's error copy, and nothing of the half MP3 stays in the bucket (its multipart
    upload aborted, no output or error-output object)."""
    server = s3_server(make_server, moto.url, bucket, VRAI_MP3_BITRATE_KBPS="160")
    wait_ready(server)
    killed: list[int] = []

    def kill_once_the_mp3_goes_up_in_parts(sent: int) -> None:
        # The input (under a part) goes up in one PUT: a multipart upload is the MP3's.
        if killed or not multipart_uploads(s3, bucket):
            return
        for child in server.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if "ffmpeg" in child.name() or any("ffmpeg" in a for a in child.cmdline()[:4]):
                    child.send_signal(signal.SIGKILL)
                    killed.append(child.pid)

    reply = await upload(
        server, long_tone, window=(0, LONG_TONE_SECONDS), rate=400_000,
        on_sent=kill_once_the_mp3_goes_up_in_parts,
    )  # fmt: skip
    assert killed, "ffmpeg was never killed while the MP3 went up"
    assert reply.status in (422, 503), reply.content[:500]
    files = reply.json()["debugFiles"]
    assert set(files) == {"input"}, files
    assert (await fetch(files["input"])).content == long_tone
    wait_no_multipart(s3, bucket)
    kept = copy_keys(s3, bucket, reply.request_id)
    assert "debug-output" not in kept and "error-output" not in kept, kept
    server.wait_idle()


FORMATS = {
    "sentence.wav": ("wav", "audio/wav", "wav", "stream"),
    "lpcm.caf": ("caf", "audio/x-caf", "caf", "stream"),
    "moov-first.m4a": ("m4a", "audio/mp4", "mp4", "stream"),
    "moov-last.m4a": ("m4a", "audio/mp4", "mp4", "seekable"),
}


async def test_keys_and_content_types_follow_the_container_under_the_prefix(
    make_server: Any, moto: MotoServer, s3: Any, bucket: str, recordings: dict[str, bytes]
) -> None:
    server = s3_server(make_server, moto.url, bucket, VRAI_DEBUG_PREFIX="/debug/copies/")
    for name, (extension, content_type, container, mode) in FORMATS.items():
        audio = recordings[name]
        reply = await upload(server, audio, window=(0, 2))
        assert reply.status == 200, (name, reply.content)
        keys = wait_copies(s3, bucket, reply.request_id, {"debug-input", "debug-output"})
        folder = "debug/copies/anonymous/"
        stem = f"{STAMP}-{reply.request_id}"
        assert re.fullmatch(rf"{folder}debug-input-{stem}\.{extension}", keys["debug-input"])
        assert re.fullmatch(rf"{folder}debug-output-{stem}\.mp3", keys["debug-output"])
        head = wait_outcome(s3, bucket, keys["debug-input"], "ok")
        assert head["ContentType"] == content_type, name
        assert head["Metadata"]["format"] == container, name
        assert head["Metadata"]["mode"] == mode, name
        assert read_object(s3, bucket, keys["debug-input"]) == audio, name
        out = wait_outcome(s3, bucket, keys["debug-output"], "ok")
        assert out["ContentType"] == "audio/mpeg", name
    assert all(key.startswith("debug/copies/anonymous/") for key in objects(s3, bucket))
    server.wait_idle()


async def test_an_upload_that_outruns_moto_abandons_only_the_copy(
    make_server: Any, proxy: ThrottlingProxy, s3: Any, bucket: str,
    recordings: dict[str, bytes],
) -> None:  # fmt: skip
    """20 MB unthrottled on loopback, drained at full speed once ffmpeg has its 5 s window,
    arrives faster than moto takes 5 MiB parts: by design the copy is dropped, its multipart
    aborted, rather than buffered without bound.  (A buffer of one part and one MiB makes
    that certain; the default 12 MiB falls behind here too, if less surely.)"""
    server = s3_server(make_server, proxy.url, bucket, VRAI_DEBUG_BUFFER_BYTES=str(PART + MiB))
    wait_ready(server)
    reply = await upload(server, recordings["20MB.wav"])
    assert reply.status == 200, reply.content
    assert wait_for(lambda: warnings(server, "fell behind"), what="a fell-behind warning")
    wait_no_multipart(s3, bucket)
    keys = wait_copies(s3, bucket, reply.request_id, {"debug-output"})
    wait_outcome(s3, bucket, keys["debug-output"], "ok")
    assert "debug-input" not in copy_keys(s3, bucket, reply.request_id)
    input_key = keys["debug-output"].replace("debug-output", "debug-input")[: -len("mp3")] + "wav"
    sent = proxy.requests_for(input_key)
    if any(line == "POST ?uploads" for line in sent):  # it got as far as starting
        assert any(line.startswith("DELETE ?uploadId=") for line in sent), sent
    server.wait_idle()


# --- failures keep error copies, linked by presigned URLs -----------------------------------


async def test_failed_requests_keep_error_copies_behind_presigned_links(
    make_server: Any, moto: MotoServer, s3: Any, bucket: str, recordings: dict[str, bytes],
    tmp_path: Path,
) -> None:  # fmt: skip
    server = s3_server(make_server, moto.url, bucket, VRAI_DEBUG_URL_EXPIRY_SECONDS="900")

    # Undecodable: the input is kept; there is no MP3.
    bad = await upload(server, GARBAGE)
    assert bad.status == 422, bad.content
    body = bad.json()
    assert body["code"] == "undecodable_audio"
    files = body["debugFiles"]
    assert set(files) == {"input"}, files
    assert_presigned(files["input"], moto.url, 900)
    fetched = await fetch(files["input"])
    assert fetched.status_code == 200 and fetched.content == GARBAGE
    key = copy_keys(s3, bucket, bad.request_id)["error-input"]
    assert re.fullmatch(
        rf"anonymous/error-input-{STAMP}-{bad.request_id}-undecodable_audio\.bin", key
    )
    assert urlsplit(files["input"]).path == f"/{bucket}/{key}"
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["Metadata"]["outcome"] == "undecodable_audio"
    assert head["Metadata"]["request-id"] == bad.request_id
    # Not public: the same object without a signature is refused, and no grant opens it.
    assert (await fetch(f"{moto.url}/{bucket}/{key}")).status_code == 403
    grants = s3.get_object_acl(Bucket=bucket, Key=key)["Grants"]
    assert all("URI" not in grant["Grantee"] for grant in grants), grants

    # The transcriber fails after the MP3 exists: input and output are both kept.
    audio = recordings["small.wav"]
    failed = await upload(server, audio, window=(0, 3), mp3=False)
    assert failed.status == 502, failed.content
    body = failed.json()
    assert body["code"] == "transcription_failed"
    files = body["debugFiles"]
    assert set(files) == {"input", "output"}, files
    for url in files.values():
        assert_presigned(url, moto.url, 900)
    assert sha256((await fetch(files["input"])).content) == sha256(audio)
    mp3 = (await fetch(files["output"])).content
    assert abs(decoded_seconds(mp3, tmp_path) - 3.0) <= 0.25
    keys = copy_keys(s3, bucket, failed.request_id)
    assert re.fullmatch(
        rf"anonymous/error-output-{STAMP}-{failed.request_id}-transcription_failed\.mp3",
        keys["error-output"],
    )
    assert read_object(s3, bucket, keys["error-output"]) == mp3
    head = s3.head_object(Bucket=bucket, Key=keys["error-input"])
    assert head["ContentType"] == "audio/wav"
    assert head["Metadata"]["outcome"] == "transcription_failed"
    assert s3.head_object(Bucket=bucket, Key=keys["error-output"])["ContentType"] == "audio/mpeg"

    # No audio in the window: the MP3 is empty, so only the input is worth keeping.
    padded = recordings["padded.wav"]
    empty = await upload(server, padded, window=(100, 110))
    assert empty.status == 422, empty.content
    body = empty.json()
    assert body["code"] == "no_audio_in_window"
    files = body["debugFiles"]
    assert (await fetch(files["input"])).content == padded
    kept = copy_keys(s3, bucket, empty.request_id)
    assert "error-input" in kept, kept
    sizes = objects(s3, bucket)
    assert set(files) == {"input"}, f"an empty MP3 kept and linked: {files}, {sizes}"
    assert multipart_uploads(s3, bucket) == []
    server.wait_idle()


# --- nothing left half-done -----------------------------------------------------------------


async def test_client_disconnect_mid_upload_leaves_nothing_in_the_bucket(
    make_server: Any, moto: MotoServer, s3: Any, bucket: str, recordings: dict[str, bytes]
) -> None:
    """Gone after more than a part went up: the multipart upload is aborted, and no copy of a
    request that never finished is kept, not even the MP3 of its (early) window."""
    server = s3_server(make_server, moto.url, bucket)
    wait_ready(server)

    def multipart_started(sent: int) -> bool:
        return sent > PART + MiB and bool(multipart_uploads(s3, bucket))

    await disconnect_mid_upload(
        server, recordings["20MB.wav"], rate=8_000_000, until=multipart_started
    )
    logged = request_log(server)
    assert logged["code"] == "client_disconnected", logged
    wait_no_multipart(s3, bucket)
    await anyio.sleep(0.5)  # a copy still on its way would land now
    assert debug_objects_of(s3, bucket, logged["requestId"]) == []
    server.wait_idle()


async def begin_cut_off(server: Server, audio: bytes) -> Attempt:
    """A resumable upload (MP3 answer) whose connection drops once a part has gone up."""
    wait_ready(server)
    return await create(
        f"{server.url}/v1/transcriptions?fromTime=0&toTime=600",
        audio,
        headers={"Content-Type": "audio/wav", "Accept": "audio/mpeg"},
        cut_after_bytes=PART + 3 * MiB,
    )


async def test_a_resumable_upload_not_resumed_aborts_its_multipart_upload(
    make_server: Any, moto: MotoServer, s3: Any, bucket: str, recordings: dict[str, bytes]
) -> None:
    """Its connection dropped after a part went up, and nobody came back within the grace:
    the multipart upload is aborted and nothing is kept, as for any disconnect."""
    server = s3_server(make_server, moto.url, bucket, VRAI_RESUME_GRACE_SECONDS="2")
    attempt = await begin_cut_off(server, recordings["20MB.wav"])
    assert attempt.cut and attempt.location
    wait_for(lambda: multipart_uploads(s3, bucket), what="the input's multipart upload")
    logged = request_log(server, timeout=20)
    assert logged["code"] == "client_disconnected", logged
    wait_no_multipart(s3, bucket)
    await anyio.sleep(0.5)
    assert debug_objects_of(s3, bucket, logged["requestId"]) == []
    server.wait_idle()


async def test_a_resumed_upload_keeps_one_whole_input_copy(
    make_server: Any, moto: MotoServer, s3: Any, bucket: str, recordings: dict[str, bytes]
) -> None:
    # A buffer the whole recording fits in: the resumed part arrives at loopback speed, and a
    # copy that falls behind moto is abandoned by design (tested on its own above).
    server = s3_server(make_server, moto.url, bucket, VRAI_DEBUG_BUFFER_BYTES=str(24 * MiB))
    audio = recordings["20MB.wav"]
    attempt = await begin_cut_off(server, audio)
    assert attempt.location
    where = await offset(attempt.location, headers={})
    done = await append(attempt.location, audio[where.offset :], where.offset, headers={})
    assert done.status == 200, done.body[:300]
    assert done.headers["content-type"] == "audio/mpeg"
    logged = request_log(server, done.headers["x-request-id"])
    assert logged["uploadResumptions"] == 1
    keys = wait_for(
        lambda: (
            copy_keys(s3, bucket, logged["requestId"]).get("debug-input")
            and copy_keys(s3, bucket, logged["requestId"])
        ),
        timeout=30,  # 20 MB through moto, on a busy machine
        what="the whole input's copy",
    )
    assert sha256(read_object(s3, bucket, keys["debug-input"])) == sha256(audio)
    assert multipart_uploads(s3, bucket) == []
    server.wait_idle()


# --- S3 in trouble: the user never notices ---------------------------------------------------


@pytest.mark.alone  # timed against a baseline
async def test_s3_dying_mid_upload_neither_slows_nor_fails_the_request(
    make_server: Any, moto: MotoServer, s3: Any, bucket: str, recordings: dict[str, bytes],
    off_server: Server,
) -> None:  # fmt: skip
    """S3 dies (connections cut, port closed) once the first part is up, and stays down until
    the server has given the copy up, and five seconds more.  The request is as fast as with
    copies off.  Once S3 is back, the half-done multipart upload must go: it is billed as
    storage until someone aborts it, and the lifecycle rule only does so after a day."""
    audio = recordings["12MB.wav"]
    rate = 12_000_000
    baseline = await upload(off_server, audio, rate=rate)
    proxy = ThrottlingProxy(moto.url)
    proxy.start()
    killed: list[int] = []
    try:
        server = s3_server(make_server, proxy.url, bucket)
        wait_ready(server)

        def kill_s3(sent: int) -> None:
            if not killed and sent >= 7 * MiB and multipart_uploads(s3, bucket):
                proxy.stop()
                killed.append(sent)

        reply = await upload(server, audio, rate=rate, on_sent=kill_s3)
        assert killed, "S3 was never killed mid-upload"
        assert_fast(reply, baseline)
        assert len(multipart_uploads(s3, bucket)) == 1
        wait_for(lambda: warnings(server, "debug copy failed"), what="the copy to be given up")
        # Down a while longer: past the SDK's own three attempts at the abort (under 3 s of
        # backoff), as when S3 takes a few seconds to restart.
        await anyio.sleep(5.0)
    finally:
        proxy.start()
    wait_no_multipart(s3, bucket, timeout=10)
    assert [key for key in objects(s3, bucket) if "debug-input" in key] == []
    server.wait_idle()


def _auth_moto(tmp_path: Path) -> tuple[MotoServer, Any, str]:
    """A moto that checks signatures: one IAM user may do anything; nobody else may."""
    running = start_moto(tmp_path / "auth-moto", {"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    iam = boto3.client(
        "iam", endpoint_url=running.url, region_name=REGION,
        aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
    )  # fmt: skip
    # The first four actions go unchecked: just enough to create the one identity.
    iam.create_user(UserName="tests")
    allow_all = {"Effect": "Allow", "Action": "*", "Resource": "*"}
    iam.put_user_policy(
        UserName="tests",
        PolicyName="everything",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [allow_all]}),
    )
    key = iam.create_access_key(UserName="tests")["AccessKey"]
    client = s3_client(running.url, access_key_id=key["AccessKeyId"], secret=key["SecretAccessKey"])
    name = "debug-auth-bucket"
    client.create_bucket(Bucket=name)
    return running, client, name


@pytest.mark.alone  # timed against a baseline
@pytest.mark.parametrize("trouble", ["wrong-credentials", "no-such-bucket", "nothing-listening"])
async def test_misconfigured_s3_warns_once_and_never_fails_a_request(
    make_server: Any, moto: MotoServer, recordings: dict[str, bytes], off_server: Server,
    tmp_path: Path, trouble: str,
) -> None:  # fmt: skip
    audio = recordings["12MB.wav"]
    baseline = await upload(off_server, audio)
    auth: MotoServer | None = None
    try:
        if trouble == "wrong-credentials":
            auth, client, name = _auth_moto(tmp_path)
            env = s3_env(auth.url, name, **NO_TRANSCRIBER)  # our keys: unknown to this moto
        elif trouble == "no-such-bucket":
            env = s3_env(moto.url, "debug-never-created", **NO_TRANSCRIBER)
        else:
            env = s3_env(f"http://127.0.0.1:{free_port()}", "debug-nobody-home", **NO_TRANSCRIBER)
        server = make_server(**env)
        wait_ready(server, bucket_checked=False)
        reply = await upload(server, audio)
        assert_fast(reply, baseline)
        again = await upload(server, recordings["small.wav"])
        assert again.status == 200, again.content
        assert wait_for(
            lambda: len(warnings(server, "debug copy")) >= 2,
            timeout=15,
            what="warnings about the lost copies",
        )
        assert wait_for(lambda: warnings(server, "debug bucket is not reachable"), timeout=15)
        assert len(warnings(server, "debug bucket is not reachable")) == 1, "warn once"
        if auth is not None:
            wait_no_multipart(client, name)
            assert objects(client, name) == {}
        server.wait_idle()
    finally:
        if auth is not None:
            auth.stop()


@pytest.mark.alone  # timed against a baseline
async def test_slow_s3_neither_slows_the_request_nor_grows_memory(
    make_server: Any, moto: MotoServer, s3: Any, bucket: str, recordings: dict[str, bytes],
    off_server: Server,
) -> None:  # fmt: skip
    """S3 at 200 KB/s: the copy falls behind and is dropped; the request does not wait for it,
    memory stays bounded by the copy's buffer, and the multipart upload goes while S3 is
    still slow (not once a doomed 5 MiB part has crawled up, 26 s later)."""
    audio = recordings["20MB.wav"]
    with PeakRss(off_server.process.pid) as memory_off:
        baseline = await upload(off_server, audio)
    with ThrottlingProxy(moto.url, rate=200_000) as proxy:
        server = s3_server(make_server, proxy.url, bucket)
        wait_ready(server)
        with PeakRss(server.process.pid) as memory:
            reply = await upload(server, audio)
        assert_fast(reply, baseline)
        assert wait_for(lambda: warnings(server, "fell behind"), what="a fell-behind warning")
        growth = memory.growth
        try:
            wait_no_multipart(s3, bucket, timeout=6)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; S3 requests: {proxy.requests}") from None
        finally:
            server.stop()  # while the proxy still answers: shutdown aborts what is left
    # The copy's memory is bounded by its buffer, whatever the upload's size: the buffer, a
    # part's bytes on their way out, and a bytearray's slack (ffmpeg is the same either way).
    extra = growth - memory_off.growth
    bound = 2 * Settings.debug_buffer_bytes + 8 * MiB
    assert extra < bound, f"the server grew {extra / MiB:.0f} MiB more than with copies off"


# --- sampling -------------------------------------------------------------------------------


async def test_unsampled_requests_keep_nothing_unless_they_fail(
    make_server: Any, moto: MotoServer, s3: Any, bucket: str, recordings: dict[str, bytes],
    tmp_path: Path,
) -> None:  # fmt: skip
    """VRAI_DEBUG_SAMPLE_RATE=0: the input is held on local disk until the outcome is known;
    a success keeps nothing, a failure uploads its error copies and links them."""
    server = s3_server(make_server, moto.url, bucket, VRAI_DEBUG_SAMPLE_RATE="0")
    ok = await upload(server, recordings["12MB.wav"])
    assert ok.status == 200, ok.content
    server.wait_idle()  # the held input is gone

    bad = await upload(server, GARBAGE)
    assert bad.status == 422, bad.content
    files = bad.json()["debugFiles"]
    assert set(files) == {"input"}, files
    assert (await fetch(files["input"])).content == GARBAGE

    audio = recordings["small.wav"]
    failed = await upload(server, audio, window=(0, 3), mp3=False)
    assert failed.status == 502, failed.content
    files = failed.json()["debugFiles"]
    assert set(files) == {"input", "output"}, files
    assert sha256((await fetch(files["input"])).content) == sha256(audio)
    output = await fetch(files["output"])
    assert output.status_code == 200
    assert abs(decoded_seconds(output.content, tmp_path) - 3.0) <= 0.25

    kept = objects(s3, bucket)
    assert all(posixpath.basename(key).startswith("error-") for key in kept), kept
    assert debug_objects_of(s3, bucket, ok.request_id) == []
    assert len(kept) == 3, kept
    assert multipart_uploads(s3, bucket) == []
    server.wait_idle()
