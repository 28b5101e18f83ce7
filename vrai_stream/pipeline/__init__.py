"""One job, start to finish: body -> ffmpeg -> MP3 spool and segments -> transcript.

The body is pumped into ffmpeg while it arrives.  When ffmpeg has its window it exits
early; the pump keeps reading the body to its end, while transcription starts at once.
Whatever happens, the job's process and files are gone when `run` returns or raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from vrai_stream import errors, metrics
from vrai_stream.bodies.limits import BodyMeter, limited
from vrai_stream.debug_store.base import CopyContext, DebugCopies, DebugStore
from vrai_stream.media.declared import declared_seconds
from vrai_stream.media.failures import explain_failure
from vrai_stream.media.ffmpeg import build_command
from vrai_stream.media.ffmpeg_process import FfmpegProcess, PcmPipe, run_ffmpeg
from vrai_stream.media.index_last import IndexLastStream, open_stream
from vrai_stream.media.sniff import SNIFF_LIMIT_BYTES, Layout, Mode, pipe_filter, sniff
from vrai_stream.media.window import Window
from vrai_stream.pipeline.framing import Arrivals, frame_spool
from vrai_stream.pipeline.job import JobListener, JobResult, JobSpec, Provisional, SilentListener
from vrai_stream.pipeline.segments import LiveSegments, TranscriberSource
from vrai_stream.settings import Settings
from vrai_stream.speech.segmenter import Segmenter
from vrai_stream.speech.transcribers.base import WHISPER_WINDOW_SECONDS, Audio, Transcript
from vrai_stream.spool import Budget, FileSpool, Spool


class Pipeline:
    """Runs jobs with the service's shared parts: ffmpeg, the memory budget, a transcriber."""

    def __init__(
        self,
        settings: Settings,
        *,
        ffmpeg: str,
        memory: Budget,
        disk: Budget,
        transcriber: TranscriberSource,
        debug: DebugStore,
        tmp_dir: Path,
    ) -> None:
        self._settings = settings
        self._ffmpeg = ffmpeg
        self._memory = memory
        self._disk = disk
        self._transcriber = transcriber
        self._debug = debug
        self.tmp_dir = tmp_dir

    async def run(
        self,
        spec: JobSpec,
        chunks: AsyncIterator[bytes],
        listener: JobListener | None = None,
        *,
        watch: Callable[[JobResult], None] | None = None,
    ) -> JobResult:
        """Run one job; its result says how far it got, and `failure` what ended it.

        Only a bug or a cancellation raises; a job that failed for a reason the client is
        told still reports what arrived and how long it took.  `watch` is handed the result
        as the job begins, so a job cancelled from outside (its client gone) reports that too.
        """
        result = JobResult(spec=spec)
        if watch is not None:
            watch(result)
        try:
            await self.check(spec)
        except errors.ServiceError as failure:
            result.failure = failure
            return result
        copies = self._debug.begin(
            CopyContext.now(spec.request_id, spec.user_id, spec.window.start, spec.window.end)
        )
        try:
            try:
                await self._run(spec, chunks, result, copies, listener or SilentListener())
            except BaseExceptionGroup as group:
                first = errors.first_service_error(group)
                if first is None:
                    raise
                raise first from None
        except errors.ServiceError as failure:
            if failure.keeps_debug_copies:
                failure.debug_files = await copies.settle(failure.code)
            else:
                copies.abandon()
            result.failure = failure
            return result
        except BaseException:
            copies.abandon()
            raise
        try:
            await copies.settle(None)
        except BaseException:
            if result.mp3 is not None:
                result.mp3.close()  # nobody will send it now
            raise
        return result

    async def check(self, spec: JobSpec) -> None:
        """Refuse what the job cannot do, before a byte of its body is read: a language the
        model cannot do (`tiny.en` would answer French speech in English, and say `en`)."""
        language = spec.options.language
        if language is None or spec.want_mp3:
            return
        refusal = (await self._transcriber()).unsupported_language(language)
        if refusal is not None:
            raise errors.LanguageNotSupported(refusal)

    async def _run(
        self,
        spec: JobSpec,
        chunks: AsyncIterator[bytes],
        result: JobResult,
        copies: DebugCopies,
        listener: JobListener,
    ) -> None:
        started = spec.admitted_at if spec.admitted_at is not None else anyio.current_time()
        result.timings.origin = started
        meter = BodyMeter()
        output = self.new_spool()
        try:
            try:
                await self._stream(spec, chunks, result, copies, meter, output, listener)
            except BaseException:
                result.mp3 = None
                output.close()
                raise
            if result.mp3 is not output:
                output.close()  # else the answer streams it, and closes it when done
        finally:
            # Even a failed job reports how much arrived and how long it took.
            result.output_on_disk = output.on_disk
            result.input_size = meter.size
            finished = anyio.current_time()
            result.timings.receive = (meter.last_byte_at or finished) - started
            result.timings.total = finished - started

    async def _stream(
        self,
        spec: JobSpec,
        chunks: AsyncIterator[bytes],
        result: JobResult,
        copies: DebugCopies,
        meter: BodyMeter,
        output: Spool,
        listener: JobListener,
    ) -> None:
        settings = self._settings
        idle = spec.idle_timeout_seconds
        body = limited(
            chunks,
            max_bytes=settings.max_body_bytes,
            idle_timeout=settings.idle_timeout_seconds if idle is None else idle,
            meter=meter,
        )
        head, layout = await _read_head(body)
        result.layout = layout
        result.mode = layout.mode
        sniffed = b"".join(head)
        result.declared_seconds = declared_seconds(layout.container, sniffed)
        copies.start_input(layout)
        failure: errors.ServiceError | None = None
        job = _Job(spec, result, copies, meter, listener, output)
        with contextlib.ExitStack() as cleanup:
            async with anyio.create_task_group() as group:
                if layout.mode is Mode.STREAM:
                    failure = await self._piped(job, group, head, body, layout)
                else:
                    # ffmpeg must seek in this layout: the body goes to disk first.
                    source = cleanup.enter_context(self.new_file_spool(".input"))
                    failure = await self._spooled(job, group, head, body, layout, source, sniffed)
            # Leaving the task group means the body has been read to its last byte.
        if failure is not None:
            raise failure

    async def _piped(
        self,
        job: _Job,
        group: TaskGroup,
        head: list[bytes],
        body: AsyncIterator[bytes],
        layout: Layout,
    ) -> errors.ServiceError | None:
        """ffmpeg reads the body from a pipe as it arrives."""
        segments = self._segments(job.spec, job.meter, job.listener, group)
        pcm = segments.pcm_pipe() if segments else None
        command = self._command(job.spec, pcm=pcm)
        async with self._ffmpeg_run(command, job.output, job.copies, pcm=pcm) as ffmpeg:
            feed = _filtered(layout, ffmpeg)
            group.start_soon(_pump, head, body, feed, ffmpeg.finish_input, job.copies)
            return await self._finish(job, ffmpeg, segments)

    async def _spooled(
        self,
        job: _Job,
        group: TaskGroup,
        head: list[bytes],
        body: AsyncIterator[bytes],
        layout: Layout,
        source: FileSpool,
        sniffed: bytes,
    ) -> errors.ServiceError | None:
        """The body goes to disk for ffmpeg to seek in; where its audio can be framed as it
        arrives (`media.index_last`), it streams all the same, and the spool is decoded only
        if the recording's index disagrees with what was streamed."""
        stream = self._index_last_stream(layout, sniffed)
        if stream is None:
            await _pump(head, body, _write_to(source), _finish_of(source), job.copies)
        else:
            outcome = await self._index_last(job, group, head, body, stream, source)
            if not isinstance(outcome, _DecodeAgain):
                return outcome
            self._decode_again(job, layout, outcome.reason)
        segments = self._segments(job.spec, job.meter, job.listener, group)
        pcm = segments.pcm_pipe() if segments else None
        command = self._command(job.spec, input_path=source.path, pcm=pcm)
        async with self._ffmpeg_run(
            command, job.output, job.copies, feeds_stdin=False, pcm=pcm
        ) as ffmpeg:
            return await self._finish(job, ffmpeg, segments)

    def _index_last_stream(self, layout: Layout, head: bytes) -> IndexLastStream | None:
        if self._settings.index_last == "spool":
            return None
        speculate = self._settings.index_last == "speculate"
        return open_stream(layout.container, head, speculate=speculate)

    async def _index_last(
        self,
        job: _Job,
        group: TaskGroup,
        head: list[bytes],
        body: AsyncIterator[bytes],
        stream: IndexLastStream,
        source: FileSpool,
    ) -> errors.ServiceError | _DecodeAgain | None:
        """Spool the body and stream its audio to ffmpeg; check the stream against the index
        once the body has ended."""
        provisional = Provisional(job.listener, stream)
        segments = self._segments(job.spec, job.meter, provisional, group)
        pcm = segments.pcm_pipe() if segments else None
        command = self._command(job.spec, pcm=pcm)
        async with self._ffmpeg_run(command, job.output, job.copies, pcm=pcm) as ffmpeg:
            arrivals = Arrivals()

            async def write(chunk: bytes) -> None:
                source.write(chunk)  # buffered: the framer sees it 8 KiB at a time
                arrivals.more(len(chunk))

            async def finish() -> None:
                source.finish()
                arrivals.end()

            async with anyio.create_task_group() as framing:
                framing.start_soon(frame_spool, stream, source, arrivals, ffmpeg)
                await _pump(head, body, write, finish, job.copies)

            def void(reason: str) -> _DecodeAgain:
                if segments is not None:
                    segments.stop()
                provisional.withdraw(reason)
                return _DecodeAgain(reason)

            verdict = await anyio.to_thread.run_sync(stream.verdict)  # reads the whole index
            if not verdict.holds:
                return void(verdict.reason)
            await ffmpeg.finish_input()
            decoded = await ffmpeg.wait()
            if decoded.returncode is not None and decoded.returncode > 0:
                # What ffmpeg could not read from the pipe, it may from the file.  (Killed by
                # a signal or timed out, it is answered as any job's ffmpeg.)
                return void(f"ffmpeg could not decode the stream: {decoded.stderr_tail[-200:]}")
            job.result.mode = Mode(stream.certainty.value)
            if verdict.declared_seconds is not None:
                job.result.declared_seconds = verdict.declared_seconds
            provisional.confirm()
            return await self._finish(job, ffmpeg, segments)

    def _decode_again(self, job: _Job, layout: Layout, reason: str) -> None:
        """What was streamed is void: the MP3 and its copy (the segments are withdrawn)."""
        metrics.INDEX_LAST_FALLBACKS.labels(format=layout.container).inc()
        job.result.mode = Mode.SEEKABLE
        job.result.fallback = reason
        job.output.reset()
        job.copies.discard_output()

    def _segments(
        self, spec: JobSpec, meter: BodyMeter, listener: JobListener, group: TaskGroup
    ) -> LiveSegments | None:
        """Segmented transcription, started now: it hears the audio as ffmpeg decodes it."""
        settings = self._settings
        if spec.want_mp3 or settings.transcribe_mode != "segments":
            return None
        upstream = settings.transcriber == "openai"
        # The local model takes a backlog of cuts as one batch (see SegmentedTranscription):
        # at most its batch size in clips, each at most Whisper's window.
        batch_seconds = settings.whisper_batch_size * WHISPER_WINDOW_SECONDS
        segments = LiveSegments(
            Segmenter(
                min_seconds=settings.segment_min_seconds, max_seconds=settings.segment_max_seconds
            ),
            meter,
            listener,
            backlog_seconds=None if upstream else batch_seconds,
        )
        group.start_soon(
            segments.transcribe,
            self._transcriber,
            spec,
            settings.openai_segment_concurrency if upstream else 1,
        )
        return segments

    def _command(
        self, spec: JobSpec, input_path: Path | None = None, pcm: PcmPipe | None = None
    ) -> list[str]:
        return build_command(
            self._ffmpeg,
            spec.window,
            self._settings.mp3_bitrate_kbps,
            input_path=input_path,
            memory_limit_bytes=self._settings.ffmpeg_memory_bytes,
            pcm_fd=pcm.write_fd if pcm else None,
        )

    def _ffmpeg_run(
        self,
        command: list[str],
        output: Spool,
        copies: DebugCopies,
        *,
        feeds_stdin: bool = True,
        pcm: PcmPipe | None = None,
    ) -> AbstractAsyncContextManager[FfmpegProcess]:
        """ffmpeg, its MP3 drained into `output` and, as it is written, into its debug copy."""
        copies.start_output()
        return run_ffmpeg(
            command,
            output,
            timeout_after_input=self._settings.ffmpeg_timeout_seconds,
            feeds_stdin=feeds_stdin,
            pcm=pcm,
            on_output=copies.offer_output,
        )

    async def _finish(
        self, job: _Job, ffmpeg: FfmpegProcess, segments: LiveSegments | None
    ) -> errors.ServiceError | None:
        """Wait for ffmpeg, then for the transcript (or keep the MP3); return what went wrong."""
        try:
            return await self._outcome(job, ffmpeg, segments)
        finally:
            if segments is not None:
                segments.stop()  # a job that failed transcribes nothing more

    async def _outcome(
        self, job: _Job, ffmpeg: FfmpegProcess, segments: LiveSegments | None
    ) -> errors.ServiceError | None:
        spec, output, result, copies = job.spec, job.output, job.result, job.copies
        outcome = await ffmpeg.wait()
        result.timings.transcode = result.timings.since_origin(anyio.current_time())
        metrics.FFMPEG_EXITS.labels(
            status="timeout" if outcome.timed_out else str(outcome.returncode)
        ).inc()
        if outcome.returncode != 0:
            return explain_failure(outcome, self._settings.retry_after_seconds)
        result.mp3_size = output.size
        result.duration = ffmpeg.mp3.seconds
        result.truncated = _cut_short(spec.window, result.duration, result.declared_seconds)
        if result.duration <= 0:
            # The MP3's copy is never ended: like that of a failed ffmpeg, it is dropped.
            return errors.NoAudioInWindow(
                f"The recording has no audio between {spec.window.start:g} s "
                f"and {spec.window.end:g} s"
            )
        copies.end_output()
        if spec.want_mp3:
            output.reader()  # the last flush: a full disk is this job's 507, not the answer's
            result.mp3 = output
            return None
        if segments is not None:
            # Only the last segment is left to transcribe: the rest was heard as it came.
            try:
                result.transcript = await segments.outcome(
                    self._settings.openai_deadline_seconds
                    if self._settings.transcriber == "openai"
                    else None
                )
            except errors.ServiceError as exc:
                return exc
            finally:
                result.billed_seconds = segments.billed_seconds
                result.model_calls = segments.calls
                result.timings.transcribe = result.timings.since_origin(segments.ended_at)
            return None
        try:
            result.transcript = await self._transcribe(spec, output, result)
        except errors.ServiceError as exc:
            return exc
        return None

    def new_spool(self) -> Spool:
        return Spool(
            memory_cap=self._settings.spool_memory_bytes,
            memory=self._memory,
            disk=self._disk,
            tmp_dir=self.tmp_dir,
        )

    def new_file_spool(self, suffix: str) -> FileSpool:
        """A named spool on disk, drawing on the same disk budget as the jobs' spools."""
        return FileSpool(disk=self._disk, tmp_dir=self.tmp_dir, suffix=suffix)

    async def _transcribe(self, spec: JobSpec, output: Spool, result: JobResult) -> Transcript:
        transcriber = await self._transcriber()
        result.billed_seconds = result.duration
        result.model_calls = 1
        try:
            return await transcriber.transcribe(
                Audio(
                    file=output.reader(),
                    duration=result.duration,
                    options=spec.options,
                    request_id=spec.request_id,
                )
            )
        finally:
            result.timings.transcribe = result.timings.since_origin(anyio.current_time())


async def _read_head(body: AsyncIterator[bytes]) -> tuple[list[bytes], Layout]:
    """Read just enough of the body to tell its layout; return those chunks too."""
    chunks: list[bytes] = []
    head = bytearray()
    next_look = 16
    async for chunk in body:
        chunks.append(chunk)
        head += chunk
        # Look again only when the head has doubled: hostile one-byte chunks stay linear.
        if len(head) >= next_look or len(head) >= SNIFF_LIMIT_BYTES:
            layout = sniff(bytes(head), complete=len(head) >= SNIFF_LIMIT_BYTES)
            if layout is not None:
                return chunks, layout
            next_look = len(head) * 2
    return chunks, sniff(bytes(head), complete=True) or Layout("unknown", Mode.STREAM)


async def _pump(
    head: list[bytes],
    rest: AsyncIterator[bytes],
    write: Callable[[bytes], Awaitable[None]],
    finish: Callable[[], Awaitable[None]],
    copies: DebugCopies,
) -> None:
    """Send the sniffed head, then the rest of the body as it arrives, then the end.

    Every chunk is also offered to the debug copy, which takes it without waiting.
    """
    for chunk in head:
        copies.offer(chunk)
        await write(chunk)
    async for chunk in rest:
        copies.offer(chunk)
        await write(chunk)
    copies.end_input()
    await finish()


TRUNCATION_TOLERANCE_SECONDS = 1.0
"""Decoded audio may fall this far short of the declared length (encoder priming and
padding, MP3 frames) before the upload is said to be cut short."""


def _cut_short(window: Window, decoded: float, declared: float | None) -> bool:
    """Did the window stop short of its end for want of audio the container declares?"""
    if declared is None:
        return False
    decoded_to = window.start + decoded
    return decoded_to < min(window.end, declared) - TRUNCATION_TOLERANCE_SECONDS


def _write_to(source: FileSpool) -> Callable[[bytes], Awaitable[None]]:
    async def write(chunk: bytes) -> None:
        source.write(chunk)

    return write


def _finish_of(source: FileSpool) -> Callable[[], Awaitable[None]]:
    async def finish() -> None:
        source.finish()

    return finish


@dataclass(frozen=True)
class _Job:
    """What every stage of one job works with."""

    spec: JobSpec
    result: JobResult
    copies: DebugCopies
    meter: BodyMeter
    listener: JobListener
    output: Spool


@dataclass(frozen=True)
class _DecodeAgain:
    """The index disagreed with what was streamed: decode the spooled upload instead."""

    reason: str


def _filtered(layout: Layout, ffmpeg: FfmpegProcess) -> Callable[[bytes], Awaitable[None]]:
    """ffmpeg's feed, through the layout's pipe filter (CAF: chunks the pipe demuxer chokes on
    are left out); the debug copy still gets every byte."""
    keep = pipe_filter(layout)

    async def feed(chunk: bytes) -> None:
        kept = keep(chunk)
        if kept:
            await ffmpeg.feed(kept)

    return feed
