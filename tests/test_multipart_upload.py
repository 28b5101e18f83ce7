"""The streaming multipart decoder: forms as clients write them, split anywhere; hostile forms.

Bodies are built the way browsers, curl, OkHttp and React Native's fetch write them: any
RFC 2046 boundary, fields before and after the audio, other file parts, audio that contains
near-misses of the delimiter.  They are fed in random pieces and must decode exactly;
mutated bodies must fail with a `ServiceError` (or decode consistently), never otherwise.

Time limits are on this process's CPU time, so that a busy machine does not fail them.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Collection, Iterable, Iterator

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from vrai_stream import errors
from vrai_stream.bodies.forms import Field, FieldTooLarge
from vrai_stream.bodies.multipart import (
    MAX_FIELDS,
    FileData,
    FileEnd,
    FileStart,
    MultipartDecoder,
    boundary_of,
)
from vrai_stream.errors import InvalidMultipart

from .support.body_decoding import AudioEvents, decode_traced, feed_all, mutate, split

SCALE = int(os.environ.get("VRAI_FUZZ_SCALE", "1"))
"""Multiplies the property tests' example counts, for longer fuzzing runs than CI's."""

CURL_BOUNDARY = "------------------------d74496d66958873e"
FILE = AudioEvents(FileStart, FileData, FileEnd)


# --- helpers ----------------------------------------------------------------------------------


def content_type(boundary: str, *, quoted: bool = True) -> str:
    return (
        f'multipart/form-data; boundary="{boundary}"'
        if quoted
        else (f"multipart/form-data; boundary={boundary}")
    )


def decode(
    chunks: Iterable[bytes],
    boundary: str = CURL_BOUNDARY,
    *,
    file_field: str = "audio",
    fields: Collection[str] | None = None,
) -> tuple[bytes, dict[str, str | None], FileStart]:
    """Feed the chunks; return the audio, the fields and the audio's FileStart."""
    decoder = MultipartDecoder(content_type(boundary), file_field=file_field, fields=fields)
    events, audio = feed_all(decoder, chunks, FILE)
    start = next(event for event in events if isinstance(event, FileStart))
    found = {event.name: event.value for event in events if isinstance(event, Field)}
    return audio, found, start


def failure(chunks: Iterable[bytes], boundary: str = CURL_BOUNDARY) -> errors.ServiceError:
    with pytest.raises(errors.ServiceError) as caught:
        decode(chunks, boundary)
    return caught.value


def part(headers: str, content: bytes) -> bytes:
    return headers.replace("\n", "\r\n").encode() + b"\r\n" + content


def form(boundary: str, *parts: bytes, epilogue: bytes = b"\r\n") -> bytes:
    delimiter = b"--" + boundary.encode()
    body = b"".join(delimiter + b"\r\n" + p + b"\r\n" for p in parts)
    return body + delimiter + b"--" + epilogue


def text_field(name: str, value: str) -> bytes:
    return part(f'Content-Disposition: form-data; name="{name}"\n', value.encode())


def audio_part(payload: bytes, name: str = "audio", filename: str | None = "rec.m4a") -> bytes:
    file = "" if filename is None else f'; filename="{filename}"'
    return part(
        f'Content-Disposition: form-data; name="{name}"{file}\nContent-Type: audio/mp4\n', payload
    )


REAL_WORLD = form(
    CURL_BOUNDARY,
    text_field("fromTime", "0"),
    text_field("toTime", "42.5"),
    audio_part(
        b"\x00\x00\x00\x1cftypM4A "
        + bytes(range(256)) * 3
        + b"\r\n--"
        + CURL_BOUNDARY[:-3].encode()
    ),
    text_field("summarizationType", "whatsapp-cleanup"),
)


# --- strategies -------------------------------------------------------------------------------

BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"
BOUNDARIES = (
    st.text(alphabet=BCHARS + " ", min_size=1, max_size=70).filter(lambda b: not b.endswith(" "))
    | st.builds(
        lambda s: "----WebKitFormBoundary" + s,
        st.text(alphabet=BCHARS[:62], min_size=16, max_size=16),
    )
    | st.just(CURL_BOUNDARY)
    | st.uuids().map(str)
)
NAMES = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-[].",
    min_size=1,
    max_size=12,
)
FILENAMES = st.none() | st.text(
    alphabet=st.characters(blacklist_characters='"\\\r\n;', blacklist_categories=("Cs", "Cc")),
    max_size=20,
)


@st.composite
def near_misses(draw: st.DrawFn, boundary: bytes) -> bytes:
    """Binary content with pieces of the delimiter in it, but never the whole delimiter."""
    delimiter = b"\r\n--" + boundary
    pieces = draw(
        st.lists(
            st.binary(max_size=300)
            | st.sampled_from([b"\r", b"\r\n", b"\r\n-", b"\r\n--", b"--" + boundary, boundary])
            | st.integers(1, len(delimiter) - 1).map(lambda k: delimiter[:k]),
            max_size=8,
        )
    )
    content = b"".join(pieces)
    assume((content + delimiter).find(delimiter) == len(content))
    return content


@st.composite
def multipart_bodies(
    draw: st.DrawFn,
) -> tuple[str, bytes, bytes, dict[str, str | None], str | None]:
    """A boundary, a body, the audio in it, its text fields and the audio's file name."""
    boundary = draw(BOUNDARIES)
    raw_boundary = boundary.encode()
    payload = draw(near_misses(raw_boundary).filter(bool))
    filename = draw(FILENAMES)
    parts = [audio_part(payload, filename=filename)]
    fields: dict[str, str | None] = {}
    names = draw(st.lists(NAMES.filter(lambda n: n != "audio"), unique=True, max_size=5))
    for name in names:
        if draw(st.booleans()):  # another file: skipped
            content = draw(near_misses(raw_boundary))
            parts.append(
                part(f'Content-Disposition: form-data; name="{name}"; filename="x.bin"\n', content)
            )
        else:
            value = draw(st.text(max_size=30))
            assume(
                (value.encode() + b"\r\n--" + raw_boundary).find(b"\r\n--" + raw_boundary)
                == len(value.encode())
            )
            header = draw(
                st.sampled_from(
                    [
                        f'Content-Disposition: form-data; name="{name}"\n',
                        f"content-disposition: form-data; name={name}\n"
                        "Content-Type: text/plain; charset=utf-8\n",
                        f'Content-Disposition:form-data;name="{name}"\n'
                        "Content-Transfer-Encoding: 8bit\n",
                    ]
                )
            )
            parts.append(part(header, value.encode()))
            fields[name] = value
    parts = draw(st.permutations(parts))
    epilogue = draw(st.sampled_from([b"", b"\r\n", b"\r\nignored epilogue"]))
    preamble = draw(st.sampled_from([b"", b"\r\n"]))
    return boundary, preamble + form(boundary, *parts, epilogue=epilogue), payload, fields, filename


CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=24)


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=200 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(multipart_bodies(), CUTS)
def test_any_form_split_anywhere_decodes_exactly(
    case: tuple[str, bytes, bytes, dict[str, str | None], str | None], cuts: list[int]
) -> None:
    boundary, body, payload, fields, filename = case
    audio, got, start = decode(split(body, cuts), boundary)
    assert audio == payload
    assert got == fields
    assert start == FileStart(field_name="audio", filename=filename, content_type="audio/mp4")


@settings(max_examples=30 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(multipart_bodies())
def test_one_byte_feeds(case: tuple[str, bytes, bytes, dict[str, str | None], str | None]) -> None:
    boundary, body, payload, fields, _ = case
    audio, got, _ = decode((body[k : k + 1] for k in range(len(body))), boundary)
    assert (audio, got) == (payload, fields)


def test_every_split_point_of_a_real_world_form() -> None:
    expected = {"fromTime": "0", "toTime": "42.5", "summarizationType": "whatsapp-cleanup"}
    for k in range(len(REAL_WORLD) + 1):
        audio, fields, start = decode([REAL_WORLD[:k], REAL_WORLD[k:]])
        assert audio.startswith(b"\x00\x00\x00\x1cftyp") and audio.endswith(b"d74496d669588")
        assert fields == expected and start.filename == "rec.m4a"
    assert decode(REAL_WORLD[k : k + 1] for k in range(len(REAL_WORLD)))[1] == expected


MUTATION_BYTES = st.sampled_from(list(b'\r\n-"; =:abcdx\x00\xff')) | st.integers(0, 255)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    boundary, body, _, _, _ = draw(multipart_bodies())
    return boundary, mutate(draw, body, MUTATION_BYTES, longest_repeat=60)


CODES = {
    "invalid_multipart": (InvalidMultipart, 400),
    "empty_body": (errors.EmptyBody, 400),
    "missing_audio_part": (errors.MissingAudioPart, 400),
    "field_too_large": (FieldTooLarge, 413),
}


@settings(max_examples=500 * SCALE, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), CUTS)
@example((CURL_BOUNDARY, REAL_WORLD[:-10]), [])
@example((CURL_BOUNDARY, b'\r"\n' + REAL_WORLD), [1])  # the verdict depended on the cut
@example((CURL_BOUNDARY, b"\r\n\n\r" + REAL_WORLD), [1, 2, 3])
@example(
    (CURL_BOUNDARY, REAL_WORLD.replace(b"Content-Disposition", b"Content-Disposition\x00")), []
)
@example((CURL_BOUNDARY, REAL_WORLD.replace(b'name="toTime"', b'name="audio"')), [])
def test_mutated_forms_fail_cleanly_or_decode_consistently(
    case: tuple[str, bytes], cuts: list[int]
) -> None:
    boundary, body = case
    started = time.process_time()
    try:
        audio, fields, _ = decode(split(body, cuts), boundary)
    except errors.ServiceError as error:
        kind, status = CODES[error.code]
        assert type(error) is kind and error.status == status
        assert error.message.strip()
        # However the body was cut, the verdict is the same.
        assert failure([body], boundary).code == error.code
    else:
        # No transfer encoding: whatever was decoded is in the body as it is.
        assert audio in body
        assert all(
            (value or "").encode("utf-8") in body or "\ufffd" in (value or "")
            for value in fields.values()
        )
        # And the same body in one piece decodes the same.
        assert decode([body], boundary)[:2] == (audio, fields)
    assert time.process_time() - started < 1.0


@settings(max_examples=300 * SCALE, deadline=2000)
@given(st.binary(max_size=300), CUTS)
def test_garbage_fails_cleanly(body: bytes, cuts: list[int]) -> None:
    with pytest.raises(errors.ServiceError) as caught:
        decode(split(body, cuts))
    assert caught.value.code in CODES


# --- the Content-Type -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "boundary"),
    [
        ("multipart/form-data; boundary=abc", b"abc"),
        ('multipart/form-data; boundary="a b:c?d=e"', b"a b:c?d=e"),
        ("Multipart/Form-Data; charset=utf-8; Boundary=xyz", b"xyz"),
        ("multipart/form-data;boundary=" + "x" * 70, b"x" * 70),
        (content_type(CURL_BOUNDARY, quoted=False), CURL_BOUNDARY.encode()),
    ],
)
def test_good_content_types(header: str, boundary: bytes) -> None:
    assert boundary_of(header) == boundary


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (None, "Content-Type is missing"),
        ("", "Content-Type is missing"),
        ("application/json", "must be multipart/form-data, not application/json"),
        ("multipart/mixed; boundary=abc", "must be multipart/form-data"),
        ("multipart/form-data", "no boundary"),
        ("multipart/form-data; charset=utf-8", "no boundary"),
        ("multipart/form-data; boundary=", "boundary must be 1 to 70"),
        ("multipart/form-data; boundary=" + "x" * 71, "boundary must be 1 to 70"),
        ('multipart/form-data; boundary="abc "', "not ending with a space"),
        ("multipart/form-data; boundary=a\rb", "boundary must be"),
        ("multipart/form-data; boundary=a<b>", "boundary must be"),
        ("multipart/form-data; boundary=\u00e9t\u00e9", "boundary must be"),
        ("multipart/form-data; boundary=\u2603", "outside Latin-1"),
        ("multipart/\u2603; boundary=abc", "outside Latin-1"),
    ],
)
def test_bad_content_types(header: str | None, words: str) -> None:
    with pytest.raises(InvalidMultipart) as caught:
        MultipartDecoder(header)
    assert caught.value.status == 400 and caught.value.code == "invalid_multipart"
    assert words in caught.value.message, caught.value.message


@settings(max_examples=300 * SCALE, deadline=2000)
@given(
    st.text(max_size=120)
    | st.builds("multipart/form-data; boundary={}".format, st.text(max_size=80))
)
def test_any_content_type_gives_a_boundary_or_a_400(header: str) -> None:
    try:
        boundary = boundary_of(header)
    except InvalidMultipart as error:
        assert error.status == 400 and error.message
    else:
        assert 1 <= len(boundary) <= 70 and b"\r" not in boundary and b"\n" not in boundary


# --- specific forms ---------------------------------------------------------------------------

B = CURL_BOUNDARY


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (b"", errors.EmptyBody, "no body"),
        (form(B, text_field("fromTime", "1")), errors.MissingAudioPart, "no 'audio' part"),
        (form(B), errors.MissingAudioPart, "a file part named 'audio'"),
        (form(B, audio_part(b"")), errors.EmptyBody, "'audio' part of the form is empty"),
        (REAL_WORLD[:-40], InvalidMultipart, "before its closing boundary"),
        (REAL_WORLD[:100], InvalidMultipart, "before its closing boundary"),
        (b"hello", InvalidMultipart, "Invalid multipart body"),
        (b"preamble\r\n" + REAL_WORLD, InvalidMultipart, "Invalid multipart body"),
        (b'\r"\n' + REAL_WORLD, InvalidMultipart, "near byte 1: Expected boundary character"),
        (form("other", audio_part(b"x")), InvalidMultipart, "Invalid multipart body"),
        (
            form(B, audio_part(b"a"), audio_part(b"b")),
            InvalidMultipart,
            "more than one 'audio' part",
        ),
        (
            form(B, part("Content-Type: text/plain\n", b"x")),
            InvalidMultipart,
            "no Content-Disposition",
        ),
        (form(B, part("Content-Disposition: form-data\n", b"x")), InvalidMultipart, "no name"),
        (
            form(
                B,
                part(
                    "".join(f"X-{k}: y\n" for k in range(9))
                    + 'Content-Disposition: form-data; name="a"\n',
                    b"",
                ),
            ),
            InvalidMultipart,
            "header count",
        ),
        (form(B, part(f"X-Long: {'y' * 5000}\n", b"")), InvalidMultipart, "header size"),
        (form(B, part("Bad Header: y\n", b"")), InvalidMultipart, "invalid character"),
        (
            form(B, text_field("prompt", "p" * (64 * 1024 + 1)), audio_part(b"x")),
            FieldTooLarge,
            "'prompt' is longer than 65536 bytes",
        ),
        (
            form(B, *(text_field(f"f{k}", "v") for k in range(MAX_FIELDS + 1)), audio_part(b"x")),
            InvalidMultipart,
            f"more than {MAX_FIELDS} fields",
        ),
    ],
)
def test_bad_forms(body: bytes, error: type[errors.ServiceError], words: str) -> None:
    cuts = [range(0, len(body), 7), range(0, len(body), 4096)]
    for chunks in ([body], *(split(body, c) for c in cuts)):
        caught = failure(chunks)
        assert type(caught) is error, caught
        assert words in caught.message, caught.message
        assert caught.status == (413 if error is FieldTooLarge else 400)


def test_a_failed_decoder_stays_failed() -> None:
    decoder = MultipartDecoder(content_type(B))
    with pytest.raises(InvalidMultipart):
        decoder.feed(b"garbage")
    with pytest.raises(InvalidMultipart):
        decoder.feed(REAL_WORLD)
    with pytest.raises(InvalidMultipart):
        decoder.close()


def test_the_openai_file_field_and_a_field_filter() -> None:
    body = form(
        B,
        text_field("model", "whisper-1"),
        text_field("ignored", "x" * 200_000),  # not asked for: skipped, so not too large
        audio_part(b"RIFF....WAVE", name="file", filename="speech.wav"),
        audio_part(b"not this one", name="audio"),
        text_field("response_format", "srt"),
    )
    audio, fields, start = decode([body], file_field="file", fields=["model", "response_format"])
    assert audio == b"RIFF....WAVE"
    assert fields == {"model": "whisper-1", "response_format": "srt"}
    assert start == FileStart(field_name="file", filename="speech.wav", content_type="audio/mp4")


def test_an_audio_part_without_a_file_name_or_type() -> None:
    body = form(B, part('Content-Disposition: form-data; name="audio"\n', b"\x01\x02"))
    audio, _, start = decode([body])
    assert audio == b"\x01\x02"
    assert start == FileStart(field_name="audio", filename=None, content_type=None)


def test_utf8_names_and_values() -> None:
    body = form(
        B,
        part('Content-Disposition: form-data; name="note"\n', "café \u2603".encode()),
        audio_part(b"x", filename="enregistrement é.m4a"),
    )
    _, fields, start = decode([body])
    assert fields == {"note": "café \u2603"} and start.filename == "enregistrement é.m4a"


# --- hostile input: time and memory -----------------------------------------------------------


def test_skipped_files_are_not_kept() -> None:
    other = part(
        'Content-Disposition: form-data; name="photo"; filename="a.jpg"\n',
        b"\xff" * (4 * 1024 * 1024),
    )
    chunks = split(form(B, other, audio_part(b"x")), range(0, len(other) + 1000, 65536))
    traced = decode_traced(MultipartDecoder(content_type(B)), chunks, FileData)
    assert traced.peak < 256 * 1024, traced.peak


def test_one_byte_feeds_are_not_quadratic() -> None:
    payload = (b"\r\n--" + B.encode()[:-1] + b"\x00") * 1500  # near misses all the way: 66 KB
    body = form(B, text_field("fromTime", "1"), audio_part(payload))
    started = time.process_time()
    assert decode(body[k : k + 1] for k in range(len(body)))[0] == payload
    assert time.process_time() - started < 5.0


class _VirtualForm:
    """A form with a 50 MB audio part, produced chunk by chunk so that the test holds none of it."""

    def __init__(self, audio_bytes: int) -> None:
        self.block = bytes(range(256)) * 256 + b"\r\n--" + B.encode()[:-2]
        self.blocks = audio_bytes // len(self.block)
        delimiter = b"--" + B.encode()
        self.head = delimiter + b"\r\n" + text_field("fromTime", "0") + b"\r\n"
        self.head += delimiter + b"\r\n" + audio_part(b"")
        self.tail = b"\r\n" + form(B, text_field("summarizationType", "none"))
        self.audio_digest = hashlib.sha256(self.block * self.blocks).hexdigest()

    def chunks(self, size: int) -> Iterator[bytes]:
        pending = self.head
        for _ in range(self.blocks):
            pending += self.block
            while len(pending) >= size:
                yield pending[:size]
                pending = pending[size:]
        pending += self.tail
        while pending:
            yield pending[:size]
            pending = pending[size:]


def test_memory_stays_bounded_on_a_50_mb_form() -> None:
    body = _VirtualForm(50 * 1024 * 1024)
    traced = decode_traced(MultipartDecoder(content_type(B)), body.chunks(65536), FileData)
    assert traced.digest == body.audio_digest
    assert traced.fields == {"fromTime": "0", "summarizationType": "none"}
    # The virtual body's own buffer (up to 2 x 64 KiB) and one feed's data come and go.
    assert traced.peak < 512 * 1024, traced.peak
    assert traced.kept < 16 * 1024, traced.kept
