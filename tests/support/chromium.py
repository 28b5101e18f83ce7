"""Headless Chromium (Debian's `chromium`), driven over its DevTools protocol with `websockets`.

Just what the page's tests need: open a URL, evaluate JavaScript, wait for a condition, set a
file input's files, grant a permission, take a screenshot.  Chromium runs in a session of its
own, so that stopping it also ends its renderer and helper processes; it writes the port it
listens on into its profile folder (`--remote-debugging-port=0`), so no port is guessed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1000,1100",
)


def fake_microphone(wav: Path) -> tuple[str, ...]:
    """Flags for a microphone that plays `wav` (in a loop), allowed without asking."""
    return (
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
    )


class PageError(AssertionError):
    """The page threw, or a protocol call failed."""


class Page:
    """One tab, over its own DevTools WebSocket."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        """Protocol events received so far (those of enabled domains)."""

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        call_id = self._next_id
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._socket.recv(timeout=max(0.0, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise PageError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self.events.append(message)

    def open(self, url: str) -> None:
        """Navigate to `url` and wait for its load event."""
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while not any(event["method"] == "Page.loadEventFired" for event in self.events):
            if time.monotonic() > deadline:
                raise PageError(f"{url} did not load")
            self.evaluate("1")  # a call reads the events that came meanwhile

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (a promise is awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise PageError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll `expression` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise PageError(f"still falsy after {timeout} s: {expression}")
            time.sleep(0.1)

    def set_files(self, selector: str, *paths: Path) -> None:
        """Choose `paths` in a file input, as a user would (its change event fires)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(path) for path in paths])

    def grant(self, origin: str, *permissions: str) -> None:
        """Grant `permissions` (DevTools names, e.g. `clipboardReadWrite`) to `origin`, for as
        long as this page's DevTools session lasts."""
        self.call("Browser.grantPermissions", origin=origin, permissions=list(permissions))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def console_errors(self) -> list[str]:
        """Exceptions the page threw, and what it logged as errors (since `open`)."""
        found = []
        for event in self.events:
            params = event["params"]
            if event["method"] == "Runtime.exceptionThrown":
                found.append(str(params["exceptionDetails"]))
            elif event["method"] == "Runtime.consoleAPICalled" and params["type"] == "error":
                found.append(str(params["args"]))
        return found


class Chromium:
    def __init__(self, process: subprocess.Popen[bytes], profile: Path, port: int) -> None:
        self.process = process
        self.profile = profile
        self.port = port
        self._sockets = ExitStack()

    def new_page(self) -> Page:
        target = httpx.put(f"http://127.0.0.1:{self.port}/json/new?about:blank", timeout=10)
        target.raise_for_status()
        url = target.json()["webSocketDebuggerUrl"]
        return Page(self._sockets.enter_context(connect(url, max_size=None)))

    def stop(self) -> None:
        self._sockets.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Its helpers share the session it was started in (its own): none may outlive it.
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@contextmanager
def chromium(profile: Path, *flags: str) -> Iterator[Chromium]:
    """A headless Chromium with a fresh profile in `profile`, stopped on leaving the block."""
    profile.mkdir(parents=True, exist_ok=True)
    log = (profile.parent / f"{profile.name}.log").open("wb")
    process = subprocess.Popen(
        [
            CHROMIUM,
            *FLAGS,
            *flags,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    browser = Chromium(process, profile, 0)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (profile.parent / f"{profile.name}.log").read_text(errors="replace")
                raise RuntimeError(f"Chromium did not start:\n{log_text[-3000:]}")
            time.sleep(0.05)
        browser.port = int(port_file.read_text().split()[0])
        yield browser
    finally:
        browser.stop()
