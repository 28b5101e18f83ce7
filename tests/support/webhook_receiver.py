"""A webhook receiver on loopback: records every POST, answers as a test scripts it.

`WebhookReceiver` serves HTTP/1.1 from a thread (the standard library's server: a real
socket, real parsing).  Each path answers 200 unless a test scripted other answers for it
(`script`: a 500 then a 200, a redirect), consumed one request at a time.  `wait_for` blocks
until a path has had so many requests; `received` is what it has had, in order.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    """One request as it arrived: the body exactly as sent (a signature covers these bytes)."""

    method: str
    path: str
    headers: dict[str, str]
    """Names lower-cased."""
    body: bytes
    at: float
    """`time.time()` when it arrived."""


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class WebhookReceiver:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._received: list[Received] = []
        self._scripts: dict[str, list[Reply]] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def script(self, path: str, *replies: Reply) -> None:
        """Answer the next requests to `path` with `replies`, in order; 200 after them."""
        with self._lock:
            self._scripts[path] = list(replies)

    def received(self, path: str) -> list[Received]:
        with self._lock:
            return [request for request in self._received if request.path == path]

    def wait_for(self, path: str, count: int = 1, timeout: float = 10.0) -> list[Received]:
        """The first `count` requests to `path`, once they have come (or fail saying so)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [request for request in self._received if request.path == path]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                assert left > 0, f"{path}: {len(found)} of {count} requests within {timeout} s"
                self._lock.wait(left)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._thread.join(5)
        self._httpd.server_close()

    def _record(self, request: Received) -> Reply:
        with self._lock:
            self._received.append(request)
            self._lock.notify_all()
            script = self._scripts.get(request.path)
            return script.pop(0) if script else Reply()


def _handler_for(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver would

        def do_POST(self) -> None:
            self._answer()

        def do_GET(self) -> None:
            self._answer()

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            reply = receiver._record(
                Received(
                    method=self.command,
                    path=self.path,
                    headers={name.lower(): value for name, value in self.headers.items()},
                    body=body,
                    at=time.time(),
                )
            )
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass  # the test reads `received`, not stderr

    return Handler
