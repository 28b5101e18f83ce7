"""A fleet, not a machine: service processes behind Fly's proxy (the tests' stand-in) share one
bucket (moto's real S3 API), and keys, answers and webhooks on their way outlive the machine
that made them.

Each machine transcribes through the tests' OpenAI-compatible server (real `openai` SDK, real
model behind it), so every upstream call, on any machine, is counted; billing is read where
it is kept, in each machine's request log (`audioSeconds`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from vrai_stream.s3_client import LazyS3Client
from vrai_stream.settings import Settings
from vrai_stream.state.shared import create_shared_state

from .support.audio import SENTENCE_WORDS, has_words
from .support.client import chunked
from .support.fake_openai import FakeOpenAI
from .support.fly_proxy import FlyProxy
from .support.resumable_client import draft_fields
from .support.s3_server import MotoServer, new_bucket, s3_client, s3_env, state_records
from .support.server import Server, start_server, start_servers
from .support.sse import parse_events
from .support.webhook_receiver import Reply, WebhookReceiver
from .test_auth_http import TOKEN_USERS, auth_header
from .test_errors import CHUNKED, chunk_frame, read_response, request_head
from .test_every_endpoint import WAYS, Way
from .test_idempotency import keyed_env
from .test_webhooks import SECRET as WEBHOOK_SECRET
from .test_webhooks import verify

pytestmark = pytest.mark.anyio

WINDOW = "/v1/transcriptions?fromTime=0&toTime=30"
LEASE_SECONDS = 3
"""Short, so a stopped machine's key frees within the test."""
MACHINES = ("m1", "m2")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    running = WebhookReceiver()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def fleet_env(moto: MotoServer, upstream: FakeOpenAI) -> dict[str, str]:
    """Settings every machine shares: the state bucket (no debug copies), users, upstream."""
    bucket = new_bucket(s3_client(moto.url))
    return {
        **s3_env(moto.url, bucket),
        "VRAI_DEBUG_STORE": "off",
        "VRAI_DEBUG_BUCKET": "",
        "VRAI_STATE_BUCKET": bucket,
        "VRAI_STATE_LEASE_SECONDS": str(LEASE_SECONDS),
        "VRAI_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "VRAI_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "VRAI_WEBHOOK_MAX_ATTEMPTS": "20",
        "VRAI_WEBHOOK_BACKOFF_SECONDS": "0.2",
        **keyed_env(upstream),
    }


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, fleet_env: dict[str, str]
) -> Iterator[dict[str, Server]]:
    base = tmp_path_factory.mktemp("fleet")
    servers = start_servers(
        {name: (base / name, {**fleet_env, "FLY_MACHINE_ID": name}) for name in MACHINES}
    )
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream: FakeOpenAI) -> None:
    upstream.reset()


@pytest.fixture(scope="module")
def speech(media: Path) -> bytes:
    return (media / "sentence.wav").read_bytes()


def addresses(servers: dict[str, Server]) -> dict[str, tuple[str, int]]:
    return {name: ("127.0.0.1", httpx.URL(s.url).port or 0) for name, s in servers.items()}


def keyed(user: str, key: str) -> dict[str, str]:
    return {**auth_header(TOKEN_USERS[user]), "Idempotency-Key": key, "Content-Type": "audio/wav"}


def as_user(user: str) -> dict[str, str]:
    return {**auth_header(TOKEN_USERS[user]), "Content-Type": "audio/wav"}


async def post_on(
    proxy: FlyProxy, machine: str, body: Any, headers: dict[str, str], path: str = WINDOW
) -> httpx.Response:
    """POST through the proxy, to `machine`."""
    proxy.route_next(machine)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as client:
        return await client.post(path, content=body, headers=headers)


async def get_on(proxy: FlyProxy, machine: str, path: str, user: str) -> httpx.Response:
    proxy.route_next(machine)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
        return await client.get(path, headers=auth_header(TOKEN_USERS[user]))


def billed(servers: dict[str, Server], request_id: str) -> list[float]:
    """The audio seconds each machine's log bills for `request_id`."""
    return [
        entry["audioSeconds"]
        for server in servers.values()
        for entry in server.request_logs()
        if entry.get("requestId") == request_id and entry.get("audioSeconds")
    ]


@pytest.mark.parametrize("way", WAYS, ids=lambda way: way.name)
async def test_a_key_retried_on_another_machine_gets_the_first_answer_every_way(
    fleet: dict[str, Server], upstream: FakeOpenAI, speech: bytes, way: Way
) -> None:
    """JSON, events, the MP3, both legacy endpoints, OpenAI's plain and `stream=true`: the
    retry on m2 gets m1's answer byte for byte, from one job billed once, and any machine
    answers its id (but for the MP3, which is not kept)."""
    headers = {**way.request_headers("alice"), "Idempotency-Key": f"fleet-{way.name}"}
    body = way.encode(speech)
    async with FlyProxy(addresses(fleet)) as proxy:
        first = await post_on(proxy, "m1", body, headers, way.path)
        assert first.status_code == 200, first.text
        request_id = first.headers["x-request-id"]
        calls = len(upstream.transcription_requests)
        retry = await post_on(proxy, "m2", chunked(body), headers, way.path)
        by_id = await _fetched(proxy, "m2", request_id, "alice")
    assert retry.status_code == 200, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["x-request-id"] == request_id
    assert retry.content == first.content
    assert len(upstream.transcription_requests) == calls, "transcribed again on m2"
    assert len(billed(fleet, request_id)) == 1
    if way.name == "mp3":
        assert by_id.status_code == 404
    elif "text/event-stream" in first.headers["content-type"]:
        assert by_id.status_code == 200, by_id.text
        assert by_id.json() == parse_events(first.text)[-1].data
    else:
        assert by_id.status_code == 200, by_id.text
        assert by_id.content == first.content


async def test_concurrent_claims_on_two_machines_run_one_job(
    fleet: dict[str, Server], upstream: FakeOpenAI, speech: bytes
) -> None:
    answers: dict[str, httpx.Response] = {}

    async def send(proxy: FlyProxy, machine: str) -> None:
        body = chunked(speech, chunk_size=16 * 1024, delay=0.05)  # both are still uploading
        answers[machine] = await post_on(proxy, machine, body, keyed("bob", "double-tap"))

    async with FlyProxy(addresses(fleet)) as proxy, anyio.create_task_group() as group:
        for machine in MACHINES:
            group.start_soon(send, proxy, machine)
            await anyio.sleep(0.01)  # `route_next` names the machine of the next request
    assert [answers[m].status_code for m in MACHINES] == [200, 200], answers
    assert answers["m1"].json() == answers["m2"].json()
    replayed = sorted(answers[m].headers.get("idempotent-replayed", "no") for m in MACHINES)
    assert replayed == ["no", "true"]
    request_id = answers["m1"].json()["requestId"]
    assert len(billed(fleet, request_id)) == 1, "both machines ran the key"
    assert has_words(answers["m2"].json()["transcription"], SENTENCE_WORDS, at_least=3)


async def test_an_answer_is_fetched_by_its_id_from_another_machine(
    fleet: dict[str, Server], speech: bytes
) -> None:
    half = len(speech) // 2
    async with FlyProxy(addresses(fleet)) as proxy:
        proxy.route_next("m1")
        host, port = proxy.url.removeprefix("http://").split(":")
        async with await anyio.connect_tcp(host, int(port)) as stream:
            # A resumable upload: its 104 names the request before the body ends.
            fields = {**as_user("alice"), **CHUNKED, **draft_fields(8, complete=True)}
            await stream.send(request_head(WINDOW, fields) + chunk_frame(speech[:half]))
            interim = await _interim_headers(stream)
            request_id = interim["x-request-id"]
            path = f"/v1/transcriptions/{request_id}"
            while_running = await get_on(proxy, "m2", path, "alice")
            await stream.send(chunk_frame(speech[half:]) + chunk_frame(b""))
            answer = await read_response(stream, within=60)
        assert while_running.status_code == 202, while_running.text
        assert int(while_running.headers["retry-after"]) >= 1
        assert answer.status == 200, answer.body
        assert answer.json()["requestId"] == request_id

        fetched = await _fetched(proxy, "m2", request_id, "alice")
        assert fetched.status_code == 200, fetched.text
        assert fetched.json() == answer.json()
        assert fetched.headers["content-type"].startswith("application/json")

        other_user = await get_on(proxy, "m2", path, "bob")
        unknown = await get_on(proxy, "m2", "/v1/transcriptions/0123456789abcdef", "alice")
    for missing in (other_user, unknown):
        assert missing.status_code == 404
        assert missing.json()["code"] == "not_found"


async def test_a_machine_stopped_mid_job_frees_its_key_after_the_lease(
    tmp_path: Path,
    fleet: dict[str, Server],
    fleet_env: dict[str, str],
    moto: MotoServer,
    upstream: FakeOpenAI,
    speech: bytes,
) -> None:
    doomed = start_server(tmp_path / "m3", {**fleet_env, "FLY_MACHINE_ID": "m3"})
    bucket = s3_client(moto.url)
    claims_before = _claims(bucket, fleet_env)
    headers = keyed("alice", "machine-died")
    try:
        async with FlyProxy({**addresses(fleet), **addresses({"m3": doomed})}) as proxy:
            async with anyio.create_task_group() as group:

                async def slow_upload() -> None:
                    body = chunked(speech, chunk_size=8 * 1024, delay=0.5)
                    try:
                        cut = await post_on(proxy, "m3", body, headers)
                    except httpx.HTTPError:
                        return
                    assert cut.status_code == 502, cut.text  # the proxy lost the machine

                group.start_soon(slow_upload)
                with anyio.fail_after(10):
                    while True:  # until m3 has claimed the key, mid-body
                        if _claims(bucket, fleet_env) != claims_before:
                            break
                        await anyio.sleep(0.05)
                doomed.process.kill()  # the machine is gone: no goodbye, nothing settled
                group.cancel_scope.cancel()  # its client gives up on it at once
            calls = len(upstream.transcription_requests)
            # At once, m3's lease still holds the key: the retry is told to come back.
            held = await post_on(proxy, "m1", speech, headers)
            assert held.status_code == 409, held.text
            assert held.json()["code"] == "idempotency_key_in_use"
            assert 1 <= int(held.headers["retry-after"]) <= LEASE_SECONDS + 1
            await anyio.sleep(LEASE_SECONDS)
            retried = await post_on(proxy, "m2", speech, headers)
    finally:
        doomed.stop()
    assert retried.status_code == 200, retried.text
    assert "idempotent-replayed" not in retried.headers
    assert has_words(retried.json()["transcription"], SENTENCE_WORDS, at_least=3)
    assert len(upstream.transcription_requests) > calls
    assert len(billed(fleet, retried.json()["requestId"])) == 1
    assert not [e for e in doomed.request_logs() if e.get("audioSeconds")], "m3 billed too"


async def test_a_webhook_cut_short_by_its_machine_stopping_is_sent_by_another(
    tmp_path: Path,
    fleet: dict[str, Server],
    fleet_env: dict[str, str],
    receiver: WebhookReceiver,
    speech: bytes,
) -> None:
    path = "/hooks/machine-died"
    receiver.script(path, *[Reply(500)] * 100)  # down, for as long as m3 lives
    doomed = start_server(tmp_path / "m3", {**fleet_env, "FLY_MACHINE_ID": "m3"})
    try:
        async with FlyProxy({**addresses(fleet), **addresses({"m3": doomed})}) as proxy:
            proxy.route_next("m3")
            async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as client:
                answer = await client.post(
                    WINDOW,
                    params={"callbackUrl": f"{receiver.url}{path}"},
                    content=speech,
                    headers=as_user("alice"),
                )
        assert answer.status_code == 200, answer.text
        first = receiver.wait_for(path, 1)[0]
        doomed.process.kill()  # mid-retries: the webhook has not landed
    finally:
        doomed.stop()
    stopped_at = time.time()
    receiver.script(path)  # the receiver is back
    with anyio.fail_after(4 * LEASE_SECONDS + 5):
        while True:  # until another machine takes it up and delivers it
            later = [r for r in receiver.received(path) if r.at > stopped_at]
            if later:
                break
            await anyio.sleep(0.1)
    delivered = later[0]
    assert delivered.headers["webhook-id"] == first.headers["webhook-id"]
    assert delivered.body == first.body
    verify(WEBHOOK_SECRET, delivered.headers, delivered.body)
    assert json.loads(delivered.body)["data"]["requestId"] == answer.json()["requestId"]
    taken_up = [
        line
        for server in fleet.values()
        for line in server.logs()
        if line.get("message") == "webhook taken up from a machine that stopped"
    ]
    assert taken_up, "no machine took the webhook up"


def _claims(bucket: Any, fleet_env: dict[str, str]) -> set[str]:
    records = state_records(bucket, fleet_env["VRAI_STATE_BUCKET"])
    return {key for key in records if key.startswith("state/keys/")}


async def _interim_headers(stream: anyio.abc.SocketStream) -> dict[str, str]:
    """The headers of the first interim response on a raw connection."""
    buffer = b""
    with anyio.fail_after(10):
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive()
    head, _, rest = buffer.partition(b"\r\n\r\n")
    assert not rest, "only the interim response comes before the body ends"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    assert status_line.split()[1] == "104", status_line
    return {
        name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)
    }


async def _fetched(proxy: FlyProxy, machine: str, request_id: str, user: str) -> httpx.Response:
    """GET by id until the job's machine has left its answer (a `202` says it is on its way)."""
    with anyio.fail_after(10):
        while True:
            reply = await get_on(proxy, machine, f"/v1/transcriptions/{request_id}", user)
            if reply.status_code != 202:
                return reply
            await anyio.sleep(0.2)


@pytest.mark.parametrize(
    ("env", "bucket"),
    [
        ({"VRAI_STATE_BUCKET": "state-here", "VRAI_DEBUG_BUCKET": "copies"}, "state-here"),
        ({"VRAI_DEBUG_BUCKET": "copies"}, "copies"),
        ({"BUCKET_NAME": "fly-tigris"}, "fly-tigris"),
        ({"VRAI_DEBUG_STORE": "dir"}, None),
    ],
)
def test_the_state_bucket_falls_back_to_the_debug_copies_bucket(
    env: dict[str, str], bucket: str | None
) -> None:
    settings = Settings.from_env(env)
    state = create_shared_state(settings, LazyS3Client(settings.debug_s3_timeout_seconds))
    assert (state.bucket.bucket if state else None) == bucket
