"""Why ffmpeg failed, from its exit status and its stderr: an error a user can act on."""

from __future__ import annotations

import re
import signal

from vrai_stream import errors
from vrai_stream.media.ffmpeg_process import TranscodeOutcome

KILLED_FROM_OUTSIDE = (-signal.SIGKILL, -signal.SIGTERM)
"""Exit statuses of an ffmpeg killed by someone else: the OOM killer sends SIGKILL."""


def explain_failure(outcome: TranscodeOutcome, retry_after_seconds: int = 5) -> errors.ServiceError:
    """Turn ffmpeg's stderr into an error a user can act on."""
    if outcome.timed_out:
        return errors.TranscodeTimeout(
            "Decoding the audio took too long; the file may be damaged or unusually complex"
        )
    if outcome.returncode in KILLED_FROM_OUTSIDE:
        # Not the recording's fault (the service kills ffmpeg only after its deadline, or
        # once the job is gone): most likely the machine ran short of memory.  Retry.
        return errors.TranscodeInterrupted(
            "Decoding was interrupted on the server; please retry shortly",
            retry_after_seconds=retry_after_seconds,
        )
    tail = outcome.stderr_tail
    lowered = tail.lower()
    last_line = _last_line(tail)
    if "not on whitelist" in lowered:
        return errors.UnsupportedFormat(
            "This file's container is not an audio format the service accepts "
            "(WAV, MP3, M4A/MP4, CAF, 3GP/AMR, WebM, OGG, FLAC, AAC)"
        )
    if "matches no streams" in lowered or "does not contain any stream" in lowered:
        return errors.UndecodableAudio("The file contains no audio stream")
    if any(
        sign in lowered for sign in ("moov atom not found", "partial file", "missing packet table")
    ):
        return errors.UndecodableAudio(
            "The file is incomplete or its index is missing (truncated upload?)"
        )
    if "invalid data found" in lowered:
        return errors.UndecodableAudio("The upload is not a recognizable audio file")
    reason = f" (ffmpeg: {last_line})" if last_line else ""
    return errors.UndecodableAudio(f"The audio could not be decoded{reason}")


_NOISE = re.compile(r"^(?:\[\w+ @ 0x[0-9a-f]+\] |(?:pipe|file):\S*: )")


def _last_line(text: str) -> str:
    """ffmpeg's last complaint, without its internal addresses or the spool's path."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    return _NOISE.sub("", lines[-1])[:300]
