"""The resumable-upload draft's fields, as Apple's URLSession speaks them.

iOS 17 speaks interop version 3 (draft -01: `Upload-Incomplete`), iOS 18 version 6
(`Upload-Complete`, appends typed `application/partial-upload`); 5 is between them.
A request names its version in `Upload-Draft-Interop-Version`, and every answer about the
upload names it back.  Booleans and integers are RFC 8941 structured items: `?1`, `42`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vrai_stream import errors

VERSION_HEADER = "upload-draft-interop-version"
VERSIONS = (3, 5, 6)
INTERIM_STATUS = 104
INTERIM_REASON = "Upload Resumption Supported"
INTERIM_EXTENSION = "vrai.interim_response"
"""The scope extension through which an app sends a 1xx (see `http.server`)."""
PARTIAL_UPLOAD = "application/partial-upload"
"""The media type of an append from interop version 6 on."""


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

    def state(self, *, offset: int, complete: bool) -> dict[str, str]:
        """The fields that tell a client how far its upload has come."""
        fields = {"Upload-Draft-Interop-Version": str(self.version), "Upload-Offset": str(offset)}
        if self.version >= 5:
            fields["Upload-Complete"] = "?1" if complete else "?0"
        else:
            fields["Upload-Incomplete"] = "?0" if complete else "?1"
        return fields


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
