"""The window of the recording to keep, and how its bounds are read from text fields."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from vrai_stream import errors


@dataclass(frozen=True)
class Window:
    """The part of the recording to keep, in seconds from its start."""

    start: float
    end: float

    @property
    def length(self) -> float:
        return self.end - self.start


def parse_window(
    params: Mapping[str, str], *, max_window_seconds: float, max_end: float | None = None
) -> Window:
    """`fromTime`/`toTime` in seconds; `toTime` defaults to the longest window allowed.

    `max_end` caps `toTime` itself, as the legacy API did (`toTime <= 300`).
    """
    start = _seconds(params, "fromTime") or 0.0
    end = _seconds(params, "toTime")
    if end is None:
        end = start + max_window_seconds if max_end is None else max_end
    if start < 0:
        raise errors.InvalidWindow("fromTime must be 0 or more")
    if end <= start:
        raise errors.InvalidWindow("toTime must be greater than fromTime")
    if end - start > max_window_seconds:
        raise errors.InvalidWindow(
            f"The window is {end - start:g} s long; at most {max_window_seconds:g} s is allowed"
        )
    if max_end is not None and end > max_end:
        raise errors.InvalidWindow(f"toTime must be at most {max_end:g}")
    return Window(start=start, end=end)


def _seconds(params: Mapping[str, str], name: str) -> float | None:
    raw = params.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise errors.InvalidWindow(
            f"{name} must be a number of seconds, got {raw[:40]!r}"
        ) from None
    if not math.isfinite(value):
        raise errors.InvalidWindow(f"{name} must be a finite number of seconds")
    return value
