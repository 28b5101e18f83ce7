"""Uploads over a link that drops: resuming (the resumable-upload draft, as URLSession
does) beside starting again from zero, in the same run (issue 15).

A 30 MB recording (`../shared/speech/stitched.wav`, 331 s of real speech, as 48 kHz
16-bit WAV: what a voice memo in LPCM weighs) goes to the service through
`tests/support/flaky_link.FlakyLink`, a TCP link that resets every connection after so many
seconds, at 2 MB/s (16 Mbit/s, a fair 4G uplink).  Two links:

1. **drops every 5 s**: each connection carries at most 10 MB of the 30;
2. **one drop at 90%**: the issue's example, a recording lost when nearly sent.

Each is sent two ways, alternating: resumed (`ResumableUploader`: on each drop, `HEAD` for
the offset and `PATCH` the rest) and restarted (the plain `POST` again from its first byte,
as any client without resumption does, up to 8 attempts).  Reported: time from the first
byte to the transcript, bytes sent and requests made; ratios resumed / restarted.  The
service runs the local model (`tiny.en`) in segments mode, so the transcript is ready about
a second after the last byte either way: what differs is how long the bytes take.

Run: .venv/bin/python -m bench.resume            (3 repeats, about 5 minutes)
     .venv/bin/python -m bench.resume --quick    (one repeat)
Writes bench/results/resume.json and resume.md.  Needs Debian's ffmpeg, the `local` extra
and ../shared/speech/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio

from tests.support.flaky_link import FlakyLink
from tests.support.resumable_client import ResumableUploader, exchange

from .common import (
    RESULTS_DIR,
    describe_machine,
    machine,
    markdown_table,
    median,
    run_ffmpeg,
    running_service,
    write_json,
)

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "speech" / "stitched.wav"
PACE = 2_000_000
"""Bytes a second the phone sends: 16 Mbit/s."""
RESTART_ATTEMPTS = 8
WINDOW = "/v1/transcriptions?fromTime=0&toTime=400"
HEADERS = {"Content-Type": "audio/wav"}


@dataclass(frozen=True)
class Link:
    name: str
    drop_every: float | None
    """Seconds each connection lives, or None."""
    drop_at: float | None
    """Where, as a share of the recording, the first connection is cut, or None."""


LINKS = (
    Link("drops every 5 s", 5.0, None),
    Link("one drop at 90%", None, 0.9),
)


@dataclass
class Outcome:
    link: str
    way: str
    repeat: int
    status: int | None
    seconds: float
    """From the first byte to the answer, or to giving up."""
    bytes_sent: int
    requests: int
    words: int
    """Words in the transcript: a check that it is the recording's."""


async def send_resumed(url: str, data: bytes, link: Link) -> tuple[int | None, bytes, int, int]:
    uploader = ResumableUploader(
        pace=PACE, cuts=[link.drop_at] if link.drop_at else [], attempts=30, backoff=0.05
    )
    reply = await uploader.upload(f"{url}{WINDOW}", data, headers=HEADERS)
    return reply.status, reply.body, uploader.bytes_sent, len(uploader.requests)


async def send_restarted(url: str, data: bytes, link: Link) -> tuple[int | None, bytes, int, int]:
    sent = 0
    for attempt in range(RESTART_ATTEMPTS):
        cut = int(len(data) * link.drop_at) if link.drop_at and attempt == 0 else None
        reply = await exchange(
            "POST", f"{url}{WINDOW}", HEADERS, data, pace=PACE, cut_after_bytes=cut
        )
        sent += reply.sent
        if not reply.cut:
            return reply.status, reply.body, sent, attempt + 1
    return None, b"", sent, RESTART_ATTEMPTS


async def measure(server_port: int, data: bytes, link: Link, way: str, repeat: int) -> Outcome:
    send = send_resumed if way == "resumed" else send_restarted
    async with FlakyLink(("127.0.0.1", server_port), after_seconds=link.drop_every) as flaky:
        started = time.perf_counter()
        status, body, sent, requests = await send(flaky.url, data, link)
        seconds = time.perf_counter() - started
    return Outcome(link.name, way, repeat, status, seconds, sent, requests, _words(body))


def _words(body: bytes) -> int:
    try:
        return len(json.loads(body)["transcription"].split())
    except (ValueError, KeyError, TypeError):
        return 0


def make_recording(folder: Path, seconds: float | None) -> Path:
    path = folder / "voice-memo.wav"
    trim = ["-t", str(seconds)] if seconds else []
    run_ffmpeg(
        "-y", "-i", str(SPEECH), *trim, "-ar", "48000", "-ac", "1", "-c:a", "pcm_s16le", str(path)
    )
    return path


def summarise(outcomes: Sequence[Outcome], size: int) -> list[dict[str, Any]]:
    rows = []
    for link in LINKS:
        by_way = {
            way: [o for o in outcomes if o.link == link.name and o.way == way]
            for way in ("resumed", "restarted")
        }
        row: dict[str, Any] = {"link": link.name}
        for way, runs in by_way.items():
            done = [o for o in runs if o.status == 200]
            row[way] = {
                "answered": f"{len(done)}/{len(runs)}",
                "seconds": median([o.seconds for o in done]) if done else None,
                "gave_up_after_seconds": median([o.seconds for o in runs if o.status != 200])
                if len(done) < len(runs)
                else None,
                "megabytes_sent": median([o.bytes_sent for o in runs]) / 1e6,
                "requests": median([o.requests for o in runs]),
                "words": median([o.words for o in done]) if done else 0,
            }
        resumed, restarted = row["resumed"], row["restarted"]
        row["time_ratio"] = (
            resumed["seconds"] / restarted["seconds"]
            if resumed["seconds"] and restarted["seconds"]
            else None
        )
        row["bytes_ratio"] = resumed["megabytes_sent"] / restarted["megabytes_sent"]
        row["recording_megabytes"] = size / 1e6
        rows.append(row)
    return rows


def render(rows: Sequence[dict[str, Any]]) -> str:
    def cell(way: dict[str, Any]) -> str:
        if way["seconds"] is None:
            return f"never ({way['answered']}; gave up after {way['gave_up_after_seconds']:.1f} s)"
        return f"{way['seconds']:.1f} s ({way['answered']})"

    table = [
        [
            row["link"],
            cell(row["resumed"]),
            cell(row["restarted"]),
            "∞ (restarting never finishes)"
            if row["time_ratio"] is None
            else f"{row['time_ratio']:.2f}x",
            f"{row['resumed']['megabytes_sent']:.1f} / {row['restarted']['megabytes_sent']:.1f} MB",
            f"{row['resumed']['requests']:g} / {row['restarted']['requests']:g}",
            f"{row['resumed']['words']:g} / {row['restarted']['words']:g}",
        ]
        for row in rows
    ]
    return markdown_table(
        [
            "link (2 MB/s)",
            "resumed: to the transcript",
            "restarted from zero",
            "time, resumed / restarted",
            "sent, resumed / restarted",
            "requests",
            "words in the transcript",
        ],
        table,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 3
    info = machine()
    print(describe_machine(info), flush=True)
    outcomes: list[Outcome] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vrai-bench-resume-") as tmp:
        folder = Path(tmp)
        data = make_recording(folder, None).read_bytes()
        print(f"recording: {len(data) / 1e6:.1f} MB, link {PACE / 1e6:g} MB/s", flush=True)
        with running_service(
            "resume", folder, HF_HUB_OFFLINE="1", VRAI_DEBUG_STORE="off", VRAI_TRANSCRIBER="local"
        ) as server:
            port = int(server.url.rsplit(":", 1)[1])
            for repeat in range(repeats):
                for link in LINKS:
                    ways = ("resumed", "restarted") if repeat % 2 == 0 else ("restarted", "resumed")
                    for way in ways:
                        outcome = anyio.run(measure, port, data, link, way, repeat)
                        outcomes.append(outcome)
                        print(f"  {describe(outcome)}", flush=True)
                        server.wait_idle(60)
    rows = summarise(outcomes, len(data))
    info["elapsed_minutes"] = round((time.monotonic() - started) / 60, 1)
    text = render(rows)
    print(text)
    write_json(
        "resume.json",
        {
            "machine": info,
            "pace_bytes_per_second": PACE,
            "restart_attempts": RESTART_ATTEMPTS,
            "summary": rows,
            "runs": [asdict(o) for o in outcomes],
        },
    )
    header = (
        f"`.venv/bin/python -m bench.resume` ({info['elapsed_minutes']} min, {repeats} repeats; "
        f"{describe_machine(info)}; {len(data) / 1e6:.1f} MB at {PACE / 1e6:g} MB/s)\n\n"
    )
    (RESULTS_DIR / "resume.md").write_text(header + text + "\n")
    print(f"wrote {RESULTS_DIR / 'resume.json'}, {RESULTS_DIR / 'resume.md'}")


def describe(outcome: Outcome) -> str:
    return (
        f"{outcome.link:16} {outcome.way:9} -> {outcome.status} after {outcome.seconds:.1f} s, "
        f"{outcome.bytes_sent / 1e6:.1f} MB sent in {outcome.requests} requests, "
        f"{outcome.words} words"
    )


if __name__ == "__main__":
    main()
