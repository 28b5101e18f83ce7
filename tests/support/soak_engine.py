"""The soak run: hundreds of phone uploads against a real server, with faults all around it.

Shared by `tests/test_soak.py` (the short variant, in CI) and `bench/soak.py` (the full run,
whose figures go into the README's reliability table).  It lives here, not under `bench/`,
because it is built from the tests' own real parts (`FakeOpenAI`, moto behind
`ThrottlingProxy`, the phone matrix of `phone_media`, `start_server`): both import it as
`tests.support.soak_engine` (the bench scripts run as modules, `python -m bench.soak`).
Like every bench script it uses the service only from outside (HTTP, its process, its log).

What one run does:

* starts moto (S3 API) behind a proxy that can be stopped, `FakeOpenAI` (the real `openai`
  SDK's upstream, real Whisper behind it) and `vrai-stream serve` with S3 debug copies on,
  `VRAI_TRANSCRIBER=openai`, and the memory plan of a 1 GB Fly machine (7 jobs, 7 queued);
* warms the server up with every kind of request, lets it settle, and takes its file
  descriptors and RSS as the warm baseline;
* injects upstream faults (429s, 500s, slow answers within and beyond the SDK's timeout)
  and sends the planned requests at a fixed concurrency: phone recordings of every format
  and layout, mostly `Accept: audio/mpeg`, a share transcribed (raw, legacy JSON, legacy
  multipart, OpenAI-compatible), 10% clients that reset the connection mid-upload, 10%
  truncated or corrupted files, windows past the end; S3 is stopped twice meanwhile;
* judges every answer: the only 5xx allowed are `503 busy` and `502`/`504` that the fake's
  own record explains (every attempt the SDK made for that MP3 was a fault it injected);
* then checks what is left: children, temp files (named or open), incomplete multipart
  uploads (once S3 is back), file descriptors and RSS against the warm baseline.

The service sends its request ID upstream with each attempt (`X-Client-Request-Id`), so a
`502` or `504` is checked against exactly the attempts that were made for it.  Transcribed
requests take their windows from 24 lengths (2.0 to 4.3 s), each with its own recording: the
fake (real Whisper) has every one of those MP3s transcribed before a phase starts, so that
what is slow upstream is what the faults made slow, not this machine's CPU.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx
import psutil

from .audio import SENTENCE, speak
from .client import form_body
from .fake_openai import TRANSCRIPTIONS_PATH, FakeOpenAI, Fault, Received
from .phone_media import PhoneFile, phone_files
from .s3_server import (
    PeakRss,
    ThrottlingProxy,
    multipart_uploads,
    new_bucket,
    paced,
    s3_client,
    s3_env,
    start_moto,
    wait_ready,
)
from .server import Server, start_server

MiB = 1024 * 1024
API_KEY = "sk-soak-test-key"
RAW = "/v1/transcriptions"
LEGACY_JSON = "/trim-and-transcribe"
LEGACY_FORM = "/trim-and-transcribe-multipart"
OPENAI_FORM = "/v1/audio/transcriptions"
BOUNDARY = "----vrai-soak-7f1c2a"

LARGE = ("caf-aac-pakt-last", "caf-alac", "m4a-moov-last")
"""Seekable layouts over 6 MB: spooled to disk, and their S3 copy goes up in parts."""
CLIP_SECONDS = 10.0

UPSTREAM_STATUSES = {502: "transcription_failed", 504: "transcription_timeout"}
FD_SLACK = 8
"""Descriptors the server may hold beyond its warm baseline: idle keep-alive sockets to S3
and to the OpenAI API (pools that grow and shrink with the load).  Pipes, files and client
sockets have no slack at all."""
RSS_DRIFT_LIMIT = 20 * MiB


@dataclass(frozen=True)
class SoakConfig:
    requests: int = 48
    concurrency: int = 8
    warmup_requests: int = 16
    seed: int = 8
    outages: tuple[float, ...] = (0.3, 0.65)
    """When S3 goes down, as shares of the requests answered so far."""
    outage_seconds: float = 3.0
    disconnect_share: float = 0.10
    corrupt_share: float = 0.10
    past_end_share: float = 0.07
    large_share: float = 0.10
    transcribe_share: float = 0.20
    paced_share: float = 0.10
    sized_share: float = 0.30
    openai_timeout_seconds: float = 5.0
    openai_max_retries: int = 1
    openai_deadline_seconds: float = 20.0
    fault_429: float = 0.15
    fault_500: float = 0.15
    fault_slow: float = 0.08
    fault_timeout: float = 0.07
    memory_limit_bytes: int = 1024 * MiB
    settle_seconds: float = 3.0
    cleanup_timeout_seconds: float = 30.0
    server_env: tuple[tuple[str, str], ...] = ()
    """Extra environment for the server (experiments: allocator settings and the like)."""


@dataclass(frozen=True)
class Planned:
    index: int
    kind: str
    """mp3 | large | transcribe | past_end | corrupt | disconnect | warmup-*"""
    endpoint: str
    fixture: str
    start: float
    end: float
    mp3: bool
    sized: bool
    rate: float | None
    mutation: str | None = None
    cut: float | None = None
    """disconnect: the share of the body sent before the reset."""
    seed: int = 0


@dataclass
class Record:
    planned: Planned
    started: float
    ended: float = 0.0
    status: int | None = None
    code: str | None = None
    request_id: str = ""
    error: str | None = None
    """A client-side failure (no answer where one was due)."""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class FdCensus:
    total: int
    pipes: int
    files: int
    client_sockets: int
    s3_sockets: int
    openai_sockets: int
    other_sockets: int
    other: int

    def describe(self) -> str:
        return (
            f"{self.total} (pipes {self.pipes}, files {self.files}, client sockets "
            f"{self.client_sockets}, S3 {self.s3_sockets}, OpenAI {self.openai_sockets}, "
            f"other sockets {self.other_sockets}, other {self.other})"
        )


@dataclass
class SoakReport:
    config: SoakConfig
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    fds_before: FdCensus | None = None
    fds_after: FdCensus | None = None
    rss_before: int = 0
    rss_after: int = 0
    rss_peak: int = 0
    multipart_left: int = -1
    temp_files_left: int = -1
    children_left: int = -1
    server_codes: Counter[str] = field(default_factory=Counter)
    upstream_verified: int = 0
    outage_windows: list[tuple[float, float]] = field(default_factory=list)
    upstream_attempts: Counter[str] = field(default_factory=Counter)
    unretrieved_aiohttp: int = 0
    """asyncio's "Task exception was never retrieved" for aiohttp's body writer (S3 resets)."""
    wall_seconds: float = 0.0

    # --- figures -------------------------------------------------------------------------

    @property
    def rss_drift(self) -> int:
        return self.rss_after - self.rss_before

    def outcomes(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for record in self.records:
            counts[outcome_label(record)] += 1
        return counts

    def latencies(self, kinds: tuple[str, ...]) -> list[float]:
        return [
            record.seconds
            for record in self.records
            if record.planned.kind in kinds and record.status is not None
        ]

    def table(self) -> str:
        """The figures as a Markdown table, for the README's reliability section."""
        rows: list[tuple[str, str]] = []
        answered = [r for r in self.records if r.planned.kind != "disconnect"]
        dropped = len(self.records) - len(answered)
        rows.append(
            (
                "requests (concurrency)",
                f"{len(self.records)} ({self.config.concurrency}); "
                f"{len(self.outage_windows)} S3 outages of {self.config.outage_seconds:g} s",
            )
        )
        for label, count in sorted(self.outcomes().items(), key=lambda item: (-item[1], item[0])):
            rows.append((f"outcome: {label}", str(count)))
        rows.append(
            (
                "client resets mid-upload (server logged 499)",
                f"{dropped} ({self.server_codes['client_disconnected']})",
            )
        )
        rows.append(("5xx explained by injected upstream faults", str(self.upstream_verified)))
        attempts = ", ".join(f"{k} {v}" for k, v in sorted(self.upstream_attempts.items()))
        rows.append(("upstream attempts seen by the fake", attempts or "0"))
        rows.append(("unexpected answers", str(len(self.problems_of("answer")))))
        rows.append(
            (
                'asyncio "Task exception was never retrieved" (aiohttp, S3 resets)',
                str(self.unretrieved_aiohttp),
            )
        )
        for name, kinds in (
            ("MP3 (`Accept: audio/mpeg`)", ("mp3", "large")),
            ("transcribed", ("transcribe",)),
            ("all answered", ("mp3", "large", "transcribe", "past_end", "corrupt")),
        ):
            values = self.latencies(kinds)
            if values:
                rows.append(
                    (
                        f"latency p50 / p95, {name}",
                        f"{percentile(values, 50):.2f} s / {percentile(values, 95):.2f} s",
                    )
                )
        if self.fds_before and self.fds_after:
            rows.append(
                (
                    "server fds warm / after",
                    f"{self.fds_before.total} / {self.fds_after.total} "
                    f"(pipes {self.fds_before.pipes} / {self.fds_after.pipes}, "
                    f"pooled S3+OpenAI sockets "
                    f"{self.fds_before.s3_sockets + self.fds_before.openai_sockets} / "
                    f"{self.fds_after.s3_sockets + self.fds_after.openai_sockets}; "
                    f"slack allowed {FD_SLACK})",
                )
            )
        rows.append(
            (
                "server RSS warm / after / peak",
                f"{self.rss_before / MiB:.1f} / {self.rss_after / MiB:.1f} / "
                f"{self.rss_peak / MiB:.1f} MiB (drift {self.rss_drift / MiB:+.1f} MiB)",
            )
        )
        rows.append(("incomplete multipart uploads after", str(self.multipart_left)))
        rows.append(("temp files after (named or open)", str(self.temp_files_left)))
        rows.append(("child processes after", str(self.children_left)))
        rows.append(("wall time", f"{self.wall_seconds:.0f} s"))
        lines = ["| figure | value |", "| --- | --- |"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        return "\n".join(lines)

    def problems_of(self, prefix: str) -> list[str]:
        return [problem for problem in self.problems if problem.startswith(prefix)]

    def summary(self) -> dict[str, Any]:
        """The figures as JSON (for bench/results)."""
        return {
            "requests": len(self.records),
            "concurrency": self.config.concurrency,
            "outcomes": dict(self.outcomes()),
            "server_codes": dict(self.server_codes),
            "upstream_verified": self.upstream_verified,
            "upstream_attempts": dict(self.upstream_attempts),
            "latency_seconds": {
                name: {
                    "p50": round(percentile(values, 50), 3),
                    "p95": round(percentile(values, 95), 3),
                }
                for name, kinds in (
                    ("mp3", ("mp3", "large")),
                    ("transcribed", ("transcribe",)),
                )
                if (values := self.latencies(kinds))
            },
            "fds_before": vars(self.fds_before) if self.fds_before else None,
            "fds_after": vars(self.fds_after) if self.fds_after else None,
            "fd_slack": FD_SLACK,
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": self.rss_after,
            "rss_peak_bytes": self.rss_peak,
            "multipart_left": self.multipart_left,
            "temp_files_left": self.temp_files_left,
            "children_left": self.children_left,
            "outage_windows": self.outage_windows,
            "unretrieved_aiohttp": self.unretrieved_aiohttp,
            "wall_seconds": round(self.wall_seconds, 1),
            "problems": self.problems,
        }


def outcome_label(record: Record) -> str:
    if record.planned.kind == "disconnect":
        return "reset by the client (no answer due)"
    if record.status is None:
        return f"no answer ({record.error})"
    return f"{record.status} {record.code or ''}".strip()


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[rank]


# --- the recordings --------------------------------------------------------------------------


def build_phones(folder: Path) -> dict[str, PhoneFile]:
    """The phone matrix, built into `folder` (for callers without the tests' fixtures)."""
    folder.mkdir(parents=True, exist_ok=True)
    speech = folder / "sentence.wav"
    if not speech.exists():
        speak(SENTENCE, speech)
    return phone_files(folder / "phones", speech)


def mutate(data: bytes, mutation: str, rng: random.Random) -> bytes:
    """A truncated or corrupted recording, as flaky uploads and broken apps produce them."""
    if mutation == "truncated":
        return data[: max(64, int(len(data) * rng.uniform(0.02, 0.6)))]
    if mutation == "corrupt-middle":
        out = bytearray(data)
        start = len(out) // 3
        span = min(len(out) - start, rng.randint(2048, 32768))
        out[start : start + span] = rng.randbytes(span)
        return bytes(out)
    if mutation == "corrupt-header":
        size = min(len(data), rng.randint(16, 256))
        return rng.randbytes(size) + data[size:]
    if mutation == "noise":
        return rng.randbytes(rng.randint(1000, 200_000))
    raise ValueError(mutation)


# --- the plan --------------------------------------------------------------------------------


class _LengthCycle:
    """Window lengths 2.0 .. 4.3 s in 0.1 s steps, in turn, each with its own recording:
    only 24 distinct MP3s ever go upstream, so the fake transcribes each once (see
    `prime_upstream`)."""

    PERIOD = 24

    def __init__(self, fixtures: list[str]) -> None:
        self._fixtures = fixtures
        self._next = 0

    def take(self) -> tuple[str, float]:
        step = self._next % self.PERIOD
        self._next += 1
        return self._fixtures[step % len(self._fixtures)], round(2.0 + step / 10, 1)


def plan_requests(
    config: SoakConfig, count: int, rng: random.Random, *, first_index: int = 0
) -> list[Planned]:
    small = _small_fixtures()
    lengths = _LengthCycle(small)
    planned: list[Planned] = []
    shares = (
        ("disconnect", config.disconnect_share),
        ("corrupt", config.corrupt_share),
        ("past_end", config.past_end_share),
        ("large", config.large_share),
        ("transcribe", config.transcribe_share),
    )
    # Exact shares, shuffled: a short run still has each kind in its proportion.
    kinds: list[str] = []
    for kind, share in shares:
        kinds += [kind] * round(count * share)
    kinds += ["mp3"] * (count - len(kinds))
    rng.shuffle(kinds)
    for offset, kind in enumerate(kinds):
        index = first_index + offset
        paced = rng.random() < config.paced_share
        rate = rng.uniform(1, 3) * MiB if paced else None
        sized = rng.random() < config.sized_share
        seed = rng.randrange(2**32)
        if kind == "mp3":
            start = round(rng.uniform(0, 4), 2)
            planned.append(
                Planned(index, kind, RAW, rng.choice(small), start,
                        round(start + rng.uniform(1, 6), 2), True, sized, rate, seed=seed)
            )  # fmt: skip
        elif kind == "large":
            start = round(rng.uniform(0, 60), 1)
            planned.append(
                Planned(index, kind, RAW, rng.choice(LARGE), start, start + 5, True, sized, rate,
                        seed=seed)
            )  # fmt: skip
        elif kind == "transcribe":
            endpoint = rng.choices(
                (RAW, LEGACY_JSON, LEGACY_FORM, OPENAI_FORM), weights=(5, 2, 2, 1)
            )[0]
            fixture, length = lengths.take()
            planned.append(
                Planned(index, kind, endpoint, fixture, 0.0, length, False, sized, rate,
                        seed=seed)
            )  # fmt: skip
        elif kind == "past_end":
            start = round(rng.uniform(CLIP_SECONDS + 5, 200), 1)
            planned.append(
                Planned(index, kind, RAW, rng.choice(small), start, start + 10, True, sized,
                        rate, seed=seed)
            )  # fmt: skip
        elif kind == "corrupt":
            fixture = rng.choice([*small, *small, *LARGE])
            mutation = rng.choice(("truncated", "corrupt-middle", "corrupt-header", "noise"))
            planned.append(
                Planned(index, kind, RAW, fixture, 0.0, 5.0, True, sized, rate,
                        mutation=mutation, seed=seed)
            )  # fmt: skip
        else:  # disconnect
            fixture = rng.choice([*small, *small, *LARGE])
            endpoint = rng.choices((RAW, LEGACY_JSON), weights=(4, 1))[0]
            # Past 5 MiB of a large file: its S3 copy has a multipart upload to abort.
            cut = rng.uniform(0.85, 0.97) if fixture in LARGE else rng.uniform(0.2, 0.8)
            planned.append(
                Planned(index, kind, endpoint, fixture, 0.0, 5.0, endpoint == RAW, False,
                        None, cut=cut, seed=seed)
            )  # fmt: skip
    return planned


def warmup_plan(config: SoakConfig, rng: random.Random) -> list[Planned]:
    """Every endpoint and layout once, then a first round of the soak's own mix."""
    fixed: list[Planned] = []
    small = _small_fixtures()
    for number, endpoint in enumerate((RAW, LEGACY_JSON, LEGACY_FORM, OPENAI_FORM)):
        fixed.append(
            Planned(-1 - number, "warmup-transcribe", endpoint, small[number], 0.0,
                    1.5 + number / 10, False, False, None)
        )  # fmt: skip
    for number, fixture in enumerate(LARGE):
        fixed.append(
            Planned(-10 - number, "warmup-large", RAW, fixture, 0.0, 5.0, True, number == 0, None)
        )
    mixed = plan_requests(config, max(0, config.warmup_requests - len(fixed)), rng)
    warm = [
        Planned(-100 - planned.index, f"warmup-{planned.kind}", *_fields_after_kind(planned))
        for planned in mixed
    ]
    plan = fixed + warm
    rng.shuffle(plan)
    return plan


def _fields_after_kind(planned: Planned) -> tuple[Any, ...]:
    return (
        planned.endpoint, planned.fixture, planned.start, planned.end, planned.mp3,
        planned.sized, planned.rate, planned.mutation, planned.cut, planned.seed,
    )  # fmt: skip


def _small_fixtures() -> list[str]:
    from .phone_media import FIXTURE_NAMES

    return [name for name in FIXTURE_NAMES if name not in LARGE]


# --- bodies ----------------------------------------------------------------------------------


def _form(fields: dict[str, str], file_field: str, filename: str, audio: bytes) -> bytes:
    """A planned request's form; its part says octet-stream, as many apps label it."""
    return form_body(
        BOUNDARY,
        fields,
        file_field,
        audio,
        filename=filename,
        content_type="application/octet-stream",
    )


def request_parts(planned: Planned, audio: bytes) -> tuple[str, dict[str, str], bytes]:
    """The path, headers and whole body of a planned request."""
    times = {"fromTime": f"{planned.start:g}", "toTime": f"{planned.end:g}"}
    if planned.endpoint == RAW:
        headers = {"Accept": "audio/mpeg"} if planned.mp3 else {}
        return f"{RAW}?fromTime={planned.start:g}&toTime={planned.end:g}", headers, audio
    if planned.endpoint == LEGACY_JSON:
        # The times first: the audio streams into ffmpeg as its base64 arrives.
        head = json.dumps({**times, "summarizationType": "none"})[:-1]
        body = f'{head}, "fileBlob": "'.encode() + base64.b64encode(audio) + b'"}'
        return LEGACY_JSON, {"Content-Type": "application/json"}, body
    content_type = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    if planned.endpoint == LEGACY_FORM:
        fields = {**times, "summarizationType": "none"}
        return LEGACY_FORM, content_type, _form(fields, "audio", "note.m4a", audio)
    fields = {"model": "whisper-1", "response_format": "json", **times}
    return OPENAI_FORM, content_type, _form(fields, "file", "note.m4a", audio)


# --- the environment -------------------------------------------------------------------------


@dataclass
class SoakEnvironment:
    server: Server
    fake: FakeOpenAI
    proxy: ThrottlingProxy
    s3: Any
    bucket: str

    def fd_census(self) -> FdCensus:
        return fd_census(self.server, self.proxy.port, self.fake_port)

    @property
    def fake_port(self) -> int:
        port = httpx.URL(self.fake.url).port
        assert port is not None
        return port


@contextlib.contextmanager
def soak_environment(config: SoakConfig, work_dir: Path) -> Iterator[SoakEnvironment]:
    """moto behind a stoppable proxy, FakeOpenAI, and the server, torn down in any case."""
    moto = start_moto(work_dir / "moto")
    try:
        client = s3_client(moto.url)
        bucket = new_bucket(client)
        with ThrottlingProxy(moto.url) as proxy, FakeOpenAI(api_key=API_KEY) as fake:
            env = {
                **s3_env(proxy.url, bucket),
                **fake.server_env(),
                "VRAI_OPENAI_TIMEOUT_SECONDS": f"{config.openai_timeout_seconds:g}",
                "VRAI_OPENAI_MAX_RETRIES": str(config.openai_max_retries),
                "VRAI_OPENAI_DEADLINE_SECONDS": f"{config.openai_deadline_seconds:g}",
                "VRAI_MEMORY_LIMIT_BYTES": str(config.memory_limit_bytes),
                **dict(config.server_env),
            }
            server = start_server(work_dir / "server", env)
            try:
                wait_ready(server)
                yield SoakEnvironment(server, fake, proxy, client, bucket)
            finally:
                server.stop()
    finally:
        moto.stop()


def fd_census(server: Server, s3_port: int, openai_port: int) -> FdCensus:
    """The server's descriptors by kind; sockets by whom they talk to."""
    pid = server.process.pid
    fd_dir = Path(f"/proc/{pid}/fd")
    pipes = files = sockets = other = 0
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue
        if target.startswith("pipe:"):
            pipes += 1
        elif target.startswith("socket:"):
            sockets += 1
        elif target.startswith("/"):
            files += 1
        else:
            other += 1
    server_port = httpx.URL(server.url).port
    client = s3 = upstream = 0
    for conn in psutil.Process(pid).net_connections(kind="inet"):
        if conn.laddr and conn.laddr.port == server_port:
            client += 1
        elif conn.raddr and conn.raddr.port == s3_port:
            s3 += 1
        elif conn.raddr and conn.raddr.port == openai_port:
            upstream += 1
    return FdCensus(
        total=pipes + files + sockets + other,
        pipes=pipes,
        files=files,
        client_sockets=client,
        s3_sockets=s3,
        openai_sockets=upstream,
        other_sockets=sockets - client - s3 - upstream,
        other=other,
    )


# --- sending ---------------------------------------------------------------------------------


class Sender:
    def __init__(self, env: SoakEnvironment, phones: dict[str, PhoneFile]) -> None:
        self.env = env
        self.audio = {name: phone.read() for name, phone in phones.items()}

    def body_of(self, planned: Planned) -> tuple[str, dict[str, str], bytes]:
        audio = self.audio[planned.fixture]
        if planned.mutation:
            audio = mutate(audio, planned.mutation, random.Random(planned.seed))
        return request_parts(planned, audio)

    async def send(self, client: httpx.AsyncClient, planned: Planned) -> Record:
        record = Record(planned, started=time.monotonic())
        try:
            if planned.kind == "disconnect":
                await self._disconnect(planned)
            else:
                await self._post(client, planned, record)
        except Exception as exc:  # a client-side failure is a finding, not a crash
            record.error = f"{type(exc).__name__}: {exc}"[:200]
        record.ended = time.monotonic()
        return record

    async def _post(self, client: httpx.AsyncClient, planned: Planned, record: Record) -> None:
        path, headers, body = self.body_of(planned)
        content: bytes | AsyncIterator[bytes]
        if planned.sized:
            content = body
        else:
            chunk = 16 * 1024 if planned.rate else 64 * 1024
            content = paced(body, rate=planned.rate, chunk_size=chunk)
        response = await client.post(path, content=content, headers=headers)
        record.status = response.status_code
        record.request_id = response.headers.get("x-request-id", "")
        if response.headers.get("content-type", "").startswith("application/json"):
            payload = response.json()
            if response.status_code != 200:
                record.code = payload.get("code")
        elif response.status_code == 200 and (
            response.headers.get("content-type") != "audio/mpeg" or not response.content
        ):
            record.error = "a 200 without an MP3"

    async def _disconnect(self, planned: Planned) -> None:
        """Send part of the body, chunked, then reset the connection as a phone losing signal."""
        path, headers, body = self.body_of(planned)
        url = httpx.URL(self.env.server.url)
        assert url.port is not None and planned.cut is not None
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n{head}\r\n"
        ).encode()
        limit = int(len(body) * planned.cut)
        chunk_size = 64 * 1024 if len(body) > MiB else 8 * 1024
        stream = await anyio.connect_tcp(url.host, url.port)
        try:
            await stream.send(request)
            for offset in range(0, limit, chunk_size):
                piece = body[offset : min(offset + chunk_size, limit)]
                await stream.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                if chunk_size < 64 * 1024:
                    await anyio.sleep(0.01)
            # Let the server get going (ffmpeg started, copy under way), then vanish.
            await anyio.sleep(random.Random(planned.seed).uniform(0.1, 0.4))
            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
        finally:
            await stream.aclose()


async def run_batch(
    sender: Sender,
    plan: list[Planned],
    concurrency: int,
    on_done: Callable[[Record], None] | None = None,
) -> list[Record]:
    records: list[Record] = []
    queue = list(reversed(plan))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(120, connect=10)
    async with httpx.AsyncClient(
        base_url=sender.env.server.url, timeout=timeout, limits=limits
    ) as client:

        async def worker() -> None:
            while queue:
                planned = queue.pop()
                record = await sender.send(client, planned)
                records.append(record)
                if on_done is not None:
                    on_done(record)

        async with anyio.create_task_group() as group:
            for _ in range(concurrency):
                group.start_soon(worker)
    return records


# --- the run ---------------------------------------------------------------------------------


def fault_plan(config: SoakConfig, count: int, rng: random.Random) -> list[Fault]:
    """What the upstream does to each transcription attempt, in arrival order."""
    faults = []
    timeout = config.openai_timeout_seconds
    for _ in range(count):
        draw = rng.random()
        if draw < config.fault_429:
            fault = Fault(status=429, retry_after=0.2, path=TRANSCRIPTIONS_PATH)
        elif draw < config.fault_429 + config.fault_500:
            fault = Fault(status=500, path=TRANSCRIPTIONS_PATH)
        elif draw < config.fault_429 + config.fault_500 + config.fault_slow:
            fault = Fault(delay=rng.uniform(0.2, 1.5), path=TRANSCRIPTIONS_PATH)
        elif draw < config.fault_429 + config.fault_500 + config.fault_slow + config.fault_timeout:
            # A hang: the SDK gives up first; the fake then answers 500 to nobody, without
            # spending a transcription on it.
            fault = Fault(status=500, delay=timeout + 2, path=TRANSCRIPTIONS_PATH)
        else:
            fault = Fault(path=TRANSCRIPTIONS_PATH)  # answered at once, for real
        faults.append(fault)
    return faults


HUNG = "hung (injected)"
TOO_SLOW = "too slow (answered after the timeout)"


def attempt_kind(received: Received, timeout: float) -> str:
    """What one upstream attempt came to, as the SDK in the server saw it."""
    fault = received.fault
    if fault is not None and fault.delay >= timeout:
        return HUNG
    if fault is not None and fault.status is not None:
        return str(fault.status)
    took = (received.answered_at or time.monotonic()) - received.received_at
    if took >= timeout:
        return TOO_SLOW  # the fake itself was slower than the SDK's timeout (CPU starved)
    return "answered" if received.status == 200 else f"answered {received.status}"


@dataclass
class Phase:
    """One batch of requests with its outages and faults, and what everyone recorded."""

    name: str
    records: list[Record] = field(default_factory=list)
    outage_windows: list[tuple[float, float]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)


def run_phase(
    name: str,
    config: SoakConfig,
    env: SoakEnvironment,
    sender: Sender,
    plan: list[Planned],
    rng: random.Random,
    outages: tuple[float, ...],
    log: Callable[[str], None],
) -> Phase:
    """Inject the upstream's faults, send `plan` with S3 outages, collect every record."""
    phase = Phase(name)
    transcribed = sum(1 for planned in plan if planned.kind.endswith("transcribe"))
    primed = anyio.run(prime_upstream, env, sender, plan)
    log(f"  {name}: the fake upstream has the transcripts of {primed} MP3s ready")
    env.fake.reset()
    for fault in fault_plan(config, transcribed * (config.openai_max_retries + 1), rng):
        env.fake.inject(fault)
    log_mark = len(env.server.request_logs())
    phase.records = anyio.run(_send_phase, config, env, sender, plan, outages, phase, log)
    # Every answered request logged before it answered; a reset one when the server noticed.
    disconnects = sum(1 for record in phase.records if record.planned.kind == "disconnect")
    deadline = time.monotonic() + config.cleanup_timeout_seconds
    while True:
        phase.logs = env.server.request_logs()[log_mark:]
        if len(phase.logs) >= len(plan) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if disconnects and len(phase.logs) < len(plan):
        log(f"  {len(plan) - len(phase.logs)} requests never logged")
    phase.received = env.fake.transcription_requests
    env.fake.reset()
    return phase


def run_soak(
    config: SoakConfig,
    phones: dict[str, PhoneFile],
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> SoakReport:
    report = SoakReport(config)
    began = time.monotonic()
    rng = random.Random(config.seed)
    with soak_environment(config, work_dir) as env:
        sender = Sender(env, phones)
        process = psutil.Process(env.server.process.pid)

        # Warm-up: a first round of the same mix, one S3 outage included, so that imports,
        # pools, caches and the allocator's high-water mark are all in the baseline.
        warm_plan = warmup_plan(config, rng)
        log(f"warm-up: {len(warm_plan)} requests, one S3 outage")
        warm = run_phase("warm-up", config, env, sender, warm_plan, rng, (0.5,), log)
        report.problems += [f"warm-up {problem}" for problem in judge_phase(warm, config)]
        env.server.wait_idle(timeout=config.cleanup_timeout_seconds)
        wait_multipart_gone(env, config.cleanup_timeout_seconds)
        time.sleep(config.settle_seconds)
        report.fds_before = env.fd_census()
        report.rss_before = process.memory_info().rss
        log(f"warm baseline: fds {report.fds_before.describe()}")
        log(f"warm baseline: RSS {report.rss_before / MiB:.1f} MiB")

        plan = plan_requests(config, config.requests, rng)
        with PeakRss(env.server.process.pid) as peak:
            main = run_phase("main", config, env, sender, plan, rng, config.outages, log)
        report.rss_peak = peak.peak
        report.records = main.records
        report.outage_windows = main.outage_windows
        report.server_codes = Counter(str(line.get("code")) for line in main.logs)
        timeout = config.openai_timeout_seconds
        report.upstream_attempts = Counter(attempt_kind(r, timeout) for r in main.received)
        report.upstream_verified = sum(
            1
            for record in main.records
            if record.status in UPSTREAM_STATUSES
            and record.planned.kind == "transcribe"
            and explain_upstream_failure(record, main.received, config) is None
        )
        report.problems += judge_phase(main, config)

        # S3 is back (the outages ended); what the server left must go away by itself.
        report.children_left, report.temp_files_left = wait_clean(env.server, config)
        report.multipart_left = wait_multipart_gone(env, config.cleanup_timeout_seconds)
        time.sleep(config.settle_seconds)
        report.fds_after = env.fd_census()
        report.rss_after = process.memory_info().rss
        log(f"after: fds {report.fds_after.describe()}, RSS {report.rss_after / MiB:.1f} MiB")
        report.problems += judge_leftovers(report)
        report.problems += judge_log(env.server, report)
        canary(report, env, sender)
    report.wall_seconds = time.monotonic() - began
    return report


async def prime_upstream(env: SoakEnvironment, sender: Sender, plan: list[Planned]) -> int:
    """Have the fake transcribe, ahead of time, every MP3 this plan will send it.

    The fake runs real Whisper on this machine's CPU: on a loaded machine one transcription
    can outlast the SDK's timeout, and the soak would measure the test machine instead of
    the faults it injects.  The fake caches its answers by the MP3's bytes, so each MP3 is
    fetched from the server (`Accept: audio/mpeg`: the same ffmpeg command) and transcribed
    once, with the options the service sends.  During the phase, an attempt the fake does
    not fault is then answered at once, and a slow one is slow because it was told to be.
    """
    wanted = sorted({(p.fixture, p.start, p.end) for p in plan if p.kind.endswith("transcribe")})
    limiter = anyio.Semaphore(2)
    async with httpx.AsyncClient(timeout=300) as client:

        async def prime(fixture: str, start: float, end: float) -> None:
            async with limiter:
                mp3 = await client.post(
                    f"{env.server.url}{RAW}?fromTime={start:g}&toTime={end:g}",
                    content=sender.audio[fixture],
                    headers={"Accept": "audio/mpeg"},
                )
                mp3.raise_for_status()
                answer = await client.post(
                    f"{env.fake.base_url}/audio/transcriptions",
                    files={"file": ("audio.mp3", mp3.content, "audio/mpeg")},
                    data={"model": "whisper-1", "response_format": "verbose_json"},
                    headers={"Authorization": f"Bearer {API_KEY}"},
                )
                answer.raise_for_status()

        async with anyio.create_task_group() as group:
            for fixture, start, end in wanted:
                group.start_soon(prime, fixture, start, end)
    return len(wanted)


async def _send_phase(
    config: SoakConfig,
    env: SoakEnvironment,
    sender: Sender,
    plan: list[Planned],
    outages: tuple[float, ...],
    phase: Phase,
    log: Callable[[str], None],
) -> list[Record]:
    done = 0
    progress_every = max(1, len(plan) // 5)

    def on_done(record: Record) -> None:
        nonlocal done
        done += 1
        if done % progress_every == 0:
            log(f"  {phase.name}: {done}/{len(plan)} answered")

    async def outage_windows() -> None:
        for share in outages:
            while done < len(plan) * share:  # noqa: ASYNC110 - polls a plain counter
                await anyio.sleep(0.05)
            started = time.monotonic()
            await anyio.to_thread.run_sync(env.proxy.stop)
            log(f"  {phase.name}: S3 down at {done}/{len(plan)}")
            await anyio.sleep(config.outage_seconds)
            await anyio.to_thread.run_sync(env.proxy.start)
            phase.outage_windows.append((round(started, 3), round(time.monotonic(), 3)))
            log(f"  {phase.name}: S3 back")

    records: list[Record] = []
    async with anyio.create_task_group() as group:
        group.start_soon(outage_windows)
        records = await run_batch(sender, plan, config.concurrency, on_done)
    return records


def wait_clean(server: Server, config: SoakConfig) -> tuple[int, int]:
    """Children and temp files (named or held open) left, once given time to go."""
    deadline = time.monotonic() + config.cleanup_timeout_seconds
    while True:
        children = len(server.children())
        temps = len(server.temp_files()) + len(server.open_temp_files())
        if (children == 0 and temps == 0) or time.monotonic() > deadline:
            return children, temps
        time.sleep(0.1)


def wait_multipart_gone(env: SoakEnvironment, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        left = len(multipart_uploads(env.s3, env.bucket))
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def describe(record: Record) -> str:
    planned = record.planned
    what = f"#{planned.index} {planned.kind} {planned.endpoint} {planned.fixture}"
    if planned.mutation:
        what += f" ({planned.mutation})"
    what += f" window {planned.start:g}-{planned.end:g}"
    answer = f"{record.status} {record.code}" if record.status else f"no answer: {record.error}"
    return f"{what}: {answer} after {record.seconds:.2f} s (request {record.request_id or '?'})"


EXPECTED: dict[str, set[int]] = {
    "mp3": {200},
    "large": {200},
    "transcribe": {200},
    "past_end": {422},
    "corrupt": {200, 400, 422},
}


def judge_phase(phase: Phase, config: SoakConfig) -> list[str]:
    """Every answer against what its request deserved; the server's log against the answers."""
    problems: list[str] = []
    by_id = {line.get("requestId"): line for line in phase.logs}
    for record in phase.records:
        planned = record.planned
        kind = planned.kind.removeprefix("warmup-")
        if kind == "disconnect":
            if record.error:
                problems.append(f"answer: the reset itself failed: {describe(record)}")
            continue
        if record.status is None or record.error:
            problems.append(f"answer: {describe(record)}")
            continue
        line = by_id.get(record.request_id)
        if line is None:
            problems.append(f"log: no log line for {describe(record)}")
        elif line.get("status") != record.status:
            problems.append(f"log: logged {line.get('status')} for {describe(record)}")
        if record.status == 503 and record.code == "busy":
            continue
        if record.status in UPSTREAM_STATUSES and kind == "transcribe":
            why = explain_upstream_failure(record, phase.received, config)
            if why is not None:
                problems.append(f"answer: {describe(record)}: {why}")
            continue
        wrong_code = kind == "past_end" and record.code != "no_audio_in_window"
        if record.status not in EXPECTED[kind] or wrong_code:
            problems.append(f"answer: {describe(record)}")
    # Two kinds of requests have no answer to judge by; the server's log accounts for them.
    disconnects = sum(1 for record in phase.records if record.planned.kind == "disconnect")
    logged = sum(1 for line in phase.logs if line.get("code") == "client_disconnected")
    lost, dead_refused = lost_busy_answers(phase)
    if logged + dead_refused != disconnects:
        problems.append(
            f"log: {disconnects} clients reset mid-upload, {logged} logged as "
            f"client_disconnected and {dead_refused} refused as busy"
        )
    for record in lost:
        problems.remove(f"answer: {describe(record)}")
        record.error = LOST_BUSY
    for line in phase.logs:
        if line.get("status") == 500:
            problems.append(f"log: a 500 was logged: {line}")
    return problems


CONNECTION_ERRORS = ("ReadError", "WriteError", "RemoteProtocolError")
LOST_BUSY = "reset while still sending; the server logged 503 busy"


def lost_busy_answers(phase: Phase) -> tuple[list[Record], int]:
    """Requests whose `503 busy` the client never read, and dead clients refused as busy.

    Admission answers `503` before reading the body, with `Connection: close`.  A client
    still sending a large body then gets a reset instead of the answer (the kernel resets a
    connection closed with unread data, and the client's stack drops what it had received).
    Each such request shows up as a connection error here and as a `busy` line in the log.
    A client that reset while queued holds its queue place until it is admitted or the
    queue times out: then it is logged as `busy` too.
    """
    seen = sum(1 for r in phase.records if r.status == 503 and r.code == "busy")
    logged = sum(1 for line in phase.logs if line.get("code") == "busy")
    dropped = [
        r
        for r in phase.records
        if r.planned.kind != "disconnect"
        and r.status is None
        and (r.error or "").startswith(CONNECTION_ERRORS)
    ]
    unread = logged - seen
    if unread <= 0:
        return [], 0
    lost = dropped[:unread]
    return lost, unread - len(lost)


def judge_leftovers(report: SoakReport) -> list[str]:
    """What is left, and what the process holds, against the warm baseline."""
    problems: list[str] = []
    if report.children_left:
        problems.append(f"left: {report.children_left} child processes")
    if report.temp_files_left:
        problems.append(f"left: {report.temp_files_left} temp files")
    if report.multipart_left:
        problems.append(f"left: {report.multipart_left} incomplete multipart uploads")
    before, after = report.fds_before, report.fds_after
    assert before is not None and after is not None
    for name in ("pipes", "files", "client_sockets", "other"):
        if getattr(after, name) > getattr(before, name):
            problems.append(
                f"left: {name} grew from {getattr(before, name)} to {getattr(after, name)}"
            )
    if after.total > before.total + FD_SLACK:
        problems.append(
            f"left: {after.total} fds after, {before.total} warm (slack {FD_SLACK}): "
            f"{before.describe()} -> {after.describe()}"
        )
    if report.rss_drift > RSS_DRIFT_LIMIT:
        problems.append(
            f"left: RSS grew {report.rss_drift / MiB:.1f} MiB (warm "
            f"{report.rss_before / MiB:.1f}, after {report.rss_after / MiB:.1f}; limit "
            f"{RSS_DRIFT_LIMIT / MiB:.0f} MiB)"
        )
    return problems


UNRETRIEVED_AIOHTTP = "Task exception was never retrieved"


def judge_log(server: Server, report: SoakReport) -> list[str]:
    """No error line in the whole log, but one known third-party one (counted apart)."""
    problems: list[str] = []
    for entry in server.logs():
        message = str(entry.get("message", ""))
        if entry.get("level") in ("error", "critical"):
            if message.startswith(UNRETRIEVED_AIOHTTP) and "aiohttp" in message + str(
                entry.get("exception", "")
            ):
                # aiohttp's body writer, when S3 resets a connection mid-request: see
                # `unretrieved_aiohttp` in the report.
                report.unretrieved_aiohttp += 1
                continue
            problems.append(f"log: {message[:200]}")
        if "could not abort" in message:
            problems.append(f"log: {message}")
    return problems


def explain_upstream_failure(
    record: Record, received: list[Received], config: SoakConfig
) -> str | None:
    """None when the fake's record explains this 502/504; else what does not add up.

    The service sends its request ID upstream (`X-Client-Request-Id`) with every attempt."""
    if UPSTREAM_STATUSES.get(record.status or 0) != record.code:
        return f"code {record.code} for status {record.status}"
    attempts = [r for r in received if r.headers.get("x-client-request-id") == record.request_id]
    if not attempts:
        return "the upstream never saw this request"
    timeout = config.openai_timeout_seconds
    kinds = [attempt_kind(attempt, timeout) for attempt in attempts]
    if any(kind.startswith("answered") for kind in kinds):
        return f"an attempt was answered, yet the request failed: {kinds}"
    last = kinds[-1]
    if record.status == 502 and last not in ("429", "500"):
        return f"502 but the last attempt was {last}: {kinds}"
    if record.status == 504 and last not in (HUNG, TOO_SLOW):
        return f"504 but the last attempt was {last}: {kinds}"
    if len(attempts) != config.openai_max_retries + 1 and record.seconds < (
        config.openai_deadline_seconds
    ):
        return f"{len(attempts)} attempts, the SDK should make {config.openai_max_retries + 1}"
    return None


def canary(report: SoakReport, env: SoakEnvironment, sender: Sender) -> None:
    """After all that, the server still answers a plain request of each kind."""
    env.fake.clear_faults()
    plan = [
        Planned(-100, "canary", RAW, "m4a-faststart", 0.0, 4.0, True, False, None),
        Planned(-101, "canary", RAW, "ogg-opus", 0.0, 4.0, False, False, None),
        Planned(-102, "canary", RAW, "caf-aac-pakt-last", 0.0, 4.0, True, False, None),
    ]
    for record in anyio.run(run_batch, sender, plan, 3):
        if record.status != 200 or record.error:
            report.problems.append(f"canary: {describe(record)}")
