"""Debug copies in a local folder (`VRAI_DEBUG_STORE=dir`), through the real server.

The embedded default, so a newcomer sees the copies on disk: the input is written to
`<key>.partial` as it arrives and renamed once whole, the MP3 next to it.  A disconnect
leaves no `.partial`; a failure keeps `error-*` copies and names them in `debugFiles`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from .s3_server import (
    GARBAGE,
    disconnect_mid_upload,
    no_transcriber,
    noise_wav,
    request_log,
    sha256,
    upload,
    wait_ready,
)
from .support import Server, decoded_seconds

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
