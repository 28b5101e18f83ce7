"""Small records in the shared bucket, written with S3's conditional writes.

A record is one object: a line of JSON (what it is, whose, until when), then, optionally,
raw bytes (an answer's body).  Writes compare and swap: `create` fails when the object
exists (`If-None-Match: *`), `replace` when it changed since it was read (`If-Match`).
AWS S3, Tigris, R2 and moto's server mode all honour both.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import anyio

from vrai_stream.s3_client import LazyS3Client, describe_error, error_status

logger = logging.getLogger("vrai_stream.state")

PREFIX = "state/"
CONFLICT_STATUSES = frozenset({409, 412})
"""412: the condition failed; 409: another conditional write to the key was under way."""


class StateUnavailable(Exception):
    """The bucket did not answer in time, or refused for a reason other than a condition."""


@dataclass(frozen=True)
class Record:
    fields: dict[str, Any]
    body: bytes
    etag: str


def encode(fields: dict[str, Any], body: bytes = b"") -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n" + body


def decode(data: bytes, etag: str) -> Record | None:
    """The record, or None for an object that is not one (never written by us)."""
    head, _, body = data.partition(b"\n")
    try:
        fields = json.loads(head)
    except ValueError:
        return None
    return Record(fields, body, etag) if isinstance(fields, dict) else None


class StateBucket:
    """The `state/` records in one bucket; every call gives up after `timeout_seconds`."""

    def __init__(self, bucket: str, client: LazyS3Client, *, timeout_seconds: float) -> None:
        self.bucket = bucket
        self._timeout_seconds = timeout_seconds
        self._client = client
        """The process's S3 client, shared with the debug copies and closed by its owner."""

    async def ready(self) -> None:
        """Make the client (importing the SDK takes a moment), so later calls are quick."""
        try:
            await self._client.get()
        except Exception as exc:  # a configuration the SDK refuses: the bucket is out of reach
            raise self._unavailable("connect", "", exc) from exc

    async def check(self) -> None:
        """Say once, at start, whether the bucket answers (and have the client ready)."""
        try:
            client = await self._client.get()
            with anyio.fail_after(self._timeout_seconds):
                await client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else describe_error(exc)
            logger.warning(
                "state bucket is not reachable: keys and answers stay on this machine until it is",
                extra={"bucket": self.bucket, "error": what},
            )
        else:
            logger.info("state bucket reachable", extra={"bucket": self.bucket})

    async def create(self, key: str, fields: dict[str, Any], body: bytes = b"") -> str | None:
        """Write the record if none is there: its etag, or None when one already was."""
        return await self._put(key, encode(fields, body), IfNoneMatch="*")

    async def replace(
        self, key: str, fields: dict[str, Any], etag: str, body: bytes = b""
    ) -> str | None:
        """Overwrite the record read with `etag`: the new etag, or None when it changed."""
        return await self._put(key, encode(fields, body), IfMatch=etag)

    async def put(self, key: str, fields: dict[str, Any], body: bytes = b"") -> None:
        """Write the record, whatever was there: for records only their owner writes."""
        await self._put(key, encode(fields, body))

    async def read(self, key: str) -> Record | None:
        client = await self._client.get()
        try:
            with anyio.fail_after(self._timeout_seconds):
                reply = await client.get_object(Bucket=self.bucket, Key=PREFIX + key)
                async with reply["Body"] as stream:
                    data = await stream.read()
        except Exception as exc:
            if error_status(exc) == 404:
                return None
            raise self._unavailable("read", key, exc) from exc
        return decode(data, reply["ETag"])

    async def keys(self, prefix: str, limit: int = 1000) -> list[str]:
        """The records under `prefix`, at most `limit` of them."""
        client = await self._client.get()
        try:
            with anyio.fail_after(self._timeout_seconds):
                reply = await client.list_objects_v2(
                    Bucket=self.bucket, Prefix=PREFIX + prefix, MaxKeys=limit
                )
        except Exception as exc:
            raise self._unavailable("list", prefix, exc) from exc
        return [str(item["Key"]).removeprefix(PREFIX) for item in reply.get("Contents", [])]

    async def delete(self, key: str) -> None:
        client = await self._client.get()
        try:
            with anyio.fail_after(self._timeout_seconds):
                await client.delete_object(Bucket=self.bucket, Key=PREFIX + key)
        except Exception as exc:
            raise self._unavailable("delete", key, exc) from exc

    async def _put(self, key: str, data: bytes, **condition: str) -> str | None:
        client = await self._client.get()
        try:
            with anyio.fail_after(self._timeout_seconds):
                reply = await client.put_object(
                    Bucket=self.bucket,
                    Key=PREFIX + key,
                    Body=data,
                    ContentType="application/octet-stream",
                    **condition,
                )
        except Exception as exc:
            if condition and error_status(exc) in CONFLICT_STATUSES:
                return None
            raise self._unavailable("write", key, exc) from exc
        return str(reply["ETag"])

    def _unavailable(self, action: str, key: str, exc: BaseException) -> StateUnavailable:
        what = "timed out" if isinstance(exc, TimeoutError) else describe_error(exc)
        logger.warning(
            f"state bucket: {action} failed",
            extra={"bucket": self.bucket, "key": PREFIX + key, "error": what},
        )
        return StateUnavailable(f"{action} {key}: {what}")
