"""A transcript in the shapes OpenAI's transcription API answers with.

So any OpenAI SDK pointed at this service gets what it would get from OpenAI:
`json`, `text`, `verbose_json`, `srt` and `vtt`.  Only the content: `http.responses` makes
the response (and its media type) of it.
"""

from __future__ import annotations

from typing import Any, Literal

from vrai_stream.speech.languages import language_name
from vrai_stream.speech.transcribers.base import Segment, Transcript

ResponseFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]
RESPONSE_FORMATS: tuple[ResponseFormat, ...] = ("json", "text", "verbose_json", "srt", "vtt")


def format_transcript(
    transcript: Transcript, response_format: ResponseFormat, duration: float
) -> dict[str, Any] | str:
    """The transcript in `response_format`: a JSON object, or text (`text`, `srt`, `vtt`)."""
    if response_format == "json":
        return {"text": transcript.text}
    if response_format == "verbose_json":
        return verbose_json(transcript, duration)
    if response_format == "srt":
        return srt(segments_of(transcript, duration))
    if response_format == "vtt":
        return vtt(segments_of(transcript, duration))
    return transcript.text + "\n"


def segments_of(transcript: Transcript, duration: float) -> tuple[Segment, ...]:
    """The transcript's segments; a backend that gave none gets one spanning the audio."""
    if transcript.segments:
        return transcript.segments
    if not transcript.text:
        return ()
    return (Segment(start=0.0, end=duration, text=transcript.text),)


def verbose_json(transcript: Transcript, duration: float) -> dict[str, Any]:
    return {
        "task": "transcribe",
        "language": language_name(transcript.language) or "english",
        "duration": duration,
        "text": transcript.text,
        "segments": [
            {
                "id": index,
                "seek": 0,
                "start": segment.start,
                "end": segment.end,
                "text": segment.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 0.0,
                "no_speech_prob": 0.0,
            }
            for index, segment in enumerate(segments_of(transcript, duration))
        ],
    }


def srt(segments: tuple[Segment, ...]) -> str:
    blocks = [
        f"{index}\n{_timestamp(segment.start, ',')} --> {_timestamp(segment.end, ',')}\n"
        f"{segment.text}\n"
        for index, segment in enumerate(segments, start=1)
    ]
    return "\n".join(blocks)


def vtt(segments: tuple[Segment, ...]) -> str:
    blocks = [
        f"{_timestamp(segment.start, '.')} --> {_timestamp(segment.end, '.')}\n{segment.text}\n"
        for segment in segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"
