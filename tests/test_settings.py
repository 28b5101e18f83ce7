"""Settings: read once from the environment, validated, and a bad value named at start-up.

`Settings.from_env` is checked directly; the same rules are then checked where a user meets
them: `vrai-stream serve` refusing to start, the transcriber `auto` picks as `/health`
reports it, and a temp folder that cannot be written falling back to the system's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from vrai_stream.settings import MPEG2_L3_KBPS, VARIABLE, Settings, SettingsError, Variable

from .support.audio import decoded_seconds
from .support.client import posting
from .support.server import Server, free_port
from .test_cleanup import wait_for_spool_file
from .test_errors import ENDPOINT, gated

MiB = 1024 * 1024


# --- from_env ------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings.from_env({})
    assert settings.max_window_seconds == 3 * 3600
    assert settings.max_body_bytes == 1024 * MiB
    assert settings.idle_timeout_seconds == 30
    assert settings.max_jobs is None  # derived from the machine's memory
    assert settings.max_queue is None
    assert settings.retry_after_seconds == 5
    assert settings.mp3_bitrate_kbps == 48
    assert settings.spool_memory_bytes == 2 * MiB
    assert settings.spool_memory_total_bytes is None
    assert settings.spool_disk_total_bytes is None
    assert settings.transcriber == "local"
    assert settings.debug_store == "off"  # auto, and no bucket: nothing stays on the machine
    assert settings.debug_dir_max_bytes == 256 * MiB
    assert settings.debug_dir_max_age_seconds == 86400
    assert settings.openai_models == ("gpt-transcribe", "whisper-1")  # in order of preference


def test_debug_folder_limits_are_read_and_zero_means_none() -> None:
    settings = Settings.from_env(
        {"VRAI_DEBUG_DIR_MAX_BYTES": "1_000_000", "VRAI_DEBUG_DIR_MAX_AGE_SECONDS": "90.5"}
    )
    assert settings.debug_dir_max_bytes == 1_000_000
    assert settings.debug_dir_max_age_seconds == 90.5
    unlimited = Settings.from_env(
        {"VRAI_DEBUG_DIR_MAX_BYTES": "0", "VRAI_DEBUG_DIR_MAX_AGE_SECONDS": "0"}
    )
    assert unlimited.debug_dir_max_bytes is None
    assert unlimited.debug_dir_max_age_seconds is None


def test_values_are_read_and_typed() -> None:
    settings = Settings.from_env(
        {
            "HOST": "0.0.0.0",
            "PORT": "9000",
            "VRAI_MAX_WINDOW_SECONDS": "120.5",
            "VRAI_MAX_BODY_BYTES": "1_000_000",
            "VRAI_IDLE_TIMEOUT_SECONDS": " 2.5 ",
            "VRAI_MAX_JOBS": "2",
            "VRAI_MAX_QUEUE": "0",
            "VRAI_MP3_BITRATE_KBPS": "48",
            "VRAI_SPOOL_MEMORY_BYTES": "0",
            "VRAI_SPOOL_DISK_TOTAL_BYTES": "4096",
            "VRAI_TMP_DIR": "/srv/spool",
            "VRAI_TRANSCRIBER": "LOCAL",
            "VRAI_LOG_LEVEL": "warning",
            "VRAI_OPENAI_MODEL": " gpt-transcribe-2 ,whisper-1",
        }
    )
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.max_window_seconds == 120.5
    assert settings.max_body_bytes == 1_000_000
    assert settings.idle_timeout_seconds == 2.5
    assert (settings.max_jobs, settings.max_queue) == (2, 0)
    assert settings.mp3_bitrate_kbps == 48
    assert settings.spool_memory_bytes == 0
    assert settings.spool_disk_total_bytes == 4096
    assert settings.tmp_dir == Path("/srv/spool")
    assert settings.transcriber == "local"
    assert settings.log_level == "warning"
    assert settings.openai_models == ("gpt-transcribe-2", "whisper-1")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "http"),
        ("PORT", "70000"),
        ("VRAI_LOG_LEVEL", "loud"),
        ("VRAI_MAX_WINDOW_SECONDS", "five minutes"),
        ("VRAI_MAX_WINDOW_SECONDS", "nan"),
        ("VRAI_MAX_WINDOW_SECONDS", "-5"),
        ("VRAI_MAX_BODY_BYTES", "1GB"),
        ("VRAI_MAX_BODY_BYTES", "0"),
        ("VRAI_IDLE_TIMEOUT_SECONDS", "inf"),
        ("VRAI_IDLE_TIMEOUT_SECONDS", "0"),
        ("VRAI_MAX_JOBS", "zero"),
        ("VRAI_MAX_JOBS", "0"),
        ("VRAI_MAX_QUEUE", "-1"),
        ("VRAI_RETRY_AFTER_SECONDS", "0"),
        ("VRAI_MP3_BITRATE_KBPS", "33"),
        ("VRAI_FFMPEG_TIMEOUT_SECONDS", "0"),
        ("VRAI_SPOOL_MEMORY_BYTES", "-1"),
        ("VRAI_SPOOL_DISK_TOTAL_BYTES", "lots"),
        ("VRAI_TRANSCRIBER", "whisper-cloud"),
        ("VRAI_OPENAI_MAX_RETRIES", "many"),
        ("VRAI_WHISPER_BEAM_SIZE", "11"),
        ("VRAI_DEBUG_DIR_MAX_BYTES", "-1"),
        ("VRAI_DEBUG_DIR_MAX_BYTES", "1GB"),
        ("VRAI_DEBUG_DIR_MAX_AGE_SECONDS", "a week"),
        ("VRAI_DEBUG_DIR_MAX_AGE_SECONDS", "-5"),
    ],
)
def test_bad_value_raises_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({name: value})
    assert name in str(raised.value)


def test_openai_without_a_key_names_the_missing_variable() -> None:
    with pytest.raises(SettingsError, match="OPENAI_API_KEY"):
        Settings.from_env({"VRAI_TRANSCRIBER": "openai"})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"VRAI_TRANSCRIBER": "auto", "OPENAI_API_KEY": "sk-test"}, "openai"),
        ({"VRAI_TRANSCRIBER": "auto"}, "local"),
        ({"VRAI_TRANSCRIBER": "auto", "OPENAI_API_KEY": "  "}, "local"),
        ({"OPENAI_API_KEY": "sk-test"}, "openai"),  # auto is the default
        ({}, "local"),
        ({"VRAI_TRANSCRIBER": "local", "OPENAI_API_KEY": "sk-test"}, "local"),
    ],
)
def test_auto_picks_openai_only_with_a_key(env: dict[str, str], expected: str) -> None:
    assert Settings.from_env(env).transcriber == expected


def test_the_api_key_never_shows_in_a_repr() -> None:
    settings = Settings.from_env({"OPENAI_API_KEY": "sk-very-secret-123"})
    assert "sk-very-secret-123" not in repr(settings)
    assert "sk-very-secret-123" not in str(settings)


def test_56_kbps_is_accepted() -> None:
    """A valid MPEG-2 layer III rate, once missing from a list kept apart from the table."""
    assert Settings.from_env({"VRAI_MP3_BITRATE_KBPS": "56"}).mp3_bitrate_kbps == 56


@pytest.mark.parametrize("rate", [rate for rate in MPEG2_L3_KBPS if rate])
def test_every_mpeg2_layer3_rate_is_accepted(rate: int) -> None:
    assert Settings.from_env({"VRAI_MP3_BITRATE_KBPS": str(rate)}).mp3_bitrate_kbps == rate


@pytest.mark.parametrize("value", ["0", "7", "33", "57", "192", "320", "-48"])
def test_a_bitrate_outside_the_table_is_refused(value: str) -> None:
    """0 is the table's `free` slot; 192 and 320 are MPEG-1 rates, which 16 kHz cannot use."""
    rates = ", ".join(str(rate) for rate in MPEG2_L3_KBPS if rate)
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"VRAI_MP3_BITRATE_KBPS": value})
    assert str(raised.value) == f"VRAI_MP3_BITRATE_KBPS must be one of {rates}; got {int(value)}"


def test_every_field_but_auth_names_one_variable_of_its_own() -> None:
    variables = {
        setting.name: setting.metadata[VARIABLE]
        for setting in fields(Settings)
        if setting.name != "auth"
    }
    assert all(isinstance(variable, Variable) for variable in variables.values())
    names = [variable.name for variable in variables.values()]
    assert len(names) == len(set(names)) == len(fields(Settings)) - 1
    assert variables["max_jobs"].name == "VRAI_MAX_JOBS"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "http"}, "PORT must be a whole number, got 'http'"),
        ({"PORT": "70000"}, "PORT must be at most 65535, got 70000"),
        ({"VRAI_MAX_JOBS": "0"}, "VRAI_MAX_JOBS must be at least 1, got 0"),
        ({"VRAI_MAX_WINDOW_SECONDS": "-5"}, "VRAI_MAX_WINDOW_SECONDS must be at least 1, got -5.0"),
        (
            {"VRAI_IDLE_TIMEOUT_SECONDS": "0"},
            "VRAI_IDLE_TIMEOUT_SECONDS must be at least 0.1, got 0.0",
        ),
        (
            {"VRAI_IDLE_TIMEOUT_SECONDS": "inf"},
            "VRAI_IDLE_TIMEOUT_SECONDS must be a finite number, got 'inf'",
        ),
        ({"VRAI_DRAIN_SECONDS": "soon"}, "VRAI_DRAIN_SECONDS must be a number, got 'soon'"),
        (
            {"VRAI_MEMORY_LIMIT_BYTES": "1024"},
            f"VRAI_MEMORY_LIMIT_BYTES must be at least {64 * MiB}, got 1024",
        ),
        (
            {"VRAI_LOG_LEVEL": "Loud"},
            "VRAI_LOG_LEVEL must be one of debug, info, warning, error; got 'Loud'",
        ),
        (
            {"VRAI_TRANSCRIBER": "whisper-cloud"},
            "VRAI_TRANSCRIBER must be one of auto, openai, local; got 'whisper-cloud'",
        ),
        (
            {"VRAI_DEBUG_STORE": "ftp"},
            "VRAI_DEBUG_STORE must be one of auto, s3, dir, off; got 'ftp'",
        ),
        (
            {"VRAI_DEBUG_STORE": "s3"},
            "VRAI_DEBUG_STORE=s3 needs VRAI_DEBUG_BUCKET (or BUCKET_NAME)",
        ),
        ({"VRAI_AUTH": "basic"}, "VRAI_AUTH must be one of off, token, firebase, jwt; got 'basic'"),
        (
            {"VRAI_OPENAI_MODEL": "gpt-transcribe,,whisper-1"},
            "VRAI_OPENAI_MODEL must be names separated by commas, none of them blank, "
            "got 'gpt-transcribe,,whisper-1'",
        ),
        (
            {"VRAI_OPENAI_MODEL": "whisper-1, whisper-1"},
            "VRAI_OPENAI_MODEL must not name an entry twice, got 'whisper-1, whisper-1'",
        ),
        (
            {"VRAI_AUTH_LEEWAY_SECONDS": "301"},
            "VRAI_AUTH_LEEWAY_SECONDS must be at most 300, got 301.0",
        ),
        ({"VRAI_AUTH": "TOKEN"}, "VRAI_AUTH=token needs VRAI_AUTH_TOKENS (user:sha256:<hex>, ...)"),
        (
            {"VRAI_DEBUG_PART_BYTES": str(8 * MiB), "VRAI_DEBUG_BUFFER_BYTES": str(6 * MiB)},
            f"VRAI_DEBUG_BUFFER_BYTES must be at least {8 * MiB}, got {6 * MiB}",
        ),
        (
            {"VRAI_DEBUG_BUFFER_BYTES": str(4 * MiB)},
            f"VRAI_DEBUG_BUFFER_BYTES must be at least {5 * MiB}, got {4 * MiB}",
        ),
    ],
)
def test_error_messages_are_the_documented_ones(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)
    assert str(raised.value) == message


def test_rules_across_fields() -> None:
    fallback = Settings.from_env({"BUCKET_NAME": "tigris", "VRAI_DEBUG_PREFIX": "//copies/x//"})
    assert (fallback.debug_store, fallback.debug_bucket) == ("s3", "tigris")
    assert fallback.debug_prefix == "copies/x/"
    own = Settings.from_env(
        {"BUCKET_NAME": "tigris", "VRAI_DEBUG_BUCKET": "mine", "VRAI_DEBUG_STORE": "DIR"}
    )
    assert (own.debug_store, own.debug_bucket) == ("dir", "mine")
    assert Settings.from_env({"VRAI_DEBUG_PREFIX": "///"}).debug_prefix == ""
    firebase = Settings.from_env({"VRAI_AUTH": "Firebase", "VRAI_FIREBASE_PROJECT_ID": "proj-1"})
    assert (firebase.auth.kind, firebase.auth.firebase_project_id) == ("firebase", "proj-1")
    tuned = Settings.from_env(
        {"VRAI_DEBUG_PART_BYTES": str(6 * MiB), "VRAI_DEBUG_BUFFER_BYTES": str(6 * MiB)}
    )
    assert (tuned.debug_part_bytes, tuned.debug_buffer_bytes) == (6 * MiB, 6 * MiB)


def test_paths_and_defaults_from_factories() -> None:
    settings = Settings.from_env(
        {"VRAI_DEBUG_DIR": "~/copies", "VRAI_PROMPTS_DIR": " /srv/prompts "}
    )
    assert settings.debug_dir == Path("~/copies").expanduser()
    assert settings.prompts_dir == Path("/srv/prompts")
    assert Settings.from_env({}).tmp_dir == Settings().tmp_dir
    assert Settings() == Settings.from_env({})


# --- where a user meets them ---------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VRAI_", "OPENAI_", "AWS_")) and key not in ("BUCKET_NAME",)
    }
    env.update({"HF_HUB_OFFLINE": "1", "VRAI_TRANSCRIBER": "local", **extra})
    return env


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VRAI_MAX_JOBS", "zero"),
        ("VRAI_MAX_WINDOW_SECONDS", "-1"),
        ("VRAI_TRANSCRIBER", "whisper-cloud"),
        ("VRAI_FFMPEG", "/nonexistent/ffmpeg"),
    ],
)
def test_serve_with_a_bad_value_exits_naming_the_variable(name: str, value: str) -> None:
    script = Path(sys.executable).with_name("vrai-stream")
    assert script.exists(), "the console script `vrai-stream` is not installed"
    finished = subprocess.run(
        [str(script), "serve", "--port", str(free_port())],
        env=_clean_env(**{name: value}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert finished.returncode != 0
    assert name in finished.stderr, finished.stderr
    assert "Traceback" not in finished.stderr, finished.stderr


@pytest.mark.anyio
async def test_server_with_a_key_and_auto_runs_openai(make_server: Any) -> None:
    """The rule above, wired through to a running server (auto without a key: the unit test)."""
    key = "sk-not-a-real-key-42"
    server: Server = make_server(
        VRAI_TRANSCRIBER="auto",
        OPENAI_API_KEY=key,
        # Never called: a port nothing listens on, so no request can leave the machine.
        OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        health = (await client.get("/health")).json()
    assert health["status"] == "ok"
    assert health["transcriber"] == "openai"
    assert key not in server.log_path.read_text()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["missing-folder", "a-file"])
async def test_unwritable_tmp_dir_falls_back_to_the_system_one(
    make_server: Any, media: Path, tmp_path: Path, kind: str
) -> None:
    system_tmp = tmp_path / "system-tmp"  # the server's system temp folder, via TMPDIR
    system_tmp.mkdir()
    if kind == "missing-folder":
        unusable = tmp_path / "no" / "such" / "folder"
    else:
        unusable = tmp_path / "a-file"
        unusable.write_text("a file, not a folder")
    server: Server = make_server(
        VRAI_TMP_DIR=str(unusable), TMPDIR=str(system_tmp), VRAI_SPOOL_MEMORY_BYTES="0"
    )
    warnings = [entry for entry in server.logs() if entry.get("level") == "warning"]
    assert len(warnings) == 1, warnings
    assert str(unusable) in json.dumps(warnings[0]), warnings[0]

    # It still serves, and its spool files go to the system's folder.
    audio = (media / "padded.wav").read_bytes()
    release = anyio.Event()
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=60) as client,
        posting(
            client,
            ENDPOINT,
            content=gated(audio, first=len(audio) * 7 // 10, gate=release),
            headers={"Accept": "audio/mpeg"},
        ) as upload,
    ):
        await wait_for_spool_file(server, system_tmp)
        release.set()
    response = upload.response
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/mpeg"
    assert abs(decoded_seconds(response.content, tmp_path) - 11) < 1.0

    server.wait_idle()
    assert list(system_tmp.iterdir()) == []
    assert server.open_temp_files(system_tmp) == []
    warnings = [entry for entry in server.logs() if entry.get("level") == "warning"]
    assert len(warnings) == 1, "the fallback is announced once, not per request"


@pytest.mark.parametrize(
    "secret",
    [
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",  # base64 without the prefix
        "whsec_" + "c2hvcnQ=",  # 5 bytes: too short a key
        "whsec_not*base64*at*all*not*base64*at*all",
    ],
)
def test_a_webhook_secret_of_another_form_is_refused_without_showing_it(secret: str) -> None:
    with pytest.raises(SettingsError, match="VRAI_WEBHOOK_SECRET must be whsec_") as raised:
        Settings.from_env({"VRAI_WEBHOOK_SECRET": secret})
    assert secret not in str(raised.value)
    assert secret[-12:] not in str(raised.value)


def test_webhook_settings_are_read() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    settings = Settings.from_env(
        {
            "VRAI_WEBHOOK_SECRET": secret,
            "VRAI_WEBHOOK_ALLOWED_HOSTS": "Hooks.Example.com., *.example.org, [FD00::7], *",
            "VRAI_WEBHOOK_MAX_ATTEMPTS": "4",
        }
    )
    assert settings.webhook_secret == secret
    assert secret not in repr(settings)
    assert settings.webhook_allowed_hosts == ("hooks.example.com", "*.example.org", "fd00::7", "*")
    assert settings.webhook_max_attempts == 4
    for hosts in ("*.10.0.0.1", "hooks.example.com/path", "http://a.com", "*.", "a..b"):
        with pytest.raises(SettingsError, match="VRAI_WEBHOOK_ALLOWED_HOSTS must be hosts"):
            Settings.from_env({"VRAI_WEBHOOK_ALLOWED_HOSTS": hosts})
