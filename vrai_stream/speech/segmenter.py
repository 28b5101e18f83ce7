"""Cuts the decoded window into segments at pauses, as ffmpeg produces it.

Each segment can be transcribed the moment it is cut, so when the upload ends only the last
one is left.  A segment ends in the middle of the first pause after `min_seconds` of audio;
if nobody pauses for `max_seconds` (Whisper hears 30 s at a time), it is cut in the longest
pause it holds, or failing any, at its quietest 30 ms: between syllables, so no word is
lost or heard twice.  Segments share no audio: what is billed is the window itself.

Speech is told from silence by WebRTC's voice activity detector (`webrtcvad-wheels`: a few
kilobytes of C, no ML runtime), on 30 ms frames of ffmpeg's 16 kHz mono PCM.
"""

from __future__ import annotations

import array
import io
import wave
from dataclasses import dataclass

import webrtcvad

SAMPLE_RATE = 16_000
FRAME_SAMPLES = 480
"""30 ms, the longest frame the detector takes."""
FRAME_BYTES = FRAME_SAMPLES * 2
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
BYTES_PER_SECOND = SAMPLE_RATE * 2
QUIET_SEARCH_SECONDS = 5.0
"""Where a segment with no pause is cut: its quietest frame within this much of its end."""


@dataclass(frozen=True)
class Cut:
    """One segment: its place in the window, its audio, and whether anyone speaks in it."""

    index: int
    start: float
    end: float
    pcm: bytes
    speech: bool
    speech_start: float
    """Where the first voiced frame begins (the cut's start when nobody speaks)."""
    speech_end: float
    """Where the last voiced frame ends (the cut's end when nobody speaks)."""
    count: int = 1
    """How many cuts this one joins (see `joined`): the next cut's index is `index + count`."""

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def joined(self, following: Cut) -> Cut:
        """This cut and the one right after it, as one: fewer, longer calls to a model."""
        assert following.index == self.index + self.count
        voiced = [cut for cut in (self, following) if cut.speech]
        return Cut(
            index=self.index,
            start=self.start,
            end=following.end,
            pcm=self.pcm + following.pcm,
            speech=bool(voiced),
            speech_start=voiced[0].speech_start if voiced else self.start,
            speech_end=voiced[-1].speech_end if voiced else following.end,
            count=self.count + following.count,
        )

    def wav(self) -> bytes:
        """The segment as a WAV file: what a transcriber reads without re-encoding."""
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(self.pcm)
        return buffer.getvalue()


class Segmenter:
    """Feed it PCM (16 kHz, mono, s16le) in pieces of any size; it hands back finished cuts."""

    def __init__(
        self,
        *,
        min_seconds: float = 8.0,
        max_seconds: float = 28.0,
        pause_seconds: float = 0.5,
        aggressiveness: int = 1,
    ) -> None:
        assert 0 < min_seconds < max_seconds
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self._vad = webrtcvad.Vad(aggressiveness)
        self._min_frames = round(min_seconds / FRAME_SECONDS)
        self._max_frames = round(max_seconds / FRAME_SECONDS)
        self._pause_frames = max(1, round(pause_seconds / FRAME_SECONDS))
        self._pending = bytearray()
        """The current segment's audio, from its first sample."""
        self._speech: list[bool] = []
        """One flag a whole frame of `_pending`."""
        self._silent_run = 0
        self._start_sample = 0
        self._index = 0

    @property
    def decoded_seconds(self) -> float:
        """Audio seen so far, from the window's start."""
        return (self._start_sample + len(self._pending) // 2) / SAMPLE_RATE

    def feed(self, pcm: bytes) -> list[Cut]:
        cuts: list[Cut] = []
        self._pending += pcm
        while len(self._speech) * FRAME_BYTES + FRAME_BYTES <= len(self._pending):
            offset = len(self._speech) * FRAME_BYTES
            frame = bytes(self._pending[offset : offset + FRAME_BYTES])
            speech = self._vad.is_speech(frame, SAMPLE_RATE)
            self._speech.append(speech)
            self._silent_run = 0 if speech else self._silent_run + 1
            frames = len(self._speech)
            if self._silent_run >= self._pause_frames and frames >= self._min_frames:
                # The middle of the pause so far; the rest opens the next segment.  (Its
                # quietest frame measured worse: a word's soft ending is quiet too.)
                cuts.append(self._cut(max(frames - self._silent_run // 2, self._min_frames)))
            elif frames >= self._max_frames:
                cuts.append(self._cut(self._forced_cut_frame()))
        return cuts

    def finish(self) -> list[Cut]:
        """What is left when the audio ends: the last segment, if it has any audio."""
        if not self._pending:
            return []
        return [self._cut_bytes(len(self._pending))]

    def _forced_cut_frame(self) -> int:
        """Where to cut a segment nobody paused in: its longest pause, else its quietest frame."""
        best_start, best_length, run = 0, 0, 0
        for frame, speech in enumerate(self._speech):
            run = 0 if speech else run + 1
            if run > best_length and frame + 1 - run >= self._min_frames // 2:
                best_start, best_length = frame + 1 - run, run
        if best_length:
            return self._quietest(best_start, best_start + best_length)
        first = max(1, len(self._speech) - round(QUIET_SEARCH_SECONDS / FRAME_SECONDS))
        return self._quietest(first, len(self._speech))

    def _quietest(self, first: int, end: int) -> int:
        """Where to cut among frames `first`..`end`: just after the quietest of them."""
        return min(range(first, end), key=self._energy) + 1

    def _energy(self, frame: int) -> int:
        samples = array.array("h", self._pending[frame * FRAME_BYTES : (frame + 1) * FRAME_BYTES])
        return sum(sample * sample for sample in samples)

    def _cut(self, frames: int) -> Cut:
        return self._cut_bytes(frames * FRAME_BYTES)

    def _cut_bytes(self, size: int) -> Cut:
        frames = size // FRAME_BYTES
        pcm = bytes(self._pending[:size])
        start = self._start_sample / SAMPLE_RATE
        end = start + len(pcm) / BYTES_PER_SECOND
        voiced = [frame for frame, speech in enumerate(self._speech[:frames]) if speech]
        cut = Cut(
            index=self._index,
            start=start,
            end=end,
            pcm=pcm,
            speech=bool(voiced),
            speech_start=start + voiced[0] * FRAME_SECONDS if voiced else start,
            speech_end=min(end, start + (voiced[-1] + 1) * FRAME_SECONDS) if voiced else end,
        )
        self._index += 1
        self._start_sample += len(pcm) // 2
        del self._pending[:size]
        del self._speech[:frames]
        self._silent_run = 0
        # The frames carried over keep their flags; the run of silence restarts with them.
        for speech in reversed(self._speech):
            if speech:
                break
            self._silent_run += 1
        return cut
