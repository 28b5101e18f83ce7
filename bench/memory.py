"""Peak memory and tail latency of one streaming upload, next to a raw ffmpeg run.

The service exists because the old one held whole uploads in memory and was OOM-killed on
large recordings.  This script checks the two promises of issue 2 on a real server:

* memory is flat in the input size: the peak RSS of the server's process tree (server plus
  its ffmpeg children) above idle is about the same for a 10 MB and a 100 MB upload, and
  stays under 64 MiB;
* streaming hides the transcode: what is left after the last byte is a small tail, which
  we compare with the wall time of a raw file-to-file ffmpeg run on the same file.

"After the last byte" is measured twice.  The client's figure runs from the moment the
socket accepted the last chunk to the end of the response; on loopback several MB can
still sit in kernel socket buffers at that moment, so for small uploads it includes part
of the transfer.  The server's figure (its own `timings.afterLastByte`, from its log)
starts when the service read the last byte, which is the tail the design promises.

Run: .venv/bin/python -m bench.memory [--sizes 10,100] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil

from .common import (
    MiB,
    ServerProcess,
    describe_machine,
    ffmpeg_command,
    machine,
    markdown_table,
    median,
    run_ffmpeg,
    running_service,
    tool,
    with_wait,
    write_json,
)

MB = 1_000_000
SAMPLE_RATE = 48_000
CHANNELS = 2
BYTES_PER_SECOND = SAMPLE_RATE * CHANNELS * 2
CHUNK_BYTES = 64 * 1024
SAMPLE_INTERVAL = 0.010
WINDOW_SECONDS = 300.0
DEFAULT_BITRATE_KBPS = 32
MEMORY_TARGET_BYTES = 64 * MiB
FLATNESS_TARGET = 0.15
SPEECH_TEXT = (
    "This is a voice note recorded on a phone. Remind me to call the plumber about the "
    "kitchen sink, and to move the team meeting to Thursday afternoon. The new design "
    "streams every upload through ffmpeg, so memory should stay flat whatever the size."
)


# --- corpus -----------------------------------------------------------------------------


def make_corpus(folder: Path, sizes_mb: Sequence[int]) -> dict[int, Path]:
    """LPCM CAF files like an iPhone's, built from tone, pink noise and looped speech.

    A mix rather than pure tone so the MP3 encoder does real work on every frame, as it
    would on a real recording.
    """
    speech = _speech(folder)
    corpus = {}
    for size in sizes_mb:
        path = folder / f"lpcm-{size}MB.caf"
        seconds = size * MB / BYTES_PER_SECOND
        _mix(path, seconds, speech)
        corpus[size] = path
        print(f"  {path.name}: {path.stat().st_size / MB:.1f} MB, {seconds:.0f} s", flush=True)
    return corpus


def _speech(folder: Path) -> Path | None:
    """A spoken paragraph to loop under the tone, if espeak-ng is installed."""
    try:
        espeak = tool("espeak-ng")
    except SystemExit:
        return None
    path = folder / "speech.wav"
    subprocess.run([espeak, "-v", "en-us", "-s", "160", "-w", str(path), SPEECH_TEXT], check=True)
    return path


def _mix(path: Path, seconds: float, speech: Path | None) -> None:
    sources = [
        "-f", "lavfi", "-i", f"sine=frequency=220:sample_rate={SAMPLE_RATE}:duration={seconds}",
        "-f", "lavfi", "-i",
        f"anoisesrc=color=pink:amplitude=0.2:sample_rate={SAMPLE_RATE}:duration={seconds}",
    ]  # fmt: skip
    graph = "[0:a][1:a]amix=inputs=2:duration=first"
    if speech is not None:
        # Speech loops for as long as the tone lasts, louder than the bed under it.
        sources += ["-stream_loop", "-1", "-i", str(speech)]
        graph = (
            f"[2:a]aresample={SAMPLE_RATE}[voice];"
            "[0:a][1:a][voice]amix=inputs=3:duration=first:weights=1 1 3"
        )
    run_ffmpeg(
        *sources,
        "-filter_complex", graph,
        "-ac", str(CHANNELS), "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le", "-f", "caf", str(path),
    )  # fmt: skip


# --- memory sampling --------------------------------------------------------------------


@dataclass(frozen=True)
class TreeMemory:
    """One sample of a process tree: RSS, and its anonymous part (RSS minus file pages).

    RSS counts the shared libraries a process maps; ffmpeg maps about 40 MiB of them,
    which the kernel shares between all ffmpeg processes.  The anonymous part is what
    each process costs on its own.
    """

    root_rss: int = 0
    root_anon: int = 0
    children_rss: int = 0
    children_anon: int = 0
    forks_skipped: int = 0

    @property
    def rss(self) -> int:
        return self.root_rss + self.children_rss

    @property
    def anon(self) -> int:
        return self.root_anon + self.children_anon


def sample_tree(root: psutil.Process) -> TreeMemory:
    """RSS of a process and of all its descendants, summed (shared pages count twice).

    A child caught between fork and exec still runs the server's own image and reports
    the server's whole RSS (its pages are the parent's, copy-on-write or shared by vfork),
    which would count the server twice for a millisecond; such children are skipped.
    """
    try:
        children = root.children(recursive=True)
        own = root.memory_info()
        own_name = root.name()
    except psutil.NoSuchProcess:
        return TreeMemory()
    rss = anon = skipped = 0
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if child.name() == own_name:
                skipped += 1
                continue
            info = child.memory_info()
            rss += info.rss
            anon += info.rss - info.shared
    return TreeMemory(own.rss, own.rss - own.shared, rss, anon, skipped)


def tree_rss(root: psutil.Process) -> int:
    return sample_tree(root).rss


class PeakSampler:
    """Samples a process tree's memory in a thread every ~10 ms and keeps the peaks.

    A thread, not the event loop, so a busy upload loop cannot delay the samples.  The
    root's and the children's peaks are kept apart too: they say where the memory went.
    """

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        self._root = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0
        self.peak_anon = 0
        self.peak_root = 0
        self.peak_children = 0
        self.peak_children_anon = 0
        self.samples = 0
        self.forks_skipped = 0

    def _sample(self) -> None:
        now = sample_tree(self._root)
        self.peak = max(self.peak, now.rss)
        self.peak_anon = max(self.peak_anon, now.anon)
        self.peak_root = max(self.peak_root, now.root_rss)
        self.peak_children = max(self.peak_children, now.children_rss)
        self.peak_children_anon = max(self.peak_children_anon, now.children_anon)
        self.samples += 1
        self.forks_skipped += now.forks_skipped

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# --- the server -------------------------------------------------------------------------


def server_env(bitrate_kbps: int) -> dict[str, str]:
    """The embedded defaults, with the local model offline and no debug copies.

    Debug copies are off so the figures are the pipeline's own; `running_service` scrubs
    the inherited environment of settings that would change what is measured.  The bitrate
    is pinned so the service and the raw ffmpeg run encode the same way whatever the
    default becomes.
    """
    return {
        "HF_HUB_OFFLINE": "1",
        "VRAI_TRANSCRIBER": "local",
        "VRAI_DEBUG_STORE": "off",
        "VRAI_MP3_BITRATE_KBPS": str(bitrate_kbps),
    }


def settle(pid: int, seconds: float = 1.0) -> TreeMemory:
    """The idle tree: medians of a second of samples, so one blip cannot skew them."""
    root = psutil.Process(pid)
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(sample_tree(root))
        time.sleep(SAMPLE_INTERVAL)
    return TreeMemory(
        root_rss=int(median([sample.root_rss for sample in samples])),
        root_anon=int(median([sample.root_anon for sample in samples])),
        children_rss=int(median([sample.children_rss for sample in samples])),
        children_anon=int(median([sample.children_anon for sample in samples])),
    )


# --- one measurement --------------------------------------------------------------------


@dataclass
class ServiceRun:
    size_mb: int
    status: int
    peak_tree_rss: int
    peak_above_idle: int
    peak_anon_above_idle: int
    peak_server_above_idle: int
    peak_children_rss: int
    peak_children_anon: int
    rss_before: int
    total_seconds: float
    after_last_byte_seconds: float
    server_after_last_byte_seconds: float | None
    mp3_bytes: int
    audio_seconds: float | None
    samples: int
    fork_samples_skipped: int


@dataclass
class RawRun:
    size_mb: int
    returncode: int
    wall_seconds: float
    peak_rss: int
    mp3_bytes: int


@dataclass
class UploadMarks:
    """Client-side clock readings (time.perf_counter) of one upload."""

    started: float = 0.0
    last_chunk_sent: float = 0.0
    finished: float = 0.0


async def chunks(data: bytes, marks: UploadMarks) -> AsyncIterator[bytes]:
    """The body, 64 KiB at a time, as fast as the socket takes it.

    An async generator makes httpx send it chunked, as the app does.  When httpx asks for
    the chunk after the last one, the last one has been written to the socket.
    """
    view = memoryview(data)
    for offset in range(0, len(data), CHUNK_BYTES):
        yield bytes(view[offset : offset + CHUNK_BYTES])
    marks.last_chunk_sent = time.perf_counter()


async def upload(url: str, data: bytes) -> tuple[httpx.Response, bytes, UploadMarks]:
    marks = UploadMarks()
    query = f"fromTime=0&toTime={WINDOW_SECONDS:g}"
    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
        marks.started = time.perf_counter()
        async with client.stream(
            "POST",
            f"{url}/v1/transcriptions?{query}",
            content=chunks(data, marks),
            headers={"Accept": "audio/mpeg", "Content-Type": "audio/x-caf"},
        ) as response:
            body = await response.aread()
        marks.finished = time.perf_counter()
    return response, body, marks


def measure_service(
    server: ServerProcess, size_mb: int, data: bytes, idle: TreeMemory
) -> ServiceRun:
    server.wait_idle()
    before = settle(server.process.pid, 0.3)
    with PeakSampler(server.process.pid) as sampler:
        response, body, marks = anyio.run(upload, server.url, data)
    if response.status_code != 200:
        print(f"  ! HTTP {response.status_code}: {body[:300]!r}", file=sys.stderr)
    log = server.request_logs().get(response.headers.get("x-request-id", ""), {})
    duration = response.headers.get("x-audio-duration")
    return ServiceRun(
        size_mb=size_mb,
        status=response.status_code,
        peak_tree_rss=sampler.peak,
        peak_above_idle=sampler.peak - idle.rss,
        peak_anon_above_idle=sampler.peak_anon - idle.anon,
        peak_server_above_idle=sampler.peak_root - idle.root_rss,
        peak_children_rss=sampler.peak_children,
        peak_children_anon=sampler.peak_children_anon,
        rss_before=before.rss,
        total_seconds=marks.finished - marks.started,
        after_last_byte_seconds=marks.finished - marks.last_chunk_sent,
        server_after_last_byte_seconds=with_wait(log.get("timings")).get("afterLastByte"),
        mp3_bytes=len(body),
        audio_seconds=float(duration) if duration else None,
        samples=sampler.samples,
        fork_samples_skipped=sampler.forks_skipped,
    )


def measure_raw_ffmpeg(size_mb: int, path: Path, out_dir: Path, bitrate_kbps: int) -> RawRun:
    """The floor: the same trim and encode, file to file, with nothing around it."""
    out = out_dir / f"raw-{size_mb}MB.mp3"
    command = ffmpeg_command(
        "-i", str(path), "-t", f"{WINDOW_SECONDS:g}",
        "-ac", "1", "-ar", "16000", "-b:a", f"{bitrate_kbps}k", str(out),
    )  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command)
    with PeakSampler(process.pid) as sampler:
        returncode = process.wait()
    wall = time.perf_counter() - started
    size = out.stat().st_size if out.exists() else 0
    out.unlink(missing_ok=True)
    return RawRun(size_mb, returncode, wall, sampler.peak, size)


# --- the whole run ----------------------------------------------------------------------


@dataclass
class Results:
    idle_after_start: TreeMemory = field(default_factory=TreeMemory)
    idle: TreeMemory = field(default_factory=TreeMemory)
    service: list[ServiceRun] = field(default_factory=list)
    raw: list[RawRun] = field(default_factory=list)


def warm_up(server: ServerProcess, folder: Path) -> None:
    """One small upload first, so lazy imports and thread pools are part of idle."""
    path = folder / "warmup.caf"
    _mix(path, 5.0, None)
    response, body, _ = anyio.run(upload, server.url, path.read_bytes())
    if response.status_code != 200:
        raise RuntimeError(f"warm-up request failed: HTTP {response.status_code} {body[:300]!r}")
    path.unlink()


def run_all(corpus: dict[int, Path], repeats: int, work: Path, bitrate_kbps: int) -> Results:
    results = Results()
    with running_service("server", work, wait=True, **server_env(bitrate_kbps)) as server:
        pid = server.process.pid
        results.idle_after_start = settle(pid)
        warm_up(server, work)
        server.wait_idle()
        results.idle = settle(pid)
        print(
            f"idle RSS: {results.idle_after_start.rss / MiB:.1f} MiB after start-up, "
            f"{results.idle.rss / MiB:.1f} MiB after a warm-up request",
            flush=True,
        )
        for repeat in range(1, repeats + 1):
            for size, path in corpus.items():
                data = path.read_bytes()
                service = measure_service(server, size, data, results.idle)
                del data
                raw = measure_raw_ffmpeg(size, path, work, bitrate_kbps)
                results.service.append(service)
                results.raw.append(raw)
                print(_progress(repeat, service, raw), flush=True)
        server.wait_idle()
    return results


def _progress(repeat: int, service: ServiceRun, raw: RawRun) -> str:
    return (
        f"  #{repeat} {service.size_mb:>4} MB: HTTP {service.status}, "
        f"peak +{service.peak_above_idle / MiB:.1f} MiB, total {service.total_seconds:.2f} s, "
        f"after last byte {service.after_last_byte_seconds:.3f} s | "
        f"raw ffmpeg {raw.wall_seconds:.2f} s, {raw.peak_rss / MiB:.1f} MiB"
    )


# --- reporting --------------------------------------------------------------------------


def summarize(results: Results, input_bytes: dict[int, int]) -> dict[int, dict[str, float]]:
    """Medians per size (and the worst peak, since a peak is what gets a machine killed)."""
    summary = {}
    for size, nbytes in input_bytes.items():
        service = [run for run in results.service if run.size_mb == size]
        raw = [run for run in results.raw if run.size_mb == size]
        alb = median([run.after_last_byte_seconds for run in service])
        total = median([run.total_seconds for run in service])
        raw_wall = median([run.wall_seconds for run in raw])
        server_alb = [
            run.server_after_last_byte_seconds
            for run in service
            if run.server_after_last_byte_seconds is not None
        ]
        summary[size] = {
            "input_bytes": nbytes,
            "runs": len(service),
            "failures": sum(run.status != 200 for run in service),
            "peak_above_idle_median": median([run.peak_above_idle for run in service]),
            "peak_above_idle_max": max(run.peak_above_idle for run in service),
            "peak_server_above_idle_median": median(
                [run.peak_server_above_idle for run in service]
            ),
            "peak_anon_above_idle_median": median([run.peak_anon_above_idle for run in service]),
            "peak_children_rss_median": median([run.peak_children_rss for run in service]),
            "peak_children_anon_median": median([run.peak_children_anon for run in service]),
            "total_seconds": total,
            "after_last_byte_seconds": alb,
            "server_after_last_byte_seconds": median(server_alb),
            "raw_ffmpeg_seconds": raw_wall,
            "raw_ffmpeg_peak_rss": median([run.peak_rss for run in raw]),
            "after_last_byte_vs_raw": alb / raw_wall,
            "server_after_last_byte_vs_raw": median(server_alb) / raw_wall,
            "total_vs_raw": total / raw_wall,
            "mp3_bytes": median([run.mp3_bytes for run in service]),
            "raw_mp3_bytes": median([run.mp3_bytes for run in raw]),
        }
    return summary


def targets(summary: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Issue 2's two memory targets, as computed figures and a pass/fail each."""
    smallest, largest = min(summary), max(summary)
    small = summary[smallest]["peak_above_idle_median"]
    large = summary[largest]["peak_above_idle_median"]
    spread = abs(large - small) / small if small > 0 else float("inf")
    worst = max(figures["peak_above_idle_max"] for figures in summary.values())
    return {
        "flatness": {
            "sizes_mb": [smallest, largest],
            "peak_ratio_large_vs_small": large / small if small > 0 else float("inf"),
            "relative_difference": spread,
            "target": FLATNESS_TARGET,
            "met": spread <= FLATNESS_TARGET,
        },
        "under_64_mib": {
            "worst_peak_above_idle_bytes": worst,
            "target_bytes": MEMORY_TARGET_BYTES,
            "met": worst < MEMORY_TARGET_BYTES,
        },
    }


def _label(size: int, figures: dict[str, float]) -> str:
    return f"{size} MB ({figures['input_bytes'] / BYTES_PER_SECOND:.0f} s)"


def _mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.1f} MiB"


def memory_table(summary: dict[int, dict[str, float]]) -> str:
    headers = [
        "LPCM CAF upload", "tree RSS peak above idle, median (max)", "server process above idle",
        "ffmpeg child RSS (anon)", "tree anon above idle", "raw ffmpeg RSS",
    ]  # fmt: skip
    rows = [
        [
            _label(size, fig),
            f"{_mib(fig['peak_above_idle_median'])} ({_mib(fig['peak_above_idle_max'])})",
            _mib(fig["peak_server_above_idle_median"]),
            f"{_mib(fig['peak_children_rss_median'])} ({_mib(fig['peak_children_anon_median'])})",
            _mib(fig["peak_anon_above_idle_median"]),
            _mib(fig["raw_ffmpeg_peak_rss"]),
        ]
        for size, fig in summary.items()
    ]
    return markdown_table(headers, rows)


def time_table(summary: dict[int, dict[str, float]]) -> str:
    headers = [
        "LPCM CAF upload", "service total", "after last byte: client (server)", "raw ffmpeg",
        "after last byte / raw: client (server)", "total / raw",
    ]  # fmt: skip
    rows = [
        [
            _label(size, fig),
            f"{fig['total_seconds']:.2f} s",
            f"{fig['after_last_byte_seconds']:.3f} s "
            f"({fig['server_after_last_byte_seconds']:.3f} s)",
            f"{fig['raw_ffmpeg_seconds']:.2f} s",
            f"{fig['after_last_byte_vs_raw']:.1%} ({fig['server_after_last_byte_vs_raw']:.1%})",
            f"{fig['total_vs_raw']:.2f}x",
        ]
        for size, fig in summary.items()
    ]
    return markdown_table(headers, rows)


def verdicts(checks: dict[str, Any]) -> str:
    flat, cap = checks["flatness"], checks["under_64_mib"]
    return "\n".join(
        [
            f"- Flat memory: the {flat['sizes_mb'][1]} MB peak is "
            f"{flat['peak_ratio_large_vs_small']:.2f}x the {flat['sizes_mb'][0]} MB peak "
            f"({flat['relative_difference']:.1%} apart; target within {FLATNESS_TARGET:.0%}): "
            f"{'PASS' if flat['met'] else 'FAIL'}",
            f"- Bounded memory: worst peak {_mib(cap['worst_peak_above_idle_bytes'])} above "
            f"idle (target under {_mib(MEMORY_TARGET_BYTES)}): {'PASS' if cap['met'] else 'FAIL'}",
        ]
    )


def render(summary: dict[int, dict[str, float]], checks: dict[str, Any], idle: int) -> str:
    return "\n\n".join(
        [
            f"Memory (idle tree RSS {_mib(idle)}, model loaded):",
            memory_table(summary),
            "Time (medians; ratios against raw ffmpeg on the same file):",
            time_table(summary),
            verdicts(checks),
        ]
    )


# --- entry point ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="10,100", help="upload sizes in MB, comma-separated (default 10,100)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per size (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="2 MB and 20 MB, one run each: a smoke test"
    )
    parser.add_argument(
        "--bitrate",
        type=int,
        default=DEFAULT_BITRATE_KBPS,
        help="MP3 kbps for both the service (VRAI_MP3_BITRATE_KBPS) and raw ffmpeg (default 32)",
    )
    parser.add_argument("--output", default="memory.json", help="file name in bench/results/")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "2,20", 1
    args.sizes = sorted({int(size) for size in args.sizes.split(",") if size.strip()})
    if len(args.sizes) < 2 or args.repeats < 1:
        parser.error("need at least two sizes and one repeat")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    print(f"machine: {describe_machine(info)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vrai-bench-memory-") as folder:
        work = Path(folder)
        print("generating the corpus:", flush=True)
        corpus = make_corpus(work, args.sizes)
        input_bytes = {size: path.stat().st_size for size, path in corpus.items()}
        results = run_all(corpus, args.repeats, work, args.bitrate)
    summary = summarize(results, input_bytes)
    checks = targets(summary)
    print()
    print(render(summary, checks, results.idle.rss))
    path = write_json(
        args.output,
        {
            "machine": info,
            "parameters": {
                "sizes_mb": args.sizes,
                "repeats": args.repeats,
                "chunk_bytes": CHUNK_BYTES,
                "window_seconds": WINDOW_SECONDS,
                "mp3_bitrate_kbps": args.bitrate,
                "sample_interval_seconds": SAMPLE_INTERVAL,
            },
            "load_average_at_end": [round(load, 2) for load in os.getloadavg()],
            "idle_after_start": asdict(results.idle_after_start),
            "idle": asdict(results.idle),
            "summary": {str(size): figures for size, figures in summary.items()},
            "targets": checks,
            "service_runs": [asdict(run) for run in results.service],
            "raw_ffmpeg_runs": [asdict(run) for run in results.raw],
        },
    )
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0 if all(run.status == 200 for run in results.service) else 1


if __name__ == "__main__":
    raise SystemExit(main())
