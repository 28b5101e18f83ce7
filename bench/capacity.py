"""How many phones one machine serves (issue 21, part 5).

N phones at once each upload a 5-minute note of real speech, paced at 64 KB/s as a phone on
a fair link sends it, chunked, to the OpenAI-compatible endpoint (`/v1/audio/transcriptions`,
multipart `file` and `model`, as the SDKs send it).  N rises step by step until the wait
after the last byte stops being what a lone phone gets, or memory leaves the plan, or the
service starts refusing.  That N, per core, is what sizing a fleet needs.

- **The notes.**  `../shared/speech/stitched.wav` (331 s of real speech) trimmed to 300 s,
  made at start in a temp folder: Ogg Opus 32 kb/s (Android) and M4A, AAC-LC 64 kb/s 48 kHz
  mono (iPhone), `moov` first (`+faststart`; `--moov last` sends the iPhone's own layout,
  which the service frames as it arrives).  Half the notes are each.  Every phone uploads
  `--notes` notes back to back, alternating formats; phones start spread over one Opus
  upload, so arrivals do not come in lockstep.
- **The upstream.**  `VRAI_TRANSCRIBER=openai` against a stand-in in its own process
  (`python -m bench.capacity --stand-in`): it answers `{"text": ...}` after 0.4 s + audio
  seconds / 20, like `bench/latency.py`'s stub.  It must cost next to no CPU, since it shares
  the cores with the service: it learns a segment's length from the WAV header the service
  sends (16 kHz mono s16, `speech/segmented.py`), or from the byte count at the MP3 bitrate
  for a whole-window MP3, never by decoding, and sleeps asynchronously.  Its CPU is measured
  and reported (an earlier stand-in that ran ffmpeg per segment stretched the p95 wait from
  1.8 s to 4.3 s at N=16).
- **The machine.**  The service runs with a 1 GB Fly machine's memory
  (`VRAI_MEMORY_LIMIT_BYTES=1073741824`; `memory_plan.py` plans for 75% of it, 768 MiB, and
  derives the jobs it runs and queues), no debug copies, MP3 at 48 kbps.  The plan it logs at
  start is in the report.
- **A step** (N phones): peak RSS and PSS of the server's process tree (server + ffmpeg
  children, sampled in a thread), the server tree's CPU (psutil: its own time and its reaped
  ffmpeg children's), the stand-in's and this process's CPU; per note the status and the
  wait after the last byte as the phone sees it (last chunk handed to the socket to the
  answer's end: it includes any time queued for a slot, which the server's own
  `afterLastByte` does not).
- **The ramp** (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96) stops after the first step that
  fails: p95 wait above twice the lone phone's (the N=1 step's median), peak tree PSS above
  the plan (768 MiB), any 503 (its rate is reported), or any other failure.  PSS, not RSS,
  is checked against the plan: summed RSS counts ffmpeg's ~40 MiB of shared libraries once
  per ffmpeg, which the kernel charges once; both are reported.  When the ramp stops above
  the plan's job limit because of admission (queued jobs waiting, 503s), a second ramp
  continues from that N with admission lifted (`VRAI_MAX_JOBS`, `VRAI_MAX_QUEUE`), to find
  what the CPU and memory allow: that is the phones-per-core figure.
- **Raw ffmpeg**: the service's own ffmpeg command (`vrai_stream.media.ffmpeg.build_command`:
  16 kHz mono MP3 at 48 kbps plus 16 kHz PCM for the segmenter) on the same files, outside
  the service, CPU from the resource usage of children: the floor the service is held to.
- **On paper**: machines and cost for 10,000 phones each uploading a 5-minute note in the
  same busy hour on Fly `shared-cpu-1x` 1 GB, printed ready for the README.

Run: .venv/bin/python -m bench.capacity            (alone on the machine; 15 to 20 minutes)
     .venv/bin/python -m bench.capacity --quick    (60 s notes, N = 1 and 4: under 2 minutes)
     .venv/bin/python -m bench.capacity --rescore bench/results/capacity.json
Output: bench/results/capacity.json (capacity-quick.json), capacity.md and capacity.png
(p95 wait and peak memory against N).  Needs Debian's ffmpeg (libopus) and ../shared/speech/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import h11
import httpx
import psutil

from .common import (
    REPO_DIR,
    RESULTS_DIR,
    MiB,
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
    running_helper,
    running_service,
    tool,
    write_json,
)
from .load import Reply, _read_reply, _send_body, percentile

SPEECH = REPO_DIR.parent / "shared" / "speech" / "stitched.wav"
NOTE_SECONDS = 300.0
QUICK_NOTE_SECONDS = 60.0
OPUS_KBPS = 32
AAC_KBPS = 64
MP3_KBPS = 48
"""The service's default bitrate, pinned so the raw ffmpeg runs encode alike."""
PACE = 64_000
"""Bytes a second each phone sends (64 KB/s), as `bench/latency.py` paces."""
CHUNK = 8 * 1024
"""Eight chunks a second: a steady trickle, not one burst a second."""
MEMORY_LIMIT_BYTES = 1024 * MiB
"""A 1 GB Fly machine (`[[vm]] memory = "1gb"` in fly.toml)."""
OPEN_ADMISSION = 256
"""`VRAI_MAX_JOBS` and `VRAI_MAX_QUEUE` of the second ramp: admission out of the way."""
STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96)
QUICK_STEPS = (1, 4)
WAIT_FACTOR = 2.0
"""A step fails when its p95 wait passes this many times the lone phone's median."""
LONE_NOTES = 4
"""Notes of the N=1 step, whatever `--notes` says: the reference deserves more than two."""
REQUEST_TIMEOUT = 600.0
SAMPLE_INTERVAL = 0.2
"""Memory is steady over a note (ffmpeg's holds for its whole run): 5 samples a second
are enough, and each sample walks /proc, which costs the cores the service runs on."""
STUB_BASE_SECONDS = 0.4
STUB_SECONDS_PER_AUDIO_SECOND = 1 / 20
RETRY_AFTER_CAP = 5.0
"""A phone refused with 503 waits its Retry-After (at most this) before its next note."""

# The sizing on paper (README, "Capacity").
FLEET_PHONES = 10_000
BUSY_HOUR_SECONDS = 3600.0
FLY_PRICE_PER_MONTH = 5.70
"""shared-cpu-1x with 1 GB: $0.0000022/s, $5.70 a month (Fly's price list in
https://fly.io/blog/new-vms-more-ram-extra-cpu-and-a-dollar-menu/ ; the current, per-region
figures are on https://fly.io/docs/about/pricing/).  `--price` replaces it."""
FLY_HOURS_PER_MONTH = 730.0
FLY_SHARED_QUOTA = 1 / 16
"""A shared vCPU may run 5 ms of every 80 ms (1/16 of a core) at its baseline
(https://fly.io/docs/machines/cpu-performance)."""
FLY_BURST_BALANCE_SECONDS = 500.0
"""...and may bank unused time up to 500 s, spent in bursts at up to a whole core."""
FLY_SOFT_LIMIT = 7
"""fly.toml's `soft_limit`: above it Fly's proxy prefers another machine."""


# --- the notes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    """One recording a phone uploads, and what it is as a multipart body."""

    fmt: str
    path: Path
    seconds: float
    content_type: str
    filename: str
    size: int


def make_opus(source: Path, out: Path, seconds: float) -> None:
    """An Android note: Ogg Opus, mono, 32 kb/s."""
    run_ffmpeg(
        "-i", str(source), "-t", f"{seconds:g}", "-ac", "1",
        "-c:a", "libopus", "-b:a", f"{OPUS_KBPS}k", str(out),
    )  # fmt: skip


def make_m4a(source: Path, out: Path, seconds: float, moov: str) -> None:
    """An iPhone note: AAC-LC 64 kb/s 48 kHz mono in M4A, `moov` first or (as phones write
    it) last."""
    faststart = ["-movflags", "+faststart"] if moov == "first" else []
    run_ffmpeg(
        "-i", str(source), "-t", f"{seconds:g}", "-ac", "1", "-ar", "48000",
        "-c:a", "aac", "-b:a", f"{AAC_KBPS}k", *faststart, "-f", "mp4", str(out),
    )  # fmt: skip


def probe_seconds(path: Path) -> float:
    command = [tool("ffprobe"), "-v", "error", "-show_entries", "format=duration", "-of"]
    done = subprocess.run(
        [*command, "csv=p=0", str(path)], capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip())


def build_notes(folder: Path, seconds: float, moov: str) -> list[Note]:
    """The two notes every phone alternates between, made from real speech at start."""
    if not SPEECH.exists():
        sys.exit(f"{SPEECH} is missing: this benchmark needs ../shared/speech/")
    opus, m4a = folder / "note.ogg", folder / "note.m4a"
    make_opus(SPEECH, opus, seconds)
    make_m4a(SPEECH, m4a, seconds, moov)
    return [
        Note("ogg-opus", opus, probe_seconds(opus), "audio/ogg", "note.ogg", opus.stat().st_size),
        Note(
            f"m4a-moov-{moov}", m4a, probe_seconds(m4a), "audio/mp4", "note.m4a", m4a.stat().st_size
        ),
    ]


def multipart(note: Note, data: bytes, boundary: str) -> bytes:
    """The body an OpenAI SDK sends: `model`, `response_format`, then the file."""
    fields = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (("model", "whisper-1"), ("response_format", "json"))
    )
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{note.filename}"\r\nContent-Type: {note.content_type}\r\n\r\n'
    ).encode()
    return fields + head + data + f"\r\n--{boundary}--\r\n".encode()


# --- the upstream stand-in ------------------------------------------------------------------


def wav_seconds(head: bytes) -> float | None:
    """A WAV's length from its header alone (`fmt ` and the `data` chunk's size), found
    anywhere in `head` (a multipart body's first bytes); None when there is no WAV header."""
    start = head.find(b"RIFF")
    if start < 0 or head[start + 8 : start + 12] != b"WAVE":
        return None
    offset, bytes_per_second = start + 12, 0
    while offset + 8 <= len(head):
        chunk, size = (
            head[offset : offset + 4],
            int.from_bytes(head[offset + 4 : offset + 8], "little"),
        )
        if chunk == b"fmt " and offset + 24 <= len(head):
            bytes_per_second = int.from_bytes(head[offset + 16 : offset + 20], "little")
        elif chunk == b"data":
            return size / bytes_per_second if bytes_per_second else None
        offset += 8 + size + (size & 1)
    return None


class StandIn:
    """An OpenAI transcription endpoint that does nothing but wait: a raw ASGI app (no
    framework, no form parsing) so that what it costs is uvicorn's parsing of the bytes."""

    def __init__(self, mp3_kbps: int) -> None:
        self._mp3_bytes_per_second = mp3_kbps * 1000 / 8
        self.stats: dict[str, float] = {
            "calls": 0, "audio_seconds": 0.0, "body_bytes": 0, "in_flight": 0,
            "max_in_flight": 0, "wav": 0, "by_size": 0,
        }  # fmt: skip

    async def __call__(
        self,
        scope: Mapping[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"].endswith("/stats"):
            await _answer(send, 200, json.dumps(self.stats).encode())
            if scope.get("query_string") == b"reset":  # a new step: its own peak
                self.stats["max_in_flight"] = self.stats["in_flight"]
            return
        if scope["method"] != "POST" or not scope["path"].endswith("/audio/transcriptions"):
            await _answer(send, 404, b'{"error": {"message": "not found"}}')
            return
        seconds = await self._seconds(receive)
        self.stats["in_flight"] += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.stats["in_flight"])
        try:
            await asyncio.sleep(STUB_BASE_SECONDS + seconds * STUB_SECONDS_PER_AUDIO_SECOND)
        finally:
            self.stats["in_flight"] -= 1
        self.stats["calls"] += 1
        self.stats["audio_seconds"] += seconds
        await _answer(send, 200, json.dumps({"text": f"[{seconds:.1f} s of speech]"}).encode())

    async def _seconds(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> float:
        """Read the body to its end, keeping only its first 4 KiB: the WAV header is there."""
        head, total, more = b"", 0, True
        while more:
            message = await receive()
            body = message.get("body", b"")
            if len(head) < 4096:
                head += body[: 4096 - len(head)]
            total += len(body)
            more = message.get("more_body", False)
        self.stats["body_bytes"] += total
        seconds = wav_seconds(head)
        if seconds is not None:
            self.stats["wav"] += 1
            return seconds
        self.stats["by_size"] += 1
        return total / self._mp3_bytes_per_second


async def _answer(
    send: Callable[[dict[str, Any]], Awaitable[None]], status: int, body: bytes
) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve_stand_in(port: int, mp3_kbps: int) -> None:
    """The stand-in's process: uvicorn (httptools, uvloop where installed) on loopback."""
    import uvicorn

    uvicorn.run(
        StandIn(mp3_kbps), host="127.0.0.1", port=port, log_level="warning",
        access_log=False, lifespan="off",
    )  # fmt: skip


@dataclass
class StandInProcess:
    url: str
    process: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stats(self, *, reset: bool = False) -> dict[str, float]:
        """Calls, audio seconds and bytes so far; the most in flight at once since the last
        reset."""
        query = "?reset" if reset else ""
        answer: dict[str, float] = httpx.get(f"{self.url}/stats{query}", timeout=5).json()
        return answer


@contextlib.contextmanager
def running_stand_in(folder: Path) -> Iterator[StandInProcess]:
    """The stand-in as a process of its own, so its CPU is its own to measure."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    args = ["-m", "bench.capacity", "--stand-in", "--port", str(port)]

    def ready() -> None:
        httpx.get(f"{url}/stats", timeout=5)

    with running_helper(args, folder / "stand-in.log", ready, timeout=30) as process:
        yield StandInProcess(url, process)


# --- one phone ------------------------------------------------------------------------------


async def paced(body: bytes, rate: float, started: float) -> AsyncIterator[bytes]:
    """`body` in 8 KiB chunks, each sent when `rate` bytes/s since `started` allow it."""
    view = memoryview(body)
    for offset in range(0, len(body), CHUNK):
        delay = started + offset / rate - time.perf_counter()
        if delay > 0:
            await anyio.sleep(delay)
        yield bytes(view[offset : offset + CHUNK])


async def post_note(host: str, port: int, body: bytes, boundary: str, rate: float) -> Reply:
    """POST one note chunked, reading the answer while sending (an early 503 arrives before
    the body ends, as a phone's stack would see it); `bench/load.py`'s client, 8 KiB chunks."""
    reply = Reply(started=time.perf_counter())
    conn = h11.Connection(h11.CLIENT)
    head = {
        "Host": f"{host}:{port}",
        "Transfer-Encoding": "chunked",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }
    request = h11.Request(
        method="POST", target="/v1/audio/transcriptions", headers=list(head.items())
    )
    try:
        with anyio.fail_after(REQUEST_TIMEOUT):
            async with await anyio.connect_tcp(host, port) as stream:
                answered = anyio.Event()
                await stream.send(conn.send(request))
                async with anyio.create_task_group() as group:

                    async def read() -> None:
                        try:
                            await _read_reply(stream, conn, reply)
                        except h11.RemoteProtocolError as exc:
                            reply.error = f"RemoteProtocolError: {exc}"[:200]
                        answered.set()
                        group.cancel_scope.cancel()

                    group.start_soon(read)
                    chunks = paced(body, rate, reply.started)
                    await _send_body(stream, conn, chunks, reply, answered)
                    await anyio.sleep_forever()
    except (OSError, TimeoutError, anyio.BrokenResourceError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"[:200]
    if reply.status == 0 and reply.error is None:
        reply.error = "connection closed without an answer"
    reply.finished = time.perf_counter()
    return reply


def note_record(phone: int, note: Note, reply: Reply, t0: float) -> dict[str, Any]:
    """One note's outcome, times from the step's start."""
    last = reply.last_byte_sent
    return {
        "phone": phone,
        "fmt": note.fmt,
        "audio_seconds": note.seconds,
        "status": reply.status,
        "error": reply.error,
        "request_id": reply.headers.get("x-request-id"),
        "started": round(reply.started - t0, 3),
        "last_byte": round(last - t0, 3) if last is not None else None,
        "finished": round(reply.finished - t0, 3),
        "upload_seconds": round(last - reply.started, 3) if last is not None else None,
        "wait": round(reply.finished - last, 3) if last is not None else None,
        "retry_after": reply.headers.get("retry-after"),
    }


@dataclass
class Phones:
    """One step's phones: how many, what each uploads, where, and where results go."""

    count: int
    per_phone: int
    notes: Sequence[Note]
    bodies: Sequence[bytes]
    """The notes as multipart bodies, in the same order."""
    boundary: str
    url: httpx.URL
    stagger: float
    t0: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)


async def phone(index: int, phones: Phones) -> None:
    """One phone: starts at its place in the stagger, then uploads its notes back to back,
    alternating formats (the next phone starts with the other one)."""
    await anyio.sleep(index * phones.stagger / phones.count)
    host, port = phones.url.host, phones.url.port or 80
    for number in range(phones.per_phone):
        which = (index + number) % len(phones.notes)
        reply = await post_note(host, port, phones.bodies[which], phones.boundary, PACE)
        phones.records.append(note_record(index, phones.notes[which], reply, phones.t0))
        if reply.status == 503:
            wait = float(reply.headers.get("retry-after") or 1)
            await anyio.sleep(min(wait, RETRY_AFTER_CAP))


async def all_phones(phones: Phones) -> None:
    phones.t0 = time.perf_counter()
    async with anyio.create_task_group() as group:
        for index in range(phones.count):
            group.start_soon(phone, index, phones)


# --- one step -------------------------------------------------------------------------------


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the server (its own) and of its children (ffmpeg: reaped ones, which
    the kernel adds to the parent's children times, plus any still running)."""
    server = psutil.Process(pid)
    times = server.cpu_times()
    live = 0.0
    for child in server.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child_times = child.cpu_times()
            live += child_times.user + child_times.system
    children = times.children_user + times.children_system + live
    return {"server": times.user + times.system, "children": children}


def self_cpu() -> float:
    """This process's CPU: the phones' client and the memory sampler share the cores too."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Bench:
    """What every step uses: the server under test, the stand-in, the notes."""

    server: ServerProcess
    stand_in: StandInProcess
    notes: list[Note]
    data: list[bytes]
    notes_per_phone: int
    stagger: float


def run_step(bench: Bench, count: int) -> dict[str, Any]:
    """N phones, each uploading its notes; everything measured between idle and idle."""
    bench.server.wait_idle(120)
    boundary = f"vrai-capacity-{secrets.token_hex(8)}"
    phones = Phones(
        count=count,
        per_phone=LONE_NOTES if count == 1 else bench.notes_per_phone,
        notes=bench.notes,
        bodies=[multipart(n, d, boundary) for n, d in zip(bench.notes, bench.data, strict=True)],
        boundary=boundary,
        url=httpx.URL(bench.server.url),
        stagger=bench.stagger,
    )
    cpu_before = tree_cpu(bench.server.pid)
    stand_before = bench.stand_in.cpu_seconds()
    self_before = self_cpu()
    calls_before = bench.stand_in.stats(reset=True)
    load_before = load_average()
    started = time.perf_counter()
    with TreePeakSampler([bench.server.pid], SAMPLE_INTERVAL, pss=True) as sampler:
        anyio.run(all_phones, phones)
    wall = time.perf_counter() - started
    bench.server.wait_idle(120)
    cpu_after = tree_cpu(bench.server.pid)
    calls_after = bench.stand_in.stats()
    records = phones.records
    attach_server_log(bench.server, records)
    return {
        "phones": count,
        "notes_per_phone": phones.per_phone,
        "wall_seconds": round(wall, 2),
        "notes": sorted(records, key=lambda record: (record["started"], record["phone"])),
        "peak_tree_rss": sampler.peaks[bench.server.pid],
        "peak_tree_pss": sampler.pss_peaks[bench.server.pid],
        "cpu": {
            "server_own": cpu_after["server"] - cpu_before["server"],
            "ffmpeg_children": cpu_after["children"] - cpu_before["children"],
            "stand_in": bench.stand_in.cpu_seconds() - stand_before,
            "bench_client": self_cpu() - self_before,
        },
        "upstream_calls": calls_after["calls"] - calls_before["calls"],
        "upstream_audio_seconds": calls_after["audio_seconds"] - calls_before["audio_seconds"],
        "upstream_max_in_flight": calls_after["max_in_flight"],
        "upstream_by_size": calls_after["by_size"] - calls_before["by_size"],
        "load_average_before": load_before,
        "cpu_pressure_after": cpu_pressure(),
    }


def attach_server_log(server: ServerProcess, records: list[dict[str, Any]]) -> None:
    """The server's own view of each note (its log line): mode, code, its afterLastByte."""
    logs = server.request_logs()
    for record in records:
        entry = logs.get(str(record["request_id"]), {})
        timings = entry.get("timings") or {}
        wait = timings.get("afterLastByte")
        if wait is None and "total" in timings and "receive" in timings:
            wait = timings["total"] - timings["receive"]
        record["server_after_last_byte"] = round(wait, 3) if wait is not None else None
        record["mode"] = entry.get("mode")
        record["code"] = entry.get("code") or entry.get("error")


# --- the verdict on a step ------------------------------------------------------------------


def summarise(step: dict[str, Any], lone_wait: float | None, plan_bytes: int) -> dict[str, Any]:
    """The step's figures and whether it passed, and why not."""
    notes = step["notes"]
    done = [note for note in notes if note["status"] == 200 and note["wait"] is not None]
    refused = [note for note in notes if note["status"] == 503]
    failed = [note for note in notes if note["status"] not in (200, 503)]
    waits = [note["wait"] for note in done]
    audio = sum(note["audio_seconds"] for note in done)
    cpu = step["cpu"]
    tree = cpu["server_own"] + cpu["ffmpeg_children"]
    busy = sum(note["finished"] - note["started"] for note in notes)
    span = max((note["finished"] for note in notes), default=0) - min(
        (note["started"] for note in notes), default=0
    )
    figures = {
        "phones": step["phones"],
        "notes": len(notes),
        "ok": len(done),
        "refused_503": len(refused),
        "rate_503": len(refused) / len(notes) if notes else 0.0,
        "failed": len(failed),
        "p50_wait": percentile(waits, 0.50),
        "p95_wait": percentile(waits, 0.95),
        "max_wait": max(waits, default=math.nan),
        "server_p95_wait": percentile(
            [
                n["server_after_last_byte"]
                for n in done
                if n.get("server_after_last_byte") is not None
            ],
            0.95,
        ),
        "upload_seconds": statistics.fmean([n["upload_seconds"] for n in done]) if done else 0.0,
        "mean_concurrency": busy / span if span else 0.0,
        "in_flight_at_last_byte": median([in_flight(notes, n["last_byte"]) for n in done]),
        "peak_tree_rss": step["peak_tree_rss"],
        "peak_tree_pss": step["peak_tree_pss"],
        "audio_hours": audio / 3600,
        "server_cpu_seconds": tree,
        "cpu_per_audio_hour": tree / (audio / 3600) if audio else math.nan,
        "ffmpeg_cpu_per_audio_hour": cpu["ffmpeg_children"] / (audio / 3600) if audio else math.nan,
        "server_cores": tree / step["wall_seconds"],
        "stand_in_cpu_seconds": cpu["stand_in"],
        "bench_client_cpu_seconds": cpu["bench_client"],
        "upstream_calls": step["upstream_calls"],
        "upstream_max_in_flight": step["upstream_max_in_flight"],
        "modes": sorted({str(note.get("mode")) for note in done}),
    }
    figures["reasons"] = reasons(figures, lone_wait, plan_bytes)
    figures["passed"] = not figures["reasons"]
    return figures


def in_flight(notes: Sequence[dict[str, Any]], moment: float) -> int:
    """How many notes were between their start and their answer at `moment`."""
    return sum(note["started"] <= moment < note["finished"] for note in notes)


def reasons(figures: Mapping[str, Any], lone_wait: float | None, plan_bytes: int) -> list[str]:
    """Why a step fails; empty when it passes."""
    found = []
    if figures["failed"]:
        found.append(f"{figures['failed']} failed")
    if figures["refused_503"]:
        found.append(f"503 rate {figures['rate_503']:.0%}")
    if lone_wait is not None and figures["p95_wait"] > WAIT_FACTOR * lone_wait:
        found.append(f"p95 wait {figures['p95_wait']:.2f} s > {WAIT_FACTOR:g} x {lone_wait:.2f} s")
    if figures["peak_tree_pss"] > plan_bytes:
        found.append(
            f"PSS {figures['peak_tree_pss'] / MiB:.0f} MiB > plan {plan_bytes / MiB:.0f} MiB"
        )
    return found


# --- the ramps ------------------------------------------------------------------------------


def memory_plan(server: ServerProcess) -> dict[str, Any]:
    """The plan the service logged at start, and the memory it plans for (limit x 0.75)."""
    from vrai_stream.memory_plan import HEADROOM

    for entry in server.log_entries():
        plan = entry.get("plan")
        if isinstance(plan, dict) and "maxJobs" in plan:
            return {**plan, "plannedBytes": int(plan["limitBytes"] * HEADROOM)}
    raise RuntimeError(f"{server.name} logged no memory plan")


def service_env(stand_in: StandInProcess, extra: Mapping[str, str]) -> dict[str, str]:
    """A 1 GB Fly machine's service on the OpenAI path, against the stand-in."""
    return {
        "HF_HUB_OFFLINE": "1",
        "VRAI_TRANSCRIBER": "openai",
        "OPENAI_API_KEY": "sk-bench-stand-in",
        "OPENAI_BASE_URL": stand_in.url,
        "VRAI_DEBUG_STORE": "off",
        "VRAI_MEMORY_LIMIT_BYTES": str(MEMORY_LIMIT_BYTES),
        "VRAI_MP3_BITRATE_KBPS": str(MP3_KBPS),
        **extra,
    }


def warm_up(server: ServerProcess, notes: Sequence[Note], folder: Path) -> None:
    """One short note first: lazy imports and the SDK's first connection belong to idle."""
    short = folder / "warm.ogg"
    if not short.exists():
        make_opus(notes[0].path, short, 5)
    note = Note("warm-up", short, 5.0, "audio/ogg", "warm.ogg", short.stat().st_size)
    boundary = "vrai-capacity-warm-up"
    url = httpx.URL(server.url)
    body = multipart(note, short.read_bytes(), boundary)
    reply = anyio.run(post_note, url.host, url.port or 80, body, boundary, 10 * PACE)
    if reply.status != 200:
        raise RuntimeError(f"warm-up answered {reply.status} {reply.error}: {reply.body[:300]!r}")
    server.wait_idle(60)


def ramp(
    name: str, bench: Bench, steps: Sequence[int], lone_wait: float | None, plan: dict[str, Any]
) -> tuple[list[dict[str, Any]], float | None]:
    """Steps in order until one fails; returns every step (the failing one last) and the
    lone phone's wait (measured here when the ramp starts at N=1)."""
    done = []
    for count in steps:
        print(f"[{name}] N={count} ...", flush=True)
        step = run_step(bench, count)
        if count == 1 and lone_wait is None:
            lone_wait = median(
                [n["wait"] for n in step["notes"] if n["status"] == 200 and n["wait"] is not None]
            )
        step["summary"] = summarise(step, lone_wait, plan["plannedBytes"])
        step["ramp"] = name
        done.append(step)
        print("  " + describe(step["summary"]), flush=True)
        if not step["summary"]["passed"]:
            break
    return done, lone_wait


def describe(summary: Mapping[str, Any]) -> str:
    verdict = "pass" if summary["passed"] else "FAIL: " + "; ".join(summary["reasons"])
    return (
        f"N={summary['phones']}: {summary['ok']}/{summary['notes']} ok, "
        f"503 {summary['rate_503']:.0%}, wait p50 {summary['p50_wait']:.2f} s "
        f"p95 {summary['p95_wait']:.2f} s, PSS {summary['peak_tree_pss'] / MiB:.0f} MiB "
        f"(RSS {summary['peak_tree_rss'] / MiB:.0f}), "
        f"{summary['cpu_per_audio_hour']:.1f} CPU-s/audio h, "
        f"server {summary['server_cores']:.2f} cores, "
        f"stand-in {summary['stand_in_cpu_seconds']:.2f} CPU-s -> {verdict}"
    )


def admission_bound(step: Mapping[str, Any], plan: Mapping[str, Any]) -> bool:
    """Did a step fail only because the plan's job limit queued or refused phones?"""
    summary = step["summary"]
    if summary["passed"]:
        return False
    capped = summary["phones"] > int(plan["maxJobs"])
    return (
        capped
        and not summary["failed"]
        and not any("PSS" in reason for reason in summary["reasons"])
    )


@dataclass
class Config:
    quick: bool
    steps: list[int]
    note_seconds: float
    notes_per_phone: int
    moov: str
    raw_repeats: int
    extra_env: dict[str, str] = field(default_factory=dict)
    price_per_month: float = FLY_PRICE_PER_MONTH
    argv: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return "capacity-quick" if self.quick else "capacity"


def measure(config: Config) -> dict[str, Any]:
    """The notes, the raw ffmpeg runs and the ramps; every figure as JSON-ready data."""
    info = machine()
    print(describe_machine(info), flush=True)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="vrai-bench-capacity-") as tmp,
        running_stand_in(Path(tmp)) as stand_in,
    ):
        folder = Path(tmp)
        notes = build_notes(folder, config.note_seconds, config.moov)
        sizes = [f"{n.fmt} {n.seconds:.0f} s {n.size / 1e6:.2f} MB" for n in notes]
        print("notes: " + ", ".join(sizes), flush=True)
        raw = raw_ffmpeg(notes, config.raw_repeats)
        # Phones start spread over one (the shorter) upload, so arrivals are not in lockstep.
        stagger = min(note.size for note in notes) / PACE
        steps, plans, lone = run_ramps(config, folder, stand_in, notes, stagger)
        params = parameters(config, notes, stagger)
        info["stand_in_cpu_total"] = stand_in.cpu_seconds()
        info["stand_in_stats"] = stand_in.stats()
    info["load_average_after"] = load_average()
    info["cpu_pressure_after"] = cpu_pressure()
    info["elapsed_minutes"] = round((time.monotonic() - started) / 60, 1)
    return {
        "machine": info,
        "parameters": params,
        "plans": plans,
        "lone_wait": lone,
        "raw_ffmpeg": raw,
        "steps": steps,
    }


def run_ramps(
    config: Config, folder: Path, stand_in: StandInProcess, notes: list[Note], stagger: float
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], float | None]:
    """The ramp as deployed; then, if the plan's admission stopped it, the same ramp on from
    that N with admission lifted.  Each on a fresh server."""
    data = [note.path.read_bytes() for note in notes]
    steps: list[dict[str, Any]] = []
    plans: dict[str, dict[str, Any]] = {}
    lone: float | None = None
    ramps = [("fly", config.extra_env, config.steps)]
    while ramps:
        name, extra, todo = ramps.pop(0)
        env = service_env(stand_in, extra)
        with running_service(f"capacity-{name}", folder, wait=True, **env) as server:
            plans[name] = memory_plan(server)
            print(f"[{name}] memory plan: {plans[name]}", flush=True)
            warm_up(server, notes, folder)
            bench = Bench(server, stand_in, notes, data, config.notes_per_phone, stagger)
            done, lone = ramp(name, bench, todo, lone, plans[name])
        steps += done
        if name == "fly" and admission_bound(done[-1], plans[name]):
            lifted = {"VRAI_MAX_JOBS": str(OPEN_ADMISSION), "VRAI_MAX_QUEUE": str(OPEN_ADMISSION)}
            rest = [n for n in config.steps if n >= done[-1]["phones"]]
            ramps.append(("open", {**config.extra_env, **lifted}, rest))
    return steps, plans, lone


def parameters(config: Config, notes: Sequence[Note], stagger: float) -> dict[str, Any]:
    return {
        "argv": config.argv,
        "quick": config.quick,
        "steps": config.steps,
        "notes_per_phone": config.notes_per_phone,
        "lone_notes": LONE_NOTES,
        "pace_bytes_per_second": PACE,
        "chunk_bytes": CHUNK,
        "stagger_seconds": round(stagger, 2),
        "mp3_kbps": MP3_KBPS,
        "memory_limit_bytes": MEMORY_LIMIT_BYTES,
        "wait_factor": WAIT_FACTOR,
        "stand_in_latency": (
            f"{STUB_BASE_SECONDS} s + audio seconds / {1 / STUB_SECONDS_PER_AUDIO_SECOND:g}"
        ),
        "extra_env": config.extra_env,
        "price_per_month": config.price_per_month,
        "notes": [
            {"fmt": n.fmt, "seconds": n.seconds, "bytes": n.size, "content_type": n.content_type}
            for n in notes
        ],
    }


# --- raw ffmpeg -----------------------------------------------------------------------------


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def raw_command(pcm_fd: int) -> list[str]:
    """The service's own ffmpeg command for a streamed upload: stdin in, MP3 on stdout, PCM
    on `pcm_fd` (its default window, 0 to `VRAI_MAX_WINDOW_SECONDS`)."""
    from vrai_stream.media.ffmpeg import build_command
    from vrai_stream.media.window import Window

    return build_command(tool("ffmpeg"), Window(0.0, 10800.0), MP3_KBPS, pcm_fd=pcm_fd)


def raw_ffmpeg(notes: Sequence[Note], repeats: int) -> dict[str, Any]:
    """CPU seconds per audio hour of the service's decode with no service around it."""
    null = os.open(os.devnull, os.O_WRONLY)  # both outputs go nowhere: the decode is the cost
    command = raw_command(null)
    runs: dict[str, list[float]] = {note.fmt: [] for note in notes}
    try:
        for _ in range(repeats):
            for note in notes:
                before = children_cpu()
                with note.path.open("rb") as source:
                    subprocess.run(
                        command,
                        stdin=source,
                        stdout=subprocess.DEVNULL,
                        pass_fds=(null,),
                        check=True,
                    )
                runs[note.fmt].append(children_cpu() - before)
    finally:
        os.close(null)
    seconds = {note.fmt: note.seconds for note in notes}
    per_hour = {fmt: median(cpu) / (seconds[fmt] / 3600) for fmt, cpu in runs.items()}
    return {
        "command": " ".join(command),
        "cpu_seconds": runs,
        "cpu_per_audio_hour": per_hour,
        "cpu_per_audio_hour_mixed": sum(per_hour.values()) / len(per_hour),
    }


# --- the report -----------------------------------------------------------------------------


def best(steps: Sequence[dict[str, Any]], name: str | None = None) -> dict[str, Any] | None:
    """The passing step with the most phones (of one ramp, or of all)."""
    passed = [
        s["summary"]
        for s in steps
        if s["summary"]["passed"] and (name is None or s["ramp"] == name)
    ]
    return max(passed, key=lambda summary: summary["phones"], default=None)


def headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """Phones per machine and per core, notes per hour per core, CPU per audio hour."""
    cores = int(result["machine"]["cpus_usable"])
    steps = result["steps"]
    deployed, top = best(steps, "fly"), best(steps)
    passed = [s["summary"] for s in steps if s["summary"]["passed"] and s["phones"] > 1]
    cpu_hours = [s["cpu_per_audio_hour"] for s in passed] or [
        s["summary"]["cpu_per_audio_hour"] for s in steps
    ]
    figures: dict[str, Any] = {
        "cores": cores,
        "phones_as_deployed": deployed["phones"] if deployed else 0,
        "phones_cpu_bound": top["phones"] if top else 0,
        # Without a failing last step the ramp ran out of steps: a floor, not a limit.
        "limit_found": bool(steps) and not steps[-1]["summary"]["passed"],
        "cpu_per_audio_hour": median(cpu_hours),
        "raw_ffmpeg_cpu_per_audio_hour": result["raw_ffmpeg"]["cpu_per_audio_hour_mixed"],
        "stand_in_cpu_seconds": sum(s["summary"]["stand_in_cpu_seconds"] for s in steps),
        "server_cpu_seconds": sum(s["summary"]["server_cpu_seconds"] for s in steps),
        "upload_seconds": top["upload_seconds"] if top else math.nan,
    }
    figures["phones_per_core"] = figures["phones_cpu_bound"] / cores
    figures["notes_per_hour_per_core"] = (
        figures["phones_per_core"] * 3600 / figures["upload_seconds"]
    )
    figures["service_vs_raw"] = (
        figures["cpu_per_audio_hour"] / figures["raw_ffmpeg_cpu_per_audio_hour"]
    )
    return figures


def fleet(result: Mapping[str, Any], figures: Mapping[str, Any], price: float) -> dict[str, Any]:
    """10,000 phones, one 5-minute note each, in one busy hour, on shared-cpu-1x 1 GB.

    Three bounds, the largest wins: CPU (the hour's CPU-seconds against what a 1/16-core
    baseline gives in an hour), the measured phones per core scaled to 1/16 of a core (it
    carries the wait target, which CPU-seconds alone do not), and admission (uploads at once,
    by Little's law, against the jobs a machine takes before Fly's proxy looks elsewhere).
    """
    audio_hours = FLEET_PHONES * NOTE_SECONDS / 3600
    cpu_needed = audio_hours * figures["cpu_per_audio_hour"]
    baseline = BUSY_HOUR_SECONDS * FLY_SHARED_QUOTA
    # A note holds a phone for its paced upload, which grows with its length.
    hold = figures["upload_seconds"] * NOTE_SECONDS / result["parameters"]["notes"][0]["seconds"]
    concurrent = FLEET_PHONES * hold / BUSY_HOUR_SECONDS
    per_machine = figures["phones_per_core"] * FLY_SHARED_QUOTA
    jobs = min(int(result["plans"]["fly"]["maxJobs"]), FLY_SOFT_LIMIT)
    by_phones = math.ceil(concurrent / per_machine) if figures["limit_found"] else None
    machines = {
        "cpu_at_baseline": math.ceil(cpu_needed / baseline),
        "cpu_with_full_burst_balance": math.ceil(
            cpu_needed / (baseline + FLY_BURST_BALANCE_SECONDS)
        ),
        "phones_per_core_at_baseline": by_phones,
        "admission": math.ceil(concurrent / jobs),
    }
    needed = max(value for key, value in machines.items() if value and "burst" not in key)
    hourly = price / FLY_HOURS_PER_MONTH
    return {
        "phones": FLEET_PHONES,
        "audio_hours": audio_hours,
        "cpu_seconds_needed": cpu_needed,
        "cpu_seconds_per_machine_hour_at_baseline": baseline,
        "note_hold_seconds": hold,
        "mean_concurrent_uploads": concurrent,
        "phones_per_machine_at_baseline": per_machine,
        "machines": machines,
        "machines_needed": needed,
        "price_per_month": price,
        "price_per_hour": hourly,
        "cost_busy_hour": needed * hourly,
        "cost_month_one_busy_hour_a_day": needed * hourly * 30,
        "cost_month_always_on": needed * price,
    }


def steps_table(steps: Sequence[dict[str, Any]]) -> str:
    rows = []
    for step in steps:
        s = step["summary"]
        rows.append([
            f"{step['ramp']} N={s['phones']}", f"{s['ok']}/{s['notes']}", f"{s['rate_503']:.0%}",
            f"{s['p50_wait']:.2f} s", f"{s['p95_wait']:.2f} s", f"{s['server_p95_wait']:.2f} s",
            f"{s['mean_concurrency']:.1f}", f"{s['peak_tree_rss'] / MiB:.0f} MiB",
            f"{s['peak_tree_pss'] / MiB:.0f} MiB",
            f"{s['cpu_per_audio_hour']:.1f} ({s['ffmpeg_cpu_per_audio_hour']:.1f})",
            f"{s['server_cores']:.2f}", f"{s['upstream_max_in_flight']:.0f}",
            f"{s['stand_in_cpu_seconds']:.2f} s", f"{s['bench_client_cpu_seconds']:.1f} s",
            "pass" if s["passed"] else "FAIL: " + "; ".join(s["reasons"]),
        ])  # fmt: skip
    headers = [
        "ramp, phones", "answered", "503", "wait p50", "wait p95", "server's p95",
        "mean in flight", "peak tree RSS", "peak tree PSS",
        "server tree CPU-s / audio h (ffmpeg's)", "server cores", "upstream calls at once",
        "stand-in CPU", "bench client CPU", "verdict",
    ]  # fmt: skip
    return markdown_table(headers, rows)


def render(result: Mapping[str, Any], figures: Mapping[str, Any], sizing: Mapping[str, Any]) -> str:
    params, plans, raw = result["parameters"], result["plans"], result["raw_ffmpeg"]
    notes = ", ".join(
        f"{n['fmt']} {n['seconds']:.0f} s {n['bytes'] / 1e6:.2f} MB" for n in params["notes"]
    )
    plan = plans["fly"]
    lines = [
        f"`{' '.join(['.venv/bin/python -m bench.capacity', *params.get('argv', [])])}` "
        f"({result['machine'].get('elapsed_minutes', '?')} min; "
        f"{describe_machine(result['machine'])}; "
        f"load average {result['machine']['load_average_1_5_15']} before, "
        f"{result['machine'].get('load_average_after')} after)",
        "",
        f"Notes: {notes}; each paced at {params['pace_bytes_per_second'] / 1000:g} KB/s, "
        f"{params['notes_per_phone']} per phone ({params['lone_notes']} at N=1), phones started "
        f"over {params['stagger_seconds']:.0f} s. Memory plan (1 GB, no S3): "
        f"{plan['maxJobs']} jobs + "
        f"{plan['maxQueue']} queued, {plan['plannedBytes'] / MiB:.0f} MiB planned"
        + (
            f"; ramp `open`: `VRAI_MAX_JOBS`/`VRAI_MAX_QUEUE` {OPEN_ADMISSION}"
            if "open" in plans
            else ""
        )
        + f". Lone phone's wait (N=1 median): {result['lone_wait']:.2f} s; a step fails above "
        f"{WAIT_FACTOR:g}x that.",
        "",
        steps_table(result["steps"]),
        "",
        f"Raw ffmpeg, the service's command on the same files "
        f"(median of {len(next(iter(raw['cpu_seconds'].values())))} per file): "
        + ", ".join(f"{fmt} {value:.1f}" for fmt, value in raw["cpu_per_audio_hour"].items())
        + f" CPU-s per audio hour ({raw['cpu_per_audio_hour_mixed']:.1f} half and half).",
        "",
        readme_figures(figures, sizing),
    ]
    return "\n".join(lines) + "\n"


def readme_figures(figures: Mapping[str, Any], sizing: Mapping[str, Any]) -> str:
    """The figures the README's Capacity section quotes, ready to paste."""
    machines = sizing["machines"]
    floor = "" if figures["limit_found"] else "at least (the ramp ran out of steps) "
    by_phones = machines["phones_per_core_at_baseline"] or "n/a (no limit found)"
    return "\n".join([
        "README figures:",
        "- phones at once, as deployed (the plan's admission): "
        f"{figures['phones_as_deployed']}",
        f"- phones at once, CPU and memory bound: {floor}{figures['phones_cpu_bound']} on "
        f"{figures['cores']} cores = {figures['phones_per_core']:.1f} phones per core",
        f"- notes per hour per core: {figures['notes_per_hour_per_core']:.0f} "
        f"(a note lasts its paced upload, {figures['upload_seconds']:.1f} s on average)",
        f"- server tree CPU-s per audio hour: {figures['cpu_per_audio_hour']:.1f}; raw ffmpeg "
        f"{figures['raw_ffmpeg_cpu_per_audio_hour']:.1f} ({figures['service_vs_raw']:.2f}x)",
        f"- stand-in CPU over all steps: {figures['stand_in_cpu_seconds']:.2f} s "
        f"(the server tree's: {figures['server_cpu_seconds']:.0f} s)",
        f"- fleet: {sizing['audio_hours']:.0f} audio hours, "
        f"{sizing['cpu_seconds_needed']:.0f} CPU-s in the hour; "
        f"{sizing['mean_concurrent_uploads']:.0f} uploads at once on average "
        f"(each {sizing['note_hold_seconds']:.1f} s); "
        f"{sizing['phones_per_machine_at_baseline']:.2f} phones per shared-cpu-1x at 1/16 core",
        f"- machines: CPU at the 1/16 baseline {machines['cpu_at_baseline']} "
        f"(with a full 500 s burst balance {machines['cpu_with_full_burst_balance']}), "
        f"by measured phones per core {by_phones}, by admission {machines['admission']} "
        f"-> {sizing['machines_needed']}",
        f"- cost at ${sizing['price_per_month']:.2f}/month (${sizing['price_per_hour']:.5f}/h): "
        f"${sizing['cost_busy_hour']:.2f} for the busy hour, "
        f"${sizing['cost_month_one_busy_hour_a_day']:.2f} a month for one busy hour a day, "
        f"${sizing['cost_month_always_on']:.0f} a month always on",
    ])  # fmt: skip


def report(result: dict[str, Any], stem: str) -> None:
    """Tables, README figures, JSON and plot; the verdicts are worked out again from the raw
    steps, so `--rescore` applies today's rules to an old run."""
    for step in result["steps"]:
        plan = result["plans"][step["ramp"]]["plannedBytes"]
        step["summary"] = summarise(step, result["lone_wait"], plan)
    figures = headline(result)
    sizing = fleet(result, figures, result["parameters"]["price_per_month"])
    result["headline"], result["fleet"] = figures, sizing
    text = render(result, figures, sizing)
    print("\n" + text)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{stem}.md").write_text(text)
    path = write_json(f"{stem}.json", result)
    from .plots import capacity_plot

    plot = capacity_plot(
        [step["summary"] | {"ramp": step["ramp"]} for step in result["steps"]],
        result["lone_wait"] * WAIT_FACTOR,
        result["plans"]["fly"]["plannedBytes"],
        RESULTS_DIR / f"{stem}.png",
    )
    print(f"wrote {path}, {RESULTS_DIR / f'{stem}.md'}, {plot}")


# --- entry point ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 s notes, N = 1 and 4")
    parser.add_argument("--steps", help="phones per step, comma-separated (default 1,2,4,...,96)")
    parser.add_argument("--notes", type=int, default=2, help="notes per phone per step (default 2)")
    parser.add_argument("--seconds", type=float, help="note length (default 300; quick 60)")
    parser.add_argument("--moov", choices=("first", "last"), default="first", help="M4A layout")
    parser.add_argument("--raw-repeats", type=int, help="raw ffmpeg runs per file (default 3)")
    parser.add_argument(
        "--price", type=float, help=f"$/month of one machine (${FLY_PRICE_PER_MONTH})"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="server setting"
    )
    parser.add_argument(
        "--output", help="stem in bench/results/ (default capacity, capacity-quick)"
    )
    parser.add_argument(
        "--rescore", metavar="JSON", help="tables, figures and plot again from a run"
    )
    parser.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace, argv: Sequence[str] | None) -> Config:
    steps = (
        [int(n) for n in args.steps.split(",")]
        if args.steps
        else list(QUICK_STEPS if args.quick else STEPS)
    )
    if steps[0] != 1:
        steps.insert(0, 1)  # the lone phone is every other step's reference
    return Config(
        quick=args.quick,
        steps=steps,
        note_seconds=args.seconds or (QUICK_NOTE_SECONDS if args.quick else NOTE_SECONDS),
        notes_per_phone=args.notes,
        moov=args.moov,
        raw_repeats=args.raw_repeats or (1 if args.quick else 3),
        extra_env=dict(item.split("=", 1) for item in args.env),
        price_per_month=args.price or FLY_PRICE_PER_MONTH,
        argv=list(argv if argv is not None else sys.argv[1:]),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stand_in:
        serve_stand_in(args.port, MP3_KBPS)
        return 0
    if args.rescore:
        result = json.loads(Path(args.rescore).read_text())
        if args.price is not None:
            result["parameters"]["price_per_month"] = args.price
        report(result, args.output or Path(args.rescore).stem)
        return 0
    config = make_config(args, argv)
    result = measure(config)
    report(result, args.output or config.stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
