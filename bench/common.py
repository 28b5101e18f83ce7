"""Helpers the bench scripts share: running tools, describing the machine, writing results,
starting servers on loopback and sampling the memory of their process trees.

The scripts use the service from outside, as a user would, so nothing here imports
`vrai_stream`: a benchmark that reached into the package could measure something the
package's users never see.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

# The bench builds on the tests' harness (phone matrix, soak engine, process helpers): the
# scripts run as modules from the repository's root (`python -m bench.memory`), so `tests` is
# importable as it is for pytest.
from tests.support.server import stop_process as stop  # SIGTERM, then SIGKILL

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MiB = 1024 * 1024


def tool(name: str) -> str:
    """The full path of a command-line tool, or a clear exit: nothing can be measured without it."""
    found = shutil.which(name)
    if found is None:
        sys.exit(f"{name} not found on PATH (Debian: apt-get install {name})")
    return found


def ffmpeg_command(*args: str, binary: str | None = None) -> list[str]:
    """An ffmpeg command line that stays quiet and never waits on stdin, as every script runs it.

    `binary` replaces the ffmpeg on PATH (the AMR encoder lives in another build).
    """
    return [binary or tool("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]


def run_ffmpeg(*args: str, binary: str | None = None, timeout: float = 600) -> None:
    """Run ffmpeg quietly, failing loudly: a corpus built from a half-failed run is worthless."""
    subprocess.run(ffmpeg_command(*args, binary=binary), check=True, timeout=timeout)


def first_line(command: Sequence[str]) -> str:
    """The first line a tool prints about itself (its version), or '' when it is missing."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (done.stdout or done.stderr).splitlines()
    return lines[0].strip() if lines else ""


def machine() -> dict[str, Any]:
    """What the figures were measured on; they mean little without it."""
    memory = psutil.virtual_memory()
    return {
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpus_online": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_total_bytes": memory.total,
        "memory_available_bytes": memory.available,
        "kernel": platform.release(),
        "load_average_1_5_15": load_average(),
        "cpu_pressure_some_avg10_60_300": cpu_pressure(),
        "python": platform.python_version(),
        "ffmpeg": first_line([tool("ffmpeg"), "-version"]),
        "git": _git_state(),
    }


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    return [round(load, 2) for load in os.getloadavg()]


def cpu_pressure() -> list[float] | None:
    """Share of time some task waited for a CPU (PSI, %), over 10 s, 60 s and 300 s.

    Clearer than the load average on a shared machine: 50 means runnable work waited half
    the time.  None where the kernel has no PSI.
    """
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    return [float(fields[key]) for key in ("avg10", "avg60", "avg300") if key in fields]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_state() -> str:
    """The commit measured, and whether the working tree differed from it."""
    commit = first_line(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "vrai_stream"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{commit}{' (vrai_stream/ modified)' if status else ''}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write results where the README points; the folder is git-ignored except its .keep."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub table, right-aligning every column but the first (they hold numbers)."""
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def describe_machine(info: dict[str, Any]) -> str:
    return (
        f"{info['cpus_usable']} CPUs ({info['cpu_model']}), "
        f"{info['memory_total_bytes'] / 2**30:.1f} GiB RAM, Linux {info['kernel']}, "
        f"Python {info['python']}, {info['ffmpeg']}, commit {info['git']}"
    )


# --- servers on loopback ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrubbed_env(**overrides: str) -> dict[str, str]:
    """This environment without any setting that would change what is measured, plus
    `overrides`: a stray `VRAI_*` or `AWS_*` in the caller's shell must not skew a run."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VRAI_", "OPENAI_", "AWS_")) and key != "BUCKET_NAME"
    }
    env.update(PYTHONUNBUFFERED="1", **overrides)
    return env


@dataclass
class ServerProcess:
    """A server this script started: its URL, process, temp folder and log file."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    tmp_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def request_logs(self) -> dict[str, dict[str, Any]]:
        """Every request's own log line (`request`, with server-side timings), by id."""
        found = {}
        for entry in self.log_entries():
            request = entry.get("request")
            if isinstance(request, dict) and "requestId" in request:
                found[str(request["requestId"])] = request
        return found

    def busy(self) -> bool:
        """True while a child (ffmpeg) or a temp file of a finished request is still there."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        return bool(children) or any(self.tmp_dir.iterdir())

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Let the last request's ffmpeg and files go, so the next one starts from idle."""
        deadline = time.monotonic() + timeout
        while self.busy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: a child or temp file outlived its request")
            time.sleep(0.05)


@contextlib.contextmanager
def running_helper(
    args: Sequence[str], log_path: Path, ready: Callable[[], object], timeout: float = 60
) -> Iterator[subprocess.Popen[bytes]]:
    """`python ARGS` from the repository's root (a stand-in upstream, say), in a process of its
    own so that its CPU is its own; waited for until `ready()` stops failing to connect, and
    stopped on the way out."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, *args], cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.TransportError):
                ready()
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not start: {log_path.read_text()}")
            time.sleep(0.05)
        yield process
    finally:
        stop(process)


@contextlib.contextmanager
def running_server(
    name: str,
    command: Sequence[str],
    env: Mapping[str, str],
    folder: Path,
    *,
    wait: bool = True,
) -> Iterator[ServerProcess]:
    """Start `command` (which must listen on the port in `env["PORT"]`), wait until its
    /health says the transcriber is ready, and stop it on the way out.

    Ready means warmed up: a model still loading in the background would steal the CPU
    from the first requests and charge its memory to them.  With `wait=False` the caller
    calls `wait_ready` itself, so several servers can start at once.
    """
    tmp_dir = folder / name / "tmp"
    tmp_dir.mkdir(parents=True)
    log_path = folder / name / "server.log"
    full_env = {**env, "VRAI_TMP_DIR": str(tmp_dir), "TMPDIR": str(tmp_dir)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command), env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_DIR
        )
    server = ServerProcess(name, f"http://127.0.0.1:{env['PORT']}", process, tmp_dir, log_path)
    try:
        if wait:
            wait_ready(server)
        yield server
    finally:
        stop(process)


@contextlib.contextmanager
def running_service(
    name: str, folder: Path, *, wait: bool = True, **env: str
) -> Iterator[ServerProcess]:
    """`python -m vrai_stream.cli serve` on a free loopback port, scrubbed environment plus
    `env`: one way to start the service, so every script measures the same process."""
    port = str(free_port())
    command = [sys.executable, "-m", "vrai_stream.cli", "serve", "--port", port]
    with running_server(name, command, scrubbed_env(PORT=port, **env), folder, wait=wait) as server:
        yield server


def wait_ready(server: ServerProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited at start-up:\n{server.log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError, ValueError):
            health = httpx.get(f"{server.url}/health", timeout=1)
            if health.status_code == 200 and health.json().get("transcriberReady", True):
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready in {timeout:g} s:\n{server.log_path.read_text()}")


# --- memory of a process tree -------------------------------------------------------------


def tree_rss(root: psutil.Process, root_name: str) -> int:
    """RSS of a process and all its descendants, summed (shared library pages count twice).

    A child caught between fork and exec still maps the parent's image and would count the
    parent twice for a millisecond: children with the parent's name are skipped.
    """
    try:
        total: int = root.memory_info().rss
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if child.name() != root_name:
                total += child.memory_info().rss
    return total


def tree_pss(root: psutil.Process, root_name: str) -> int:
    """PSS of a process tree: shared pages (ffmpeg's libraries) split among their users.

    Closer than RSS to what the kernel charges a cgroup, which counts each page once.
    Reading it walks every mapping (`smaps_rollup`), so it is sampled less often.
    """
    total = 0
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        total += root.memory_full_info().pss
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if child.name() != root_name:
                    total += child.memory_full_info().pss
    return total


class TreePeakSampler:
    """The peak RSS (and, with `pss`, PSS) of process trees, sampled in a thread.

    A thread, not the event loop, so a busy upload loop cannot delay the samples.  RSS
    every `interval` s, PSS every fifth sample; each tree's peaks are kept apart:
    `peaks[pid]`, `pss_peaks[pid]`.
    """

    def __init__(self, pids: Sequence[int], interval: float = 0.010, *, pss: bool = False) -> None:
        self._roots = [(psutil.Process(pid), psutil.Process(pid).name()) for pid in pids]
        self._interval = interval
        self._pss = pss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peaks = dict.fromkeys(pids, 0)
        self.pss_peaks = dict.fromkeys(pids, 0)
        self.samples = 0

    def sample(self) -> None:
        for root, name in self._roots:
            self.peaks[root.pid] = max(self.peaks[root.pid], tree_rss(root, name))
            if self._pss and self.samples % 5 == 0:
                self.pss_peaks[root.pid] = max(self.pss_peaks[root.pid], tree_pss(root, name))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> TreePeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def settled_rss(pid: int, seconds: float = 0.5, interval: float = 0.010) -> int:
    """A tree's resting RSS: the median of `seconds` of samples, so one blip cannot skew it."""
    root = psutil.Process(pid)
    name = root.name()
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(tree_rss(root, name))
        time.sleep(interval)
    return int(median(samples))


# --- progress -----------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr: tqdm's when it is installed, else one line redrawn in place."""

    def __init__(self, total: int, description: str = "") -> None:
        self.total = total
        self.done = 0
        self._description = description
        self._started = time.monotonic()
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar: Any = None
        else:
            self._bar = tqdm(total=total, desc=description, unit="req", file=sys.stderr)

    def describe(self, text: str) -> None:
        self._description = text
        if self._bar is not None:
            self._bar.set_description_str(text)
        else:
            self._draw()

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        else:
            self._draw()

    def _draw(self) -> None:
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        elapsed = time.monotonic() - self._started
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{elapsed:5.0f} s  {self._description[:60]:<60}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")


def with_wait(timings: Mapping[str, Any] | None) -> dict[str, Any]:
    """A server's `timings`, with `afterLastByte` (what the client waited after its last
    byte): the service's are marks since admission, so it is `total - receive`; the
    baseline server reports it itself."""
    found = dict(timings or {})
    if "afterLastByte" not in found and "total" in found and "receive" in found:
        found["afterLastByte"] = round(found["total"] - found["receive"], 3)
    return found
