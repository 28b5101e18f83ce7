"""Fixtures shared by the tests; the helpers they use live in `support`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support.audio import SENTENCE, run_ffmpeg, speak
from .support.phone_media import NOISE_AMPLITUDE
from .support.s3_server import MotoServer, start_moto
from .support.server import Server, start_server


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service on embedded defaults, shared by the tests that do not change settings."""
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's S3 on loopback, started once: each test keeps to a bucket of its own."""
    running = start_moto(tmp_path_factory.mktemp("moto"))
    yield running
    running.stop()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Any]:
    """Start a server with extra environment variables; stopped after the test."""
    started: list[Server] = []

    def make(**env: str) -> Server:
        running = start_server(tmp_path / f"server{len(started)}", env)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of generated recordings, made once per test session."""
    folder = tmp_path_factory.mktemp("media")
    speak(SENTENCE, folder / "clean.wav")
    # Over a faint noise bed, as a phone hears it: tiny.en's reading of espeak's clean voice
    # flips on inaudible differences ("brown fox" from MP3, "roundfark" from lossless PCM).
    noise = f"anoisesrc=color=pink:amplitude={NOISE_AMPLITUDE}:sample_rate=22050:seed=7"
    run_ffmpeg(
        "-i", str(folder / "clean.wav"),
        "-f", "lavfi", "-i", noise,
        "-filter_complex", "[0:a][1:a]amix=inputs=2:duration=first:normalize=0",
        str(folder / "sentence.wav"),
    )  # fmt: skip
    # 4 s of silence, the sentence, then silence again: windows can pick the speech out.
    run_ffmpeg(
        "-f", "lavfi", "-i", "anullsrc=r=22050:cl=mono:d=4",
        "-i", str(folder / "sentence.wav"),
        "-f", "lavfi", "-i", "anullsrc=r=22050:cl=mono:d=4",
        "-filter_complex", "[0:a][1:a][2:a]concat=n=3:v=0:a=1",
        str(folder / "padded.wav"),
    )  # fmt: skip
    # A minute of tone: long enough for windows and slow uploads.
    run_ffmpeg(
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=60",
        "-ac", "2", "-c:a", "pcm_s16le", str(folder / "tone60.wav"),
    )  # fmt: skip
    return folder
