"""The service and the buffered design it replaced, side by side under load (issue 7).

One run starts both on loopback with the same settings: the service (`vrai-stream
serve`) and `bench/baseline.py` (whole body in memory, temp file, ffmpeg file to file).
They take turns on the same corpus and pacing (which one goes first alternates, so a
drift of the machine hits both alike), and every figure is reported for both and as a
service/baseline ratio.  Raw `ffmpeg` runs (file to file, the exact command both servers
run) on the same files are the second baseline.

Corpus (generated with ffmpeg, cached in --corpus): speech looped over a noise bed, as
LPCM CAF (48 kHz mono, streams into ffmpeg), AAC CAF in Apple's layout (packet table
after the audio, so the service must spool it to disk first) and M4A (`moov` last, the
same).  Sizes of 1, 10, 50 and 200 MB are reached by duration and bitrate: LPCM at
96 kB/s (200 MB is 35 minutes), AAC at 256 kbps stereo (200 MB is 104 minutes).  Every
request asks for the window 0-300 s, so ffmpeg's work is the same beyond 300 s of audio
and what grows with the size is only the bytes to move and hold.

Scenarios, in order:

1. sizes: one request at a time, per format and size, unthrottled, at 2 MB/s (a good
   phone link) and at 256 KB/s (a poor one): peak RSS of the server's process tree
   (server + ffmpeg) above its resting level, total latency, time after the last byte.
2. concurrency: unthrottled 10 MB uploads (the three formats in turn) at rising
   concurrency: throughput and p50/p95 latency, next to raw ffmpeg run in parallel.
3. end to end: JSON answers from the local Whisper model (`HF_HUB_OFFLINE=1`), at 2 MB/s,
   so the share of each stage (receive, transcode, transcribe) is visible.
4. admission: 16 concurrent 50 MB uploads at 2 MB/s on a 1 GiB budget
   (`VRAI_MEMORY_LIMIT_BYTES=1073741824`, job limit and queue derived from it): no
   crash, peak under the budget, the excess answered 503 + Retry-After at once.

Scenarios 1-3 reuse one pair of servers (`VRAI_MAX_JOBS=16`, `VRAI_MAX_QUEUE=16`, so
admission never interferes); scenario 4 starts a fresh pair with the budget and no job
settings.  All four servers use the local transcriber and no debug copies (`--env` adds
settings to every server, e.g. an S3 bucket); all but scenario 3 ask for
`Accept: audio/mpeg`, which returns the trimmed MP3 and skips transcription.

Uploads use a small HTTP/1.1 client on anyio and h11 that reads the answer while it
sends, as a phone's network stack does: httpx sends the whole body before reading, so an
early 503 (sent before the body is read) reaches it as a connection reset instead.
httpx does the rest (health checks, polling).

Run: .venv/bin/python -m bench.load --quick      (under a minute)
     .venv/bin/python -m bench.load [--full]     (about 20 minutes on 2 cores)
Output: bench/results/load.json (load-quick.json), a Markdown report on stdout and in
bench/results/load.md, and PNG plots bench/results/load-*.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import h11
import httpx
import psutil

from tests.support.phone_media import parse_adts, write_aac_caf  # Apple's CAF, as phones write

from .common import (
    MiB,
    Progress,
    ServerProcess,
    TreePeakSampler,
    cpu_pressure,
    describe_machine,
    free_port,
    load_average,
    machine,
    markdown_table,
    median,
    run_ffmpeg,
    running_server,
    scrubbed_env,
    settled_rss,
    tool,
    wait_ready,
    with_wait,
    write_json,
)

MB = 1_000_000
KB = 1_000
LPCM_RATE = 48_000
LPCM_BYTES_PER_SECOND = LPCM_RATE * 2
AAC_BITRATE = 256_000
AAC_BYTES_PER_SECOND = AAC_BITRATE // 8
WINDOW = (0.0, 300.0)
CHUNK_BYTES = 64 * 1024
REQUEST_TIMEOUT = 900.0
FORMATS = ("lpcm-caf", "aac-caf", "m4a")
SERVERS = ("service", "baseline")
BUDGET_BYTES = 1024 * MiB
SPEECH_TEXT = (
    "This is a voice note recorded on a phone. Remind me to call the plumber about the "
    "kitchen sink, and to move the team meeting to Thursday afternoon. The budget review "
    "is next week, so please send the numbers before Friday."
)
TARGETS = {
    "flat_memory": 0.15,
    "after_last_byte_vs_baseline": 0.05,
    "single_vs_raw_ffmpeg": 1.05,
    "throughput_vs_raw_ffmpeg": 0.95,
}


# --- corpus -------------------------------------------------------------------------------


def speech_bed(folder: Path) -> Path:
    """60 s of 48 kHz mono: a spoken paragraph (espeak-ng, if installed) over pink noise.

    Speech, so the end-to-end scenario transcribes words; noise under it, so the MP3
    encoder works on every frame as it would on a real recording.
    """
    path = folder / "bed-60s.wav"
    if path.exists():
        return path
    noise = f"anoisesrc=color=pink:amplitude=0.02:sample_rate={LPCM_RATE}:duration=60"
    try:
        espeak = tool("espeak-ng")
    except SystemExit:
        tone = f"sine=frequency=220:sample_rate={LPCM_RATE}:duration=60"
        run_ffmpeg("-f", "lavfi", "-i", tone, "-f", "lavfi", "-i", noise,
                   "-filter_complex", "amix=inputs=2", "-ac", "1", str(path))  # fmt: skip
        return path
    voice = folder / "voice.wav"
    subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(voice), SPEECH_TEXT], check=True)
    run_ffmpeg(
        "-stream_loop", "-1", "-i", str(voice), "-f", "lavfi", "-i", noise,
        "-filter_complex",
        f"[0:a]aresample={LPCM_RATE}[v];[v][1:a]amix=inputs=2:duration=shortest:normalize=0",
        "-ac", "1", "-ar", str(LPCM_RATE), "-c:a", "pcm_s16le", "-t", "60", str(path),
    )  # fmt: skip
    return path


def adts_frames(data: bytes) -> list[int]:
    """Offsets of the ADTS frames in `data`, and its end: where it may be cut."""
    offsets, offset = [], 0
    while offset + 7 <= len(data):
        offsets.append(offset)
        offset += (
            ((data[offset + 3] & 0x3) << 11) | (data[offset + 4] << 3) | (data[offset + 5] >> 5)
        )
    return [*offsets, offset]


def repeated_adts(base: bytes, target_bytes: int) -> bytes:
    """`base` (an ADTS stream) repeated and cut at a frame boundary near `target_bytes`.

    Encoding 104 minutes of AAC for the 200 MB file would take minutes; ADTS frames
    stand alone, so repeating a minute of them is the same stream to a decoder.
    """
    bounds = adts_frames(base)
    copies, rest = divmod(target_bytes, len(base))
    cut = next(offset for offset in bounds if offset >= rest)
    return base * copies + base[:cut]


def build_corpus(folder: Path, sizes_mb: Sequence[int]) -> dict[tuple[str, int], Path]:
    """Every format at every size; files already in `folder` are reused."""
    folder.mkdir(parents=True, exist_ok=True)
    bed = speech_bed(folder)
    base_aac = folder / "bed-256k.aac"
    if not base_aac.exists():
        run_ffmpeg("-i", str(bed), "-ac", "2", "-c:a", "aac", "-b:a", "256k", "-f", "adts",
                   str(base_aac))  # fmt: skip
    corpus = {}
    for size in sizes_mb:
        paths = {
            "lpcm-caf": folder / f"lpcm-{size}MB.caf",
            "aac-caf": folder / f"aac-{size}MB.caf",
            "m4a": folder / f"aac-{size}MB.m4a",
        }
        if not paths["lpcm-caf"].exists():
            seconds = size * MB / LPCM_BYTES_PER_SECOND
            run_ffmpeg("-stream_loop", "-1", "-i", str(bed), "-t", f"{seconds:.3f}",
                       "-c:a", "pcm_s16le", "-f", "caf", str(paths["lpcm-caf"]))  # fmt: skip
        if not paths["aac-caf"].exists() or not paths["m4a"].exists():
            adts = repeated_adts(base_aac.read_bytes(), size * MB)
            frames = len(adts_frames(adts)) - 1
            write_aac_caf(
                paths["aac-caf"],
                parse_adts(adts),
                valid_frames=frames * 1024,
                priming=1024,
                pakt_first=False,
            )
            stream = folder / "tmp.aac"
            stream.write_bytes(adts)
            run_ffmpeg(
                "-i", str(stream), "-c", "copy", "-bsf:a", "aac_adtstoasc", str(paths["m4a"])
            )
            stream.unlink()
        for fmt in FORMATS:
            corpus[fmt, size] = paths[fmt]
    return corpus


# --- an HTTP/1.1 client that reads while it sends -------------------------------------------


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None
    bytes_sent: int = 0
    started: float = 0.0
    last_byte_sent: float | None = None
    """perf_counter when the body's last chunk was handed to the socket (None: not sent)."""
    finished: float = 0.0


async def paced(data: bytes, rate: float | None, started: float) -> AsyncIterator[bytes]:
    """`data` in 64 KiB chunks, at `rate` bytes/s from `started` (None: unthrottled)."""
    view = memoryview(data)
    for offset in range(0, len(data), CHUNK_BYTES):
        if rate:
            delay = started + offset / rate - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
        yield bytes(view[offset : offset + CHUNK_BYTES])


async def _read_reply(stream: anyio.abc.ByteStream, conn: h11.Connection, reply: Reply) -> None:
    """Read the response, whenever it comes: an early 503 arrives before the body is sent."""
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                data = b""
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            reply.status = event.status_code
            reply.headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            reply.body = bytes(body)
            return


async def _send_body(
    stream: anyio.abc.ByteStream,
    conn: h11.Connection,
    chunks: AsyncIterator[bytes],
    reply: Reply,
    answered: anyio.Event,
) -> None:
    """Send the chunks until the end, or until the server has answered (it read enough)."""
    try:
        async for chunk in chunks:
            if answered.is_set():
                return
            await stream.send(conn.send(h11.Data(data=chunk)))
            reply.bytes_sent += len(chunk)
        await stream.send(conn.send(h11.EndOfMessage()))
        reply.last_byte_sent = time.perf_counter()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, h11.LocalProtocolError):
        return  # the server stopped reading: its answer (or its absence) says why


async def post_chunked(
    host: str, port: int, target: str, headers: dict[str, str], data: bytes, rate: float | None
) -> Reply:
    """POST `data` chunked (as the app uploads), reading the answer concurrently."""
    reply = Reply(started=time.perf_counter())
    conn = h11.Connection(h11.CLIENT)
    head = {"Host": f"{host}:{port}", "Transfer-Encoding": "chunked", **headers}
    try:
        with anyio.fail_after(REQUEST_TIMEOUT):
            async with await anyio.connect_tcp(host, port) as stream:
                answered = anyio.Event()
                await stream.send(
                    conn.send(h11.Request(method="POST", target=target, headers=list(head.items())))
                )

                async with anyio.create_task_group() as group:

                    async def read() -> None:
                        try:
                            await _read_reply(stream, conn, reply)
                        except h11.RemoteProtocolError as exc:
                            reply.error = f"RemoteProtocolError: {exc}"[:200]
                        answered.set()
                        group.cancel_scope.cancel()  # a sender blocked on a full socket too

                    group.start_soon(read)
                    await _send_body(
                        stream, conn, paced(data, rate, reply.started), reply, answered
                    )
                    await anyio.sleep_forever()
    except (OSError, TimeoutError, anyio.BrokenResourceError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"[:200]
    if reply.status == 0 and reply.error is None:
        reply.error = "connection closed without an answer"
    reply.finished = time.perf_counter()
    return reply


# --- requests and their records -------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One upload to make: what, how fast, and which answer to ask for."""

    fmt: str
    size_mb: int
    path: Path
    pace: float | None
    """bytes/s; None is unthrottled."""
    mp3: bool = True


@dataclass
class Record:
    scenario: str
    server: str
    fmt: str
    size_mb: int
    pace: str
    concurrency: int
    status: int
    error: str | None
    input_bytes: int
    total_seconds: float
    after_last_byte_seconds: float | None
    """Client side: from the last chunk handed to the socket to the answer complete."""
    server_after_last_byte_seconds: float | None = None
    """Server side: from the last body byte the server read (its own log line)."""
    server_timings: dict[str, float] = field(default_factory=dict)
    retry_after: str | None = None
    code: str | None = None
    request_id: str | None = None
    bytes_sent: int = 0
    started_offset: float = 0.0


def pace_label(pace: float | None) -> str:
    if not pace:
        return "unthrottled"
    return f"{pace / MB:g} MB/s" if pace >= MB else f"{pace / 1024:g} KB/s"


class DataCache:
    """File contents kept in the load generator's memory, so reading them is not timed."""

    def __init__(self) -> None:
        self._data: dict[Path, bytes] = {}

    def get(self, path: Path) -> bytes:
        if path not in self._data:
            self._data[path] = path.read_bytes()
        return self._data[path]

    def keep_only(self, paths: set[Path]) -> None:
        for path in set(self._data) - paths:
            del self._data[path]


async def one_request(server: ServerProcess, job: Job, data: bytes) -> Reply:
    port = int(server.url.rsplit(":", 1)[1])
    target = f"/v1/transcriptions?fromTime={WINDOW[0]:g}&toTime={WINDOW[1]:g}"
    headers = {"Accept": "audio/mpeg"} if job.mp3 else {"Accept": "application/json"}
    return await post_chunked("127.0.0.1", port, target, headers, data, job.pace)


def to_record(scenario: str, server: str, job: Job, reply: Reply, level: int, t0: float) -> Record:
    after = reply.finished - reply.last_byte_sent if reply.last_byte_sent else None
    code = None
    if reply.status >= 400 and reply.body.startswith(b"{"):
        with contextlib.suppress(ValueError, AttributeError):
            code = json.loads(reply.body).get("code")
    return Record(
        scenario=scenario,
        server=server,
        fmt=job.fmt,
        size_mb=job.size_mb,
        pace=pace_label(job.pace),
        concurrency=level,
        status=reply.status,
        error=reply.error,
        input_bytes=job.path.stat().st_size,
        total_seconds=reply.finished - reply.started,
        after_last_byte_seconds=after,
        retry_after=reply.headers.get("retry-after"),
        code=code,
        request_id=reply.headers.get("x-request-id"),
        bytes_sent=reply.bytes_sent,
        started_offset=reply.started - t0,
    )


def attach_server_timings(server: ServerProcess, records: Sequence[Record]) -> None:
    """The server's own timings, from its log line, by request id."""
    logs = server.request_logs()
    for record in records:
        logged = logs.get(record.request_id or "")
        if logged:
            record.server_timings = with_wait(logged.get("timings"))
            record.server_after_last_byte_seconds = record.server_timings.get("afterLastByte")


@dataclass
class Batch:
    """Requests run at one concurrency against one server, with the tree's peak memory."""

    records: list[Record]
    wall_seconds: float
    rest_rss: int
    """The tree's RSS just before the batch (may hold what an earlier request left)."""
    peak_rss: int
    peak_pss: int
    cpu_seconds: float
    """CPU of the server and of the ffmpeg processes it ran and reaped, during the batch."""
    health_max: dict[str, int] = field(default_factory=dict)


async def _poll_health(url: str, seen: dict[str, int]) -> None:
    """The service's own view of its queue, every 50 ms (admission scenario)."""
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                health = (await client.get(f"{url}/health")).json()
                for key in ("jobsRunning", "jobsWaiting", "maxJobs", "maxQueue"):
                    if isinstance(health.get(key), int):
                        seen[key] = max(seen.get(key, 0), health[key])
            await anyio.sleep(0.05)


async def _run_jobs(
    server: ServerProcess,
    jobs: Callable[[], Job | None],
    level: int,
    scenario: str,
    cache: DataCache,
    progress: Progress,
    poll: bool,
) -> tuple[list[Record], float, dict[str, int]]:
    records: list[Record] = []
    seen: dict[str, int] = {}
    t0 = time.perf_counter()

    async def worker() -> None:
        while (job := jobs()) is not None:
            reply = await one_request(server, job, cache.get(job.path))
            records.append(to_record(scenario, server.name, job, reply, level, t0))
            progress.advance()

    async with anyio.create_task_group() as outer:
        if poll:
            outer.start_soon(_poll_health, server.url, seen)
        async with anyio.create_task_group() as group:
            for _ in range(level):
                group.start_soon(worker)
        wall = time.perf_counter() - t0
        outer.cancel_scope.cancel()
    return records, wall, seen


def run_batch(
    server: ServerProcess,
    jobs: Sequence[Job],
    *,
    level: int,
    scenario: str,
    cache: DataCache,
    progress: Progress,
    duration: float | None = None,
    poll: bool = False,
) -> Batch:
    """Run `jobs` with `level` workers (or cycle them for `duration` s), sampling memory."""
    server.wait_idle()
    rest = settled_rss(server.pid, 0.3)
    cpu = cpu_seconds(server.pid)
    deadline = time.monotonic() + duration if duration else None
    cycle = iter(list(jobs) * 1000 if duration else list(jobs))

    def next_job() -> Job | None:
        if deadline is not None and time.monotonic() > deadline:
            return None
        return next(cycle, None)

    with TreePeakSampler([server.pid], pss=poll) as sampler:
        records, wall, seen = anyio.run(
            _run_jobs, server, next_job, level, scenario, cache, progress, poll
        )
    server.wait_idle()
    attach_server_timings(server, records)
    return Batch(
        records,
        wall,
        rest,
        sampler.peaks[server.pid],
        sampler.pss_peaks[server.pid],
        cpu_seconds(server.pid) - cpu,
        seen,
    )


# --- raw ffmpeg -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User and system time of a process and of the children it has reaped (ffmpeg)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def raw_command(env: dict[str, str], source: Path, target: Path) -> list[str]:
    """The very command both servers run, from the same settings (see bench/baseline.py)."""
    from vrai_stream.media.ffmpeg import find_ffmpeg
    from vrai_stream.media.window import Window
    from vrai_stream.settings import Settings

    from .baseline import file_to_file_command

    settings = Settings.from_env(env)
    window = Window(*WINDOW)
    return file_to_file_command(settings, find_ffmpeg(settings.ffmpeg), window, source, target)


def children_cpu() -> float:
    """CPU of this process's reaped children: raw ffmpeg runs, measured like the servers'."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def raw_single(env: dict[str, str], path: Path, scratch: Path) -> dict[str, float]:
    """Wall time, CPU and peak RSS of one raw ffmpeg run on `path`."""
    target = scratch / "raw.mp3"
    cpu = children_cpu()
    started = time.perf_counter()
    process = subprocess.Popen(raw_command(env, path, target), stdin=subprocess.DEVNULL)
    with TreePeakSampler([process.pid]) as sampler:
        returncode = process.wait()
    wall = time.perf_counter() - started
    target.unlink(missing_ok=True)
    return {
        "wall_seconds": wall,
        "cpu_seconds": children_cpu() - cpu,
        "peak_rss": sampler.peaks[process.pid],
        "returncode": returncode,
    }


def raw_parallel(
    env: dict[str, str], paths: Sequence[Path], level: int, scratch: Path
) -> dict[str, float]:
    """Run ffmpeg on every file in `paths`, `level` at a time: files per second, and CPU
    per file (which, unlike throughput, other work on the machine barely moves)."""
    pending = list(enumerate(paths))
    running: list[subprocess.Popen[bytes]] = []
    cpu = children_cpu()
    started = time.perf_counter()
    failures = 0
    while pending or running:
        while pending and len(running) < level:
            index, path = pending.pop(0)
            command = raw_command(env, path, scratch / f"raw-{index}.mp3")
            running.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
        time.sleep(0.005)
        for process in [p for p in running if p.poll() is not None]:
            failures += process.returncode != 0
            running.remove(process)
    wall = time.perf_counter() - started
    for leftover in scratch.glob("raw-*.mp3"):
        leftover.unlink()
    return {
        "level": level,
        "files": len(paths),
        "wall_seconds": wall,
        "throughput": len(paths) / wall,
        "cpu_seconds_per_file": (children_cpu() - cpu) / max(1, len(paths)),
        "failures": failures,
    }


# --- the servers ----------------------------------------------------------------------------


def base_env(extra: dict[str, str]) -> dict[str, str]:
    """What both servers of a pair share: the embedded defaults, pinned where they matter."""
    return scrubbed_env(
        HF_HUB_OFFLINE="1",
        VRAI_TRANSCRIBER="local",
        VRAI_DEBUG_STORE="off",
        VRAI_MP3_BITRATE_KBPS="32",
        VRAI_LOG_LEVEL="info",
        **extra,
    )


@contextlib.contextmanager
def server_pair(folder: Path, env: dict[str, str], tag: str) -> Iterator[dict[str, ServerProcess]]:
    """The service and the baseline, same environment, each on its own free port.

    Both are started, not waited for: the caller waits (`wait_ready`), so pairs start at once.
    """
    commands = {
        "service": [sys.executable, "-m", "vrai_stream.cli", "serve", "--port"],
        "baseline": [sys.executable, "-m", "bench.baseline", "--port"],
    }
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, command in commands.items():
            port = str(free_port())
            server = stack.enter_context(
                running_server(
                    f"{tag}-{name}", [*command, port], {**env, "PORT": port}, folder, wait=False
                )
            )
            server.name = name  # records name the design, not the pair
            servers[name] = server
        yield servers


def warm_up(servers: dict[str, ServerProcess], path: Path, cache: DataCache) -> dict[str, int]:
    """One small request each, so lazy imports and thread pools are part of idle; then
    each tree's idle RSS, the floor every peak of the run is measured from."""
    job = Job("warm-up", 0, path, None)
    idle = {}
    for name, server in servers.items():
        wait_ready(server)
        reply = anyio.run(one_request, server, job, cache.get(path)[: 2 * MB])
        if reply.status != 200:
            raise RuntimeError(f"{name} warm-up failed: {reply.status} {reply.error}")
        server.wait_idle()
        idle[name] = settled_rss(server.pid, 1.0)
    return idle


def alternate(repeat: int) -> tuple[str, ...]:
    """service first on odd repeats, baseline first on even ones."""
    return SERVERS if repeat % 2 else SERVERS[::-1]


# --- scenarios ------------------------------------------------------------------------------


@dataclass
class Plan:
    sizes: list[int]
    unthrottled_repeats: int
    paced: list[tuple[float, str, int]]
    """(bytes/s, format or '*', size MB): the paced single uploads, one request each."""
    levels: list[int]
    level_size: int
    requests_per_level: Callable[[int], int]
    duration: float | None
    e2e: tuple[str, int, int]
    """(format, size MB, repeats) of the end-to-end scenario."""
    admission: tuple[int, int, float | None]
    """(uploads, size MB, pace) of the admission scenario."""


def quick_plan() -> Plan:
    return Plan(
        sizes=[1, 4],
        unthrottled_repeats=1,
        paced=[(2 * MB, "lpcm-caf", 4)],
        levels=[1, 2],
        level_size=1,
        requests_per_level=lambda level: 2 * level,
        duration=None,
        e2e=("lpcm-caf", 1, 1),
        admission=(16, 1, None),
    )


def full_plan() -> Plan:
    paced: list[tuple[float, str, int]] = [(2 * MB, "*", size) for size in (1, 10, 50)]
    paced += [(2 * MB, "lpcm-caf", 200)]
    paced += [(256 * 1024, "*", 1), (256 * 1024, "lpcm-caf", 10)]
    return Plan(
        sizes=[1, 10, 50, 200],
        unthrottled_repeats=2,
        paced=paced,
        levels=[1, 2, 4, 8],
        level_size=10,
        requests_per_level=lambda level: max(6, 3 * level),
        duration=None,
        e2e=("lpcm-caf", 10, 3),
        admission=(16, 50, 2 * MB),
    )


@dataclass
class Run:
    plan: Plan
    corpus: dict[tuple[str, int], Path]
    env: dict[str, str]
    scratch: Path
    progress: Progress
    cache: DataCache = field(default_factory=DataCache)
    records: list[Record] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    raw_single: list[dict[str, Any]] = field(default_factory=list)
    raw_parallel: list[dict[str, Any]] = field(default_factory=list)
    admission: dict[str, Any] = field(default_factory=dict)
    idle: dict[str, dict[str, int]] = field(default_factory=dict)
    """Idle tree RSS per pair ("main", "budget") and server, after the warm-up request."""

    def keep(self, scenario: str, batch: Batch, pair: str = "main", **labels: Any) -> None:
        self.records.extend(batch.records)
        server = batch.records[0].server if batch.records else ""
        self.batches.append(
            {
                "scenario": scenario,
                "server": server,
                **labels,
                "requests": len(batch.records),
                "wall_seconds": batch.wall_seconds,
                "idle_rss": self.idle[pair][server],
                "rest_rss": batch.rest_rss,
                "peak_rss": batch.peak_rss,
                "peak_pss": batch.peak_pss,
                "cpu_seconds": batch.cpu_seconds,
                "peak_above_idle": batch.peak_rss - self.idle[pair][server],
                "health_max": batch.health_max,
                "load_average": load_average(),
            }
        )


def scenario_sizes(run: Run, servers: dict[str, ServerProcess]) -> None:
    """One request at a time: memory and time after the last byte against the input size."""
    plan = run.plan
    for size in plan.sizes:
        for fmt in FORMATS:
            path = run.corpus[fmt, size]
            run.cache.keep_only({path})
            for repeat in range(1, plan.unthrottled_repeats + 1):
                for name in alternate(repeat):
                    _single(run, servers[name], Job(fmt, size, path, None), repeat)
                run.raw_single.append(
                    {
                        "fmt": fmt,
                        "size_mb": size,
                        "repeat": repeat,
                        **raw_single(run.env, path, run.scratch),
                    }
                )
    for number, (pace, which, size) in enumerate(plan.paced, start=1):
        for fmt in FORMATS if which == "*" else (which,):
            path = run.corpus[fmt, size]
            run.cache.keep_only({path})
            for name in alternate(number):
                _single(run, servers[name], Job(fmt, size, path, pace), 1)


def _single(run: Run, server: ServerProcess, job: Job, repeat: int) -> None:
    run.progress.describe(f"sizes: {server.name} {job.fmt} {job.size_mb} MB {pace_label(job.pace)}")
    batch = run_batch(
        server, [job], level=1, scenario="sizes", cache=run.cache, progress=run.progress
    )
    run.keep(
        "sizes", batch, fmt=job.fmt, size_mb=job.size_mb, pace=pace_label(job.pace), repeat=repeat
    )
    for record in batch.records:
        if record.status != 200:
            print(
                f"\n  ! {server.name} {job.fmt} {job.size_mb} MB: HTTP {record.status} "
                f"{record.error or ''}",
                file=sys.stderr,
            )


def scenario_concurrency(run: Run, servers: dict[str, ServerProcess]) -> None:
    """Unthrottled uploads of the three formats in turn, at rising concurrency."""
    plan = run.plan
    paths = [run.corpus[fmt, plan.level_size] for fmt in FORMATS]
    run.cache.keep_only(set(paths))
    for number, level in enumerate(plan.levels, start=1):
        count = plan.requests_per_level(level)
        jobs = [Job(FORMATS[i % 3], plan.level_size, paths[i % 3], None) for i in range(count)]
        for name in alternate(number):
            run.progress.describe(f"concurrency {level}: {name}")
            batch = run_batch(
                servers[name],
                jobs,
                level=level,
                scenario="concurrency",
                cache=run.cache,
                progress=run.progress,
                duration=plan.duration,
            )
            run.keep("concurrency", batch, level=level, size_mb=plan.level_size)
        run.progress.describe(f"concurrency {level}: raw ffmpeg")
        raw_paths = [job.path for job in jobs]
        run.raw_parallel.append(raw_parallel(run.env, raw_paths, level, run.scratch))


def scenario_e2e(run: Run, servers: dict[str, ServerProcess]) -> None:
    """JSON answers from the local model at 2 MB/s: where the time goes, stage by stage."""
    fmt, size, repeats = run.plan.e2e
    path = run.corpus[fmt, size]
    run.cache.keep_only({path})
    for repeat in range(1, repeats + 1):
        for name in alternate(repeat):
            run.progress.describe(f"end to end: {name}")
            job = Job(fmt, size, path, 2 * MB, mp3=False)
            batch = run_batch(
                servers[name],
                [job],
                level=1,
                scenario="e2e",
                cache=run.cache,
                progress=run.progress,
            )
            run.keep("e2e", batch, fmt=fmt, size_mb=size, repeat=repeat)


def scenario_admission(run: Run, servers: dict[str, ServerProcess]) -> None:
    """Many large uploads at once on a 1 GiB budget: refused early, never queued unbounded."""
    count, size, pace = run.plan.admission
    path = run.corpus["lpcm-caf", size]
    run.cache.keep_only({path})
    jobs = [Job("lpcm-caf", size, path, pace)] * count
    for name in SERVERS:
        run.progress.describe(f"admission: {name}, {count} x {size} MB")
        server = servers[name]
        batch = run_batch(
            server,
            jobs,
            level=count,
            scenario="admission",
            cache=run.cache,
            progress=run.progress,
            poll=True,
        )
        run.keep("admission", batch, "budget", size_mb=size, pace=pace_label(pace), level=count)
        run.admission[name] = admission_verdict(batch, server)


def admission_verdict(batch: Batch, server: ServerProcess) -> dict[str, Any]:
    statuses = [record.status for record in batch.records]
    refused = [record for record in batch.records if record.status == 503]
    accepted = statuses.count(200)
    limits = batch.health_max
    bound = limits.get("maxJobs", 0) + limits.get("maxQueue", 0) if limits.get("maxJobs") else None
    return {
        "statuses": {str(status): statuses.count(status) for status in sorted(set(statuses))},
        "transport_errors": sum(
            record.error is not None and record.status == 0 for record in batch.records
        ),
        "server_alive": server.process.poll() is None,
        "peak_rss": batch.peak_rss,
        "peak_pss": batch.peak_pss,
        "budget_bytes": BUDGET_BYTES,
        "refused_with_retry_after": sum(bool(r.retry_after) for r in refused),
        "refused_latency_max_seconds": max((r.total_seconds for r in refused), default=None),
        "refused_bytes_sent_max": max((r.bytes_sent for r in refused), default=None),
        "max_jobs": limits.get("maxJobs"),
        "max_queue": limits.get("maxQueue"),
        "jobs_running_max": limits.get("jobsRunning"),
        "jobs_waiting_max": limits.get("jobsWaiting"),
        "accepted": accepted,
        "accepted_bound": bound,
    }


# --- summaries ------------------------------------------------------------------------------


def ratio(service: float | None, baseline: float | None) -> float | None:
    if service is None or baseline is None or baseline == 0 or math.isnan(baseline):
        return None
    return service / baseline


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile: with a handful of requests, no interpolation pretends more."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _ok(records: Sequence[Record]) -> list[Record]:
    return [record for record in records if record.status == 200]


def summarize_sizes(run: Run) -> list[dict[str, Any]]:
    """Per (pace, format, size): medians for both servers, their ratios, raw ffmpeg."""
    rows = []
    keys = dict.fromkeys(
        (b["pace"], b["fmt"], b["size_mb"]) for b in run.batches if b["scenario"] == "sizes"
    )
    for pace, fmt, size in keys:
        row: dict[str, Any] = {"pace": pace, "fmt": fmt, "size_mb": size}
        for name in SERVERS:
            batches = [
                b
                for b in run.batches
                if b["scenario"] == "sizes"
                and b["server"] == name
                and (b["pace"], b["fmt"], b["size_mb"]) == (pace, fmt, size)
            ]
            records = _ok(
                [
                    r
                    for r in run.records
                    if r.scenario == "sizes"
                    and r.server == name
                    and (r.pace, r.fmt, r.size_mb) == (pace, fmt, size)
                ]
            )
            row[name] = {
                "requests": len(batches),
                "ok": len(records),
                "peak_above_idle": median([b["peak_above_idle"] for b in batches]),
                "peak_rss": median([b["peak_rss"] for b in batches]),
                "total_seconds": median([r.total_seconds for r in records]),
                "after_last_byte_seconds": median(
                    [r.after_last_byte_seconds for r in records if r.after_last_byte_seconds]
                ),
                "server_after_last_byte_seconds": median(
                    [
                        r.server_after_last_byte_seconds
                        for r in records
                        if r.server_after_last_byte_seconds is not None
                    ]
                ),
            }
        for metric in (
            "peak_above_idle",
            "total_seconds",
            "after_last_byte_seconds",
            "server_after_last_byte_seconds",
        ):
            row[f"ratio_{metric}"] = ratio(row["service"][metric], row["baseline"][metric])
        raws = [r for r in run.raw_single if (r["fmt"], r["size_mb"]) == (fmt, size)]
        if pace == "unthrottled" and raws:
            row["raw_ffmpeg_seconds"] = median([r["wall_seconds"] for r in raws])
            for name in SERVERS:
                row[f"{name}_vs_raw"] = ratio(row[name]["total_seconds"], row["raw_ffmpeg_seconds"])
        rows.append(row)
    return rows


def summarize_concurrency(run: Run) -> list[dict[str, Any]]:
    rows = []
    for level in run.plan.levels:
        row: dict[str, Any] = {"level": level}
        for name in SERVERS:
            batch = next(
                b
                for b in run.batches
                if b["scenario"] == "concurrency" and b["server"] == name and b["level"] == level
            )
            records = [
                r
                for r in run.records
                if r.scenario == "concurrency" and r.server == name and r.concurrency == level
            ]
            ok = _ok(records)
            latencies = [r.total_seconds for r in ok]
            row[name] = {
                "requests": len(records),
                "ok": len(ok),
                "throughput": len(ok) / batch["wall_seconds"],
                "p50_seconds": percentile(latencies, 0.50),
                "p95_seconds": percentile(latencies, 0.95),
                "peak_above_idle": batch["peak_above_idle"],
                "peak_rss": batch["peak_rss"],
                "cpu_seconds_per_request": batch["cpu_seconds"] / max(1, len(records)),
            }
        raw = next(r for r in run.raw_parallel if r["level"] == level)
        row["raw_ffmpeg_throughput"] = raw["throughput"]
        row["raw_ffmpeg_cpu_seconds_per_file"] = raw["cpu_seconds_per_file"]
        for metric in ("throughput", "p50_seconds", "p95_seconds", "peak_above_idle"):
            row[f"ratio_{metric}"] = ratio(row["service"][metric], row["baseline"][metric])
        rows.append(row)
    return rows


def summarize_e2e(run: Run) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in SERVERS:
        records = _ok([r for r in run.records if r.scenario == "e2e" and r.server == name])
        stages = ("receive", "transcode", "transcribe", "afterLastByte", "total")
        medians = {
            stage: median([r.server_timings.get(stage, 0.0) for r in records]) for stage in stages
        }
        total = medians["total"] or float("nan")
        batches = [b for b in run.batches if b["scenario"] == "e2e" and b["server"] == name]
        summary[name] = {
            "requests": len(records),
            "cpu_seconds": median([b["cpu_seconds"] for b in batches]),
            "client_total_seconds": median([r.total_seconds for r in records]),
            "client_after_last_byte_seconds": median(
                [r.after_last_byte_seconds for r in records if r.after_last_byte_seconds]
            ),
            "server_timings_median": medians,
            "share_of_total": {stage: medians[stage] / total for stage in stages[:-1]},
        }
    summary["ratio_after_last_byte"] = ratio(
        summary["service"]["client_after_last_byte_seconds"],
        summary["baseline"]["client_after_last_byte_seconds"],
    )
    return summary


def check_targets(
    sizes: list[dict[str, Any]], levels: list[dict[str, Any]], run: Run
) -> dict[str, Any]:
    """Issue 7's targets, computed: a figure, its target, and whether it is met."""
    checks: dict[str, Any] = {}
    unthrottled = {
        (row["fmt"], row["size_mb"]): row for row in sizes if row["pace"] == "unthrottled"
    }
    large = max(run.plan.sizes)
    small = 10 if 10 in run.plan.sizes and large > 10 else min(run.plan.sizes)
    for fmt in FORMATS:
        low, high = unthrottled[fmt, small], unthrottled[fmt, large]
        figures = {}
        for name in SERVERS:
            a, b = low[name]["peak_above_idle"], high[name]["peak_above_idle"]
            figures[name] = {"small": a, "large": b, "growth": (b - a) / a if a > 0 else None}
        growth = figures["service"]["growth"]
        checks[f"flat_memory/{fmt}"] = {
            "sizes_mb": [small, large],
            **figures,
            "target": f"service within {TARGETS['flat_memory']:.0%}",
            "met": growth is not None and abs(growth) <= TARGETS["flat_memory"],
        }
    paced = [row for row in sizes if row["pace"] == "2 MB/s"]
    biggest = max((row["size_mb"] for row in paced if row["size_mb"] <= 50), default=None)
    for row in paced:
        if row["size_mb"] == biggest:
            value = row["ratio_after_last_byte_seconds"]
            checks[f"after_last_byte_2MBps/{row['fmt']}/{biggest}MB"] = {
                "service": row["service"]["after_last_byte_seconds"],
                "baseline": row["baseline"]["after_last_byte_seconds"],
                "ratio": value,
                "target": f"under {TARGETS['after_last_byte_vs_baseline']:.0%}",
                "met": value is not None and value < TARGETS["after_last_byte_vs_baseline"],
            }
    for (fmt, size), row in unthrottled.items():
        if size >= small:
            value = row.get("service_vs_raw")
            checks[f"single_vs_raw/{fmt}/{size}MB"] = {
                "service_seconds": row["service"]["total_seconds"],
                "raw_ffmpeg_seconds": row.get("raw_ffmpeg_seconds"),
                "baseline_vs_raw": row.get("baseline_vs_raw"),
                "ratio": value,
                "target": f"at most {TARGETS['single_vs_raw_ffmpeg']:.2f}",
                "met": value is not None and value <= TARGETS["single_vs_raw_ffmpeg"],
            }
    best = {name: max(row[name]["throughput"] for row in levels) for name in SERVERS}
    raw_best = max(row["raw_ffmpeg_throughput"] for row in levels)
    checks["throughput_at_saturation"] = {
        "service": best["service"],
        "baseline": best["baseline"],
        "raw_ffmpeg": raw_best,
        "ratio": best["service"] / raw_best,
        "baseline_ratio": best["baseline"] / raw_best,
        "target": f"at least {TARGETS['throughput_vs_raw_ffmpeg']:.0%}",
        "met": best["service"] / raw_best >= TARGETS["throughput_vs_raw_ffmpeg"],
    }
    # The same question answered by CPU per request, which other load on the machine barely
    # moves: at saturation on N cores, capacity is N / (CPU per request).
    cpu = {
        name: median([row[name]["cpu_seconds_per_request"] for row in levels]) for name in SERVERS
    }
    raw_cpu = median([row["raw_ffmpeg_cpu_seconds_per_file"] for row in levels])
    checks["capacity_by_cpu"] = {
        "service_cpu_per_request": cpu["service"],
        "baseline_cpu_per_request": cpu["baseline"],
        "raw_ffmpeg_cpu_per_file": raw_cpu,
        "ratio": raw_cpu / cpu["service"],
        "baseline_ratio": raw_cpu / cpu["baseline"],
        "target": f"at least {TARGETS['throughput_vs_raw_ffmpeg']:.0%}",
        "met": raw_cpu / cpu["service"] >= TARGETS["throughput_vs_raw_ffmpeg"],
    }
    service = run.admission.get("service")
    if service:
        bound = service["accepted_bound"]
        checks["admission"] = {
            **{
                key: service[key]
                for key in (
                    "statuses",
                    "peak_pss",
                    "peak_rss",
                    "accepted",
                    "accepted_bound",
                    "refused_latency_max_seconds",
                )
            },
            "target": "no crash, peak (PSS) under 1 GiB, excess 503 + Retry-After, bounded",
            "met": (
                service["server_alive"]
                and service["transport_errors"] == 0
                and service["peak_pss"] < BUDGET_BYTES
                and set(service["statuses"]) <= {"200", "503"}
                and service["refused_with_retry_after"] == service["statuses"].get("503", 0)
                and bound is not None
                and service["accepted"] <= bound
            ),
        }
    return checks


# --- report ---------------------------------------------------------------------------------


def _mib(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value / MiB:.1f}"


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3g}"


def sizes_tables(rows: list[dict[str, Any]]) -> str:
    memory = [
        [
            f"{row['fmt']} {row['size_mb']} MB",
            _mib(row["service"]["peak_above_idle"]),
            _mib(row["baseline"]["peak_above_idle"]),
            _x(row["ratio_peak_above_idle"]),
            _s(row["service"]["total_seconds"]),
            _s(row["baseline"]["total_seconds"]),
            _s(row.get("raw_ffmpeg_seconds")),
            _x(row.get("service_vs_raw")),
            _x(row.get("baseline_vs_raw")),
        ]
        for row in rows
        if row["pace"] == "unthrottled"
    ]
    tail = [
        [
            f"{row['fmt']} {row['size_mb']} MB",
            row["pace"],
            _s(row["service"]["after_last_byte_seconds"], 3),
            _s(row["baseline"]["after_last_byte_seconds"], 3),
            _x(row["ratio_after_last_byte_seconds"]),
            f"{_s(row['service']['server_after_last_byte_seconds'], 3)} / "
            f"{_s(row['baseline']['server_after_last_byte_seconds'], 3)}",
            _s(row["service"]["total_seconds"]),
            _s(row["baseline"]["total_seconds"]),
            _mib(row["service"]["peak_above_idle"]),
            _mib(row["baseline"]["peak_above_idle"]),
        ]
        for row in rows
        if row["pace"] != "unthrottled"
    ]
    return "\n\n".join(
        [
            "Unthrottled, one request at a time (medians). Peak: RSS of the server's process "
            "tree (server + ffmpeg) above its idle level after a warm-up request, MiB. "
            "Latency, s; raw ffmpeg: the same command, file to file.",
            markdown_table(
                [
                    "upload",
                    "peak service",
                    "peak baseline",
                    "service/baseline",
                    "total service",
                    "total baseline",
                    "raw ffmpeg",
                    "service/raw",
                    "baseline/raw",
                ],
                memory,
            ),
            "Paced uploads: time after the last byte, s (client; server's own in the 6th column).",
            markdown_table(
                [
                    "upload",
                    "pace",
                    "after last byte service",
                    "baseline",
                    "service/baseline",
                    "server-side service / baseline",
                    "total service",
                    "total baseline",
                    "peak service MiB",
                    "peak baseline MiB",
                ],
                tail,
            ),
        ]
    )


def concurrency_table(rows: list[dict[str, Any]], size: int) -> str:
    body = [
        [
            str(row["level"]),
            _s(row["service"]["throughput"], 3),
            _s(row["baseline"]["throughput"], 3),
            _x(row["ratio_throughput"]),
            _s(row["raw_ffmpeg_throughput"], 3),
            _x(row["service"]["throughput"] / row["raw_ffmpeg_throughput"]),
            f"{_s(row['service']['p50_seconds'])} / {_s(row['service']['p95_seconds'])}",
            f"{_s(row['baseline']['p50_seconds'])} / {_s(row['baseline']['p95_seconds'])}",
            _mib(row["service"]["peak_above_idle"]),
            _mib(row["baseline"]["peak_above_idle"]),
            f"{_s(row['service']['cpu_seconds_per_request'])} / "
            f"{_s(row['baseline']['cpu_seconds_per_request'])} / "
            f"{_s(row['raw_ffmpeg_cpu_seconds_per_file'])}",
            f"{row['service']['ok']}/{row['service']['requests']}, "
            f"{row['baseline']['ok']}/{row['baseline']['requests']}",
        ]
        for row in rows
    ]
    return "\n\n".join(
        [
            f"Concurrency: unthrottled {size} MB uploads (LPCM CAF, AAC CAF, M4A in turn); "
            "throughput in requests/s; raw ffmpeg runs the same files, as many at once.",
            markdown_table(
                [
                    "concurrency",
                    "service req/s",
                    "baseline req/s",
                    "service/baseline",
                    "raw ffmpeg files/s",
                    "service/raw",
                    "service p50 / p95 s",
                    "baseline p50 / p95 s",
                    "peak service MiB",
                    "peak baseline MiB",
                    "CPU s/request service / baseline / raw",
                    "200s (service, baseline)",
                ],
                body,
            ),
        ]
    )


def e2e_table(summary: dict[str, Any], plan: Plan) -> str:
    fmt, size, repeats = plan.e2e
    rows = []
    for name in SERVERS:
        timings = summary[name]["server_timings_median"]
        share = summary[name]["share_of_total"]
        rows.append(
            [name]
            + [
                f"{_s(timings[stage])} ({share[stage]:.0%})"
                for stage in ("receive", "transcode", "transcribe", "afterLastByte")
            ]
            + [
                _s(timings["total"]),
                _s(summary[name]["client_after_last_byte_seconds"]),
                _s(summary[name]["cpu_seconds"]),
            ]
        )
    return "\n\n".join(
        [
            f"End to end: {fmt} {size} MB at 2 MB/s, local tiny.en model, JSON answer "
            f"(server timings, medians of {repeats}; share of the server's total). The service's "
            "stages overlap: transcode runs during receive.",
            markdown_table(
                [
                    "server",
                    "receive s",
                    "transcode s",
                    "transcribe s",
                    "after last byte s",
                    "total s",
                    "client after last byte s",
                    "server CPU s",
                ],
                rows,
            ),
        ]
    )


def admission_table(run: Run) -> str:
    count, size, pace = run.plan.admission
    rows = []
    for name in SERVERS:
        a = run.admission[name]
        rows.append(
            [
                name,
                ", ".join(f"{n} x {s}" for s, n in a["statuses"].items()),
                str(a["transport_errors"]),
                _mib(a["peak_rss"]),
                _mib(a["peak_pss"]),
                "yes" if a["peak_pss"] < BUDGET_BYTES else "**no**",
                f"{a['refused_with_retry_after']}/{a['statuses'].get('503', 0)}",
                _s(a["refused_latency_max_seconds"], 3),
                "-" if a["max_jobs"] is None else f"{a['max_jobs']} + {a['max_queue']}",
                "-"
                if a["jobs_running_max"] is None
                else f"{a['jobs_running_max']} / {a['jobs_waiting_max']}",
                "yes" if a["server_alive"] else "**no**",
            ]
        )
    return "\n\n".join(
        [
            f"Admission: {count} concurrent {size} MB LPCM uploads at {pace_label(pace)}, "
            "VRAI_MEMORY_LIMIT_BYTES=1073741824 (1 GiB), local transcriber loaded, "
            "Accept: audio/mpeg. Peak tree RSS counts ffmpeg's shared libraries once per process; "
            "PSS shares them out (closer to what a cgroup charges).",
            markdown_table(
                [
                    "server",
                    "answers",
                    "connection errors",
                    "peak RSS MiB",
                    "peak PSS MiB",
                    "PSS under 1 GiB",
                    "503 with Retry-After",
                    "slowest 503 s",
                    "jobs + queue",
                    "max running / waiting",
                    "alive after",
                ],
                rows,
            ),
        ]
    )


def verdict_lines(checks: dict[str, Any]) -> str:
    lines = []
    for name, check in checks.items():
        mark = "PASS" if check["met"] else "MISS"
        if name.startswith("flat_memory"):
            s, b = check["service"], check["baseline"]
            detail = (
                f"service {_mib(s['small'])} -> {_mib(s['large'])} MiB "
                f"({_pct(s['growth'])}), baseline {_mib(b['small'])} -> "
                f"{_mib(b['large'])} MiB ({_pct(b['growth'])})"
            )
        elif name.startswith("after_last_byte"):
            detail = (
                f"service {_s(check['service'], 3)} s vs baseline "
                f"{_s(check['baseline'], 3)} s = {_pct(check['ratio'])}"
            )
        elif name.startswith("single_vs_raw"):
            detail = (
                f"service {_s(check['service_seconds'])} s vs raw ffmpeg "
                f"{_s(check['raw_ffmpeg_seconds'])} s = {_x(check['ratio'])}x "
                f"(baseline {_x(check['baseline_vs_raw'])}x)"
            )
        elif name == "capacity_by_cpu":
            detail = (
                f"raw ffmpeg {check['raw_ffmpeg_cpu_per_file']:.3f} CPU s/file vs service "
                f"{check['service_cpu_per_request']:.3f} CPU s/request = {_pct(check['ratio'])} "
                f"(baseline {check['baseline_cpu_per_request']:.3f} = "
                f"{_pct(check['baseline_ratio'])})"
            )
        elif name == "throughput_at_saturation":
            detail = (
                f"service {check['service']:.3f} req/s, baseline {check['baseline']:.3f}, "
                f"raw ffmpeg {check['raw_ffmpeg']:.3f} files/s = {_pct(check['ratio'])} "
                f"(baseline {_pct(check['baseline_ratio'])})"
            )
        else:
            detail = (
                f"answers {check['statuses']}, peak PSS {_mib(check['peak_pss'])} MiB, "
                f"accepted {check['accepted']} of at most {check['accepted_bound']} "
                f"(jobs + queue; fewer means queue places went unused), "
                f"slowest 503 {_s(check['refused_latency_max_seconds'], 3)} s"
            )
        lines.append(f"- {mark} {name} (target {check['target']}): {detail}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return (
        "-"
        if value is None or math.isnan(value)
        else f"{value:+.1%}"
        if value < 0
        else f"{value:.1%}"
    )


# --- entry point ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, few requests (< 1 min)")
    mode.add_argument("--full", action="store_true", help="the whole plan (default)")
    parser.add_argument(
        "--corpus",
        type=Path,
        default=Path(tempfile.gettempdir()) / "vrai-bench-load-corpus",
        help="folder for the generated recordings, reused across runs",
    )
    parser.add_argument("--requests", type=int, help="requests per concurrency level and server")
    parser.add_argument("--duration", type=float, help="seconds per concurrency level (instead)")
    parser.add_argument("--levels", help="concurrency levels, comma-separated")
    parser.add_argument(
        "--skip", default="", help="scenarios to skip: sizes,concurrency,e2e,admission"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every server (e.g. an S3 bucket for debug copies)",
    )
    parser.add_argument(
        "--output",
        help="JSON file name in bench/results/ (default load.json, "
        "load-quick.json with --quick); plots and .md take the same stem",
    )
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = quick_plan() if args.quick else full_plan()
    if args.levels:
        plan.levels = [int(level) for level in args.levels.split(",")]
    if args.requests:
        count = args.requests
        plan.requests_per_level = lambda level: count
    plan.duration = args.duration
    return plan


def planned_requests(plan: Plan, skip: set[str]) -> int:
    total = 0
    if "sizes" not in skip:
        total += len(plan.sizes) * len(FORMATS) * plan.unthrottled_repeats * 2
        total += sum(len(FORMATS) if which == "*" else 1 for _, which, _ in plan.paced) * 2
    if "concurrency" not in skip:
        total += sum(plan.requests_per_level(level) for level in plan.levels) * 2
    if "e2e" not in skip:
        total += plan.e2e[2] * 2
    if "admission" not in skip:
        total += plan.admission[0] * 2
    return total


def all_sizes(plan: Plan) -> list[int]:
    sizes = {*plan.sizes, plan.level_size, plan.e2e[1], plan.admission[1]}
    sizes |= {size for _, _, size in plan.paced}
    return sorted(sizes)


def execute(run: Run, skip: set[str], extra_env: dict[str, str]) -> None:
    """Scenarios 1-3 on one pair of servers, admission on its own pair with a budget.

    Both pairs start at once (model loading overlaps); the budget pair stays idle, and
    unmeasured, until its turn.
    """
    main_env = base_env({"VRAI_MAX_JOBS": "16", "VRAI_MAX_QUEUE": "16", **extra_env})
    budget_env = base_env({"VRAI_MEMORY_LIMIT_BYTES": str(BUDGET_BYTES), **extra_env})
    run.env = main_env
    warm_path = run.corpus["lpcm-caf", min(run.plan.sizes)]
    main = [name for name in ("sizes", "concurrency", "e2e") if name not in skip]
    with contextlib.ExitStack() as stack:
        pairs = {}
        if main:
            pairs["main"] = stack.enter_context(server_pair(run.scratch, main_env, "main"))
        if "admission" not in skip:
            pairs["budget"] = stack.enter_context(server_pair(run.scratch, budget_env, "budget"))
        for pair, servers in pairs.items():
            run.idle[pair] = warm_up(servers, warm_path, run.cache)
        scenarios = {"sizes": scenario_sizes, "concurrency": scenario_concurrency}
        for name in main:
            {**scenarios, "e2e": scenario_e2e}[name](run, pairs["main"])
        if "budget" in pairs:
            scenario_admission(run, pairs["budget"])


def report(run: Run, info: dict[str, Any], skip: set[str]) -> tuple[str, dict[str, Any]]:
    sizes = summarize_sizes(run) if "sizes" not in skip else []
    levels = summarize_concurrency(run) if "concurrency" not in skip else []
    e2e = summarize_e2e(run) if "e2e" not in skip else {}
    checks = check_targets(sizes, levels, run) if sizes and levels else {}
    parts = [
        f"Machine: {describe_machine(info)}; load average at start "
        f"{info['load_average_1_5_15']}, at end {load_average()}; CPU pressure "
        f"(some, avg10/60/300 %) at start {info['cpu_pressure_some_avg10_60_300']}, "
        f"at end {cpu_pressure()}."
    ]
    if sizes:
        parts.append(sizes_tables(sizes))
    if levels:
        parts.append(concurrency_table(levels, run.plan.level_size))
    if e2e:
        parts.append(e2e_table(e2e, run.plan))
    if run.admission:
        parts.append(admission_table(run))
    if checks:
        parts.append("Targets (issue 7):\n\n" + verdict_lines(checks))
    data = {
        "sizes": sizes,
        "concurrency": levels,
        "e2e": e2e,
        "admission": run.admission,
        "targets": checks,
    }
    return "\n\n".join(parts), data


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    skip = {name for name in args.skip.split(",") if name}
    extra_env = dict(item.split("=", 1) for item in args.env)
    stem = Path(args.output or ("load-quick.json" if args.quick else "load.json")).stem
    info = machine()
    print(
        f"machine: {describe_machine(info)}; load average {info['load_average_1_5_15']}", flush=True
    )
    started = time.monotonic()
    print(f"corpus in {args.corpus} ...", flush=True)
    corpus = build_corpus(args.corpus, all_sizes(plan))
    with tempfile.TemporaryDirectory(prefix="vrai-bench-load-") as scratch:
        progress = Progress(planned_requests(plan, skip), "starting servers")
        run = Run(plan, corpus, {}, Path(scratch), progress)
        try:
            execute(run, skip, extra_env)
        finally:
            progress.close()
    text, summary = report(run, info, skip)
    print()
    print(text)
    results = {
        "machine": info,
        "mode": "quick" if args.quick else "full",
        "seconds": time.monotonic() - started,
        "load_average_at_end": load_average(),
        "cpu_pressure_at_end": cpu_pressure(),
        "parameters": {
            "window_seconds": list(WINDOW),
            "chunk_bytes": CHUNK_BYTES,
            "sizes_mb": plan.sizes,
            "paced": [[p, w, s] for p, w, s in plan.paced],
            "levels": plan.levels,
            "level_size_mb": plan.level_size,
            "requests_per_level": {lvl: plan.requests_per_level(lvl) for lvl in plan.levels},
            "duration_per_level": plan.duration,
            "e2e": list(plan.e2e),
            "admission": list(plan.admission),
            "servers_env": run.env,
            "servers_reused": "scenarios 1-3 share one pair; admission starts its own",
        },
        **summary,
        "batches": run.batches,
        "raw_ffmpeg_single": run.raw_single,
        "raw_ffmpeg_parallel": run.raw_parallel,
        "records": [asdict(record) for record in run.records],
        "report": text,
    }
    path = write_json(f"{stem}.json", results)
    path.with_suffix(".md").write_text(text + "\n")
    from .plots import plot_all

    images = plot_all(summary, stem) if summary["sizes"] or summary["concurrency"] else []
    print(
        f"\nwrote {path}, {path.with_suffix('.md').name}"
        + "".join(f", {image.name}" for image in images)
    )
    print(f"took {time.monotonic() - started:.0f} s")
    failed = [r for r in run.records if r.status not in (200, 503)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
