"""Output URLs are untrusted: which addresses they may reach, and that redirects are checked hop by hop."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from services.outputs import OutputPolicy, OutputRefused, address_class, fetch_output


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("fd00::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "reserved"),  # carrier-grade NAT: not global
        ("93.184.216.34", None),
        ("2606:2800:220:1::248", None),
    ],
)
def test_address_classes(address: str, kind: str | None) -> None:
    assert address_class(ipaddress.ip_address(address)) == kind


async def test_a_public_segmind_allows_only_public_outputs() -> None:
    policy = OutputPolicy("https://93.184.216.34")
    assert str(await policy.pinned_address(URL("https://93.184.216.34/out/1.jpeg"))) == "93.184.216.34"
    for url in ("http://127.0.0.1/x", "http://169.254.169.254/", "http://10.0.0.1/", "http://localhost/"):
        with pytest.raises(OutputRefused):
            await policy.pinned_address(URL(url))


async def test_a_local_segmind_allows_its_own_kind_of_address_only() -> None:
    policy = OutputPolicy("http://127.0.0.1:8700")
    assert str(await policy.pinned_address(URL("http://127.0.0.1:9/x"))) == "127.0.0.1"
    with pytest.raises(OutputRefused, match="link-local"):
        await policy.pinned_address(URL("http://169.254.169.254/latest/meta-data/"))
    with pytest.raises(OutputRefused, match="private"):
        await policy.pinned_address(URL("http://192.168.1.1/"))


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:6379/_INFO"])
async def test_only_http_and_https_outputs_are_fetched(url: str) -> None:
    with pytest.raises(OutputRefused, match="not an http"):
        await OutputPolicy("http://127.0.0.1").pinned_address(URL(url))


@pytest.fixture
async def redirector() -> AsyncIterator[str]:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(request.query.get("to", "/"))

    app = web.Application()
    app.router.add_get("/", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    await runner.cleanup()


async def test_a_redirect_to_a_forbidden_address_is_refused_before_connecting(redirector: str) -> None:
    policy = OutputPolicy(redirector)
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(OutputRefused, match="link-local"):
            await fetch_output(
                session,
                policy,
                f"{redirector}?to=http://169.254.169.254/latest/meta-data/",
                max_bytes=1024,
                timeout=30,
            )
    assert time.monotonic() - started < 2.0


async def test_redirect_loops_end(redirector: str) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(OutputRefused, match="redirects"):
            await fetch_output(session, OutputPolicy(redirector), redirector, max_bytes=1024, timeout=30)
