"""Transcription while the audio streams: ffmpeg's PCM output into the segmenter, each cut
into the transcriber as soon as it is made, and the outcome waited for when the audio ends."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable

import anyio

from vrai_stream import errors
from vrai_stream.bodies.limits import BodyMeter
from vrai_stream.media.ffmpeg_process import PcmPipe
from vrai_stream.pipeline.job import JobListener, JobSpec
from vrai_stream.speech.segmented import SegmentedTranscription
from vrai_stream.speech.segmenter import Cut, Segmenter
from vrai_stream.speech.transcribers.base import Transcriber, Transcript

TranscriberSource = Callable[[], Awaitable[Transcriber]]


class LiveSegments:
    """The segmenter fed by ffmpeg's PCM output, and the transcription of what it cuts."""

    def __init__(
        self,
        segmenter: Segmenter,
        meter: BodyMeter,
        listener: JobListener,
        *,
        backlog_seconds: float | None,
    ) -> None:
        """`backlog_seconds`: the most audio one call takes from a backlog (None: a cut a call)."""
        self._segmenter = segmenter
        self._meter = meter
        self._listener = listener
        # Room for the cuts of one model call, made while the transcriber is busy: one call
        # takes them all (see `SegmentedTranscription.run`), and ffmpeg waits beyond that.
        backlog = math.ceil((backlog_seconds or segmenter.max_seconds) / segmenter.min_seconds)
        self._send, self._receive = anyio.create_memory_object_stream[Cut](backlog)
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._transcript: Transcript | None = None
        self._failure: errors.ServiceError | None = None
        self._ended_at: float | None = None
        self.billed_seconds = 0.0
        self.calls = 0

    def pcm_pipe(self) -> PcmPipe:
        return PcmPipe(self._heard, self._ended)

    async def _heard(self, pcm: bytes) -> None:
        cuts = self._segmenter.feed(pcm)
        self._listener.progress(self._meter.size, self._segmenter.decoded_seconds)
        for cut in cuts:
            await self._pass_on(cut)

    async def _ended(self) -> None:
        for cut in self._segmenter.finish():
            await self._pass_on(cut)
        self._send.close()

    async def _pass_on(self, cut: Cut) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._send.send(cut)  # waits while the transcriber is behind: backpressure

    async def transcribe(
        self,
        transcriber: TranscriberSource,
        spec: JobSpec,
        concurrency: int,
    ) -> None:
        try:
            with self._scope:
                work = SegmentedTranscription(
                    await transcriber(),
                    spec.options,
                    concurrency=concurrency,
                    request_id=spec.request_id,
                    on_segment=self._listener.segment,
                )
                try:
                    self._transcript = await work.run(self._receive)
                finally:
                    self.billed_seconds = work.billed_seconds
                    self.calls = work.calls
        except errors.ServiceError as exc:
            # Reported when ffmpeg is done; the upload is still read to its end meanwhile.
            self._failure = exc
        except BaseExceptionGroup as group:
            # A segment's call failed in the transcription's own task group: the same.
            failure = errors.first_service_error(group)
            if failure is None:
                raise
            self._failure = failure
        finally:
            self._receive.close()
            self._ended_at = anyio.current_time()
            self._done.set()

    @property
    def ended_at(self) -> float:
        """When the last segment was transcribed (now, if some are still going)."""
        return self._ended_at or anyio.current_time()

    async def outcome(self, deadline: float | None) -> Transcript:
        """The stitched transcript, or the failure.

        `deadline`: how long the segments still in flight when the audio ends may take.
        """
        try:
            with anyio.fail_after(deadline):
                await self._done.wait()
        except TimeoutError:
            self.stop()
            # The calls cut short are billed and logged too: their task counts them as it ends.
            await self._done.wait()
            raise errors.TranscriptionTimeout(
                "The transcription service did not answer in time"
            ) from None
        if self._failure is not None:
            raise self._failure
        assert self._transcript is not None
        return self._transcript

    def stop(self) -> None:
        self._scope.cancel()
        self._receive.close()
