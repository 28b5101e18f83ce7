"""The webhooks service: vets a request's `callbackUrl`, and delivers its answer there in the
background, retried, so a backend learns how every accepted request ended.

Delivery is at least once: each attempt is one POST under the same `webhook-id`
(`msg_<requestId>`, which a receiver can deduplicate on), signed anew with the attempt's
time; a 2xx ends it, anything else (a connection error, a timeout, any other status, a
redirect, which is never followed) is retried after an exponential backoff with jitter,
until `VRAI_WEBHOOK_MAX_ATTEMPTS` are spent (a `410 Gone` ends it at once, as the standard
asks).  Deliveries run in the lifespan's task group, so they outlive their requests; at
shutdown the drain waits for them, bounded.  With an outbox (`outbox`: the shared bucket),
each webhook on its way is kept there until it lands, and one whose machine stopped first
is taken up by another machine; without one, those the drain cuts short are logged lost.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from typing import Any

import anyio
import anyio.abc
import httpcore
import httpx

from vrai_stream import errors, metrics
from vrai_stream.background import BackgroundWork
from vrai_stream.settings import Settings
from vrai_stream.webhooks.destinations import Destination, HostPolicy
from vrai_stream.webhooks.network import AddressRefused, GuardedBackend
from vrai_stream.webhooks.outbox import Outbox, Parcel
from vrai_stream.webhooks.payload import Answered, Event, event_for
from vrai_stream.webhooks.signing import signed_headers, signing_key

logger = logging.getLogger("vrai_stream.webhooks")

MAX_DELAY_SECONDS = 60.0
"""The longest wait between two attempts, whatever the backoff or a `Retry-After` says."""
MAX_PENDING = 1000
"""Deliveries held at once (each holds its body, at most a few hundred kB): beyond it, new
ones are dropped and logged, so a receiver that is down cannot grow memory without bound."""
USER_AGENT = "vrai-stream-webhooks/1"
_JITTER = secrets.SystemRandom()


class Webhooks:
    """Vets callback URLs, and sends each finished answer to its URL in the background."""

    def __init__(self, settings: Settings, outbox: Outbox[Any] | None = None) -> None:
        self._outbox = outbox
        secret = settings.webhook_secret
        self._key = None if secret is None else signing_key(secret)
        self._policy = HostPolicy(settings.webhook_allowed_hosts)
        self._max_attempts = settings.webhook_max_attempts
        self._timeout = settings.webhook_timeout_seconds
        self._backoff = settings.webhook_backoff_seconds
        self._pool: httpcore.AsyncConnectionPool | None = None
        if self._key is not None:
            self._pool = httpcore.AsyncConnectionPool(
                ssl_context=httpx.create_ssl_context(),
                network_backend=GuardedBackend(self._policy),
                max_connections=32,
                keepalive_expiry=30.0,
                retries=0,  # attempts are counted, logged and spaced out here
            )
        self._work = BackgroundWork()

    async def vet(self, url: str) -> Destination:
        """The callback's destination, or `CallbackNotAllowed` (before any body is read)."""
        if self._key is None:
            raise errors.CallbackNotAllowed(
                "This server sends no webhooks (no VRAI_WEBHOOK_SECRET is configured): "
                "callbackUrl cannot be taken"
            )
        try:
            with anyio.fail_after(self._timeout):
                return await self._policy.vet(url)
        except TimeoutError:
            raise errors.CallbackNotAllowed("callbackUrl's host did not resolve in time") from None

    def start(self, background: anyio.abc.TaskGroup) -> None:
        """Deliver in `background`, which outlives requests; take up other machines' orphans."""
        self._work.start(background)
        if self._outbox is not None and self._key is not None:
            background.start_soon(self._take_up_orphans, self._outbox)

    def send(
        self, destination: Destination, request_id: str, status: int, answer: Answered | None
    ) -> None:
        """Deliver the request's answer (None: it had none) in the background.  Never raises:
        the answer it tells of is already over."""
        try:
            event = event_for(request_id, status, answer)
            if self._work.stopping:
                self._count_lost("abandoned", "the server is stopping", request_id)
                return
            if self._work.pending >= MAX_PENDING:
                self._count_lost("dropped", "too many webhooks pending", request_id)
                return
            parcel = Parcel(request_id, str(destination.url), event)
            self._work.spawn(functools.partial(self._tracked, destination, parcel, None))
        except Exception as exc:  # a bug: it must not break the answer's settling
            logger.error("webhook not sent", exc_info=exc, extra={"requestId": request_id})

    async def wait_idle(self) -> None:
        """Until no delivery is pending (the drain bounds the wait)."""
        await self._work.wait_idle()

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()

    async def _tracked(self, destination: Destination, parcel: Parcel, held: Any) -> None:
        """Deliver the parcel, kept in the outbox (if any) until it lands or is given up."""
        outbox = self._outbox
        if held is None and outbox is not None:
            held = await outbox.keep(parcel)
        try:
            await self._deliver(destination, parcel.request_id, parcel.event)
        except anyio.get_cancelled_exc_class():
            if held is None:
                self._count_lost("abandoned", "the server stopped first", parcel.request_id)
            else:
                logger.warning(
                    "webhook left for another machine: the server stopped first",
                    extra={"requestId": parcel.request_id},
                )
            raise
        if held is not None and outbox is not None:
            await outbox.release(held)

    async def _take_up_orphans(self, outbox: Outbox[Any]) -> None:
        """Deliver the webhooks whose machine stopped before they landed, now and then."""
        while True:
            await anyio.sleep(outbox.look_every_seconds)
            if self._work.pending >= MAX_PENDING:
                continue
            try:
                await self._take_up(outbox)
            except Exception as exc:  # a bug: it must not stop the server, nor the next look
                logger.error("webhooks left by other machines not taken up", exc_info=exc)

    async def _take_up(self, outbox: Outbox[Any]) -> None:
        for held, parcel in await outbox.orphans():
            try:
                destination = self._policy.destination(parcel.url)
            except errors.CallbackNotAllowed:
                logger.error(
                    "webhook dropped: its host is no longer allowed",
                    extra={"requestId": parcel.request_id},
                )
                await outbox.release(held)
                continue
            logger.info(
                "webhook taken up from a machine that stopped",
                extra={"requestId": parcel.request_id, "destination": destination.origin},
            )
            self._work.spawn(functools.partial(self._tracked, destination, parcel, held))

    async def _deliver(self, destination: Destination, request_id: str, event: Event) -> None:
        message_id = f"msg_{request_id}"
        fields = {"requestId": request_id, "webhookId": message_id, "type": event.type}
        for attempt in range(1, self._max_attempts + 1):
            result, retry_after = await self._attempt(destination, message_id, event)
            if result == "2xx":
                logger.info(
                    "webhook delivered",
                    extra={**fields, "attempts": attempt, "destination": destination.origin},
                )
                metrics.WEBHOOKS.labels(outcome="delivered").inc()
                return
            logger.warning(
                "webhook attempt failed",
                extra={
                    **fields,
                    "attempt": attempt,
                    "maxAttempts": self._max_attempts,
                    "result": result,
                    "destination": destination.origin,
                },
            )
            if result == "410" or attempt == self._max_attempts:
                break
            await anyio.sleep(self._delay(attempt, retry_after))
        logger.error("webhook given up", extra={**fields, "destination": destination.origin})
        metrics.WEBHOOKS.labels(outcome="given_up").inc()

    async def _attempt(
        self, destination: Destination, message_id: str, event: Event
    ) -> tuple[str, float | None]:
        """One POST: its result (a status, `timeout`, `error`, `refused`) and the receiver's
        `Retry-After` in seconds, if it gave one."""
        assert self._key is not None and self._pool is not None, "vet() let no callback in"
        url = destination.url
        headers = {
            "Host": url.netloc.decode("ascii"),
            "Content-Type": "application/json",
            "Content-Length": str(len(event.body)),
            "User-Agent": USER_AGENT,
            **signed_headers(self._key, message_id, int(time.time()), event.body),
        }
        timeouts = dict.fromkeys(("connect", "read", "write", "pool"), self._timeout)
        retry_after: float | None = None
        try:
            with anyio.fail_after(self._timeout):
                async with self._pool.stream(
                    "POST",
                    httpcore.URL(
                        scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
                    ),
                    headers=list(headers.items()),
                    content=event.body,
                    extensions={"timeout": timeouts},
                ) as response:  # its body is not read: the status is the answer
                    status = response.status
                    retry_after = _retry_after(response.headers)
            result = "2xx" if 200 <= status < 300 else "410" if status == 410 else str(status)
        except (TimeoutError, httpcore.TimeoutException):
            result = "timeout"
        except AddressRefused:
            result = "refused"
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol):
            result = "error"
        except OSError:
            result = "error"
        label = result if result in ("2xx", "timeout", "refused", "error") else f"{result[0]}xx"
        metrics.WEBHOOK_ATTEMPTS.labels(result=label).inc()
        return result, retry_after

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (half to all of it), or the receiver's
        `Retry-After` if longer; never over `MAX_DELAY_SECONDS`."""
        backoff = min(MAX_DELAY_SECONDS, self._backoff * 2 ** (attempt - 1))
        delay = _JITTER.uniform(backoff / 2, backoff)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, MAX_DELAY_SECONDS)

    def _count_lost(self, outcome: str, why: str, request_id: str) -> None:
        logger.error(f"webhook not delivered: {why}", extra={"requestId": request_id})
        metrics.WEBHOOKS.labels(outcome=outcome).inc()


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    """A `Retry-After` in seconds (its date form is not read)."""
    for name, value in headers:
        if name.lower() == b"retry-after" and value.strip().isdigit():
            return float(value.strip())
    return None
