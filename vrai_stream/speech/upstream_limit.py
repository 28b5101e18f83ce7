"""How many transcription calls may be in flight to one upstream at once, found as it runs.

OpenAI takes as many calls as it is sent, each in about the same time; a self-hosted server
on a few cores does not: past its cores, every call waits for the others, and past its
memory or threads the whole server slows.  No fixed number suits both.  So the limit is
found as TCP finds a link's rate (AIMD): it grows while calls take about what they took
when nothing waited, and shrinks by a fraction when they take far longer, or when the
upstream says it is overloaded (`429`, `503`) or does not answer in time.  The configured
concurrency is a ceiling it never passes.

What a call took is measured as seconds of waiting per second of audio, each call counted
as `CALL_OVERHEAD_SECONDS` more: Whisper encodes a whole 30 s window however short the
segment, and every call has its round trip, so a short segment would otherwise look like a
congested one.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from vrai_stream import metrics

logger = logging.getLogger(__name__)

START = 2
"""Calls in flight before anything is measured: a congested start must still show a calm
call to compare with, and the limit doubles every round trip until the first congestion."""

CALL_OVERHEAD_SECONDS = 10.0
"""What one call costs beyond its audio, in seconds of audio (see the module's docstring)."""

CONGESTED = 2.0
"""A call this many times slower (per second of audio) than the calmest one recently is a
sign that calls are queueing upstream."""

DECREASE = 0.7
"""What is left of the limit after congestion: CUBIC's fraction, gentler than Reno's half,
since a self-hosted server recovers as soon as the extra calls end."""

REFUSED_PROBE_ROUNDS = 16
"""Round trips between tries of a limit the upstream refused (`429`, `503`): often enough to
find room it gains, seldom enough that a hard cap costs few refused calls."""

HISTORY = 64
"""Calls remembered for the calmest one: enough to span several rounds at any limit, few
enough that an upstream grown slower for good is learnt again."""


@dataclass(frozen=True)
class LimitState:
    """What the limit stands at, for logs, metrics and tests."""

    limit: int
    in_flight: int
    ceiling: int
    adaptive: bool
    calmest: float | None
    """The lowest seconds of waiting per second of audio recently measured."""


class UpstreamLimit:
    """The calls in flight to one upstream, for every job of the process together."""

    def __init__(
        self,
        ceiling: int,
        *,
        adaptive: bool = True,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self._ceiling = ceiling
        self._adaptive = adaptive
        self._clock = clock
        self._window = float(min(START, ceiling) if adaptive else ceiling)
        self._slow_start = adaptive
        self._limiter = anyio.CapacityLimiter(int(self._window))
        metrics.UPSTREAM_LIMIT.set(self._limiter.total_tokens)
        self._costs: deque[float] = deque(maxlen=HISTORY)
        self._events = 0
        """Calls started and ended so far: the limit's clock, in round trips."""
        self._refused_at: int | None = None
        """The limit at which the upstream last refused a call, until a limit above it holds."""
        self._last_decrease = 0
        """`_events` when the limit last shrank.  A call that started before then was slowed
        by a congestion already answered; a sign with no call started or ended since is
        part of it too (the SDK's own retries go on in the call's slot)."""

    @property
    def state(self) -> LimitState:
        return LimitState(
            limit=int(self._limiter.total_tokens),
            in_flight=self._limiter.borrowed_tokens,
            ceiling=self._ceiling,
            adaptive=self._adaptive,
            calmest=min(self._costs, default=None),
        )

    @asynccontextmanager
    async def call(self, audio_seconds: float) -> AsyncIterator[None]:
        """Hold one of the upstream's slots for a call on `audio_seconds` of audio, and learn
        from how long it took; a call that fails teaches nothing (but see `overloaded`)."""
        async with self._limiter:
            self._events += 1
            number = self._events
            started = self._clock()
            try:
                with metrics.UPSTREAM_IN_FLIGHT.track_inprogress():
                    yield
            finally:
                self._events += 1
            cost = (self._clock() - started) / (audio_seconds + CALL_OVERHEAD_SECONDS)
            self._finished(number, cost)

    def overloaded(self, sign: str) -> None:
        """The upstream said so (`sign`: its status, `429` or `503`), or did not answer in
        time (`timeout`): shrink, unless nothing started or ended since it last shrank."""
        if sign != "timeout":
            self._refused_at = int(self._limiter.total_tokens)
        self._congested(self._events, sign)

    def _finished(self, number: int, cost: float) -> None:
        if not self._adaptive:
            return
        self._costs.append(cost)
        if cost > CONGESTED * min(self._costs):
            self._congested(number, "slow")
        elif not self._full():
            return  # a limit that calls do not reach says nothing of the upstream's room
        elif self._slow_start:
            self._resize(self._window + 1)  # one more per call: doubles every round trip
        elif self._refused_at is not None and self._window + 1 >= self._refused_at:
            self._resize(self._window + 1 / (self._window * REFUSED_PROBE_ROUNDS))
        else:
            self._resize(self._window + 1 / self._window)  # one more per round trip

    def _congested(self, number: int, sign: str) -> None:
        metrics.UPSTREAM_OVERLOADS.labels(sign).inc()
        if not self._adaptive or number <= self._last_decrease:
            return
        self._last_decrease = self._events
        self._slow_start = False
        before = self._limiter.total_tokens
        self._resize(self._window * DECREASE)
        logger.info(
            "upstream limit lowered",
            extra={"sign": sign, "limit": self._limiter.total_tokens, "was": before},
        )

    def _full(self) -> bool:
        """Every slot taken (this call's included) or calls waiting for one."""
        limiter = self._limiter
        return (
            limiter.borrowed_tokens >= limiter.total_tokens
            or limiter.statistics().tasks_waiting > 0
        )

    def _resize(self, window: float) -> None:
        self._window = min(max(window, 1.0), float(self._ceiling))
        limit = math.floor(self._window)
        if self._refused_at is not None and limit > self._refused_at:
            self._refused_at = None  # the upstream has room again
        if limit != self._limiter.total_tokens:
            self._limiter.total_tokens = limit
            metrics.UPSTREAM_LIMIT.set(limit)
