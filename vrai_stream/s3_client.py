"""One S3 client per part that talks to a bucket, created on first use.

Importing aioboto3 takes half a second and most processes never need it: the client is made
the first time it is asked for, in a worker thread, and closed with its owner.  Endpoint and
credentials come from the standard `AWS_*` variables.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import anyio
import anyio.to_thread


class LazyS3Client:
    def __init__(self, timeout_seconds: float) -> None:
        self._timeout_seconds = timeout_seconds
        self._client: Any = None
        self._lock = anyio.Lock()
        self._exit_stack = contextlib.AsyncExitStack()

    async def get(self) -> Any:
        """The client, made on the first call."""
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    aioboto3 = await anyio.to_thread.run_sync(importlib.import_module, "aioboto3")
                    config_module = await anyio.to_thread.run_sync(
                        importlib.import_module, "aiobotocore.config"
                    )
                    config = config_module.AioConfig(
                        connect_timeout=self._timeout_seconds,
                        read_timeout=self._timeout_seconds,
                        retries={"max_attempts": 3, "mode": "standard"},
                        signature_version="s3v4",
                    )
                    session = aioboto3.Session()
                    self._client = await self._exit_stack.enter_async_context(
                        session.client("s3", config=config)
                    )
        return self._client

    async def aclose(self) -> None:
        await self._exit_stack.aclose()


def describe_error(exc: BaseException) -> str:
    """An exception for a log line: its type and S3's error code, never a credential."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return f"{type(exc).__name__}: {code}"
    return type(exc).__name__


def error_status(exc: BaseException) -> int | None:
    """The HTTP status S3 answered with, for an error from the SDK; None for any other."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    return None
