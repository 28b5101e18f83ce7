"""`vrai-stream transcribe FILE`: the API's JSON on stdout, from a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from .support.audio import SENTENCE_WORDS, has_words
from .support.server import Server, service_env
from .test_errors import ENDPOINT, ERROR_KEYS


def run_cli(
    tmp_path: Path, *args: str, env_overrides: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    spool = tmp_path / "cli-spool"
    spool.mkdir(exist_ok=True)
    finished = subprocess.run(
        [sys.executable, "-m", "vrai_stream.cli", *args],
        env=service_env(spool, env_overrides),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert list(spool.iterdir()) == [], "the command left a temp file behind"
    return finished


def last_json_document(stdout: str) -> Any:
    """The last JSON value printed, whatever else came before it."""
    decoder = json.JSONDecoder()
    found: Any = None
    position = 0
    while (start := stdout.find("{", position)) != -1:
        try:
            found, position = decoder.raw_decode(stdout, start)
        except json.JSONDecodeError:
            position = start + 1
    assert found is not None, f"no JSON on stdout: {stdout!r}"
    return found


def test_transcribe_prints_the_same_json_as_the_api(
    server: Server, media: Path, tmp_path: Path
) -> None:
    audio = media / "padded.wav"
    finished = run_cli(tmp_path, "transcribe", str(audio), "--from-time", "3.8", "--to-time", "7.5")
    assert finished.returncode == 0, finished.stderr
    printed = last_json_document(finished.stdout)

    api = httpx.post(
        f"{server.url}{ENDPOINT}?fromTime=3.8&toTime=7.5", content=audio.read_bytes(), timeout=60
    ).json()
    assert set(printed) == set(api), "the command and the API must answer the same shape"
    assert printed["success"] is True
    assert has_words(printed["transcription"], SENTENCE_WORDS, at_least=3), printed
    for same in ("fromTime", "toTime", "inputSize", "fileSize", "duration"):
        assert printed[same] == api[same], same
    assert printed["inputSize"] == audio.stat().st_size
    assert printed["requestId"] != api["requestId"]

    # A script reads stdout as one JSON document: logs must go elsewhere.
    assert json.loads(finished.stdout) == printed, f"stdout is not only JSON:\n{finished.stdout}"


@pytest.mark.parametrize(
    ("content", "args", "status", "code"),
    [
        (b"A shopping list, not a recording.\n" * 100, (), 422, "undecodable_audio"),
        (None, ("--from-time", "100", "--to-time", "110"), 422, "no_audio_in_window"),
        (None, ("--from-time", "5", "--to-time", "2"), 400, "invalid_window"),
    ],
    ids=["undecodable", "window-past-the-end", "invalid-window"],
)
def test_transcribe_failure_prints_the_error_json_and_exits_non_zero(
    media: Path,
    tmp_path: Path,
    content: bytes | None,
    args: tuple[str, ...],
    status: int,
    code: str,
) -> None:
    if content is None:
        path = media / "sentence.wav"
    else:
        path = tmp_path / "notes.m4a"
        path.write_bytes(content)
    finished = run_cli(tmp_path, "transcribe", str(path), *args)
    assert finished.returncode != 0
    printed = json.loads(finished.stdout)
    assert set(printed) - {"debugFiles"} == ERROR_KEYS, printed
    assert printed["success"] is False
    assert (printed["status"], printed["code"]) == (status, code)
    assert printed["message"].strip()
    assert "Traceback" not in finished.stderr, finished.stderr


def test_transcribe_a_missing_file_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.wav"
    finished = run_cli(tmp_path, "transcribe", str(missing))
    assert finished.returncode != 0
    assert str(missing) in finished.stderr, finished.stderr
    assert "Traceback" not in finished.stderr, finished.stderr


def test_transcribe_stdout_stays_json_when_the_service_logs_a_warning(
    tmp_path: Path,
) -> None:
    """An unwritable VRAI_TMP_DIR is warned about; the warning must not corrupt stdout."""
    notes = tmp_path / "notes.m4a"
    notes.write_bytes(b"A shopping list, not a recording.\n" * 100)
    unusable = tmp_path / "no" / "such" / "folder"
    finished = run_cli(
        tmp_path, "transcribe", str(notes), env_overrides={"VRAI_TMP_DIR": str(unusable)}
    )
    assert finished.returncode != 0
    assert str(unusable) in finished.stdout + finished.stderr, "the fallback was not announced"
    printed = json.loads(finished.stdout)  # fails if a log line shares stdout with the answer
    assert printed["code"] == "undecodable_audio"
