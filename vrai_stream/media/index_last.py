"""Streaming what ffmpeg cannot read from a pipe: audio whose index comes after it.

iPhones and Android's MediaRecorder write their index last: CAF with the packet table
(`pakt`) after the audio, M4A/MP4/3GP with the `moov` after the `mdat`.  ffmpeg must seek to
read those, so they used to be spooled and decoded after the last byte.  Yet the audio is
there as it arrives, access units back to back; only their sizes (and, for MP4, the codec
configuration) come at the end.  An `IndexLastStream` takes the upload's bytes as they come
and hands ffmpeg a stream it reads from a pipe:

- CAF with AAC: `desc` and `kuki` (an esds) come first, so the configuration is exact; each
  access unit is found by `aac.UnitFinder` and goes out as an ADTS frame.
- MP4 with AMR: every AMR frame's first byte gives its size, so the `mdat` is an AMR storage
  stream once its magic is put in front.
- MP4 with AAC in a plain `mdat`: the configuration is in the `moov`, at the end.  It is
  inferred from the first access units (a guess: see `guess_config`) and checked when the
  `moov` arrives.
- Voice Memos: inside the `mdat`, after 2-4 s of raw AAC, a `hoov` (a `moov` by another name)
  gives the exact configuration, and a `moof` before every fragment gives its sample sizes.

Whatever was streamed is checked against the index at the end (`verdict`); where the two
disagree, or anything did not hold together, the job decodes its spooled copy instead.
"""

from __future__ import annotations

import enum
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from vrai_stream.media import aac
from vrai_stream.media.aac import AacConfig, ConfigError, UnitFinder
from vrai_stream.media.mp4_index import (
    IndexError_,
    TrackIndex,
    box_header,
    fragment_sample_sizes,
    read_track,
)

MAX_INDEX_BYTES = 16 * 1024 * 1024
"""The most a `moov` or `pakt` may hold for its check: 1 s of AAC takes ~200 bytes of it."""
MAX_BOX_BYTES = 1024 * 1024
"""The most a `hoov` or `moof` inside the audio may hold."""
GUESS_BYTES = 16 * 1024
"""Raw AAC gathered before its configuration is guessed (~60 access units at 64 kbit/s)."""
GUESS_UNITS = 40
"""Access units one configuration must frame, one after another, to be a candidate."""


class Certainty(enum.Enum):
    """What the stream handed to ffmpeg rests on: the answer's and the log's `mode`."""

    EXACT = "stream"
    GUESSED = "speculative"


@dataclass(frozen=True)
class Verdict:
    """The stream checked against the index: `holds`, or the reason it does not."""

    holds: bool
    reason: str = ""
    declared_seconds: float | None = None


class _Bytes:
    """Bytes received and not yet used, read from the front."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0

    def __len__(self) -> int:
        return len(self._data) - self._start

    def append(self, chunk: bytes) -> None:
        if self._start and self._start >= len(self._data) // 2:
            del self._data[: self._start]
            self._start = 0
        self._data += chunk

    def view(self, limit: int | None = None) -> memoryview:
        end = len(self._data) if limit is None else min(len(self._data), self._start + limit)
        return memoryview(self._data)[self._start : end]

    def take(self, count: int) -> bytes:
        taken = bytes(self._data[self._start : self._start + count])
        self._start += len(taken)
        return taken

    def skip(self, count: int) -> int:
        """Drop up to `count` bytes; return how many were dropped."""
        dropped = min(count, len(self))
        self._start += dropped
        return dropped


class StreamFailed(Exception):
    """This upload cannot be streamed exactly from here on: the job decodes its spool."""


class IndexLastStream:
    """Bytes of an index-last upload in, bytes ffmpeg reads from a pipe out."""

    def __init__(self) -> None:
        self._pending = _Bytes()
        self._step: Callable[[bool], bool] = self._stop
        """Uses pending bytes; False when it needs more (or the body's end, if `final`)."""
        self._out: list[bytes] = []
        self.failure: str | None = None
        self.certainty = Certainty.EXACT
        self.unit_sizes = array("I")
        """Every access unit (or AMR frame) handed on, checked against the index: 4 bytes
        each, so 3 hours of AAC (500,000 units) hold 2 MB."""
        self._output_wanted = True
        self._ended = False

    # --- what the job calls ---------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """The bytes ffmpeg should read next (often none while a box or a guess fills up)."""
        self._pending.append(chunk)
        self._run(final=False)
        return self._drain()

    def finish(self) -> bytes:
        """The body has ended: what is left for ffmpeg."""
        self._ended = True
        self._run(final=True)
        return self._drain()

    def stop_output(self) -> None:
        """ffmpeg has its window: from here on only the structure is followed, for the check."""
        self._output_wanted = False

    def verdict(self) -> Verdict:
        """After `finish`: does the index confirm what was streamed?"""
        if self.failure is not None:
            return Verdict(False, self.failure)
        if not self._ended:
            return Verdict(False, "the upload did not end")
        try:
            return self._check()
        except (IndexError_, ConfigError, struct.error, OverflowError) as exc:
            return Verdict(False, f"the index does not hold together: {exc}")

    # --- for the formats ------------------------------------------------------------------

    def _check(self) -> Verdict:
        raise NotImplementedError

    def _run(self, *, final: bool) -> None:
        if self.failure is not None:
            return
        try:
            while self._step(final):
                pass
        except (StreamFailed, IndexError_, ConfigError, struct.error, OverflowError) as exc:
            self.failure = str(exc) or type(exc).__name__
            self._out.clear()
            self._step = self._stop

    def _drain(self) -> bytes:
        if not self._out or self.failure is not None:
            self._out.clear()
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _emit(self, data: bytes) -> None:
        if self._output_wanted:
            self._out.append(data)

    def _stop(self, final: bool) -> bool:
        self._pending.skip(len(self._pending))
        return False

    def _collect(self, size: int, limit: int, then: Callable[[bytes], None]) -> None:
        """Gather a box of `size` bytes whole, then hand it to `then`."""
        if size < 0 or size > limit:
            raise StreamFailed(f"a box of {size} bytes is past the {limit}-byte limit")

        def step(final: bool) -> bool:
            if len(self._pending) < size:
                if final:
                    raise StreamFailed("the upload ends inside a box")
                return False
            then(self._pending.take(size))
            return True

        self._step = step

    def _skip(self, size: int, then: Callable[[bool], bool]) -> None:
        """Pass over `size` bytes (-1: to the end of the upload), then go on with `then`."""
        left = size

        def step(final: bool) -> bool:
            nonlocal left
            if left < 0:
                self._pending.skip(len(self._pending))
                return False
            left -= self._pending.skip(left)
            if left:
                return False
            self._step = then
            return True

        self._step = step

    def _frame_units(
        self,
        finder: UnitFinder,
        length: int,
        then: Callable[[bool], bool],
        before_unit: Callable[[memoryview], bool] | None = None,
    ) -> None:
        """Hand on the next `length` bytes (-1: to the end) as ADTS frames, unit by unit.

        `before_unit` sees the bytes at each unit boundary and may take over (True).
        """
        left = length

        def step(final: bool) -> bool:
            nonlocal left
            if left == 0:
                self._step = then
                return True
            available = len(self._pending) if left < 0 else min(left, len(self._pending))
            if available == 0:
                return False
            if before_unit is not None and before_unit(self._pending.view(available)):
                return True
            if not self._output_wanted:
                dropped = self._pending.skip(available)
                left = -1 if left < 0 else left - dropped
                return True
            whole = final or (left >= 0 and left <= len(self._pending))
            outcome, size = finder.next_unit(self._pending.view(available), final=whole)
            if outcome is aac.Outcome.NEED_MORE:
                return False
            if outcome is aac.Outcome.INVALID:
                raise StreamFailed(f"no {finder.config.describe()} access unit where one begins")
            unit = self._pending.take(size)
            self.unit_sizes.append(size)
            self._emit(finder.config.adts_header(size) + unit)
            left = -1 if left < 0 else left - size
            return True

        self._step = step


# --- CAF ------------------------------------------------------------------------------------

_CAF_FILE_HEADER = 8
_CAF_CHUNK_HEADER = 12
_CAF_EDIT_COUNT = 4


@dataclass(frozen=True)
class CafHead:
    """What a CAF's chunks before `data` say of AAC audio."""

    config: AacConfig
    sample_rate: float


def read_caf_head(head: bytes) -> CafHead | None:
    """The configuration of an AAC CAF from its first bytes; None for anything else."""
    offset = _CAF_FILE_HEADER
    desc: bytes | None = None
    cookie: bytes | None = None
    while offset + _CAF_CHUNK_HEADER <= len(head):
        kind, size = struct.unpack_from(">4sq", head, offset)
        body = head[offset + _CAF_CHUNK_HEADER : offset + _CAF_CHUNK_HEADER + max(size, 0)]
        if kind == b"data" or size < 0:
            break
        if kind == b"desc":
            desc = body
        elif kind == b"kuki":
            cookie = body
        offset += _CAF_CHUNK_HEADER + size
    if desc is None or cookie is None or len(desc) < 12 or desc[8:12] != b"aac ":
        return None
    try:
        config = aac.parse_audio_specific_config(aac.audio_specific_config_of(cookie))
    except ConfigError:
        return None
    if not config.adts_ready:
        return None
    (rate,) = struct.unpack_from(">d", desc, 0)
    return CafHead(config, rate)


class CafAacStream(IndexLastStream):
    """AAC in a CAF whose packet table follows the audio: exact, the `kuki` says it all."""

    def __init__(self, head: CafHead) -> None:
        super().__init__()
        self._config = head.config
        self._sample_rate = head.sample_rate
        self._packet_table: bytes | None = None
        self._skip(_CAF_FILE_HEADER, self._chunk)

    def _chunk(self, final: bool) -> bool:
        if len(self._pending) < _CAF_CHUNK_HEADER:
            return False
        kind, size = struct.unpack(">4sq", self._pending.take(_CAF_CHUNK_HEADER))
        if kind == b"data":
            if size >= 0 and size < _CAF_EDIT_COUNT:
                raise StreamFailed("the data chunk is too small")
            audio = -1 if size < 0 else size - _CAF_EDIT_COUNT
            self._skip(_CAF_EDIT_COUNT, lambda _: self._audio(audio))
        elif kind == b"pakt":
            self._collect(size, MAX_INDEX_BYTES, self._keep_packet_table)
        else:
            self._skip(size, self._chunk)
        return True

    def _audio(self, length: int) -> bool:
        # Made here, in `feed`: the job calls that off the event loop (PyAV's import and a
        # decoder's set-up take a tenth of a second).
        self._frame_units(UnitFinder(self._config), length, self._chunk)
        return True

    def _keep_packet_table(self, payload: bytes) -> None:
        self._packet_table = payload
        self._step = self._chunk

    def _check(self) -> Verdict:
        if self._packet_table is None:
            return Verdict(False, "no packet table came")
        packets, valid_frames = struct.unpack_from(">qq", self._packet_table)
        declared = valid_frames / self._sample_rate if self._sample_rate else None
        # Only the units handed on are known when ffmpeg stopped early (`stop_output`).
        counted = packets if self._output_wanted else len(self.unit_sizes)
        if _varints(self._packet_table[24:], counted) != self.unit_sizes:
            return Verdict(False, "the packet table disagrees with the access units found")
        return Verdict(True, declared_seconds=declared)


def _varints(data: bytes, count: int) -> array[int]:
    values = array("I")
    value = 0
    for byte in data:
        if len(values) == count:
            break
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            values.append(value)
            value = 0
    if len(values) != count:
        raise IndexError_("the packet table is cut short")
    return values


# --- MP4 / M4A / 3GP ------------------------------------------------------------------------

AMR_MAGIC = {"amr_nb": b"#!AMR\n", "amr_wb": b"#!AMR-WB\n"}
_AMR_FRAME_BYTES = {
    # by frame type, the speech bytes after the one-byte header (3GPP TS 26.101, 26.201)
    "amr_nb": (12, 13, 15, 17, 19, 20, 26, 31, 5, -1, -1, -1, -1, -1, -1, 0),
    "amr_wb": (17, 23, 32, 36, 40, 46, 50, 58, 60, 5, -1, -1, -1, -1, 0, 0),
}
AMR_CHECK_FRAMES = 50
"""Frames one AMR flavour must parse, one after another, to be taken for the mdat's."""

APPLE_BRANDS = frozenset({b"M4A ", b"M4B ", b"qt  "})
RATE_PRIORS = {
    # The order in which rates that a trial decode cannot tell apart are guessed (see
    # `guess_config`): Apple's recorders write 48 kHz (Voice Memos) and Android's 44.1 kHz.
    "apple": (48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000),
    "other": (44100, 48000, 32000, 22050, 24000, 16000, 12000, 11025, 8000),
}


def amr_frame_size(flavour: str, header: int) -> int:
    """The bytes of the AMR frame whose first byte is `header`, or -1 if it is not one."""
    if header & 0x83:  # the padding bits of the storage format's frame header
        return -1
    size = _AMR_FRAME_BYTES[flavour][(header >> 3) & 0x0F]
    return -1 if size < 0 else size + 1


def amr_frames(flavour: str, data: bytes | memoryview, limit: int) -> int:
    """How many whole frames of `flavour` parse at the start of `data`, up to `limit`."""
    position = count = 0
    while count < limit and position < len(data):
        size = amr_frame_size(flavour, data[position])
        if size < 0 or position + size > len(data):
            break
        position += size
        count += 1
    return count


def guess_config(data: bytes | memoryview, *, apple: bool, final: bool) -> AacConfig | None:
    """The AAC configuration that frames the first access units of `data`, or None.

    A trial decode tells apart groups of rates (their scale-factor band tables differ), not
    the rates within a group (48, 44.1 and 32 kHz share theirs): within a group the prior
    decides, and the `moov` checks it at the end.  The channel count is the first element's:
    a single channel (SCE) or a pair (CPE).
    """
    if not data:
        return None
    channels = 2 if data[0] >> 5 == 1 else 1
    tried: set[frozenset[int]] = set()
    for rate in RATE_PRIORS["apple" if apple else "other"]:
        group = _RATE_GROUPS[rate]
        if group in tried:
            continue
        tried.add(group)
        config = AacConfig(2, aac.SAMPLING_RATES.index(rate), channels)
        if _frames_units(config, data, final=final):
            return config
    return None


_RATE_GROUPS = {
    rate: group
    for group in (
        frozenset({48000, 44100, 32000}),
        frozenset({24000, 22050}),
        frozenset({16000, 12000, 11025}),
        frozenset({8000}),
    )
    for rate in group
}


def _frames_units(config: AacConfig, data: bytes | memoryview, *, final: bool) -> bool:
    finder = UnitFinder(config)
    count = 0
    try:
        for _ in finder.units(data, final=final):
            count += 1
            if count >= GUESS_UNITS:
                return True
    except ConfigError:
        return False
    return final and count > 0


class Mp4MdatStream(IndexLastStream):
    """The `mdat` of an MP4/M4A/3GP whose `moov` comes after it."""

    def __init__(self, *, apple: bool, speculate: bool) -> None:
        super().__init__()
        self._apple = apple
        self._speculate = speculate
        self.codec = ""
        self._config: AacConfig | None = None
        self._index: bytes | None = None
        self._mdat_left = 0
        self._fragment_sizes: list[int] = []
        self._step = self._top_box

    # --- top-level boxes: skipped before the mdat, the moov kept after it ------------------

    def _top_box(self, final: bool) -> bool:
        header = box_header(self._pending.view(16))
        if header is None:
            return False
        kind, size, header_size = header
        self._pending.skip(header_size)
        payload = -1 if size < 0 else size - header_size
        if kind == b"mdat" and not self.codec:
            self._mdat_left = payload
            self._step = self._detect
        elif kind == b"moov" and self.codec:
            self._collect(payload, MAX_INDEX_BYTES, self._keep_index)
        else:
            self._skip(payload, self._top_box)
        return True

    def _keep_index(self, payload: bytes) -> None:
        self._index = payload
        self._step = self._top_box

    def _after_mdat(self, final: bool) -> bool:
        self._step = self._top_box
        return True

    # --- what the mdat holds --------------------------------------------------------------

    def _detect(self, final: bool) -> bool:
        whole = self._mdat_left >= 0 and len(self._pending) >= self._mdat_left
        if len(self._pending) < GUESS_BYTES and not whole and not final:
            return False
        sample = self._pending.view(
            min(GUESS_BYTES, self._mdat_left) if self._mdat_left >= 0 else GUESS_BYTES
        )
        done = whole or final
        for flavour in AMR_MAGIC:
            frames = amr_frames(flavour, sample, AMR_CHECK_FRAMES)
            if frames >= AMR_CHECK_FRAMES or (done and frames and _amr_spans(flavour, sample)):
                self.codec = flavour
                self._emit(AMR_MAGIC[flavour])
                self._step = self._amr_frame
                return True
        if self._raw_box(sample) == b"hoov":
            self.codec = "aac"
            self._step = self._fragments
            return True
        if not self._speculate:
            raise StreamFailed("AAC in a plain mdat is not guessed (VRAI_INDEX_LAST=exact)")
        config = guess_config(sample, apple=self._apple, final=done)
        if config is None:
            raise StreamFailed("the mdat holds neither AMR nor AAC this service can frame")
        self.codec = "aac"
        self.certainty = Certainty.GUESSED
        self._use(config)
        return True

    def _use(self, config: AacConfig) -> None:
        self._config = config
        self._frame_units(UnitFinder(config), self._mdat_left, self._after_mdat, self._at_unit)

    def _amr_frame(self, final: bool) -> bool:
        if self._mdat_left == 0:
            self._step = self._after_mdat
            return True
        if not self._pending:
            return False
        size = amr_frame_size(self.codec, self._pending.view(1)[0])
        if size < 0:
            raise StreamFailed("an AMR frame header is not one")
        if self._mdat_left >= 0 and size > self._mdat_left:
            raise StreamFailed("an AMR frame runs past the mdat")
        if len(self._pending) < size:
            if final:
                raise StreamFailed("the upload ends inside an AMR frame")
            return False
        self._emit(self._pending.take(size))
        self.unit_sizes.append(size)
        if self._mdat_left > 0:
            self._mdat_left -= size
        return True

    def _raw_box(self, data: memoryview) -> bytes | None:
        """The type of the box at the start of `data`, if one of Voice Memos' begins there."""
        if len(data) < 8 or bytes(data[4:8]) not in (b"hoov", b"moof", b"free"):
            return None
        return bytes(data[4:8])

    def _at_unit(self, data: memoryview) -> bool:
        """At a unit boundary in the raw AAC: a `hoov` there starts Voice Memos' fragments."""
        if self._raw_box(data) != b"hoov":
            return False
        if self._mdat_left >= 0:  # `_frame_units` counted the raw units down on its own
            self._mdat_left -= sum(self.unit_sizes)
        self._step = self._fragments
        return True

    # --- Voice Memos: hoov, then moof + mdat fragments, all inside the outer mdat ----------

    def _fragments(self, final: bool) -> bool:
        if self._mdat_left == 0:
            self._step = self._after_mdat
            return True
        header = box_header(self._pending.view(16))
        if header is None:
            if final:
                raise StreamFailed("the upload ends inside a fragment's header")
            return False
        kind, size, header_size = header
        if size < 0 or (self._mdat_left >= 0 and size > self._mdat_left):
            raise StreamFailed(f"a {kind!r} box runs past the mdat")
        self._pending.skip(header_size)
        self._mdat_left -= header_size if self._mdat_left >= 0 else 0
        payload = size - header_size
        if kind in (b"hoov", b"moof"):
            keep = self._keep_hoov if kind == b"hoov" else self._keep_moof
            self._collect(payload, MAX_BOX_BYTES, keep)
        elif kind == b"mdat":
            sizes, self._fragment_sizes = self._fragment_sizes, []
            if sum(sizes) != payload:
                raise StreamFailed("a fragment's samples do not fill its mdat")
            self._step = self._samples(sizes)
        else:
            self._skip(payload, self._fragments)
            self._mdat_left -= payload if self._mdat_left >= 0 else 0
        return True

    def _keep_hoov(self, payload: bytes) -> None:
        self._mdat_left -= len(payload) if self._mdat_left >= 0 else 0
        track = read_track(payload)
        if track.config is None:
            raise StreamFailed(f"the hoov describes {track.codec or 'no audio'}, not AAC")
        if self._config is not None and track.config != self._config:
            raise StreamFailed(
                f"guessed {self._config.describe()}, the hoov says {track.config.describe()}"
            )
        self._config = track.config  # every sample's size comes from a moof from here on
        self.certainty = Certainty.EXACT  # the guess, if any, was checked against the hoov
        self._step = self._fragments

    def _keep_moof(self, payload: bytes) -> None:
        self._mdat_left -= len(payload) if self._mdat_left >= 0 else 0
        self._fragment_sizes = fragment_sample_sizes(payload)
        self._step = self._fragments

    def _samples(self, sizes: list[int]) -> Callable[[bool], bool]:
        if any(size > aac.ADTS_MAX_FRAME_BYTES - aac.ADTS_HEADER_BYTES for size in sizes):
            raise StreamFailed("a fragment's sample is larger than an access unit can be")
        remaining = iter(sizes)
        current = next(remaining, None)

        def step(final: bool) -> bool:
            nonlocal current
            if current is None:
                self._step = self._fragments
                return True
            if len(self._pending) < current:
                if final:
                    raise StreamFailed("the upload ends inside a sample")
                return False
            assert self._config is not None
            unit = self._pending.take(current)
            self._emit(self._config.adts_header(current) + unit)
            self.unit_sizes.append(current)
            self._mdat_left -= current if self._mdat_left >= 0 else 0
            current = next(remaining, None)
            return True

        return step

    # --- the check --------------------------------------------------------------------------

    def _check(self) -> Verdict:
        if self._index is None:
            return Verdict(False, "no moov came after the mdat")
        track = read_track(self._index)
        problem = self._disagreement(track)
        if problem:
            return Verdict(False, problem)
        return Verdict(True, declared_seconds=track.declared_seconds)

    def _disagreement(self, track: TrackIndex) -> str:
        if track.codec != self.codec:
            return f"streamed as {self.codec}, the moov says {track.codec}"
        if track.config is not None and track.config != self._config:
            assert self._config is not None
            return f"guessed {self._config.describe()}, the moov says {track.config.describe()}"
        if track.priming or not track.plain_edit_list:
            return f"the edit list skips {track.priming} samples at the start; none were"
        found = self.unit_sizes
        declared = track.sample_sizes
        if self.codec in AMR_MAGIC:
            # A 3GP sample may hold several AMR frames: compare the bytes they add up to.
            if self._output_wanted and sum(declared) != sum(found):
                return "the moov's samples do not add up to the AMR frames streamed"
            return ""
        if declared[: len(found)] != found or (self._output_wanted and len(declared) != len(found)):
            return "the moov's sample sizes disagree with the access units found"
        return ""


def _amr_spans(flavour: str, data: memoryview) -> bool:
    """Do `flavour`'s frames cover `data` exactly (a short mdat, whole)?"""
    position = 0
    while position < len(data):
        size = amr_frame_size(flavour, data[position])
        if size < 0:
            return False
        position += size
    return position == len(data)


def open_stream(container: str, head: bytes, *, speculate: bool) -> IndexLastStream | None:
    """The stream for an index-last upload whose first bytes are `head`; None where none
    applies (ALAC and other codecs in CAF: see the README's table)."""
    if container == "caf":
        caf = read_caf_head(head)
        return CafAacStream(caf) if caf is not None else None
    if container in ("mp4", "3gp", "mov"):
        brand = head[8:12] if head[4:8] == b"ftyp" else b"qt  "
        return Mp4MdatStream(apple=brand in APPLE_BRANDS, speculate=speculate)
    return None
