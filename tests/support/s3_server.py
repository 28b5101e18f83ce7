"""A real S3 API on loopback for the debug-copy tests: moto in server mode, and a proxy that
can slow it down or kill it mid-request.

* `MotoServer` runs `python -m moto.server -H 127.0.0.1 -p PORT` as a subprocess: the
  service talks to it over real HTTP with real SigV4 signatures, as it would to AWS or Tigris.
* `s3_client` is a plain boto3 client for the tests' own assertions; `new_bucket` gives each
  test a bucket of its own, so a listing only ever shows that test's objects and uploads.
* `ThrottlingProxy` forwards TCP from its own loopback port to moto, optionally at a set byte
  rate; `stop()` closes every connection with a reset and stops listening (S3 died),
  `start()` listens again on the same port (S3 is back).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import anyio
import anyio.abc
import boto3
import httpx
import psutil
from botocore.config import Config

from .audio import run_ffmpeg
from .server import Server, free_port, launch, stop_process

REGION = "us-east-1"
ACCESS_KEY_ID = "AKIDVRAISTREAMTEST"
SECRET_ACCESS_KEY = "vrai-stream-test-secret"  # moto accepts any key


# --- moto in server mode ------------------------------------------------------------------


@dataclass
class MotoServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    def stop(self) -> None:
        stop_process(self.process)


def start_moto(log_dir: Path, env: dict[str, str] | None = None) -> MotoServer:
    """moto's S3 (and IAM) API on a free loopback port, answering before this returns."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"moto-{port}.log"
    moto_env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    moto_env.update(env or {})
    process = launch(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        moto_env,
        log_path,
        name="moto",
        probe=f"{url}/moto-api/",
    )
    return MotoServer(url, process, log_path)


def s3_client(
    endpoint: str, *, access_key_id: str = ACCESS_KEY_ID, secret: str = SECRET_ACCESS_KEY
) -> Any:
    """A boto3 S3 client for the tests' own look at the bucket (never through the proxy)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret,
        config=Config(signature_version="s3v4", retries={"max_attempts": 1}),
    )


def new_bucket(client: Any) -> str:
    name = f"debug-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    return name


def s3_env(endpoint: str, bucket: str, **extra: str) -> dict[str, str]:
    """What a server needs to keep its debug copies in `bucket` behind `endpoint`."""
    return {
        "VRAI_DEBUG_STORE": "s3",
        "VRAI_DEBUG_BUCKET": bucket,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        # No ~/.aws of the machine running the tests can leak in.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        **extra,
    }


# --- looking at the bucket ----------------------------------------------------------------


def multipart_uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return uploads


def objects(client: Any, bucket: str) -> dict[str, int]:
    """Every debug copy in the bucket and its size: the shared state the service keeps in
    the same bucket (`state/`, see `state_records`) is not one."""
    listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: item["Size"] for item in listing if not item["Key"].startswith("state/")}


def state_records(client: Any, bucket: str) -> list[str]:
    """The keys of the records the service shares between machines (`vrai_stream.state`)."""
    listing = client.list_objects_v2(Bucket=bucket, Prefix="state/").get("Contents", [])
    return [item["Key"] for item in listing]


def read_object(client: Any, bucket: str, key: str) -> bytes:
    data: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


def wait_for(
    probe: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll `probe` until it returns something truthy; fail saying `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or probe}")
        time.sleep(interval)


def wait_no_multipart(client: Any, bucket: str, timeout: float = 10.0) -> None:
    """Every multipart upload in `bucket` completed or aborted, within `timeout`."""
    deadline = time.monotonic() + timeout
    while multipart_uploads(client, bucket) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = multipart_uploads(client, bucket)
    assert left == [], f"incomplete multipart uploads left behind: {left}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def presigned_signature_ok(url: str, secret: str = SECRET_ACCESS_KEY) -> bool:
    """Recompute a SigV4 query-string signature: moto serves presigned URLs without checking.

    True when `url` was signed with `secret` for a GET of exactly its host, path and query.
    """
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = params.pop("X-Amz-Signature", "")
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or not signature:
        return False
    canonical_query = "&".join(
        f"{quote(key, safe='-_.~')}={quote(value, safe='-_.~')}"
        for key, value in sorted(params.items())
    )
    canonical_request = "\n".join(
        [
            "GET",
            parts.path,
            canonical_query,
            f"host:{parts.netloc}\n",
            params["X-Amz-SignedHeaders"],
            "UNSIGNED-PAYLOAD",
        ]
    )
    _, scope = params["X-Amz-Credential"].split("/", 1)
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            params["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + secret).encode()
    for piece in scope.split("/"):
        key = hmac.new(key, piece.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


# --- a proxy that can slow S3 down or kill it ---------------------------------------------


class ThrottlingProxy:
    """TCP from its own loopback port to `upstream`, at `rate` bytes/s in each direction.

    The rate holds for each connection (`None`: as fast as the sockets go).  The proxy keeps
    small socket buffers, so what a client gave up on (a cancelled request) does not queue
    here and delay its next request.  `stop()` kills S3 as a crash would: every
    open connection gets a reset and the port stops listening.  `start()` brings it back
    on the same port.
    """

    def __init__(self, upstream: str, *, rate: float | None = None) -> None:
        target = urlsplit(upstream)
        assert target.hostname is not None and target.port is not None
        self._upstream = (target.hostname, target.port)
        self.rate = rate
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.uploaded = 0
        """Bytes forwarded towards S3 so far."""
        self.requests: list[str] = []
        """`METHOD /path?query` of every request forwarded, in order."""
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._running = False

    def __enter__(self) -> ThrottlingProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_BYTES)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener
        self._running = True
        self._spawn(self._accept_loop, listener)

    def stop(self) -> None:
        """Reset every connection and stop listening: to its clients, S3 just died."""
        self._running = False
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            doomed = list(self._sockets)
            self._sockets.clear()
        for sock in doomed:
            with contextlib.suppress(OSError):
                # A zero linger turns close() into a reset, as a crashed server's kernel does.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            with contextlib.suppress(OSError):
                # close() alone would not end a recv() blocked in a pump thread, and the
                # connection would live on, still forwarding: shut it down first.
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads = [thread for thread in self._threads if thread.is_alive()]

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._running:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
                upstream.settimeout(5)
                upstream.connect(self._upstream)
            except OSError:
                upstream.close()
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if not self._running:
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            self._spawn(self._pump, client, upstream, "up")
            self._spawn(self._pump, upstream, client, "down")

    def _pump(self, source: socket.socket, target: socket.socket, direction: str) -> None:
        tail = b""
        due = time.monotonic()
        try:
            while self._running:
                rate = self.rate
                size = 64 * 1024 if rate is None else max(1024, min(64 * 1024, int(rate / 50)))
                data = source.recv(size)
                if not data:
                    break
                if rate is not None:
                    due = max(due, time.monotonic() - 0.1) + len(data) / rate
                    while self._running and time.monotonic() < due:
                        time.sleep(min(0.02, max(0.0, due - time.monotonic())))
                if not self._running:
                    break
                target.sendall(data)
                if direction == "up":
                    tail = self._note_requests(tail, data)
                    with self._lock:
                        self.uploaded += len(data)
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _note_requests(self, tail: bytes, data: bytes) -> bytes:
        """Log request lines (a line may straddle two reads); returns the new tail."""
        seen = tail + data
        for match in _REQUEST_LINE.finditer(seen):
            if match.end() > len(tail):
                with self._lock:
                    self.requests.append(match.group(1).decode("latin-1"))
        return seen[-512:]

    def requests_for(self, key: str) -> list[str]:
        """The requests that touched `key`, as `METHOD ?query` (the path left out)."""
        found = []
        for line in list(self.requests):
            method, _, target = line.partition(" ")
            path, _, query = target.partition("?")
            if path.endswith("/" + quote(key, safe="/-_.~")):
                found.append(f"{method} ?{query}" if query else method)
        return found


BUFFER_BYTES = 64 * 1024
_REQUEST_LINE = re.compile(rb"(?:^|\n)((?:GET|PUT|POST|DELETE|HEAD) \S+) HTTP/1\.1\r\n")


@contextlib.contextmanager
def throttled(upstream: str, rate: float | None = None) -> Iterator[ThrottlingProxy]:
    proxy = ThrottlingProxy(upstream, rate=rate)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


# --- the service, ready to be timed ---------------------------------------------------------


def wait_ready(server: Server, timeout: float = 30.0, *, bucket_checked: bool = True) -> None:
    """Wait for the background warm-up (model, S3 client and bucket check) to finish.

    Warm-up takes a core for a second or two: a request timed during it would measure that,
    and an S3 client still importing lets a fast upload's copy fall behind.
    """
    deadline = time.monotonic() + timeout
    s3 = bucket_checked and server.env.get("VRAI_DEBUG_STORE") == "s3"
    while time.monotonic() < deadline:
        health = httpx.get(f"{server.url}/health", timeout=2).json()
        checked = not s3 or any(
            entry.get("message", "").startswith("debug bucket") for entry in server.logs()
        )
        if health.get("transcriberReady") and checked:
            return
        time.sleep(0.05)
    raise AssertionError(f"server not ready after {timeout:g} s:\n{server.log_path.read_text()}")


def warnings(server: Server, text: str) -> list[dict[str, Any]]:
    """The server's warning lines whose message contains `text`."""
    return [
        entry
        for entry in server.logs()
        if entry.get("level") == "warning" and text in entry.get("message", "")
    ]


# --- recordings and uploads, shared with test_debug_folder ----------------------------------

ENDPOINT = "/v1/transcriptions"
GARBAGE = b"This is a shopping list, not a recording.\n" * 500


def no_transcriber() -> dict[str, str]:
    """An OpenAI transcriber whose API is not there (nothing listens on its port).

    For servers that answer `Accept: audio/mpeg` and never transcribe: no model in their
    memory, and a JSON request fails for real, after the MP3 exists, with
    `transcription_failed`.  Not a quicker start: `import openai` (1.8 s) costs more than
    loading tiny.en (1.2 s).
    """
    return {
        "VRAI_TRANSCRIBER": "openai",
        "OPENAI_API_KEY": "sk-test-not-a-key",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "VRAI_OPENAI_MAX_RETRIES": "0",
    }


def noise_wav(path: Path, size: int, seed: int = 0) -> Path:
    """A 48 kHz stereo 16-bit WAV of about `size` bytes of seeded noise, made in milliseconds.

    Noise, not tone: every byte differs, so a copy with a part missing or repeated cannot
    hash the same.
    """
    frames = (size - 44) // 4
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(48_000)
        out.writeframes(random.Random(seed).randbytes(frames * 4))
    return path


def make_recordings(folder: Path, sentence: Path) -> dict[str, Path]:
    """The uploads the debug-copy tests send, in the containers phones write."""
    folder.mkdir(parents=True, exist_ok=True)
    recordings = {
        "small.wav": noise_wav(folder / "small.wav", 1_000_000, seed=1),
        "12MB.wav": noise_wav(folder / "12MB.wav", 12_000_000, seed=12),
        "20MB.wav": noise_wav(folder / "20MB.wav", 20_000_000, seed=20),
    }
    lpcm_caf = folder / "lpcm.caf"
    run_ffmpeg("-i", str(sentence), "-c:a", "pcm_s16le", "-f", "caf", str(lpcm_caf))
    moov_first = folder / "moov-first.m4a"
    run_ffmpeg("-i", str(sentence), "-c:a", "aac", "-movflags", "+faststart", str(moov_first))
    moov_last = folder / "moov-last.m4a"
    run_ffmpeg("-i", str(sentence), "-c:a", "aac", str(moov_last))
    recordings.update(
        {"lpcm.caf": lpcm_caf, "moov-first.m4a": moov_first, "moov-last.m4a": moov_last}
    )
    return recordings


@dataclass
class Reply:
    status: int
    request_id: str
    headers: dict[str, str]
    content: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.content)


async def paced(
    data: bytes,
    *,
    rate: float | None = None,
    chunk_size: int = 64 * 1024,
    on_sent: Callable[[int], Any] | None = None,
) -> AsyncIterator[bytes]:
    """`data` as a chunked body at `rate` bytes/s (None: as fast as the socket takes it).

    `on_sent(bytes_sent_so_far)` runs before each chunk: tests use it to break S3 mid-upload.
    """
    started = time.monotonic()
    for offset in range(0, len(data), chunk_size):
        if on_sent is not None:
            on_sent(offset)
        if rate:
            delay = started + offset / rate - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
        yield data[offset : offset + chunk_size]


async def upload(
    server: Server,
    data: bytes,
    *,
    window: tuple[float, float] = (0, 5),
    mp3: bool = True,
    rate: float | None = None,
    on_sent: Callable[[int], Any] | None = None,
) -> Reply:
    """POST `data` chunked; the MP3 comes back (`mp3`) or the JSON transcript."""
    headers = {"Accept": "audio/mpeg"} if mp3 else {}
    query = f"fromTime={window[0]:g}&toTime={window[1]:g}"
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        response = await client.post(
            f"{ENDPOINT}?{query}",
            content=paced(data, rate=rate, on_sent=on_sent),
            headers=headers,
        )
    seconds = time.monotonic() - started
    request_id = response.headers.get("x-request-id", "")
    if response.headers.get("content-type", "").startswith("application/json"):
        assert response.json()["requestId"] == request_id
    return Reply(
        response.status_code, request_id, dict(response.headers), response.content, seconds
    )


async def disconnect_mid_upload(
    server: Server, data: bytes, *, rate: float, until: Callable[[int], bool]
) -> None:
    """Send `data` chunked at `rate` until `until(bytes_sent)` holds, then reset the socket."""
    url = httpx.URL(server.url)
    assert url.port is not None
    head = (
        f"POST {ENDPOINT}?fromTime=0&toTime=5 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Transfer-Encoding: chunked\r\nAccept: audio/mpeg\r\n\r\n"
    ).encode()
    stream = await anyio.connect_tcp(url.host, url.port)
    try:
        await stream.send(head)
        sent = 0
        async for chunk in paced(data, rate=rate):
            if until(sent):
                break
            await stream.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        else:
            raise AssertionError("the whole body went up before the disconnect was due")
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
    finally:
        await stream.aclose()


def request_log(server: Server, request_id: str | None = None, timeout: float = 10.0) -> Any:
    """The server's own log line for a request (the last one when no id is given)."""

    def find() -> Any:
        entries = [
            entry
            for entry in server.request_logs()
            if request_id is None or entry.get("requestId") == request_id
        ]
        return entries[-1] if entries else None

    return wait_for(find, timeout=timeout, what=f"the log line of request {request_id}")


class PeakRss:
    """A process's peak RSS (with its children's, when `tree`), sampled every 10 ms.

    A child caught between fork and exec still maps the server's whole image and would count
    it twice for a moment: children named like the server are skipped.
    """

    def __init__(self, pid: int, *, tree: bool = False) -> None:
        self._root = psutil.Process(pid)
        self._name = self._root.name()
        self._tree = tree
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.before = self._sample()
        self.peak = self.before

    def _sample(self) -> int:
        total = 0
        with contextlib.suppress(psutil.NoSuchProcess):
            total += self._root.memory_info().rss
            for child in self._root.children(recursive=True) if self._tree else []:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    if child.name() != self._name:
                        total += child.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.before
