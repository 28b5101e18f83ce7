"""Index-last streams alone (`media/index_last`, `media/aac`, `media/mp4_index`), no server.

What they hand ffmpeg decodes to exactly the samples ffmpeg decodes from the file itself
(Debian's ffmpeg, the image's), for every index-last layout; the bytes out do not depend on
how the upload was cut into chunks; guesses follow the rate groups a trial decode can tell
apart; and random or hostile bytes never raise, never hold more than a bounded buffer, and
never get a stream confirmed.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import threading
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrai_stream.media.aac import AacConfig, UnitFinder, parse_audio_specific_config
from vrai_stream.media.index_last import (
    MAX_INDEX_BYTES,
    Certainty,
    IndexLastStream,
    guess_config,
    open_stream,
)
from vrai_stream.media.sniff import SNIFF_LIMIT_BYTES, sniff
from vrai_stream.pipeline.framing import Arrivals, frame_spool
from vrai_stream.spool import Budget, FileSpool

from .support.phone_media import (
    DEBIAN_FFMPEG,
    PhoneFile,
    ffmpeg,
    parse_adts,
    phone_files,
    write_aac_caf,
)

INDEX_LAST = {
    "caf-aac-pakt-last": Certainty.EXACT,
    "m4a-moov-last": Certainty.GUESSED,
    "m4a-voice-memos": Certainty.EXACT,
    "3gp-amr": Certainty.EXACT,
}


@pytest.fixture(scope="module")
def phones(media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhoneFile]:
    return phone_files(tmp_path_factory.getbasetemp() / "phones", media / "sentence.wav")


def stream_for(data: bytes) -> IndexLastStream:
    layout = sniff(data[:SNIFF_LIMIT_BYTES], complete=True)
    assert layout is not None
    stream = open_stream(layout.container, data[:SNIFF_LIMIT_BYTES], speculate=True)
    assert stream is not None
    return stream


def framed(data: bytes, cuts: list[int]) -> tuple[bytes, IndexLastStream]:
    stream = stream_for(data)
    out = []
    previous = 0
    for cut in [*sorted(cuts), len(data)]:
        out.append(stream.feed(data[previous:cut]))
        previous = cut
    out.append(stream.finish())
    return b"".join(out), stream


def pcm_digest(source: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(
        [DEBIAN_FFMPEG, "-v", "error", "-i", source, "-f", "s16le", "pipe:1"],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert len(done.stdout) > 16_000
    return hashlib.sha256(done.stdout).hexdigest()


@pytest.mark.parametrize("name", list(INDEX_LAST))
def test_what_is_streamed_decodes_to_the_files_own_samples(
    short_index_last: dict[str, Path], name: str
) -> None:
    """Piped into ffmpeg, the stream gives the very samples ffmpeg reads from the file."""
    path = short_index_last[name]
    data = path.read_bytes()
    out, stream = framed(data, list(range(0, len(data), 8192)))
    verdict = stream.verdict()
    assert verdict.holds, verdict
    assert stream.certainty is INDEX_LAST[name]
    assert pcm_digest("pipe:0", out) == pcm_digest(str(path))


@pytest.fixture(scope="module")
def short_index_last(
    phones: dict[str, PhoneFile], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The index-last fixtures, but the AAC ones made from the 10 s clip, not the 6.5 MB
    recordings of the phone matrix (those are long to defeat ffmpeg's probe, not needed here)."""
    folder = tmp_path_factory.mktemp("short-index-last")
    clip = phones["adts-aac"].path
    caf = folder / "pakt-last.caf"
    write_aac_caf(caf, parse_adts(clip.read_bytes()), valid_frames=480_000, priming=0,
                  pakt_first=False)  # fmt: skip
    m4a = folder / "moov-last.m4a"
    ffmpeg("-i", str(clip), "-c", "copy", "-bsf:a", "aac_adtstoasc", str(m4a))
    return {
        "caf-aac-pakt-last": caf,
        "m4a-moov-last": m4a,
        "m4a-voice-memos": phones["m4a-voice-memos"].path,
        "3gp-amr": phones["3gp-amr"].path,
    }


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_the_chunks_do_not_matter(phones: dict[str, PhoneFile], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(["m4a-voice-memos", "3gp-amr"]))
    recording = phones[name].read()
    cuts = data.draw(st.lists(st.integers(0, len(recording)), max_size=40))
    whole, _ = framed(recording, [])
    pieces, stream = framed(recording, cuts)
    assert pieces == whole
    assert stream.verdict().holds


def test_one_byte_at_a_time_around_the_hoov(phones: dict[str, PhoneFile]) -> None:
    """Voice Memos' boxes inside the mdat, arriving byte by byte, are found all the same."""
    recording = phones["m4a-voice-memos"].read()
    hoov = recording.index(b"hoov")
    whole, _ = framed(recording, [])
    pieces, stream = framed(recording, list(range(hoov - 600, hoov + 2000)))
    assert pieces == whole and stream.verdict().holds


# --- guesses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "apple", "guessed"),
    [
        (48000, True, 48000),
        (44100, False, 44100),
        (44100, True, 48000),  # same tables as 48 kHz: the prior decides, the moov checks
        (22050, False, 22050),
        (16000, False, 16000),
        (8000, False, 8000),
    ],
)
def test_a_guess_finds_the_rate_group_and_takes_the_prior_within_it(
    tmp_path: Path, phones: dict[str, PhoneFile], rate: int, apple: bool, guessed: int
) -> None:
    clip = next(iter(phones.values())).path.parent / "clip.wav"
    target = tmp_path / "clip.aac"
    ffmpeg("-i", str(clip), "-ar", str(rate), "-c:a", "aac", "-b:a", "32k", "-f", "adts",
           str(target))  # fmt: skip
    stream = parse_adts(target.read_bytes())
    config = guess_config(b"".join(stream.packets), apple=apple, final=True)
    assert config is not None
    assert (config.sample_rate, config.channels, config.object_type) == (guessed, 1, 2)


def test_random_bytes_are_no_aac_in_any_configuration() -> None:
    noise = random.Random(7).randbytes(20_000)
    assert guess_config(noise, apple=True, final=True) is None


def test_the_finder_splits_access_units_at_their_true_sizes(phones: dict[str, PhoneFile]) -> None:
    clip = (phones["adts-aac"].path).read_bytes()
    stream = parse_adts(clip)
    finder = UnitFinder(parse_audio_specific_config(stream.asc))
    sizes = list(finder.units(b"".join(stream.packets), final=True))
    assert sizes == [len(packet) for packet in stream.packets]


def test_an_adts_header_says_the_units_length() -> None:
    header = AacConfig(2, 4, 1).adts_header(200)
    assert header[:2] == b"\xff\xf1"
    assert ((header[3] & 3) << 11) | (header[4] << 3) | (header[5] >> 5) == 207


# --- hostile bytes -----------------------------------------------------------------------------


HEADS = {
    "m4a": bytes.fromhex("0000001c667479704d344120000000004d34412069736f6d6d703432"),
    "3gp": bytes.fromhex("0000001866747970336770340000000069736f6d33677034"),
}


@settings(max_examples=60, deadline=None)
@given(
    head=st.sampled_from(sorted(HEADS)),
    body=st.binary(max_size=6000),
    pieces=st.integers(1, 9),
)
def test_random_bytes_after_an_mp4_head_never_raise_nor_confirm(
    head: str, body: bytes, pieces: int
) -> None:
    data = HEADS[head] + body
    stream = stream_for(data)
    step = max(1, len(data) // pieces)
    for start in range(0, len(data), step):
        stream.feed(data[start : start + step])
    stream.finish()
    assert not stream.verdict().holds


def test_an_index_larger_than_its_cap_is_not_kept() -> None:
    """A moov claiming 1 GB after a short AMR mdat: refused at once, nothing gathered."""
    amr = bytes([0x3C]) + bytes(31)
    mdat = (8 + 32 * 60).to_bytes(4, "big") + b"mdat" + amr * 60
    moov_head = (MAX_INDEX_BYTES + 9).to_bytes(4, "big") + b"moov"
    stream = stream_for(HEADS["3gp"] + mdat + moov_head)
    stream.feed(HEADS["3gp"] + mdat + moov_head + bytes(100_000))
    assert stream.failure is not None and "limit" in stream.failure
    stream.finish()
    assert not stream.verdict().holds


# --- the framer follows the spool to its very end -------------------------------------------


class _Recorder:
    """An index-last stream that keeps what it is fed; the first time it is fed nothing (the
    framer found no new byte), it holds the framer there until the test lets it go."""

    def __init__(self) -> None:
        self.fed = bytearray()
        self.found_nothing = threading.Event()
        self.go_on = threading.Event()

    def feed(self, piece: bytes) -> bytes:
        if not piece and not self.found_nothing.is_set():
            self.found_nothing.set()
            self.go_on.wait(10)
        self.fed += piece
        return b""

    def finish(self) -> bytes:
        return b""

    def stop_output(self) -> None:
        pass


class _ReadingFfmpeg:
    reading = True

    async def feed(self, chunk: bytes) -> None:
        pass


@pytest.mark.anyio
async def test_the_framer_reads_what_was_written_as_the_body_ended(tmp_path: Path) -> None:
    """The body's last bytes and its end arrive while the framer has just found nothing new:
    it must still read them before it finishes (it once stopped short of them)."""
    spool = FileSpool(disk=Budget(None), tmp_dir=tmp_path)
    recorder = _Recorder()
    arrivals = Arrivals()
    spool.write(b"first")
    spool.flush()
    arrivals.more(5)
    async with anyio.create_task_group() as group:
        group.start_soon(frame_spool, recorder, spool, arrivals, _ReadingFfmpeg())  # type: ignore[arg-type]
        await anyio.to_thread.run_sync(recorder.found_nothing.wait, 10)
        spool.write(b", last")
        spool.finish()
        arrivals.end()
        recorder.go_on.set()
    spool.close()
    assert bytes(recorder.fed) == b"first, last"
