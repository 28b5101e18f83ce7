"""Time after the last byte, per phone format: what streaming saves, and what seeking costs.

For a ~5-minute recording in each format phones write, this script uploads the file to a
real server (started here, on loopback) as fast as the socket takes it, chunked, with
`Accept: audio/mpeg` (the trimmed MP3 comes back, no transcription), and measures on the
client the time from the last chunk sent to the response complete.

In STREAM mode ffmpeg decodes while the body arrives, so what is left after the last byte
is the tail of its work.  In SEEKABLE mode (M4A with `moov` last, CAF with `pakt` last)
the body goes to disk first and ffmpeg's whole run comes after the last byte: the column
"ffmpeg alone" (the same conversion, file to file, without the service) shows that cost.

The recordings are built here, 5 minutes long, in the formats of the tests' phone matrix
(`tests/support/phone_media.py`); ffmpeg cannot mux AAC into CAF, so the tests' CAF writer does it
the way Apple's AudioFile API does (desc, chan, kuki, data, pakt).

Then, on the same server, PACED TRANSCRIPTS: what an index-last layout costs now that it
streams too.  Each layout phones write with its index after the audio (CAF with `pakt`
last, M4A with `moov` last, the iPhone Voice Memos layout, Android's 3GP/AMR-NB) is uploaded
beside its faststart twin (the same audio, laid out so ffmpeg reads it from a pipe): the
first `--seconds` of real speech (../shared/speech/stitched.wav, 48 kHz mono), AAC 64 kbit/s
or AMR-NB 12.2k, built as tests/test_index_last.py builds them.  Each upload goes over a raw
connection, chunked, paced at `--rate-kbps` KiB/s (8 KiB chunks on a schedule from its
start, as a phone's link would send it), with `Accept: text/event-stream`, while another
task reads the events as they come.  Twin and layout alternate (twin first on even repeats),
so the machine's drift falls on both.  Reported per layout, medians over the repeats: the
answer's `mode`, the wait after the last byte (`done` minus the last chunk sent) beside the
twin's, the time from the upload's start to the first `segment` event, and the segments that
came before the last byte.  Targets: wait <= 1.5x the twin's AND <= 1.5 s; first segment
within 15 s of the upload's start.

Exit status 1 when an upload fails (not 200, an `error` event, no `done`) or when a paced
target is missed; the tables are printed and the JSON (`paced` key) written either way.

Run: .venv/bin/python -m bench.formats [--seconds 300] [--repeats 3] [--only wav,caf-alac]
     [--paced-repeats 2] [--rate-kbps 64] [--skip-mp3] [--skip-paced] [--corpus DIR]
     [--output formats.json]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx

from tests.support.phone_media import (
    FIXTURE_NAMES,
    amr_ffmpeg,
    parse_adts,
    streaming_wav,
    wav_samples,
    write_aac_caf,
)
from tests.support.sse import Event, RawEvents
from tests.support.voice_memos import voice_memo

from .common import (
    REPO_DIR,
    ServerProcess,
    describe_machine,
    machine,
    markdown_table,
    median,
    run_ffmpeg,
    running_service,
    tool,
    with_wait,
    write_json,
)

RATE = 48_000
CHUNK_BYTES = 64 * 1024
WINDOW_SECONDS = 300.0
SPEECH_TEXT = (
    "This is a voice note recorded on a phone. Remind me to call the plumber about the "
    "kitchen sink, and to move the team meeting to Thursday afternoon."
)
FORMATS = FIXTURE_NAMES
"""The phone matrix of the README, in its order: the tests build the same formats."""


# --- the corpus ---------------------------------------------------------------------------


def recording(folder: Path, seconds: float) -> Path:
    """48 kHz mono: a spoken paragraph, looped, over a faint noise bed, `seconds` long."""
    speech = folder / "speech.wav"
    subprocess.run(
        [tool("espeak-ng"), "-v", "en-us", "-s", "160", "-w", str(speech), SPEECH_TEXT],
        check=True,
    )
    path = folder / "recording.wav"
    run_ffmpeg(
        "-stream_loop", "-1", "-i", str(speech),
        "-f", "lavfi", "-i",
        f"anoisesrc=color=pink:amplitude=0.01:sample_rate={RATE}:duration={seconds}",
        "-filter_complex",
        f"[0:a]aresample={RATE}[voice];[voice][1:a]amix=inputs=2:duration=shortest:normalize=0",
        "-ac", "1", "-ar", str(RATE), "-c:a", "pcm_s16le", str(path),
    )  # fmt: skip
    return path


def build_corpus(folder: Path, seconds: float, only: set[str]) -> dict[str, Path]:
    """Every format from one recording; files already in `folder` (--corpus) are reused."""
    folder = folder / f"{seconds:g}s"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "recording.wav"
    if not source.exists():
        recording(folder, seconds)
    samples = wav_samples(source)
    src = str(source)
    adts = folder / "phone.aac"

    def aac() -> Path:
        if not adts.exists():
            run_ffmpeg("-i", src, "-c:a", "aac", "-b:a", "64k", "-f", "adts", str(adts))
        return adts

    def mp4(name: str, *flags: str) -> Path:
        path = folder / name
        if path.exists():
            return path
        run_ffmpeg("-i", str(aac()), "-c", "copy", "-bsf:a", "aac_adtstoasc", *flags, str(path))
        return path

    def caf(name: str, pakt_first: bool) -> Path:
        stream = parse_adts(aac().read_bytes())
        return write_aac_caf(
            folder / name, stream, valid_frames=samples, priming=1024, pakt_first=pakt_first
        )

    def encode(name: str, *args: str, binary: str | None = None) -> Path:
        path = folder / name
        if path.exists():
            return path
        run_ffmpeg("-i", src, *args, str(path), binary=binary)
        return path

    def memo(name: str) -> Path:
        path = folder / name
        if not path.exists():
            path.write_bytes(voice_memo(aac().read_bytes()))
        return path

    amr = ["-ar", "8000", "-ac", "1", "-c:a", "libopencore_amrnb", "-b:a", "12.2k"]
    builders = {
        "caf-aac-pakt-last": lambda: caf("aac-pakt-last.caf", pakt_first=False),
        "caf-aac-pakt-first": lambda: caf("aac-pakt-first.caf", pakt_first=True),
        "caf-alac": lambda: encode("alac.caf", "-c:a", "alac", "-f", "caf"),
        "caf-lpcm": lambda: encode("lpcm.caf", "-c:a", "pcm_s16le", "-f", "caf"),
        "caf-ima4": lambda: encode("ima4.caf", "-c:a", "adpcm_ima_qt", "-f", "caf"),
        "m4a-moov-last": lambda: mp4("moov-last.m4a"),
        "m4a-voice-memos": lambda: memo("voice-memo.m4a"),
        "m4a-faststart": lambda: mp4("faststart.m4a", "-movflags", "+faststart"),
        "mp4-fragmented": lambda: mp4(
            "fragmented.mp4", "-f", "mp4", "-movflags", "frag_keyframe+empty_moov"
        ),
        "3gp-amr": lambda: encode("phone.3gp", *amr, binary=amr_ffmpeg()),
        "3gp-amr-faststart": lambda: encode(
            "faststart.3gp", *amr, "-movflags", "+faststart", binary=amr_ffmpeg()
        ),
        "webm-opus": lambda: encode("phone.webm", "-c:a", "libopus", "-b:a", "32k"),
        "ogg-opus": lambda: encode("phone.ogg", "-c:a", "libopus", "-b:a", "32k"),
        "wav": lambda: source,
        "wav-streaming": lambda: streaming_wav(source, folder / "streaming.wav"),
        "mp3-id3": lambda: encode(
            "phone.mp3",
            "-c:a",
            "libmp3lame",
            "-b:a",
            "64k",
            "-id3v2_version",
            "3",
            "-metadata",
            "title=Voice note",
        ),
        "flac": lambda: encode("phone.flac", "-c:a", "flac"),
        "adts-aac": aac,
    }
    corpus = {}
    for name in FORMATS:
        if name in only:
            started = time.monotonic()
            corpus[name] = builders[name]()
            size = corpus[name].stat().st_size
            took = time.monotonic() - started
            print(f"  {name}: {size / 1e6:.1f} MB ({took:.1f} s to build)", flush=True)
    return corpus


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Run:
    status: int
    after_last_byte: float
    total: float
    server_after_last_byte: float | None
    mp3_bytes: int
    audio_seconds: float | None


@dataclass
class FormatResult:
    name: str
    path: str
    bytes: int
    container: str | None = None
    mode: str | None = None
    ffmpeg_alone_seconds: float | None = None
    runs: list[Run] = field(default_factory=list)

    @property
    def after_last_byte(self) -> float:
        return median([run.after_last_byte for run in self.runs])

    @property
    def server_after_last_byte(self) -> float:
        values = [run.server_after_last_byte for run in self.runs]
        return median([value for value in values if value is not None])

    @property
    def total(self) -> float:
        return median([run.total for run in self.runs])


async def upload(server: ServerProcess, data: bytes) -> tuple[httpx.Response, float, float]:
    """Send `data` chunked, unthrottled; return the response, time after the last chunk, total."""
    last_chunk_sent = 0.0

    async def body() -> AsyncIterator[bytes]:
        nonlocal last_chunk_sent
        view = memoryview(data)
        for offset in range(0, len(data), CHUNK_BYTES):
            yield bytes(view[offset : offset + CHUNK_BYTES])
        # httpx asks for the next chunk once the last one is written to the socket.
        last_chunk_sent = time.perf_counter()

    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
        started = time.perf_counter()
        response = await client.post(
            f"{server.url}/v1/transcriptions?fromTime=0&toTime={WINDOW_SECONDS:g}",
            content=body(),
            headers={"Accept": "audio/mpeg"},
        )
        finished = time.perf_counter()
    return response, finished - last_chunk_sent, finished - started


def ffmpeg_alone(path: Path, folder: Path) -> float:
    """The same conversion without the service: file in, 16 kHz mono MP3 file out."""
    target = folder / "alone.mp3"
    started = time.perf_counter()
    run_ffmpeg(
        "-i", str(path), "-map", "0:a:0", "-t", f"{WINDOW_SECONDS:g}", "-ac", "1",
        "-ar", "16000", "-c:a", "libmp3lame", "-b:a", "32k", str(target),
    )  # fmt: skip
    took = time.perf_counter() - started
    target.unlink()
    return took


def measure(
    server: ServerProcess, name: str, path: Path, repeats: int, scratch: Path
) -> FormatResult:
    data = path.read_bytes()
    result = FormatResult(name=name, path=path.name, bytes=len(data))
    result.ffmpeg_alone_seconds = ffmpeg_alone(path, scratch)
    for _ in range(repeats):
        response, after_last_byte, total = anyio.run(upload, server, data)
        request = server.request_logs().get(response.headers.get("x-request-id", ""), {})
        timings = request.get("timings") or {}
        result.container = request.get("format", result.container)
        result.mode = request.get("mode", result.mode)
        duration = response.headers.get("x-audio-duration")
        result.runs.append(
            Run(
                status=response.status_code,
                after_last_byte=after_last_byte,
                total=total,
                server_after_last_byte=with_wait(timings).get("afterLastByte"),
                mp3_bytes=len(response.content) if response.status_code == 200 else 0,
                audio_seconds=float(duration) if duration else None,
            )
        )
        if response.status_code != 200:
            print(f"  {name}: HTTP {response.status_code} {response.text[:200]}", flush=True)
        server.wait_idle()
    return result


def table(results: list[FormatResult]) -> str:
    rows = [
        [
            result.name,
            f"{result.bytes / 1e6:.2f} MB",
            result.container or "?",
            result.mode or "?",
            f"{result.after_last_byte:.2f}",
            f"{result.server_after_last_byte:.2f}",
            f"{result.ffmpeg_alone_seconds or 0:.2f}",
            f"{result.total:.2f}",
            f"{median([run.audio_seconds or 0 for run in result.runs]):.1f}",
        ]
        for result in results
    ]
    headers = [
        "recording",
        "bytes",
        "format",
        "mode",
        "after last byte, s",
        "server's own, s",
        "ffmpeg alone, s",
        "total, s",
        "MP3 audio, s",
    ]
    return markdown_table(headers, rows)


# --- paced transcripts: index-last layouts beside their faststart twins --------------------

SPEECH_SOURCE = REPO_DIR.parent / "shared" / "speech" / "stitched.wav"
"""Real human speech (several readers, 331 s at 16 kHz): the segmenter cuts at real pauses
and the model has real words to find, so the first segment comes when it would on a phone."""
PACED_CHUNK_BYTES = 8 * 1024
PACED_TIMEOUT_SECONDS = 300.0
"""Beyond the upload's own length: a fallback decodes the whole spool after the last byte."""
WARM_UP_BYTES = 80 * 1024
"""About 10 s of the ADTS AAC (a prefix of ADTS is still ADTS): the model's first run is
slower, and no measured upload should pay for it."""
PACED_PAIRS: tuple[tuple[str, str], ...] = (
    ("caf-aac-pakt-last", "caf-aac-pakt-first"),
    ("m4a-moov-last", "m4a-faststart"),
    ("m4a-voice-memos", "m4a-faststart"),
    ("3gp-amr", "3gp-amr-faststart"),
)
"""Each index-last layout and its twin: the same audio in a layout ffmpeg reads from a pipe,
so the difference between the two is what the layout costs, not what the audio costs."""
EXPECTED_MODES = {
    "caf-aac-pakt-last": "stream",
    "m4a-moov-last": "speculative",
    "m4a-voice-memos": "stream",
    "3gp-amr": "stream",
}
"""What the answer should say, as tests/test_index_last.py asserts; every twin: `stream`."""
TARGET_RATIO = 1.5
TARGET_WAIT_SECONDS = 1.5
TARGET_FIRST_SEGMENT_SECONDS = 15.0


def _once(path: Path, make: Callable[[Path], object]) -> Path:
    """`path`, made by `make` unless a previous run (--corpus) left it; written under another
    name first, so that an interrupted build is never reused as if it were whole."""
    if not path.exists():
        partial = path.with_name(f"partial-{path.name}")  # same suffix: ffmpeg picks the muxer
        make(partial)
        partial.rename(path)
    return path


def build_paced_corpus(folder: Path, seconds: float) -> dict[str, Path]:
    """Every layout of PACED_PAIRS from the first `seconds` of the shared speech, built as
    tests/test_index_last.py builds them: one AAC encode (64 kbit/s, 48 kHz mono) for the CAF
    and M4A files, one AMR-NB encode without an edit list (as Android writes) for the 3GP."""
    folder = folder / f"paced-{seconds:g}s"
    folder.mkdir(parents=True, exist_ok=True)
    speech = _once(folder / "speech.wav", lambda path: cut_speech(path, seconds))
    available = wav_samples(speech) / RATE
    if available < seconds - 0.5:
        sys.exit(f"{SPEECH_SOURCE} holds {available:.0f} s of speech, not --seconds {seconds:g}")
    src = str(speech)

    def aac() -> Path:
        def make(path: Path) -> None:
            run_ffmpeg("-i", src, "-c:a", "aac", "-b:a", "64k", "-f", "adts", str(path))

        return _once(folder / "speech.aac", make)

    def mp4(name: str, *flags: str) -> Path:
        return _once(
            folder / name,
            lambda path: run_ffmpeg(
                "-i", str(aac()), "-c", "copy", "-bsf:a", "aac_adtstoasc", *flags, str(path)
            ),
        )

    def caf(name: str, *, pakt_first: bool) -> Path:
        def make(path: Path) -> None:
            stream = parse_adts(aac().read_bytes())
            frames = 1024 * len(stream.packets)
            write_aac_caf(path, stream, valid_frames=frames, priming=0, pakt_first=pakt_first)

        return _once(folder / name, make)

    def amr(name: str, *flags: str) -> Path:
        def make(path: Path) -> None:
            run_ffmpeg(
                "-i", src, "-ar", "8000", "-ac", "1", "-c:a", "libopencore_amrnb",
                "-b:a", "12.2k", "-use_editlist", "0", *flags, str(path), binary=amr_ffmpeg(),
            )  # fmt: skip

        return _once(folder / name, make)

    builders: dict[str, Callable[[], Path]] = {
        "caf-aac-pakt-last": lambda: caf("aac-pakt-last.caf", pakt_first=False),
        "caf-aac-pakt-first": lambda: caf("aac-pakt-first.caf", pakt_first=True),
        "m4a-moov-last": lambda: mp4("moov-last.m4a"),
        "m4a-faststart": lambda: mp4("faststart.m4a", "-movflags", "+faststart"),
        "m4a-voice-memos": lambda: _once(
            folder / "voice-memo.m4a",
            lambda path: path.write_bytes(voice_memo(aac().read_bytes())),
        ),
        "3gp-amr": lambda: amr("moov-last.3gp"),
        "3gp-amr-faststart": lambda: amr("faststart.3gp", "-movflags", "+faststart"),
    }
    corpus = {"warm-up.aac": aac()}
    for name, build in builders.items():
        started = time.monotonic()
        corpus[name] = build()
        size = corpus[name].stat().st_size
        took = time.monotonic() - started
        print(f"  {name}: {size / 1e6:.2f} MB ({took:.1f} s to build)", flush=True)
    return corpus


def cut_speech(path: Path, seconds: float) -> None:
    """The first `seconds` of the shared speech, resampled to 48 kHz mono as phones record."""
    if not SPEECH_SOURCE.exists():
        sys.exit(f"{SPEECH_SOURCE} not found: the paced part needs it (or pass --skip-paced)")
    run_ffmpeg(
        "-i", str(SPEECH_SOURCE), "-t", f"{seconds:g}", "-ac", "1", "-ar", str(RATE),
        "-c:a", "pcm_s16le", str(path),
    )  # fmt: skip


@dataclass
class PacedRun:
    """One paced upload; every time is in seconds after its first byte (the request line)."""

    layout: str
    """The index-last layout of the pair this run belongs to."""
    name: str
    """What was uploaded: `layout` itself or its twin."""
    repeat: int
    status: int
    request_id: str | None = None
    last_byte: float = math.nan
    """When the terminating zero-length chunk was handed to the socket."""
    first_segment: float | None = None
    done: float | None = None
    mode: str | None = None
    segments: int = 0
    segments_before_last_byte: int = 0
    withdrawn: bool = False
    error: dict[str, Any] | None = None
    cuts: list[list[float]] = field(default_factory=list)
    """[start, end, arrival] of each segment event: where the segmenter cut and when the text
    came, since when the bytes arrive decides how the cuts are joined (and what they cost)."""
    server_after_last_byte: float | None = None
    """The server's own `timings.afterLastByte`, from its log line, when it logs one."""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done is not None and self.error is None

    @property
    def wait(self) -> float:
        """What the user waits once the whole recording is sent: `done` minus the last byte."""
        return math.nan if self.done is None else self.done - self.last_byte


def _chunk_frame(data: bytes) -> bytes:
    """One chunk of a chunked body; an empty `data` ends the body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _request_head(path: str) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Transfer-Encoding: chunked",
        "Accept: text/event-stream",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def send_paced(
    stream: anyio.abc.SocketStream, data: bytes, rate: float, started: float
) -> float:
    """Send `data` in 8 KiB chunks, each once the schedule (`rate` bytes/s since `started`)
    has room for it, so the average holds whatever a send costs; return when the closing
    zero-length chunk was sent, in seconds after `started`.

    A phone's upload is paced by its link: sent as fast as loopback takes it, the whole file
    would be in the server's socket buffers at once and there would be no "while it streams"."""
    for offset in range(0, len(data), PACED_CHUNK_BYTES):
        piece = data[offset : offset + PACED_CHUNK_BYTES]
        delay = started + (offset + len(piece)) / rate - time.perf_counter()
        if delay > 0:
            await anyio.sleep(delay)
        await stream.send(_chunk_frame(piece))
    await stream.send(_chunk_frame(b""))
    return time.perf_counter() - started


async def read_answer(answer: RawEvents, started: float) -> list[tuple[float, Event]]:
    """The answer's events as they come, each with its arrival in seconds after `started`;
    none when the server answered before the stream opened (401, 400, 503: plain JSON)."""
    try:
        await answer.head()
    except AssertionError:
        # RawEvents insists on a chunked stream; a plain answer has a Content-Length. Its
        # status is read by then, and it is what the run records.
        if answer.status == 200:
            raise
        return []
    if answer.status != 200:
        return []
    events = []
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while (event := await answer.next_event()) is not None:
            events.append((time.perf_counter() - started, event))
    return events


async def paced_upload(
    url: str, layout: str, name: str, data: bytes, rate: float, repeat: int
) -> PacedRun:
    """One upload over a raw connection: the body paced by one task, the events read by
    another as they come (httpx would send the whole body before reading a byte back)."""
    address = httpx.URL(url)
    assert address.port is not None
    sent: dict[str, float] = {}

    async def sender(stream: anyio.abc.SocketStream, started: float) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            sent["last_byte"] = await send_paced(stream, data, rate, started)

    with anyio.fail_after(len(data) / rate + PACED_TIMEOUT_SECONDS):
        async with await anyio.connect_tcp(address.host, address.port) as stream:
            answer = RawEvents(stream)
            async with anyio.create_task_group() as group:
                started = time.perf_counter()
                await stream.send(_request_head("/v1/transcriptions"))
                group.start_soon(sender, stream, started)
                events = await read_answer(answer, started)
                if answer.status != 200:
                    group.cancel_scope.cancel()  # answered before the body: no use sending it
    run = PacedRun(layout, name, repeat, answer.status, answer.headers.get("x-request-id"))
    run.last_byte = sent.get("last_byte", math.nan)
    record_events(run, events)
    return run


def record_events(run: PacedRun, events: list[tuple[float, Event]]) -> None:
    """What the figures need from the events: when the first segment and `done` came, how
    many segments came before the last byte, and whether a guess was withdrawn."""
    for at, event in events:
        if event.name == "segment":
            run.segments += 1
            run.cuts.append([event.data["start"], event.data["end"], round(at, 3)])
            run.segments_before_last_byte += at < run.last_byte
            if run.first_segment is None:
                run.first_segment = at
        elif event.name == "withdrawn":
            run.withdrawn = True
        elif event.name == "done":
            run.done = at
            run.mode = event.data.get("mode")
        elif event.name == "error":
            run.error = event.data


def warm_up(server: ServerProcess, adts: Path) -> None:
    """One short transcription before the measured ones, which then all find the model warm."""
    response = httpx.post(
        f"{server.url}/v1/transcriptions", content=adts.read_bytes()[:WARM_UP_BYTES], timeout=120
    )
    if response.status_code != 200:
        print(f"  warm-up: HTTP {response.status_code} {response.text[:200]}", flush=True)
    server.wait_idle()


def pair_order(pair: tuple[str, str], repeat: int) -> tuple[str, ...]:
    """Twin first on even repeats, the layout first on odd ones: drift in the machine's load
    and any order effect fall on both alike."""
    layout, twin = pair
    return (twin, layout) if repeat % 2 == 0 else (layout, twin)


def describe_run(run: PacedRun) -> str:
    if not run.ok:
        problem = run.error or (f"HTTP {run.status}" + (", no done" if run.status == 200 else ""))
        return f"  {run.name} #{run.repeat + 1}: FAILED {problem}"
    first = "none" if run.first_segment is None else f"{run.first_segment:.1f} s"
    return (
        f"  {run.name} #{run.repeat + 1}: {run.mode}, first segment {first}, "
        f"last byte {run.last_byte:.1f} s, done +{run.wait:.2f} s, "
        f"{run.segments_before_last_byte}/{run.segments} segments before the last byte"
        + (", WITHDRAWN" if run.withdrawn else "")
    )


def run_paced(
    server: ServerProcess, corpus: dict[str, Path], rate: float, repeats: int
) -> list[PacedRun]:
    """Every pair, `repeats` times, twin and layout interleaved, one upload at a time."""
    warm_up(server, corpus["warm-up.aac"])
    files = {name: path.read_bytes() for name, path in corpus.items()}
    runs = []
    for repeat in range(repeats):
        for pair in PACED_PAIRS:
            for name in pair_order(pair, repeat):
                run = anyio.run(paced_upload, server.url, pair[0], name, files[name], rate, repeat)
                server.wait_idle(60)
                logged = server.request_logs().get(run.request_id or "", {})
                run.server_after_last_byte = with_wait(logged.get("timings")).get("afterLastByte")
                runs.append(run)
                print(describe_run(run), flush=True)
    return runs


@dataclass
class PacedRow:
    """One layout beside its twin: medians over the runs that answered."""

    layout: str
    twin: str
    modes: list[str]
    twin_modes: list[str]
    wait: float
    twin_wait: float
    first_segment: float
    twin_first_segment: float
    segments_before_last_byte: float
    last_byte: float
    withdrawn: bool
    failed_runs: int

    @property
    def ratio(self) -> float:
        return self.wait / self.twin_wait if self.twin_wait > 0 else math.inf

    def misses(self) -> list[str]:
        """The targets this row misses, each said in words; none: it passes."""
        missed = []
        if not self.wait <= TARGET_RATIO * self.twin_wait:
            missed.append(f"wait {self.ratio:.2f}x the twin's (target <= {TARGET_RATIO:g}x)")
        if not self.wait <= TARGET_WAIT_SECONDS:
            missed.append(f"wait {self.wait:.2f} s (target <= {TARGET_WAIT_SECONDS:g} s)")
        if not self.first_segment <= TARGET_FIRST_SEGMENT_SECONDS:
            missed.append(
                f"first segment at {self.first_segment:.1f} s "
                f"(target <= {TARGET_FIRST_SEGMENT_SECONDS:g} s)"
            )
        if self.failed_runs:
            missed.append(f"{self.failed_runs} failed upload(s)")
        return missed


def _answered(runs: list[PacedRun]) -> list[PacedRun]:
    return [run for run in runs if run.ok]


def _median_of(values: list[float | None]) -> float:
    return median([value for value in values if value is not None])


def paced_rows(runs: list[PacedRun]) -> list[PacedRow]:
    rows = []
    for layout, twin in PACED_PAIRS:
        mine = [run for run in runs if run.layout == layout and run.name == layout]
        theirs = [run for run in runs if run.layout == layout and run.name == twin]
        if not mine:
            continue
        rows.append(
            PacedRow(
                layout=layout,
                twin=twin,
                modes=sorted({run.mode or "?" for run in _answered(mine)}),
                twin_modes=sorted({run.mode or "?" for run in _answered(theirs)}),
                wait=_median_of([run.wait for run in _answered(mine)]),
                twin_wait=_median_of([run.wait for run in _answered(theirs)]),
                first_segment=_median_of([run.first_segment for run in _answered(mine)]),
                twin_first_segment=_median_of([run.first_segment for run in _answered(theirs)]),
                segments_before_last_byte=_median_of(
                    [run.segments_before_last_byte for run in _answered(mine)]
                ),
                last_byte=_median_of([run.last_byte for run in _answered(mine)]),
                withdrawn=any(run.withdrawn for run in mine + theirs),
                failed_runs=sum(not run.ok for run in mine + theirs),
            )
        )
    return rows


def _seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def paced_table(rows: list[PacedRow]) -> str:
    headers = [
        "layout (twin)",
        "mode",
        "wait after last byte, s",
        "twin's wait, s",
        "layout / twin",
        "first segment, s",
        "segments before last byte",
        "last byte, s",
        "targets",
    ]
    cells = [
        [
            f"{row.layout} ({row.twin})",
            "/".join(row.modes) + (", withdrawn" if row.withdrawn else ""),
            _seconds(row.wait),
            _seconds(row.twin_wait),
            "n/a" if math.isnan(row.ratio) else f"{row.ratio:.2f}",
            _seconds(row.first_segment),
            f"{row.segments_before_last_byte:g}",
            _seconds(row.last_byte),
            "FAIL" if row.misses() else "PASS",
        ]
        for row in rows
    ]
    return markdown_table(headers, cells)


def paced_verdicts(rows: list[PacedRow]) -> list[str]:
    """One line per row: PASS, or FAIL and what was missed; and any mode not as expected."""
    lines = []
    for row in rows:
        missed = row.misses()
        verdict = "FAIL: " + "; ".join(missed) if missed else "PASS"
        lines.append(f"- {row.layout}: {verdict}")
        expected = EXPECTED_MODES[row.layout]
        if row.modes != [expected] or row.twin_modes not in ([], ["stream"]):
            lines.append(
                f"  (mode {'/'.join(row.modes)}, twin {'/'.join(row.twin_modes)}: "
                f"expected {expected} and stream)"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="recording length")
    parser.add_argument("--repeats", type=int, default=3, help="MP3 uploads per format (median)")
    parser.add_argument("--only", default="", help="comma-separated subset of the formats (MP3)")
    parser.add_argument("--corpus", type=Path, help="keep the built recordings in this folder")
    parser.add_argument("--skip-mp3", action="store_true", help="skip the MP3 measurement")
    parser.add_argument("--skip-paced", action="store_true", help="skip the paced transcripts")
    parser.add_argument(
        "--paced-repeats", type=int, default=2, help="paced uploads per layout and per twin"
    )
    parser.add_argument(
        "--rate-kbps", type=float, default=64.0, help="paced upload rate, KiB/s (64: 65,536 B/s)"
    )
    parser.add_argument("--output", default="formats.json", help="file name in bench/results/")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else set(FORMATS)
    unknown = only - set(FORMATS)
    if unknown:
        parser.error(f"unknown formats: {', '.join(sorted(unknown))}")
    if args.skip_mp3 and args.skip_paced:
        parser.error("--skip-mp3 and --skip-paced together leave nothing to measure")
    rate = args.rate_kbps * 1024

    info = machine()
    print(f"Machine: {describe_machine(info)}", flush=True)
    results: list[FormatResult] = []
    paced_runs: list[PacedRun] = []
    with tempfile.TemporaryDirectory(prefix="vrai-bench-formats-") as scratch_name:
        scratch = Path(scratch_name)
        corpus_dir = args.corpus or scratch / "corpus"
        corpus: dict[str, Path] = {}
        paced_corpus: dict[str, Path] = {}
        if not args.skip_mp3:
            print(f"Building {args.seconds:g} s recordings in {corpus_dir} ...", flush=True)
            corpus = build_corpus(corpus_dir, args.seconds, only)
        if not args.skip_paced:
            print(f"Building {args.seconds:g} s of {SPEECH_SOURCE.name} in each layout ...")
            paced_corpus = build_paced_corpus(corpus_dir, args.seconds)
        with running_service(
            "server", scratch, HF_HUB_OFFLINE="1", VRAI_TRANSCRIBER="local", VRAI_DEBUG_STORE="off"
        ) as server:
            for name, path in corpus.items():
                results.append(measure(server, name, path, args.repeats, scratch))
                last = results[-1]
                print(
                    f"  {name}: {last.mode}, {last.after_last_byte:.2f} s after the last byte",
                    flush=True,
                )
            if paced_corpus:
                print(f"Paced transcripts at {rate / 1024:g} KiB/s ...", flush=True)
                paced_runs = run_paced(server, paced_corpus, rate, args.paced_repeats)
        if args.corpus is None:
            shutil.rmtree(corpus_dir, ignore_errors=True)

    if results:
        print()
        print(table(results))
    rows = paced_rows(paced_runs)
    if rows:
        print()
        print(paced_table(rows))
        print()
        print("\n".join(paced_verdicts(rows)))
    written = write_json(
        args.output,
        {
            "machine": info,
            "recording_seconds": args.seconds,
            "window_seconds": WINDOW_SECONDS,
            "chunk_bytes": CHUNK_BYTES,
            "repeats": args.repeats,
            "results": [
                {
                    **asdict(result),
                    "after_last_byte_median": result.after_last_byte,
                    "server_after_last_byte_median": result.server_after_last_byte,
                    "total_median": result.total,
                }
                for result in results
            ],
            "paced": paced_json(args, rate, paced_corpus, rows, paced_runs),
        },
    )
    print(f"\nWrote {written.relative_to(REPO_DIR)}")
    failed = [result.name for result in results if any(run.status != 200 for run in result.runs)]
    failed += sorted({f"{run.name} (paced)" for run in paced_runs if not run.ok})
    if failed:
        print(f"Failed uploads: {', '.join(failed)}", file=sys.stderr)
    missed = [row.layout for row in rows if row.misses()]
    if missed:
        print(f"Paced targets missed: {', '.join(missed)}", file=sys.stderr)
    return 1 if failed or missed else 0


def paced_json(
    args: argparse.Namespace,
    rate: float,
    corpus: dict[str, Path],
    rows: list[PacedRow],
    runs: list[PacedRun],
) -> dict[str, Any] | None:
    """The paced part's figures for formats.json: settings, rows with their verdicts, runs."""
    if args.skip_paced:
        return None
    return {
        "source": str(SPEECH_SOURCE),
        "seconds": args.seconds,
        "rate_bytes_per_second": rate,
        "chunk_bytes": PACED_CHUNK_BYTES,
        "repeats": args.paced_repeats,
        "targets": {
            "wait_ratio_to_twin_max": TARGET_RATIO,
            "wait_seconds_max": TARGET_WAIT_SECONDS,
            "first_segment_seconds_max": TARGET_FIRST_SEGMENT_SECONDS,
        },
        "files": {
            name: {"file": path.name, "bytes": path.stat().st_size}
            for name, path in corpus.items()
            if path.exists()
        },
        "rows": [
            {**asdict(row), "ratio": row.ratio, "misses": row.misses(), "pass": not row.misses()}
            for row in rows
        ],
        "runs": [{**asdict(run), "wait": run.wait, "ok": run.ok} for run in runs],
    }


if __name__ == "__main__":
    sys.exit(main())
