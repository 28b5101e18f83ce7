"""Start-up from zero: how soon a fresh process answers, and what its first request pays.

Fly stops an idle machine and boots it again on the next request, so every cold start is
a user waiting.  The service promises to listen before its heavy imports (`openai` about a
second, `aioboto3` half a second) and to warm them up in the background.  This script
measures that promise from outside, as Fly's proxy sees it:

(a) exec -> GET /health 200, over N fresh `python -m vrai_stream.cli serve` processes, next
    to an eager variant that imports `openai` and `aioboto3` before calling the same
    `main(["serve", ...])`: the ratio shows what lazy imports buy.  Target: lazy < 0.3 s.
(b) exec -> first completed transcription, sent the moment /health answers: with the
    OpenAI transcriber (against a loopback stub) and with the local `tiny.en` model.
(c) for fly.toml's `auto_stop_machines` (`stop` or `suspend`): a warm request on a running
    server, which is about what a resumed (suspended) machine gives, next to (b), which is
    what a stopped machine's first request pays on top of Fly's own boot.

Every server runs as production does: the OpenAI transcriber (or the local one in (b)),
S3 debug copies (to the stub, which answers S3's HEAD and PUT), no auth.  The stub is an
OpenAI- and S3-compatible HTTP server in this process, on loopback; nothing leaves the
machine.  Figures are with a warm page cache: a stopped Fly machine boots with a cold one.
The checkout's Python has its standard library compiled to .pyc; the python:3.11-slim
image has none, which `.ci/prove-image` measures for the image itself.

Run: .venv/bin/python -m bench.cold_start [--starts 15] [--first-runs 5] [--warm-runs 10]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import describe_machine, machine, markdown_table, median, tool, write_json

HEALTH_TARGET_SECONDS = 0.3
START_TIMEOUT_SECONDS = 60.0
POLL_INTERVAL_SECONDS = 0.002
CHUNK_BYTES = 64 * 1024
STUB_KEY = "sk-cold-start-bench"
STUB_TEXT = "The cold start bench heard a voice note."
SPEECH_TEXT = (
    "Remind me to call the plumber about the kitchen sink, "
    "and move the team meeting to Thursday afternoon."
)
EAGER_WRAPPER = """
import sys
import openai, aioboto3  # what the service defers: imported before it may listen
from vrai_stream.cli import main
sys.exit(main(["serve", "--host", "127.0.0.1", "--port", sys.argv[1]]))
"""


# --- the stub: OpenAI's transcription endpoint and the S3 calls the debug copies make ----------


class StubHandler(http.server.BaseHTTPRequestHandler):
    """Answers like OpenAI and S3 would, instantly: the bench measures the service, not them."""

    protocol_version = "HTTP/1.1"
    transcriptions = 0

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the bench prints its own table."""

    def _body(self) -> bytes:
        """Read the whole request body, sized or chunked (botocore may stream PUTs)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return bytes(data)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self, status: int, body: bytes = b"", kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"d41d8cd98f00b204e9800998ecf8427e"')
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        """S3 HeadBucket, which the service sends once at start-up."""
        self._answer(200)

    def do_PUT(self) -> None:
        """S3 PutObject: a debug copy, accepted and dropped."""
        self._body()
        self._answer(200)

    def do_POST(self) -> None:
        """OpenAI's /v1/audio/transcriptions (verbose_json for Whisper models)."""
        body = self._body()
        if self.path != "/v1/audio/transcriptions":
            self._answer(200, b"<InitiateMultipartUploadResult/>", "application/xml")
            return
        if self.headers.get("Authorization") != f"Bearer {STUB_KEY}":
            self._answer(401, json.dumps({"error": {"message": "bad key"}}).encode())
            return
        StubHandler.transcriptions += 1
        answer: dict[str, Any] = {"text": STUB_TEXT}
        if re.search(rb'name="response_format"\r\n\r\nverbose_json', body):
            answer.update(language="english", duration=0.0, segments=[])
        self._answer(200, json.dumps(answer).encode())


@contextlib.contextmanager
def stub_server() -> Iterator[int]:
    """The stub on a free loopback port, in a thread of this process, for the whole run."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


# --- the service under test -----------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of starting the service: its command line and its transcriber."""

    name: str
    eager: bool
    transcriber: str


LAZY = Variant("lazy", eager=False, transcriber="openai")
EAGER = Variant("eager", eager=True, transcriber="openai")
LOCAL = Variant("lazy-local", eager=False, transcriber="local")


def free_port() -> int:
    """A port nobody listens on now, so parallel runs and other services cannot collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(variant: Variant, port: int) -> list[str]:
    """`python -m vrai_stream.cli serve`, or the wrapper that imports the SDKs first."""
    if variant.eager:
        return [sys.executable, "-c", EAGER_WRAPPER, str(port)]
    return [
        sys.executable,
        "-m",
        "vrai_stream.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def server_env(variant: Variant, port: int, stub_port: int, tmp_dir: Path) -> dict[str, str]:
    """Production's environment: OpenAI and S3 configured (to the stub), so both warm-ups run.

    PYTHONDONTWRITEBYTECODE is dropped: the image's venv holds .pyc files compiled at
    install time, while an editable checkout run with it set recompiles every module of
    the package at each start (about 40 ms here), which no deployed machine pays.
    """
    stub = f"http://127.0.0.1:{stub_port}"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VRAI_", "OPENAI_", "AWS_")) and key != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(
        PORT=str(port),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        VRAI_LOG_LEVEL="warning",
        VRAI_TMP_DIR=str(tmp_dir),
        VRAI_TRANSCRIBER=variant.transcriber,
        VRAI_AUTH="off",
        OPENAI_API_KEY=STUB_KEY,
        OPENAI_BASE_URL=f"{stub}/v1",
        VRAI_DEBUG_STORE="s3",
        VRAI_DEBUG_BUCKET="cold-start-bench",
        AWS_ENDPOINT_URL_S3=stub,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",  # the stub's, not a secret
        AWS_REGION="auto",
        AWS_EC2_METADATA_DISABLED="true",  # never ask a metadata address off this machine
    )
    return env


@dataclass(frozen=True)
class Started:
    """A server just launched: where it listens, its pid, and when exec was asked for."""

    port: int
    t0: float
    pid: int


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc.

    Start-up is CPU-bound, so on a busy machine its CPU time varies far less than its
    wall time: beside each wall figure it tells load from a real change.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def started(variant: Variant, stub_port: int, tmp_dir: Path) -> Iterator[Started]:
    """Start a fresh server; yield its port, pid and the clock reading taken just before Popen.

    The server is stopped with SIGTERM (as Fly stops a machine) and reaped, whatever happens.
    """
    port = free_port()
    log = tmp_dir / "server.log"
    with log.open("wb") as output:
        t0 = time.perf_counter()
        process = subprocess.Popen(
            command(variant, port),
            env=server_env(variant, port, stub_port, tmp_dir),
            cwd=tmp_dir,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Started(port=port, t0=t0, pid=process.pid)
    except Exception:
        sys.stderr.write(log.read_text(errors="replace")[-3000:])
        raise
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_health(port: int, deadline: float) -> None:
    """Poll GET /health until it answers 200: what Fly's proxy and health check wait for.

    Refused connections are retried every 2 ms, so the figure is late by at most that.
    """
    while time.perf_counter() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/health")
            answer = connection.getresponse()
            answer.read()
            if answer.status == 200:
                return
        except OSError:
            time.sleep(POLL_INTERVAL_SECONDS)
        finally:
            connection.close()
    raise TimeoutError(f"no 200 from /health on port {port}")


def transcribe(port: int, audio: bytes) -> dict[str, Any]:
    """One chunked upload of the whole clip, as the app sends it; the JSON answer, checked."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        chunks = (audio[i : i + CHUNK_BYTES] for i in range(0, len(audio), CHUNK_BYTES))
        connection.request(
            "POST",
            "/v1/transcriptions?fromTime=0&summarizationType=none",
            body=chunks,
            encode_chunked=True,
            headers={"Content-Type": "audio/wav"},
        )
        answer = connection.getresponse()
        body = json.loads(answer.read())
    finally:
        connection.close()
    if answer.status != 200 or body.get("success") is not True or not body.get("transcription"):
        raise RuntimeError(f"transcription failed: HTTP {answer.status} {body}")
    return dict(body)


# --- the three measurements -------------------------------------------------------------------


def time_to_health(variant: Variant, stub_port: int, tmp_dir: Path) -> tuple[float, float]:
    """(a) Seconds from just before exec to the first 200 from /health, and CPU used by then."""
    with started(variant, stub_port, tmp_dir) as server:
        wait_for_health(server.port, server.t0 + START_TIMEOUT_SECONDS)
        return time.perf_counter() - server.t0, cpu_seconds(server.pid)


def time_to_first_transcription(
    variant: Variant, stub_port: int, tmp_dir: Path, audio: bytes
) -> tuple[float, float, str]:
    """(b) Seconds from exec to /health, and to a completed transcription sent right after."""
    with started(variant, stub_port, tmp_dir) as server:
        wait_for_health(server.port, server.t0 + START_TIMEOUT_SECONDS)
        health = time.perf_counter() - server.t0
        body = transcribe(server.port, audio)
        return health, time.perf_counter() - server.t0, str(body["transcription"])


def warm_latencies(
    variant: Variant, stub_port: int, tmp_dir: Path, audio: bytes, runs: int
) -> list[float]:
    """(c) Request latencies on a server whose SDKs and model are loaded: a resumed machine."""
    with started(variant, stub_port, tmp_dir) as server:
        wait_for_health(server.port, server.t0 + START_TIMEOUT_SECONDS)
        transcribe(server.port, audio)  # the first request pays the warm-up; it is (b), not (c)
        latencies = []
        for _ in range(runs):
            began = time.perf_counter()
            transcribe(server.port, audio)
            latencies.append(time.perf_counter() - began)
        return latencies


def alternate_health(
    variants: Sequence[Variant], stub_port: int, tmp_dir: Path, starts: int
) -> dict[str, list[tuple[float, float]]]:
    """N fresh starts of each variant, taken in turn, after one discarded start of each.

    Taking them in turn means a burst of load from elsewhere on the machine slows both
    alike, so their ratio holds even when the absolute figures wobble; the discarded start
    fills the page cache and writes the package's .pyc files.
    """
    for variant in variants:
        time_to_health(variant, stub_port, tmp_dir)
    figures: dict[str, list[tuple[float, float]]] = {variant.name: [] for variant in variants}
    for _ in range(starts):
        for variant in variants:
            figures[variant.name].append(time_to_health(variant, stub_port, tmp_dir))
    return figures


# --- inputs, statistics, reporting ------------------------------------------------------------


def speech_clip(folder: Path) -> bytes:
    """A spoken sentence as WAV (espeak-ng), so the local model has real words to find."""
    path = folder / "speech.wav"
    espeak = tool("espeak-ng")
    subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(path), SPEECH_TEXT], check=True)
    return path.read_bytes()


def load_average() -> list[float]:
    """The machine's load now, rounded as `common.machine()` gives it."""
    return [round(load, 2) for load in os.getloadavg()]


def p90(values: Sequence[float]) -> float:
    """The 90th percentile; with fewer than two values, the value itself."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def summary(values: Sequence[float]) -> dict[str, Any]:
    """What the JSON keeps of a series: the raw values too, to spot outliers later."""
    return {
        "median": round(median(values), 4),
        "p90": round(p90(values), 4),
        "runs": len(values),
        "values": [round(value, 4) for value in values],
    }


def row(
    label: str, values: Sequence[float], cpu: Sequence[float] = (), note: str = ""
) -> list[str]:
    """One line of the table: wall-clock median and p90, and the median CPU when known."""
    cpu_cell = f"{median(cpu):.3f}" if cpu else ""
    return [label, f"{median(values):.3f}", f"{p90(values):.3f}", cpu_cell, str(len(values)), note]


def measure(args: argparse.Namespace, stub_port: int, tmp_dir: Path) -> dict[str, Any]:
    """Run (a), (b) and (c) in order, printing progress; return every figure."""
    audio = speech_clip(tmp_dir)
    results: dict[str, Any] = {}

    print(f"(a) exec -> /health 200, {args.starts} starts each", flush=True)
    health = alternate_health((LAZY, EAGER), stub_port, tmp_dir, args.starts)
    for variant in (LAZY, EAGER):
        results[f"health_{variant.name}"] = [wall for wall, _ in health[variant.name]]
        results[f"health_{variant.name}_cpu"] = [cpu for _, cpu in health[variant.name]]

    for name, variant in (("openai", LAZY), ("local", LOCAL)):
        print(f"(b) exec -> first transcription, {name}, {args.first_runs} starts", flush=True)
        runs = [
            time_to_first_transcription(variant, stub_port, tmp_dir, audio)
            for _ in range(args.first_runs)
        ]
        results[f"first_{name}_health"] = [run[0] for run in runs]
        results[f"first_{name}"] = [run[1] for run in runs]
        results[f"first_{name}_text"] = runs[-1][2]
        print(f"(c) warm requests, {name}, {args.warm_runs} requests", flush=True)
        results[f"warm_{name}"] = warm_latencies(variant, stub_port, tmp_dir, audio, args.warm_runs)
    results["audio_bytes"] = len(audio)
    return results


def table(results: dict[str, Any]) -> str:
    """The Markdown table the README quotes."""
    lazy, eager = results["health_lazy"], results["health_eager"]
    ratio = median(lazy) / median(eager)
    cpu_ratio = f"{median(results['health_lazy_cpu']) / median(results['health_eager_cpu']):.2f}"
    met = "met" if median(lazy) < HEALTH_TARGET_SECONDS else "NOT met"
    rows = [
        row(
            "exec → /health 200, lazy (as shipped)",
            lazy,
            results["health_lazy_cpu"],
            f"target < 0.3 s: {met}",
        ),
        row(
            "exec → /health 200, eager (`openai`, `aioboto3` first)",
            eager,
            results["health_eager_cpu"],
        ),
        ["lazy / eager (medians)", f"{ratio:.2f}", "", cpu_ratio, "", ""],
        row("exec → first transcription, OpenAI (stub)", results["first_openai"]),
        row("exec → first transcription, local `tiny.en`", results["first_local"]),
        row("warm request, OpenAI (stub): a resumed machine", results["warm_openai"]),
        row("warm request, local `tiny.en`", results["warm_local"]),
    ]
    headers = ["measurement", "median s", "p90 s", "CPU s", "runs", "note"]
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=15, help="fresh starts per variant in (a)")
    parser.add_argument("--first-runs", type=int, default=5, help="fresh starts per (b) figure")
    parser.add_argument("--warm-runs", type=int, default=10, help="warm requests per (c) figure")
    args = parser.parse_args(argv)

    info = machine()
    print(f"machine: {describe_machine(info)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cold-start-") as folder, stub_server() as stub_port:
        results = measure(args, stub_port, Path(folder))
    # Start-up is CPU-bound: on a shared machine the load says how far to trust the figures.
    load = {"before": info["load_average_1_5_15"], "after": load_average()}
    print()
    print(table(results))
    print(f"\nload average (1, 5, 15 min) before: {load['before']}, after: {load['after']}")
    path = write_json(
        "cold_start.json",
        {
            "machine": info,
            "settings": vars(args),
            "target_health_seconds": HEALTH_TARGET_SECONDS,
            "load_average_1_5_15": load,
            "variants": [asdict(variant) for variant in (LAZY, EAGER, LOCAL)],
            "results": {
                key: summary(value) if isinstance(value, list) else value
                for key, value in results.items()
            },
            "lazy_over_eager": round(
                median(results["health_lazy"]) / median(results["health_eager"]), 3
            ),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
