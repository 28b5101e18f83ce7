"""Latency and peak memory with S3 debug copies on vs off, in the same run (issue 4).

Debug copies must never slow a request down nor bloat it.  This script runs two servers side
by side, one keeping copies in S3 (moto's S3 API in server mode, on loopback) and one with
copies off, and sends them the same uploads in turn (off, on, then on, off: drift cancels):

* a ~10 MB and a ~50 MB WAV (48 kHz stereo, tone and noise), the whole file as the window;
* paced at 2 MB/s, like a phone on a good connection, and unthrottled on loopback.

For each request: latency (total, and after the last byte was sent), the peak RSS of the
server's process tree (server plus ffmpeg) sampled every 10 ms, and the CPU time of the server
and of moto (which shares the machine's cores, as S3 would not); for copies on, whether the
input copy was stored or abandoned (an unthrottled loopback upload can outrun moto, and the
copy gives up rather than buffer without bound) and how long after the response it was
complete.  Medians per case and the on/off ratios (target: within 5%) are printed as a
Markdown table and written to bench/results/debug_copies.json.

Both servers answer `Accept: audio/mpeg`, so nothing is transcribed: the figures are the
upload, the transcode and the copies.  Their transcriber is OpenAI at an address where
nothing listens, as in production (the image has no local model) and never called.

Run: .venv/bin/python -m bench.debug_copies [--repeats 3] [--sizes 10,50] [--paces 2,0]
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
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import boto3
import httpx
import psutil
from botocore.config import Config

from .common import (
    REPO_DIR,
    MiB,
    ServerProcess,
    describe_machine,
    free_port,
    machine,
    markdown_table,
    median,
    run_ffmpeg,
    running_service,
    settled_rss,
    stop,
    tree_rss,
    write_json,
)

MB = 1_000_000
SAMPLE_RATE = 48_000
BYTES_PER_SECOND = SAMPLE_RATE * 2 * 2
CHUNK_BYTES = 64 * 1024
SAMPLE_INTERVAL = 0.010
WINDOW = (0.0, 300.0)
TARGET_RATIO = 1.05
REGION = "us-east-1"
ACCESS_KEY = "AKIDVRAIBENCH"
SECRET_KEY = "vrai-bench-secret"  # moto accepts any key


# --- corpus -------------------------------------------------------------------------------


def make_corpus(folder: Path, sizes_mb: list[int]) -> dict[int, Path]:
    """WAVs of a tone under pink noise: every frame makes the MP3 encoder work."""
    corpus = {}
    for size in sizes_mb:
        path = folder / f"tone-noise-{size}MB.wav"
        seconds = size * MB / BYTES_PER_SECOND
        run_ffmpeg(
            "-f", "lavfi", "-i", f"sine=frequency=220:sample_rate={SAMPLE_RATE}:duration={seconds}",
            "-f", "lavfi", "-i",
            f"anoisesrc=color=pink:amplitude=0.2:sample_rate={SAMPLE_RATE}:duration={seconds}",
            "-filter_complex", "[0:a][1:a]amix=inputs=2:duration=first",
            "-ac", "2", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le", str(path),
        )  # fmt: skip
        corpus[size] = path
        print(f"  {path.name}: {path.stat().st_size / MB:.1f} MB, {seconds:.0f} s", flush=True)
    return corpus


# --- processes ----------------------------------------------------------------------------


@dataclass
class Moto:
    url: str
    pid: int


@contextlib.contextmanager
def running_moto(folder: Path) -> Iterator[Moto]:
    """moto's S3 API on a free loopback port."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    with (folder / "moto.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto did not start") from None
                time.sleep(0.05)
        yield Moto(url, process.pid)
    finally:
        stop(process)


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(signature_version="s3v4"),
    )


@contextlib.contextmanager
def running_server(name: str, folder: Path, extra_env: dict[str, str]) -> Iterator[ServerProcess]:
    """The service with its OpenAI transcriber at an address where nothing listens."""
    with running_service(
        name,
        folder,
        wait=False,
        VRAI_TRANSCRIBER="openai",
        OPENAI_API_KEY="sk-bench-not-a-key",
        OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
        **extra_env,
    ) as server:
        wait_ready(server, s3="VRAI_DEBUG_BUCKET" in extra_env)
        yield server


def wait_ready(server: ServerProcess, *, s3: bool, timeout: float = 60.0) -> None:
    """/health answers, the transcriber client is built, and (S3) the bucket was checked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            health = httpx.get(f"{server.url}/health", timeout=1).json()
            checked = not s3 or any(
                entry.get("message", "").startswith("debug bucket")
                for entry in server.log_entries()
            )
            if health.get("transcriberReady") and checked:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} not ready:\n{server.log_path.read_text()}")


# --- memory -------------------------------------------------------------------------------


class PeakSampler:
    """The tree's peak RSS, sampled every 10 ms in a thread the event loop cannot delay."""

    def __init__(self, pid: int) -> None:
        self._root = psutil.Process(pid)
        self._name = self._root.name()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self._root, self._name))
            self._stop.wait(SAMPLE_INTERVAL)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- one request --------------------------------------------------------------------------


@dataclass
class Run:
    size_mb: int
    pace_mb_s: float
    store: str
    repeat: int
    status: int
    total_seconds: float
    after_last_byte_seconds: float
    server_after_last_byte_seconds: float | None
    peak_tree_rss: int
    idle_tree_rss: int
    server_cpu_seconds: float = 0.0
    """CPU of the server and of the ffmpeg it ran (user + system)."""
    moto_cpu_seconds: float = 0.0
    """CPU of moto, the S3 stand-in, which shares this machine's cores with the server."""
    input_copy: str = "-"
    """stored, abandoned or failed (copies on only)."""
    copy_done_after_response_seconds: float | None = None

    @property
    def peak_above_idle(self) -> int:
        return self.peak_tree_rss - self.idle_tree_rss


@dataclass
class Marks:
    started: float = 0.0
    last_chunk_sent: float = 0.0
    finished: float = 0.0


async def body(data: bytes, rate: float | None, marks: Marks) -> AsyncIterator[bytes]:
    """Chunked, 64 KiB at a time, at `rate` bytes/s (None: as fast as the socket takes it)."""
    view = memoryview(data)
    for offset in range(0, len(data), CHUNK_BYTES):
        if rate:
            delay = marks.started + offset / rate - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
        yield bytes(view[offset : offset + CHUNK_BYTES])
    marks.last_chunk_sent = time.perf_counter()


async def post(url: str, data: bytes, rate: float | None) -> tuple[httpx.Response, Marks]:
    marks = Marks()
    query = f"fromTime={WINDOW[0]:g}&toTime={WINDOW[1]:g}"
    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
        marks.started = time.perf_counter()
        response = await client.post(
            f"{url}/v1/transcriptions?{query}",
            content=body(data, rate, marks),
            headers={"Accept": "audio/mpeg"},
        )
        marks.finished = time.perf_counter()
    return response, marks


def cpu_seconds(pid: int) -> float:
    """User and system time of a process and of its children that have exited."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def measure(server: ServerProcess, data: bytes, rate: float | None, idle: int) -> tuple[Run, str]:
    server.wait_idle()
    with PeakSampler(server.process.pid) as sampler:
        response, marks = anyio.run(post, server.url, data, rate)
    if response.status_code != 200:
        print(f"  ! {server.name}: HTTP {response.status_code} {response.text[:300]}")
    request_id = response.headers.get("x-request-id", "")
    logged = server.request_logs().get(request_id, {}).get("afterLastByte")
    run = Run(
        size_mb=0,
        pace_mb_s=0,
        store=server.name,
        repeat=0,
        status=response.status_code,
        total_seconds=marks.finished - marks.started,
        after_last_byte_seconds=marks.finished - marks.last_chunk_sent,
        server_after_last_byte_seconds=logged,
        peak_tree_rss=sampler.peak,
        idle_tree_rss=idle,
    )
    return run, request_id


def settle_copy(s3: Any, bucket: str, server: ServerProcess, request_id: str, run: Run) -> None:
    """Wait until the request's input copy is stored (stamped) or given up, and no multipart
    upload is left, so the next request does not share the machine with it."""
    responded = time.monotonic()
    deadline = responded + 120
    while time.monotonic() < deadline:
        keys = [
            item["Key"]
            for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
            if request_id in item["Key"] and "debug-input" in item["Key"]
        ]
        pending = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        if keys and not pending:
            outcome = s3.head_object(Bucket=bucket, Key=keys[0])["Metadata"].get("outcome")
            if outcome == "ok":
                run.input_copy = "stored"
                run.copy_done_after_response_seconds = time.monotonic() - responded
                return
        lost = [
            entry
            for entry in server.log_entries()
            if entry.get("level") == "warning" and request_id in str(entry.get("key", ""))
        ]
        if lost and not pending:
            fell_behind = any("fell behind" in entry["message"] for entry in lost)
            run.input_copy = "abandoned" if fell_behind else "failed"
            return
        time.sleep(0.05)
    run.input_copy = "timeout"


# --- the whole run ------------------------------------------------------------------------


def run_all(
    corpus: dict[int, Path], paces: list[float], repeats: int, work: Path
) -> tuple[list[Run], dict[str, int]]:
    runs: list[Run] = []
    with running_moto(work) as moto:
        endpoint = moto.url
        s3 = s3_client(endpoint)
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=bucket)
        s3_env = {
            "VRAI_DEBUG_STORE": "s3",
            "VRAI_DEBUG_BUCKET": bucket,
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }
        with (
            running_server("off", work, {"VRAI_DEBUG_STORE": "off"}) as off,
            running_server("on", work, s3_env) as on,
        ):
            servers = {"off": off, "on": on}
            # One small request each first: lazy imports and pools belong to idle.
            warm = corpus[min(corpus)].read_bytes()[: 2 * MB]
            for server in servers.values():
                anyio.run(post, server.url, warm, None)
                server.wait_idle()
            time.sleep(1.0)
            idle = {name: settled_rss(server.pid, seconds=1.0) for name, server in servers.items()}
            print(
                f"idle tree RSS: off {idle['off'] / MiB:.1f} MiB, on {idle['on'] / MiB:.1f} MiB",
                flush=True,
            )
            for repeat in range(1, repeats + 1):
                # off, on, then on, off: a slow drift of the machine hits both alike.
                order = ["off", "on"] if repeat % 2 else ["on", "off"]
                for size, path in corpus.items():
                    data = path.read_bytes()
                    for pace in paces:
                        rate = pace * MB if pace else None
                        for name in order:
                            server = servers[name]
                            server.wait_idle()
                            cpu = cpu_seconds(server.process.pid), cpu_seconds(moto.pid)
                            run, request_id = measure(server, data, rate, idle[name])
                            run.size_mb, run.pace_mb_s, run.repeat = size, pace, repeat
                            if name == "on":
                                settle_copy(s3, bucket, on, request_id, run)
                            # After the copies settled and ffmpeg was reaped: all of it counts.
                            server.wait_idle()
                            run.server_cpu_seconds = cpu_seconds(server.process.pid) - cpu[0]
                            run.moto_cpu_seconds = cpu_seconds(moto.pid) - cpu[1]
                            runs.append(run)
                            print(progress(run), flush=True)
                    del data
    return runs, idle


def progress(run: Run) -> str:
    pace = f"{run.pace_mb_s:g} MB/s" if run.pace_mb_s else "unthrottled"
    copy = f", input copy {run.input_copy}" if run.store == "on" else ""
    if run.copy_done_after_response_seconds is not None:
        copy += f" {run.copy_done_after_response_seconds:.2f} s after the response"
    return (
        f"  #{run.repeat} {run.size_mb:>3} MB {pace:>11} copies {run.store:>3}: "
        f"HTTP {run.status}, total {run.total_seconds:.2f} s, "
        f"after last byte {run.after_last_byte_seconds:.3f} s, "
        f"peak {run.peak_tree_rss / MiB:.1f} MiB (+{run.peak_above_idle / MiB:.1f}), "
        f"CPU server {run.server_cpu_seconds:.2f} s, moto {run.moto_cpu_seconds:.2f} s{copy}"
    )


# --- reporting ----------------------------------------------------------------------------


@dataclass
class Case:
    size_mb: int
    pace_mb_s: float
    medians: dict[str, dict[str, float]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    copies: dict[str, int] = field(default_factory=dict)


METRICS = {
    "total_seconds": lambda run: run.total_seconds,
    "after_last_byte_seconds": lambda run: run.after_last_byte_seconds,
    "peak_tree_rss": lambda run: run.peak_tree_rss,
    "peak_above_idle": lambda run: run.peak_above_idle,
    "server_cpu_seconds": lambda run: run.server_cpu_seconds,
    "moto_cpu_seconds": lambda run: run.moto_cpu_seconds,
}


def summarize(runs: list[Run]) -> list[Case]:
    cases = []
    for size, pace in dict.fromkeys((run.size_mb, run.pace_mb_s) for run in runs):
        case = Case(size, pace)
        for store in ("off", "on"):
            mine = [r for r in runs if (r.size_mb, r.pace_mb_s, r.store) == (size, pace, store)]
            case.medians[store] = {
                name: float(median([value(run) for run in mine])) for name, value in METRICS.items()
            }
            if store == "on":
                for run in mine:
                    case.copies[run.input_copy] = case.copies.get(run.input_copy, 0) + 1
        case.ratios = {
            name: case.medians["on"][name] / case.medians["off"][name]
            for name in METRICS
            if case.medians["off"][name] > 0
        }
        cases.append(case)
    return cases


def table(cases: list[Case]) -> str:
    headers = [
        "upload", "copies", "total s", "after last byte s", "peak tree RSS MiB",
        "peak above idle MiB", "server CPU s", "moto CPU s", "input copy",
    ]  # fmt: skip
    rows = []
    for case in cases:
        pace = f"{case.pace_mb_s:g} MB/s" if case.pace_mb_s else "unthrottled"
        label = f"{case.size_mb} MB, {pace}"
        for store in ("off", "on"):
            values = case.medians[store]
            copies = ", ".join(f"{n} {what}" for what, n in sorted(case.copies.items()))
            rows.append(
                [
                    label if store == "off" else "",
                    store,
                    f"{values['total_seconds']:.2f}",
                    f"{values['after_last_byte_seconds']:.3f}",
                    f"{values['peak_tree_rss'] / MiB:.1f}",
                    f"{values['peak_above_idle'] / MiB:.1f}",
                    f"{values['server_cpu_seconds']:.2f}",
                    f"{values['moto_cpu_seconds']:.2f}",
                    copies if store == "on" else "",
                ]
            )
        # Ratios where the figure is large enough for one to mean something; the tail after
        # the last byte is tens of milliseconds, and the memory above idle is mostly ffmpeg:
        # for those the difference says more.
        on, off = case.medians["on"], case.medians["off"]
        tail_ms = (on["after_last_byte_seconds"] - off["after_last_byte_seconds"]) * 1000
        above = (on["peak_above_idle"] - off["peak_above_idle"]) / MiB
        rows.append(
            [
                "",
                "**on/off**",
                _ratio(case.ratios.get("total_seconds")),
                f"{tail_ms:+.0f} ms",
                _ratio(case.ratios.get("peak_tree_rss")),
                f"{above:+.1f} MiB",
                f"{on['server_cpu_seconds'] - off['server_cpu_seconds']:+.2f} s",
                f"{on['moto_cpu_seconds'] - off['moto_cpu_seconds']:+.2f} s",
                "",
            ]
        )
    return markdown_table(headers, rows)


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    verdict = "within 5%" if value <= TARGET_RATIO else "over 5%"
    return f"**{value:.3f}** ({verdict})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="requests per case and store")
    parser.add_argument("--sizes", default="10,50", help="upload sizes in MB")
    parser.add_argument("--paces", default="2,0", help="upload paces in MB/s (0: unthrottled)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    paces = [float(pace) for pace in args.paces.split(",")]
    info = machine()
    print(describe_machine(info), flush=True)
    with tempfile.TemporaryDirectory(prefix="vrai-bench-copies-") as scratch:
        work = Path(scratch)
        print("corpus:", flush=True)
        corpus = make_corpus(work, sizes)
        runs, idle = run_all(corpus, paces, args.repeats, work)
    cases = summarize(runs)
    report = table(cases)
    print()
    print(f"Debug copies in S3 (moto on loopback) vs off, medians of {args.repeats} requests:")
    print()
    print(report)
    worst_latency = max(case.ratios.get("total_seconds", 0.0) for case in cases)
    worst_memory = max(case.ratios.get("peak_tree_rss", 0.0) for case in cases)
    print()
    print(
        f"worst on/off ratio: latency {worst_latency:.3f}, peak tree RSS {worst_memory:.3f} "
        f"(target {TARGET_RATIO}); idle tree RSS off {idle['off'] / MiB:.1f} MiB, "
        f"on {idle['on'] / MiB:.1f} MiB (the S3 client's import)"
    )
    path = write_json(
        "debug_copies.json",
        {
            "machine": info,
            "parameters": {
                "sizes_mb": sizes,
                "paces_mb_s": paces,
                "repeats": args.repeats,
                "window_seconds": list(WINDOW),
                "chunk_bytes": CHUNK_BYTES,
                "sample_interval_seconds": SAMPLE_INTERVAL,
                "target_ratio": TARGET_RATIO,
            },
            "idle_tree_rss": idle,
            "load_average_at_end": [round(load, 2) for load in os.getloadavg()],
            "cases": [asdict(case) for case in cases],
            "runs": [{**asdict(run), "peak_above_idle": run.peak_above_idle} for run in runs],
            "table": report,
        },
    )
    print(f"wrote {path.relative_to(REPO_DIR)}")
    failures = [run for run in runs if run.status != 200]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
