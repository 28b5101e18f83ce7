"""The upstream's concurrency, found as it runs (`speech/upstream_limit.py`).

First the limit alone, driven by simulated upstreams in this event loop (a parallel one, as
OpenAI; one that runs a few calls at a time and queues the rest, as a self-hosted server on
a few cores): simulated, since what is checked is how the limit answers what calls take,
with times short enough to run in a second.  Then the service itself, against the tests'
OpenAI-compatible server refusing a second call at once with `429`, as a self-hosted
server with a bounded queue does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import anyio
import httpx
import pytest

from vrai_stream.speech.upstream_limit import START, UpstreamLimit

from .support.audio import has_words, run_ffmpeg, speak
from .support.client import chunked
from .support.fake_openai import FakeOpenAI
from .support.server import Server, start_server

pytestmark = [pytest.mark.anyio, pytest.mark.alone]  # it reads latency: a busy CPU is congestion

SEGMENT_SECONDS = 10.0


class SimulatedUpstream:
    """Calls of `seconds` each, `capacity` at a time (None: any number), the rest queued; a
    call that had to queue costs `switch` more (the server picking it up)."""

    def __init__(self, seconds: float, capacity: int | None, *, switch: float = 0.0) -> None:
        self._seconds = seconds
        self._switch = switch
        self._slots = anyio.CapacityLimiter(capacity) if capacity else None
        self.in_flight = 0
        self.most_in_flight = 0

    async def call(self) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self._slots is None:
                await anyio.sleep(self._seconds)
            else:
                queued = self._slots.available_tokens == 0
                async with self._slots:
                    await anyio.sleep(self._seconds + (self._switch if queued else 0.0))
        finally:
            self.in_flight -= 1


async def backlog(
    limit: UpstreamLimit, upstream: SimulatedUpstream, calls: int, *, per_job: int = 16
) -> list[int]:
    """`calls` segments waiting at once, `per_job` of them taken at a time as a job does;
    the limit as each call ended."""
    limits: list[int] = []
    job_slots = anyio.Semaphore(per_job)

    async def one() -> None:
        async with job_slots:
            async with limit.call(SEGMENT_SECONDS):
                await upstream.call()
            limits.append(limit.state.limit)

    async with anyio.create_task_group() as group:
        for _ in range(calls):
            group.start_soon(one)
    return limits


async def test_against_a_parallel_upstream_the_limit_rises_to_its_ceiling() -> None:
    limit = UpstreamLimit(16)
    upstream = SimulatedUpstream(0.05, capacity=None)
    assert limit.state.limit == START
    await backlog(limit, upstream, 80)
    assert limit.state.limit == 16
    assert upstream.most_in_flight == 16  # more than the 8 a job once had, and no more


async def test_against_a_queueing_upstream_the_limit_stays_near_what_it_runs_at_once() -> None:
    limit = UpstreamLimit(16)
    # A call queued behind one other waits 2.1x the calmest. (Without the switch it waited
    # exactly 2x, on the congestion line, and which of two sleeps overshot more decided the
    # limit's course: 10 runs in 60 failed below.)
    upstream = SimulatedUpstream(0.08, capacity=1, switch=0.01)
    limits = await backlog(limit, upstream, 24)
    # Two at once already make a call wait more than as long again: the limit never ran
    # away, and once it had seen that, it kept to one or two.
    assert max(limits) <= 4, limits
    assert max(limits[len(limits) // 2 :]) <= 2, limits
    assert limit.state.calmest is not None


async def test_a_limit_that_calls_do_not_reach_does_not_grow() -> None:
    """A paced upload sends one segment at a time: that says nothing of the upstream's room,
    so a burst later starts from where the limit was, not from a ceiling never tried."""
    limit = UpstreamLimit(16)
    upstream = SimulatedUpstream(0.01, capacity=None)
    for _ in range(20):
        await backlog(limit, upstream, 1)
    assert limit.state.limit == START


async def test_an_overloaded_upstream_shrinks_the_limit_once_per_round() -> None:
    limit = UpstreamLimit(32)
    upstream = SimulatedUpstream(0.02, capacity=None)
    await backlog(limit, upstream, 200, per_job=32)
    assert limit.state.limit == 32
    # Three 429s while the same calls are in flight are one sign, not three.
    limit.overloaded("429")
    limit.overloaded("429")
    limit.overloaded("503")
    assert limit.state.limit == 22  # 32 x 0.7
    await backlog(limit, upstream, 1)
    limit.overloaded("timeout")  # a call started since: a new sign
    assert limit.state.limit == 15


async def test_a_fixed_limit_never_moves() -> None:
    limit = UpstreamLimit(4, adaptive=False)
    upstream = SimulatedUpstream(0.05, capacity=1)
    assert limit.state.limit == 4
    await backlog(limit, upstream, 12)
    limit.overloaded("429")
    assert limit.state.limit == 4
    assert upstream.most_in_flight == 4


# --- through the service ---------------------------------------------------------------------

PHRASES = (
    "Please call Stella and ask her to come.",
    "Bring fresh snow peas for her brother.",
    "We also need a small plastic snake.",
)
PHRASE_WORDS = (
    "please",
    "call",
    "ask",
    "come",
    "fresh",
    "snow",
    "peas",
    "small",
    "plastic",
    "snake",
)


@pytest.fixture(scope="module")
def three_phrases(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Three phrases 5 s apart: three segments, cut within moments of each other when the
    upload is unpaced, so they wait for the upstream together."""
    folder = tmp_path_factory.mktemp("limit-phrases")
    inputs: list[str] = []
    for index, phrase in enumerate(PHRASES):
        if index:
            inputs += ["-f", "lavfi", "-i", "anullsrc=r=22050:cl=mono:d=5"]
        inputs += ["-i", str(speak(phrase, folder / f"{index}.wav"))]
    parts = len(PHRASES) * 2 - 1
    joined = "".join(f"[{n}:a]" for n in range(parts))
    run_ffmpeg(
        *inputs, "-filter_complex", f"{joined}concat=n={parts}:v=0:a=1", str(folder / "all.wav")
    )
    return (folder / "all.wav").read_bytes()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("upstream-limit"),
        {
            **upstream.server_env(),
            "VRAI_OPENAI_MODEL": "whisper-1",
            "VRAI_SEGMENT_MIN_SECONDS": "4",
            # Refused calls are sent again in their slot (the SDK's retries): the limit
            # shrinks while they wait, but they need retries enough to outwait the others.
            "VRAI_OPENAI_MAX_RETRIES": "6",
        },
    )
    yield running
    running.stop()


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


async def test_the_service_finds_how_many_calls_a_server_takes_at_once_and_keeps_to_it(
    server: Server, upstream: FakeOpenAI, three_phrases: bytes
) -> None:
    async def transcribe(client: httpx.AsyncClient) -> dict[str, object]:
        answer = await client.post("/v1/transcriptions", content=chunked(three_phrases))
        assert answer.status_code == 200, answer.text
        body: dict[str, object] = answer.json()
        assert has_words(str(body["transcription"]), PHRASE_WORDS, at_least=8), answer.text
        return body

    def refusals() -> int:
        return [r.status for r in upstream.transcription_requests].count(429)

    upstream.reset()
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        # A fresh process: a job's segments go two at once, whatever its ceiling (16).
        upstream.limit_calls(8, hold=0.3)
        await transcribe(client)
        assert upstream.most_in_flight == START

        # A server that takes one call at a time refuses the others with 429: every job
        # still gets its whole answer, and the limit comes down, by 30% per round trip.
        upstream.reset()
        upstream.limit_calls(1, hold=0.5)
        for _ in range(3):
            await transcribe(client)
            limit = metric((await client.get("/metrics")).text, "vrai_upstream_limit")
            if limit == 1:
                break
        assert limit == 1
        assert refusals() >= 1
        assert upstream.most_in_flight == 1

        # And there it stays: the next job is sent one call at a time from its start.
        before = refusals()
        body = await transcribe(client)
        metrics = (await client.get("/metrics")).text
    assert refusals() == before
    assert upstream.most_in_flight == 1
    assert len(body["segments"]) >= 3  # type: ignore[arg-type]
    assert metric(metrics, "vrai_upstream_limit") == 1
    assert metric(metrics, 'vrai_upstream_overloads_total{kind="429"}') == before
