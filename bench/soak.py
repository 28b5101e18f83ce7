"""The soak run, full length: the figures of the README's reliability table.

Hundreds of phone uploads at concurrency 8-16 against a real `vrai-stream serve` with S3
debug copies on (moto behind a proxy that is stopped twice for a few seconds) and
`VRAI_TRANSCRIBER=openai` against an OpenAI-compatible fake that injects 429s, 500s, slow
answers and hangs; 10% of clients reset mid-upload, 10% of files are truncated or
corrupted, some windows lie past the end.  Afterwards: every answer judged, and what the
server left (children, temp files, multipart uploads, descriptors, RSS) measured.

The engine is `tests/support/soak_engine.py`: it is built from the tests' real parts (the fake
OpenAI server, moto and its proxy, the phone matrix), so it lives with them, and the short
variant runs in CI as `tests/test_soak.py`.  This script only sets the size of the run,
prints the table and writes `bench/results/soak.json`.

Run: .venv/bin/python -m bench.soak [--requests 500] [--concurrency 12] [--seed 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.support.soak_engine import FD_SLACK, SoakConfig, build_phones, run_soak

from .common import REPO_DIR, describe_machine, machine, write_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=40, help="warm-up requests")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--outage-seconds", type=float, default=5.0)
    args = parser.parse_args()
    config = SoakConfig(
        requests=args.requests,
        concurrency=args.concurrency,
        warmup_requests=args.warmup,
        seed=args.seed,
        outage_seconds=args.outage_seconds,
    )
    info = machine()
    print(f"machine: {describe_machine(info)}")
    with tempfile.TemporaryDirectory(prefix="vrai-soak-bench-") as folder:
        work = Path(folder)
        started = time.monotonic()
        phones = build_phones(work / "media")
        print(f"phone matrix built in {time.monotonic() - started:.1f} s")
        report = run_soak(config, phones, work / "run", log=print)
    print()
    print(report.table())
    print()
    if report.problems:
        print(f"{len(report.problems)} problems:")
        for problem in report.problems:
            print(f"  - {problem}")
    else:
        print("no problems")
    path = write_json(
        "soak.json",
        {"machine": info, "config": vars(config), "fd_slack": FD_SLACK, **report.summary()},
    )
    print(f"written: {path.relative_to(REPO_DIR)}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
