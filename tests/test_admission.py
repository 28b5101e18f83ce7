"""Admission under a burst: every free slot and queue place is used, the rest refused."""

from __future__ import annotations

import anyio
import pytest

from vrai_stream import errors
from vrai_stream.admission import Admission

pytestmark = pytest.mark.anyio


async def test_a_burst_fills_every_slot_and_queue_place() -> None:
    admission = Admission(max_jobs=4, max_queue=4, queue_timeout_seconds=10, retry_after_seconds=5)
    served = refused = 0

    async def job() -> None:
        nonlocal served, refused
        try:
            async with admission.slot():
                await anyio.sleep(0.2)
            served += 1
        except errors.Busy:
            refused += 1

    async with anyio.create_task_group() as group:
        for _ in range(16):
            group.start_soon(job)
    assert (served, refused) == (8, 8)
