"""Recordings as phones write them, built by the tests from a speech WAV.

Each fixture starts with half a second of quiet, then the spoken sentence, over a faint
noise bed (a phone's microphone is never silent).  The layouts ffmpeg cannot read from a
pipe (M4A with `moov` after `mdat`, CAF with `pakt` after `data`) are made larger than
6 MB by repeating that clip, so that ffmpeg's probe buffer cannot hide the problem.

ffmpeg cannot mux AAC into CAF, so `write_aac_caf` below assembles it the way Apple's
AudioFile API does: `desc`, `chan`, `kuki` holding an MPEG-4 ES descriptor, `data` (edit
count first), and the packet table `pakt` after the audio, or before it.  `write_caf` lays
out any CAF's chunks in a given order, with the chunks Apple's and other writers put
between the header chunks and `data` (`free`, `info`, `chan`, `uuid`, `mark`, `strg`).

Debian's ffmpeg (`/usr/bin/ffmpeg`, the service image's) builds every fixture but one: it
cannot encode AMR, so the 3GP/AMR-NB recording comes from the `imageio-ffmpeg` binary.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEBIAN_FFMPEG = "/usr/bin/ffmpeg" if Path("/usr/bin/ffmpeg").exists() else "ffmpeg"

RATE = 48_000
"""iPhones and most Android phones record at 48 kHz."""
CLIP_SECONDS = 10.0
SPEECH_STARTS_AT = 0.5
SPEECH_WINDOW = (0.0, 4.0)
"""fromTime/toTime that hold the whole sentence and little else: the model stays quick."""
LARGE_BYTES = 6_500_000
"""Past ffmpeg's default probesize (5 MB): a layout that needs seeking really fails on a pipe."""
NOISE_AMPLITUDE = 0.01


@dataclass(frozen=True)
class PhoneFile:
    """One recording, and what the service must say about it."""

    name: str
    path: Path
    container: str
    """The `format` the response and the log line must carry."""
    mode: str
    """`stream`, `speculative` or `seekable`: how the answer says it was decoded."""
    codec: str
    layout: str
    """How the file is laid out, for the README's matrix."""
    written_by: str
    needs_seeking: bool = False
    """True when plain `ffmpeg -i pipe:0` cannot read it (and it is larger than 6 MB)."""
    index_last: bool = False
    """Its index comes after its audio: the sniff says `seekable`, whatever streams after."""

    @property
    def sniffed_mode(self) -> str:
        return "seekable" if self.index_last else "stream"

    def read(self) -> bytes:
        return self.path.read_bytes()


# --- tools -------------------------------------------------------------------------------


def ffmpeg(*args: str, binary: str = DEBIAN_FFMPEG) -> None:
    subprocess.run(
        [binary, "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
        check=True,
        timeout=120,
    )


def amr_ffmpeg() -> str:
    """The imageio-ffmpeg wheel's binary: it has libopencore_amrnb, Debian's lacks it."""
    import imageio_ffmpeg

    found: str = imageio_ffmpeg.get_ffmpeg_exe()
    return found


# --- MP4 boxes and CAF chunks ------------------------------------------------------------


def box(kind: bytes, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def full_box(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *parts)


def caf_chunk(kind: bytes, payload: bytes, size: int | None = None) -> bytes:
    """A CAF chunk; `size` overrides the declared size (-1: unknown, as while recording)."""
    return struct.pack(">4sq", kind, len(payload) if size is None else size) + payload


CAF_HEADER = b"caff" + struct.pack(">HH", 1, 0)


def caf_desc(
    format_id: bytes,
    *,
    sample_rate: float,
    channels: int,
    flags: int = 0,
    bytes_per_packet: int = 0,
    frames_per_packet: int = 0,
    bits_per_channel: int = 0,
) -> bytes:
    return caf_chunk(
        b"desc",
        struct.pack(
            ">d4sIIIII",
            sample_rate,
            format_id,
            flags,
            bytes_per_packet,
            frames_per_packet,
            channels,
            bits_per_channel,
        ),
    )


LPCM_DESC = caf_desc(
    b"lpcm",
    sample_rate=48000,
    channels=1,
    flags=2,
    bytes_per_packet=2,
    frames_per_packet=1,
    bits_per_channel=16,
)
"""The CAF `desc` of 48 kHz mono 16-bit little-endian PCM, for the hand-built CAF heads."""


def caf_chan(channels: int) -> bytes:
    """kAudioChannelLayoutTag_Mono or _Stereo, no bitmap, no descriptions."""
    tag = (100 << 16) | 1 if channels == 1 else (101 << 16) | 2
    return caf_chunk(b"chan", struct.pack(">III", tag, 0, 0))


def _descriptor(tag: int, payload: bytes) -> bytes:
    """An MPEG-4 descriptor with the 4-byte length Apple always writes (0x80 0x80 0x80 n)."""
    assert len(payload) < 128
    return bytes([tag, 0x80, 0x80, 0x80, len(payload)]) + payload


def esds_descriptor(asc: bytes, *, avg_bitrate: int, max_bitrate: int, buffer_size: int) -> bytes:
    """The ES_Descriptor Apple writes as an AAC magic cookie (what an `esds` box holds)."""
    decoder_specific = _descriptor(0x05, asc)
    decoder_config = _descriptor(
        0x04,
        bytes([0x40, 0x15])  # MPEG-4 audio; audio stream, upstream 0, reserved 1
        + buffer_size.to_bytes(3, "big")
        + struct.pack(">II", max_bitrate, avg_bitrate)
        + decoder_specific,
    )
    sync_layer = _descriptor(0x06, b"\x02")
    return _descriptor(0x03, b"\x00\x00\x00" + decoder_config + sync_layer)


def varint(value: int) -> bytes:
    """CAF packet-table integer: big-endian groups of 7 bits, high bit set on all but the last."""
    groups = [value & 0x7F]
    value >>= 7
    while value:
        groups.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(groups))


def caf_pakt(sizes: list[int], *, valid_frames: int, priming: int, remainder: int) -> bytes:
    table = b"".join(varint(size) for size in sizes)
    return caf_chunk(
        b"pakt", struct.pack(">qqii", len(sizes), valid_frames, priming, remainder) + table
    )


def caf_data(audio: bytes, size: int | None = None) -> bytes:
    """The `data` chunk: a 4-byte edit count, then the packets."""
    return caf_chunk(b"data", struct.pack(">I", 0) + audio, size)


# --- AAC ---------------------------------------------------------------------------------

_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


@dataclass(frozen=True)
class AacStream:
    packets: list[bytes]
    asc: bytes
    """AudioSpecificConfig: object type, sampling frequency index, channel configuration."""
    sample_rate: int
    channels: int


def parse_adts(data: bytes) -> AacStream:
    """Raw AAC packets and the AudioSpecificConfig of an ADTS stream."""
    packets = []
    offset = 0
    profile = rate_index = channels = -1
    while offset + 7 <= len(data):
        header = data[offset : offset + 9]
        if header[0] != 0xFF or header[1] & 0xF6 != 0xF0:
            raise ValueError(f"lost ADTS sync at byte {offset}")
        protection_absent = header[1] & 1
        profile = header[2] >> 6
        rate_index = (header[2] >> 2) & 0xF
        channels = ((header[2] & 1) << 2) | (header[3] >> 6)
        length = ((header[3] & 0x3) << 11) | (header[4] << 3) | (header[5] >> 5)
        header_size = 7 if protection_absent else 9
        packets.append(data[offset + header_size : offset + length])
        offset += length
    object_type = profile + 1
    asc = struct.pack(">H", (object_type << 11) | (rate_index << 7) | (channels << 3))
    return AacStream(packets, asc, _AAC_RATES[rate_index], channels)


def aac_caf_chunks(aac: AacStream, *, valid_frames: int, priming: int) -> dict[str, bytes]:
    """The chunks of an AAC CAF as Apple writes them: `desc`, `chan`, `kuki`, `pakt`, `data`."""
    sizes = [len(packet) for packet in aac.packets]
    total_frames = 1024 * len(sizes)
    valid_frames = min(valid_frames, total_frames - priming)
    remainder = total_frames - priming - valid_frames
    seconds = total_frames / aac.sample_rate
    avg_bitrate = int(sum(sizes) * 8 / seconds)
    cookie = esds_descriptor(
        aac.asc, avg_bitrate=avg_bitrate, max_bitrate=avg_bitrate * 2, buffer_size=max(sizes)
    )
    return {
        "desc": caf_desc(
            b"aac ",
            sample_rate=aac.sample_rate,
            channels=aac.channels,
            flags=2,  # kMPEG4Object_AAC_LC
            frames_per_packet=1024,
        ),
        "chan": caf_chan(aac.channels),
        "kuki": caf_chunk(b"kuki", cookie),
        "pakt": caf_pakt(sizes, valid_frames=valid_frames, priming=priming, remainder=remainder),
        "data": caf_data(b"".join(aac.packets)),
    }


def write_aac_caf(
    path: Path, aac: AacStream, *, valid_frames: int, priming: int, pakt_first: bool
) -> Path:
    """AAC in CAF, laid out as Apple writes it; `pakt_first` moves the table before `data`."""
    chunks = aac_caf_chunks(aac, valid_frames=valid_frames, priming=priming)
    body = ["pakt", "data"] if pakt_first else ["data", "pakt"]
    return write_caf(path, chunks, ["desc", "chan", "kuki", *body])


# --- CAF chunks between the header chunks and the audio ------------------------------------

APPLE_DATA_ALIGNMENT = 4096
"""Apple's writers size a `free` chunk before `data` so that the audio starts at byte 4096."""


def caf_free(size: int) -> bytes:
    return caf_chunk(b"free", b"\0" * size)


def caf_info(entries: Mapping[str, str], *, room: int = 0) -> bytes:
    """`info`: a count, then key and value strings; `room` zero bytes left after them for
    later edits (ffmpeg 5.1 reads the strings, not the chunk's size)."""
    strings = b"".join(f"{key}\0{value}\0".encode() for key, value in entries.items())
    return caf_chunk(b"info", struct.pack(">I", len(entries)) + strings + b"\0" * room)


def caf_uuid(uuid: bytes, payload: bytes) -> bytes:
    """A vendor's chunk: a 16-byte UUID, then whatever the vendor keeps there."""
    assert len(uuid) == 16
    return caf_chunk(b"uuid", uuid + payload)


def caf_mark(frame_positions: Sequence[float]) -> bytes:
    """`mark`: no SMPTE time type, then per marker its type, frame position, ID, an empty
    SMPTE time and channel 0 (CAF specification, CAFMarker)."""
    markers = b"".join(
        struct.pack(">Id i 8s I", 0, position, index + 1, b"", 0)
        for index, position in enumerate(frame_positions)
    )
    return caf_chunk(b"mark", struct.pack(">II", 0, len(frame_positions)) + markers)


def caf_strg(strings: Sequence[str]) -> bytes:
    """`strg`: a count, an (ID, offset) pair per string, then the strings, NUL-terminated."""
    table = b""
    heap = b""
    for index, text in enumerate(strings):
        table += struct.pack(">Iq", index + 1, len(heap))
        heap += text.encode() + b"\0"
    return caf_chunk(b"strg", struct.pack(">I", len(strings)) + table + heap)


EXTRA_CAF_CHUNKS: dict[str, bytes] = {
    "info": caf_info(
        {"date": "2024-05-01T09:30:00+02:00", "encoding application": "Voice Notes 3.2"},
        room=64,
    ),
    "chan": caf_chan(1),
    "uuid": caf_uuid(bytes.fromhex("29b6e3a54ef24d9c8c3f1f6a1e5b2d07"), b"\x01" + b"\0" * 59),
    "mark": caf_mark([48_000.0, 96_000.0]),
    "strg": caf_strg(["Intro", "Second thought"]),
}
"""Chunks that may come between the header chunks and `data`, by name; `free` is sized
where it lands (see `write_caf`)."""


def write_caf(
    path: Path,
    chunks: Mapping[str, bytes],
    order: Sequence[str],
    *,
    align_data: int = APPLE_DATA_ALIGNMENT,
) -> Path:
    """A CAF of `chunks` (or of `EXTRA_CAF_CHUNKS`) in `order`, by name.

    A `free` in `order` is sized so that the audio after `data`'s edit count starts at the
    next multiple of `align_data` (4096, as Apple's writers do; more, to push `data` past
    the service's sniff window).
    """
    parts = [chunks[name] if name in chunks else EXTRA_CAF_CHUNKS.get(name) for name in order]
    if "free" in order:
        before = len(CAF_HEADER) + sum(len(part or b"") for part in parts[: order.index("data")])
        audio_starts = before + len(caf_free(0)) + 12 + 4  # the data chunk's header, edit count
        parts[order.index("free")] = caf_free(-audio_starts % align_data)
    missing = [name for name, part in zip(order, parts, strict=True) if part is None]
    assert not missing, f"no chunk named {missing}"
    path.write_bytes(CAF_HEADER + b"".join(part or b"" for part in parts))
    return path


def caf_chunks_of(data: bytes) -> dict[str, bytes]:
    """The chunks of a whole CAF (as ffmpeg writes it), whole, by name."""
    chunks = {}
    offset = len(CAF_HEADER)
    while offset < len(data):
        kind, size = struct.unpack(">4sq", data[offset : offset + 12])
        end = len(data) if size < 0 else offset + 12 + size
        chunks[kind.decode("latin-1")] = data[offset:end]
        offset = end
    return chunks


# --- WAV ---------------------------------------------------------------------------------


def wav_samples(path: Path) -> int:
    with wave.open(str(path), "rb") as reader:
        return reader.getnframes()


def repeat_wav(source: Path, target: Path, times: int) -> Path:
    """The same PCM `times` over, in one WAV: cheap length, no encoder involved."""
    with wave.open(str(source), "rb") as reader:
        params = reader.getparams()
        frames = reader.readframes(reader.getnframes())
    with wave.open(str(target), "wb") as writer:
        writer.setparams(params)
        for _ in range(times):
            writer.writeframes(frames)
    return target


def streaming_wav(source: Path, target: Path) -> Path:
    """A WAV as streaming recorders leave it: 0xFFFFFFFF in the RIFF and data sizes."""
    data = bytearray(source.read_bytes())
    data[4:8] = b"\xff\xff\xff\xff"
    position = data.index(b"data", 12)
    data[position + 4 : position + 8] = b"\xff\xff\xff\xff"
    target.write_bytes(bytes(data))
    return target


# --- the clip and the fixtures -------------------------------------------------------------


def make_clip(speech_wav: Path, target: Path, *, seconds: float = CLIP_SECONDS) -> Path:
    """48 kHz mono: quiet, the sentence at SPEECH_STARTS_AT, quiet again, over faint noise."""
    ffmpeg(
        "-f", "lavfi", "-i", f"anullsrc=r={RATE}:cl=mono:d={SPEECH_STARTS_AT}",
        "-i", str(speech_wav),
        "-f", "lavfi", "-i",
        f"anoisesrc=color=pink:amplitude={NOISE_AMPLITUDE}:sample_rate={RATE}"
        f":duration={seconds}:seed=7",
        "-filter_complex",
        f"[1:a]aresample={RATE},aformat=channel_layouts=mono[s];"
        "[0:a][s]concat=n=2:v=0:a=1[speech];"
        "[speech][2:a]amix=inputs=2:duration=longest:normalize=0",
        "-ac", "1", "-ar", str(RATE), "-c:a", "pcm_s16le", str(target),
    )  # fmt: skip
    return target


def _copies_for(bytes_per_clip: int) -> int:
    return LARGE_BYTES // bytes_per_clip + 1


class _Builder:
    def __init__(self, folder: Path, speech_wav: Path) -> None:
        self.folder = folder
        self.clip = make_clip(speech_wav, folder / "clip.wav")
        self.clip_samples = wav_samples(self.clip)
        self.files: dict[str, PhoneFile] = {}

    def path(self, name: str) -> Path:
        return self.folder / name

    def add(
        self,
        name: str,
        filename: str,
        *,
        container: str,
        mode: str,
        codec: str,
        layout: str,
        written_by: str,
        needs_seeking: bool = False,
        index_last: bool = False,
    ) -> None:
        self.files[name] = PhoneFile(
            name,
            self.path(filename),
            container,
            mode,
            codec,
            layout,
            written_by,
            needs_seeking,
            index_last or needs_seeking,
        )

    def build(self) -> dict[str, PhoneFile]:
        for step in (self.aac, self.caf, self.others, self.amr):
            step()
        return self.files

    def aac(self) -> None:
        """One AAC encode; every AAC fixture is cut from its packets."""
        clip_adts = self.path("clip.aac")
        ffmpeg("-i", str(self.clip), "-c:a", "aac", "-b:a", "96k", "-f", "adts", str(clip_adts))
        clip_bytes = clip_adts.read_bytes()
        copies = _copies_for(len(clip_bytes))
        long_adts = self.path("long.aac")
        long_adts.write_bytes(clip_bytes * copies)  # ADTS frames are self-framed: concat works

        shutil.copyfile(clip_adts, self.path("phone.aac"))
        self.add(
            "adts-aac", "phone.aac", container="aac", mode="stream", codec="AAC-LC",
            layout="ADTS frames", written_by="Android MediaRecorder AAC_ADTS",
        )  # fmt: skip

        ffmpeg(
            "-i", str(long_adts), "-c", "copy", "-bsf:a", "aac_adtstoasc",
            str(self.path("moov-last.m4a")),
        )  # fmt: skip
        self.add(
            "m4a-moov-last", "moov-last.m4a", container="mp4", mode="speculative", codec="AAC-LC",
            layout="moov after mdat", written_by="AVAudioRecorder (.m4a)",
            needs_seeking=True,
        )  # fmt: skip

        from .voice_memos import voice_memo  # it builds on this module's box writers

        memo_adts = self.path("memo.aac")
        ffmpeg("-i", str(self.clip), "-ar", "48000", "-c:a", "aac", "-b:a", "64k", "-f", "adts",
               str(memo_adts))  # fmt: skip
        self.path("voice-memo.m4a").write_bytes(voice_memo(memo_adts.read_bytes()))
        self.add(
            "m4a-voice-memos", "voice-memo.m4a", container="mp4", mode="stream", codec="AAC-LC",
            layout="hoov, moof fragments, moov last", written_by="iPhone Voice Memos",
            index_last=True,
        )  # fmt: skip

        ffmpeg(
            "-i", str(clip_adts), "-c", "copy", "-bsf:a", "aac_adtstoasc",
            "-movflags", "+faststart", str(self.path("faststart.m4a")),
        )  # fmt: skip
        self.add(
            "m4a-faststart", "faststart.m4a", container="mp4", mode="stream", codec="AAC-LC",
            layout="moov before mdat (faststart)", written_by="web exports",
        )  # fmt: skip

        ffmpeg(
            "-i", str(clip_adts), "-c", "copy", "-bsf:a", "aac_adtstoasc", "-f", "mp4",
            "-movflags", "frag_keyframe+empty_moov+default_base_moof",
            str(self.path("fragmented.mp4")),
        )  # fmt: skip
        self.add(
            "mp4-fragmented", "fragmented.mp4", container="mp4", mode="stream", codec="AAC-LC",
            layout="fragmented (moof+mdat)", written_by="Safari MediaRecorder",
        )  # fmt: skip

        long_aac = parse_adts(long_adts.read_bytes())
        write_aac_caf(
            self.path("aac-pakt-last.caf"),
            long_aac,
            valid_frames=self.clip_samples * copies,
            priming=1024,
            pakt_first=False,
        )
        self.add(
            "caf-aac-pakt-last", "aac-pakt-last.caf", container="caf", mode="stream",
            codec="AAC-LC", layout="pakt after data", written_by="iPhone (AVAudioRecorder .caf)",
            needs_seeking=True,
        )  # fmt: skip
        clip_aac = parse_adts(clip_bytes)
        write_aac_caf(
            self.path("aac-pakt-first.caf"),
            clip_aac,
            valid_frames=self.clip_samples,
            priming=1024,
            pakt_first=True,
        )
        self.add(
            "caf-aac-pakt-first", "aac-pakt-first.caf", container="caf", mode="stream",
            codec="AAC-LC", layout="pakt before data", written_by="converters (table first)",
        )  # fmt: skip

    def caf(self) -> None:
        # ALAC compresses the noise bed to roughly half: copies enough for > 6.5 MB.
        copies = _copies_for(int(self.clip_samples * 2 * 0.45))
        long_wav = repeat_wav(self.clip, self.path("long-alac-source.wav"), copies)
        ffmpeg("-i", str(long_wav), "-c:a", "alac", "-f", "caf", str(self.path("alac.caf")))
        long_wav.unlink()
        self.add(
            "caf-alac", "alac.caf", container="caf", mode="seekable", codec="ALAC",
            layout="pakt after data", written_by="iPhone (AVAudioRecorder ALAC)",
            needs_seeking=True,
        )  # fmt: skip
        ffmpeg("-i", str(self.clip), "-c:a", "pcm_s16le", "-f", "caf", str(self.path("lpcm.caf")))
        self.add(
            "caf-lpcm", "lpcm.caf", container="caf", mode="stream", codec="LPCM s16",
            layout="constant packets, no pakt", written_by="iPhone (AVAudioRecorder LPCM)",
        )  # fmt: skip
        ffmpeg(
            "-i", str(self.clip), "-c:a", "adpcm_ima_qt", "-f", "caf", str(self.path("ima4.caf"))
        )  # fmt: skip
        self.add(
            "caf-ima4", "ima4.caf", container="caf", mode="stream", codec="IMA4 ADPCM",
            layout="constant packets, no pakt", written_by="iPhone (AVAudioRecorder IMA4)",
        )  # fmt: skip

    def others(self) -> None:
        clip = str(self.clip)
        ffmpeg("-i", clip, "-c:a", "libopus", "-b:a", "32k", str(self.path("phone.webm")))
        self.add(
            "webm-opus", "phone.webm", container="webm", mode="stream", codec="Opus",
            layout="Matroska clusters", written_by="Android MediaRecorder WEBM, Chrome",
        )  # fmt: skip
        ffmpeg("-i", clip, "-c:a", "libopus", "-b:a", "32k", str(self.path("phone.ogg")))
        self.add(
            "ogg-opus", "phone.ogg", container="ogg", mode="stream", codec="Opus",
            layout="Ogg pages", written_by="Android MediaRecorder OGG, WhatsApp",
        )  # fmt: skip
        shutil.copyfile(self.clip, self.path("phone.wav"))
        self.add(
            "wav", "phone.wav", container="wav", mode="stream", codec="PCM s16le",
            layout="RIFF with sizes", written_by="recorder apps",
        )  # fmt: skip
        streaming_wav(self.clip, self.path("streaming.wav"))
        self.add(
            "wav-streaming", "streaming.wav", container="wav", mode="stream", codec="PCM s16le",
            layout="RIFF and data sizes 0xFFFFFFFF", written_by="streaming recorders",
        )  # fmt: skip
        ffmpeg(
            "-i", clip, "-c:a", "libmp3lame", "-b:a", "64k", "-id3v2_version", "3",
            "-metadata", "title=Voice note", "-metadata", "artist=Phone",
            str(self.path("phone.mp3")),
        )  # fmt: skip
        self.add(
            "mp3-id3", "phone.mp3", container="mp3", mode="stream", codec="MP3",
            layout="ID3v2 tag, then frames", written_by="recorder apps",
        )  # fmt: skip
        ffmpeg("-i", clip, "-c:a", "flac", str(self.path("phone.flac")))
        self.add(
            "flac", "phone.flac", container="flac", mode="stream", codec="FLAC",
            layout="STREAMINFO, then frames", written_by="recorder apps",
        )  # fmt: skip

    def amr(self) -> None:
        binary = amr_ffmpeg()
        common = ["-i", str(self.clip), "-ar", "8000", "-ac", "1"]
        codec = ["-c:a", "libopencore_amrnb", "-b:a", "12.2k"]
        # Android writes no edit list; ffmpeg would write one that skips the encoder's delay.
        ffmpeg(*common, *codec, "-use_editlist", "0", str(self.path("phone.3gp")), binary=binary)
        self.add(
            "3gp-amr", "phone.3gp", container="3gp", mode="stream", codec="AMR-NB 8 kHz",
            layout="moov after mdat", written_by="Android MediaRecorder THREE_GPP",
            index_last=True,
        )  # fmt: skip
        ffmpeg(
            *common, *codec, "-movflags", "+faststart", str(self.path("faststart.3gp")),
            binary=binary,
        )  # fmt: skip
        self.add(
            "3gp-amr-faststart", "faststart.3gp", container="3gp", mode="stream",
            codec="AMR-NB 8 kHz", layout="moov before mdat",
            written_by="Android (moov up front)",
        )  # fmt: skip


FIXTURE_NAMES = (
    "caf-aac-pakt-last",
    "caf-aac-pakt-first",
    "caf-alac",
    "caf-lpcm",
    "caf-ima4",
    "m4a-moov-last",
    "m4a-voice-memos",
    "m4a-faststart",
    "mp4-fragmented",
    "3gp-amr",
    "3gp-amr-faststart",
    "webm-opus",
    "ogg-opus",
    "wav",
    "wav-streaming",
    "mp3-id3",
    "flac",
    "adts-aac",
)
"""Every fixture, in the order of the README's matrix; test ids are these names."""

_BUILT: dict[Path, dict[str, PhoneFile]] = {}


def phone_files(folder: Path, speech_wav: Path) -> dict[str, PhoneFile]:
    """Build every fixture into `folder` once; later calls (any test module) reuse them."""
    folder = folder.resolve()
    if folder not in _BUILT:
        folder.mkdir(parents=True, exist_ok=True)
        files = _Builder(folder, speech_wav).build()
        assert set(files) == set(FIXTURE_NAMES)
        _BUILT[folder] = {name: files[name] for name in FIXTURE_NAMES}
    return _BUILT[folder]
