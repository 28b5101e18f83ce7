"""The soak's short variant: ~50 requests with faults all around, nothing unexpected, nothing left.

The engine is `tests/support/soak_engine.py` (shared with the full run, `bench/soak.py`): a real
server with S3 debug copies on (moto behind a proxy that is stopped twice),
`VRAI_TRANSCRIBER=openai` against `FakeOpenAI` injecting 429s, 500s, slow answers and hangs,
phone recordings of every format and layout, clients that reset mid-upload, truncated and
corrupted files, windows past the end.  Every answer is judged against what its request deserved
(a 502/504 only where the fake's record shows every attempt failed); then no child, no temp
file, no incomplete multipart upload, no descriptor beyond the warm baseline's pools, and RSS
within 20 MiB of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .support.phone_media import PhoneFile, phone_files
from .support.soak_engine import SoakConfig, run_soak


@pytest.fixture(scope="session")
def phones(media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhoneFile]:
    # The same folder as test_phone_formats': the matrix is built once per session.
    return phone_files(tmp_path_factory.getbasetemp() / "phones", media / "sentence.wav")


@pytest.mark.alone
def test_short_soak_keeps_working_and_leaves_nothing(
    phones: dict[str, PhoneFile], tmp_path: Path
) -> None:
    config = SoakConfig(
        requests=48, concurrency=8, warmup_requests=20, outage_seconds=2.5, settle_seconds=2.0
    )
    report = run_soak(config, phones, tmp_path, log=print)
    print(report.table())
    assert report.problems == [], "\n".join(report.problems)

    # The run really was the mix it claims to be.
    outcomes = report.outcomes()
    kinds = {record.planned.kind for record in report.records}
    assert kinds == {"mp3", "large", "transcribe", "past_end", "corrupt", "disconnect"}
    assert len(report.outage_windows) == 2
    assert outcomes["422 no_audio_in_window"] >= 1
    assert outcomes["200"] >= config.requests // 2
    assert sum(report.upstream_attempts[kind] for kind in ("429", "500")) >= 1
    assert report.server_codes["client_disconnected"] >= 1
    during_outage = [
        record
        for record in report.records
        if any(
            record.started < end and record.ended > start for start, end in report.outage_windows
        )
    ]
    assert during_outage, "no request ran while S3 was down"
