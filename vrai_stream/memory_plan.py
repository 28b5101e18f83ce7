"""How many jobs fit in this machine's memory, derived from its limit.

A 1 GB Fly machine must not be pushed past its memory by any mix of uploads, so the job
limit, the queue and the spools' share are computed from the memory the machine has,
unless the settings fix them.  The README walks through the arithmetic.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vrai_stream.settings import MiB, Settings

CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
MEMINFO = Path("/proc/meminfo")

HEADROOM = 0.75
"""Plan for three quarters of the limit: the kernel, page cache and allocator need the rest."""

PROCESS_BASE_BYTES = 80 * MiB
"""Python, uvicorn, the app, and the `openai` and `aioboto3` SDKs once imported."""

FFMPEG_SHARED_BYTES = 40 * MiB
"""ffmpeg's libraries, mapped once and shared by every ffmpeg process."""

LOCAL_MODEL_BYTES = 320 * MiB
"""faster-whisper with `tiny.en` loaded, plus one transcription's working memory."""

LOCAL_BATCH_CLIP_BYTES = 20 * MiB
"""Each clip of a batch beyond the first (`VRAI_WHISPER_BATCH_SIZE`): the decoder's cache of
the clip's encoded audio.  Measured with tiny.en: 133 MiB more at 8 clips than at one (the
encoder runs a clip at a time; batched, it cost 467 MiB more)."""

FFMPEG_UNCAPPED_BYTES = 256 * MiB
"""What to assume of one ffmpeg when `VRAI_FFMPEG_MEMORY_BYTES=0` lifts its cap.

Typically one ffmpeg has 10-12 MiB of its own; the plan counts the worst an upload can
make it take, which is the cap.
"""

JOB_OVERHEAD_BYTES = 2 * MiB
"""Sniffed head, socket and pipe buffers, and Python objects of one job."""

ANSWER_RECORDING_BYTES = 4 * MiB
"""One job's answer recorded for a retry with its `Idempotency-Key`: longer ones are not kept,
and stop being recorded here (`uploads.idempotency`)."""

KEPT_ANSWERS_BYTES = 32 * MiB
"""Every answer kept for `Idempotency-Key` retries together, oldest dropped first."""

MAX_JOBS_CEILING = 16
"""Beyond this, jobs only share the CPU more thinly: more memory buys nothing."""


@dataclass(frozen=True)
class MemoryPlan:
    limit_bytes: int
    limit_source: str
    reserved_bytes: int
    per_job_bytes: int
    max_jobs: int
    max_queue: int
    spool_memory_total_bytes: int

    def describe(self) -> dict[str, int | str]:
        return {
            "limitBytes": self.limit_bytes,
            "limitSource": self.limit_source,
            "reservedBytes": self.reserved_bytes,
            "perJobBytes": self.per_job_bytes,
            "maxJobs": self.max_jobs,
            "maxQueue": self.max_queue,
            "spoolMemoryTotalBytes": self.spool_memory_total_bytes,
        }


def detect_memory_limit(
    settings: Settings,
    env: Mapping[str, str] | None = None,
    cgroup_file: Path = CGROUP_MEMORY_MAX,
    meminfo_file: Path = MEMINFO,
) -> tuple[int, str]:
    """The memory this process may use, and where that figure came from."""
    env = os.environ if env is None else env
    if settings.memory_limit_bytes is not None:
        return settings.memory_limit_bytes, "VRAI_MEMORY_LIMIT_BYTES"
    cgroup = _read(cgroup_file)
    if cgroup and cgroup != "max" and cgroup.isdigit():
        return int(cgroup), "cgroup memory.max"
    fly = env.get("FLY_VM_MEMORY_MB", "").strip()
    if fly.isdigit():
        return int(fly) * MiB, "FLY_VM_MEMORY_MB"
    for line in (_read(meminfo_file) or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024, "/proc/meminfo"
    return 1024 * MiB, "assumed"


def per_job_bytes(settings: Settings) -> int:
    debug_buffer = settings.debug_buffer_bytes if settings.debug_store == "s3" else 0
    # The output spool, and the copy made of it to count frames and hand to the copies.
    spool = 2 * settings.spool_memory_bytes
    ffmpeg = settings.ffmpeg_memory_bytes or FFMPEG_UNCAPPED_BYTES
    return ffmpeg + JOB_OVERHEAD_BYTES + ANSWER_RECORDING_BYTES + spool + debug_buffer


def reserved_bytes(settings: Settings) -> int:
    batch = LOCAL_BATCH_CLIP_BYTES * (settings.whisper_batch_size - 1)
    local_model = (LOCAL_MODEL_BYTES + batch) * settings.whisper_concurrency
    return (
        PROCESS_BASE_BYTES
        + FFMPEG_SHARED_BYTES
        + KEPT_ANSWERS_BYTES
        + (local_model if settings.transcriber == "local" else 0)
    )


def plan_memory(settings: Settings, limit_bytes: int, limit_source: str) -> MemoryPlan:
    """Jobs and queue that fit `limit_bytes`; settings that are set explicitly win."""
    reserved = reserved_bytes(settings)
    per_job = per_job_bytes(settings)
    usable = int(limit_bytes * HEADROOM) - reserved
    derived_jobs = max(1, min(MAX_JOBS_CEILING, usable // per_job))
    max_jobs = settings.max_jobs if settings.max_jobs is not None else derived_jobs
    max_queue = settings.max_queue if settings.max_queue is not None else max_jobs
    spool_total = settings.spool_memory_total_bytes
    if spool_total is None:
        spool_total = max_jobs * settings.spool_memory_bytes
    return MemoryPlan(
        limit_bytes=limit_bytes,
        limit_source=limit_source,
        reserved_bytes=reserved,
        per_job_bytes=per_job,
        max_jobs=max_jobs,
        max_queue=max_queue,
        spool_memory_total_bytes=spool_total,
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
