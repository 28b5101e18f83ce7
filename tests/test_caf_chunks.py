"""CAF with chunks between the header chunks and `data`: `free`, `info`, `chan`, `uuid`, ...

Apple's writers put a `free` chunk before `data` (the audio then starts at byte 4096), and
other writers add `info`, `uuid`, `mark` or `strg` there.  Debian's ffmpeg 5.1 reading CAF
from a pipe cannot skip a chunk it does not read to its end (it seeks past chunks only on
seekable input), so in STREAM mode the service leaves those chunks out of what ffmpeg
reads (`layout.CafChunkFilter`).  Every codec an iPhone writes to CAF (LPCM, IMA4, ALAC,
AAC), with each of these chunks and with all of them in two orders, comes back as an MP3
as long as the recording, in both modes:

* STREAM: LPCM and IMA4 (constant packets, no packet table), ALAC and AAC with `pakt`
  before `data` (the extra chunks on both sides of it);
* SEEKABLE: ALAC and AAC with `pakt` after `data` (AAC's access units stream all the same,
  framed as they arrive: `media.index_last`, whose answer says `stream`); LPCM and IMA4
  never need seeking, so
  their fixtures select SEEKABLE with a `free` chunk larger than the sniff window (the
  sniffer cannot reach `data` in time and spools the body, which ffmpeg then reads as a
  file).

The MP3 (`Accept: audio/mpeg`) is measured; no speech model runs here.
"""

from __future__ import annotations

import random
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrai_stream.media.sniff import SNIFF_LIMIT_BYTES, CafChunkFilter, Mode, sniff

from .support.audio import decoded_seconds, ffmpeg_seconds
from .support.client import chunked
from .support.phone_media import (
    CAF_HEADER,
    DEBIAN_FFMPEG,
    LPCM_DESC,
    aac_caf_chunks,
    caf_chunk,
    caf_chunks_of,
    caf_data,
    caf_free,
    ffmpeg,
    parse_adts,
    write_caf,
)
from .support.server import Server

pytestmark = pytest.mark.anyio

CLIP_SECONDS = 1.5
RATE = 48_000
WINDOW = (0.0, 60.0)
"""Covers the whole clip."""
REAL_IPHONE_CAF = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "real-recordings"
    / "ios_lpcm_free_chunk.caf"
)

EXTRA_ORDERS: dict[str, tuple[str, ...]] = {
    "free": ("free",),
    "info": ("info",),
    "chan": ("chan",),
    "uuid": ("uuid",),
    "mark": ("mark",),
    "strg": ("strg",),
    "all": ("chan", "info", "uuid", "mark", "strg", "free"),
    "all-reversed": ("free", "strg", "mark", "uuid", "info", "chan"),
}
"""The chunks between the header chunks and `data`, in order (`all`: `free` last, as Apple's
writers put it, padding the audio to byte 4096)."""
CHOKES_A_PIPE = ("free", "info", "uuid", "mark", "strg")
"""Chunks that plain ffmpeg 5.1 does not read to their end on a pipe (`chan` it does)."""

CODECS = ("lpcm", "ima4", "alac", "aac")
HAS_PAKT = ("alac", "aac")
HAS_KUKI = ("alac", "aac")
CODEC_CHUNKS = ("desc", "kuki", "pakt", "data")


@dataclass(frozen=True)
class Case:
    codec: str
    mode: str
    extras: str

    @property
    def order(self) -> tuple[str, ...]:
        """The file's chunks, by name, in order."""
        head = ("desc", "kuki") if self.codec in HAS_KUKI else ("desc",)
        extras = EXTRA_ORDERS[self.extras]
        if self.codec not in HAS_PAKT:
            if self.mode == "seekable" and "free" not in extras:
                extras = (*extras, "free")
            return (*head, *extras, "data")
        if self.mode == "seekable":
            return (*head, *extras, "data", "pakt")
        half = len(extras) // 2
        return (*head, *extras[:half], "pakt", *extras[half:], "data")

    @property
    def align_data(self) -> int:
        """Where the audio starts: Apple's 4096, or past the sniff window to select SEEKABLE."""
        if self.mode == "seekable" and self.codec not in HAS_PAKT:
            return 2 * SNIFF_LIMIT_BYTES
        return 4096

    @property
    def answered_mode(self) -> str:
        """What the answer says: AAC with `pakt` last is spooled and streams all the same."""
        return "stream" if self.codec == "aac" else self.mode

    @property
    def name(self) -> str:
        return f"{self.codec}-{self.mode}-{','.join(self.order)}"


CASES = [
    Case(codec, mode, extras)
    for codec in CODECS
    for mode in ("stream", "seekable")
    for extras in EXTRA_ORDERS
]
STREAM_CASES = [case for case in CASES if case.mode == "stream"]


class CafFixtures:
    """The clip encoded once per codec; every case is laid out from those chunks."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        clip = folder / "clip.wav"
        ffmpeg(
            "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={RATE}:duration={CLIP_SECONDS}",
            "-f", "lavfi", "-i",
            f"anoisesrc=color=pink:amplitude=0.02:sample_rate={RATE}:duration={CLIP_SECONDS}",
            "-filter_complex", "amix=inputs=2:normalize=0", "-ac", "1", "-c:a", "pcm_s16le",
            str(clip),
        )  # fmt: skip
        made: dict[str, dict[str, bytes]] = {}
        for codec, encoder in (("lpcm", "pcm_s16le"), ("ima4", "adpcm_ima_qt"), ("alac", "alac")):
            path = folder / f"{codec}.caf"
            ffmpeg("-i", str(clip), "-c:a", encoder, "-f", "caf", str(path))
            made[codec] = caf_chunks_of(path.read_bytes())
        adts = folder / "clip.aac"
        ffmpeg("-i", str(clip), "-c:a", "aac", "-b:a", "64k", "-f", "adts", str(adts))
        samples = int(RATE * CLIP_SECONDS)
        made["aac"] = aac_caf_chunks(
            parse_adts(adts.read_bytes()), valid_frames=samples, priming=1024
        )
        # Only the codec's own chunks: the `chan` and `info` in between come from the case.
        self.chunks = {
            codec: {name: chunk for name, chunk in chunks.items() if name in CODEC_CHUNKS}
            for codec, chunks in made.items()
        }
        self._paths: dict[Case, Path] = {}

    def path(self, case: Case) -> Path:
        if case not in self._paths:
            self._paths[case] = write_caf(
                self.folder / f"{case.name}.caf",
                self.chunks[case.codec],
                case.order,
                align_data=case.align_data,
            )
        return self._paths[case]


@pytest.fixture(scope="session")
def cafs(tmp_path_factory: pytest.TempPathFactory) -> CafFixtures:
    return CafFixtures(tmp_path_factory.mktemp("caf-chunks"))


async def ragged(data: bytes) -> AsyncIterator[bytes]:
    """The head in pieces of 1 to 13 bytes (chunk headers split anywhere), then 64 KiB."""
    offset = 0
    step = 1
    while offset < min(len(data), 8192):
        yield data[offset : offset + step]
        offset += step
        step = step % 13 + 1
    async for piece in chunked(data[offset:]):
        yield piece


def pipe_seconds(data: bytes) -> float:
    """Seconds of audio plain Debian ffmpeg decodes from `data` on stdin, as CAF."""
    done = subprocess.run(
        [DEBIAN_FFMPEG, "-v", "quiet", "-f", "caf", "-i", "pipe:0", "-ac", "1", "-ar", "8000",
         "-f", "s16le", "pipe:1"],
        input=data, capture_output=True, timeout=60,
    )  # fmt: skip
    return len(done.stdout) / 16_000


def filtered(data: bytes, pieces: list[int] | None = None) -> bytes:
    """`data` through a `CafChunkFilter`, fed whole or in pieces of the given sizes."""
    chunk_filter = CafChunkFilter()
    out = []
    offset = 0
    for size in pieces or []:
        out.append(chunk_filter.feed(data[offset : offset + size]))
        offset += size
    out.append(chunk_filter.feed(data[offset:]))
    return b"".join(out)


# --- through the HTTP API ------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
async def test_caf_with_chunks_before_data_comes_back_whole(
    server: Server, cafs: CafFixtures, case: Case, tmp_path: Path
) -> None:
    path = cafs.path(case)
    data = path.read_bytes()
    expected = ffmpeg_seconds(path)
    assert expected == pytest.approx(CLIP_SECONDS, abs=0.05), "the fixture itself is wrong"
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await client.post(
            f"/v1/transcriptions?fromTime={WINDOW[0]}&toTime={WINDOW[1]}",
            content=ragged(data),
            headers={"Accept": "audio/mpeg"},
        )
    assert response.status_code == 200, response.text
    assert abs(decoded_seconds(response.content, tmp_path) - expected) <= 0.25
    logged = server.request_log(response.headers["x-request-id"])
    assert (logged["format"], logged["mode"]) == ("caf", case.answered_mode)
    assert logged["inputSize"] == len(data)
    server.wait_idle()


# --- why: plain ffmpeg on a pipe, with and without the filter ---------------------------------


@pytest.mark.parametrize("kind", CHOKES_A_PIPE)
def test_plain_ffmpeg_loses_its_place_at_these_chunks_on_a_pipe(
    cafs: CafFixtures, kind: str
) -> None:
    """The bug being worked around: from a file ffmpeg seeks past the chunk, from a pipe it
    reads the chunk's payload as the next chunk header.  Filtered, the pipe decodes it all."""
    data = cafs.path(Case("lpcm", "stream", kind)).read_bytes()
    assert pipe_seconds(data) == 0.0
    assert pipe_seconds(filtered(data)) == pytest.approx(CLIP_SECONDS, abs=0.01)


def test_the_real_iphone_caf_fails_on_a_plain_pipe_and_decodes_filtered() -> None:
    """`desc`, `free` (4016 bytes), `data`: written by Apple's AudioFile on an iPhone."""
    data = REAL_IPHONE_CAF.read_bytes()
    whole = ffmpeg_seconds(REAL_IPHONE_CAF)
    assert whole > 8.0
    assert pipe_seconds(data) == 0.0
    assert pipe_seconds(filtered(data, [5, 7, 30, 3, 4000, 11])) == pytest.approx(whole, abs=0.01)
    layout = sniff(data[:SNIFF_LIMIT_BYTES], complete=False)
    assert layout is not None
    assert (layout.container, layout.mode) == ("caf", Mode.STREAM)


# --- the filter on its own -----------------------------------------------------------------


def kept_chunks(data: bytes) -> bytes:
    """What ffmpeg should read: the header, `desc`/`kuki`/`pakt` before `data`, then the rest."""
    chunks = list(caf_chunks_of(data).items())
    names = [name for name, _ in chunks]
    at_data = names.index("data")
    head = [chunk for name, chunk in chunks[:at_data] if name in CODEC_CHUNKS]
    return CAF_HEADER + b"".join(head) + b"".join(chunk for _, chunk in chunks[at_data:])


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda case: case.name)
def test_the_filter_leaves_out_exactly_the_extra_chunks(cafs: CafFixtures, case: Case) -> None:
    data = cafs.path(case).read_bytes()
    expected = kept_chunks(data)
    assert filtered(data) == expected
    one_byte_at_a_time = filtered(data, [1] * 6000)
    assert one_byte_at_a_time == expected


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(STREAM_CASES),
    pieces=st.lists(st.integers(min_value=0, max_value=700), max_size=40),
)
def test_the_filter_does_not_care_where_the_pieces_begin_and_end(
    cafs: CafFixtures, case: Case, pieces: list[int]
) -> None:
    data = cafs.path(case).read_bytes()
    assert filtered(data, pieces) == filtered(data)


def test_past_the_head_the_filter_hands_each_chunk_back_as_is(cafs: CafFixtures) -> None:
    data = cafs.path(Case("lpcm", "stream", "all")).read_bytes()
    chunk_filter = CafChunkFilter()
    assert len(chunk_filter.feed(data[:4096])) < 4096
    rest = data[4096:]
    assert chunk_filter.feed(rest) is rest


def test_a_chunk_of_unknown_size_before_data_passes_unchanged() -> None:
    """It cannot be skipped by its size: ffmpeg gets the bytes and answers as it would."""
    tail = struct.pack(">4sq", b"uuid", -1) + b"\x07" * 100
    data = CAF_HEADER + LPCM_DESC + caf_free(20) + tail
    assert filtered(data) == CAF_HEADER + LPCM_DESC + tail


def test_thousands_of_empty_chunks_fed_a_byte_at_a_time_stay_linear() -> None:
    data = CAF_HEADER + LPCM_DESC + caf_chunk(b"free", b"") * 20_000 + caf_data(b"\0" * 64)
    started = time.monotonic()
    out = filtered(data, [1] * len(data))
    assert time.monotonic() - started < 5.0
    assert out == CAF_HEADER + LPCM_DESC + caf_data(b"\0" * 64)


def test_a_chunk_claiming_exabytes_drops_what_follows_without_holding_it() -> None:
    chunk_filter = CafChunkFilter()
    head = CAF_HEADER + LPCM_DESC + struct.pack(">4sq", b"free", 2**63 - 1)
    assert chunk_filter.feed(head) == CAF_HEADER + LPCM_DESC
    noise = random.Random(7).randbytes(1 << 20)
    assert all(chunk_filter.feed(noise) == b"" for _ in range(8))
