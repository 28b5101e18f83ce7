"""Where a webhook may go: the hosts the operator allows, and never into a private network.

`VRAI_WEBHOOK_ALLOWED_HOSTS` lists hosts exactly (`hooks.example.com`, `10.0.0.7`), by suffix
(`*.example.com`: its subdomains, not itself), or `*` (any host).  A host matched only by a
pattern must be public: every address it resolves to global (no loopback, private,
link-local such as the metadata address 169.254.169.254, unique-local such as Fly's private
network fdaa::/16, shared, reserved or multicast ones, nor IPv4 hidden in an IPv6 address),
and it must not be one of Fly's private names (`.internal`, `.flycast`).  A host listed
exactly is taken as the operator named it, wherever it points: that is how a backend on a
private network is reached, on purpose.

Addresses are checked when the request names the URL, before its body is read, and again
each time a delivery connects (`network`), on the addresses the name resolves to then: a
name that points elsewhere by then (DNS rebinding) is caught there.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import anyio
import httpx

from vrai_stream import errors

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PRIVATE_SUFFIXES = (".internal", ".flycast")
"""Fly's private names: `<app>.internal` (6PN addresses), `<app>.flycast` (private proxy)."""
MAX_URL_LENGTH = 2048
_EMBEDDING_IPV4 = (
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64: the IPv4 address in the last 32 bits
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated), and :: and ::1 themselves
)


@dataclass(frozen=True)
class Destination:
    """A vetted callback URL."""

    url: httpx.URL
    host: str
    """Lower case, IDNA-encoded, no trailing dot; an IP address in its one spelling."""
    listed: bool
    """Listed exactly by the operator: its addresses are not checked."""

    @property
    def port(self) -> int:
        return self.url.port or (443 if self.url.scheme == "https" else 80)

    @property
    def origin(self) -> str:
        """Scheme, host and port: what a log line may show (the path and query may carry the
        receiver's own token)."""
        return f"{self.url.scheme}://{self.url.netloc.decode('ascii')}"


def is_public(address: IPAddress) -> bool:
    """A global unicast address, and so is any IPv4 address it carries (`::ffff:127.0.0.1`
    is loopback)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        for network in _EMBEDDING_IPV4:
            if embedded is None and address in network:
                embedded = ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
        if embedded is not None:
            return is_public(embedded)
    return address.is_global and not address.is_multicast


class HostPolicy:
    """`VRAI_WEBHOOK_ALLOWED_HOSTS`, applied to a URL and to the addresses it resolves to."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self._exact = frozenset(pattern for pattern in patterns if "*" not in pattern)
        self._suffixes = tuple(pattern[1:] for pattern in patterns if pattern.startswith("*."))
        self._any = "*" in patterns

    def destination(self, text: str) -> Destination:
        """The URL's destination if its form and host are allowed (no name is resolved)."""
        if len(text) > MAX_URL_LENGTH:
            raise _refused(f"callbackUrl must be at most {MAX_URL_LENGTH} characters")
        try:
            url = httpx.URL(text)
            port = url.port
        except (httpx.InvalidURL, ValueError):
            raise _refused("callbackUrl is not a URL") from None
        if url.scheme not in ("http", "https"):
            raise _refused("callbackUrl must be an http or https URL")
        if url.userinfo:
            raise _refused("callbackUrl must not carry a user name or password")
        if port is not None and not 0 < port < 65536:
            raise _refused("callbackUrl's port must be from 1 to 65535")
        host = _host(url)
        if self.listed(host):
            return Destination(url, host, listed=True)
        if not self._matches(host):
            raise _refused(
                f"callbackUrl's host {host[:100]!r} is not one this server sends webhooks to "
                "(VRAI_WEBHOOK_ALLOWED_HOSTS)"
            )
        if host.endswith(PRIVATE_SUFFIXES):
            raise _refused(f"callbackUrl's host {host[:100]!r} is a private name")
        address = _literal(host)
        if address is not None and not is_public(address):
            raise _refused(f"callbackUrl's address {host} is not a public one")
        return Destination(url, host, listed=False)

    def listed(self, host: str) -> bool:
        return host in self._exact

    async def vet(self, text: str) -> Destination:
        """The destination, once every address its host resolves to now is allowed."""
        destination = self.destination(text)
        if not destination.listed:
            await self.addresses(destination.host, destination.port)
        return destination

    async def addresses(self, host: str, port: int) -> list[IPAddress]:
        """Where `host` may be reached now: all it resolves to, each allowed, or a refusal
        (a name that resolves to one private address among public ones is refused whole).
        The caller bounds the time a resolver may take."""
        host = canonical_host(host)
        if not self.listed(host) and not self._matches(host):
            raise _refused(f"callbackUrl's host {host[:100]!r} is no longer allowed")
        literal = _literal(host)
        if literal is not None:
            found = [literal]
        else:
            try:
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                raise _refused(f"callbackUrl's host {host[:100]!r} does not resolve") from None
            found = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
        if not found:
            raise _refused(f"callbackUrl's host {host[:100]!r} has no address")
        if not self.listed(host):
            for address in found:
                if not is_public(address):
                    raise _refused(
                        f"callbackUrl's host {host[:100]!r} resolves to {address}, "
                        "which is not a public address"
                    )
        return found

    def _matches(self, host: str) -> bool:
        """Allowed by a pattern: `*`, or a `*.suffix` the host is a subdomain of."""
        return self._any or any(host.endswith(suffix) for suffix in self._suffixes)


def canonical_host(host: str) -> str:
    """One spelling of a host, as the allow-list is written: lower case, no trailing dot, an
    IP address as `ipaddress` writes it."""
    host = host.lower().removesuffix(".")
    address = _literal(host)
    return host if address is None else str(address)


def _host(url: httpx.URL) -> str:
    """The URL's host in one spelling; refused if it is an IPv4 address in another (decimal,
    hex, octal or short forms such as `2130706433`, `0x7f000001`, `127.1`), which resolvers
    read as an address but no allow-list entry can name."""
    host = canonical_host(url.raw_host.decode("ascii"))
    if not host:
        raise _refused("callbackUrl has no host")
    if _literal(host) is not None:
        return host
    try:
        socket.inet_aton(host)
    except OSError:
        return host
    raise _refused("callbackUrl's host is an IPv4 address in an unusual form: write a.b.c.d")


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _refused(message: str) -> errors.CallbackNotAllowed:
    return errors.CallbackNotAllowed(message)
