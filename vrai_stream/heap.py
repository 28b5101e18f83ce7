"""Give memory back to the OS once the server goes idle.

A job's large buffers (a 5 MiB S3 part, an input copy that fills toward
`VRAI_DEBUG_BUFFER_BYTES` while S3 is down, a spooled MP3) are freed when it ends, but glibc
keeps freed memory in its heap when smaller live objects sit above it, and the RSS stays at
its high-water mark: after S3 outages the soak (`bench/soak.py`) saw the RSS settle 30 to 50
MiB above its warm level while Python's own allocations had not grown (tracemalloc), and
`malloc_trim(0)` gave it back at once.  So when no job has run for a moment after some did,
the heap is trimmed once, in a worker thread (it walks the heap: a few milliseconds).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import anyio
import anyio.to_thread

from vrai_stream.admission import Admission

IDLE_SECONDS = 2.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None elsewhere (musl, macOS): then there is nothing to do."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc's, on Linux
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    result: Callable[[int], int] = trim
    return result


async def trim_when_idle(admission: Admission, idle_seconds: float = IDLE_SECONDS) -> None:
    """Run for the server's life: trim the heap once after each busy spell."""
    trim = _malloc_trim()
    if trim is None:
        return
    trimmed_at = admission.finished
    while True:
        await anyio.sleep(idle_seconds)
        if admission.running or admission.waiting or admission.finished == trimmed_at:
            continue
        trimmed_at = admission.finished
        await anyio.to_thread.run_sync(trim, 0)
