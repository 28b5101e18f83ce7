"""The streaming endpoint, end to end: real server, real ffmpeg, real speech recognition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from .support.audio import SENTENCE_WORDS, decoded_seconds, has_words
from .support.client import chunked
from .support.server import Server

pytestmark = pytest.mark.anyio


async def test_chunked_upload_comes_back_as_its_words(server: Server, media: Path) -> None:
    audio = (media / "sentence.wav").read_bytes()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await client.post("/v1/transcriptions", content=chunked(audio))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    assert has_words(body["transcription"], SENTENCE_WORDS, at_least=4), body["transcription"]
    assert body["inputSize"] == len(audio)
    assert body["fileSize"] > 0
    assert 2.0 < body["duration"] < 4.0
    assert set(body["timings"]) >= {"receive", "transcode", "transcribe", "total"}
    server.wait_idle()


async def test_window_picks_the_speech_out_of_silence(server: Server, media: Path) -> None:
    audio = (media / "padded.wav").read_bytes()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        silence = await client.post("/v1/transcriptions?fromTime=0&toTime=3.5", content=audio)
        speech = await client.post("/v1/transcriptions?fromTime=3.8&toTime=7.5", content=audio)
    assert speech.status_code == 200, speech.text
    assert has_words(speech.json()["transcription"], SENTENCE_WORDS, at_least=3)
    assert silence.status_code == 200, silence.text
    assert not has_words(silence.json()["transcription"], SENTENCE_WORDS, at_least=1)


@pytest.mark.parametrize(("start", "end"), [(0, 5), (12.5, 20), (30, 59.5)])
async def test_accept_mpeg_returns_the_window_as_mp3(
    server: Server, media: Path, tmp_path: Path, start: float, end: float
) -> None:
    audio = (media / "tone60.wav").read_bytes()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await client.post(
            f"/v1/transcriptions?fromTime={start}&toTime={end}",
            content=chunked(audio),
            headers={"Accept": "audio/mpeg"},
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/mpeg"
    assert abs(decoded_seconds(response.content, tmp_path) - (end - start)) <= 0.25
    server.wait_idle()


async def test_the_mp3_streams_from_its_spool_whole_or_cut_short(
    make_server: Any, media: Path, tmp_path: Path
) -> None:
    """A minute's MP3 held on disk (no memory for spools): sent in pieces with its length,
    and its file gone both after a whole answer and after a client that left half way."""
    server = make_server(VRAI_SPOOL_MEMORY_BYTES="0")
    audio = (media / "tone60.wav").read_bytes()
    mpeg = {"Accept": "audio/mpeg"}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        whole = await client.post("/v1/transcriptions", content=chunked(audio), headers=mpeg)
        assert whole.status_code == 200, whole.text
        assert int(whole.headers["content-length"]) == len(whole.content) > 256 * 1024
        assert decoded_seconds(whole.content, tmp_path) == pytest.approx(60.0, abs=0.25)
        server.wait_idle()
        assert server.temp_files() == []
        async with client.stream(
            "POST", "/v1/transcriptions", content=chunked(audio), headers=mpeg
        ) as cut_short:
            assert cut_short.status_code == 200
            async for _ in cut_short.aiter_raw(4096):
                break  # hang up after the first piece
    server.wait_idle()
    assert server.temp_files() == []
