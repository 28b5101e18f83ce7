"""Recordings as phones write them, through the HTTP API of a real server.

Every layout the app uploads comes back with its words, the container and the mode
(`stream`: piped into ffmpeg as it arrives; `seekable`: spooled to disk first, because
ffmpeg must seek) in the response, the log line and the metrics, with the body read to its end and
nothing left behind.  The matrix below is the one the README shows.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from .support.audio import SENTENCE_WORDS, has_words
from .support.client import chunked
from .support.phone_media import DEBIAN_FFMPEG, FIXTURE_NAMES, SPEECH_WINDOW, PhoneFile, phone_files
from .support.server import Server

pytestmark = pytest.mark.anyio

README_MATRIX = """\
| recording | written by | codec | layout | `format` | `mode` |
| --- | --- | --- | --- | --- | --- |
| caf-aac-pakt-last | iPhone (AVAudioRecorder .caf) | AAC-LC | pakt after data | caf | stream |
| caf-aac-pakt-first | converters (table first) | AAC-LC | pakt before data | caf | stream |
| caf-alac | iPhone (AVAudioRecorder ALAC) | ALAC | pakt after data | caf | seekable |
| caf-lpcm | iPhone (AVAudioRecorder LPCM) | LPCM s16 | constant packets, no pakt | caf | stream |
| caf-ima4 | iPhone (AVAudioRecorder IMA4) | IMA4 ADPCM | constant packets, no pakt | caf | stream |
| m4a-moov-last | AVAudioRecorder (.m4a) | AAC-LC | moov after mdat | mp4 | speculative |
| m4a-voice-memos | iPhone Voice Memos | AAC-LC | hoov, moof fragments, moov last | mp4 | stream |
| m4a-faststart | web exports | AAC-LC | moov before mdat (faststart) | mp4 | stream |
| mp4-fragmented | Safari MediaRecorder | AAC-LC | fragmented (moof+mdat) | mp4 | stream |
| 3gp-amr | Android MediaRecorder THREE_GPP | AMR-NB 8 kHz | moov after mdat | 3gp | stream |
| 3gp-amr-faststart | Android (moov up front) | AMR-NB 8 kHz | moov before mdat | 3gp | stream |
| webm-opus | Android MediaRecorder WEBM, Chrome | Opus | Matroska clusters | webm | stream |
| ogg-opus | Android MediaRecorder OGG, WhatsApp | Opus | Ogg pages | ogg | stream |
| wav | recorder apps | PCM s16le | RIFF with sizes | wav | stream |
| wav-streaming | streaming recorders | PCM s16le | RIFF and data sizes 0xFFFFFFFF | wav | stream |
| mp3-id3 | recorder apps | MP3 | ID3v2 tag, then frames | mp3 | stream |
| flac | recorder apps | FLAC | STREAMINFO, then frames | flac | stream |
| adts-aac | Android MediaRecorder AAC_ADTS | AAC-LC | ADTS frames | aac | stream |
"""
"""What the README lists; `test_readme_matrix_is_what_the_tests_verify` keeps them equal."""


@pytest.fixture(scope="session")
def phones(media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhoneFile]:
    return phone_files(tmp_path_factory.getbasetemp() / "phones", media / "sentence.wav")


def uploads_counted(server: Server, phone: PhoneFile) -> float:
    """`vrai_uploads_total` for this recording's container and mode, from /metrics."""
    return server.metric(f'vrai_uploads_total{{format="{phone.container}",mode="{phone.mode}"}}')


async def transcribe(
    server: Server, data: bytes, window: tuple[float, float] = SPEECH_WINDOW
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        return await client.post(
            f"/v1/transcriptions?fromTime={window[0]}&toTime={window[1]}",
            content=chunked(data),
        )


@pytest.mark.parametrize("name", FIXTURE_NAMES)
async def test_phone_recording_comes_back_as_its_words(
    server: Server, phones: dict[str, PhoneFile], name: str
) -> None:
    phone = phones[name]
    data = phone.read()
    counted_before = uploads_counted(server, phone)
    response = await transcribe(server, data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert has_words(body["transcription"], SENTENCE_WORDS, at_least=3), body["transcription"]
    assert (body["format"], body["mode"]) == (phone.container, phone.mode)
    # The window, not the whole recording, was transcoded ...
    assert abs(body["duration"] - (SPEECH_WINDOW[1] - SPEECH_WINDOW[0])) <= 0.25
    # ... and the body was still read to its end, in STREAM and in SEEKABLE mode alike.
    assert body["inputSize"] == len(data)
    logged = server.request_log(body["requestId"])
    assert (logged["format"], logged["mode"]) == (phone.container, phone.mode)
    assert (logged["status"], logged["code"]) == (200, "ok")
    assert logged["inputSize"] == len(data)
    assert uploads_counted(server, phone) == counted_before + 1
    server.wait_idle()


SEEKING = ("caf-aac-pakt-last", "caf-alac", "m4a-moov-last")
"""The recordings ffmpeg cannot read from a pipe."""


@pytest.mark.parametrize("name", ["caf-aac-pakt-last", "m4a-moov-last", "caf-alac"])
async def test_a_window_deep_into_an_index_last_recording(
    server: Server, phones: dict[str, PhoneFile], name: str
) -> None:
    """The clip repeats every ~10 s: the 11th sentence is found where the 1st was, + 100 s.

    ffmpeg stops reading at 104.3 s; the rest of the upload is still followed to its index,
    which confirms what was streamed."""
    phone = phones[name]
    response = await transcribe(server, phone.read(), window=(100.3, 104.3))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == phone.mode
    assert has_words(body["transcription"], SENTENCE_WORDS, at_least=3), body["transcription"]
    assert abs(body["duration"] - 4.0) <= 0.25
    server.wait_idle()


@pytest.mark.parametrize("name", SEEKING)
def test_plain_ffmpeg_cannot_read_these_from_a_pipe(
    phones: dict[str, PhoneFile], name: str
) -> None:
    """Why SEEKABLE exists: > 6 MB, past ffmpeg's probe buffer, the pipe yields no audio."""
    phone = phones[name]
    assert phone.needs_seeking
    data = phone.read()
    assert len(data) > 6_000_000

    def decoded_seconds(source: str, stdin: bytes | None) -> float:
        done = subprocess.run(
            [DEBIAN_FFMPEG, "-v", "error", "-i", source, "-t", "30", "-ac", "1", "-ar", "8000",
             "-f", "s16le", "pipe:1"],
            input=stdin, capture_output=True, timeout=60,
        )  # fmt: skip
        return len(done.stdout) / 16_000

    assert decoded_seconds("pipe:0", data) < 1.0
    assert decoded_seconds(str(phone.path), None) == pytest.approx(30.0, abs=0.1)


def _parse_matrix(text: str) -> dict[str, tuple[str, ...]]:
    rows = [line.strip("|").split("|") for line in text.strip().splitlines()[2:]]
    return {cells[0].strip(): tuple(cell.strip() for cell in cells[1:]) for cells in rows}


def test_readme_matrix_is_what_the_tests_verify(phones: dict[str, PhoneFile]) -> None:
    assert README_MATRIX in (Path(__file__).parents[1] / "README.md").read_text()
    matrix = _parse_matrix(README_MATRIX)
    assert list(matrix) == list(FIXTURE_NAMES)
    for name, phone in phones.items():
        row = matrix[name]
        assert row[-2:] == (phone.container, phone.mode), name
        assert row[:3] == (phone.written_by, phone.codec, phone.layout), name
    seekable = {name for name, row in matrix.items() if row[-1] == "seekable"}
    assert seekable == {"caf-alac"}
