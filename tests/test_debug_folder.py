"""Debug copies in a local folder (`VRAI_DEBUG_STORE=dir`), through the real server.

Only when asked for (`auto` without a bucket keeps nothing: `test_debug_store_choice.py`).
The input is written to `<key>.partial` as it arrives and renamed once whole, the MP3 next
to it the same way, as ffmpeg writes it.  A disconnect leaves no `.partial`; a failure keeps
`error-*` copies and names them in `debugFiles`.  The folder is held to
`VRAI_DEBUG_DIR_MAX_BYTES` and `VRAI_DEBUG_DIR_MAX_AGE_SECONDS`, oldest copies first.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from .support.audio import decoded_seconds, run_ffmpeg
from .support.s3_server import (
    GARBAGE,
    disconnect_mid_upload,
    no_transcriber,
    noise_wav,
    request_log,
    sha256,
    upload,
    wait_ready,
)
from .support.server import Server

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
STAMP = r"\d{8}T\d{6}Z"


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("noise")
    return {
        "small": noise_wav(folder / "small.wav", 1_000_000, seed=1).read_bytes(),
        "12MB": noise_wav(folder / "12MB.wav", 12_000_000, seed=12).read_bytes(),
    }


def long_tone(path: Path, seconds: int) -> bytes:
    """A 440 Hz tone, 8 kHz mono 16-bit WAV (16 kB a second)."""
    run_ffmpeg(
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=8000:duration={seconds}",
        "-ac", "1", "-c:a", "pcm_s16le", str(path),
    )  # fmt: skip
    return path.read_bytes()


def folder_server(make_server: Any, folder: Path, **extra: str) -> Server:
    env = {"VRAI_DEBUG_STORE": "dir", "VRAI_DEBUG_DIR": str(folder), **no_transcriber(), **extra}
    server: Server = make_server(**env)
    return server


def files_in(folder: Path) -> dict[str, Path]:
    """Every file under `folder`, by its path relative to it."""
    if not folder.exists():
        return {}
    return {
        path.relative_to(folder).as_posix(): path for path in folder.rglob("*") if path.is_file()
    }


def of_request(folder: Path, request_id: str) -> dict[str, Path]:
    """This request's copies by kind: `debug-input`, `error-output`, ..."""
    return {
        "-".join(path.name.split("-")[:2]): path
        for name, path in files_in(folder).items()
        if request_id in name
    }


async def test_input_and_output_copies_appear_in_the_folder(
    make_server: Any, tmp_path: Path, noise: dict[str, bytes]
) -> None:
    folder = tmp_path / "copies"
    server = folder_server(make_server, folder)
    audio = noise["12MB"]
    reply = await upload(server, audio, window=(1, 4), rate=20_000_000)
    assert reply.status == 200, reply.content
    found = files_in(folder)
    assert len(found) == 2, found
    copies = of_request(folder, reply.request_id)
    assert re.fullmatch(rf"debug-input-{STAMP}-{reply.request_id}\.wav", copies["debug-input"].name)
    assert copies["debug-input"].parent == folder / "anonymous"
    assert sha256(copies["debug-input"].read_bytes()) == sha256(audio)
    mp3 = copies["debug-output"].read_bytes()
    assert copies["debug-output"].name.endswith(f"-{reply.request_id}.mp3")
    assert mp3 == reply.content
    assert abs(decoded_seconds(mp3, tmp_path) - 3.0) <= 0.25
    server.wait_idle()


async def test_a_long_mp3_is_written_as_ffmpeg_makes_it_byte_for_byte_the_answer(
    make_server: Any, tmp_path: Path
) -> None:
    """Five minutes at 160 kb/s: the MP3's copy is written from ffmpeg's output as it comes
    (to a `.partial` renamed once whole), and is exactly what `Accept: audio/mpeg` answered."""
    tone = long_tone(tmp_path / "tone.wav", 300)
    folder = tmp_path / "copies"
    server = folder_server(make_server, folder, VRAI_MP3_BITRATE_KBPS="160")
    reply = await upload(server, tone, window=(0, 300))
    assert reply.status == 200, reply.content[:500]
    assert len(reply.content) > 5 * MiB
    copies = of_request(folder, reply.request_id)
    assert set(copies) == {"debug-input", "debug-output"}, copies
    assert copies["debug-output"].read_bytes() == reply.content
    assert copies["debug-input"].read_bytes() == tone
    assert not [name for name in files_in(folder) if name.endswith(".partial")]
    server.wait_idle()


async def test_an_mp3_cut_short_by_ffmpeg_dying_keeps_no_copy(
    make_server: Any, tmp_path: Path
) -> None:
    """ffmpeg is killed once the MP3's copy has bytes in its `.partial`: the job fails, the
    input's error copy is kept (the body is read to its end), and nothing of the half MP3
    stays: no `.partial`, no output copy, no `error-output` linked."""
    tone = long_tone(tmp_path / "tone.wav", 120)
    folder = tmp_path / "copies"
    server = folder_server(make_server, folder)
    wait_ready(server)
    killed: list[int] = []

    def kill_once_the_mp3_is_written(sent: int) -> None:
        if killed:
            return
        partials = [
            path
            for name, path in files_in(folder).items()
            if name.endswith(".mp3.partial") and path.stat().st_size > 0
        ]
        if not partials:
            return
        for child in server.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if "ffmpeg" in child.name() or any("ffmpeg" in a for a in child.cmdline()[:4]):
                    child.send_signal(signal.SIGKILL)
                    killed.append(child.pid)

    reply = await upload(
        server, tone, window=(0, 120), rate=400_000, on_sent=kill_once_the_mp3_is_written
    )
    assert killed, "ffmpeg was never killed while the MP3 was being copied"
    assert reply.status in (422, 503), reply.content
    files = reply.json()["debugFiles"]
    assert set(files) == {"input"}, files
    assert (folder / files["input"]).read_bytes() == tone
    left = files_in(folder)
    assert not [name for name in left if name.endswith(".partial")], left
    assert not [name for name in left if name.endswith(".mp3")], left
    server.wait_idle()


async def test_a_disconnect_leaves_no_partial_copy(
    make_server: Any, tmp_path: Path, noise: dict[str, bytes]
) -> None:
    folder = tmp_path / "copies"
    server = folder_server(make_server, folder)
    wait_ready(server)
    seen_partial: list[str] = []

    def partway(sent: int) -> bool:
        if sent >= 3 * MiB:
            seen_partial.extend(name for name in files_in(folder) if name.endswith(".partial"))
            return True
        return False

    await disconnect_mid_upload(server, noise["12MB"], rate=8_000_000, until=partway)
    assert seen_partial, "the input copy was not being written while the body arrived"
    logged = request_log(server)
    assert logged["code"] == "client_disconnected", logged
    server.wait_idle()
    assert files_in(folder) == {}, "a disconnected request left a copy behind"


async def test_failures_keep_error_copies_named_in_debug_files(
    make_server: Any, tmp_path: Path, noise: dict[str, bytes]
) -> None:
    folder = tmp_path / "copies"
    server = folder_server(make_server, folder)

    bad = await upload(server, GARBAGE)
    assert bad.status == 422, bad.content
    files = bad.json()["debugFiles"]
    assert set(files) == {"input"}, files
    assert re.fullmatch(
        rf"anonymous/error-input-{STAMP}-{bad.request_id}-undecodable_audio\.bin", files["input"]
    )
    assert (folder / files["input"]).read_bytes() == GARBAGE

    audio = noise["small"]
    failed = await upload(server, audio, window=(0, 3), mp3=False)
    assert failed.status == 502, failed.content
    files = failed.json()["debugFiles"]
    assert set(files) == {"input", "output"}, files
    assert (folder / files["input"]).read_bytes() == audio
    assert files["output"].endswith(f"-{failed.request_id}-transcription_failed.mp3")
    assert abs(decoded_seconds((folder / files["output"]).read_bytes(), tmp_path) - 3.0) <= 0.25

    # No audio in the window: the MP3 is empty, so only the input is worth keeping.
    padded = noise["small"]
    empty = await upload(server, padded, window=(100, 110))
    assert empty.status == 422, empty.content
    files = empty.json()["debugFiles"]
    assert (folder / files["input"]).read_bytes() == padded
    assert set(files) == {"input"}, f"an empty MP3 kept and linked: {files}"

    assert not [name for name in files_in(folder) if name.endswith(".partial")]
    server.wait_idle()


async def test_unsampled_requests_keep_only_their_failures(
    make_server: Any, tmp_path: Path, noise: dict[str, bytes]
) -> None:
    folder = tmp_path / "copies"
    server = folder_server(make_server, folder, VRAI_DEBUG_SAMPLE_RATE="0")
    ok = await upload(server, noise["small"])
    assert ok.status == 200, ok.content
    server.wait_idle()
    assert files_in(folder) == {}, "a successful, unsampled request left a copy"

    bad = await upload(server, GARBAGE)
    assert bad.status == 422, bad.content
    files = bad.json()["debugFiles"]
    assert (folder / files["input"]).read_bytes() == GARBAGE
    assert "error-input" in of_request(folder, bad.request_id)
    server.wait_idle()


async def test_off_writes_nothing(
    make_server: Any, tmp_path: Path, noise: dict[str, bytes]
) -> None:
    folder = tmp_path / "copies"
    server = make_server(VRAI_DEBUG_STORE="off", VRAI_DEBUG_DIR=str(folder), **no_transcriber())
    ok = await upload(server, noise["small"])
    assert ok.status == 200, ok.content
    bad = await upload(server, GARBAGE)
    assert bad.status == 422, bad.content
    assert "debugFiles" not in bad.json()
    server.wait_idle()
    assert files_in(folder) == {}


# --- retention: a byte cap and a maximum age, oldest first ----------------------------------


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in files_in(folder).values())


def start_up_lines(server: Server) -> list[dict[str, Any]]:
    return [entry for entry in server.logs() if "debugCopies" in entry]


async def test_start_up_names_the_folder_and_its_limits(make_server: Any, tmp_path: Path) -> None:
    folder = tmp_path / "copies"
    server = folder_server(
        make_server,
        folder,
        VRAI_DEBUG_DIR_MAX_BYTES=str(3 * MiB),
        VRAI_DEBUG_DIR_MAX_AGE_SECONDS="7200",
    )
    lines = start_up_lines(server)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["level"] == "info"
    assert line["debugCopies"] == {
        "store": "dir",
        "folder": str(folder.resolve()),
        "maxBytes": 3 * MiB,
        "maxAgeSeconds": 7200,
    }
    assert str(folder.resolve()) in line["message"], line
    assert "3 MiB" in line["message"] and "7200 s" in line["message"], line


async def test_the_folder_stays_under_its_byte_cap_oldest_copies_first(
    make_server: Any, tmp_path: Path, noise: dict[str, bytes]
) -> None:
    """Each request keeps about 1 MB of input and 30 kB of MP3; the cap holds two of them.
    The third request's input pushes the oldest file out (the first input), nothing newer."""
    folder = tmp_path / "copies"
    cap = 2_200_000
    server = folder_server(make_server, folder, VRAI_DEBUG_DIR_MAX_BYTES=str(cap))
    audio = noise["small"]
    ids = []
    for _ in range(3):
        reply = await upload(server, audio)
        assert reply.status == 200, reply.content
        ids.append(reply.request_id)
        assert folder_bytes(folder) <= cap
    first, second, third = (of_request(folder, request_id) for request_id in ids)
    assert set(first) == {"debug-output"}, "the oldest file, and only it, should have gone"
    assert set(second) == set(third) == {"debug-input", "debug-output"}
    assert sha256(third["debug-input"].read_bytes()) == sha256(audio)

    # An upload larger than the whole cap is not copied at all, and pushes nothing out.
    before = files_in(folder)
    big = await upload(server, noise["12MB"], window=(0, 2))
    assert big.status == 200, big.content
    server.wait_idle()
    assert files_in(folder) == before
    assert folder_bytes(folder) <= cap


async def test_copies_older_than_the_maximum_age_are_removed(
    make_server: Any, tmp_path: Path, noise: dict[str, bytes]
) -> None:
    folder = tmp_path / "copies"
    # Left by an earlier run: an hour old is past the limit, a fresh one is not.
    stale = folder / "anonymous" / "debug-input-old.wav"
    fresh = folder / "anonymous" / "debug-input-fresh.wav"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    fresh.write_bytes(b"fresh")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))

    # Longer than a server takes to start on a busy machine (up to 5 s beside other tests):
    # `fresh` must still be fresh when start-up sweeps the folder.
    max_age = 8.0
    server = folder_server(make_server, folder, VRAI_DEBUG_DIR_MAX_AGE_SECONDS=f"{max_age:g}")
    assert not stale.exists(), "a copy past the age limit survived start-up"
    assert fresh.exists()

    old = await upload(server, noise["small"])
    assert old.status == 200, old.content
    assert set(of_request(folder, old.request_id)) == {"debug-input", "debug-output"}
    await anyio.sleep(max_age + 0.5)
    new = await upload(server, noise["small"])
    assert new.status == 200, new.content
    assert of_request(folder, old.request_id) == {}, "copies older than the limit were kept"
    assert not fresh.exists()
    assert set(of_request(folder, new.request_id)) == {"debug-input", "debug-output"}
    server.wait_idle()
