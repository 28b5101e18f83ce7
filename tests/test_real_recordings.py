"""Recordings written by real phones and apps (`../shared/real-recordings/`), through the API.

Each is uploaded chunked as the raw body of `POST /v1/transcriptions`, with a window that
covers it all, and comes back 200 with as much audio as `ffmpeg -i FILE` decodes from the
file, its words (but for the near-silent Voice Memos second), and the container and mode
the sniffer chose.  The iPhone LPCM CAF, with Apple's `free` chunk before `data`, streams;
so do the two whose index comes last: Android's AMR 3GP exactly, and the Voice Memos second
(too short for a `hoov`) on a configuration guessed from its audio, which its `moov` confirms.
"""

from __future__ import annotations

import csv
from pathlib import Path

import httpx
import pytest

from .support.audio import ffmpeg_seconds
from .support.client import chunked
from .support.server import Server

pytestmark = pytest.mark.anyio

REAL_RECORDINGS = Path(__file__).resolve().parents[1].parent / "shared" / "real-recordings"
WINDOW = (0.0, 120.0)
"""Longer than any of them."""

EXPECTED: dict[str, tuple[str, str]] = {
    "ios_lpcm_free_chunk.caf": ("caf", "stream"),
    "ios_voicememos_1s.m4a": ("mp4", "speculative"),
    "android13_amrnb_3gp4.m4a": ("3gp", "stream"),
    "android11_mp4_named.aac": ("mp4", "stream"),
    "mms_amrnb_raw.amr": ("amr", "stream"),
    "browser_recorderjs_opus.oga": ("ogg", "stream"),
    "chrome_mediarecorder_webm_named.ogg": ("webm", "stream"),
}
"""`format` and `mode` per recording: the bytes decide, never the file's name."""
NEAR_SILENT = {"ios_voicememos_1s.m4a"}
"""Its transcript may be empty."""


def test_every_recording_in_the_manifest_is_tested() -> None:
    with (REAL_RECORDINGS / "MANIFEST.tsv").open(newline="") as manifest:
        listed = {row["file"] for row in csv.DictReader(manifest, delimiter="\t")}
    assert listed == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
async def test_real_recording_comes_back_whole(server: Server, name: str) -> None:
    path = REAL_RECORDINGS / name
    data = path.read_bytes()
    expected = ffmpeg_seconds(path)
    assert expected > 0.5
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        response = await client.post(
            f"/v1/transcriptions?fromTime={WINDOW[0]}&toTime={WINDOW[1]}",
            content=chunked(data, chunk_size=16 * 1024),
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert abs(body["duration"] - expected) <= 0.25, (body["duration"], expected)
    assert (body["format"], body["mode"]) == EXPECTED[name]
    assert body["inputSize"] == len(data)
    if name not in NEAR_SILENT:
        assert body["transcription"].strip(), "no words from a recording with speech"
    server.wait_idle()
