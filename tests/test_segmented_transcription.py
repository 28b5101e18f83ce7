"""Segmented transcription through the HTTP API: real speech, the real local model, and the
OpenAI path against the tests' OpenAI-compatible server (real SDK, real model behind it)."""

from __future__ import annotations

import itertools
import re
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from vrai_stream import errors
from vrai_stream.bodies.limits import BodyMeter
from vrai_stream.media.window import Window
from vrai_stream.pipeline.job import JobSpec, SilentListener
from vrai_stream.pipeline.segments import LiveSegments
from vrai_stream.settings import Settings
from vrai_stream.speech.segmenter import Segmenter
from vrai_stream.speech.transcribers.base import Audio, Transcriber, Transcript

from .support.audio import has_words, run_ffmpeg, speak
from .support.client import chunked
from .support.fake_openai import FakeOpenAI, Fault
from .support.server import Server, start_server, start_servers
from .support.sse import Event, RawEvents, parse_events
from .test_errors import CHUNKED, chunk_frame, raw_connection, request_head

pytestmark = pytest.mark.anyio

SPEECH = Path(__file__).resolve().parents[1].parent / "shared" / "speech"
PHRASE_WORDS = ("please", "call", "ask", "come", "bring", "fresh", "peas", "brother")
PASSAGE = "L1_ljspeech_LJ028-0030_to_0039"
"""72 s of one reader: a passage of the Babylon chapter, with its reference text."""


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


@pytest.fixture(scope="module")
def local_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    base = tmp_path_factory.mktemp("segmented")
    servers = start_servers(
        {
            mode: (base / mode, {"VRAI_TRANSCRIBE_MODE": mode, "VRAI_MAX_WINDOW_SECONDS": "600"})
            for mode in ("segments", "whole")
        }
    )
    yield servers
    for server in servers.values():
        server.stop()


async def _transcribe(server: Server, audio: bytes, query: str = "") -> dict[str, object]:
    async with httpx.AsyncClient(base_url=server.url, timeout=180) as client:
        response = await client.post(f"/v1/transcriptions{query}", content=chunked(audio))
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def test_real_speech_segmented_reads_as_well_as_the_whole_window(
    local_servers: dict[str, Server],
) -> None:
    audio = (SPEECH / f"{PASSAGE}.flac").read_bytes()
    reference = words((SPEECH / f"{PASSAGE}.txt").read_text())
    segmented = await _transcribe(local_servers["segments"], audio)
    whole = await _transcribe(local_servers["whole"], audio)
    heard = {
        mode: words(str(body["transcription"]))
        for mode, body in (("segments", segmented), ("whole", whole))
    }
    errors = {mode: word_errors(reference, hypothesis) for mode, hypothesis in heard.items()}
    # Words in order, none lost or doubled at the joins: as good as one whole-window pass.
    assert errors["segments"] <= errors["whole"] + 0.02 * len(reference), errors
    assert abs(len(heard["segments"]) - len(reference)) <= 0.05 * len(reference)
    for body in (segmented, whole):
        assert body["duration"] == pytest.approx(71.66, abs=0.25)
    # The audio sent to the model is the window's, at most: segments share none of it.
    local_servers["segments"].wait_idle()
    billed = local_servers["segments"].request_log(str(segmented["requestId"]))["billedSeconds"]
    assert 0.9 * 71.66 <= billed <= float(str(segmented["duration"])) + 0.05

    parts = segmented["segments"]
    assert isinstance(parts, list) and len(parts) >= 72 // Settings.segment_max_seconds
    starts = [part["start"] for part in parts]
    assert starts == sorted(starts)
    for before, after in itertools.pairwise(parts):
        assert before["end"] <= after["start"] + 0.05
    assert parts[-1]["end"] <= float(str(segmented["duration"])) + 0.05
    assert " ".join(part["text"] for part in parts) == segmented["transcription"]


async def test_a_silent_window_sends_nothing_to_the_model(
    local_servers: dict[str, Server], tmp_path: Path
) -> None:
    silence = tmp_path / "silence.wav"
    run_ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono:d=40", str(silence))
    body = await _transcribe(local_servers["segments"], silence.read_bytes())
    assert body["transcription"] == ""
    assert body["segments"] == []
    assert body["duration"] == pytest.approx(40.0, abs=0.25)
    # Nobody speaks: no audio went to the model.
    local_servers["segments"].wait_idle()
    assert local_servers["segments"].request_log(str(body["requestId"]))["billedSeconds"] == 0


# --- the OpenAI path: segments in parallel, each retried on its own ------------------------------


@pytest.fixture(scope="module")
def two_phrases(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, float]:
    """A phrase, 9 s of silence, another phrase: WAV, and where the second phrase begins.

    Each phrase is shorter than the server's minimum segment (4 s): one segment each.
    """
    folder = tmp_path_factory.mktemp("phrases")
    speak("Please call Stella and ask her to come.", folder / "a.wav")
    speak("Bring fresh snow peas for her brother.", folder / "b.wav")
    run_ffmpeg(
        "-i", str(folder / "a.wav"),
        "-f", "lavfi", "-i", "anullsrc=r=22050:cl=mono:d=9",
        "-i", str(folder / "b.wav"),
        "-filter_complex", "[0:a][1:a][2:a]concat=n=3:v=0:a=1",
        str(folder / "both.wav"),
    )  # fmt: skip
    return (folder / "both.wav").read_bytes(), _seconds(folder / "a.wav") + 9.0


def _seconds(path: Path) -> float:
    with wave.open(str(path)) as audio:
        return audio.getnframes() / audio.getframerate()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def openai_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI
) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("segmented-openai"),
        {**upstream.server_env(), "VRAI_SEGMENT_MIN_SECONDS": "4", "VRAI_OPENAI_MAX_RETRIES": "2"},
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream: FakeOpenAI) -> None:
    upstream.reset()


async def test_timestamps_come_from_our_cuts_for_a_model_without_any(
    openai_server: Server, upstream: FakeOpenAI, two_phrases: tuple[bytes, float]
) -> None:
    audio, second_starts = two_phrases
    async with httpx.AsyncClient(base_url=openai_server.url, timeout=120) as client:
        for response_format in ("srt", "vtt", "verbose_json"):
            response = await client.post(
                "/v1/audio/transcriptions",
                files={"file": ("phrases.wav", audio, "audio/wav")},
                data={"model": "gpt-transcribe", "response_format": response_format},
            )
            assert response.status_code == 200, response.text
            starts = _cue_starts(response, response_format)
            assert len(starts) == 2, response.text
            assert starts[0] == pytest.approx(0.0, abs=0.5)
            assert starts[1] == pytest.approx(second_starts, abs=0.5)
    # What the upstream saw: the default model, asked for JSON only, one segment each.
    seen = upstream.transcription_requests
    assert {request.form.get("model") for request in seen} == {"gpt-transcribe"}
    assert all(request.form.get("response_format") == "json" for request in seen)
    assert len(seen) == 3 * 2


def _cue_starts(response: httpx.Response, response_format: str) -> list[float]:
    if response_format == "verbose_json":
        return [segment["start"] for segment in response.json()["segments"]]
    separator = "," if response_format == "srt" else "."
    found = re.findall(rf"(\d\d):(\d\d):(\d\d){separator}(\d\d\d) -->", response.text)
    return [int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 for h, m, s, ms in found]


async def test_a_segment_that_fails_once_is_retried_on_its_own(
    openai_server: Server, upstream: FakeOpenAI, two_phrases: tuple[bytes, float]
) -> None:
    audio, _ = two_phrases
    upstream.fail_next(1, status=500)
    body = await _transcribe(openai_server, audio)
    assert has_words(str(body["transcription"]), PHRASE_WORDS, at_least=5), body["transcription"]
    # Two segments, one of them sent twice: the other was never sent again.
    assert len(upstream.transcription_requests) == 3


async def test_a_segment_that_fails_for_good_fails_the_request_with_502(
    openai_server: Server, upstream: FakeOpenAI, two_phrases: tuple[bytes, float]
) -> None:
    audio, _ = two_phrases
    upstream.fail_always(500)
    async with httpx.AsyncClient(base_url=openai_server.url, timeout=120) as client:
        response = await client.post("/v1/transcriptions", content=chunked(audio))
    assert response.status_code == 502, response.text
    assert response.json()["code"] == "transcription_failed"
    openai_server.wait_idle()
    assert openai_server.children() == []


class HungTranscriber:
    """An upstream that never answers: only the deadline ends its call.  A stand-in, so that
    the race below happens every time; the real SDK against a hung server is
    `tests/test_faults.py::test_hanging_upstream_is_504_at_the_deadline`."""

    name = "hung"

    def unsupported_language(self, language: str) -> str | None:
        return None

    async def transcribe(self, audio: Audio) -> Transcript:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


async def test_the_deadline_ends_the_call_in_flight_and_still_counts_it(tmp_path: Path) -> None:
    """The request is billed and logged for the call the deadline cut short.  The outcome
    used to be read before that call's task had ended: no count yet, and a 500."""
    pcm_path = tmp_path / "phrase.pcm"
    wav = speak("Please call Stella and ask her to bring these things.", tmp_path / "phrase.wav")
    run_ffmpeg("-i", str(wav), "-f", "s16le", "-ac", "1", "-ar", "16000", str(pcm_path))
    segments = LiveSegments(Segmenter(), BodyMeter(), SilentListener(), backlog_seconds=None)
    pipe = segments.pcm_pipe()  # only its callbacks are used: ffmpeg is not the point here
    pipe.close_write_end()
    await pipe.reader.aclose()

    async def hung() -> Transcriber:
        return HungTranscriber()

    spec = JobSpec(request_id="deadline", window=Window(0, 60))
    async with anyio.create_task_group() as group:
        group.start_soon(segments.transcribe, hung, spec, 1)
        await pipe.sink(pcm_path.read_bytes())
        await pipe.end()
        with pytest.raises(errors.TranscriptionTimeout):
            await segments.outcome(0.2)
        assert segments.calls == 1
        assert segments.billed_seconds > 2.0, segments.billed_seconds


# --- a segment's text reaches the client while it is still uploading ----------------------------


HALVES_FRAME_BYTES = 16 * 1024


@dataclass
class Streamed:
    before_rest: list[Event]
    """Events that came while the second half of the upload was held back."""
    after: list[Event]

    @property
    def done(self) -> dict[str, object]:
        last = self.after[-1]
        assert last.name == "done", [event.name for event in self.after]
        return last.data


async def in_halves(server: Server, data: bytes, *, wait_for: str = "segment") -> Streamed:
    """Send half of `data`, read events until a `wait_for` one, then send the rest."""
    frames = [
        chunk_frame(data[i : i + HALVES_FRAME_BYTES])
        for i in range(0, len(data), HALVES_FRAME_BYTES)
    ]
    half = len(frames) // 2
    async with raw_connection(server) as stream:
        headers = {**CHUNKED, "Accept": "text/event-stream"}
        await stream.send(request_head("/v1/transcriptions", headers))
        answer = RawEvents(stream)
        for frame in frames[:half]:
            await stream.send(frame)
        before: list[Event] = []
        with anyio.fail_after(60):
            await answer.head()
            while not before or before[-1].name != wait_for:
                event = await answer.next_event()
                assert event is not None, [event.name for event in before]
                before.append(event)
        for frame in frames[half:]:
            await stream.send(frame)
        await stream.send(chunk_frame(b""))
        after: list[Event] = []
        with anyio.fail_after(120):
            while (event := await answer.next_event()) is not None:
                after.append(event)
    return Streamed(before, after)


async def test_a_segment_arrives_before_the_last_byte_is_sent(
    local_servers: dict[str, Server],
) -> None:
    """Half the recording is sent, then the test waits: a `segment` event must come while the
    rest has not been sent at all; then the rest, and `done` holds that segment's words."""
    server = local_servers["segments"]
    streamed = await in_halves(server, (SPEECH / f"{PASSAGE}.flac").read_bytes())
    first = streamed.before_rest[-1].data
    assert first["index"] == 0 and first["start"] < first["end"] <= 36.0
    assert str(streamed.done["transcription"]).startswith(first["text"])
    server.wait_idle()


async def test_events_carry_the_segments_so_far_then_the_error(
    openai_server: Server, upstream: FakeOpenAI, two_phrases: tuple[bytes, float]
) -> None:
    """The first segment is heard; the second fails for good: its client sees the first
    segment's event, then `error` with the same body a JSON answer would carry."""
    audio, _ = two_phrases
    async with httpx.AsyncClient(base_url=openai_server.url, timeout=120) as client:
        plain = await client.post("/v1/transcriptions", content=chunked(audio))
        assert plain.status_code == 200, plain.text
        first_text = plain.json()["segments"][0]["text"]
        upstream.reset()
        upstream.inject(Fault(), times=1)  # the first segment is answered as usual
        upstream.inject(Fault(status=500), times=None)  # the second never is, retries included
        streamed = await client.post(
            "/v1/transcriptions",
            content=chunked(audio),
            headers={"Accept": "text/event-stream"},
        )
    events = parse_events(streamed.text)
    names = [event.name for event in events if event.name != "progress"]
    assert names == ["segment", "error"], names
    assert events[-1].data["code"] == "transcription_failed"
    assert events[-1].data["status"] == 502
    segment = next(event for event in events if event.name == "segment")
    assert segment.data["text"] == first_text
    openai_server.wait_idle()
    assert openai_server.children() == []


async def test_segment_events_are_the_answers_segments(server: Server) -> None:
    """One `segment` event per entry of the answer's `segments`, same text and times: the
    local model's calls join cuts and time their own words, and the events say what the
    answer says (11 s of real speech: 2 segments, once 1 event)."""
    audio = (SPEECH / "s01_jfk_inaugural.flac").read_bytes()
    headers = {"Accept": "text/event-stream", "Content-Type": "audio/flac"}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        streamed = await client.post("/v1/transcriptions", content=chunked(audio), headers=headers)
    assert streamed.status_code == 200, streamed.text
    events = parse_events(streamed.text)
    assert events[-1].name == "done", [event.name for event in events]
    answer = events[-1].data["segments"]
    heard = [event.data for event in events if event.name == "segment"]
    assert len(answer) >= 2, answer
    assert [event["index"] for event in heard] == list(range(len(answer)))
    assert [(s["start"], s["end"], s["text"]) for s in heard] == [
        (s["start"], s["end"], s["text"]) for s in answer
    ]


async def test_a_backlog_is_transcribed_in_batches_with_its_words_where_they_are_said(
    local_servers: dict[str, Server],
) -> None:
    """Two minutes uploaded far faster than the model hears them: the cuts made while it was
    busy go in one batched call (one a cut would be at least 5: cuts are at most 28 s), and
    each utterance's words still come at its own time in the window."""
    server = local_servers["segments"]
    audio = (SPEECH / "stitched.wav").read_bytes()
    body = await _transcribe(server, audio, "?fromTime=0&toTime=120")
    server.wait_idle()
    assert server.request_log(str(body["requestId"]))["modelCalls"] <= 3
    segments = body["segments"]
    assert isinstance(segments, list)
    times = [(segment["start"], segment["end"]) for segment in segments]
    assert times == sorted(times) and all(0 <= s < e <= 120.1 for s, e in times), times
    # Where each source sits in stitched.wav (../shared/speech/stitched_segments.tsv).
    said = {"fellow americans": (0.0, 11.0), "tedious": (11.6, 23.26), "dashwood": (38.7, 45.8),
            "capital letter": (100.5, 109.3)}  # fmt: skip
    for phrase, (start, end) in said.items():
        found = [s for s in segments if phrase in " ".join(words(s["text"]))]
        assert found, f"{phrase!r} not heard: {body['transcription']}"
        assert found[0]["start"] < end and found[0]["end"] > start, (phrase, found[0])
