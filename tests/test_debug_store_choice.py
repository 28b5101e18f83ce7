"""Where debug copies go by default, through the real server: S3 with a bucket, else nowhere.

`VRAI_DEBUG_STORE=auto` (the default) keeps users' recordings only in a configured bucket
(`VRAI_DEBUG_BUCKET`, or `BUCKET_NAME` as Fly's Tigris sets it); without one nothing of a
request stays on the machine.  Start-up says which, in exactly one log line.  The folder
store, asked for with `dir`, is in `test_debug_folder.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vrai_stream.settings import Settings

from .support.s3_server import (
    GARBAGE,
    MotoServer,
    new_bucket,
    no_transcriber,
    noise_wav,
    objects,
    read_object,
    s3_client,
    s3_env,
    sha256,
    upload,
    wait_for,
)
from .support.server import Server

pytestmark = pytest.mark.anyio


def start_up_lines(server: Server) -> list[dict[str, Any]]:
    """The log lines that say where debug copies go."""
    return [entry for entry in server.logs() if "debugCopies" in entry]


def everything_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


def copies_in_working_dir(server: Server, request_ids: tuple[str, ...]) -> list[Path]:
    """Files of these requests under `debug-copies/` in the server's working directory."""
    working_dir = Path(f"/proc/{server.process.pid}/cwd").resolve()
    return [
        path
        for path in working_dir.glob("debug-copies/**/*")
        if any(request_id in path.name for request_id in request_ids)
    ]


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return noise_wav(tmp_path_factory.mktemp("noise") / "small.wav", 1_000_000).read_bytes()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "off"),
        ({"VRAI_DEBUG_STORE": "auto"}, "off"),
        ({"VRAI_DEBUG_BUCKET": "b"}, "s3"),
        ({"BUCKET_NAME": "b"}, "s3"),
        ({"VRAI_DEBUG_STORE": "dir"}, "dir"),
        ({"VRAI_DEBUG_STORE": "dir", "BUCKET_NAME": "b"}, "dir"),
        ({"VRAI_DEBUG_STORE": "off", "BUCKET_NAME": "b"}, "off"),
    ],
)
def test_auto_means_s3_with_a_bucket_else_off(env: dict[str, str], expected: str) -> None:
    assert Settings.from_env(env).debug_store == expected


async def test_auto_without_a_bucket_keeps_nothing_on_disk(
    make_server: Any, tmp_path: Path, audio: bytes
) -> None:
    folder = tmp_path / "copies"  # where `dir` would write: it must never appear
    server: Server = make_server(
        VRAI_DEBUG_STORE="auto", VRAI_DEBUG_DIR=str(folder), **no_transcriber()
    )
    lines = start_up_lines(server)
    assert len(lines) == 1, lines
    assert lines[0]["debugCopies"] == {"store": "off"}
    assert "not kept" in lines[0]["message"], lines[0]
    assert "VRAI_DEBUG_BUCKET" in lines[0]["message"], "it should say how to turn copies on"

    ok = await upload(server, audio, window=(0, 3))
    assert ok.status == 200, ok.content
    failed = await upload(server, GARBAGE)
    assert failed.status == 422, failed.content
    assert "debugFiles" not in failed.json(), "a failure linked a copy that should not exist"
    server.wait_idle()  # and no spool file is left or open
    assert everything_under(folder) == []
    # Nor under the server's working directory, where the folder store's default points.
    leftovers = copies_in_working_dir(server, (ok.request_id, failed.request_id))
    assert leftovers == [], leftovers


@pytest.mark.parametrize("variable", ["VRAI_DEBUG_BUCKET", "BUCKET_NAME"])
async def test_auto_with_a_bucket_keeps_copies_in_s3(
    make_server: Any, moto: MotoServer, tmp_path: Path, audio: bytes, variable: str
) -> None:
    s3 = s3_client(moto.url)
    bucket = new_bucket(s3)
    env = s3_env(moto.url, bucket, VRAI_DEBUG_PREFIX="debug/", **no_transcriber())
    del env["VRAI_DEBUG_BUCKET"]
    folder = tmp_path / "copies"
    env.update({"VRAI_DEBUG_STORE": "auto", "VRAI_DEBUG_DIR": str(folder), variable: bucket})
    server: Server = make_server(**env)
    lines = start_up_lines(server)
    assert len(lines) == 1, lines
    assert lines[0]["debugCopies"] == {"store": "s3", "bucket": bucket, "prefix": "debug/"}
    assert bucket in lines[0]["message"] and "debug/" in lines[0]["message"], lines[0]

    # The bucket is checked once at start-up: the copies wait for no client to import.
    wait_for(
        lambda: [e for e in server.logs() if e.get("message") == "debug bucket reachable"] or None,
        timeout=30,
        what="the bucket check",
    )
    reply = await upload(server, audio, window=(0, 3))
    assert reply.status == 200, reply.content
    server.wait_idle()

    def both_copies() -> list[str] | None:
        keys = [key for key in objects(s3, bucket) if reply.request_id in key]
        return keys if len(keys) >= 2 else None

    keys: list[str] = wait_for(both_copies, timeout=10, what="both copies in the bucket")
    assert sorted(key.rsplit("/", 1)[-1].split("-")[1] for key in keys) == ["input", "output"]
    assert all(key.startswith("debug/anonymous/debug-") for key in keys), keys
    (input_key,) = [key for key in keys if "-input-" in key]
    assert sha256(read_object(s3, bucket, input_key)) == sha256(audio)
    assert everything_under(folder) == []
