"""Every knob of the service, read once from the environment and validated.

A bad value stops start-up with a message naming the variable, instead of failing
later on some request.  Every variable read here is listed in the README.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, cast

from .auth import AuthConfig

TranscriberKind = Literal["openai", "local"]
DebugStoreKind = Literal["s3", "dir", "off"]

_Choice = TypeVar("_Choice", bound=str)
_Number = TypeVar("_Number", int, float)

MiB = 1024 * 1024


class SettingsError(ValueError):
    """A variable holds a value the service cannot run with."""


class Secret(str):
    """A string that never shows its value in a repr, a log line or a traceback."""

    def __repr__(self) -> str:
        return "Secret('***')"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "info"
    drain_seconds: float = 25.0

    # Request limits
    max_window_seconds: float = 300.0
    max_body_bytes: int = 1024 * MiB
    idle_timeout_seconds: float = 30.0

    # Admission
    memory_limit_bytes: int | None = None
    max_jobs: int | None = None
    max_queue: int | None = None
    queue_timeout_seconds: float = 30.0
    retry_after_seconds: int = 5

    # ffmpeg and spools
    ffmpeg: str | None = None
    mp3_bitrate_kbps: int = 48
    ffmpeg_timeout_seconds: float = 120.0
    ffmpeg_memory_bytes: int | None = 64 * MiB
    spool_memory_bytes: int = 2 * MiB
    spool_memory_total_bytes: int | None = None
    spool_disk_total_bytes: int | None = None
    tmp_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    # Transcription
    transcriber: TranscriberKind = "local"
    openai_api_key: Secret | None = None
    openai_base_url: str | None = None
    openai_model: str = "whisper-1"
    openai_timeout_seconds: float = 60.0
    openai_max_retries: int = 2
    openai_deadline_seconds: float = 150.0
    summary_model: str = "gpt-4o-mini"
    prompts_dir: Path | None = None
    whisper_model: str | None = None
    whisper_concurrency: int = 1
    whisper_cpu_threads: int = 0
    whisper_beam_size: int = 1

    # Debug copies
    debug_store: DebugStoreKind = "off"
    debug_bucket: str | None = None
    debug_prefix: str = ""
    debug_dir: Path = Path("debug-copies")
    debug_dir_max_bytes: int | None = 256 * MiB
    debug_dir_max_age_seconds: float | None = 86400.0
    debug_sample_rate: float = 1.0
    debug_part_bytes: int = 5 * MiB
    debug_buffer_bytes: int = 12 * MiB
    debug_hold_bytes: int = 512 * MiB
    debug_url_expiry_seconds: int = 86400
    debug_settle_timeout_seconds: float = 5.0
    debug_s3_timeout_seconds: float = 10.0

    # Authentication
    auth: AuthConfig = field(default_factory=AuthConfig)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `env` (default: the process environment)."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        api_key = reader.text("OPENAI_API_KEY")
        transcriber = reader.choice("VRAI_TRANSCRIBER", ("auto", "openai", "local"), "auto")
        if transcriber == "auto":
            transcriber = "openai" if api_key else "local"
        if transcriber == "openai" and not api_key:
            raise SettingsError("VRAI_TRANSCRIBER=openai needs OPENAI_API_KEY to be set")
        bucket = reader.text("VRAI_DEBUG_BUCKET") or reader.text("BUCKET_NAME")
        debug_store = reader.choice("VRAI_DEBUG_STORE", ("auto", "s3", "dir", "off"), "auto")
        if debug_store == "auto":
            # Users' recordings stay on the machine only when asked for (`dir`).
            debug_store = "s3" if bucket else "off"
        if debug_store == "s3" and not bucket:
            raise SettingsError("VRAI_DEBUG_STORE=s3 needs VRAI_DEBUG_BUCKET (or BUCKET_NAME)")
        try:
            auth = AuthConfig.parse(
                reader.choice("VRAI_AUTH", ("off", "token", "firebase", "jwt"), "off"),
                tokens=reader.text("VRAI_AUTH_TOKENS"),
                firebase_project_id=reader.text("VRAI_FIREBASE_PROJECT_ID"),
                jwks_url=reader.text("VRAI_JWKS_URL"),
                issuer=reader.text("VRAI_JWT_ISSUER"),
                audience=reader.text("VRAI_JWT_AUDIENCE"),
                algorithms=reader.text("VRAI_JWT_ALGORITHMS"),
                user_claim=reader.text("VRAI_JWT_USER_CLAIM"),
                leeway_seconds=reader.number(
                    "VRAI_AUTH_LEEWAY_SECONDS", AuthConfig.leeway_seconds, minimum=0, maximum=300
                ),
                jwks_timeout_seconds=reader.number(
                    "VRAI_JWKS_TIMEOUT_SECONDS", AuthConfig.jwks_timeout_seconds, minimum=0.1
                ),
                jwks_cache_min_seconds=reader.number(
                    "VRAI_JWKS_CACHE_MIN_SECONDS", AuthConfig.jwks_cache_min_seconds, minimum=0
                ),
                jwks_cache_max_seconds=reader.number(
                    "VRAI_JWKS_CACHE_MAX_SECONDS", AuthConfig.jwks_cache_max_seconds, minimum=0
                ),
                jwks_refresh_interval_seconds=reader.number(
                    "VRAI_JWKS_REFRESH_INTERVAL_SECONDS",
                    AuthConfig.jwks_refresh_interval_seconds,
                    minimum=0,
                ),
            )
        except ValueError as exc:  # SettingsError included: same message either way
            raise SettingsError(str(exc)) from None
        part_bytes = reader.integer("VRAI_DEBUG_PART_BYTES", cls.debug_part_bytes, minimum=5 * MiB)
        buffer_bytes = reader.integer(
            "VRAI_DEBUG_BUFFER_BYTES", cls.debug_buffer_bytes, minimum=part_bytes
        )
        return cls(
            host=reader.text("HOST") or cls.host,
            port=reader.integer("PORT", cls.port, minimum=0, maximum=65535),
            log_level=reader.choice(
                "VRAI_LOG_LEVEL", ("debug", "info", "warning", "error"), cls.log_level
            ),
            drain_seconds=reader.number("VRAI_DRAIN_SECONDS", cls.drain_seconds, minimum=0),
            max_window_seconds=reader.number(
                "VRAI_MAX_WINDOW_SECONDS", cls.max_window_seconds, minimum=1
            ),
            max_body_bytes=reader.integer("VRAI_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
            idle_timeout_seconds=reader.number(
                "VRAI_IDLE_TIMEOUT_SECONDS", cls.idle_timeout_seconds, minimum=0.1
            ),
            memory_limit_bytes=reader.optional_integer("VRAI_MEMORY_LIMIT_BYTES", minimum=64 * MiB),
            max_jobs=reader.optional_integer("VRAI_MAX_JOBS", minimum=1),
            max_queue=reader.optional_integer("VRAI_MAX_QUEUE", minimum=0),
            queue_timeout_seconds=reader.number(
                "VRAI_QUEUE_TIMEOUT_SECONDS", cls.queue_timeout_seconds, minimum=0
            ),
            retry_after_seconds=reader.integer(
                "VRAI_RETRY_AFTER_SECONDS", cls.retry_after_seconds, minimum=1
            ),
            ffmpeg=reader.text("VRAI_FFMPEG"),
            mp3_bitrate_kbps=reader.choice_int(
                "VRAI_MP3_BITRATE_KBPS",
                (8, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 144, 160),
                cls.mp3_bitrate_kbps,
            ),
            ffmpeg_timeout_seconds=reader.number(
                "VRAI_FFMPEG_TIMEOUT_SECONDS", cls.ffmpeg_timeout_seconds, minimum=1
            ),
            ffmpeg_memory_bytes=reader.integer("VRAI_FFMPEG_MEMORY_BYTES", 64 * MiB, minimum=0)
            or None,
            spool_memory_bytes=reader.integer(
                "VRAI_SPOOL_MEMORY_BYTES", cls.spool_memory_bytes, minimum=0
            ),
            spool_memory_total_bytes=reader.optional_integer(
                "VRAI_SPOOL_MEMORY_TOTAL_BYTES", minimum=0
            ),
            spool_disk_total_bytes=reader.integer("VRAI_SPOOL_DISK_TOTAL_BYTES", 0, minimum=0)
            or None,
            tmp_dir=reader.path("VRAI_TMP_DIR") or Path(tempfile.gettempdir()),
            transcriber=cast(TranscriberKind, transcriber),
            openai_api_key=Secret(api_key) if api_key else None,
            openai_base_url=reader.text("OPENAI_BASE_URL"),
            openai_model=reader.text("VRAI_OPENAI_MODEL") or cls.openai_model,
            openai_timeout_seconds=reader.number(
                "VRAI_OPENAI_TIMEOUT_SECONDS", cls.openai_timeout_seconds, minimum=0.1
            ),
            openai_max_retries=reader.integer(
                "VRAI_OPENAI_MAX_RETRIES", cls.openai_max_retries, minimum=0, maximum=10
            ),
            openai_deadline_seconds=reader.number(
                "VRAI_OPENAI_DEADLINE_SECONDS", cls.openai_deadline_seconds, minimum=0.1
            ),
            summary_model=reader.text("VRAI_SUMMARY_MODEL") or cls.summary_model,
            prompts_dir=reader.path("VRAI_PROMPTS_DIR"),
            whisper_model=reader.text("VRAI_WHISPER_MODEL"),
            whisper_concurrency=reader.integer(
                "VRAI_WHISPER_CONCURRENCY", cls.whisper_concurrency, minimum=1
            ),
            whisper_cpu_threads=reader.integer(
                "VRAI_WHISPER_CPU_THREADS", cls.whisper_cpu_threads, minimum=0
            ),
            whisper_beam_size=reader.integer(
                "VRAI_WHISPER_BEAM_SIZE", cls.whisper_beam_size, minimum=1, maximum=10
            ),
            debug_store=cast(DebugStoreKind, debug_store),
            debug_bucket=bucket,
            debug_prefix=_prefix(reader.text("VRAI_DEBUG_PREFIX")),
            debug_dir=reader.path("VRAI_DEBUG_DIR") or cls.debug_dir,
            debug_dir_max_bytes=reader.integer("VRAI_DEBUG_DIR_MAX_BYTES", 256 * MiB, minimum=0)
            or None,
            debug_dir_max_age_seconds=reader.number(
                "VRAI_DEBUG_DIR_MAX_AGE_SECONDS", 86400.0, minimum=0
            )
            or None,
            debug_sample_rate=reader.number(
                "VRAI_DEBUG_SAMPLE_RATE", cls.debug_sample_rate, minimum=0, maximum=1
            ),
            debug_part_bytes=part_bytes,
            debug_buffer_bytes=buffer_bytes,
            debug_hold_bytes=reader.integer(
                "VRAI_DEBUG_HOLD_BYTES", cls.debug_hold_bytes, minimum=0
            ),
            debug_url_expiry_seconds=reader.integer(
                "VRAI_DEBUG_URL_EXPIRY_SECONDS",
                cls.debug_url_expiry_seconds,
                minimum=1,
                maximum=7 * 24 * 3600,
            ),
            debug_settle_timeout_seconds=reader.number(
                "VRAI_DEBUG_SETTLE_TIMEOUT_SECONDS", cls.debug_settle_timeout_seconds, minimum=0
            ),
            debug_s3_timeout_seconds=reader.number(
                "VRAI_DEBUG_S3_TIMEOUT_SECONDS", cls.debug_s3_timeout_seconds, minimum=0.1
            ),
            auth=auth,
        )


def _prefix(raw: str | None) -> str:
    """A key prefix ends with `/` (or is empty), and never starts with one."""
    if not raw:
        return ""
    cleaned = raw.strip("/")
    return f"{cleaned}/" if cleaned else ""


class _Reader:
    """Parses one variable at a time, naming it in every error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
        return self._bounded(name, value, minimum, maximum)

    def optional_integer(self, name: str, *, minimum: int | None = None) -> int | None:
        """A whole number, or None when unset: the service derives the value itself."""
        if self.text(name) is None:
            return None
        return self.integer(name, 0, minimum=minimum)

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise SettingsError(f"{name} must be a finite number, got {raw!r}")
        return self._bounded(name, value, minimum, maximum)

    def choice(self, name: str, choices: tuple[_Choice, ...], default: _Choice) -> _Choice:
        raw = self.text(name)
        if raw is None:
            return default
        for choice in choices:
            if raw.lower() == choice:
                return choice
        raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")

    def choice_int(self, name: str, choices: tuple[int, ...], default: int) -> int:
        value = self.integer(name, default)
        if value not in choices:
            allowed = ", ".join(str(choice) for choice in choices)
            raise SettingsError(f"{name} must be one of {allowed}; got {value}")
        return value

    def path(self, name: str) -> Path | None:
        raw = self.text(name)
        return Path(raw).expanduser() if raw else None

    @staticmethod
    def _bounded(
        name: str, value: _Number, minimum: _Number | None, maximum: _Number | None
    ) -> _Number:
        if minimum is not None and value < minimum:
            raise SettingsError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise SettingsError(f"{name} must be at most {maximum}, got {value}")
        return value
