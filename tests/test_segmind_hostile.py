"""The Segmind client against a hostile Segmind (and a second, evil server), over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web

from devtools.fakes.segmind.server import SegmindServer, SegmindServerSettings
from services.request import GenerationRequest
from services.segmind import (
    BudgetExhausted,
    DurationModel,
    Forbidden,
    JobFailed,
    RateLimited,
    RequestBudget,
    RetryPolicy,
    SegmindClient,
    SegmindState,
    ServerError,
    SubmittedJob,
    Unauthorized,
    UnexpectedResponse,
    parse_reset_at,
    same_origin,
)

API_KEY = "sg_hostile_key_7e3a90c1d2"
ATTEMPTS = 5


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class EvilServer:
    """Another origin that records whatever reaches it, and answers like a Segmind would."""

    base_url: str = ""
    requests: list[Seen] = field(default_factory=list)

    def keys_received(self) -> list[str]:
        return [seen.headers["x-api-key"] for seen in self.requests if "x-api-key" in seen.headers]


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def answering(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@pytest.fixture
async def evil() -> AsyncIterator[EvilServer]:
    recorder = EvilServer()

    async def record(request: web.Request) -> web.Response:
        recorder.requests.append(Seen(request.method, request.path, dict(request.headers)))
        return web.json_response({"request_id": "evil", "status": "COMPLETED", "output": "http://evil/x"})

    async with serve(answering(record)) as base_url:
        recorder.base_url = base_url
        yield recorder


@pytest.fixture
async def server() -> AsyncIterator[SegmindServer]:
    server = SegmindServer(
        SegmindServerSettings(
            api_keys=frozenset({API_KEY}), queue_seconds=0.1, seconds_per_step=0.005, workers=4
        )
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(autouse=True)
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def make_client(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    api_key: str = API_KEY,
    budget: RequestBudget | None = None,
) -> SegmindClient:
    return SegmindClient(
        session,
        api_key=api_key,
        base_url=base_url,
        budget=budget or RequestBudget(600),
        deadline=20.0,
        retry=RetryPolicy(attempts=ATTEMPTS, base_delay=0.02, max_delay=0.05),
        durations=DurationModel(seconds_per_unit=0.005, queue_seconds=0.1),
        request_timeout=5.0,
    )


async def completes(client: SegmindClient, job: SubmittedJob) -> None:
    events = [event async for event in client.wait(job)]
    assert events[-1].state is SegmindState.COMPLETED
    assert events[-1].result is not None and events[-1].result.outputs


def assert_key_absent(*texts: str) -> None:
    for text in texts:
        assert API_KEY not in text
        assert API_KEY[:8] not in text  # not even a part of it, cut at some length limit


# ---- the key goes only to the base URL's origin --------------------------------------------------


async def test_foreign_status_and_response_urls_are_never_called(
    server: SegmindServer,
    evil: EvilServer,
    session: aiohttp.ClientSession,
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    server.inject("foreign_urls", target="submit", origin=evil.base_url)
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="a lighthouse", img_width=512, img_height=512))
    assert job.status_url == f"{server.base_url}/v2/requests/{job.request_id}/status"
    assert job.response_url == f"{server.base_url}/v2/requests/{job.request_id}"
    await completes(client, job)
    assert evil.requests == []
    assert server.stats.requests_to("result")[-1].status == 200
    warnings = [r.getMessage() for r in debug_logs.records if r.levelno == logging.WARNING]
    assert any(job.request_id in message for message in warnings)
    assert_key_absent(debug_logs.text)


@pytest.mark.parametrize("early_results", [True, False])
async def test_a_job_handle_with_foreign_urls_is_polled_on_the_base_url(
    server: SegmindServer, evil: EvilServer, session: aiohttp.ClientSession, early_results: bool
) -> None:
    client = make_client(session, server.base_url)
    client.early_results = early_results  # off: every check at the status URL
    request = GenerationRequest(prompt="a fox", img_width=512, img_height=512)
    submitted = await client.submit(request)
    handle = SubmittedJob(
        request_id=submitted.request_id,
        status_url=f"{evil.base_url}/v2/requests/{submitted.request_id}/status",
        # Same host, another port: another origin.
        response_url=evil.base_url + "/v2/requests/" + submitted.request_id,
        request=submitted.request,
    )
    await completes(client, handle)
    assert evil.requests == []
    assert early_results or server.stats.requests_to("status")


async def test_a_redirect_to_another_origin_is_never_followed_and_the_get_is_retried(
    server: SegmindServer, evil: EvilServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    client.early_results = False  # every check at the status URL, where the first redirects wait
    job = await client.submit(GenerationRequest(prompt="a boat", img_width=512, img_height=512))
    # A same-origin hop first (followed by the client itself), then a hop to the evil origin.
    server.inject("redirect", target="status", location=job.status_url)
    server.inject("redirect", target="status", location=f"{evil.base_url}/steal")
    server.inject("redirect", target="result", location=f"{evil.base_url}/steal")
    await completes(client, job)
    assert evil.requests == []
    assert [r.status for r in server.stats.requests_to("status")][:3] == [307, 307, 200]
    assert [r.status for r in server.stats.requests_to("result")] == [307, 200]


async def test_a_submit_redirected_to_another_origin_is_not_followed(
    server: SegmindServer, evil: EvilServer, session: aiohttp.ClientSession
) -> None:
    server.inject("redirect", target="submit", location=f"{evil.base_url}/v2/sdxl1.0-dreamshaper")
    with pytest.raises(UnexpectedResponse):
        await make_client(session, server.base_url).submit(GenerationRequest(prompt="x"))
    assert evil.requests == []
    assert len(server.stats.requests_to("submit")) == 1


async def test_same_origin_redirects_are_followed_a_bounded_number_of_hops(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="a loop", img_width=512, img_height=512))
    # Three hops per attempt are followed; a fourth redirect ends the attempt and is retried like a 5xx.
    server.inject("redirect", target="status", count=12, location=job.status_url)
    assert await client.status(job) in (SegmindState.QUEUED, SegmindState.PROCESSING, SegmindState.COMPLETED)
    assert len(server.stats.requests_to("status")) == 13

    server.stats.reset()
    server.inject("redirect", target="status", count=100, location=job.status_url)
    with pytest.raises(UnexpectedResponse):
        await client.status(job)
    assert len(server.stats.requests_to("status")) == ATTEMPTS * 4
    server.clear_faults()


def test_same_origin_normalises_case_and_default_ports() -> None:
    base = "https://api.segmind.com"
    assert same_origin("https://API.Segmind.com/v2/requests/x", base)
    assert same_origin("https://api.segmind.com:443/v2/requests/x", base)
    assert same_origin("HTTPS://api.segmind.com/x", base)
    assert same_origin("http://127.0.0.1:80/x", "http://127.0.0.1")
    for other in (
        "http://api.segmind.com/x",  # another scheme
        "https://api.segmind.com:8443/x",  # another port
        "https://api.segmind.com.evil.example/x",
        "https://api.segmind.com@evil.example/x",  # user info: the host is evil.example
        "https://evil.example/?https://api.segmind.com",
        "/v2/requests/x",  # not absolute
        "ftp://api.segmind.com/x",
        "",
    ):
        assert not same_origin(other, base), other


# ---- the key is scrubbed from every text that comes back ------------------------------------------


@pytest.mark.parametrize("target", ["status", "result"])
async def test_the_key_is_scrubbed_from_failed_texts(
    server: SegmindServer, session: aiohttp.ClientSession, debug_logs: pytest.LogCaptureFixture, target: str
) -> None:
    client = make_client(session, server.base_url)
    # The job is checked at its result URL once it has likely ended, at its status URL only without that.
    client.early_results = target == "result"
    job = await client.submit(GenerationRequest(prompt="a cat", img_width=512, img_height=512))
    server.inject("echo_key", target=target)  # type: ignore[arg-type]
    with pytest.raises(JobFailed) as caught:
        await completes(client, job)
    failed = caught.value
    assert "***" in failed.error and "credentials" in failed.error
    assert_key_absent(failed.error, failed.message, str(failed), repr(failed), debug_logs.text)


async def test_the_key_is_scrubbed_from_unknown_status_texts_and_retry_logs(
    server: SegmindServer, session: aiohttp.ClientSession, debug_logs: pytest.LogCaptureFixture
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="a cow", img_width=512, img_height=512))
    server.inject("malformed", target="status", count=50, body=json.dumps({"status": f"WEIRD {API_KEY}"}))
    with pytest.raises(UnexpectedResponse) as caught:
        await client.status(job)
    assert "WEIRD ***" in caught.value.message
    assert "retry" in debug_logs.text and "WEIRD ***" in debug_logs.text
    assert_key_absent(caught.value.message, str(caught.value), repr(caught.value), debug_logs.text)
    server.clear_faults()


async def test_the_key_is_scrubbed_from_error_bodies(
    server: SegmindServer, session: aiohttp.ClientSession, debug_logs: pytest.LogCaptureFixture
) -> None:
    async def echo(request: web.Request) -> web.Response:
        key = request.headers.get("x-api-key", "")
        if request.path.startswith("/v1/"):
            return web.json_response({"error": f"Blocked by the RAI policy for key {key}"}, status=400)
        # Plain text, with the key where a 300-character excerpt would cut it in two.
        return web.Response(text="x" * 295 + key, status=502)

    errors: list[Exception] = []
    async with serve(answering(echo)) as base_url:
        client = make_client(session, base_url)
        with pytest.raises(JobFailed) as blocked:
            await client.generate_sync(GenerationRequest(prompt="x"))
        assert blocked.value.is_content_block
        errors.append(blocked.value)
        with pytest.raises(ServerError) as plain:
            await client.submit(GenerationRequest(prompt="x"))
        errors.append(plain.value)
    server.inject("echo_key", target="submit")
    with pytest.raises(ServerError) as echoed:
        await make_client(session, server.base_url).submit(GenerationRequest(prompt="x"))
    errors.append(echoed.value)
    assert_key_absent(debug_logs.text, *map(str, errors), *map(repr, errors))
    assert_key_absent(*(getattr(error, "error", "") for error in errors))


# ---- rate-limit resets ---------------------------------------------------------------------------

ABSURD_RESETS = [
    "inf",
    "-inf",
    "nan",
    "-1",
    "garbage",
    "99999999999",
    "1e308",
    "2020-01-01T00:00:00+00:00",
    (datetime.now(UTC) + timedelta(hours=3)).isoformat(),
    "9999-12-31T23:59:59",
]


async def test_absurd_reset_headers_count_as_unknown_and_pause_briefly(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="patience", img_width=512, img_height=512))
    for value in ABSURD_RESETS:
        server.inject("odd_reset", target="submit", value=value)
        with pytest.raises(RateLimited) as caught:
            await asyncio.wait_for(client.submit(GenerationRequest(prompt="x")), timeout=5)
        assert caught.value.reset_at is None, value
        server.inject("odd_reset", target="status", value=value)
        started = time.monotonic()
        await asyncio.wait_for(client.status(job), timeout=5)
        # Unknown means one budget spacing (0.1 s at 600 a minute), not the header's idea of a pause.
        assert time.monotonic() - started < 1.0, value
    assert len(server.stats.submits) == 1


async def test_the_reset_header_is_read_in_any_letter_case(session: aiohttp.ClientSession) -> None:
    reset_at = datetime.now(UTC) + timedelta(seconds=30)

    async def limited(_request: web.Request) -> web.Response:
        headers = {"X-Rate-Limit-Reset-At-UTC": reset_at.isoformat()}
        return web.json_response({"error": "Too many requests"}, status=429, headers=headers)

    async with serve(answering(limited)) as base_url:
        with pytest.raises(RateLimited) as caught:
            await make_client(session, base_url).submit(GenerationRequest(prompt="x"))
    assert caught.value.reset_at == reset_at


async def test_a_reset_far_ahead_pauses_the_budget_at_most_max_pause(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    budget = RequestBudget(600, max_pause=0.3)
    client = make_client(session, server.base_url, budget=budget)
    job = await client.submit(GenerationRequest(prompt="patience", img_width=512, img_height=512))
    server.inject("rate_limit", target="status", reset_after=600.0)
    started = time.monotonic()
    await asyncio.wait_for(client.status(job), timeout=5)
    assert 0.25 <= time.monotonic() - started < 1.5

    server.inject("rate_limit", target="submit", reset_after=600.0)
    with pytest.raises(RateLimited) as caught:
        await client.submit(GenerationRequest(prompt="x"))
    # The member is told Segmind's real reset; the budget as a whole waits no longer than max_pause.
    wait = caught.value.seconds_until_reset()
    assert wait is not None and 590 < wait <= 600
    started = time.monotonic()
    await asyncio.wait_for(budget.acquire(), timeout=5)
    assert time.monotonic() - started < 0.5


def test_reset_values_are_read_as_iso_or_epoch_seconds_within_an_hour() -> None:
    now = datetime(2025, 1, 31, 12, 0, 0, tzinfo=UTC)
    ahead = now + timedelta(seconds=2.5)
    assert parse_reset_at("2025-01-31T12:00:02.500+00:00", now) == ahead
    assert parse_reset_at("2025-01-31T12:00:02.500", now) == ahead
    assert parse_reset_at(str(ahead.timestamp()), now) == ahead
    assert parse_reset_at((now + timedelta(minutes=59)).isoformat(), now) is not None
    for value in [None, "", *ABSURD_RESETS, (now + timedelta(minutes=61)).isoformat(), now.isoformat()]:
        assert parse_reset_at(value, now) is None, value


# ---- the budget's max_wait -----------------------------------------------------------------------


async def test_submit_with_max_wait_gives_up_on_a_paused_budget_and_sends_nothing(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    budget = RequestBudget(600)
    client = make_client(session, server.base_url, budget=budget)
    sent: list[bool] = []

    async def before_send() -> None:
        sent.append(True)

    budget.pause_for(30)
    started = time.monotonic()
    with pytest.raises(BudgetExhausted) as caught:
        await client.submit(GenerationRequest(prompt="x"), max_wait=0.5, before_send=before_send)
    assert time.monotonic() - started < 0.6
    assert isinstance(caught.value, RateLimited)
    wait = caught.value.seconds_until_reset()
    assert wait is not None and 29 < wait <= 30
    assert sent == [] and server.stats.requests == []


async def test_submit_with_max_wait_gives_up_on_a_full_window(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url, budget=RequestBudget(1, window=60))
    await client.submit(GenerationRequest(prompt="first"))
    with pytest.raises(BudgetExhausted) as caught:
        await client.submit(GenerationRequest(prompt="second"), max_wait=0.5)
    wait = caught.value.seconds_until_reset()
    assert wait is not None and 58 < wait <= 60
    assert len(server.stats.requests) == 1


async def test_max_wait_that_is_long_enough_still_sends(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    budget = RequestBudget(600)
    budget.pause_for(0.2)
    job = await make_client(session, server.base_url, budget=budget).submit(
        GenerationRequest(prompt="x"), max_wait=2.0
    )
    assert [record.request_id for record in server.stats.submits] == [job.request_id]


async def test_the_budget_gives_up_for_a_caller_behind_others() -> None:
    budget = RequestBudget(1, window=0.4)
    await budget.acquire()
    # The next slot comes in 0.4 s and the one after in 0.8 s: the first in line can wait for its slot
    # within 0.6 s, the second cannot and says when its slot would come.
    first = asyncio.create_task(budget.acquire(max_wait=0.6))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire(max_wait=0.6)
    assert time.monotonic() - started < 0.1
    wait = caught.value.seconds_until_reset()
    assert wait is not None and 0.7 < wait <= 0.8
    await asyncio.wait_for(first, timeout=2)
    assert budget.waiting == 0


# ---- body size caps ------------------------------------------------------------------------------


@pytest.mark.parametrize("content_length", [False, True])
async def test_a_huge_status_body_does_not_stall_the_loop(
    server: SegmindServer, session: aiohttp.ClientSession, content_length: bool
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="big", img_width=512, img_height=512))
    server.inject("huge_body", target="status", mib=200, content_length=content_length)
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    try:
        state = await asyncio.wait_for(client.status(job), timeout=10)
    finally:
        stop.set()
        await ticker
    assert state in (SegmindState.QUEUED, SegmindState.PROCESSING, SegmindState.COMPLETED)
    assert time.monotonic() - started < 2.0
    assert max(gaps) < 0.25
    assert [r.status for r in server.stats.requests_to("status")] == [200, 200]  # the huge one, a retry


async def test_a_result_body_over_its_cap_is_retried(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="big", img_width=512, img_height=512))
    server.inject("huge_body", target="result", mib=65, content_length=True)
    await completes(client, job)
    assert len(server.stats.requests_to("result")) == 2


async def test_v1_image_bytes_are_capped(session: aiohttp.ClientSession) -> None:
    async def huge_image(_request: web.Request) -> web.Response:
        return web.Response(body=b"\xff" * (33 * 1024 * 1024), content_type="image/jpeg")

    async with serve(answering(huge_image)) as base_url:
        with pytest.raises(UnexpectedResponse):
            await make_client(session, base_url).generate_sync(GenerationRequest(prompt="x"))


# ---- malformed answers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", ["not json", "[]", '{"status": "WEIRD"}', '{"request_id": "x"}', '{"status": 7}', "nul"]
)
@pytest.mark.parametrize("early_results", [True, False])
async def test_one_malformed_answer_then_a_good_one_completes(
    server: SegmindServer, session: aiohttp.ClientSession, body: str, early_results: bool
) -> None:
    client = make_client(session, server.base_url)
    client.early_results = early_results  # off: the status URL's malformed answer is met too
    job = await client.submit(GenerationRequest(prompt="odd", img_width=512, img_height=512))
    server.inject("malformed", target="status", body=body)
    server.inject("malformed", target="result", body=body)
    await completes(client, job)
    assert [r.status for r in server.stats.requests_to("result")] == [200, 200]
    left = [fault["target"] for fault in server._faults.describe()]
    assert early_results or left == []  # without early results, the status URL's fault was met


async def test_a_completed_result_without_outputs_is_retried(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="odd", img_width=512, img_height=512))
    server.inject("malformed", target="result", body='{"status": "COMPLETED", "output": []}')
    await completes(client, job)


async def test_malformed_answers_end_the_job_only_after_the_retries(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="odd", img_width=512, img_height=512))
    server.inject("malformed", target="status", count=50, body='{"status": "WEIRD"}')
    with pytest.raises(UnexpectedResponse) as caught:
        await client.status(job)
    assert caught.value.request_id == job.request_id
    assert len(server.stats.requests_to("status")) == ATTEMPTS
    server.clear_faults()


# ---- verify_key ----------------------------------------------------------------------------------


async def test_verify_key_accepts_a_good_key_with_one_request_from_the_budget(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    budget = RequestBudget(1, window=60)
    assert await make_client(session, server.base_url, budget=budget).verify_key() is True
    [seen] = server.stats.requests
    assert (seen.target, seen.status) == ("status", 404)
    assert seen.path.startswith("/v2/requests/") and seen.path.endswith("/status")
    with pytest.raises(BudgetExhausted):
        await budget.acquire(max_wait=0.1)


async def test_verify_key_raises_for_a_refused_key(
    server: SegmindServer, session: aiohttp.ClientSession, debug_logs: pytest.LogCaptureFixture
) -> None:
    wrong = API_KEY + "_wrong"
    with pytest.raises(Unauthorized) as caught:
        await make_client(session, server.base_url, api_key=wrong).verify_key()
    assert wrong not in str(caught.value)
    assert len(server.stats.requests) == 1

    async def forbidden(_request: web.Request) -> web.Response:
        return web.json_response({"error": "Forbidden for this model"}, status=403)

    async with serve(answering(forbidden)) as base_url:
        with pytest.raises(Forbidden):
            await make_client(session, base_url).verify_key()
    assert_key_absent(debug_logs.text)


async def test_verify_key_warns_and_answers_false_when_segmind_cannot_tell(
    server: SegmindServer,
    evil: EvilServer,
    session: aiohttp.ClientSession,
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    client = make_client(session, server.base_url)
    server.inject("server_error", target="status", count=5)
    assert await client.verify_key() is False
    assert len(server.stats.requests) == 1  # one attempt, no retries
    server.clear_faults()
    for kind, params in (
        ("odd_reset", {"value": "inf"}),
        ("redirect", {"location": f"{evil.base_url}/steal"}),
        ("huge_body", {"mib": 2, "content_length": True}),
    ):
        server.inject(kind, target="status", **params)  # type: ignore[arg-type]
        assert await client.verify_key() is False, kind
    assert evil.requests == []
    # Nothing listens on port 9.
    assert await make_client(session, "http://127.0.0.1:9").verify_key() is False
    warnings = [r.getMessage() for r in debug_logs.records if r.levelno == logging.WARNING]
    assert sum("could not verify the Segmind key: " in message for message in warnings) == 5
    assert_key_absent(debug_logs.text)
