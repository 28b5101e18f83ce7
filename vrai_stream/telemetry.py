"""Logs as one JSON object per line, which Fly's log shipping and `jq` both read."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

REQUEST_LOGGER = "vrai_stream.request"
QUIET_LOGGERS = ("uvicorn.access", "botocore", "aiobotocore", "faster_whisper", "httpx", "httpx2")

_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, stream: TextIO = sys.stdout) -> None:
    """Send every log record, uvicorn's included, to `stream` as JSON."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # One line per request comes from the service itself; uvicorn's access log would repeat it.
    # The SDKs' own info lines (endpoint discovery, audio lengths) are noise at this level.
    # The `openai` SDK's HTTP client logs as `httpx2`: an info line per upstream call.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def log_request(fields: dict[str, Any]) -> None:
    logging.getLogger(REQUEST_LOGGER).info("request", extra={"request": fields})
