"""The segmenter on real human speech: cuts at pauses, nothing lost or doubled, any piece size."""

from __future__ import annotations

import itertools
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vrai_stream.speech.segmenter import BYTES_PER_SECOND, Cut, Segmenter

SILENCE_RMS = 32768 * 10 ** (-45 / 20)
"""-45 dBFS: quieter than this is silence, wherever it is."""
SPEECH = Path(__file__).resolve().parents[1].parent / "shared" / "speech"


@pytest.fixture(scope="module")
def stitched_pcm() -> bytes:
    """331 s of 29 speakers, as ffmpeg decodes it for the service: 16 kHz mono s16le."""
    return _pcm(SPEECH / "stitched.wav")


def _pcm(path: Path) -> bytes:
    return subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", "16000",
         "-f", "s16le", "pipe:1"],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip


def _cut_all(pcm: bytes, segmenter: Segmenter, pieces: list[int] | None = None) -> list[Cut]:
    cuts: list[Cut] = []
    offset = 0
    for size in pieces or [len(pcm)]:
        cuts += segmenter.feed(pcm[offset : offset + size])
        offset += size
    cuts += segmenter.feed(pcm[offset:])
    return cuts + segmenter.finish()


def _rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % 2], dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


def test_cuts_hold_every_sample_once_in_order(stitched_pcm: bytes) -> None:
    cuts = _cut_all(stitched_pcm, Segmenter())
    assert b"".join(cut.pcm for cut in cuts) == stitched_pcm
    assert [cut.index for cut in cuts] == list(range(len(cuts)))
    for before, after in itertools.pairwise(cuts):
        assert after.start == pytest.approx(before.end)
    assert cuts[-1].end == pytest.approx(len(stitched_pcm) / BYTES_PER_SECOND)


def test_segments_are_between_the_minimum_and_the_maximum(stitched_pcm: bytes) -> None:
    cuts = _cut_all(stitched_pcm, Segmenter(min_seconds=8, max_seconds=28))
    assert len(cuts) >= 331 // 28
    assert all(cut.seconds <= 28.0 + 1e-6 for cut in cuts)
    # Past the maximum without a long enough pause, a segment ends at an earlier, shorter
    # one, in its second half or later.
    assert all(cut.seconds >= 8.0 / 2 for cut in cuts[:-1])


def test_cuts_fall_in_pauses(stitched_pcm: bytes) -> None:
    # A pause is quieter than the speech around it.  In noisy speech (one of the 29 speakers
    # has a cold, another talks fast over a hum) the detector may hear a pause in a breath.
    cuts = _cut_all(stitched_pcm, Segmenter())
    tenth = BYTES_PER_SECOND // 10
    loud = []
    for cut in cuts[:-1]:
        at = int(cut.end * BYTES_PER_SECOND) // 2 * 2
        at_cut = _rms(stitched_pcm[at - tenth // 2 : at + tenth // 2])
        around = [
            _rms(stitched_pcm[start : start + tenth])
            for start in range(at - 2 * BYTES_PER_SECOND, at + 2 * BYTES_PER_SECOND, tenth)
        ]
        if at_cut > max(float(np.median(around)), SILENCE_RMS):
            loud.append(round(cut.end, 2))
    assert len(loud) <= 0.1 * (len(cuts) - 1), f"cuts not in a pause: {loud}"


def test_where_the_body_is_split_changes_nothing(stitched_pcm: bytes) -> None:
    pcm = stitched_pcm[: 90 * BYTES_PER_SECOND]
    whole = _cut_all(pcm, Segmenter())
    rng = random.Random(7)
    pieces = [rng.choice([1, 3, 959, 961, 4096, 65536]) for _ in range(4000)]
    split = _cut_all(pcm, Segmenter(), pieces)
    assert [(c.start, c.end, c.speech) for c in split] == [
        (c.start, c.end, c.speech) for c in whole
    ]


def test_speech_without_pauses_is_cut_at_the_maximum_and_loses_nothing(
    stitched_pcm: bytes,
) -> None:
    # Forty seconds of speech with every pause removed: nobody stops for breath.
    pcm = stitched_pcm[: 60 * BYTES_PER_SECOND]
    frames = [pcm[i : i + 960] for i in range(0, len(pcm) - 959, 960)]
    voiced = b"".join(frame for frame in frames if _rms(frame) > 0.2 * _rms(pcm))
    cuts = _cut_all(voiced, Segmenter(min_seconds=8, max_seconds=12))
    assert b"".join(cut.pcm for cut in cuts) == voiced
    assert all(cut.seconds <= 12.0 + 1e-6 for cut in cuts)


def test_silence_is_marked_as_no_speech() -> None:
    silence = bytes(30 * BYTES_PER_SECOND)
    cuts = _cut_all(silence, Segmenter(min_seconds=2, max_seconds=10))
    assert cuts and not any(cut.speech for cut in cuts)
    assert sum(cut.seconds for cut in cuts) == pytest.approx(30.0)


def test_voice_bounds_lie_inside_the_cut(stitched_pcm: bytes) -> None:
    for cut in _cut_all(stitched_pcm, Segmenter()):
        assert cut.start <= cut.speech_start < cut.speech_end <= cut.end + 1e-9


def test_a_cut_is_a_wav_of_its_audio(stitched_pcm: bytes, tmp_path: Path) -> None:
    cut = _cut_all(stitched_pcm[: 20 * BYTES_PER_SECOND], Segmenter())[0]
    path = tmp_path / "cut.wav"
    path.write_bytes(cut.wav())
    assert _pcm(path) == cut.pcm


def test_joined_cuts_are_the_audio_of_both_in_one(stitched_pcm: bytes) -> None:
    first, second, *_ = _cut_all(stitched_pcm[: 60 * BYTES_PER_SECOND], Segmenter())
    both = first.joined(second)
    assert both.pcm == first.pcm + second.pcm
    assert (both.index, both.count) == (first.index, 2)
    assert (both.start, both.end) == (first.start, second.end)
    assert (both.speech_start, both.speech_end) == (first.speech_start, second.speech_end)
    with pytest.raises(AssertionError):
        second.joined(first)
