"""The legacy JSON decoder: real-world bodies split anywhere, hostile bodies, bounded memory.

The property tests build bodies the way clients in the field write them (keys in any order,
any whitespace, unknown keys of every JSON type, base64 with or without a data URL prefix,
escaped slashes, wrapped lines, missing padding) and feed them in random pieces.  The fuzz
test mutates such bodies and checks the decoder against a reference: Python's own `json`
plus a plain base64 decode.  A valid body must decode to exactly what the reference says,
and an invalid one must fail with the `ServiceError` the reference predicts, never with
another exception and never slowly.

Time limits are on this process's CPU time, so that a busy machine does not fail them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vrai_stream import errors
from vrai_stream.bodies.forms import Field, FieldTooLarge
from vrai_stream.bodies.legacy_json import (
    LEGACY_FIELDS,
    MAX_DEPTH,
    BlobData,
    BlobEnd,
    BlobStart,
    LegacyJsonDecoder,
)
from vrai_stream.errors import InvalidBase64, InvalidJson

from .support.body_decoding import AudioEvents, decode_traced, feed_all, mutate, split

KNOWN = (*LEGACY_FIELDS, "fileBlob")
BLOB = AudioEvents(BlobStart, BlobData, BlobEnd)
SCALE = int(os.environ.get("VRAI_FUZZ_SCALE", "1"))
"""Multiplies the property tests' example counts, for longer fuzzing runs than CI's."""


# --- helpers ----------------------------------------------------------------------------------


def decode(chunks: Iterable[bytes]) -> tuple[bytes, dict[str, str | None]]:
    """Feed the chunks; return the audio and the fields, checking the events' shape."""
    events, audio = feed_all(LegacyJsonDecoder(), chunks, BLOB)
    fields: dict[str, str | None] = {}
    for event in events:
        if isinstance(event, Field):
            assert event.name not in fields
            fields[event.name] = event.value
    return audio, fields


def failure(chunks: Iterable[bytes]) -> errors.ServiceError:
    with pytest.raises(errors.ServiceError) as caught:
        decode(chunks)
    return caught.value


def body_of(**values: Any) -> bytes:
    return json.dumps(values).encode()


# --- strategies -------------------------------------------------------------------------------

WHITESPACE = st.text(alphabet=" \t\r\n", max_size=3)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
SUMMARIES = st.sampled_from(["none", "summarize", "simple-cleanup", "whatsapp-cleanup"]) | st.text(
    max_size=20
)


@st.composite
def spaced(draw: st.DrawFn, value: Any) -> str:
    """`value` as JSON with random whitespace between tokens and random string escaping."""
    ascii_only = draw(st.booleans())
    if isinstance(value, dict):
        items = [
            draw(WHITESPACE)
            + json.dumps(key, ensure_ascii=ascii_only)
            + draw(WHITESPACE)
            + ":"
            + draw(WHITESPACE)
            + draw(spaced(item))
            + draw(WHITESPACE)
            for key, item in value.items()
        ]
        return "{" + (",".join(items) or draw(WHITESPACE)) + "}"
    if isinstance(value, list):
        items = [draw(WHITESPACE) + draw(spaced(item)) + draw(WHITESPACE) for item in value]
        return "[" + (",".join(items) or draw(WHITESPACE)) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def times(draw: st.DrawFn) -> tuple[str, str | None]:
    """A time as the JSON written and the text the decoder reports for it."""
    number = draw(
        st.integers(min_value=0, max_value=10**6).map(str)
        | st.floats(min_value=0, max_value=1e6, allow_nan=False).map(repr)
        | st.sampled_from(["0", "1.5", "30", "-0", "1e2", "2.5E-1", "300.000"])
    )
    form = draw(st.sampled_from(["number", "string", "null"]))
    if form == "number":
        return number, number
    if form == "string":
        return json.dumps(number), number
    return "null", None


@st.composite
def blobs(draw: st.DrawFn, payload: bytes) -> str:
    """`payload` as a fileBlob JSON string, the ways clients write it."""
    text = base64.b64encode(payload).decode()
    if draw(st.booleans()):
        text = text.translate(str.maketrans("+/", "-_"))
    if draw(st.booleans()):
        text = text.rstrip("=")
    width = draw(st.none() | st.integers(min_value=1, max_value=120))
    if width is not None:  # MIME-style wrapping, which JSON writes as \n or \r\n escapes
        newline = draw(st.sampled_from(["\n", "\r\n", " "]))
        text = newline.join(text[k : k + width] for k in range(0, len(text), width))
    if draw(st.booleans()):
        media = draw(st.sampled_from(["audio/mp4", "audio/x-caf", "audio/3gpp", "audio/webm"]))
        text = f"data:{media};{draw(st.sampled_from(['base64', 'BASE64']))}," + text
    written = json.dumps(text)
    if draw(st.booleans()):
        written = written.replace("/", "\\/")
    every = draw(st.none() | st.integers(min_value=1, max_value=50))
    if every is not None:  # some characters as \u00XX escapes
        inner = written[1:-1]
        out, k = [], 0
        while k < len(inner):
            if inner[k] == "\\":
                out.append(inner[k : k + 2])
                k += 2
                continue
            out.append(f"\\u{ord(inner[k]):04x}" if k % every == 0 else inner[k])
            k += 1
        written = '"' + "".join(out) + '"'
    return written


@st.composite
def legacy_bodies(draw: st.DrawFn) -> tuple[bytes, bytes, dict[str, str | None]]:
    """A body, the audio it carries and the fields the decoder must report."""
    payload = draw(st.binary(min_size=1, max_size=1500))
    entries: list[tuple[str, str]] = [("fileBlob", draw(blobs(payload)))]
    expected: dict[str, str | None] = {}
    for name in ("fromTime", "toTime"):
        if draw(st.integers(0, 9)):
            written, text = draw(times())
            entries.append((name, written))
            expected[name] = text
    if draw(st.booleans()):
        summary = draw(SUMMARIES)
        entries.append(("summarizationType", json.dumps(summary, ensure_ascii=draw(st.booleans()))))
        expected["summarizationType"] = summary
    others = draw(
        st.dictionaries(st.text(max_size=8).filter(lambda k: k not in KNOWN), VALUES, max_size=3)
    )
    entries += [(key, draw(spaced(value))) for key, value in others.items()]
    entries = draw(st.permutations(entries))
    parts = []
    for name, value in entries:
        key = json.dumps(name)
        plain_first = bool(name) and json.dumps(name[0]) == f'"{name[0]}"'
        if plain_first and draw(st.integers(0, 4)) == 0:  # an escaped letter: the same key
            key = f'"\\u{ord(name[0]):04x}' + key[2:]
        parts.append(draw(WHITESPACE) + key + draw(WHITESPACE) + ":" + draw(WHITESPACE) + value)
    body = (
        draw(WHITESPACE)
        + "{"
        + ",".join(p + draw(WHITESPACE) for p in parts)
        + "}"
        + draw(WHITESPACE)
    )
    return body.encode(), payload, expected


CUTS = st.lists(st.integers(min_value=0, max_value=20_000), max_size=24)


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=200 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(legacy_bodies(), CUTS)
def test_any_body_split_anywhere_decodes_exactly(
    case: tuple[bytes, bytes, dict[str, str | None]], cuts: list[int]
) -> None:
    body, payload, expected = case
    audio, fields = decode(split(body, cuts))
    assert audio == payload
    assert fields == expected


@settings(max_examples=30 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(legacy_bodies())
def test_one_byte_feeds(case: tuple[bytes, bytes, dict[str, str | None]]) -> None:
    body, payload, expected = case
    assert decode(body[k : k + 1] for k in range(len(body))) == (payload, expected)


def test_every_split_point_of_a_real_world_body() -> None:
    """What the iOS app sends: pretty-printed, escaped slashes, a data URL, times as strings."""
    payload = bytes(range(256)) * 3 + b"\xff\xfe/+" * 10
    blob = "data:audio/x-m4a;base64," + base64.b64encode(payload).decode()
    body = (
        json.dumps(
            {
                "fromTime": "0",
                "meta": {"device": "iPhone15,2", "tags": ['a"b', 1.5e-3, None, True]},
                "fileBlob": blob,
                "toTime": 42.5,
                "summarizationType": "simple-cleanup",
            },
            indent=2,
        )
        .replace("/", "\\/")
        .encode()
    )
    expected = {"fromTime": "0", "toTime": "42.5", "summarizationType": "simple-cleanup"}
    for k in range(len(body) + 1):
        assert decode([body[:k], body[k:]]) == (payload, expected), k
    assert decode(body[k : k + 1] for k in range(len(body))) == (payload, expected)


# --- the fuzzer: mutations checked against a reference ----------------------------------------

MUTATION_BYTES = st.sampled_from(
    list(b'{}[]",:\\ \t\n0123456789eE.-+=/tfnrul\x00\xff')
) | st.integers(0, 255)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    body, _, _ = draw(legacy_bodies())
    return mutate(draw, body, MUTATION_BYTES, longest_repeat=40)


class _Refused(Exception):
    pass


class _Number(str):
    """A JSON number, kept as written."""


def _no_constants(name: str) -> Any:
    raise _Refused(name)  # NaN and Infinity are not JSON


def reference(body: bytes) -> tuple[set[str], bytes, dict[str, str | None]]:
    """What the body should give: the error codes it deserves (empty if valid), audio, fields.

    Python's `json` parses it (numbers kept as text), and the blob is decoded with
    `base64.b64decode` after the documented clean-ups.
    """
    duplicates: list[str] = []
    depth = _depth(body)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in items]
        duplicates.extend(name for name in set(names) if names.count(name) > 1 and name in KNOWN)
        return dict(items)

    if depth > MAX_DEPTH:
        return {"invalid_json"}, b"", {}
    try:
        document = json.loads(
            body.decode("utf-8", "replace"),
            object_pairs_hook=pairs,
            parse_int=_Number,
            parse_float=_Number,
            parse_constant=_no_constants,
        )
    except (ValueError, _Refused):
        if not body.strip(b" \t\r\n"):
            return {"empty_body"}, b"", {}
        return {"any"}, b"", {}
    if not isinstance(document, dict):
        return {"invalid_json"}, b"", {}
    if duplicates:
        return {"any"}, b"", {}
    problems: set[str] = set()
    fields: dict[str, str | None] = {}
    for name in LEGACY_FIELDS:
        if name in document:
            value = document[name]
            if isinstance(value, dict | list):
                problems.add("invalid_parameters")
            elif isinstance(value, bool):
                fields[name] = "true" if value else "false"
            elif isinstance(value, str) and not isinstance(value, _Number):
                # Lone surrogates (`\ud800`) become U+FFFD, so that the text encodes as UTF-8.
                fields[name] = re.sub("[\ud800-\udfff]", "\ufffd", value)
            else:
                fields[name] = None if value is None else str(value)
    blob = document.get("fileBlob")
    audio = b""
    if "fileBlob" not in document:
        problems.add("empty_body")
    elif not isinstance(blob, str) or isinstance(blob, _Number):
        problems.add("invalid_json")
    else:
        try:
            audio = _reference_base64(blob)
        except ValueError:
            problems.add("invalid_base64")
        else:
            if not audio:
                problems.add("empty_body")
    return problems, audio, fields


def _depth(body: bytes) -> int:
    """Bracket nesting outside strings; enough to spot bodies over the cap."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def _reference_base64(text: str) -> bytes:
    text = re.sub(r"[ \t\r\n]", "", text)
    if text[:5].lower() == "data:":
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ValueError("bad data URL")
    if not text.isascii():
        raise ValueError("not ASCII")
    text = text.translate(str.maketrans("-_", "+/"))
    core = text.rstrip("=")
    padding = len(text) - len(core)
    needed = -len(core) % 4
    if "=" in core or len(core) % 4 == 1 or padding > needed:
        raise ValueError("bad padding")
    try:
        return base64.b64decode(core + "=" * needed, validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


CODES = {
    "invalid_json": (InvalidJson, 400),
    "invalid_base64": (InvalidBase64, 400),
    "empty_body": (errors.EmptyBody, 400),
    "invalid_parameters": (errors.InvalidParameters, 400),
    "field_too_large": (FieldTooLarge, 413),
}


@settings(max_examples=500 * SCALE, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), CUTS)
@example(b'{"fileBlob": "QUJD", "fileBlob": "QUJD"}', [])
@example(b'{"fileBlob": "QUJD"} x', [])
@example(b'[{"fileBlob": "QUJD"}]', [])
@example(b'{"fileBlob": 12}', [])
@example(b'{"fileBlob": "QUJD", "toTime": [1]}', [])
@example(b'{"fileBlob": "QQ=a"}', [3, 17])
@example(b'{"fileBlob": "Q"}', [])
@example(b'{"fileBlob": "data:audio/mp4,QUJD"}', [20])
@example(b'{"fileBlob": "\\u00e9QUJD"}', [])
@example(b'{"fileBlob": "QUJD\\"}', [])
@example(b'{"fileBlob": "QU\tJD"}', [])
@example(b'{"fileBlob": "QUJD", "fromTime": 01}', [])
@example(b'{"fileBlob": "QUJD", "fromTime": NaN}', [])
@example(b"  ", [])
@example(b'{"fileBlob": ""}', [])
@example(b'{"fileBlob": "AA", "summarizationType": "\\ud800udc00\\ud800\\udc00"}', [])
@example(b'{"fileBlob": "data:aud\\u1006o/mp4;base64,AA=="}', [])
@example(b'{"fileBlob": "data:aud\xe1\x80\x86o/mp4;base64,AA=="}', [])
def test_mutated_bodies_agree_with_the_reference(body: bytes, cuts: list[int]) -> None:
    problems, audio, fields = reference(body)
    started = time.process_time()
    if not problems:
        assert decode(split(body, cuts)) == (audio, fields)
    else:
        error = failure(split(body, cuts))
        assert error.message.strip()
        if "any" not in problems:
            assert error.code in problems, (error.code, error.message, problems)
        kind, status = CODES[error.code]
        assert type(error) is kind and error.status == status
    assert time.process_time() - started < 1.0


@settings(max_examples=300 * SCALE, deadline=2000)
@given(st.binary(max_size=200), CUTS)
def test_garbage_fails_cleanly(body: bytes, cuts: list[int]) -> None:
    try:
        decode(split(body, cuts))
    except errors.ServiceError as error:
        assert error.code in CODES
    else:
        assert reference(body)[0] == set()


# --- specific bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (b"", errors.EmptyBody, "no body"),
        (b" \r\n ", errors.EmptyBody, "no body"),
        (b'{"fromTime": 1}', errors.EmptyBody, "no fileBlob"),
        (b'{"fileBlob": ""}', errors.EmptyBody, "fileBlob is empty"),
        (b'{"fileBlob": "data:audio/mp4;base64,"}', errors.EmptyBody, "empty"),
        (b'{"fileBlob": "QUJD"', InvalidJson, "ends at byte 19"),
        (b'{"fileBlob": "QUJD', InvalidJson, "ends"),
        (b'{"fileBlob": "QUJD"}}', InvalidJson, "after the end of the object"),
        (b'{"fileBlob": "QUJD"} {}', InvalidJson, "after the end"),
        (b'{"fileBlob": "QUJD", "fileBlob": "QUJD"}', InvalidJson, "fileBlob appears twice"),
        (b'{"toTime": 1, "fileBlob": "QUJD", "toTime": 2}', InvalidJson, "toTime appears twice"),
        (b'[{"fileBlob": "QUJD"}]', InvalidJson, "must be a JSON object"),
        (b'"QUJD"', InvalidJson, "must be a JSON object"),
        (b'{"fileBlob": 42}', InvalidJson, "fileBlob must be a string"),
        (b'{"fileBlob": null}', InvalidJson, "fileBlob must be a string"),
        (b'{"fileBlob": "QUJD",}', InvalidJson, "expected a key"),
        (b"{'fileBlob': 'QUJD'}", InvalidJson, "expected a key"),
        (b'{"fileBlob" "QUJD"}', InvalidJson, "expected ':'"),
        (b'{"fileBlob": "QUJD" "x": 1}', InvalidJson, "expected ','"),
        (b'{"x": 01, "fileBlob": "QUJD"}', InvalidJson, "expected ','"),
        (b'{"x": 1., "fileBlob": "QUJD"}', InvalidJson, "after '.'"),
        (b'{"x": -, "fileBlob": "QUJD"}', InvalidJson, "after '-'"),
        (b'{"x": 1e, "fileBlob": "QUJD"}', InvalidJson, "exponent"),
        (b'{"x": tru, "fileBlob": "QUJD"}', InvalidJson, "expected true"),
        (b'{"x": NaN, "fileBlob": "QUJD"}', InvalidJson, "expected a value"),
        (b'{"x": "\\q", "fileBlob": "QUJD"}', InvalidJson, "invalid escape"),
        (b'{"x": "\\u12G4", "fileBlob": "QUJD"}', InvalidJson, "hex digits"),
        (b'{"x": "a\nb", "fileBlob": "QUJD"}', InvalidJson, "control character"),
        (b'{"fileBlob": "QU\nJD"}', InvalidJson, "control character"),
        (b'{"fileBlob": "QU*D"}', InvalidBase64, "'*' is not a base64 character"),
        (b'{"fileBlob": "QUJD\\"QUJD"}', InvalidBase64, "is not a base64 character"),
        (b'{"fileBlob": "QUJD\\u00e9"}', InvalidBase64, "a non-ASCII character is not"),
        (b'{"fileBlob": "QUJD\xc3\xa9"}', InvalidBase64, "a non-ASCII character is not"),
        (b'{"fileBlob": "Q"}', InvalidBase64, "lone character"),
        (b'{"fileBlob": "QUJDR"}', InvalidBase64, "lone character"),
        (b'{"fileBlob": "QQ==QUJD"}', InvalidBase64, "more after its final"),
        (b'{"fileBlob": "QQ===="}', InvalidBase64, "more after its final"),
        (b'{"fileBlob": "Q==="}', InvalidBase64, "padding is misplaced"),
        (b'{"fileBlob": "=QUJD"}', InvalidBase64, "padding is misplaced"),
        (b'{"fileBlob": "data:audio/mp4,QUJD"}', InvalidBase64, "without ';base64'"),
        (b'{"fileBlob": "data:audio/mp4;base64"}', InvalidBase64, "no ','"),
        (b'{"fileBlob": "QUJD", "fromTime": {"s": 1}}', errors.InvalidParameters, "fromTime"),
        (b'{"fileBlob": "QUJD", "toTime": [1]}', errors.InvalidParameters, "array"),
    ],
)
def test_bad_bodies(body: bytes, error: type[errors.ServiceError], words: str) -> None:
    for chunks in ([body], [body[k : k + 1] for k in range(len(body))]):
        caught = failure(chunks)
        assert type(caught) is error
        assert words in caught.message, caught.message
        assert caught.status == (413 if error is FieldTooLarge else 400)


def test_error_messages_say_where() -> None:
    assert "byte 20" in failure([b'{"fileBlob": "QUJD" "x": 1}']).message


def test_a_failed_decoder_stays_failed() -> None:
    decoder = LegacyJsonDecoder()
    with pytest.raises(InvalidJson):
        decoder.feed(b"[")
    with pytest.raises(InvalidJson):
        decoder.feed(b'{"fileBlob": "QUJD"}')
    with pytest.raises(InvalidJson):
        decoder.close()


def test_values_of_every_kind() -> None:
    body = (
        b'{"fromTime": true, "toTime": null, "fileBlob": "QUJD",'
        b' "summarizationType": "a\\u00e9\\n\\"\\ud83d\\ude00\\ud800"}'
    )
    assert decode([body]) == (
        b"ABC",
        {"fromTime": "true", "toTime": None, "summarizationType": 'aé\n"\U0001f600\ufffd'},
    )


def test_escaped_key_names_are_the_same_keys() -> None:
    body = b'{"\\u0066ileBlob": "QUJD", "from\\u0054ime": 3, "fileBlob": "QUJD"}'
    assert "fileBlob appears twice" in failure([body]).message


def test_only_the_top_level_counts() -> None:
    body = b'{"x": {"fileBlob": 1, "fromTime": {"toTime": []}}, "fileBlob": "QUJD", "toTime": 5}'
    assert decode([body]) == (b"ABC", {"toTime": "5"})


def test_other_field_names() -> None:
    decoder = LegacyJsonDecoder(fields=["language"], blob_field="audio")
    events = decoder.feed(b'{"language": "fr", "fromTime": 1, "audio": "QUJD"}') + decoder.close()
    assert events == [
        Field("language", "fr"),
        BlobStart(field_name="audio"),
        BlobData(b"ABC"),
        BlobEnd(),
    ]


# --- hostile input: caps, time and memory -----------------------------------------------------


def test_nesting_is_capped() -> None:
    deep = b'{"x": ' + b"[" * MAX_DEPTH
    assert "nested deeper than 64" in failure([deep, b"]" * 10]).message
    assert decode(
        [b'{"x": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b', "fileBlob": "QUJD"}']
    )


def test_a_field_is_capped() -> None:
    long = b'{"summarizationType": "' + b"x" * (64 * 1024 + 1) + b'", "fileBlob": "QUJD"}'
    caught = failure([long])
    assert isinstance(caught, FieldTooLarge) and caught.status == 413
    number = b'{"fromTime": ' + b"1" * (64 * 1024 + 1) + b', "fileBlob": "QUJD"}'
    assert isinstance(failure(split(number, range(0, len(number), 1000))), FieldTooLarge)


def test_large_skipped_values_are_linear_and_kept_nowhere() -> None:
    big = 4 * 1024 * 1024
    bodies = [
        b'{"x": ' + b"9" * big + b', "fileBlob": "QUJD"}',
        b'{"x": "' + b"s" * big + b'", "fileBlob": "QUJD"}',
        b'{"' + b"k" * big + b'": 1, "fileBlob": "QUJD"}',
        b"{" + b" " * big + b'"fileBlob": "QUJD"}',
        b'{"fileBlob": "' + b" " * big + b'QUJD"}',
        b'{"x": [' + b"0," * (big // 8) + b'0], "fileBlob": "QUJD"}',
    ]
    for body in bodies:
        started = time.process_time()
        assert decode(split(body, range(0, len(body), 65536))) == (b"ABC", {})
        assert time.process_time() - started < 2.0


def test_one_byte_feeds_are_not_quadratic() -> None:
    payload = bytes(range(256)) * 200  # 51 KB of audio, 68 KB of base64
    body = (
        b'{"toTime": "30", "x": {"y": ["'
        + b"z" * 2000
        + b'", 1e10]}, "fileBlob": "data:audio/mp4;base64,'
        + base64.b64encode(payload).replace(b"/", b"\\/")
        + b'", "fromTime": 1}'
    )
    started = time.process_time()
    assert decode(body[k : k + 1] for k in range(len(body))) == (
        payload,
        {"toTime": "30", "fromTime": "1"},
    )
    assert time.process_time() - started < 5.0


class _VirtualBody:
    """A 50 MB legacy body, produced chunk by chunk so that the test holds none of it."""

    def __init__(self, base64_bytes: int) -> None:
        raw = bytes(range(256)) * 192  # 49152 bytes: exactly 65536 of base64
        self.block = base64.b64encode(raw)
        self.blocks = base64_bytes // len(self.block)
        self.head = b'{"fromTime": 0, "toTime": 30, "fileBlob": "data:audio/mp4;base64,'
        self.tail = b'", "summarizationType": "none"}'
        self.audio_digest = hashlib.sha256(raw * self.blocks).hexdigest()
        self.size = len(self.head) + len(self.block) * self.blocks + len(self.tail)

    def chunks(self, size: int) -> Iterator[bytes]:
        body_end = len(self.head) + len(self.block) * self.blocks
        for start in range(0, self.size, size):
            yield self._bytes(start, min(start + size, self.size), body_end)

    def _bytes(self, start: int, end: int, body_end: int) -> bytes:
        out = bytearray()
        position = start
        while position < end:
            if position < len(self.head):
                piece = self.head[position : min(end, len(self.head))]
            elif position < body_end:
                offset = (position - len(self.head)) % len(self.block)
                piece = self.block[offset : offset + end - position]
            else:
                piece = self.tail[position - body_end : end - body_end]
            out += piece
            position += len(piece)
        return bytes(out)


def test_memory_stays_bounded_on_a_50_mb_body() -> None:
    body = _VirtualBody(50 * 1024 * 1024)
    traced = decode_traced(LegacyJsonDecoder(), body.chunks(65536), BlobData)
    assert traced.digest == body.audio_digest
    assert traced.fields == {"fromTime": "0", "toTime": "30", "summarizationType": "none"}
    # The feed (64 KiB) and its decoded bytes (48 KiB) come and go; nothing accumulates.
    assert traced.peak < 512 * 1024, traced.peak
    assert traced.kept < 16 * 1024, traced.kept
