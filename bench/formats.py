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

Run: .venv/bin/python -m bench.formats [--seconds 300] [--repeats 3] [--only wav,caf-alac]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
import httpx

from tests.support.phone_media import (
    FIXTURE_NAMES,
    amr_ffmpeg,
    parse_adts,
    streaming_wav,
    wav_samples,
    write_aac_caf,
)

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

    amr = ["-ar", "8000", "-ac", "1", "-c:a", "libopencore_amrnb", "-b:a", "12.2k"]
    builders = {
        "caf-aac-pakt-last": lambda: caf("aac-pakt-last.caf", pakt_first=False),
        "caf-aac-pakt-first": lambda: caf("aac-pakt-first.caf", pakt_first=True),
        "caf-alac": lambda: encode("alac.caf", "-c:a", "alac", "-f", "caf"),
        "caf-lpcm": lambda: encode("lpcm.caf", "-c:a", "pcm_s16le", "-f", "caf"),
        "caf-ima4": lambda: encode("ima4.caf", "-c:a", "adpcm_ima_qt", "-f", "caf"),
        "m4a-moov-last": lambda: mp4("moov-last.m4a"),
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
                server_after_last_byte=timings.get("afterLastByte"),
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="recording length")
    parser.add_argument("--repeats", type=int, default=3, help="uploads per format (median)")
    parser.add_argument("--only", default="", help="comma-separated subset of the formats")
    parser.add_argument("--corpus", type=Path, help="keep the built recordings in this folder")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else set(FORMATS)
    unknown = only - set(FORMATS)
    if unknown:
        parser.error(f"unknown formats: {', '.join(sorted(unknown))}")

    info = machine()
    print(f"Machine: {describe_machine(info)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vrai-bench-formats-") as scratch_name:
        scratch = Path(scratch_name)
        corpus_dir = args.corpus or scratch / "corpus"
        print(f"Building {args.seconds:g} s recordings in {corpus_dir} ...", flush=True)
        corpus = build_corpus(corpus_dir, args.seconds, only)
        results = []
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
        if args.corpus is None:
            shutil.rmtree(corpus_dir, ignore_errors=True)

    print()
    print(table(results))
    written = write_json(
        "formats.json",
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
        },
    )
    print(f"\nWrote {written.relative_to(REPO_DIR)}")
    failed = [result.name for result in results if any(run.status != 200 for run in result.runs)]
    if failed:
        print(f"Failed uploads: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
