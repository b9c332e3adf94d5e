"""Fetching Segmind's output files without letting a crafted URL reach anything it should not.

Output URLs come from Segmind's answer, so they are untrusted: they are fetched over http(s) only, never
with the API key, never from a loopback, link-local, private or otherwise non-public address unless the
configured Segmind base URL is itself such an address (a local stand-in, a proxy on the LAN), and each
redirect hop is checked the same way. The address is checked after resolution and the connection is
pinned to it, so a name that resolves differently a second later (DNS rebinding) cannot slip through.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin

import aiohttp
from yarl import URL

from services.images import ImageBytes
from services.segmind.budget import Priority
from services.segmind.inflight import InFlightGate

MAX_REDIRECTS = 5
ALLOWED_SCHEMES = ("http", "https")
CHUNK_BYTES = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutputRefused(Exception):
    """An output URL that must not be fetched, or an answer that is not the file."""


class RetryableOutput(Exception):
    """A failure worth another try: a dropped connection, a timeout, a 5xx."""


def _slot(in_flight: InFlightGate | None) -> contextlib.AbstractAsyncContextManager[None]:
    # Only the request itself holds a slot: the address is resolved (on a thread) before it.
    return contextlib.nullcontext() if in_flight is None else in_flight.slot(Priority.IMAGES)


def address_class(address: IPAddress) -> str | None:
    """The kind of non-public address this is, or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # Order matters: link-local and loopback addresses also count as "private" to ipaddress.
    for name, test in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved or not address.is_global),
    ):
        if test:
            return name
    return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise RetryableOutput(f"cannot resolve {host}: {error}") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


@dataclass
class OutputPolicy:
    """Which non-public address kinds outputs may come from: only the kind Segmind's own base URL has."""

    base_url: str
    _allowed: frozenset[str] | None = None

    async def allowed(self) -> frozenset[str]:
        if self._allowed is None:
            base = URL(self.base_url)
            try:
                addresses = await resolve(base.host or "", base.port or 443)
            except RetryableOutput:
                return frozenset()  # not cached: the base may resolve on the next try
            self._allowed = frozenset(kind for a in addresses if (kind := address_class(a)) is not None)
        return self._allowed

    async def pinned_address(self, url: URL) -> IPAddress:
        """The address to connect to for `url`; OutputRefused if the URL or all its addresses are off limits."""
        if url.scheme not in ALLOWED_SCHEMES or not url.host:
            raise OutputRefused(f"not an http(s) URL ({url.scheme or 'no'} scheme)")
        allowed = await self.allowed()
        addresses = await resolve(url.host, url.port or 443)
        for address in addresses:
            kind = address_class(address)
            if kind is None or kind in allowed:
                return address
        kinds = sorted({address_class(a) or "public" for a in addresses})
        raise OutputRefused(f"{url.host} is a {'/'.join(kinds)} address")


async def fetch_output(
    session: aiohttp.ClientSession,
    policy: OutputPolicy,
    url: str,
    *,
    max_bytes: int,
    timeout: float,
    in_flight: InFlightGate | None = None,
) -> ImageBytes:
    """Downloads one output file, following at most MAX_REDIRECTS redirects, each checked by `policy`."""
    target = URL(url)
    deadline = time.monotonic() + timeout
    for _hop in range(MAX_REDIRECTS + 1):
        address = await policy.pinned_address(target)
        remaining = max(0.1, deadline - time.monotonic())
        try:
            async with (
                _slot(in_flight),
                session.get(
                    target.with_host(str(address)),
                    headers={"Host": _host_header(target)},
                    server_hostname=target.host if target.scheme == "https" else None,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=remaining),
                ) as response,
            ):
                if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    target = URL(urljoin(str(target), response.headers["Location"]))
                    continue
                if response.status >= 500:
                    raise RetryableOutput(f"HTTP {response.status}")
                if response.status != 200:
                    raise OutputRefused(f"HTTP {response.status}")
                return await _read_capped(response, max_bytes)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise RetryableOutput(type(error).__name__) from error
    raise OutputRefused(f"more than {MAX_REDIRECTS} redirects")


def _host_header(url: URL) -> str:
    host = url.raw_host or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{url.explicit_port}" if url.explicit_port else host


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> ImageBytes:
    too_big = OutputRefused(f"larger than {max_bytes} bytes")
    if (response.content_length or 0) > max_bytes:
        raise too_big
    data = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        data.extend(chunk)
        if len(data) > max_bytes:
            raise too_big
    # ImageBytes, so that the check of the picture is remembered until its upload (services.images).
    return ImageBytes(data)
