"""Prometheus metrics, served at `/metrics` for Fly's metrics scraper."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)

UNROUTED = "none"
"""The endpoint of an answer given before any endpoint: 404, 405, a head or chunk the HTTP
parser refused (431, `invalid_http`)."""

REQUESTS = Counter(
    "vrai_requests",
    "Requests by endpoint and outcome code: every answer, counted once",
    ["endpoint", "code"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "vrai_stage_seconds",
    "Seconds spent per stage: receive, transcode, transcribe, total, after_last_byte",
    ["stage"],
    buckets=_STAGE_BUCKETS,
    registry=REGISTRY,
)
BYTES = Counter(
    "vrai_bytes",
    "Bytes received (in) and MP3 bytes produced (out)",
    ["direction"],
    registry=REGISTRY,
)
JOBS = Gauge("vrai_jobs", "Jobs running or queued", ["state"], registry=REGISTRY)
LAYOUTS = Counter(
    "vrai_uploads", "Uploads by container and mode", ["format", "mode"], registry=REGISTRY
)
INDEX_LAST_FALLBACKS = Counter(
    "vrai_index_last_fallbacks",
    "Index-last uploads streamed, then decoded again from their spool: the index disagreed",
    ["format"],
    registry=REGISTRY,
)
FFMPEG_EXITS = Counter("vrai_ffmpeg_exits", "ffmpeg exit statuses", ["status"], registry=REGISTRY)
DEBUG_COPIES = Counter(
    "vrai_debug_copies",
    "Debug copies by copy (input, output, error) and outcome",
    ["copy", "outcome"],
    registry=REGISTRY,
)
AUDIO_SECONDS = Counter(
    "vrai_audio_seconds",
    "Seconds of audio processed (per user: `audioSeconds` and `userId` in the request log)",
    registry=REGISTRY,
)
CLEANUP_FAILURES = Counter(
    "vrai_cleanup_failures", "Temp files that could not be deleted", registry=REGISTRY
)
UPLOAD_RESUMPTIONS = Counter(
    "vrai_upload_resumptions", "Uploads resumed after their connection dropped", registry=REGISTRY
)
UPLOADS_ENDED = Counter(
    "vrai_uploads_ended",
    "Resumable uploads given up: expired (grace over), evicted (cap), cancelled, or drained",
    ["reason"],
    registry=REGISTRY,
)
IDEMPOTENT_REPLAYS = Counter(
    "vrai_idempotent_replays", "Requests answered again from an Idempotency-Key", registry=REGISTRY
)
WEBHOOK_ATTEMPTS = Counter(
    "vrai_webhook_attempts",
    "Webhook POSTs by result: 2xx, 3xx, 4xx, 5xx, timeout, error (no connection), refused "
    "(the callback's address was not allowed when connecting)",
    ["result"],
    registry=REGISTRY,
)
WEBHOOKS = Counter(
    "vrai_webhooks",
    "Webhooks by outcome: delivered, given_up (attempts spent, or 410 Gone), abandoned "
    "(the server stopped first), dropped (too many pending)",
    ["outcome"],
    registry=REGISTRY,
)
UPSTREAM_LIMIT = Gauge(
    "vrai_upstream_limit",
    "Transcription calls the upstream API may have in flight at once (adaptive: found as it runs)",
    registry=REGISTRY,
)
UPSTREAM_IN_FLIGHT = Gauge(
    "vrai_upstream_in_flight",
    "Transcription calls in flight to the upstream API",
    registry=REGISTRY,
)
UPSTREAM_OVERLOADS = Counter(
    "vrai_upstream_overloads",
    "Signs the upstream API had more calls than it could take, by kind: slow, 429, 503, timeout",
    ["kind"],
    registry=REGISTRY,
)
