"""Transcribes segments as they are cut, and stitches them into one transcript.

A local model takes a job's segments one at a time, in order (its own limiter shares it
fairly between jobs, first come first served); an upstream API takes up to `concurrency`
of them at once, and a process-wide limiter caps them all.  A segment in which nobody
speaks is not sent at all: models invent words in silence.  Times in the stitched
transcript are seconds from the window's start: our own cuts, plus the model's own times
within a segment where it gives them.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable

import anyio
from anyio.abc import ObjectReceiveStream

from vrai_stream.speech.segmenter import Cut
from vrai_stream.speech.transcribers.base import (
    Audio,
    Segment,
    TranscribeOptions,
    Transcriber,
    Transcript,
)

SegmentHeard = Callable[[int, Segment], None]


class SegmentedTranscription:
    def __init__(
        self,
        transcriber: Transcriber,
        options: TranscribeOptions,
        *,
        concurrency: int,
        limiter: anyio.CapacityLimiter | None,
        request_id: str | None,
        on_segment: SegmentHeard,
    ) -> None:
        self._transcriber = transcriber
        self._options = options
        self._concurrency = concurrency
        self._limiter = limiter
        self._request_id = request_id
        self._on_segment = on_segment
        self._heard: dict[int, tuple[Cut, Transcript]] = {}
        self._next_to_announce = 0
        self.billed_seconds = 0.0
        """Audio sent to the model: the window less the segments nobody speaks in."""

    async def run(self, cuts: ObjectReceiveStream[Cut]) -> Transcript:
        """Transcribe every cut `cuts` brings until it ends; raise the first failure."""
        slots = anyio.Semaphore(self._concurrency)
        async with anyio.create_task_group() as group, cuts:
            async for cut in cuts:
                if not cut.speech:
                    self._heard_one(cut, Transcript(text=""))
                    continue
                await slots.acquire()
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
            if self._limiter is None:
                transcript = await self._transcriber.transcribe(audio)
            else:
                async with self._limiter:
                    transcript = await self._transcriber.transcribe(audio)
            self._heard_one(cut, transcript)
        finally:
            slots.release()

    def _heard_one(self, cut: Cut, transcript: Transcript) -> None:
        """Keep a result (not its audio: memory stays flat in the window's length); announce
        every segment now known in order, none twice."""
        self._heard[cut.index] = (dataclasses.replace(cut, pcm=b""), transcript)
        while self._next_to_announce in self._heard:
            done, text = self._heard[self._next_to_announce]
            if text.text:
                self._on_segment(done.index, Segment(done.speech_start, done.speech_end, text.text))
            self._next_to_announce += 1

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
            if transcript.segments:
                segments.extend(
                    Segment(
                        start=round(cut.start + min(part.start, cut.seconds), 3),
                        end=round(cut.start + min(part.end, cut.seconds), 3),
                        text=part.text,
                    )
                    for part in transcript.segments
                    if part.text
                )
            else:
                # No times from the model (gpt-transcribe): where the voice is in our cut.
                segments.append(
                    Segment(round(cut.speech_start, 3), round(cut.speech_end, 3), transcript.text)
                )
        return Transcript(text=" ".join(texts), language=language, segments=tuple(segments))
