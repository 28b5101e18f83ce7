"""The connections webhooks go out on: only to addresses the host policy allows, checked
when connecting.

A URL vetted when its request came may resolve elsewhere by the time its webhook is sent
(DNS rebinding: a short TTL, then 127.0.0.1).  So the network backend of the webhooks' HTTP
client resolves the name itself, vets every address, and connects to an allowed one by its
address; TLS still checks the certificate against, and sends SNI for, the URL's host name.
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio
import httpcore

from vrai_stream import errors
from vrai_stream.webhooks.destinations import HostPolicy


class AddressRefused(httpcore.ConnectError):
    """The host's addresses are not allowed now: nothing was connected to."""


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """anyio's network backend, connecting only where `policy` allows."""

    def __init__(self, policy: HostPolicy) -> None:
        self._policy = policy
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await self._policy.addresses(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
        except errors.CallbackNotAllowed as exc:
            raise AddressRefused(exc.message) from None
        failure: Exception | None = None
        for address in addresses:
            try:
                with anyio.fail_after(timeout):
                    return await self._backend.connect_tcp(
                        str(address),
                        port,
                        timeout=timeout,
                        local_address=local_address,
                        socket_options=socket_options,
                    )
            except TimeoutError:
                failure = httpcore.ConnectTimeout(f"connecting to {address} timed out")
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None, "a refusal comes before an empty list of addresses"
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("webhooks go over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)
