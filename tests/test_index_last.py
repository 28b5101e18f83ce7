"""Index-last uploads stream: CAF with `pakt` last, M4A/3GP with `moov` last, Voice Memos.

Through the HTTP API of a real server, chunked, with real speech (a minute of one reader) and the
local model: half of each upload is sent, and a `segment` event must come before the rest is
sent at all; the answer's `mode` says how it was decoded (`stream`: nothing guessed;
`speculative`: a configuration guessed from the audio, confirmed by the `moov`), and its
transcript is its faststart twin's, within the noise of segmenting.

Then the guess going wrong, on files crafted for it: a 44.1 kHz M4A where 48 kHz is guessed,
an esds that says HE-AAC, a `moov` whose sample sizes disagree with the audio, a `moov` that
never comes.  Each is decoded again from the spool (`mode: seekable`), its events withdrawn,
the fallback counted; and hostile variants end in a clear answer with nothing left behind.
"""

from __future__ import annotations

import random
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import openai
import pytest

from vrai_stream.media.index_last import Certainty
from vrai_stream.pipeline.job import Provisional
from vrai_stream.speech.transcribers.base import Segment

from .support.client import chunked
from .support.phone_media import (
    amr_ffmpeg,
    box,
    esds_descriptor,
    ffmpeg,
    full_box,
    parse_adts,
    write_aac_caf,
)
from .support.server import Server
from .support.voice_memos import top_boxes, voice_memo
from .test_segmented_transcription import PASSAGE, SPEECH, in_halves, word_errors, words

pytestmark = pytest.mark.anyio

SECONDS = 60.0
"""The passage's first minute: its first half is longer than the longest segment (28 s), so
a segment is cut in it wherever the reader pauses."""


@dataclass(frozen=True)
class Recording:
    data: bytes
    mode: str
    """What the answer must say."""
    twin: str
    """The same audio in a layout ffmpeg reads from a pipe."""


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Recording]:
    folder = tmp_path_factory.mktemp("index-last")
    source = str(folder / "passage.wav")
    ffmpeg("-i", str(SPEECH / f"{PASSAGE}.flac"), "-t", f"{SECONDS:g}", source)
    built: dict[str, Recording] = {}

    def aac(rate: int) -> Path:
        target = folder / f"passage{rate}.aac"
        ffmpeg("-i", source, "-ac", "1", "-ar", str(rate), "-c:a", "aac", "-b:a", "64k",
               "-f", "adts", str(target))  # fmt: skip
        return target

    def m4a(adts: Path, name: str, *flags: str) -> bytes:
        target = folder / name
        ffmpeg("-i", str(adts), "-c", "copy", "-bsf:a", "aac_adtstoasc", *flags, str(target))
        return target.read_bytes()

    def caf(adts: Path, name: str, *, pakt_first: bool) -> bytes:
        stream = parse_adts(adts.read_bytes())
        frames = 1024 * len(stream.packets)
        target = folder / name
        write_aac_caf(target, stream, valid_frames=frames, priming=0, pakt_first=pakt_first)
        return target.read_bytes()

    def amr(name: str, *flags: str) -> bytes:
        target = folder / name
        ffmpeg("-i", source, "-ar", "8000", "-ac", "1", "-c:a", "libopencore_amrnb",
               "-b:a", "12.2k", "-use_editlist", "0", *flags, str(target),
               binary=amr_ffmpeg())  # fmt: skip
        return target.read_bytes()

    at48, at44 = aac(48000), aac(44100)
    built["caf-pakt-first"] = Recording(caf(at48, "first.caf", pakt_first=True), "stream", "")
    built["caf-pakt-last"] = Recording(
        caf(at48, "last.caf", pakt_first=False), "stream", "caf-pakt-first"
    )
    built["m4a-faststart"] = Recording(m4a(at48, "fast.m4a", "-movflags", "+faststart"), "", "")
    built["m4a-moov-last"] = Recording(m4a(at48, "last.m4a"), "speculative", "m4a-faststart")
    built["voice-memos"] = Recording(voice_memo(at48.read_bytes()), "stream", "m4a-faststart")
    built["3gp-faststart"] = Recording(amr("fast.3gp", "-movflags", "+faststart"), "stream", "")
    built["3gp-amr"] = Recording(amr("last.3gp"), "stream", "3gp-faststart")
    built["m4a-44k-moov-last"] = Recording(m4a(at44, "last44.m4a"), "seekable", "m4a-faststart")
    return built


async def transcribe(server: Server, data: bytes, *, mp3: bool = False) -> httpx.Response:
    """The transcript (or, with `mp3`, the window's MP3 alone: quicker where no word counts)."""
    headers = {"Accept": "audio/mpeg"} if mp3 else {}
    async with httpx.AsyncClient(base_url=server.url, timeout=180) as client:
        return await client.post("/v1/transcriptions", content=chunked(data), headers=headers)


def fallbacks_counted(server: Server, container: str) -> float:
    return server.metric(f'vrai_index_last_fallbacks_total{{format="{container}"}}')


_TWINS: dict[str, str] = {}


async def twin_transcript(server: Server, recordings: dict[str, Recording], name: str) -> str:
    if name not in _TWINS:
        response = await transcribe(server, recordings[name].data)
        assert response.status_code == 200, response.text
        assert response.json()["mode"] == "stream"
        _TWINS[name] = response.json()["transcription"]
    return _TWINS[name]


def close_enough(heard: str, twin: str) -> bool:
    """Within segmenting's noise: when cuts are joined depends on when the bytes arrive."""
    return word_errors(words(twin), words(heard)) <= 0.1 * len(words(twin))


# --- every index-last layout streams -----------------------------------------------------------


@pytest.mark.parametrize("name", ["caf-pakt-last", "m4a-moov-last", "voice-memos", "3gp-amr"])
async def test_an_index_last_upload_is_transcribed_while_it_arrives(
    server: Server, recordings: dict[str, Recording], name: str
) -> None:
    recording = recordings[name]
    streamed = await in_halves(server, recording.data)
    first = streamed.before_rest[-1].data
    assert first["index"] == 0 and first["start"] < first["end"] <= SECONDS / 2
    done = streamed.done
    assert done["mode"] == recording.mode
    assert done["inputSize"] == len(recording.data)
    assert done["duration"] == pytest.approx(SECONDS, abs=0.3)
    assert "withdrawn" not in [event.name for event in streamed.after]
    twin = await twin_transcript(server, recordings, recording.twin)
    assert close_enough(str(done["transcription"]), twin), (done["transcription"], twin)
    logged = server.request_log(str(done["requestId"]))
    assert logged["mode"] == recording.mode and "fallback" not in logged
    server.wait_idle()
    assert server.children() == []


# --- a guess the moov proves wrong ----------------------------------------------------------


async def test_a_wrong_guess_is_withdrawn_and_decoded_again(
    server: Server, recordings: dict[str, Recording]
) -> None:
    """An Apple-branded M4A at 44.1 kHz: 48 kHz is guessed, and its segments are sent; the
    moov says 44.1 kHz, so they are withdrawn, and the spool is decoded: `seekable`."""
    counted = fallbacks_counted(server, "mp4")
    streamed = await in_halves(server, recordings["m4a-44k-moov-last"].data)
    names = [event.name for event in streamed.after if event.name != "progress"]
    assert "withdrawn" in names, names
    withdrawn = names.index("withdrawn")
    reason = next(event.data["reason"] for event in streamed.after if event.name == "withdrawn")
    assert "44100 Hz" in reason, reason
    again = [event.data for event in streamed.after if event.name == "segment"]
    again = again[sum(1 for name in names[:withdrawn] if name == "segment") :]
    done = streamed.done
    assert done["mode"] == "seekable"
    # After the withdrawal the segments come again from 0, and they add up to the answer.
    assert [segment["index"] for segment in again] == list(range(len(again)))
    assert " ".join(segment["text"] for segment in again) == done["transcription"]
    twin = await twin_transcript(server, recordings, "m4a-faststart")
    assert close_enough(str(done["transcription"]), twin), (done["transcription"], twin)
    assert fallbacks_counted(server, "mp4") == counted + 1
    logged = server.request_log(str(done["requestId"]))
    assert logged["mode"] == "seekable" and "44100 Hz" in logged["fallback"]
    server.wait_idle()


async def test_a_moov_that_never_comes_withdraws_then_fails(
    server: Server, recordings: dict[str, Recording]
) -> None:
    """Cut right after the mdat: what streamed cannot be confirmed, so it is withdrawn, and
    the spool alone (no index) cannot be decoded: the error that `seekable` gives."""
    data = recordings["m4a-moov-last"].data
    cut = data[: data.rindex(b"moov") - 4]
    streamed = await in_halves(server, cut)
    names = [event.name for event in streamed.after if event.name != "progress"]
    assert names[0] == "withdrawn" and names[-1] == "error", names
    error = streamed.after[-1].data
    assert error["status"] == 422, error
    logged = server.request_log(str(error["requestId"]))
    assert "no moov" in logged["fallback"]
    server.wait_idle()
    assert server.children() == []


# --- crafted files: each disagreement sends the job to its spool -------------------------------


def _mp4a_sample_description(asc: bytes, *, rate: int, channels: int) -> bytes:
    cookie = esds_descriptor(asc, avg_bitrate=64000, max_bitrate=96000, buffer_size=1536)
    esds = full_box(b"esds", 0, 0, cookie)
    entry = box(
        b"mp4a",
        bytes(6) + struct.pack(">H", 1),  # reserved, data reference index
        struct.pack(">HHIHHHHI", 0, 0, 0, channels, 16, 0, 0, rate << 16),
        esds,
    )
    return full_box(b"stsd", 0, 0, struct.pack(">I", 1), entry)


def _with_moov(data: bytes, edit: dict[bytes, bytes]) -> bytes:
    """`data` (moov last) with boxes of its moov replaced: the stsd, the stsz, ..."""
    from .support.voice_memos import _rebuilt

    at = data.rindex(b"moov") - 4
    moov = dict(top_boxes(data[at:]))[b"moov"]
    return data[:at] + box(b"moov", _rebuilt(moov, edit))


def _swapped_sizes(data: bytes) -> bytes:
    """The stsz with two neighbouring sizes swapped: same total, other boundaries."""
    at = data.rindex(b"stsz") - 4
    (size,) = struct.unpack_from(">I", data, at)
    stsz = bytearray(data[at : at + size])
    first = 20 + 4 * 100
    stsz[first : first + 8] = stsz[first + 4 : first + 8] + stsz[first : first + 4]
    assert stsz[first : first + 4] != stsz[first + 4 : first + 8], "equal sizes: pick others"
    return bytes(stsz)


@pytest.mark.parametrize("kind", ["he-aac-esds", "sizes-disagree"])
async def test_a_moov_that_disagrees_sends_the_job_to_its_spool(
    server: Server, recordings: dict[str, Recording], kind: str
) -> None:
    data = recordings["m4a-moov-last"].data
    if kind == "he-aac-esds":
        # HE-AAC (object type 5): an LC core at 24 kHz, 48 kHz out, one channel.
        he_aac = bytes.fromhex("2b098800")  # 00101 0110 0001 0011 00010 000
        crafted = _with_moov(
            data, {b"stsd": _mp4a_sample_description(he_aac, rate=48000, channels=1)}
        )
        reason = "HE-AAC"
    else:
        crafted = _with_moov(data, {b"stsz": _swapped_sizes(data)})
        reason = "sample sizes"
    counted = fallbacks_counted(server, "mp4")
    response = await transcribe(server, crafted, mp3=True)
    request_id = response.headers["x-request-id"]
    server.wait_idle()
    logged = server.request_log(request_id)
    assert reason in logged["fallback"], logged
    assert logged["mode"] == "seekable"
    assert fallbacks_counted(server, "mp4") == counted + 1
    # The file as its index describes it, decoded from the spool: whatever ffmpeg makes of it.
    assert response.status_code in (200, 422), response.text
    assert server.children() == []


# --- hostile variants ------------------------------------------------------------------------


def _ftyp() -> bytes:
    return box(b"ftyp", b"M4A ", b"\0\0\0\0", b"M4A isommp42")


@pytest.mark.parametrize("kind", ["random-mdat", "mdat-claims-4-gb", "amr-header-lies"])
async def test_hostile_index_last_uploads_end_cleanly(
    server: Server, recordings: dict[str, Recording], kind: str
) -> None:
    rng = random.Random(19)
    if kind == "random-mdat":
        body = _ftyp() + box(b"mdat", rng.randbytes(300_000))
        expected = {422}
    elif kind == "mdat-claims-4-gb":
        body = _ftyp() + struct.pack(">I4sQ", 1, b"mdat", 4 << 30) + rng.randbytes(200_000)
        expected = {422}
    else:
        # One AMR frame header in the middle says "no data" (one byte) where 32 bytes follow:
        # frames no longer line up, the stream stops, and the spool (its moov intact) decodes.
        data = bytearray(recordings["3gp-amr"].data)
        mdat = data.index(b"mdat") + 4 + 32 * 400
        assert data[mdat] == 0x3C  # a 12.2 kbit/s frame's header
        data[mdat] = 0x7C
        body = bytes(data)
        expected = {200}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        with anyio.fail_after(60):
            response = await client.post(
                "/v1/transcriptions", content=chunked(body, chunk_size=8192)
            )
    assert response.status_code in expected, response.text
    assert response.headers["content-type"] == "application/json"
    logged = server.request_log(response.headers["x-request-id"])
    assert logged["mode"] == "seekable"
    server.wait_idle()
    assert server.children() == []
    assert not [p for p in server.tmp_dir.iterdir() if re.search(r"\.(input|spool)$", p.name)]


@pytest.fixture(scope="module", autouse=True)
def _forget_twins() -> Iterator[None]:
    yield
    _TWINS.clear()


# --- listeners that cannot take a segment back --------------------------------------------------


class _Deltas:
    """A listener like OpenAI's stream: what it sends stays sent."""

    can_withdraw = False

    def __init__(self) -> None:
        self.heard: list[int] = []
        self.withdrawn: list[str] = []

    def progress(self, received_bytes: int, decoded_seconds: float) -> None:
        pass

    def segment(self, index: int, segment: Segment) -> None:
        self.heard.append(index)

    def withdraw(self, reason: str) -> None:
        self.withdrawn.append(reason)


class _Guessing:
    certainty = Certainty.GUESSED


def test_segments_of_a_guess_wait_for_the_index_where_they_cannot_be_taken_back() -> None:
    deltas = _Deltas()
    provisional = Provisional(deltas, _Guessing())  # type: ignore[arg-type]
    provisional.segment(0, Segment(0.0, 1.0, "one"))
    provisional.segment(1, Segment(1.0, 2.0, "two"))
    assert deltas.heard == []
    provisional.confirm()
    assert deltas.heard == [0, 1]
    provisional.segment(2, Segment(2.0, 3.0, "three"))  # after the check: at once
    assert deltas.heard == [0, 1, 2]

    refuted = _Deltas()
    provisional = Provisional(refuted, _Guessing())  # type: ignore[arg-type]
    provisional.segment(0, Segment(0.0, 1.0, "one"))
    provisional.withdraw("the moov says otherwise")
    provisional.segment(1, Segment(1.0, 2.0, "late"))  # a call under way when it failed
    assert refuted.heard == [] and refuted.withdrawn == ["the moov says otherwise"]


async def test_openai_stream_of_a_guessed_upload_adds_up_to_its_text(
    server: Server, recordings: dict[str, Recording]
) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    stream = await client.audio.transcriptions.create(
        model="whisper-1",
        file=("note.m4a", recordings["m4a-moov-last"].data, "audio/mp4"),
        stream=True,
    )
    deltas, done = [], ""
    async for event in stream:
        if event.type == "transcript.text.delta":
            deltas.append(event.delta)
        elif event.type == "transcript.text.done":
            done = event.text
    await client.close()
    assert done and "".join(deltas) == done
    server.wait_idle()
    assert server.request_logs()[-1]["mode"] == "speculative"
