"""Transcribes segments as they are cut, and stitches them into one transcript.

A local model takes a job's segments one at a time, in order (its own limiter shares it
fairly between jobs, first come first served); an upstream API takes up to `concurrency`
of them at once, and the transcriber's own limit caps them all (`upstream_limit`).  A
segment in which nobody speaks is not sent at all: models invent words in silence.  Times
in the stitched transcript are seconds from the window's start: our own cuts, plus the
model's own times within a segment where it gives them.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from vrai_stream.speech.segmenter import Cut
from vrai_stream.speech.transcribers.base import (
    Audio,
    Segment,
    TranscribeOptions,
    Transcriber,
    Transcript,
)

SegmentHeard = Callable[[int, Segment], None]

LOCAL_CALL_SECONDS = 58.0
"""The most audio one call to a local model takes from a backlog: two of Whisper's 30 s
windows, less headroom.  faster-whisper reads again from a window's last timestamp, so a
call of one window often costs two; in a longer call that tail opens the next window, as
in a whole-window run.  Measured on `stitched.wav` (331 s): 14 windows at 58 s, 18 at 28 s
(13 for the whole window), and no worse a word error rate."""


class SegmentedTranscription:
    def __init__(
        self,
        transcriber: Transcriber,
        options: TranscribeOptions,
        *,
        concurrency: int,
        longest: float | None,
        request_id: str | None,
        on_segment: SegmentHeard,
    ) -> None:
        self._transcriber = transcriber
        self._options = options
        self._concurrency = concurrency
        self._longest = longest
        self._request_id = request_id
        self._on_segment = on_segment
        self._heard: dict[int, tuple[Cut, Transcript]] = {}
        self._next_to_announce = 0
        """The index of the next cut whose text may be announced."""
        self._announced = 0
        self.billed_seconds = 0.0
        """Audio sent to the model: the window less the segments nobody speaks in."""

    async def run(self, cuts: MemoryObjectReceiveStream[Cut]) -> Transcript:
        """Transcribe every cut `cuts` brings until it ends; raise the first failure.

        With `longest`, cuts made while every slot was busy go in one call, up to that many
        seconds: a local model pays for whole 30 s windows, so a backlog costs fewer, fuller
        calls, and it times its own words.  Without, each cut is a call of its own:
        an API runs them in parallel, and its times may be only those of our cuts.
        """
        slots = anyio.Semaphore(self._concurrency)
        held: Cut | None = None
        async with anyio.create_task_group() as group, cuts:
            while (cut := held or await _next(cuts)) is not None:
                held = None
                if not cut.speech:
                    self._heard_one(cut, Transcript(text=""))
                    continue
                await slots.acquire()
                while self._longest and (following := _ready(cuts)) is not None:
                    if cut.seconds + following.seconds > self._longest:
                        held = following
                        break
                    cut = cut.joined(following)
                group.start_soon(self._transcribe, cut, slots)
        return self._stitched()

    async def _transcribe(self, cut: Cut, slots: anyio.Semaphore) -> None:
        try:
            audio = Audio(
                file=io.BytesIO(cut.wav()),
                duration=cut.seconds,
                filename=f"segment-{cut.index}.wav",
                content_type="audio/wav",
                options=self._options,
                request_id=self._request_id,
            )
            self.billed_seconds += cut.seconds
            transcript = await self._transcriber.transcribe(audio)
            self._heard_one(cut, transcript)
        finally:
            slots.release()

    def _heard_one(self, cut: Cut, transcript: Transcript) -> None:
        """Keep a result (not its audio: memory stays flat in the window's length); announce
        every segment now known in order, none twice: the very segments of the answer."""
        self._heard[cut.index] = (dataclasses.replace(cut, pcm=b""), transcript)
        while self._next_to_announce in self._heard:
            done, text = self._heard[self._next_to_announce]
            for segment in _placed(done, text):
                self._on_segment(self._announced, segment)
                self._announced += 1
            self._next_to_announce += done.count

    def _stitched(self) -> Transcript:
        texts: list[str] = []
        segments: list[Segment] = []
        language: str | None = None
        for index in sorted(self._heard):
            cut, transcript = self._heard[index]
            if not transcript.text:
                continue
            texts.append(transcript.text)
            language = language or transcript.language
            segments.extend(_placed(cut, transcript))
        return Transcript(text=" ".join(texts), language=language, segments=tuple(segments))


def _placed(cut: Cut, transcript: Transcript) -> list[Segment]:
    """A call's segments in the window's time: the model's own times within our cut, none
    starting before the voice does (Whisper without a VAD starts its first segment at 0 s of
    the cut, however long the silence before the speech: 0.0-7.0 s for a sentence at 4-6.8 s,
    as faster-whisper-server answered); or, where the model gives none (gpt-transcribe),
    where the voice is in the cut."""
    if not transcript.text:
        return []
    if not transcript.segments:
        return [Segment(round(cut.speech_start, 3), round(cut.speech_end, 3), transcript.text)]
    placed = []
    for part in transcript.segments:
        if not part.text:
            continue
        start = cut.start + min(part.start, cut.seconds)
        end = cut.start + min(part.end, cut.seconds)
        if start < cut.speech_start < end:
            start = cut.speech_start
        placed.append(Segment(start=round(start, 3), end=round(end, 3), text=part.text))
    return placed


async def _next(cuts: MemoryObjectReceiveStream[Cut]) -> Cut | None:
    """The next cut, waiting for it; None once there are no more."""
    try:
        return await cuts.receive()
    except anyio.EndOfStream:
        return None


def _ready(cuts: MemoryObjectReceiveStream[Cut]) -> Cut | None:
    """The next cut if one is already made; None otherwise (or at the end)."""
    try:
        return cuts.receive_nowait()
    except (anyio.WouldBlock, anyio.EndOfStream):
        return None
