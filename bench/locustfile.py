"""Locust load test against a deployed vrai-stream: chunked uploads, as the app makes them.

    locust -f bench/locustfile.py --host https://vrai-stream.fly.dev
    locust -f bench/locustfile.py --headless -u 20 -r 2 -t 5m --host https://...

Distributed, when one load machine cannot upload enough (each worker reads the same
environment and builds its own recording; nothing else is shared):

    locust -f bench/locustfile.py --master --host https://...
    locust -f bench/locustfile.py --worker --master-host MASTER_IP     # on each load machine

Each simulated phone uploads one recording to `POST /v1/transcriptions` with chunked
transfer encoding, paced like a phone link, waits for the answer, then waits a little
before the next.  Settings, all optional, from the environment:

| variable | default | meaning |
| --- | --- | --- |
| `VRAI_LOAD_AUDIO` | (a tone) | path of the recording to upload (any format the service reads) |
| `VRAI_LOAD_TONE_SECONDS` | `120` | length of the generated tone (WAV, 16 kHz mono) |
| `VRAI_LOAD_FROM`, `VRAI_LOAD_TO` | `0`, `60` | the window, in seconds (`fromTime`, `toTime`) |
| `VRAI_LOAD_TOKEN` | — | bearer token sent as `Authorization: Bearer …` |
| `VRAI_LOAD_MP3` | `0` | `1`: `Accept: audio/mpeg` (the trimmed MP3, no transcription) |
| `VRAI_LOAD_PACE` | `2000000` | upload pace in bytes/s (`0`: as fast as the link goes) |
| `VRAI_LOAD_WAIT` | `1,5` | seconds between a phone's uploads (min,max) |
| `VRAI_LOAD_SCENARIO` | (derived) | request name in Locust's statistics |

Locust's statistics get one row per scenario (e.g. `POST tone.wav 3.8MB 2MB/s mp3`),
and two more:

* `... [busy 503]`: the server answered 503 `busy` with `Retry-After` (at capacity, or
  draining).  Counted, not a failure: that is admission control doing its job, and the
  app retries later.  A high share says the fleet needs more machines.
* `... [after last byte]` (type `TAIL`): the time from the body's last byte to the
  complete answer, what the user waits once the upload is done.

The upload is sent by a small HTTP/1.1 client that watches for an early answer while it
sends: the service answers 503 (or 401, 413) before reading the body, and a client that
only reads after sending the whole body (requests, geventhttpclient) would see a
connection reset instead of the 503.
"""

from __future__ import annotations

import http.client
import math
import os
import select
import socket
import ssl
import struct
import time
import wave
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from locust import User, between, task

CHUNK_BYTES = 64 * 1024
TIMEOUT_SECONDS = 600.0


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def tone_wav(seconds: float, rate: int = 16_000) -> bytes:
    """A 440 Hz tone as 16-bit mono WAV; built from one repeated period, so it is instant."""
    period = [int(8000 * math.sin(2 * math.pi * 440 * n / rate)) for n in range(rate // 40)]
    one = struct.pack(f"<{len(period)}h", *period)
    frames = one * math.ceil(seconds * 40)
    buffer = BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(frames[: int(seconds * rate) * 2])
    return buffer.getvalue()


@dataclass(frozen=True)
class Config:
    """What every simulated phone uploads, and how: read once per Locust process."""

    audio: bytes
    label: str
    window: tuple[float, float]
    token: str | None
    mp3: bool
    pace: float
    scenario: str

    @classmethod
    def from_env(cls) -> Config:
        path = os.environ.get("VRAI_LOAD_AUDIO", "").strip()
        if path:
            audio, label = Path(path).read_bytes(), Path(path).name
        else:
            audio, label = tone_wav(_env_float("VRAI_LOAD_TONE_SECONDS", 120)), "tone.wav"
        mp3 = os.environ.get("VRAI_LOAD_MP3", "0").strip() in ("1", "true", "yes")
        pace = _env_float("VRAI_LOAD_PACE", 2_000_000)
        pace_text = f"{pace / 1e6:g}MB/s" if pace else "unthrottled"
        default = f"{label} {len(audio) / 1e6:.1f}MB {pace_text} {'mp3' if mp3 else 'transcript'}"
        return cls(
            audio=audio,
            label=label,
            window=(_env_float("VRAI_LOAD_FROM", 0), _env_float("VRAI_LOAD_TO", 60)),
            token=os.environ.get("VRAI_LOAD_TOKEN", "").strip() or None,
            mp3=mp3,
            pace=pace,
            scenario=os.environ.get("VRAI_LOAD_SCENARIO", "").strip() or default,
        )


CONFIG = Config.from_env()


@dataclass
class Answer:
    status: int
    body: bytes
    retry_after: str | None
    last_byte_sent: float | None
    """perf_counter when the body's last byte was sent (None: the server answered first)."""


def _connect(url: str) -> tuple[socket.socket, str]:
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if tls else 80)
    sock = socket.create_connection((host, port), timeout=TIMEOUT_SECONDS)
    if tls:
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    return sock, f"{host}:{port}" if parts.port else host


def _answered(sock: socket.socket) -> bool:
    """True when the server has sent something: an answer before the body's end."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def upload(base_url: str, target: str, headers: dict[str, str], data: bytes, pace: float) -> Answer:
    """POST `data` chunked at `pace` bytes/s, stopping early if the server answers first."""
    sock, host = _connect(base_url)
    last_byte_sent = None
    try:
        head = [f"POST {target} HTTP/1.1", f"Host: {host}", "Transfer-Encoding: chunked"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        started = time.perf_counter()
        try:
            for offset in range(0, len(data), CHUNK_BYTES):
                if _answered(sock):
                    break
                chunk = data[offset : offset + CHUNK_BYTES]
                sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                if pace:
                    delay = started + (offset + len(chunk)) / pace - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)  # gevent's, under Locust: other phones run meanwhile
            else:
                sock.sendall(b"0\r\n\r\n")
                last_byte_sent = time.perf_counter()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading; its answer may already be here
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        body = response.read()
        return Answer(response.status, body, response.getheader("Retry-After"), last_byte_sent)
    finally:
        sock.close()


class Phone(User):
    """One phone: uploads, waits for the answer, pauses, uploads again."""

    wait_time = between(*(float(x) for x in os.environ.get("VRAI_LOAD_WAIT", "1,5").split(",")))

    @task
    def transcribe(self) -> None:
        config = CONFIG
        query = urlencode({"fromTime": config.window[0], "toTime": config.window[1]})
        headers = {"Accept": "audio/mpeg" if config.mp3 else "application/json"}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"
        started = time.perf_counter()
        answer: Answer | None = None
        failure: Exception | None = None
        try:
            answer = upload(
                self.host or "", f"/v1/transcriptions?{query}", headers, config.audio, config.pace
            )
        except (OSError, http.client.HTTPException) as exc:
            failure = exc
        finished = time.perf_counter()
        self._report(config, started, finished, answer, failure)

    def _report(
        self,
        config: Config,
        started: float,
        finished: float,
        answer: Answer | None,
        failure: Exception | None,
    ) -> None:
        name = config.scenario
        length = len(answer.body) if answer else 0
        if answer is not None and answer.status == 503 and answer.retry_after:
            name = f"{name} [busy 503]"
        elif answer is not None and answer.status != 200 and failure is None:
            failure = RuntimeError(f"HTTP {answer.status}: {answer.body[:200]!r}")
        self.environment.events.request.fire(
            request_type="POST",
            name=name,
            response_time=(finished - started) * 1000,
            response_length=length,
            exception=failure,
            context={},
        )
        if answer is not None and answer.status == 200 and answer.last_byte_sent is not None:
            self.environment.events.request.fire(
                request_type="TAIL",
                name=f"{config.scenario} [after last byte]",
                response_time=(finished - answer.last_byte_sent) * 1000,
                response_length=0,
                exception=None,
                context={},
            )
