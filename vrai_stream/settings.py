"""Every knob of the service, read once from the environment and validated.

A bad value stops start-up with a message naming the variable, instead of failing
later on some request.  Every variable read here is listed in the README.

Each setting is declared once, on its field (variable, kind, bounds and allowed values in its
metadata), so a knob's default, its limits and its variable cannot drift apart.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from vrai_stream.auth.config import AuthConfig, AuthKind

TranscriberKind = Literal["openai", "local"]
TranscribeMode = Literal["segments", "whole"]
ConcurrencyMode = Literal["adaptive", "fixed"]
IndexLastKind = Literal["speculate", "exact", "spool"]
DebugStoreKind = Literal["s3", "dir", "off"]

MiB = 1024 * 1024

ANONYMOUS = "anonymous"
"""The user id of every request when authentication is off."""

MPEG2_L3_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 0)
"""MPEG-2 layer III bitrates (kb/s) by a frame header's 4-bit index; 0: free format or invalid.

The one table of them: `media.mp3` measures frames with it, and
`VRAI_MP3_BITRATE_KBPS` accepts exactly its rates (the service writes 16 kHz, MPEG-2, MP3).
"""

_MP3_BITRATES_KBPS = tuple(rate for rate in MPEG2_L3_KBPS if rate)
_LOG_LEVELS = ("debug", "info", "warning", "error")
_TRANSCRIBERS: tuple[TranscriberKind, ...] = get_args(TranscriberKind)
_TRANSCRIBE_MODES: tuple[TranscribeMode, ...] = get_args(TranscribeMode)
_CONCURRENCY_MODES: tuple[ConcurrencyMode, ...] = get_args(ConcurrencyMode)
_INDEX_LAST: tuple[IndexLastKind, ...] = get_args(IndexLastKind)
_DEBUG_STORES: tuple[DebugStoreKind, ...] = get_args(DebugStoreKind)
_AUTH_KINDS: tuple[AuthKind, ...] = get_args(AuthKind)


class SettingsError(ValueError):
    """A variable holds a value the service cannot run with."""


class Secret(str):
    """A string that never shows its value in a repr, a log line or a traceback."""

    def __repr__(self) -> str:
        return "Secret('***')"


# --- how a field is read ---------------------------------------------------------------------

VARIABLE = "variable"
"""The key of a field's `Variable` in its metadata."""

_UNSET = object()


@dataclass(frozen=True)
class Variable:
    """Where one field comes from: its variable, its kind, its bounds and its allowed values."""

    name: str
    kind: Callable[[str], Any]
    """Turns the variable's text into a value; a `ValueError` says what the text must be."""
    minimum: float | None = None
    maximum: float | None = None
    allowed: tuple[Any, ...] = ()
    auto: bool = False
    """`auto` is allowed too, and is what an unset variable means: `from_env` resolves it."""
    zero_is_none: bool = False
    """0 turns off the limit: the field holds None."""

    def read(self, env: Mapping[str, str]) -> object:
        """The field's value, or `_UNSET` when the variable is unset (or blank)."""
        text = env.get(self.name, "").strip()
        if not text:
            return "auto" if self.auto else _UNSET
        try:
            value = self.kind(text)
        except ValueError as exc:
            raise SettingsError(f"{self.name} {exc}, got {text!r}") from None
        allowed = ("auto", *self.allowed) if self.auto else self.allowed
        if allowed and value not in allowed:
            listed = ", ".join(str(choice) for choice in allowed)
            shown = repr(text) if isinstance(value, str) else value
            raise SettingsError(f"{self.name} must be one of {listed}; got {shown}")
        if self.minimum is not None and value < self.minimum:
            raise SettingsError(f"{self.name} must be at least {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise SettingsError(f"{self.name} must be at most {self.maximum}, got {value}")
        return None if self.zero_is_none and not value else value


def _whole_number(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise ValueError("must be a whole number") from None


def _finite_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _expanded_path(text: str) -> Path:
    return Path(text).expanduser()


def _key_prefix(text: str) -> str:
    """A key prefix ends with `/` (or is empty), and never starts with one."""
    cleaned = text.strip("/")
    return f"{cleaned}/" if cleaned else ""


def text(name: str, *, kind: Callable[[str], object] = str) -> dict[str, Variable]:
    """A string (or what `kind` makes of it); unset or blank keeps the default."""
    return {VARIABLE: Variable(name, kind)}


def _names(text: str) -> tuple[str, ...]:
    """`a, b,c` -> ('a', 'b', 'c'): an ordered list of names, none blank or twice."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise ValueError("must be names separated by commas, none of them blank")
    if len(set(names)) < len(names):
        raise ValueError("must not name an entry twice")
    return names


_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")


def _host_patterns(text: str) -> tuple[str, ...]:
    """`api.example.com, *.example.com, *` -> lower-cased hosts, `*.` suffixes, or `*`; an
    IPv6 address may be bracketed (`webhooks.destinations` says what each one allows)."""
    patterns = []
    for name in _names(text.lower()):
        wildcard = "*." if name.startswith("*.") else ""
        host = name.removeprefix(wildcard).removeprefix("[").removesuffix("]").removesuffix(".")
        try:
            host = str(ipaddress.ip_address(host))  # one spelling of each address
            named = not wildcard
        except ValueError:
            named = name == "*" or (len(host) <= 253 and bool(_HOSTNAME.fullmatch(host)))
        if not named:
            raise ValueError(
                "must be hosts (punycode for other scripts), *.domain patterns or *, "
                "separated by commas"
            )
        patterns.append(name if name == "*" else wildcard + host)
    return tuple(patterns)


def _is_whsec(secret: str) -> bool:
    """Standard Webhooks' form of a signing secret: `whsec_` and the base64 of 24 to 64
    random bytes."""
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        return False
    return secret.startswith("whsec_") and 24 <= len(key) <= 64


def choice(name: str, allowed: tuple[str, ...], *, auto: bool = False) -> dict[str, Variable]:
    """One of `allowed`, in any case."""
    return {VARIABLE: Variable(name, str.lower, allowed=allowed, auto=auto)}


def integer(
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allowed: tuple[int, ...] = (),
    zero_is_none: bool = False,
) -> dict[str, Variable]:
    """A whole number (`_` may group digits)."""
    variable = Variable(name, _whole_number, minimum, maximum, allowed, zero_is_none=zero_is_none)
    return {VARIABLE: variable}


def number(
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    zero_is_none: bool = False,
) -> dict[str, Variable]:
    """A finite number."""
    return {VARIABLE: Variable(name, _finite_number, minimum, maximum, zero_is_none=zero_is_none)}


def path(name: str) -> dict[str, Variable]:
    """A path, `~` expanded."""
    return {VARIABLE: Variable(name, _expanded_path)}


def _read(declared: type[Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The fields of `declared` whose variables are set (or `auto`), by field name."""
    values: dict[str, Any] = {}
    for declared_field in fields(declared):
        variable: Variable | None = declared_field.metadata.get(VARIABLE)
        value = _UNSET if variable is None else variable.read(env)
        if value is not _UNSET:
            values[declared_field.name] = value
    return values


def _system_temp_dir() -> Path:
    return Path(tempfile.gettempdir())


# --- the settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Each field's metadata names its variable (a `Variable`), which `from_env` reads.

    `debug_bucket` falls back on `_Fallbacks`, and `auth` is built from `_AuthVariables`.
    """

    host: str = field(default="127.0.0.1", metadata=text("HOST"))
    port: int = field(default=8080, metadata=integer("PORT", minimum=0, maximum=65535))
    log_level: str = field(default="info", metadata=choice("VRAI_LOG_LEVEL", _LOG_LEVELS))
    drain_seconds: float = field(default=25.0, metadata=number("VRAI_DRAIN_SECONDS", minimum=0))

    # Request limits
    max_window_seconds: float = field(
        # /v1 only: segments keep memory flat in the window's length (the legacy API: 300 s)
        default=3 * 3600.0,
        metadata=number("VRAI_MAX_WINDOW_SECONDS", minimum=1),
    )
    max_body_bytes: int = field(
        default=1024 * MiB, metadata=integer("VRAI_MAX_BODY_BYTES", minimum=1)
    )
    idle_timeout_seconds: float = field(
        default=30.0, metadata=number("VRAI_IDLE_TIMEOUT_SECONDS", minimum=0.1)
    )

    # Admission
    memory_limit_bytes: int | None = field(
        default=None, metadata=integer("VRAI_MEMORY_LIMIT_BYTES", minimum=64 * MiB)
    )
    max_jobs: int | None = field(default=None, metadata=integer("VRAI_MAX_JOBS", minimum=1))
    max_queue: int | None = field(default=None, metadata=integer("VRAI_MAX_QUEUE", minimum=0))
    queue_timeout_seconds: float = field(
        default=30.0, metadata=number("VRAI_QUEUE_TIMEOUT_SECONDS", minimum=0)
    )
    retry_after_seconds: int = field(
        default=5, metadata=integer("VRAI_RETRY_AFTER_SECONDS", minimum=1)
    )

    # Resumable uploads and retries
    resume_grace_seconds: float = field(
        default=60.0, metadata=number("VRAI_RESUME_GRACE_SECONDS", minimum=0, maximum=3600)
    )
    resume_max_waiting: int = field(
        default=8, metadata=integer("VRAI_RESUME_MAX_WAITING", minimum=0)
    )
    idempotency_ttl_seconds: float = field(
        default=86400.0, metadata=number("VRAI_IDEMPOTENCY_TTL_SECONDS", minimum=0)
    )
    result_ttl_seconds: float = field(
        default=3600.0, metadata=number("VRAI_RESULT_TTL_SECONDS", minimum=0)
    )

    # State shared by every machine: idempotency claims and answers by id
    state_bucket: str | None = field(default=None, metadata=text("VRAI_STATE_BUCKET"))
    state_lease_seconds: float = field(
        default=30.0, metadata=number("VRAI_STATE_LEASE_SECONDS", minimum=1, maximum=3600)
    )
    state_timeout_seconds: float = field(
        default=5.0, metadata=number("VRAI_STATE_TIMEOUT_SECONDS", minimum=0.1)
    )

    # ffmpeg and spools
    ffmpeg: str | None = field(default=None, metadata=text("VRAI_FFMPEG"))
    mp3_bitrate_kbps: int = field(
        default=48, metadata=integer("VRAI_MP3_BITRATE_KBPS", allowed=_MP3_BITRATES_KBPS)
    )
    ffmpeg_timeout_seconds: float = field(
        default=120.0, metadata=number("VRAI_FFMPEG_TIMEOUT_SECONDS", minimum=1)
    )
    ffmpeg_memory_bytes: int | None = field(
        default=64 * MiB, metadata=integer("VRAI_FFMPEG_MEMORY_BYTES", minimum=0, zero_is_none=True)
    )
    spool_memory_bytes: int = field(
        default=2 * MiB, metadata=integer("VRAI_SPOOL_MEMORY_BYTES", minimum=0)
    )
    spool_memory_total_bytes: int | None = field(
        default=None, metadata=integer("VRAI_SPOOL_MEMORY_TOTAL_BYTES", minimum=0)
    )
    spool_disk_total_bytes: int | None = field(
        default=None, metadata=integer("VRAI_SPOOL_DISK_TOTAL_BYTES", minimum=0, zero_is_none=True)
    )
    tmp_dir: Path = field(default_factory=_system_temp_dir, metadata=path("VRAI_TMP_DIR"))

    # Transcription
    transcriber: TranscriberKind = field(
        default="local", metadata=choice("VRAI_TRANSCRIBER", _TRANSCRIBERS, auto=True)
    )
    openai_api_key: Secret | None = field(
        default=None, metadata=text("OPENAI_API_KEY", kind=Secret)
    )
    openai_base_url: str | None = field(default=None, metadata=text("OPENAI_BASE_URL"))
    openai_models: tuple[str, ...] = field(
        # In order: when the upstream says one is retired, the next is used from then on.
        default=("gpt-transcribe", "whisper-1"),
        metadata=text("VRAI_OPENAI_MODEL", kind=_names),
    )
    openai_timeout_seconds: float = field(
        default=60.0, metadata=number("VRAI_OPENAI_TIMEOUT_SECONDS", minimum=0.1)
    )
    openai_max_retries: int = field(
        default=2, metadata=integer("VRAI_OPENAI_MAX_RETRIES", minimum=0, maximum=10)
    )
    openai_deadline_seconds: float = field(
        default=150.0, metadata=number("VRAI_OPENAI_DEADLINE_SECONDS", minimum=0.1)
    )
    summary_model: str = field(default="gpt-4o-mini", metadata=text("VRAI_SUMMARY_MODEL"))
    prompts_dir: Path | None = field(default=None, metadata=path("VRAI_PROMPTS_DIR"))
    whisper_model: str | None = field(default=None, metadata=text("VRAI_WHISPER_MODEL"))
    whisper_concurrency: int = field(
        default=1, metadata=integer("VRAI_WHISPER_CONCURRENCY", minimum=1)
    )
    whisper_cpu_threads: int = field(
        default=0, metadata=integer("VRAI_WHISPER_CPU_THREADS", minimum=0)
    )
    whisper_beam_size: int = field(
        default=1, metadata=integer("VRAI_WHISPER_BEAM_SIZE", minimum=1, maximum=10)
    )
    whisper_batch_size: int = field(
        default=8, metadata=integer("VRAI_WHISPER_BATCH_SIZE", minimum=1, maximum=32)
    )

    # Segmented transcription: cut at pauses as the audio streams, transcribe as cut
    transcribe_mode: TranscribeMode = field(
        default="segments", metadata=choice("VRAI_TRANSCRIBE_MODE", _TRANSCRIBE_MODES)
    )
    segment_min_seconds: float = field(
        default=8.0, metadata=number("VRAI_SEGMENT_MIN_SECONDS", minimum=1, maximum=60)
    )
    segment_max_seconds: float = field(
        default=28.0, metadata=number("VRAI_SEGMENT_MAX_SECONDS", minimum=2, maximum=600)
    )
    openai_segment_concurrency: int = field(
        default=16, metadata=integer("VRAI_OPENAI_SEGMENT_CONCURRENCY", minimum=1, maximum=64)
    )
    openai_concurrency: int = field(
        default=32, metadata=integer("VRAI_OPENAI_CONCURRENCY", minimum=1)
    )
    openai_concurrency_mode: ConcurrencyMode = field(
        # adaptive: the two limits above are ceilings, the upstream's pace finds the rest
        default="adaptive",
        metadata=choice("VRAI_OPENAI_CONCURRENCY_MODE", _CONCURRENCY_MODES),
    )

    # Index-last layouts (CAF pakt last, MP4 moov last): streamed as they arrive, exactly
    # where nothing is missing, on a guess checked by the index, or spooled and decoded last
    index_last: IndexLastKind = field(
        default="speculate", metadata=choice("VRAI_INDEX_LAST", _INDEX_LAST)
    )

    # Debug copies
    debug_store: DebugStoreKind = field(
        default="off", metadata=choice("VRAI_DEBUG_STORE", _DEBUG_STORES, auto=True)
    )
    debug_bucket: str | None = field(default=None, metadata=text("VRAI_DEBUG_BUCKET"))
    debug_prefix: str = field(default="", metadata=text("VRAI_DEBUG_PREFIX", kind=_key_prefix))
    debug_dir: Path = field(default=Path("debug-copies"), metadata=path("VRAI_DEBUG_DIR"))
    debug_dir_max_bytes: int | None = field(
        default=256 * MiB,
        metadata=integer("VRAI_DEBUG_DIR_MAX_BYTES", minimum=0, zero_is_none=True),
    )
    debug_dir_max_age_seconds: float | None = field(
        default=86400.0,
        metadata=number("VRAI_DEBUG_DIR_MAX_AGE_SECONDS", minimum=0, zero_is_none=True),
    )
    debug_sample_rate: float = field(
        default=1.0, metadata=number("VRAI_DEBUG_SAMPLE_RATE", minimum=0, maximum=1)
    )
    debug_part_bytes: int = field(
        default=5 * MiB, metadata=integer("VRAI_DEBUG_PART_BYTES", minimum=5 * MiB)
    )
    debug_buffer_bytes: int = field(default=12 * MiB, metadata=integer("VRAI_DEBUG_BUFFER_BYTES"))
    debug_hold_bytes: int = field(
        default=512 * MiB, metadata=integer("VRAI_DEBUG_HOLD_BYTES", minimum=0)
    )
    debug_url_expiry_seconds: int = field(
        default=86400,
        metadata=integer("VRAI_DEBUG_URL_EXPIRY_SECONDS", minimum=1, maximum=7 * 24 * 3600),
    )
    debug_settle_timeout_seconds: float = field(
        default=5.0, metadata=number("VRAI_DEBUG_SETTLE_TIMEOUT_SECONDS", minimum=0)
    )
    debug_s3_timeout_seconds: float = field(
        default=10.0, metadata=number("VRAI_DEBUG_S3_TIMEOUT_SECONDS", minimum=0.1)
    )

    # Webhooks: a request's answer POSTed to its `callbackUrl`
    webhook_secret: Secret | None = field(
        default=None, metadata=text("VRAI_WEBHOOK_SECRET", kind=Secret)
    )
    webhook_allowed_hosts: tuple[str, ...] = field(
        default=(), metadata=text("VRAI_WEBHOOK_ALLOWED_HOSTS", kind=_host_patterns)
    )
    webhook_max_attempts: int = field(
        default=6, metadata=integer("VRAI_WEBHOOK_MAX_ATTEMPTS", minimum=1, maximum=20)
    )
    webhook_timeout_seconds: float = field(
        default=15.0, metadata=number("VRAI_WEBHOOK_TIMEOUT_SECONDS", minimum=0.1, maximum=120)
    )
    webhook_backoff_seconds: float = field(
        default=1.0, metadata=number("VRAI_WEBHOOK_BACKOFF_SECONDS", minimum=0, maximum=300)
    )

    # Authentication: built from `_AuthVariables`
    auth: AuthConfig = field(default_factory=AuthConfig)

    @property
    def max_encoded_body_bytes(self) -> int:
        """A body carrying the audio as base64 or in a form: 4/3 of it, plus room for fields."""
        return self.max_body_bytes * 4 // 3 + MiB

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `env` (default: the process environment)."""
        env = os.environ if env is None else env
        values = _read(cls, env)
        for name, value in _read(_Fallbacks, env).items():
            values.setdefault(name, value)

        api_key = values.get("openai_api_key")
        if values["transcriber"] == "auto":
            values["transcriber"] = "openai" if api_key else "local"
        if values["transcriber"] == "openai" and not api_key:
            raise SettingsError("VRAI_TRANSCRIBER=openai needs OPENAI_API_KEY to be set")

        bucket = values.get("debug_bucket")
        if values["debug_store"] == "auto":
            # Users' recordings stay on the machine only when asked for (`dir`).
            values["debug_store"] = "s3" if bucket else "off"
        if values["debug_store"] == "s3" and not bucket:
            raise SettingsError("VRAI_DEBUG_STORE=s3 needs VRAI_DEBUG_BUCKET (or BUCKET_NAME)")

        try:
            values["auth"] = AuthConfig.parse(**vars(_AuthVariables(**_read(_AuthVariables, env))))
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

        shortest = values.get("segment_min_seconds", cls.segment_min_seconds)
        longest = values.get("segment_max_seconds", cls.segment_max_seconds)
        if shortest >= longest:
            raise SettingsError(
                f"VRAI_SEGMENT_MIN_SECONDS ({shortest:g}) must be less than "
                f"VRAI_SEGMENT_MAX_SECONDS ({longest:g})"
            )

        # Only a buffer that is set is checked against the part size (as it always was).
        part_bytes = values.get("debug_part_bytes", cls.debug_part_bytes)
        buffer_bytes = values.get("debug_buffer_bytes")
        if buffer_bytes is not None and buffer_bytes < part_bytes:
            raise SettingsError(
                f"VRAI_DEBUG_BUFFER_BYTES must be at least {part_bytes}, got {buffer_bytes}"
            )

        secret = values.get("webhook_secret")
        if secret is not None and not _is_whsec(secret):
            raise SettingsError(  # the value itself is never shown
                "VRAI_WEBHOOK_SECRET must be whsec_ followed by the base64 of 24 to 64 random "
                "bytes (Standard Webhooks' form)"
            )
        return cls(**values)


@dataclass(frozen=True)
class _Fallbacks:
    """Variables read for a `Settings` field (of the same name) when its own is unset."""

    debug_bucket: str | None = field(default=None, metadata=text("BUCKET_NAME"))


@dataclass(frozen=True)
class _AuthVariables:
    """The arguments of `AuthConfig.parse`, each from its variable; it checks them as a whole."""

    kind: AuthKind = field(default="off", metadata=choice("VRAI_AUTH", _AUTH_KINDS))
    tokens: str | None = field(default=None, metadata=text("VRAI_AUTH_TOKENS"))
    firebase_project_id: str | None = field(default=None, metadata=text("VRAI_FIREBASE_PROJECT_ID"))
    jwks_url: str | None = field(default=None, metadata=text("VRAI_JWKS_URL"))
    issuer: str | None = field(default=None, metadata=text("VRAI_JWT_ISSUER"))
    audience: str | None = field(default=None, metadata=text("VRAI_JWT_AUDIENCE"))
    algorithms: str | None = field(default=None, metadata=text("VRAI_JWT_ALGORITHMS"))
    user_claim: str | None = field(default=None, metadata=text("VRAI_JWT_USER_CLAIM"))
    leeway_seconds: float = field(
        default=AuthConfig.leeway_seconds,
        metadata=number("VRAI_AUTH_LEEWAY_SECONDS", minimum=0, maximum=300),
    )
    jwks_timeout_seconds: float = field(
        default=AuthConfig.jwks_timeout_seconds,
        metadata=number("VRAI_JWKS_TIMEOUT_SECONDS", minimum=0.1),
    )
    jwks_cache_min_seconds: float = field(
        default=AuthConfig.jwks_cache_min_seconds,
        metadata=number("VRAI_JWKS_CACHE_MIN_SECONDS", minimum=0),
    )
    jwks_cache_max_seconds: float = field(
        default=AuthConfig.jwks_cache_max_seconds,
        metadata=number("VRAI_JWKS_CACHE_MAX_SECONDS", minimum=0),
    )
    jwks_refresh_interval_seconds: float = field(
        default=AuthConfig.jwks_refresh_interval_seconds,
        metadata=number("VRAI_JWKS_REFRESH_INTERVAL_SECONDS", minimum=0),
    )
