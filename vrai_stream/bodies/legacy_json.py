"""The legacy JSON body, `{"fileBlob": "<base64>", "fromTime": ..., ...}`, decoded as it streams.

The old service parsed the whole body with `JSON.parse`, so a long recording held the body,
its string and its decoded bytes in memory at once.  This is an incremental scanner: it keeps
only its state between feeds (a container stack capped in depth, the 0-3 base64 characters of an
unfinished quantum, the few small fields it reports), so memory follows the chunk size, never
the body's.  Long runs (the base64, strings, whitespace, digits) and whole tokens of skipped
values are matched with `re`, and the base64 is decoded with `bytes.translate` and
`binascii`, a chunk at a time; nothing is ever rescanned, so one-byte feeds cost no more per
byte than a few Python calls.  Dense hostile JSON (`[0,0,0,...`) costs up to about 1 us a
byte; `uploads` feeds at most 16 KiB at once, so the event loop gets a turn every ~10 ms.

What it accepts is JSON (RFC 8259) with a top-level object, as `JSON.parse` did, except that
duplicate keys among the ones it reports are refused rather than last-one-wins: a `fromTime`
after the audio has started could no longer change its window.  Unknown keys are skipped
whatever their value.  In `fileBlob`, spaces and the `\\n`, `\\r`, `\\t`, `\\/` and `\\u00XX`
escapes are allowed, a `data:<type>;base64,` prefix is dropped, the URL-safe alphabet is
accepted and the final padding may be left out.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Collection

from vrai_stream import errors
from vrai_stream.bodies.forms import AudioData, AudioEnd, AudioStart, Event, Field
from vrai_stream.errors import FieldTooLarge, InvalidBase64, InvalidJson

LEGACY_FIELDS = ("fromTime", "toTime", "summarizationType")
BLOB_FIELD = "fileBlob"
MAX_FIELD_BYTES = 64 * 1024
MAX_DEPTH = 64
"""Nesting deeper than this (the top-level object counts as 1) is refused, not explored."""
MAX_KEY_BYTES = 256
"""Longer keys are skipped unread: none of the keys this decoder looks for is that long."""
MAX_DATA_URL_PREFIX = 256


class BlobStart(AudioStart):
    """`fileBlob`'s string begins."""


class BlobData(AudioData):
    """Bytes decoded from `fileBlob`, as many as the chunk completed."""


class BlobEnd(AudioEnd):
    """`fileBlob`'s string is over."""


# Parser states: what the next significant byte may be.
_TOP = 0  # the top-level `{`
_KEY_OR_CLOSE = 1  # after `{`
_KEY = 2  # after `,` in an object
_COLON = 3
_VALUE = 4  # after `:`, or `,` in an array
_VALUE_OR_CLOSE = 5  # after `[`
_AFTER_VALUE = 6  # `,` or the container's closing bracket
_STRING = 7
_ESCAPE = 8  # after a backslash in a string
_UNICODE = 9  # in the hex digits of `\uXXXX`
_NUMBER = 10
_LITERAL = 11  # true, false, null
_DONE = 12  # after the top-level object: whitespace only

# What a string (or a value) is for.
_SKIP = 0
_KEYNAME = 1  # a top-level key: kept, up to MAX_KEY_BYTES
_FIELD = 2  # a reported field's value: kept, up to max_field_bytes
_BLOB = 3  # fileBlob: decoded as it goes

# Number states (RFC 8259 grammar); _N_ZERO, _N_INT, _N_FRAC and _N_EXP may end a number.
_N_START, _N_MINUS, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_E, _N_ESIGN, _N_EXP = range(9)
_N_ENDS = frozenset((_N_ZERO, _N_INT, _N_FRAC, _N_EXP))

_FAST_STATES = frozenset((_KEY_OR_CLOSE, _KEY, _COLON, _VALUE, _VALUE_OR_CLOSE, _AFTER_VALUE))
_SKIP_TOKEN = re.compile(
    rb"""[ \t\r\n]*+(?:
        ([][{},:])
        | ("[^"\\\x00-\x1f]*+(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*+)*+")
        | (-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null)(?=[ \t\r\n,\]}])
    )""",
    re.VERBOSE,
)
"""One whole token: 1, punctuation; 2, a string; 3, a scalar whose end is in the chunk."""
_COMMA, _COLON_BYTE = ord(","), ord(":")
_OPEN_OBJECT, _OPEN_ARRAY, _CLOSE_ARRAY = b"{[]"
_WS = re.compile(rb"[ \t\r\n]*")
_DIGITS = re.compile(rb"[0-9]*")
_STRING_RUN = re.compile(
    rb'[^"\\\x00-\x1f]*+(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*+)*+'
)
"""Inside a string: plain characters and whole, valid escapes."""
_BLOB_RUN = re.compile(rb'[^"\\\x00-\x1f]*+(?:\\[/nrt][^"\\\x00-\x1f]*+)*+')
"""Inside fileBlob: plain characters and the escapes writers put in base64 (`\\/`, line breaks)."""
_WS_BYTES = frozenset(b" \t\r\n")
_DIGIT_BYTES = frozenset(b"0123456789")
_HEX_BYTES = frozenset(b"0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"true", ord("f"): b"false", ord("n"): b"null"}


class LegacyJsonDecoder:
    """Feed the body's chunks; get `Field`s and `BlobStart`, `BlobData`..., `BlobEnd`.

    Only the top-level keys in `fields` are reported (their value as text: a string's
    contents, a number as written, `true`/`false`, or None for null); everything else is
    checked for well-formedness and skipped.  Every failure is a `ServiceError`:
    `InvalidJson`, `InvalidBase64`, `FieldTooLarge`, `InvalidParameters` (a reported field
    that is an object or an array), or `errors.EmptyBody` (no body, no or an empty fileBlob).
    """

    def __init__(
        self,
        *,
        fields: Collection[str] = LEGACY_FIELDS,
        blob_field: str = BLOB_FIELD,
        max_field_bytes: int = MAX_FIELD_BYTES,
        max_depth: int = MAX_DEPTH,
    ) -> None:
        self._fields = frozenset(fields)
        self._known = frozenset(name.encode() for name in (*self._fields, blob_field))
        self._blob_field = blob_field
        self._max_field_bytes = max_field_bytes
        self._max_depth = max_depth
        self._state = _TOP
        self._stack = bytearray()  # b"{" or b"[" per open container
        self._offset = 0  # bytes of the body before the current feed
        self._in_key = False
        self._sink = _SKIP  # what the current string is for
        self._role = _SKIP  # what the value after the current key is for
        self._name = ""  # the reported field whose value is being read
        self._text = bytearray()  # a kept string's raw (still escaped) bytes, or a number's
        self._key_too_long = False
        self._hex = bytearray()
        self._number = _N_START
        self._literal = b""
        self._literal_at = 0
        self._seen: set[str] = set()
        self._blob: _Base64Stream | None = None
        self._blob_seen = False
        self._failure: errors.ServiceError | None = None
        self._closed = False

    def feed(self, data: bytes) -> list[Event]:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise RuntimeError("feed() after close()")
        events: list[Event] = []
        try:
            self._scan(data, events)
        except errors.ServiceError as failure:
            self._fail(failure)
        self._offset += len(data)
        return events

    def close(self) -> list[Event]:
        """Check that the body was one whole JSON object with a fileBlob."""
        if self._failure is not None:
            raise self._failure
        self._closed = True
        if self._state == _TOP:
            self._fail(
                errors.EmptyBody(
                    "The request has no body; send a JSON object with the audio in fileBlob"
                )
            )
        if self._state != _DONE:
            self._fail(
                InvalidJson(
                    f"The JSON body ends at byte {self._offset}, before its object is closed"
                )
            )
        if not self._blob_seen:
            self._fail(
                errors.EmptyBody(
                    f"The JSON body has no {self._blob_field}; send the audio there, as base64"
                )
            )
        return []

    def _fail(self, failure: errors.ServiceError) -> None:
        self._failure = failure
        raise failure

    def _bad(self, message: str, at: int) -> InvalidJson:
        return InvalidJson(f"Invalid JSON at byte {self._offset + at}: {message}")

    def _scan(self, data: bytes, events: list[Event]) -> None:
        n = len(data)
        i = 0
        while i < n:
            state = self._state
            if state == _STRING:
                i = self._scan_string(data, i, events)
                continue
            if state == _NUMBER:
                i = self._scan_number(data, i, events)
                continue
            c = data[i]
            if state == _ESCAPE:
                self._escape(c, i, events)
                i += 1
                continue
            if state == _UNICODE:
                self._unicode(c, i, events)
                i += 1
                continue
            if state == _LITERAL:
                i = self._scan_literal(data, i, events)
                continue
            if state in _FAST_STATES:
                j = self._skip_tokens(data, i)
                if j > i:
                    i = j
                    continue
            # Between tokens: whitespace is free.
            if c in _WS_BYTES:
                i = _match_end(_WS, data, i)
                continue
            if state in (_VALUE, _VALUE_OR_CLOSE):
                if state == _VALUE_OR_CLOSE and c == ord("]"):
                    self._close_container(events)
                else:
                    self._start_value(c, i, events)
                    if self._state in (_NUMBER, _LITERAL):
                        continue  # those scanners take their first byte themselves
            elif state == _AFTER_VALUE:
                self._after_value(c, i, events)
            elif state in (_KEY_OR_CLOSE, _KEY):
                if c == ord('"'):
                    self._start_key()
                elif c == ord("}") and state == _KEY_OR_CLOSE:
                    self._close_container(events)
                else:
                    raise self._bad(f"expected a key in double quotes, found {_show(c)}", i)
            elif state == _COLON:
                if c != ord(":"):
                    raise self._bad(f"expected ':' after a key, found {_show(c)}", i)
                self._state = _VALUE
            elif state == _TOP:
                if c != ord("{"):
                    raise InvalidJson(
                        f"The body must be a JSON object ({{...}}); it starts with {_show(c)}"
                    )
                self._stack.append(c)
                self._state = _KEY_OR_CLOSE
            else:  # _DONE
                raise self._bad(f"unexpected {_show(c)} after the end of the object", i)
            i += 1

    # --- structure --------------------------------------------------------------------------

    def _skip_tokens(self, data: bytes, i: int) -> int:
        """Take whole tokens of what is skipped, fast; return where to go on byte by byte.

        Hostile bodies can be dense with tokens (`[0,0,0,...`), and the general path costs a
        few method calls per token.  This loop takes each complete token with one regex
        match and checks the grammar inline.  Anything it is not sure of (a token cut by the
        chunk's end, a key or value that is reported, an error) it leaves, untaken, to the
        general path, which has the last word.
        """
        stack = self._stack
        state = self._state
        if self._role != _SKIP:
            return i
        while True:
            match = _SKIP_TOKEN.match(data, i)
            if match is None:
                break
            kind = match.lastindex
            if kind == 1:  # punctuation
                p = data[match.end() - 1]
                if p == _COMMA:
                    if state != _AFTER_VALUE:
                        break
                    state = _KEY if stack[-1] == _OPEN_OBJECT else _VALUE
                elif p == _COLON_BYTE:
                    if state != _COLON:
                        break
                    state = _VALUE
                elif p in (_OPEN_OBJECT, _OPEN_ARRAY):
                    if state not in (_VALUE, _VALUE_OR_CLOSE) or len(stack) >= self._max_depth:
                        break
                    stack.append(p)
                    state = _KEY_OR_CLOSE if p == _OPEN_OBJECT else _VALUE_OR_CLOSE
                else:  # a closing bracket
                    empty = _VALUE_OR_CLOSE if p == _CLOSE_ARRAY else _KEY_OR_CLOSE
                    opening = _OPEN_ARRAY if p == _CLOSE_ARRAY else _OPEN_OBJECT
                    if state not in (empty, _AFTER_VALUE) or stack[-1] != opening:
                        break
                    stack.pop()
                    state = _AFTER_VALUE if stack else _DONE
            elif state in (_KEY, _KEY_OR_CLOSE):
                if kind != 2:
                    break
                if len(stack) == 1:
                    raw = data[match.start(2) + 1 : match.end() - 1]
                    if raw in self._known or b"\\" in raw:
                        break  # a key that may matter: the general path reads it
                state = _COLON
            elif state in (_VALUE, _VALUE_OR_CLOSE):
                state = _AFTER_VALUE
            else:
                break
            i = match.end()
            if state == _DONE:
                break
        self._state = state
        return i

    def _start_key(self) -> None:
        self._in_key = True
        self._state = _STRING
        if len(self._stack) == 1:
            self._sink = _KEYNAME
            self._text.clear()
            self._key_too_long = False
        else:
            self._sink = _SKIP

    def _end_key(self, i: int) -> None:
        self._in_key = False
        self._state = _COLON
        self._role = _SKIP
        kept, self._sink = self._sink == _KEYNAME and not self._key_too_long, _SKIP
        if not kept:
            return
        key = _json_string(self._text)
        self._text.clear()
        if key == self._blob_field:
            if self._blob_seen:
                raise self._bad(f"{self._blob_field} appears twice", i)
            self._role = _BLOB
        elif key in self._fields:
            if key in self._seen:
                raise self._bad(f"{key} appears twice", i)
            self._seen.add(key)
            self._role = _FIELD
            self._name = key

    def _start_value(self, c: int, i: int, events: list[Event]) -> None:
        role = self._role
        self._role = _SKIP
        if role == _BLOB and c != ord('"'):
            raise self._bad(f"{self._blob_field} must be a string of base64", i)
        if c == ord('"'):
            self._state = _STRING
            self._sink = role
            self._text.clear()
            if role == _BLOB:
                self._blob_seen = True
                self._blob = _Base64Stream(self._blob_field)
                events.append(BlobStart(field_name=self._blob_field))
        elif c == ord("{") or c == ord("["):
            if role == _FIELD:
                raise errors.InvalidParameters(
                    f"{self._name} must be a number, a string or null, not an "
                    + ("object" if c == ord("{") else "array")
                )
            if len(self._stack) >= self._max_depth:
                raise self._bad(f"nested deeper than {self._max_depth} levels", i)
            self._stack.append(c)
            self._state = _KEY_OR_CLOSE if c == ord("{") else _VALUE_OR_CLOSE
        elif c == ord("-") or c in _DIGIT_BYTES:
            self._state = _NUMBER
            self._number = _N_START
            self._sink = role
            self._text.clear()
        elif c in _LITERALS:
            self._state = _LITERAL
            self._literal = _LITERALS[c]
            self._literal_at = 0
            self._sink = role
        else:
            raise self._bad(f"expected a value, found {_show(c)}", i)

    def _end_value(self, value: str | None, events: list[Event]) -> None:
        if self._sink == _FIELD:
            events.append(Field(self._name, value))
        self._sink = _SKIP
        self._state = _AFTER_VALUE if self._stack else _DONE

    def _after_value(self, c: int, i: int, events: list[Event]) -> None:
        top = self._stack[-1]
        if c == ord(","):
            self._state = _KEY if top == ord("{") else _VALUE
        elif (c == ord("}") and top == ord("{")) or (c == ord("]") and top == ord("[")):
            self._close_container(events)
        else:
            expected = "'}'" if top == ord("{") else "']'"
            raise self._bad(f"expected ',' or {expected}, found {_show(c)}", i)

    def _close_container(self, events: list[Event]) -> None:
        self._stack.pop()
        self._end_value(None, events)

    # --- strings ----------------------------------------------------------------------------

    def _scan_string(self, data: bytes, i: int, events: list[Event]) -> int:
        # Plain characters and whole escapes go in one run; what stops the run (the closing
        # quote, an escape cut by the chunk's end, an error) is looked at byte by byte.
        j = _match_end(_BLOB_RUN if self._sink == _BLOB else _STRING_RUN, data, i)
        if j > i:
            self._string_run(data[i:j], events)
        if j == len(data):
            return j
        c = data[j]
        if c == ord('"'):
            self._end_string(j, events)
        elif c == ord("\\"):
            self._state = _ESCAPE
            if self._sink in (_KEYNAME, _FIELD):
                self._keep(b"\\")
        else:
            raise self._bad(f"a raw control character ({_show(c)}) inside a string", j)
        return j + 1

    def _string_run(self, run: bytes, events: list[Event]) -> None:
        sink = self._sink
        if sink == _BLOB:
            assert self._blob is not None
            if b"\\" in run:  # only the escapes _BLOB_RUN lets through
                run = _unescape_blob(run)
            decoded = self._blob.feed(run)
            if decoded:
                events.append(BlobData(decoded))
        elif sink in (_KEYNAME, _FIELD):
            self._keep(run)

    def _keep(self, raw: bytes) -> None:
        if self._sink == _KEYNAME:
            if self._key_too_long:
                return
            if len(self._text) + len(raw) > MAX_KEY_BYTES:
                self._key_too_long = True
                self._text.clear()
                return
        elif len(self._text) + len(raw) > self._max_field_bytes:
            raise FieldTooLarge(
                f"{self._name} is longer than {self._max_field_bytes} bytes; it must be short"
            )
        self._text += raw

    def _escape(self, c: int, i: int, events: list[Event]) -> None:
        if c == ord("u"):
            self._state = _UNICODE
            self._hex.clear()
        elif c in _SIMPLE_ESCAPES:
            self._state = _STRING
            if self._sink == _BLOB:
                # `\/` is a slash; `\n`, `\r`, `\t` are line breaks in wrapped base64.
                if c == ord("/"):
                    self._string_run(b"/", events)
                elif c not in b"nrt":
                    assert self._blob is not None
                    raise self._blob.invalid(f"\\{chr(c)} is not a base64 character")
        else:
            raise self._bad(f"invalid escape \\{_show(c, quoted=False)} in a string", i)
        if self._sink in (_KEYNAME, _FIELD):
            self._keep(bytes((c,)))

    def _unicode(self, c: int, i: int, events: list[Event]) -> None:
        if c not in _HEX_BYTES:
            raise self._bad(f"expected 4 hex digits after \\u, found {_show(c)}", i)
        self._hex.append(c)
        if self._sink in (_KEYNAME, _FIELD):
            self._keep(bytes((c,)))
        if len(self._hex) == 4:
            self._state = _STRING
            if self._sink == _BLOB:
                # As if written raw: the base64 refuses what is not ASCII, a data URL's
                # media type (which is not looked into) lets it be.
                char = chr(int(self._hex, 16)).encode("utf-8", "surrogatepass")
                self._string_run(char, events)

    def _end_string(self, i: int, events: list[Event]) -> None:
        if self._in_key:
            self._end_key(i)
            return
        if self._sink == _BLOB:
            assert self._blob is not None
            decoded = self._blob.close()
            if decoded:
                events.append(BlobData(decoded))
            if not self._blob.size:
                raise errors.EmptyBody(f"{self._blob_field} is empty; send the audio there")
            self._blob = None
            events.append(BlobEnd())
            self._end_value(None, events)
        elif self._sink == _FIELD:
            value = _json_string(self._text)
            self._text.clear()
            self._end_value(value, events)
        else:
            self._end_value(None, events)

    # --- numbers and literals ---------------------------------------------------------------

    def _scan_number(self, data: bytes, i: int, events: list[Event]) -> int:
        begin = i
        n = len(data)
        state = self._number
        ended = False
        while i < n:
            c = data[i]
            if state in (_N_INT, _N_FRAC, _N_EXP):
                i = _match_end(_DIGITS, data, i)
                if i == n:
                    break
                c = data[i]
                if state == _N_INT and c == ord("."):
                    state = _N_DOT
                elif state != _N_EXP and c in b"eE":
                    state = _N_E
                else:
                    ended = True
                    break
            elif state == _N_START:
                state = _N_MINUS if c == ord("-") else _N_ZERO if c == ord("0") else _N_INT
            elif state == _N_MINUS:
                if c not in _DIGIT_BYTES:
                    raise self._bad(f"expected a digit after '-', found {_show(c)}", i)
                state = _N_ZERO if c == ord("0") else _N_INT
            elif state == _N_ZERO:
                if c == ord("."):
                    state = _N_DOT
                elif c in b"eE":
                    state = _N_E
                else:
                    ended = True
                    break
            elif state == _N_DOT:
                if c not in _DIGIT_BYTES:
                    raise self._bad(f"expected a digit after '.', found {_show(c)}", i)
                state = _N_FRAC
            elif state == _N_E:
                if c in b"+-":
                    state = _N_ESIGN
                elif c in _DIGIT_BYTES:
                    state = _N_EXP
                else:
                    raise self._bad(f"expected an exponent, found {_show(c)}", i)
            else:  # _N_ESIGN
                if c not in _DIGIT_BYTES:
                    raise self._bad(f"expected a digit in the exponent, found {_show(c)}", i)
                state = _N_EXP
            i += 1
        self._number = state
        if self._sink == _FIELD and i > begin:
            self._keep(data[begin:i])
        if ended:
            if state not in _N_ENDS:  # pragma: no cover - every non-final state raises above
                raise self._bad("an unfinished number", i)
            value = self._text.decode("ascii") if self._sink == _FIELD else None
            self._text.clear()
            self._end_value(value, events)
        return i

    def _scan_literal(self, data: bytes, i: int, events: list[Event]) -> int:
        expected = self._literal
        at = self._literal_at
        take = min(len(data) - i, len(expected) - at)
        if data[i : i + take] != expected[at : at + take]:
            raise self._bad(f"expected {expected.decode()}", i)
        self._literal_at = at + take
        if self._literal_at == len(expected):
            self._end_value(None if expected == b"null" else expected.decode(), events)
        return i + take


class _Base64Stream:
    """Base64 decoded as it arrives: keeps 0-3 characters of an unfinished quantum.

    Also drops a `data:...;base64,` prefix (looked for in the first characters only) and
    accepts the URL-safe alphabet and missing final padding, as lenient decoders do.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._head: bytearray | None = bytearray()  # until we know about a data URL prefix
        self._pending = b""
        self._padding_left: int | None = None  # set once `=` has been seen
        self.size = 0  # decoded bytes so far

    def feed(self, chars: bytes) -> bytes:
        if self._head is not None:
            # Kept without whitespace, so that spaces can't grow it: it stays under a chunk.
            self._head += chars.translate(None, _WHITESPACE)
            chars = self._resolve_head(final=False)
        decoded = self._decode(chars)
        self.size += len(decoded)
        return decoded

    def close(self) -> bytes:
        chars = self._resolve_head(final=True) if self._head is not None else b""
        decoded = self._decode(chars)
        if self._pending:
            if len(self._pending) == 1:
                raise self.invalid("it ends with a lone character (truncated?)")
            decoded += self._quantum(self._pending + b"=" * (4 - len(self._pending)))
            self._pending = b""
        self.size += len(decoded)
        return decoded

    def _resolve_head(self, *, final: bool) -> bytes:
        """Return what follows a data URL prefix, or everything once there is none."""
        assert self._head is not None
        start = bytes(self._head)
        if len(start) < 5 and b"data:".startswith(start.lower()) and not final:
            return b""  # too early to tell
        if start[:5].lower() != b"data:":
            self._head = None
            return start
        comma = start.find(b",")
        if comma < 0:
            if len(start) > MAX_DATA_URL_PREFIX or final:
                raise self.invalid("it starts with 'data:' but has no ',' after the media type")
            return b""
        self._head = None
        if not start[5:comma].lower().endswith(b";base64"):
            raise self.invalid("it is a data URL without ';base64'")
        return start[comma + 1 :]

    def _decode(self, chars: bytes) -> bytes:
        clean = chars.translate(_URL_SAFE, _WHITESPACE)
        if not clean:
            return b""
        wrong = clean.translate(None, _ALPHABET)
        if wrong:
            what = "a non-ASCII character" if wrong[0] >= 0x80 else _show(wrong[0])
            raise self.invalid(f"{what} is not a base64 character")
        if self._padding_left is not None:
            if clean.count(b"=") != len(clean) or len(clean) > self._padding_left:
                raise self.invalid("there is more after its final '=' padding")
            self._padding_left -= len(clean)
            return b""
        data = self._pending + clean
        pad = data.find(b"=")
        if pad < 0:
            whole = len(data) - len(data) % 4
            self._pending = data[whole:]
            return self._quantum(data[:whole])
        tail = data[pad:]
        in_quantum = pad % 4
        if in_quantum < 2:
            raise self.invalid("its '=' padding is misplaced")
        if tail.count(b"=") != len(tail) or len(tail) > 4 - in_quantum:
            raise self.invalid("there is more after its final '=' padding")
        self._padding_left = 4 - in_quantum - len(tail)
        self._pending = b""
        last = pad - in_quantum
        return self._quantum(data[:last]) + self._quantum(data[last:pad] + b"=" * (4 - in_quantum))

    def _quantum(self, chars: bytes) -> bytes:
        try:
            return binascii.a2b_base64(chars, strict_mode=True)
        except binascii.Error as exc:  # pragma: no cover - `_decode` checked the characters
            raise self.invalid(str(exc)) from None

    def invalid(self, why: str) -> InvalidBase64:
        return InvalidBase64(f"{self._name} is not valid base64: {why}")


_SURROGATE = re.compile("[\ud800-\udfff]")
_URL_SAFE = bytes.maketrans(b"-_", b"+/")
_WHITESPACE = b" \t\r\n"
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _json_string(raw: bytearray) -> str:
    """A JSON string's text from its raw bytes, already checked to be well-formed JSON.

    Invalid UTF-8 and lone surrogates (`\\ud800`) are replaced with U+FFFD, as Node does:
    a string that cannot be encoded back to UTF-8 would break whatever echoes it later.
    """
    text: str = json.loads('"' + raw.decode("utf-8", "replace") + '"')
    return _SURROGATE.sub("\ufffd", text)


def _unescape_blob(run: bytes) -> bytes:
    """`\\/` is a slash; `\\n`, `\\r` and `\\t` are line breaks, which base64 ignores."""
    return run.replace(b"\\/", b"/").replace(b"\\n", b"").replace(b"\\r", b"").replace(b"\\t", b"")


def _match_end(pattern: re.Pattern[bytes], data: bytes, i: int) -> int:
    """Where a run of `pattern` (which may match nothing) starting at `i` ends."""
    match = pattern.match(data, i)
    return i if match is None else match.end()


def _show(c: int, *, quoted: bool = True) -> str:
    """A byte for an error message, printable whatever it is."""
    text = chr(c) if 0x20 < c < 0x7F else f"0x{c:02x}"
    return repr(text) if quoted and 0x20 < c < 0x7F else text
