"""`layout.sniff` on its own: every phone layout, every truncation, hostile heads.

The sniffer sees the first bytes of an upload as they arrive.  It must name the container,
choose STREAM or SEEKABLE, ask for more bytes (None) only while it cannot tell yet, and
never raise or spin, whatever the bytes claim.
"""

from __future__ import annotations

import signal
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrai_stream.media.sniff import SNIFF_LIMIT_BYTES, Layout, Mode, sniff

from .support.phone_media import (
    CAF_HEADER,
    FIXTURE_NAMES,
    LPCM_DESC,
    PhoneFile,
    box,
    caf_chunk,
    caf_data,
    caf_desc,
    phone_files,
)


@pytest.fixture(scope="session")
def phones(media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhoneFile]:
    return phone_files(tmp_path_factory.getbasetemp() / "phones", media / "sentence.wav")


class SniffTookTooLong(Exception):
    pass


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the run) if the block spins: SIGALRM interrupts Python loops."""

    def expire(signum: int, frame: object) -> None:
        raise SniffTookTooLong(f"sniff ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def decide(head: bytes, *, complete: bool) -> Layout | None:
    with deadline(2.0):
        return sniff(head, complete=complete)


# --- phone layouts --------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_sniff_names_each_phone_layout(phones: dict[str, PhoneFile], name: str) -> None:
    phone = phones[name]
    data = phone.read()
    for head, complete in ((data[:SNIFF_LIMIT_BYTES], False), (data, True)):
        layout = decide(head, complete=complete)
        assert layout is not None
        assert (layout.container, layout.mode.value) == (phone.container, phone.sniffed_mode)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_sniff_waits_for_enough_bytes_then_decides_for_good(
    phones: dict[str, PhoneFile], name: str
) -> None:
    """None until the deciding bytes arrive; then the same answer for every longer head."""
    data = phones[name].read()
    final = decide(data[:SNIFF_LIMIT_BYTES], complete=False)
    assert final is not None
    needed = next(n for n in range(len(data) + 1) if decide(data[:n], complete=False))
    for n in range(needed):
        assert decide(data[:n], complete=False) is None, f"decided on {n} bytes"
    # Phones put what decides the layout in the first few hundred bytes.
    assert needed <= 1024, needed
    for n in (*range(needed, needed + 64), 2 * needed, 4096, SNIFF_LIMIT_BYTES):
        assert decide(data[:n], complete=False) == final, f"changed its mind at {n} bytes"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_a_complete_short_body_always_gets_an_answer(
    phones: dict[str, PhoneFile], name: str
) -> None:
    """When the body ends early, an answer is due: a cut CAF/MP4 head falls back to SEEKABLE."""
    phone = phones[name]
    data = phone.read()
    for n in range(0, 400):
        layout = decide(data[:n], complete=True)
        assert isinstance(layout, Layout)
        if layout.container in ("caf", "mp4", "3gp", "mov") and n >= 12:
            assert layout.container == phone.container


# --- hostile heads ---------------------------------------------------------------------------

FTYP = box(b"ftyp", b"M4A ", struct.pack(">I", 0), b"M4A isommp42")
AAC_DESC = caf_desc(b"aac ", sample_rate=48000, channels=1, frames_per_packet=1024)


def _caf_raw_chunk(kind: bytes, size: int, payload: bytes = b"") -> bytes:
    return struct.pack(">4sq", kind, size) + payload


def _mp4_large_box(kind: bytes, large_size: int) -> bytes:
    return struct.pack(">I4sQ", 1, kind, large_size)


HOSTILE_HEADS: dict[str, tuple[bytes, tuple[str, ...]]] = {
    # name: (head, modes acceptable once complete)
    "caf-chunk-claims-8-exabytes": (
        CAF_HEADER + AAC_DESC + _caf_raw_chunk(b"free", 2**63 - 1) + b"\0" * 64,
        ("seekable",),
    ),
    "caf-chunk-size-minus-one-before-data": (
        CAF_HEADER + AAC_DESC + _caf_raw_chunk(b"kuki", -1) + caf_data(b"\0" * 64),
        ("stream", "seekable"),
    ),
    "caf-chunk-size-most-negative": (
        CAF_HEADER + AAC_DESC + _caf_raw_chunk(b"free", -(2**63)) + caf_data(b"\0" * 64),
        ("stream", "seekable"),
    ),
    "caf-thousands-of-empty-chunks": (
        CAF_HEADER + AAC_DESC + _caf_raw_chunk(b"free", 0) * 20_000,
        ("seekable",),
    ),
    "caf-desc-cut-short": (CAF_HEADER + AAC_DESC[:20], ("seekable",)),
    "caf-desc-size-zero": (
        CAF_HEADER + _caf_raw_chunk(b"desc", 0) + AAC_DESC[12:] + caf_data(b"\0" * 64),
        ("stream", "seekable"),
    ),
    "caf-no-desc-data-first": (CAF_HEADER + caf_data(b"\0" * 64), ("seekable",)),
    "caf-data-of-unknown-size-lpcm": (
        CAF_HEADER + LPCM_DESC + caf_data(b"\0" * 64, size=-1),
        ("stream",),
    ),
    "caf-zero-byte-packets": (
        CAF_HEADER
        + caf_desc(b"lpcm", sample_rate=48000, channels=1, frames_per_packet=1)
        + caf_data(b"\0" * 64),
        ("seekable",),
    ),
    "caf-header-only": (CAF_HEADER, ("seekable",)),
    "mp4-box-size-zero": (FTYP + struct.pack(">I4s", 0, b"free") + b"\0" * 64, ("seekable",)),
    "mp4-box-size-below-header": (
        FTYP + struct.pack(">I4s", 4, b"free") + b"\0" * 64,
        ("seekable",),
    ),
    "mp4-large-size-zero": (FTYP + _mp4_large_box(b"free", 0) + b"\0" * 64, ("seekable",)),
    "mp4-large-size-one": (FTYP + _mp4_large_box(b"free", 1) * 4000, ("seekable",)),
    "mp4-large-size-max": (FTYP + _mp4_large_box(b"free", 2**64 - 1) + b"\0" * 64, ("seekable",)),
    "mp4-ftyp-claims-4gb": (struct.pack(">I4s", 0xFFFFFFFF, b"ftyp") + b"M4A " * 16, ("seekable",)),
    "mp4-ftyp-size-zero": (struct.pack(">I4s", 0, b"ftyp") + b"M4A " * 16, ("seekable",)),
    "mp4-thousands-of-free-boxes": (
        FTYP + struct.pack(">I4s", 8, b"free") * 30_000,
        ("seekable",),
    ),
    "mp4-self-referencing-sizes": (FTYP + struct.pack(">I4s", 8, b"ftyp") * 1000, ("seekable",)),
    "text-claiming-nothing": (b"#EXTM3U\nfile:/etc/passwd\n", ("stream",)),
    "one-byte": (b"\xff", ("stream",)),
    "empty": (b"", ("stream",)),
}


@pytest.mark.parametrize("name", list(HOSTILE_HEADS))
def test_hostile_heads_get_an_answer_without_raising_or_spinning(name: str) -> None:
    head, modes = HOSTILE_HEADS[name]
    started = time.monotonic()
    for n in sorted({0, 1, 4, 8, 11, 12, 13, 16, 24, 40, 64, 100, 1000, len(head)}):
        if n > len(head):
            continue
        partial = decide(head[:n], complete=False)
        assert partial is None or isinstance(partial, Layout)
        assert isinstance(decide(head[:n], complete=True), Layout)
    final = decide(head, complete=True)
    assert final is not None
    assert final.mode.value in modes, final
    assert time.monotonic() - started < 2.0


def test_an_undecided_mp4_head_at_the_sniff_limit_goes_to_disk() -> None:
    """An MP4 whose first box outgrows the sniff limit is never streamed on a guess."""
    head = FTYP + struct.pack(">I4s", SNIFF_LIMIT_BYTES * 4, b"free")
    head += b"\0" * (SNIFF_LIMIT_BYTES - len(head))
    assert decide(head, complete=False) is None
    layout = decide(head, complete=True)
    assert layout is not None
    assert layout.mode is Mode.SEEKABLE


def test_quicktime_without_ftyp_is_still_an_mp4_family_file() -> None:
    """QuickTime files may begin with `wide`/`free`/`mdat` instead of `ftyp` (the spec allows
    it, ffmpeg's mov demuxer reads them): with `moov` last, such a file needs seeking."""
    mdat = box(b"mdat", b"\0" * 256)
    moov = box(b"moov", box(b"mvhd", b"\0" * 100))
    head = box(b"wide") + mdat + moov
    layout = decide(head, complete=True)
    assert layout is not None
    assert layout.mode is Mode.SEEKABLE, layout
    assert layout.container in ("mov", "mp4"), layout


_MAGICS = (b"caff\x00\x01\x00\x00", b"\x00\x00\x00\x18ftyp", b"\x00\x00\x00\x01ftyp", b"")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    magic=st.sampled_from(_MAGICS),
    body=st.binary(max_size=2048),
    cut=st.integers(min_value=0, max_value=2100),
)
def test_sniff_never_raises_on_random_heads(magic: bytes, body: bytes, cut: int) -> None:
    head = (magic + body)[:cut]
    partial = decide(head, complete=False)
    assert partial is None or isinstance(partial, Layout)
    assert isinstance(decide(head, complete=True), Layout)


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(
        st.tuples(
            st.sampled_from([b"desc", b"kuki", b"pakt", b"data", b"free", b"chan", b"\0\0\0\0"]),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.binary(max_size=40),
        ),
        max_size=12,
    )
)
def test_sniff_never_raises_on_random_caf_chunks(chunks: list[tuple[bytes, int, bytes]]) -> None:
    head = CAF_HEADER + b"".join(_caf_raw_chunk(kind, size, data) for kind, size, data in chunks)
    assert isinstance(decide(head, complete=True), Layout)
    partial = decide(head, complete=False)
    assert partial is None or isinstance(partial, Layout)


@settings(max_examples=200, deadline=None)
@given(
    boxes=st.lists(
        st.tuples(
            st.sampled_from([b"free", b"mdat", b"moov", b"moof", b"wide", b"ftyp", b"skip"]),
            st.one_of(
                st.integers(min_value=0, max_value=16),
                st.integers(min_value=0, max_value=2**32 - 1),
            ),
            st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
        ),
        max_size=12,
    )
)
def test_sniff_never_raises_on_random_mp4_boxes(
    boxes: list[tuple[bytes, int, int | None]],
) -> None:
    head = FTYP
    for kind, size, large in boxes:
        head += struct.pack(">I4s", size, kind) if large is None else _mp4_large_box(kind, large)
    assert isinstance(decide(head, complete=True), Layout)
    partial = decide(head, complete=False)
    assert partial is None or isinstance(partial, Layout)


def test_caf_chunk_helper_declares_its_payload() -> None:
    assert caf_chunk(b"free", b"abc")[4:12] == struct.pack(">q", 3)
