"""Requests of the wrong shape, answered with what to send instead.

Mistakes a newcomer makes: parameters the endpoint does not take (`from_time=2`, silently
ignored, would transcribe the whole file), or a form or JSON body sent where the raw
recording is the body.  Each is refused with the name of what was wrong and of what the
service takes, before the body is read where the request line and headers tell, else from
the body's first bytes.  Real audio is never refused: a body is a form or JSON only if the
container sniffer recognizes no audio in it and its first bytes are a form's or JSON's.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Sequence

from vrai_stream import errors
from vrai_stream.media.sniff import sniff

RAW_ENDPOINT = "/v1/transcriptions"
MAX_NAMES_SHOWN = 5
SHAPE_SNIFF_BYTES = 512
"""A form's first boundary and part header, or JSON's first brace, are well within this."""


def _normalized(name: str) -> str:
    """`from_time`, `FromTime`, `from-time` -> `fromtime`: the same parameter, misspelled."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _shown(name: str) -> str:
    return repr(name[:40] + ("…" if len(name) > 40 else ""))


def check_query(query: Iterable[str], accepted: Sequence[str], *, endpoint: str) -> None:
    """Refuse query parameters `endpoint` does not take, naming them and those it takes."""
    unknown = [name for name in dict.fromkeys(query) if name not in accepted]
    if not unknown:
        return
    by_spelling = {_normalized(name): name for name in accepted}
    described = []
    for name in unknown[:MAX_NAMES_SHOWN]:
        meant = by_spelling.get(_normalized(name))
        described.append(f"{_shown(name)} (did you mean {meant}?)" if meant else _shown(name))
    if len(unknown) > MAX_NAMES_SHOWN:
        described.append(f"and {len(unknown) - MAX_NAMES_SHOWN} more")
    plural = "s" if len(unknown) > 1 else ""
    raise errors.InvalidParameters(
        f"Unknown query parameter{plural} {', '.join(described)}; "
        f"{endpoint} takes {', '.join(accepted)}"
    )


def check_no_body_fields_in_query(
    query: Iterable[str], fields: Sequence[str], *, endpoint: str, body: str
) -> None:
    """On an endpoint whose parameters travel in the body: refuse them in the query string.

    Other query parameters pass, as they always have: apps in the field and SDKs (an Azure
    `api-version`, a `default_query`) may add their own, and refusing those would break them.
    """
    by_spelling = {_normalized(name): name for name in fields}
    misplaced = [
        (name, by_spelling[_normalized(name)])
        for name in dict.fromkeys(query)
        if _normalized(name) in by_spelling
    ]
    if not misplaced:
        return
    named = ", ".join(
        meant if name == meant else f"{meant} (sent as {_shown(name)})" for name, meant in misplaced
    )
    raise errors.InvalidParameters(
        f"{endpoint} reads its parameters from the {body}, not the query string: move {named} "
        f"into the {body} (it takes {', '.join(fields)})"
    )


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


_FORM_ADVICE = (
    f"{RAW_ENDPOINT} takes the recording itself as the body, not a multipart form: send the "
    "file's bytes (curl --data-binary @note.m4a), or send this form to "
    "/trim-and-transcribe-multipart (file part 'audio') or /v1/audio/transcriptions "
    "(file part 'file', OpenAI's API)"
)
_JSON_ADVICE = (
    f"{RAW_ENDPOINT} takes the recording itself as the body, not JSON: send the file's bytes "
    "(curl --data-binary @note.m4a), or send JSON with the recording base64 in 'fileBlob' "
    "to /trim-and-transcribe"
)


def check_raw_content_type(content_type: str | None) -> None:
    """A multipart Content-Type with a boundary is a form, whatever the body: refuse it unread.

    A JSON Content-Type alone decides nothing (an app may label every request JSON and
    still send audio): the body's first bytes decide, in `refuse_forms_and_json`.
    """
    if _media_type(content_type).startswith("multipart/") and "boundary=" in (
        content_type or ""
    ).lower().replace(" ", ""):
        raise errors.BodyNotAudio(_FORM_ADVICE)


_FORM_HEAD = re.compile(
    rb"\A[\r\n]*--[0-9A-Za-z'()+_,\-./:=? ]{1,70}\r?\n"
    rb"(?:[!-9;-~]+:[^\r\n]*\r?\n)*?content-disposition:[ \t]*form-data",
    re.IGNORECASE,
)
_JSON_HEAD = re.compile(rb"\A(?:\xef\xbb\xbf)?[ \t\r\n]*\{[ \t\r\n]*[\"}]")


def body_shape(head: bytes) -> str | None:
    """`form` or `json` when the first bytes are a form's or a JSON object's and no audio's."""
    layout = sniff(head, complete=True)
    if layout is None or layout.container != "unknown":
        return None
    if _FORM_HEAD.match(head):
        return "form"
    if _JSON_HEAD.match(head):
        return "json"
    return None


async def refuse_forms_and_json(
    chunks: AsyncIterator[bytes], *, head_bytes: int = SHAPE_SNIFF_BYTES
) -> AsyncIterator[bytes]:
    """The body unchanged, unless its first bytes are a form or JSON: then `BodyNotAudio`."""
    held: list[bytes] = []
    size = 0
    async for chunk in chunks:
        held.append(chunk)
        size += len(chunk)
        if size >= head_bytes:
            break
    shape = body_shape(b"".join(held)[:head_bytes]) if size else None
    if shape is not None:
        raise errors.BodyNotAudio(_FORM_ADVICE if shape == "form" else _JSON_ADVICE)
    for chunk in held:
        yield chunk
    del held
    async for chunk in chunks:
        yield chunk
