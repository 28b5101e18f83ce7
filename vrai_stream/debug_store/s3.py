"""Debug copies in S3 (aioboto3), uploaded while the audio streams.

Each copy (the input, teed from the body; the MP3, teed from ffmpeg's output as it is
written) goes into a bounded buffer and is uploaded as it fills: one PUT for a small copy,
multipart (one part in flight) for a large one.  Unsampled jobs hold their copies in files
on local disk instead, uploaded only if the job fails.  If S3 falls behind
by more than the buffer, the copy is abandoned and its multipart upload aborted; the job
never waits for S3.  Endpoint and credentials come from the standard `AWS_*` variables.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from vrai_stream import metrics
from vrai_stream.background import BackgroundWork
from vrai_stream.debug_store.base import CopyContext, DebugCopies, InputFormat, Keys, metadata
from vrai_stream.s3_client import LazyS3Client, describe_error
from vrai_stream.settings import Settings
from vrai_stream.spool import Budget, FileSpool

logger = logging.getLogger("vrai_stream.debug_store")

ABORT_TIMEOUT_SECONDS = 10.0


class S3Store:
    kind = "s3"

    def __init__(self, settings: Settings, client: LazyS3Client) -> None:
        assert settings.debug_bucket is not None
        self.bucket = settings.debug_bucket
        self.prefix = settings.debug_prefix
        self.part_bytes = settings.debug_part_bytes
        self.buffer_bytes = settings.debug_buffer_bytes
        self.url_expiry_seconds = settings.debug_url_expiry_seconds
        self.settle_timeout_seconds = settings.debug_settle_timeout_seconds
        self.sample_rate = settings.debug_sample_rate
        self.tmp_dir = settings.tmp_dir
        self.hold_budget = Budget(settings.debug_hold_bytes)
        self._timeout_seconds = settings.debug_s3_timeout_seconds
        self._client = client
        """The process's S3 client, shared with the state bucket and closed by its owner."""
        self._work = BackgroundWork()

    def start(self, background: anyio.abc.TaskGroup) -> None:
        """Run uploads in `background`, which outlives requests; check the bucket once."""
        self._work.start(background)
        background.start_soon(self._check_bucket)

    def spawn(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._work.spawn(job)

    async def wait_idle(self) -> None:
        await self._work.wait_idle()

    async def client(self) -> Any:
        return await self._client.get()

    async def _check_bucket(self) -> None:
        try:
            client = await self.client()
            with anyio.fail_after(self._timeout_seconds * 2):
                await client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            logger.warning(
                "debug bucket is not reachable; debug copies will fail until it is",
                extra={"bucket": self.bucket, "error": describe_error(exc)},
            )
        else:
            logger.info("debug bucket reachable", extra={"bucket": self.bucket})

    def begin(self, context: CopyContext) -> DebugCopies:
        sampled = random.random() < self.sample_rate  # noqa: S311 - sampling, not security  # nosec B311
        return S3Copies(self, context, sampled=sampled)

    def describe(self) -> tuple[str, dict[str, Any]]:
        where = (
            f"bucket {self.bucket}, prefix {self.prefix}"
            if self.prefix
            else f"bucket {self.bucket}, no prefix"
        )
        return (
            f"debug copies go to S3: {where}",
            {"store": "s3", "bucket": self.bucket, "prefix": self.prefix},
        )

    async def aclose(self) -> None:
        """Nothing of its own to close: the client is its owner's."""


class _Abandoned(Exception):
    """A part upload cut short by `abandon()`."""


class StreamingUpload:
    """One object, uploaded as its bytes arrive, never buffering more than a bound."""

    def __init__(
        self,
        store: S3Store,
        key: str,
        *,
        content_type: str,
        object_metadata: dict[str, str],
        what: str,
        others_held: Callable[[], int] = lambda: 0,
    ) -> None:
        self._store = store
        self.key = key
        self._others_held = others_held
        """The bytes the job's other copy holds: both share one buffer's bound."""
        self._content_type = content_type
        self._metadata = object_metadata
        self._what = what
        self._buffer = bytearray()
        self._in_flight = 0
        self._closed = False
        self.abandoned = False
        self.completed = False
        self.done = anyio.Event()
        self._wakeup = anyio.Event()
        self._part_in_flight: anyio.CancelScope | None = None

    def offer(self, chunk: bytes) -> None:
        if self.abandoned or self.done.is_set():
            return
        if self.held_bytes + self._others_held() + len(chunk) > self._store.buffer_bytes:
            logger.warning(
                "debug copy abandoned: the store fell behind",
                extra={"key": self.key, "bufferBytes": self._store.buffer_bytes},
            )
            metrics.DEBUG_COPIES.labels(copy=self._what, outcome="fell_behind").inc()
            self.abandon()
            return
        self._buffer += chunk
        self._wakeup.set()

    @property
    def held_bytes(self) -> int:
        """What this copy holds in memory: its buffer and the part on its way."""
        return len(self._buffer) + self._in_flight

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    def abandon(self) -> None:
        self.abandoned = True
        self._buffer.clear()
        self._wakeup.set()
        # A doomed part must not keep crawling up a slow S3, holding its bytes, a connection
        # and the multipart upload for as long as that takes.
        if self._part_in_flight is not None:
            self._part_in_flight.cancel()

    async def run(self) -> None:
        """Upload until closed or abandoned; whatever happens, leave no multipart behind."""
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        client: Any = None
        try:
            client = await self._store.client()
            while True:
                await self._wait_for_work()
                if self.abandoned:
                    return
                part_bytes = self._store.part_bytes
                if self._closed and len(self._buffer) <= part_bytes:
                    last = bytes(self._buffer)
                    self._buffer.clear()
                    if upload_id is None:
                        await client.put_object(
                            Bucket=self._store.bucket,
                            Key=self.key,
                            Body=last,
                            ContentType=self._content_type,
                            Metadata=self._metadata,
                        )
                    else:
                        if last:
                            parts.append(await self._upload_part(client, upload_id, parts, last))
                        await client.complete_multipart_upload(
                            Bucket=self._store.bucket,
                            Key=self.key,
                            UploadId=upload_id,
                            MultipartUpload={"Parts": parts},
                        )
                    self.completed = True
                    metrics.DEBUG_COPIES.labels(copy=self._what, outcome="stored").inc()
                    return
                with memoryview(self._buffer) as view:
                    part = bytes(view[:part_bytes])  # one copy, not two
                del self._buffer[:part_bytes]
                self._in_flight = len(part)
                if upload_id is None:
                    created = await client.create_multipart_upload(
                        Bucket=self._store.bucket,
                        Key=self.key,
                        ContentType=self._content_type,
                        Metadata=self._metadata,
                    )
                    upload_id = created["UploadId"]
                parts.append(await self._upload_part(client, upload_id, parts, part))
                self._in_flight = 0
        except _Abandoned:
            pass
        except Exception as exc:
            logger.warning(
                "debug copy failed", extra={"key": self.key, "error": describe_error(exc)}
            )
            metrics.DEBUG_COPIES.labels(copy=self._what, outcome="failed").inc()
        finally:
            self._buffer.clear()
            self._in_flight = 0
            if not self.completed:
                self.abandoned = True
                if upload_id is not None:
                    await self._abort(client, upload_id)
            self.done.set()

    async def _wait_for_work(self) -> None:
        while not (self.abandoned or self._closed or len(self._buffer) >= self._store.part_bytes):
            self._wakeup = anyio.Event()
            await self._wakeup.wait()

    async def _upload_part(
        self, client: Any, upload_id: str, parts: list[dict[str, Any]], body: bytes
    ) -> dict[str, Any]:
        number = len(parts) + 1
        with anyio.CancelScope() as scope:
            self._part_in_flight = scope
            if self.abandoned:
                scope.cancel()
            try:
                response = await client.upload_part(
                    Bucket=self._store.bucket,
                    Key=self.key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
            finally:
                self._part_in_flight = None
            return {"ETag": response["ETag"], "PartNumber": number}
        raise _Abandoned

    async def _abort(self, client: Any, upload_id: str) -> None:
        """Abort, retrying while S3 is unreachable, until a deadline (shutdown included)."""
        error = "TimeoutError"
        delay = 0.25
        with anyio.CancelScope(shield=True), anyio.move_on_after(ABORT_TIMEOUT_SECONDS):
            while True:
                try:
                    await client.abort_multipart_upload(
                        Bucket=self._store.bucket, Key=self.key, UploadId=upload_id
                    )
                    return
                except Exception as exc:
                    error = describe_error(exc)
                    if "NoSuchUpload" in error:
                        return
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
        logger.warning(
            "could not abort a multipart upload; the bucket's lifecycle rule will",
            extra={"key": self.key, "error": error},
        )


class _Copy:
    """One copy, the input or the MP3: uploaded as its bytes arrive when the job is sampled,
    else held on local disk until the job's outcome says whether it is kept."""

    def __init__(
        self,
        store: S3Store,
        key: str,
        *,
        content_type: str,
        object_metadata: dict[str, str],
        what: str,
        sampled: bool,
        others_held: Callable[[], int],
    ) -> None:
        self.key = key
        self.content_type = content_type
        self.what = what
        self.upload: StreamingUpload | None = None
        self.held: FileSpool | None = None
        self.ended = False
        if sampled:
            self.upload = StreamingUpload(
                store,
                key,
                content_type=content_type,
                object_metadata=object_metadata,
                what=what,
                others_held=others_held,
            )
            store.spawn(self.upload.run)
            return
        try:
            self.held = FileSpool(disk=store.hold_budget, tmp_dir=store.tmp_dir, suffix=".held")
        except OSError as exc:
            logger.warning(f"cannot hold the {what} copy", extra={"error": describe_error(exc)})

    def offer(self, chunk: bytes) -> None:
        if self.upload is not None:
            self.upload.offer(chunk)
        elif self.held is not None:
            try:
                self.held.write(chunk)
            except Exception:
                logger.warning(f"{self.what} copy dropped: no room to hold it locally")
                metrics.DEBUG_COPIES.labels(copy=self.what, outcome="fell_behind").inc()
                self.drop_held()

    def end(self) -> None:
        self.ended = True
        if self.upload is not None:
            self.upload.close()
        elif self.held is not None:
            try:
                self.held.finish()
            except Exception:
                self.drop_held()

    @property
    def kept(self) -> bool:
        """Whether there is (or will be) something to keep an error copy of."""
        return (self.upload is not None and not self.upload.abandoned) or self.held is not None

    def drop_held(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None

    def drop(self) -> None:
        """Never a copy after all (an MP3 never ended): gone, quietly, whatever went up."""
        if self.upload is not None and not self.upload.done.is_set():
            self.upload.abandon()  # its run aborts a multipart upload already begun
        self.drop_held()


class S3Copies:
    """One job's copies: streamed when sampled, else held locally until the outcome is known."""

    def __init__(self, store: S3Store, context: CopyContext, *, sampled: bool) -> None:
        self._store = store
        self._context = context
        self._sampled = sampled
        self._layout: InputFormat | None = None
        self._keys = Keys.for_job(store.prefix, context, None)
        self._input: _Copy | None = None
        self._output: _Copy | None = None

    def start_input(self, layout: InputFormat) -> None:
        self._layout = layout
        self._keys = Keys.for_job(self._store.prefix, self._context, layout)
        self._input = self._copy_of(self._keys.input, layout.content_type, "input")

    def offer(self, chunk: bytes) -> None:
        if self._input is not None:
            self._input.offer(chunk)

    def end_input(self) -> None:
        if self._input is not None:
            self._input.end()

    def start_output(self) -> None:
        if self._output is None:
            self._output = self._copy_of(self._keys.output, "audio/mpeg", "output")

    def offer_output(self, chunk: bytes) -> None:
        if self._output is not None:
            self._output.offer(chunk)

    def end_output(self) -> None:
        if self._output is not None:
            self._output.end()

    def discard_output(self) -> None:
        self._drop_unended_output()

    def abandon(self) -> None:
        self._drop_unended_output()
        for copy in (self._input, self._output):
            if copy is None:
                continue
            upload = copy.upload
            if upload is not None:
                if not upload.done.is_set():
                    upload.abandon()
                    metrics.DEBUG_COPIES.labels(copy=copy.what, outcome="abandoned").inc()
                # Already stored, or about to be (the MP3 of a window that ended early).
                self._store.spawn(functools.partial(self._discard, upload))
            copy.drop_held()

    async def settle(self, failure_code: str | None) -> dict[str, str] | None:
        self._drop_unended_output()
        if failure_code is None:
            for copy in (self._input, self._output):
                if copy is not None:
                    copy.drop_held()
            self._store.spawn(self._stamp_success)
            return None
        wanted = self._error_keys(failure_code)
        settled = anyio.Event()

        async def keep_errors() -> None:
            try:
                await self._keep_error_copies(failure_code)
            finally:
                settled.set()

        self._store.spawn(keep_errors)
        # Links are signed locally; waiting a little lets the copies exist when they're used.
        with anyio.move_on_after(self._store.settle_timeout_seconds):
            await settled.wait()
        return await self._links(wanted)

    def _copy_of(self, key: str, content_type: str, what: str) -> _Copy:
        return _Copy(
            self._store,
            key,
            content_type=content_type,
            object_metadata=metadata(self._context, self._layout, "pending"),
            what=what,
            sampled=self._sampled,
            others_held=functools.partial(self._held_bytes, not_of=what),
        )

    def _held_bytes(self, not_of: str) -> int:
        """What the job's copies other than `not_of` hold in memory, waiting for S3."""
        return sum(
            copy.upload.held_bytes
            for copy in (self._input, self._output)
            if copy is not None and copy.upload is not None and copy.what != not_of
        )

    def _drop_unended_output(self) -> None:
        """An MP3 whose copy was never ended (ffmpeg failed, no audio) keeps no copy."""
        if self._output is not None and not self._output.ended:
            self._output.drop()
            self._output = None

    async def _discard(self, upload: StreamingUpload) -> None:
        """A job that never finished keeps no copy."""
        await upload.done.wait()
        if not upload.completed:
            return
        try:
            client = await self._store.client()
            await client.delete_object(Bucket=self._store.bucket, Key=upload.key)
        except Exception as exc:
            logger.warning(
                "debug copy not discarded", extra={"key": upload.key, "error": describe_error(exc)}
            )

    async def _stamp_success(self) -> None:
        """Mark the copies `outcome: ok` once they are stored (a server-side copy onto itself)."""
        for copy in (self._input, self._output):
            if copy is None or copy.upload is None:
                continue
            await copy.upload.done.wait()
            if copy.upload.completed:
                await self._copy(copy.key, copy.key, copy.content_type, "ok")

    async def _keep_error_copies(self, code: str) -> None:
        if self._input is not None:
            # The input's own copy is stamped with the outcome too.
            await self._keep_error_copy(self._input, self._keys.error_input(code), code, True)
        if self._output is not None:
            await self._keep_error_copy(self._output, self._keys.error_output(code), code, False)
        metrics.DEBUG_COPIES.labels(copy="error", outcome="stored").inc()

    async def _keep_error_copy(self, copy: _Copy, key: str, code: str, restamp: bool) -> None:
        if copy.upload is not None:
            await copy.upload.done.wait()
            if copy.upload.completed:
                await self._copy(copy.key, key, copy.content_type, code)
                if restamp:
                    await self._copy(copy.key, copy.key, copy.content_type, code)
        elif copy.held is not None:
            await self._put_file(copy.held, key, copy.content_type, code)
            copy.drop_held()

    def _error_keys(self, code: str) -> dict[str, str]:
        """The error copies that exist or are on their way."""
        wanted: dict[str, str] = {}
        if self._input is not None and self._input.kept:
            wanted["input"] = self._keys.error_input(code)
        if self._output is not None and self._output.kept:
            wanted["output"] = self._keys.error_output(code)
        return wanted

    async def _links(self, wanted: dict[str, str]) -> dict[str, str] | None:
        """Presigned GET links, signed locally; they never make a bucket public."""
        if not wanted:
            return None
        try:
            client = await self._store.client()
            return {
                which: await client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self._store.bucket, "Key": key},
                    ExpiresIn=self._store.url_expiry_seconds,
                )
                for which, key in wanted.items()
            }
        except Exception as exc:
            logger.warning("could not sign debug links", extra={"error": describe_error(exc)})
            return None

    async def _copy(self, source: str, target: str, content_type: str, outcome: str) -> None:
        try:
            client = await self._store.client()
            await client.copy_object(
                Bucket=self._store.bucket,
                Key=target,
                CopySource={"Bucket": self._store.bucket, "Key": source},
                MetadataDirective="REPLACE",
                ContentType=content_type,
                Metadata=metadata(self._context, self._layout, outcome),
            )
        except Exception as exc:
            logger.warning(
                "debug copy not kept", extra={"key": target, "error": describe_error(exc)}
            )
            metrics.DEBUG_COPIES.labels(copy="error", outcome="failed").inc()

    async def _put_file(self, held: FileSpool, key: str, content_type: str, code: str) -> None:
        try:
            client = await self._store.client()
            with held.path.open("rb") as file:
                await client.upload_fileobj(
                    file,
                    self._store.bucket,
                    key,
                    ExtraArgs={
                        "ContentType": content_type,
                        "Metadata": metadata(self._context, self._layout, code),
                    },
                )
        except Exception as exc:
            logger.warning("debug copy not kept", extra={"key": key, "error": describe_error(exc)})
            metrics.DEBUG_COPIES.labels(copy="error", outcome="failed").inc()


def lifecycle_rules(prefix: str, expire_days: int) -> dict[str, Any]:
    """The bucket rules we recommend: copies expire, abandoned multipart uploads vanish."""
    return {
        "Rules": [
            {
                "ID": "vrai-expire-debug-copies",
                "Filter": {"Prefix": prefix},
                "Status": "Enabled",
                "Expiration": {"Days": expire_days},
            },
            {
                "ID": "vrai-abort-incomplete-uploads",
                "Filter": {"Prefix": prefix},
                "Status": "Enabled",
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
            },
        ]
    }


async def apply_lifecycle(settings: Settings, expire_days: int) -> dict[str, Any]:
    """Put the recommended rules on the debug bucket; returns what the bucket now holds."""
    s3 = LazyS3Client(settings.debug_s3_timeout_seconds)
    store = S3Store(settings, s3)
    try:
        client = await store.client()
        await client.put_bucket_lifecycle_configuration(
            Bucket=store.bucket,
            LifecycleConfiguration=lifecycle_rules(store.prefix, expire_days),
        )
        current: dict[str, Any] = await client.get_bucket_lifecycle_configuration(
            Bucket=store.bucket
        )
        return {"Rules": current.get("Rules", [])}
    finally:
        await s3.aclose()
