"""Several clips through faster-whisper in one call: a backlog of our cuts, batched.

faster-whisper's `BatchedInferencePipeline` decodes one 30 s window per clip, in a single
pass, where `WhisperModel.transcribe` reads again from the last word it timed when a window
ends early.  Our cuts are the clips (`clip_timestamps`, no Silero VAD: it drops whole
utterances), and a clip whose words stop well before its last voiced frame goes round again
from there, its tail batched with the other clips' tails: the same words as one clip at a
time, in fewer, fuller decoder steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ctranslate2
import numpy as np
import numpy.typing as npt
from faster_whisper import BatchedInferencePipeline, WhisperModel

from vrai_stream.speech.transcribers.base import WHISPER_WINDOW_SECONDS, Segment

SAMPLE_RATE = 16_000
CLIP_SECONDS = WHISPER_WINDOW_SECONDS
"""faster-whisper's batches hear only the first 30 s of a longer clip."""
TAIL_SECONDS = 1.0
"""Voiced audio left after a clip's last timed word that sends the rest round again."""
ROUNDS = 3
"""Passes at most: a tail's tail is rare, a third one was never seen."""

Samples = npt.NDArray[np.float32]


class BatchEncodingModel(WhisperModel):  # type: ignore[misc]  # faster-whisper has no types
    """A WhisperModel that runs a batch's encoder one clip at a time.

    Batched, the encoder's attention costs about 58 MiB a clip with tiny.en (467 MiB more
    for 8), and was no faster on 2 cores; batching pays in the decoder, which still steps
    through every clip at once (about 17 MiB a clip of cross-attention cache).
    """

    def encode(self, features: npt.NDArray[np.float32]) -> ctranslate2.StorageView:
        if features.ndim < 3 or features.shape[0] == 1:
            return super().encode(features)
        encode = super().encode  # not in the comprehension: its own scope has no super()
        parts = [np.asarray(encode(features[i : i + 1])) for i in range(len(features))]
        return ctranslate2.StorageView.from_array(np.concatenate(parts))


@dataclass(frozen=True)
class _Pass:
    clip: int
    start: float
    """Where this pass begins, in the joined audio's seconds."""
    end: float


def transcribe_clips(
    pipeline: BatchedInferencePipeline,
    clips: Sequence[Samples],
    voiced_until: Sequence[float],
    *,
    batch_size: int,
    options: dict[str, Any],
) -> tuple[list[list[Segment]], str]:
    """Each clip's segments, timed from its own start, and the language heard.

    `clips` are at most `CLIP_SECONDS` each; `voiced_until[i]`: where clip i's voice ends.
    """
    offsets = np.cumsum([0, *(len(clip) for clip in clips)]) / SAMPLE_RATE
    audio = np.concatenate(clips)
    heard: list[list[Segment]] = [[] for _ in clips]
    passes = [_Pass(i, offsets[i], offsets[i + 1]) for i in range(len(clips))]
    language = "en"
    for _ in range(ROUNDS):
        if not passes:
            break
        segments, info = pipeline.transcribe(
            audio,
            clip_timestamps=[{"start": one.start, "end": one.end} for one in passes],
            vad_filter=False,
            without_timestamps=False,
            batch_size=batch_size,
            **options,
        )
        language = info.language
        found = list(segments)
        tails: list[_Pass] = []
        for one in passes:
            base = offsets[one.clip]
            mine = [s for s in found if one.start - 0.01 <= s.start < one.end - 0.01]
            heard[one.clip].extend(
                Segment(
                    start=round(float(s.start - base), 3),
                    end=round(float(min(s.end, one.end) - base), 3),
                    text=s.text.strip(),
                )
                for s in mine
                if s.text.strip()
            )
            last = max((s.end for s in mine), default=one.start)
            if last > one.start and base + voiced_until[one.clip] - last > TAIL_SECONDS:
                tails.append(_Pass(one.clip, last, one.end))
        passes = tails
    return heard, language
