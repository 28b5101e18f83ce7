"""The memory budget: the job limit, queue and spool share come from the machine's memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from vrai_stream.memory_plan import (
    HEADROOM,
    MAX_JOBS_CEILING,
    detect_memory_limit,
    plan_memory,
)
from vrai_stream.settings import MiB, Settings

PRODUCTION = {"OPENAI_API_KEY": "sk-test", "VRAI_DEBUG_BUCKET": "copies"}


def test_the_limit_comes_from_the_setting_then_cgroup_then_fly_then_meminfo(
    tmp_path: Path,
) -> None:
    cgroup = tmp_path / "memory.max"
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1000000 kB\nMemFree: 1 kB\n")
    settings = Settings.from_env({})
    cgroup.write_text("max\n")
    assert detect_memory_limit(settings, {}, cgroup, meminfo) == (1000000 * 1024, "/proc/meminfo")
    fly = {"FLY_VM_MEMORY_MB": "1024"}
    assert detect_memory_limit(settings, fly, cgroup, meminfo) == (1024 * MiB, "FLY_VM_MEMORY_MB")
    cgroup.write_text("536870912\n")
    assert detect_memory_limit(settings, fly, cgroup, meminfo) == (512 * MiB, "cgroup memory.max")
    explicit = Settings.from_env({"VRAI_MEMORY_LIMIT_BYTES": str(768 * MiB)})
    assert detect_memory_limit(explicit, fly, cgroup, meminfo)[0] == 768 * MiB


@pytest.mark.parametrize("limit_mb", [256, 512, 1024, 2048, 8192])
@pytest.mark.parametrize("env", [PRODUCTION, {}], ids=["openai+s3", "local+dir"])
def test_the_derived_jobs_fit_the_budget(limit_mb: int, env: dict[str, str]) -> None:
    settings = Settings.from_env(env)
    plan = plan_memory(settings, limit_mb * MiB, "test")
    committed = plan.reserved_bytes + plan.max_jobs * plan.per_job_bytes
    if plan.max_jobs > 1:  # one job is always allowed, even on a machine too small for it
        assert committed <= limit_mb * MiB * HEADROOM
    assert 1 <= plan.max_jobs <= MAX_JOBS_CEILING
    assert plan.max_queue == plan.max_jobs
    assert plan.spool_memory_total_bytes == plan.max_jobs * settings.spool_memory_bytes


def test_a_1gb_fly_machine_with_openai_and_s3() -> None:
    plan = plan_memory(Settings.from_env(PRODUCTION), 1024 * MiB, "FLY_VM_MEMORY_MB")
    assert plan.max_jobs == 7
    # Every job at its worst (ffmpeg at its cap, S3 buffer full, spool at its cap) still
    # leaves a quarter free.
    assert plan.reserved_bytes + plan.max_jobs * plan.per_job_bytes < 0.75 * 1024 * MiB


def test_the_local_model_leaves_fewer_jobs_on_a_small_machine() -> None:
    local = plan_memory(Settings.from_env({}), 512 * MiB, "test")
    remote = plan_memory(Settings.from_env(PRODUCTION), 512 * MiB, "test")
    assert local.max_jobs < remote.max_jobs


def test_lifting_the_ffmpeg_cap_is_planned_for() -> None:
    capped = plan_memory(Settings.from_env(PRODUCTION), 2048 * MiB, "test")
    uncapped_settings = Settings.from_env({**PRODUCTION, "VRAI_FFMPEG_MEMORY_BYTES": "0"})
    uncapped = plan_memory(uncapped_settings, 2048 * MiB, "test")
    assert uncapped_settings.ffmpeg_memory_bytes is None
    assert uncapped.max_jobs < capped.max_jobs


def test_explicit_settings_win() -> None:
    settings = Settings.from_env(
        {"VRAI_MAX_JOBS": "3", "VRAI_MAX_QUEUE": "0", "VRAI_SPOOL_MEMORY_TOTAL_BYTES": "1000"}
    )
    plan = plan_memory(settings, 1024 * MiB, "test")
    assert (plan.max_jobs, plan.max_queue, plan.spool_memory_total_bytes) == (3, 0, 1000)
