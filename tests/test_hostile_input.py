"""Whoever can upload can send anything: nothing may read other files, nothing may hang.

Part one plants a marker recording ("secret marker seven") on the server's disk and sends
uploads built to make ffmpeg open it: HLS playlists, ffconcat and concat scripts, a
QuickTime data reference (`dref` alias), and playlists dressed as the layouts that go to
disk first (SEEKABLE mode, where ffmpeg may open the service's own spool `file:`).  Each
is refused with a 4xx, and no response, JSON or MP3, carries the marker.  Controls run
Debian's ffmpeg without the service's whitelists on the same bytes, to show that each
attack would have worked.

Part two is a corpus of bad inputs: empty, one byte, text, random bytes, truncated heads of
every phone format, corrupted middles, video without audio, headers that claim terabytes or
days, and a tiny file that decodes to hours of silence.  Each gets a 4xx with a stable code
and a readable message within a bounded time, never a 5xx, and leaves nothing behind.
Where damaged audio still decodes in part, a 200 is the right answer: those cases are
listed in PARTIAL_DECODE_OK, each with its reason.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import struct
import subprocess
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from .support.audio import SENTENCE_WORDS, has_words, speak
from .support.client import chunked
from .support.phone_media import (
    CAF_HEADER,
    DEBIAN_FFMPEG,
    FIXTURE_NAMES,
    LPCM_DESC,
    PhoneFile,
    box,
    caf_chan,
    caf_chunk,
    caf_data,
    caf_desc,
    esds_descriptor,
    ffmpeg,
    full_box,
    phone_files,
)
from .support.server import Server

pytestmark = pytest.mark.anyio

MARKER_TEXT = "Secret marker seven. Secret marker seven."
MARKER_WORDS = ("secret", "marker", "seven", " 7")
REFUSAL_CODES = {"unsupported_format", "undecodable_audio", "no_audio_in_window"}
STABLE_CODES = REFUSAL_CODES | {"empty_body"}
BOUND_SECONDS = 20.0


@pytest.fixture(scope="session")
def phones(media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhoneFile]:
    return phone_files(tmp_path_factory.getbasetemp() / "phones", media / "sentence.wav")


# --- helpers --------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    content_type: str
    text: str
    content: bytes
    seconds: float

    def json(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.content)
        return data


async def upload(
    server: Server, data: bytes, *, query: str = "fromTime=0&toTime=10", mp3: bool = False
) -> Reply:
    headers = {"Accept": "audio/mpeg"} if mp3 else {}
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await client.post(
            f"/v1/transcriptions?{query}", content=chunked(data), headers=headers
        )
    content_type = response.headers.get("content-type", "")
    return Reply(
        status=response.status_code,
        content_type=content_type,
        text="" if content_type.startswith("audio/") else response.text,
        content=response.content,
        seconds=time.monotonic() - started,
    )


def assert_refused(reply: Reply, server: Server, codes: set[str] = REFUSAL_CODES) -> str:
    """A 4xx in the service's error shape, with a stable code and a message for people."""
    assert 400 <= reply.status < 500, (reply.status, reply.text[:300])
    assert reply.content_type.startswith("application/json"), reply.content_type
    body = reply.json()
    assert body["success"] is False
    assert body["status"] == reply.status
    assert body["code"] in codes, body
    message = str(body["message"])
    assert 10 <= len(message) <= 400, message
    assert str(server.tmp_dir) not in message and "0x" not in message, message
    assert "Traceback" not in message
    return str(body["code"])


def decoded_seconds(data: bytes, *args: str) -> float:
    """Seconds of audio Debian's ffmpeg gets out of `data` on stdin, with `args` before -i."""
    done = subprocess.run(
        [DEBIAN_FFMPEG, "-v", "quiet", *args, "-i", "pipe:0", "-t", "30", "-ac", "1",
         "-ar", "8000", "-f", "s16le", "pipe:1"],
        input=data, capture_output=True, timeout=60,
    )  # fmt: skip
    return len(done.stdout) / 16_000


def file_decoded_seconds(path: Path, *args: str) -> float:
    """The same, for a file ffmpeg opens itself (as in SEEKABLE mode)."""
    done = subprocess.run(
        [DEBIAN_FFMPEG, "-v", "quiet", *args, "-protocol_whitelist", "file", "-i",
         f"file:{path}", "-t", "30", "-ac", "1", "-ar", "8000", "-f", "s16le", "pipe:1"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    return len(done.stdout) / 16_000


# --- the marker and the attacks ---------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    folder: Path
    wav: Path
    aac: Path


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Marker:
    folder = tmp_path_factory.mktemp("marker")
    wav = speak(MARKER_TEXT, folder / "marker.wav")
    aac = folder / "marker.aac"
    ffmpeg("-i", str(wav), "-c:a", "aac", "-f", "adts", str(aac))
    return Marker(folder, wav, aac)


@pytest.fixture(scope="module")
def planted(server: Server, marker: Marker) -> Iterator[Path]:
    """The marker next to the server's spool folder, where a relative reference could reach."""
    target = server.tmp_dir.parent
    copies = [target / "marker.wav", target / "marker.aac"]
    shutil.copyfile(marker.wav, copies[0])
    shutil.copyfile(marker.aac, copies[1])
    yield target
    for copy in copies:
        copy.unlink(missing_ok=True)


def hls_playlist(*entries: str) -> bytes:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:10"]
    for entry in entries:
        lines += ["#EXTINF:10.0,", entry]
    return ("\n".join([*lines, "#EXT-X-ENDLIST", ""])).encode()


def id3_tag(payload_frames: bytes = b"") -> bytes:
    frames = payload_frames or (b"TIT2" + struct.pack(">I", 6) + b"\0\0" + b"\x03note\0")
    size = len(frames)
    syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x03\x00\x00" + syncsafe + frames


MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def alias_record(posix_path: str, *, nlvl_from: int, nlvl_to: int = 1) -> bytes:
    """A classic Mac OS alias record, as QuickTime reference movies carry in `dref`."""
    volume = b"Macintosh HD"
    name = posix_path.rsplit("/", 1)[-1].encode()
    hfs_path = volume + posix_path.replace("/", ":").encode()
    record = b"\0" * 10  # creator type, record size, version, kind
    record += bytes([len(volume)]) + volume.ljust(27, b"\0")
    record += b"\0" * 12  # volume date, file system, disk type, parent directory id
    record += bytes([len(name)]) + name.ljust(63, b"\0")
    record += b"\0" * 16  # file number, date, type, creator
    record += struct.pack(">hh", nlvl_from, nlvl_to)
    record += b"\0" * 16  # volume attributes, file system id, reserved
    padded = hfs_path + (b"\0" if len(hfs_path) % 2 else b"")
    record += struct.pack(">hh", 2, len(hfs_path)) + padded  # 2: absolute path
    return record + struct.pack(">hh", -1, 0)


def reference_movie(wav: Path, *, nlvl_from: int, moov_last: bool) -> bytes:
    """A QuickTime movie whose only track's samples live in another file: `wav`'s PCM."""
    with wave.open(str(wav)) as reader:
        rate, frames = reader.getframerate(), reader.getnframes()
    pcm_offset = wav.read_bytes().index(b"data") + 8
    mvhd = full_box(
        b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, rate, frames), struct.pack(">IH", 0x10000, 0x100),
        b"\0" * 10, MATRIX, b"\0" * 24, struct.pack(">I", 2),
    )  # fmt: skip
    tkhd = full_box(
        b"tkhd", 0, 7, struct.pack(">IIIII", 0, 0, 1, 0, frames), b"\0" * 8,
        struct.pack(">HHHH", 0, 0, 0x100, 0), MATRIX, struct.pack(">II", 0, 0),
    )  # fmt: skip
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, rate, frames, 0x55C4, 0))
    hdlr = full_box(b"hdlr", 0, 0, b"mhlr", b"soun", b"\0" * 12, b"\0")
    alias = full_box(b"alis", 0, 0, alias_record(f"/Users/me/{wav.name}", nlvl_from=nlvl_from))
    dref = full_box(b"dref", 0, 0, struct.pack(">I", 1), alias)
    sowt = box(
        b"sowt", b"\0" * 6, struct.pack(">H", 1),  # data reference 1: the alias
        struct.pack(">HHI", 0, 0, 0), struct.pack(">HHHHI", 1, 16, 0, 0, rate << 16),
    )  # fmt: skip
    stbl = box(
        b"stbl",
        full_box(b"stsd", 0, 0, struct.pack(">I", 1), sowt),
        full_box(b"stts", 0, 0, struct.pack(">III", 1, frames, 1)),
        full_box(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, frames, 1)),
        full_box(b"stsz", 0, 0, struct.pack(">II", 2, frames)),
        full_box(b"stco", 0, 0, struct.pack(">II", 1, pcm_offset)),
    )
    minf = box(b"minf", full_box(b"smhd", 0, 0, b"\0" * 4), box(b"dinf", dref), stbl)
    moov = box(b"moov", mvhd, box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, minf)))
    ftyp = box(b"ftyp", b"qt  ", struct.pack(">I", 0x200), b"qt  ")
    mdat = box(b"mdat", b"\0" * 4096)
    return ftyp + (mdat + moov if moov_last else moov + mdat)


def attacks(marker: Marker, phones: dict[str, PhoneFile]) -> dict[str, bytes]:
    aac, wav = str(marker.aac), str(marker.wav)
    playlist = hls_playlist(f"file:{aac}")
    ftyp = box(b"ftyp", b"M4A ", struct.pack(">I", 0), b"M4A isom")
    return {
        "hls-file-url": playlist,
        "hls-plain-path": hls_playlist(aac),
        "hls-relative-path": hls_playlist("marker.aac"),
        "hls-behind-id3-tag": id3_tag() + playlist,
        "ffconcat-file-url": f"ffconcat version 1.0\nfile 'file:{wav}'\n".encode(),
        "ffconcat-relative": b"ffconcat version 1.0\nfile marker.wav\n",
        "concat-list": f"file '{wav}'\nfile 'file:{wav}'\n".encode(),
        "quicktime-dref-alias-moov-last": reference_movie(marker.wav, nlvl_from=2, moov_last=True),
        "quicktime-dref-alias-moov-first": reference_movie(
            marker.wav, nlvl_from=2, moov_last=False
        ),
        # SEEKABLE mode: the sniffer sees MP4 or CAF magic first; ffmpeg reads a file.
        "playlist-in-mdat-of-moov-less-mp4": ftyp + box(b"mdat", playlist),
        "playlist-right-after-ftyp": ftyp + playlist,
        "playlist-after-caff-magic": CAF_HEADER + playlist,
        "playlist-after-caf-desc": CAF_HEADER
        + caf_desc(b"aac ", sample_rate=48000, channels=1, frames_per_packet=1024)
        + caf_data(playlist),
        "moov-last-m4a-then-playlist": phones["m4a-moov-last"].read() + b"\n" + playlist,
    }


ATTACK_IDS = (
    "hls-file-url",
    "hls-plain-path",
    "hls-relative-path",
    "hls-behind-id3-tag",
    "ffconcat-file-url",
    "ffconcat-relative",
    "concat-list",
    "quicktime-dref-alias-moov-last",
    "quicktime-dref-alias-moov-first",
    "playlist-in-mdat-of-moov-less-mp4",
    "playlist-right-after-ftyp",
    "playlist-after-caff-magic",
    "playlist-after-caf-desc",
    "moov-last-m4a-then-playlist",
)
REAL_RECORDING = {"moov-last-m4a-then-playlist"}
"""A real recording with junk after it: its own words come back (200), never the marker's."""


@pytest.fixture(scope="module")
def attack_bodies(marker: Marker, phones: dict[str, PhoneFile]) -> dict[str, bytes]:
    bodies = attacks(marker, phones)
    assert tuple(bodies) == ATTACK_IDS
    return bodies


def has_marker(text: str) -> bool:
    return has_words(text, MARKER_WORDS, at_least=1)


def test_the_attacks_would_read_the_marker_without_the_whitelists(
    marker: Marker, attack_bodies: dict[str, bytes]
) -> None:
    """Controls: Debian's ffmpeg 5.1 opens the marker when only the protocols are limited."""
    assert file_decoded_seconds(marker.wav) > 1.5
    # Piped in, with `file` allowed and no demuxer whitelist: HLS opens the marker.
    for name in ("hls-file-url", "hls-behind-id3-tag"):
        seconds = decoded_seconds(attack_bodies[name], "-protocol_whitelist", "pipe,file")
        assert seconds > 1.5, name
    # As a spooled file next to the marker (SEEKABLE mode's setting): concat opens a sibling.
    script = marker.folder / "upload.input"
    script.write_bytes(attack_bodies["ffconcat-relative"])
    assert file_decoded_seconds(script) > 1.5
    # A reference movie two levels down reaches the marker, once ffmpeg follows aliases.
    spool = marker.folder / "server" / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    movie = spool / "upload.input"
    movie.write_bytes(attack_bodies["quicktime-dref-alias-moov-last"])
    shutil.copyfile(marker.wav, marker.folder / "server" / "marker.wav")
    assert file_decoded_seconds(movie, "-enable_drefs", "1") > 1.5
    assert file_decoded_seconds(movie) == 0.0  # ffmpeg's default: aliases are not followed


@pytest.mark.parametrize("answer", ["json", "mp3"])
@pytest.mark.parametrize("name", ATTACK_IDS)
async def test_no_upload_can_read_the_marker(
    server: Server,
    planted: Path,
    marker: Marker,
    attack_bodies: dict[str, bytes],
    phones: dict[str, PhoneFile],
    name: str,
    answer: str,
) -> None:
    data = attack_bodies[name]
    reply = await upload(server, data, mp3=answer == "mp3")
    assert reply.seconds < BOUND_SECONDS
    assert str(marker.folder) not in reply.text and str(planted) not in reply.text
    if name in REAL_RECORDING:
        assert reply.status == 200, reply.text
        if answer == "json":
            transcript = str(reply.json()["transcription"])
            assert has_words(transcript, SENTENCE_WORDS, at_least=3), transcript
            assert not has_marker(transcript), transcript
        else:
            # The MP3 is the one the recording alone gives, byte for byte: nothing was added.
            alone = await upload(server, phones["m4a-moov-last"].read(), mp3=True)
            assert alone.status == 200
            assert reply.content == alone.content
    else:
        assert_refused(reply, server)
        assert not has_marker(reply.text)
    server.wait_idle()


# --- the corpus of bad inputs -----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    data: bytes
    query: str = "fromTime=0&toTime=10"
    codes: frozenset[str] = frozenset(STABLE_CODES)


TRUNCATIONS = (10, 100, 1000)
SIMPLE_CASES = (
    "empty",
    "one-byte",
    "text",
    "json-document",
    "random-64k",
    "random-2mb",
    "random-after-wav-magic",
    "video-only-mp4",
    "video-only-webm",
    "wav-header-claims-4gb",
    "rf64-claims-a-terabyte",
    "caf-lpcm-claims-exabytes",
    "caf-aac-pakt-claims-billions-of-packets",
    "caf-aac-pakt-claims-80-million-packets",
    "mp4-claims-days-with-no-samples",
    "mp3-xing-claims-days",
    "flac-3-hours-of-silence-window-past-the-end",
    "flac-3-hours-of-silence",
)
CORPUS_IDS = (
    *SIMPLE_CASES,
    *(f"truncated-{name}-{n}" for name in FIXTURE_NAMES for n in TRUNCATIONS),
    *(f"corrupted-middle-{name}" for name in FIXTURE_NAMES),
)

PARTIAL_DECODE_OK: dict[str, str] = {
    "flac-3-hours-of-silence": "the window caps the output: 10 s of silence is a fair answer",
    **{
        f"corrupted-middle-{name}": "the audio before (and after) the damage decodes"
        for name in FIXTURE_NAMES
    },
    **{
        f"truncated-{name}-1000": "the first kilobyte already holds a few audio frames"
        for name in (
            "caf-lpcm",
            "caf-ima4",
            "3gp-amr-faststart",
            "webm-opus",
            "wav",
            "wav-streaming",
            "mp3-id3",
            "adts-aac",
        )
    },
}
"""Cases where a 200 is right: what survives of the audio decodes.  Anything else must be 4xx."""


def _wav_header(riff_size: int, data_size: int) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, 48000, 96000, 2, 16)
    return (
        b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", data_size)
    )  # fmt: skip


def _rf64_claiming(size: int) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, 48000, 96000, 2, 16)
    ds64 = struct.pack("<QQQI", size + 36, size, size // 2, 0)
    return (
        b"RF64" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
        + b"ds64" + struct.pack("<I", len(ds64)) + ds64
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", 0xFFFFFFFF)
    )  # fmt: skip


def _aac_caf_claiming(packets: int) -> bytes:
    asc = struct.pack(">H", (2 << 11) | (3 << 7) | (1 << 3))
    cookie = esds_descriptor(asc, avg_bitrate=64000, max_bitrate=64000, buffer_size=768)
    pakt = caf_chunk(b"pakt", struct.pack(">qqii", packets, packets * 1024, 0, 0) + b"\x81\x00" * 8)
    return (
        CAF_HEADER
        + caf_desc(b"aac ", sample_rate=48000, channels=1, frames_per_packet=1024)
        + caf_chan(1)
        + caf_chunk(b"kuki", cookie)
        + pakt
        + caf_data(b"\0" * 1024)
    )


def mp4_claiming(samples: int, *, tracks: int = 1, sample_size: int = 6, days: int = 30) -> bytes:
    """`tracks` AAC tracks whose tables each declare `samples` packets and `days` of audio,
    in about 500 bytes a track."""
    rate = 48000
    duration = min(days * 86400 * 1000, 0xFFFFFFFF)
    mvhd = full_box(
        b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, duration),
        struct.pack(">IH", 0x10000, 0x100), b"\0" * 10, MATRIX, b"\0" * 24, struct.pack(">I", 2),
    )  # fmt: skip
    tkhd = full_box(
        b"tkhd", 0, 7, struct.pack(">IIIII", 0, 0, 1, 0, duration), b"\0" * 8,
        struct.pack(">HHHH", 0, 0, 0x100, 0), MATRIX, struct.pack(">II", 0, 0),
    )  # fmt: skip
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, rate, 0xFFFFFFFF, 0x55C4, 0))
    hdlr = full_box(b"hdlr", 0, 0, b"\0\0\0\0", b"soun", b"\0" * 12, b"\0")
    dref = full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1))
    asc = struct.pack(">H", (2 << 11) | (3 << 7) | (1 << 3))
    esds = full_box(
        b"esds", 0, 0, esds_descriptor(asc, avg_bitrate=64000, max_bitrate=64000, buffer_size=768)
    )
    mp4a = box(
        b"mp4a", b"\0" * 6, struct.pack(">H", 1), b"\0" * 8,
        struct.pack(">HHHHI", 1, 16, 0, 0, rate << 16), esds,
    )  # fmt: skip
    ftyp = box(b"ftyp", b"M4A ", struct.pack(">I", 0), b"M4A isom")

    def moov(chunk_offset: int) -> bytes:
        stbl = box(
            b"stbl",
            full_box(b"stsd", 0, 0, struct.pack(">I", 1), mp4a),
            full_box(b"stts", 0, 0, struct.pack(">III", 1, samples, 1024)),
            full_box(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, samples, 1)),
            full_box(b"stsz", 0, 0, struct.pack(">II", sample_size, samples)),
            full_box(b"stco", 0, 0, struct.pack(">II", 1, chunk_offset)),
        )
        minf = box(b"minf", full_box(b"smhd", 0, 0, b"\0" * 4), box(b"dinf", dref), stbl)
        trak = box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, minf))
        return box(b"moov", mvhd, trak * tracks)

    offset = len(ftyp) + len(moov(0)) + 8
    return ftyp + moov(offset) + box(b"mdat", b"\0" * 512)


def _mp3_with_xing_claiming(frames: int) -> bytes:
    """One silent MPEG-1 layer III frame whose Xing header claims `frames` frames."""
    header = bytes([0xFF, 0xFB, 0x90, 0xC4])  # 128 kb/s, 44.1 kHz, mono: 417 bytes a frame
    frame = bytearray(417)
    frame[:4] = header
    xing_at = 4 + 17
    frame[xing_at : xing_at + 16] = b"Xing" + struct.pack(
        ">III", 0x3, frames, min(frames * 417, 0xFFFFFFFF)
    )
    return id3_tag() + bytes(frame)


def _video_only(folder: Path, extension: str, codec: list[str]) -> bytes:
    path = folder / f"video-only.{extension}"
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=2", *codec, "-an", str(path)
    )  # fmt: skip
    return path.read_bytes()


def _silence_flac(folder: Path, seconds: int) -> bytes:
    path = folder / "silence.flac"
    ffmpeg(
        "-f", "lavfi", "-i", f"anullsrc=r=8000:cl=mono:d={seconds}",
        "-c:a", "flac", "-frame_size", "32768", str(path),
    )  # fmt: skip
    return path.read_bytes()


def _corrupt_middle(data: bytes, rng: random.Random) -> bytes:
    third = len(data) // 3
    return data[:third] + rng.randbytes(third) + data[2 * third :]


@pytest.fixture(scope="module")
def corpus(
    phones: dict[str, PhoneFile], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Case]:
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(20240601)
    silence = _silence_flac(folder, 3 * 3600)
    assert len(silence) < 64_000  # tiny, yet three hours long
    cases: dict[str, Case] = {
        "empty": Case(b"", codes=frozenset({"empty_body"})),
        "one-byte": Case(b"\x00"),
        "text": Case(b"Hello! This is a voice note, typed instead of recorded.\n" * 40),
        "json-document": Case(
            b'{"fileBlob": "AAAA", "fromTime": 0, "toTime": 10}',
            codes=frozenset({"body_not_audio"}),
        ),
        "random-64k": Case(rng.randbytes(64 * 1024)),
        "random-2mb": Case(rng.randbytes(2 * 1024 * 1024)),
        "random-after-wav-magic": Case(b"RIFF\0\0\0\0WAVE" + rng.randbytes(4096)),
        "video-only-mp4": Case(
            _video_only(folder, "mp4", ["-c:v", "libx264", "-preset", "ultrafast"])
        ),
        "video-only-webm": Case(
            _video_only(folder, "webm", ["-c:v", "libvpx", "-deadline", "realtime"])
        ),
        "wav-header-claims-4gb": Case(_wav_header(0xFFFFFFF0, 0xFFFFFFD0)),
        "rf64-claims-a-terabyte": Case(_rf64_claiming(2**40)),
        "caf-lpcm-claims-exabytes": Case(CAF_HEADER + LPCM_DESC + caf_data(b"", size=2**62)),
        "caf-aac-pakt-claims-billions-of-packets": Case(_aac_caf_claiming(2**40)),
        "caf-aac-pakt-claims-80-million-packets": Case(_aac_caf_claiming(80_000_000)),
        "mp4-claims-days-with-no-samples": Case(mp4_claiming(1_000_000)),
        "mp3-xing-claims-days": Case(_mp3_with_xing_claiming(2**31 - 1)),
        "flac-3-hours-of-silence-window-past-the-end": Case(
            silence, query="fromTime=10900&toTime=11000", codes=frozenset({"no_audio_in_window"})
        ),
        "flac-3-hours-of-silence": Case(silence, query="fromTime=0&toTime=10"),
    }
    for name, phone in phones.items():
        data = phone.read()
        for n in TRUNCATIONS:
            cases[f"truncated-{name}-{n}"] = Case(data[:n])
        # Short clips: the damage is inside the window.  Long ones: between the window and
        # the index at the end, which ffmpeg reads first.
        cases[f"corrupted-middle-{name}"] = Case(_corrupt_middle(data, rng))
    assert set(cases) == set(CORPUS_IDS)
    return cases


@pytest.mark.parametrize("name", CORPUS_IDS)
async def test_bad_input_gets_a_clear_4xx_in_bounded_time(
    server: Server, corpus: dict[str, Case], name: str
) -> None:
    case = corpus[name]
    # The MP3 answer skips transcription: what is under test is the way to ffmpeg and back.
    reply = await upload(server, case.data, query=case.query, mp3=True)
    assert reply.seconds < BOUND_SECONDS, reply.seconds
    assert reply.status < 500, reply.text[:300]
    if reply.status == 200:
        assert name in PARTIAL_DECODE_OK, f"200 for {name}: expected a 4xx"
        assert reply.content_type == "audio/mpeg"
        assert 0 < len(reply.content) < 10.5 * 48_000 / 8 + 4096
    else:
        assert_refused(reply, server, codes=set(case.codes))
    server.wait_idle()


@pytest.mark.parametrize("name", ["m4a-moov-last", "caf-aac-pakt-last", "caf-alac"])
async def test_a_recording_cut_before_its_index_says_it_is_incomplete(
    server: Server, phones: dict[str, PhoneFile], name: str
) -> None:
    """The most common failure of an iPhone upload: the connection drops, and the index,
    written last (`moov`, `pakt`), never arrives.  The user should hear "incomplete", not
    "not an audio file"."""
    data = phones[name].read()
    reply = await upload(server, data[: len(data) // 2], mp3=True)
    code = assert_refused(reply, server)
    assert code == "undecodable_audio"
    message = str(reply.json()["message"]).lower()
    assert "incomplete" in message or "truncated" in message, message
    server.wait_idle()


# --- memory: what a tiny header may make ffmpeg allocate ---------------------------------------


class PeakChildMemory:
    """Samples the RSS of the server's children (ffmpeg) while a request runs.

    Only a child that is ffmpeg by now counts: one caught between fork and exec still maps
    the server's whole image (the local model included) and would read as ~200 MiB.
    """

    def __init__(self, server: Server) -> None:
        self._server = server
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for child in self._server.children():
                with contextlib.suppress(psutil.Error):
                    if child.name() in ("ffmpeg", "prlimit"):
                        self.peak = max(self.peak, child.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakChildMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def test_a_few_kilobytes_of_mp4_cannot_make_ffmpeg_allocate_hundreds_of_megabytes(
    server: Server,
) -> None:
    """ffmpeg builds the index of every track up front, 24 bytes a declared packet, and a
    constant-size `stsz` declares millions of packets in 20 bytes.  Eight tracks of 1.5
    million packets cost ~290 MB from a 4 KB upload; 16 tracks of 2.5 million, ~1 GB: the
    whole machine.  Each index is a block of its own (36 MB here), so a cap on single
    allocations (ffmpeg's `-max_alloc`) does not help; a cap on the process does."""
    data = mp4_claiming(1_500_000, tracks=8)
    assert len(data) < 8192
    with PeakChildMemory(server) as memory:
        reply = await upload(server, data, mp3=True)
    assert reply.seconds < BOUND_SECONDS
    assert_refused(reply, server)
    assert 0 < memory.peak < 200 * 2**20, f"ffmpeg peaked at {memory.peak / 2**20:.0f} MiB"
    server.wait_idle()
