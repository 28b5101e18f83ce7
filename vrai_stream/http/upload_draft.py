"""The resumable-upload draft's fields, in each interop version clients speak.

iOS 17 speaks interop version 3 (draft -01: `Upload-Incomplete`), iOS 18 version 6
(`Upload-Complete`, appends typed `application/partial-upload`); 5 is between them.
Version 7 (drafts -06 to -08) adds the upload's length (`Upload-Length`) and its limits
(`Upload-Limit`, a dictionary: `max-size`, `max-age`); version 8 (drafts -09 to -12, the
current text) has them announced in the 104, in `HEAD` and in `OPTIONS` (with
`Accept-Patch`).  A request names its version in `Upload-Draft-Interop-Version`, and every
answer about the upload names it back.  Booleans, integers and dictionaries are RFC 9651
structured fields: `?1`, `42`, `max-size=42, max-age=60`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vrai_stream import errors

VERSION_HEADER = "upload-draft-interop-version"
VERSIONS = (3, 5, 6, 7, 8)
WITH_LIMITS = 7
"""The first interop version with `Upload-Length` and `Upload-Limit`."""
INTERIM_STATUS = 104
INTERIM_REASON = "Upload Resumption Supported"
INTERIM_EXTENSION = "vrai.interim_response"
"""The scope extension through which an app sends a 1xx (see `http.server`)."""
PARTIAL_UPLOAD = "application/partial-upload"
"""The media type of an append from interop version 6 on."""


@dataclass(frozen=True)
class Limits:
    """What the server holds an upload to (`Upload-Limit`)."""

    max_size: int
    """Bytes of the whole representation: the endpoint's body limit."""
    max_age: float
    """Seconds the upload resource has left (a waiting upload: what is left of its grace)."""

    def field(self) -> str:
        return f"max-size={self.max_size}, max-age={max(0, int(self.max_age))}"


@dataclass(frozen=True)
class Draft:
    """The interop version a client speaks, and how to read and write its fields."""

    version: int

    def complete(self, headers: Mapping[str, str]) -> bool | None:
        """Whether this request's body ends the upload; None when it does not say."""
        if self.version >= 5:
            return _boolean(headers, "upload-complete")
        incomplete = _boolean(headers, "upload-incomplete")
        return None if incomplete is None else not incomplete

    def offset(self, headers: Mapping[str, str]) -> int | None:
        raw = headers.get("upload-offset")
        if raw is None:
            return None
        if not raw.isdigit() or len(raw) > 15:
            raise errors.InvalidParameters(
                f"Upload-Offset must be a whole number; got {raw[:20]!r}"
            )
        return int(raw)

    def length(self, headers: Mapping[str, str], *, offset: int = 0) -> int | None:
        """The whole upload's length, when the request says it: `Upload-Length`, or the
        `Content-Length` of a request that completes the upload (both must agree)."""
        declared = self._integer(headers, "upload-length") if self.version >= WITH_LIMITS else None
        content = self._integer(headers, "content-length")
        implied = offset + content if content is not None and self.complete(headers) else None
        if declared is not None and implied is not None and declared != implied:
            raise errors.InvalidParameters(
                f"Upload-Length says {declared} bytes, the request's length {implied}"
            )
        return declared if declared is not None else implied

    def state(
        self,
        *,
        offset: int,
        complete: bool,
        length: int | None = None,
        limits: Limits | None = None,
    ) -> dict[str, str]:
        """The fields that tell a client how far its upload has come (and, from version 7,
        its length when known and its limits)."""
        fields = {"Upload-Draft-Interop-Version": str(self.version), "Upload-Offset": str(offset)}
        if self.version >= 5:
            fields["Upload-Complete"] = "?1" if complete else "?0"
        else:
            fields["Upload-Incomplete"] = "?0" if complete else "?1"
        if self.version >= WITH_LIMITS:
            if length is not None:
                fields["Upload-Length"] = str(length)
            if limits is not None:
                fields["Upload-Limit"] = limits.field()
        return fields

    @staticmethod
    def _integer(headers: Mapping[str, str], name: str) -> int | None:
        raw = headers.get(name)
        if raw is None:
            return None
        if not raw.strip().isdigit() or len(raw.strip()) > 15:
            raise errors.InvalidParameters(f"{name} must be a whole number; got {raw[:20]!r}")
        return int(raw)


def draft_of(headers: Mapping[str, str]) -> Draft | None:
    """The draft a request speaks; None when it speaks none; 400 for a version we lack."""
    raw = headers.get(VERSION_HEADER)
    if raw is None:
        return None
    if not raw.strip().isdigit() or int(raw) not in VERSIONS:
        raise errors.InvalidParameters(
            f"Upload-Draft-Interop-Version {raw[:10]!r} is not supported; "
            f"use one of {', '.join(map(str, VERSIONS))}"
        )
    return Draft(int(raw))


def _boolean(headers: Mapping[str, str], name: str) -> bool | None:
    raw = headers.get(name)
    if raw is None:
        return None
    if raw.strip() not in ("?0", "?1"):
        raise errors.InvalidParameters(f"{name} must be ?0 or ?1; got {raw[:10]!r}")
    return raw.strip() == "?1"
