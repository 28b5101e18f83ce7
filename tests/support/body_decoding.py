"""Helpers for the streaming body decoders' tests: bodies split anywhere, fed, and measured."""

from __future__ import annotations

import hashlib
import itertools
import re
import tracemalloc
from collections.abc import Iterable
from dataclasses import dataclass

from hypothesis import strategies as st

from vrai_stream.bodies.forms import AudioData, AudioEnd, AudioStart, BodyDecoder, Event, Field


@dataclass(frozen=True)
class AudioEvents:
    """A decoder's own audio event classes, so that a test accepts no other decoder's."""

    start: type[AudioStart]
    data: type[AudioData]
    end: type[AudioEnd]

    def kind(self, event: Event) -> str:
        """One letter per event, so that a regular expression can check their order."""
        if isinstance(event, Field):
            return "f"
        if isinstance(event, self.start):
            return "s"
        if isinstance(event, self.data):
            return "d"
        assert isinstance(event, self.end), event
        return "e"


def split(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`body` cut at each of `cuts`: a decoder must not care where its feeds begin and end."""
    points = sorted({0, len(body), *(min(cut, len(body)) for cut in cuts)})
    return [body[a:b] for a, b in itertools.pairwise(points)]


def feed_all(
    decoder: BodyDecoder, chunks: Iterable[bytes], audio: AudioEvents
) -> tuple[list[Event], bytes]:
    """Every event and the audio, checked for the order and non-empty data all callers rely on."""
    events: list[Event] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    kinds = "".join(audio.kind(event) for event in events)
    assert re.fullmatch(r"f*sd*ef*", kinds), kinds
    assert all(event.data for event in events if isinstance(event, audio.data))
    return events, b"".join(event.data for event in events if isinstance(event, audio.data))


def mutate(
    draw: st.DrawFn, body: bytes, alphabet: st.SearchStrategy[int], *, longest_repeat: int
) -> bytes:
    """One to three random edits of a valid body: the near misses a fuzzer finds bugs with."""
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["delete", "insert", "replace", "truncate", "repeat"]))
        if action == "delete" and data:
            del data[at : at + draw(st.integers(1, 4))]
        elif action == "insert":
            data[at:at] = bytes(draw(st.lists(alphabet, min_size=1, max_size=3)))
        elif action == "replace" and at < len(data):
            data[at] = draw(alphabet)
        elif action == "truncate":
            del data[at:]
        elif action == "repeat":
            size = draw(st.integers(1, longest_repeat))
            data[at:at] = data[at : at + size]
    return bytes(data)


@dataclass(frozen=True)
class Traced:
    """What a decoder made of a body, and the bytes it held above the baseline while it did."""

    digest: str
    fields: dict[str, str | None]
    peak: int
    kept: int


def decode_traced(decoder: BodyDecoder, chunks: Iterable[bytes], data: type[AudioData]) -> Traced:
    """Feed `chunks` under tracemalloc, only hashing the audio: the memory held is the decoder's."""
    digest = hashlib.sha256()
    fields: dict[str, str | None] = {}
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for chunk in chunks:
            for event in decoder.feed(chunk):
                if isinstance(event, data):
                    digest.update(event.data)
                elif isinstance(event, Field):
                    fields[event.name] = event.value
        del chunk, event
        decoder.close()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return Traced(digest.hexdigest(), fields, peak - baseline, current - baseline)
