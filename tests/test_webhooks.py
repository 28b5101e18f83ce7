"""Webhooks (`webhooks/`, `callbackUrl`): the answer POSTed to a receiver on loopback, signed as
Standard Webhooks sign, retried, and never sent where it may not go.

One service process for the module, with a webhook secret, `VRAI_WEBHOOK_ALLOWED_HOSTS` of
`127.0.0.1` (the receiver, listed exactly) and `*` (any public host), and quick retries.  It
transcribes silence: the segmenter finds no voice, so no transcriber is ever called, and the
OpenAI key it is given points nowhere.  The signature is checked by a verifier written here
from the standard's text, not by the service's code.  Where a delivery has to meet a name that
resolves to a private address by the time it connects, the service's `Webhooks` runs in this
process against the same receiver.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import secrets
import time
import wave
from collections.abc import Iterator, Mapping
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from vrai_stream import errors
from vrai_stream.settings import Settings
from vrai_stream.webhooks.delivery import Webhooks
from vrai_stream.webhooks.destinations import Destination, HostPolicy, is_public

from .support.client import form_body
from .support.server import Server, start_server
from .support.sse import parse_events
from .support.webhook_receiver import Received, Reply, WebhookReceiver
from .test_errors import assert_raw_error, raw_connection, read_response, request_head

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
ENDPOINT = "/v1/transcriptions"
BOUNDARY = "----vrai-webhooks-5c1d"
GARBAGE = b"a shopping list, not a recording\n" * 200


def silence(seconds: float = 2.0) -> bytes:
    """A WAV of silence: the job runs whole, and nothing is sent to a transcriber."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\0\0" * int(16000 * seconds))
    return buffer.getvalue()


AUDIO = silence()


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    running = WebhookReceiver()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("webhooks"),
        {
            "VRAI_TRANSCRIBER": "openai",
            "OPENAI_API_KEY": "sk-never-used",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "VRAI_WEBHOOK_SECRET": SECRET,
            "VRAI_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1, *",
            "VRAI_WEBHOOK_MAX_ATTEMPTS": "3",
            "VRAI_WEBHOOK_BACKOFF_SECONDS": "0.05",
            "VRAI_WEBHOOK_TIMEOUT_SECONDS": "5",
        },
    )
    yield running
    running.stop()


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance: int = 300) -> None:
    """Standard Webhooks' verification, from the specification's text: the key is the base64
    after `whsec_`; the signed content is `{webhook-id}.{webhook-timestamp}.{body}`; the
    header holds space-separated `v1,<base64 HMAC-SHA256>` signatures, one of which must
    match (compared in constant time); the timestamp must be near the receiver's clock."""
    message_id = headers["webhook-id"]
    timestamp = headers["webhook-timestamp"]
    assert abs(time.time() - int(timestamp)) <= tolerance, "timestamp outside the tolerance"
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    candidates = [
        value.encode() for version, _, value in
        (entry.partition(",") for entry in headers["webhook-signature"].split())
        if version == "v1"
    ]  # fmt: skip
    assert any(hmac.compare_digest(candidate, expected) for candidate in candidates), (
        "no signature matches"
    )


def payload(delivery: Received) -> dict[str, Any]:
    verify(SECRET, delivery.headers, delivery.body)
    assert delivery.method == "POST"
    assert delivery.headers["content-type"] == "application/json"
    body: dict[str, Any] = json.loads(delivery.body)
    assert set(body) == {"type", "timestamp", "data"}, body
    assert body["timestamp"].endswith("Z"), body["timestamp"]
    return body


def callback(receiver: WebhookReceiver, path: str) -> dict[str, str]:
    return {"callbackUrl": f"{receiver.url}{path}"}


def logged(server: Server, message: str, request_id: str) -> list[dict[str, Any]]:
    return [
        line
        for line in server.logs()
        if line.get("message") == message and line.get("requestId") == request_id
    ]


def wait_for_log(server: Server, message: str, request_id: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not logged(server, message, request_id):
        assert time.monotonic() < deadline, f"no {message!r} logged for {request_id}"
        time.sleep(0.02)


async def post(server: Server, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        return await client.post(path, **kwargs)


# --- what is delivered ------------------------------------------------------------------------


async def test_a_completed_answer_is_delivered_signed(
    hooked: Server, receiver: WebhookReceiver
) -> None:
    path = "/hooks/completed"
    response = await post(hooked, ENDPOINT, params=callback(receiver, path), content=AUDIO)
    assert response.status_code == 200, response.text
    answer = response.json()
    (delivery,) = receiver.wait_for(path)
    body = payload(delivery)
    assert body["type"] == "transcription.completed"
    assert body["data"] == answer, "the webhook holds the answer the client got"
    assert delivery.headers["webhook-id"] == f"msg_{answer['requestId']}"
    # The verifier is not a rubber stamp: another body, or another key, does not verify.
    with pytest.raises(AssertionError):
        verify(SECRET, delivery.headers, delivery.body.replace(b"completed", b"failed"))
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with pytest.raises(AssertionError):
        verify(other, delivery.headers, delivery.body)


async def test_a_failed_answer_is_delivered_as_failed(
    hooked: Server, receiver: WebhookReceiver
) -> None:
    path = "/hooks/failed"
    response = await post(hooked, ENDPOINT, params=callback(receiver, path), content=GARBAGE)
    assert response.status_code == 422, response.text
    body = payload(receiver.wait_for(path)[0])
    assert body["type"] == "transcription.failed"
    assert body["data"] == response.json()
    assert body["data"]["code"] == "undecodable_audio"


async def test_every_audio_endpoint_and_answer_kind_delivers(
    hooked: Server, receiver: WebhookReceiver
) -> None:
    """Events: the `done` event's data; the legacy form: its JSON; OpenAI's `text` format:
    the text and its type."""
    events = await post(
        hooked,
        ENDPOINT,
        params=callback(receiver, "/hooks/events"),
        content=AUDIO,
        headers={"Accept": "text/event-stream"},
    )
    assert events.status_code == 200, events.text
    done = parse_events(events.text)[-1]
    assert done.name == "done"
    assert payload(receiver.wait_for("/hooks/events")[0])["data"] == done.data

    form = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    legacy = await post(
        hooked,
        "/trim-and-transcribe-multipart",
        params=callback(receiver, "/hooks/legacy"),
        content=form_body(
            BOUNDARY,
            {"fromTime": "0", "toTime": "2"},
            "audio",
            AUDIO,
            filename="note.wav",
            content_type="audio/wav",
        ),
        headers=form,
    )
    assert legacy.status_code == 200, legacy.text
    assert payload(receiver.wait_for("/hooks/legacy")[0])["data"] == legacy.json()

    text = await post(
        hooked,
        "/v1/audio/transcriptions",
        params=callback(receiver, "/hooks/openai-text"),
        content=form_body(
            BOUNDARY,
            {"model": "whisper-1", "response_format": "text"},
            "file",
            AUDIO,
            filename="note.wav",
            content_type="audio/wav",
        ),
        headers=form,
    )
    assert text.status_code == 200, text.text
    body = payload(receiver.wait_for("/hooks/openai-text")[0])
    assert body["type"] == "transcription.completed"
    assert body["data"] == {"contentType": text.headers["content-type"], "content": text.text}


# --- delivery ---------------------------------------------------------------------------------


async def test_a_500_is_retried_under_the_same_id_until_it_lands(
    hooked: Server, receiver: WebhookReceiver
) -> None:
    path = "/hooks/flaky"
    receiver.script(path, Reply(500), Reply(503, {"Retry-After": "0"}))
    response = await post(hooked, ENDPOINT, params=callback(receiver, path), content=AUDIO)
    assert response.status_code == 200, response.text
    request_id = response.json()["requestId"]
    attempts = receiver.wait_for(path, 3)
    for attempt in attempts:
        assert payload(attempt)["data"]["requestId"] == request_id  # each signed anew
    assert {attempt.headers["webhook-id"] for attempt in attempts} == {f"msg_{request_id}"}
    assert [attempt.body for attempt in attempts] == [attempts[0].body] * 3
    await anyio.sleep(0.3)
    assert len(receiver.received(path)) == 3, "delivered, then sent again"
    wait_for_log(hooked, "webhook delivered", request_id)
    failed = logged(hooked, "webhook attempt failed", request_id)
    assert [line["result"] for line in failed] == ["500", "503"], failed
    assert SECRET not in hooked.log_path.read_text()


async def test_a_redirect_is_not_followed(hooked: Server, receiver: WebhookReceiver) -> None:
    path, target = "/hooks/moved", "/hooks/moved-here"
    receiver.script(path, *[Reply(307, {"Location": f"{receiver.url}{target}"})] * 3)
    response = await post(hooked, ENDPOINT, params=callback(receiver, path), content=AUDIO)
    assert response.status_code == 200, response.text
    request_id = response.json()["requestId"]
    assert len(receiver.wait_for(path, 3)) == 3  # a redirect is a failed attempt, retried
    wait_for_log(hooked, "webhook given up", request_id)
    assert receiver.received(target) == [], "the redirect was followed"


async def test_a_client_that_leaves_after_its_last_byte_still_has_its_webhook(
    hooked: Server, receiver: WebhookReceiver
) -> None:
    path = "/hooks/left"
    async with raw_connection(hooked) as stream:
        head = {"Content-Length": str(len(AUDIO)), "Content-Type": "audio/wav"}
        await stream.send(request_head(f"{ENDPOINT}?callbackUrl={receiver.url}{path}", head))
        await stream.send(AUDIO)
    # Gone without reading a byte of the answer: the job runs on, and the backend learns it.
    body = payload(receiver.wait_for(path)[0])
    assert body["type"] == "transcription.completed"
    assert body["data"]["success"] is True
    log = hooked.request_log(body["data"]["requestId"])
    assert (log["status"], log["code"]) == (200, "ok")


async def test_a_client_that_leaves_mid_upload_is_a_failed_webhook(
    hooked: Server, receiver: WebhookReceiver
) -> None:
    path = "/hooks/left-early"
    async with raw_connection(hooked) as stream:
        head = {"Content-Length": str(len(AUDIO)), "Content-Type": "audio/wav"}
        await stream.send(request_head(f"{ENDPOINT}?callbackUrl={receiver.url}{path}", head))
        await stream.send(AUDIO[: len(AUDIO) // 2])
        await anyio.sleep(0.3)
    body = payload(receiver.wait_for(path)[0])
    assert body["type"] == "transcription.failed"
    assert body["data"]["code"] == "client_disconnected"
    hooked.wait_idle()


# --- where a webhook may not go ---------------------------------------------------------------


REFUSED = {
    "loopback, not the listed address": "http://127.0.0.2/hook",
    "private": "http://10.1.2.3/hook",
    "private, class C": "http://192.168.0.10/hook",
    "metadata": "http://169.254.169.254/latest/meta-data/",
    "Fly's private network": "http://[fdaa:0:1:a7b::2]:8080/hook",
    "IPv6 loopback": "http://[::1]/hook",
    "IPv4-mapped loopback": "http://[::ffff:127.0.0.1]/hook",
    "decimal loopback": "http://2130706433/hook",
    "hex loopback": "http://0x7f000001/hook",
    "short loopback": "http://127.1/hook",
    "this host": "http://0.0.0.0/hook",
    "a name for loopback, allowed only by *": "http://localhost/hook",
    "userinfo before a listed host": "http://hooks.example.com@127.0.0.1/hook",
    "Fly private name": "http://vrai.internal/hook",
    "Fly private proxy": "http://vrai.flycast/hook",
    "not http": "ftp://127.0.0.1/hook",
    "a file": "file:///etc/passwd",
    "not a URL": "http://exa mple.com:99999999/",
}


@pytest.mark.parametrize("url", REFUSED.values(), ids=REFUSED.keys())
async def test_a_callback_where_it_may_not_go_is_refused_before_the_body(
    hooked: Server, url: str
) -> None:
    """A terabyte declared and not a byte sent: the answer can only come before the body."""
    async with raw_connection(hooked) as stream:
        query = httpx.QueryParams({"callbackUrl": url})
        await stream.send(request_head(f"{ENDPOINT}?{query}", {"Content-Length": str(2**40)}))
        response = await read_response(stream, within=5)
    assert_raw_error(response, expected=400, code="callback_not_allowed")
    assert response.headers.get("connection") == "close"


@pytest.mark.parametrize("path", ["/trim-and-transcribe", "/v1/audio/transcriptions"])
async def test_every_audio_endpoint_vets_its_callback(hooked: Server, path: str) -> None:
    async with raw_connection(hooked) as stream:
        query = httpx.QueryParams({"callbackUrl": "http://169.254.169.254/"})
        await stream.send(request_head(f"{path}?{query}", {"Content-Length": str(2**40)}))
        response = await read_response(stream, within=5)
    assert response.status == 400, response.body
    assert response.json()["code"] == "callback_not_allowed"  # OpenAI's shape has more fields


async def test_an_mp3_answer_takes_no_callback(hooked: Server, receiver: WebhookReceiver) -> None:
    path = "/hooks/mp3"
    response = await post(
        hooked,
        ENDPOINT,
        params=callback(receiver, path),
        content=AUDIO,
        headers={"Accept": "audio/mpeg"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_parameters"
    await anyio.sleep(0.2)
    assert receiver.received(path) == [], "a request refused before its body sends no webhook"


# --- the policy and the delivery, in this process ---------------------------------------------


def webhooks(hosts: str, backoff: float = 0.01) -> Webhooks:
    return Webhooks(
        Settings.from_env(
            {
                "VRAI_WEBHOOK_SECRET": SECRET,
                "VRAI_WEBHOOK_ALLOWED_HOSTS": hosts,
                "VRAI_WEBHOOK_MAX_ATTEMPTS": "2",
                "VRAI_WEBHOOK_BACKOFF_SECONDS": str(backoff),
            }
        )
    )


def test_hosts_not_in_the_list_are_refused() -> None:
    hosts = "hooks.example.com, *.example.org"
    policy = HostPolicy(
        Settings.from_env({"VRAI_WEBHOOK_ALLOWED_HOSTS": hosts}).webhook_allowed_hosts
    )
    assert policy.destination("https://hooks.example.com/x").listed
    assert not policy.destination("https://a.b.example.org/x").listed
    for url in (
        "https://example.org/",
        "https://hooks.example.com.evil.net/",
        "https://evilexample.org/",
        "https://other.example.com/",
    ):
        with pytest.raises(errors.CallbackNotAllowed, match="VRAI_WEBHOOK_ALLOWED_HOSTS"):
            policy.destination(url)


def test_only_a_host_listed_exactly_may_be_private() -> None:
    policy = HostPolicy(("10.0.0.7", "backend.internal", "*.corp.example"))
    assert policy.destination("http://10.0.0.7:8080/hook").listed
    assert policy.destination("http://backend.internal/hook").listed
    with pytest.raises(errors.CallbackNotAllowed, match="private name"):
        HostPolicy(("*",)).destination("http://backend.internal/hook")
    for address in ("10.0.0.8", "[fdaa::1]", "[::ffff:10.0.0.7]", "[64:ff9b::a00:7]"):
        with pytest.raises(errors.CallbackNotAllowed, match="not a public"):
            HostPolicy(("*",)).destination(f"http://{address}/hook")


def test_which_addresses_are_public() -> None:
    import ipaddress

    public = ("8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8")
    private = (
        "127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
        "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fd00::1",
        "fdaa::3", "ff02::1", "::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::7f00:1",
        "2002:7f00:1::1", "2001:db8::1",
    )  # fmt: skip
    assert all(is_public(ipaddress.ip_address(address)) for address in public)
    assert not any(is_public(ipaddress.ip_address(address)) for address in private)


async def test_without_a_secret_no_callback_is_taken() -> None:
    service = Webhooks(Settings.from_env({"VRAI_WEBHOOK_ALLOWED_HOSTS": "*"}))
    with pytest.raises(errors.CallbackNotAllowed, match="VRAI_WEBHOOK_SECRET"):
        await service.vet("https://hooks.example.com/")
    await service.aclose()


async def test_addresses_are_checked_again_when_connecting(receiver: WebhookReceiver) -> None:
    """A name that resolves to loopback by the time its webhook is sent (DNS rebinding) is
    not connected to; the same name listed exactly is."""
    path = "/hooks/rebound"
    url = httpx.URL(f"http://localhost:{receiver.port}{path}")
    for hosts, listed in (("*", False), ("localhost", True)):
        service = webhooks(hosts)
        async with anyio.create_task_group() as background:
            service.start(background)
            # As vetted when the request came, before the name pointed at loopback.
            service.send(Destination(url, "localhost", listed=listed), "rebound1", 499, None)
            with anyio.fail_after(5):
                await service.wait_idle()
        await service.aclose()
        if not listed:
            assert receiver.received(path) == [], "connected to a private address"
    (delivery,) = receiver.received(path)
    body = payload(delivery)
    assert body["type"] == "transcription.failed"
    assert body["data"]["code"] == "client_disconnected"


async def test_a_delivery_cut_short_by_shutdown_is_logged(
    receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    path = "/hooks/down"
    receiver.script(path, *[Reply(500)] * 3)
    service = webhooks("127.0.0.1", backoff=30)
    destination = await service.vet(f"{receiver.url}{path}")
    async with anyio.create_task_group() as background:
        service.start(background)
        service.send(destination, "shutdown1", 200, None)
        await anyio.to_thread.run_sync(receiver.wait_for, path)
        with anyio.move_on_after(0.2):  # the drain's grace, over before the next attempt
            await service.wait_idle()
        background.cancel_scope.cancel()
    await service.aclose()
    assert "webhook not delivered: the server stopped first" in caplog.messages
    assert len(receiver.received(path)) == 1
