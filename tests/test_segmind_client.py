"""The Segmind client against the local Segmind-compatible server, over real sockets."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from devtools.fakes.segmind.server import SegmindServer, SegmindServerSettings
from services.request import GenerationRequest
from services.segmind import (
    BadRequest,
    DurationModel,
    Forbidden,
    InsufficientCredits,
    JobEvent,
    JobFailed,
    JobTimeout,
    NotAcceptable,
    NotFound,
    RateLimited,
    RequestBudget,
    RetryPolicy,
    SegmindClient,
    SegmindConnectionError,
    SegmindState,
    ServerError,
    SubmittedJob,
    Unauthorized,
)
from tests.conftest import PAGE_EXAMPLE

API_KEY = "sg_test_key_4f1d2c9b"


@pytest.fixture
async def server() -> AsyncIterator[SegmindServer]:
    server = SegmindServer(
        SegmindServerSettings(
            api_keys=frozenset({API_KEY}),
            queue_seconds=0.2,
            seconds_per_step=0.01,
            workers=4,
            blocked_words=frozenset({"forbidden"}),
        )
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_client(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    api_key: str = API_KEY,
    per_minute: int = 600,
    model: str = "sdxl1.0-dreamshaper",
    deadline: float = 30.0,
    request_timeout: float = 10.0,
    budget: RequestBudget | None = None,
) -> SegmindClient:
    return SegmindClient(
        session,
        api_key=api_key,
        base_url=base_url,
        model=model,
        budget=budget or RequestBudget(per_minute),
        deadline=deadline,
        retry=RetryPolicy(attempts=5, base_delay=0.05, max_delay=0.2),
        durations=DurationModel(seconds_per_unit=0.01, queue_seconds=0.2),
        request_timeout=request_timeout,
    )


async def run_to_completion(client: SegmindClient, job: SubmittedJob) -> list[JobEvent]:
    return [event async for event in client.wait(job)]


async def download(session: aiohttp.ClientSession, url: str) -> Image.Image:
    async with session.get(url) as response:
        assert response.status == 200
        image = Image.open(io.BytesIO(await response.read()))
        image.load()
        return image


async def test_one_sample_as_url(server: SegmindServer, session: aiohttp.ClientSession) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="a lighthouse at dusk", img_width=768, img_height=512))
    events = await run_to_completion(client, job)

    assert events[-1].state is SegmindState.COMPLETED
    assert {event.state for event in events[:-1]} <= {SegmindState.QUEUED, SegmindState.PROCESSING}
    assert all(event.request_id == job.request_id for event in events)
    result = events[-1].result
    assert result is not None and len(result.outputs) == 1
    assert result.inference_time is not None
    image = await download(session, result.outputs[0])
    assert image.size == (768, 512)
    # The seed was made concrete before submitting, so the result can be reproduced.
    assert job.request.seed >= 0
    assert server.stats.submits[0].payload["seed"] == job.request.seed


async def test_first_status_check_comes_within_a_second(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="a fox"))
    await run_to_completion(client, job)
    submit_time = server.stats.requests_to("submit")[0].time
    first_poll = server.stats.requests_to("status")[0].time
    assert first_poll - submit_time < 1.0


async def test_four_samples_are_four_distinct_images(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="four cats", samples=4, img_width=512, img_height=512))
    result = (await run_to_completion(client, job))[-1].result
    assert result is not None and len(result.outputs) == 4
    images = [await download(session, url) for url in result.outputs]
    assert len({image.tobytes() for image in images}) == 4


async def test_base64_output(server: SegmindServer, session: aiohttp.ClientSession) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(
        GenerationRequest(prompt="a boat", samples=2, base64=True, img_width=512, img_height=640)
    )
    result = (await run_to_completion(client, job))[-1].result
    assert result is not None and result.is_base64 and len(result.outputs) == 2
    for output in result.outputs:
        image = Image.open(io.BytesIO(base64.b64decode(output)))
        assert image.size == (512, 640)


async def test_the_api_pages_example_payload(server: SegmindServer, session: aiohttp.ClientSession) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest.from_payload(PAGE_EXAMPLE))
    result = (await run_to_completion(client, job))[-1].result
    assert result is not None
    assert server.stats.submits[0].payload == PAGE_EXAMPLE
    assert (await download(session, result.outputs[0])).size == (896, 1152)


async def test_content_block_is_failed_422_with_the_request_id(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="something forbidden here"))
    with pytest.raises(JobFailed) as caught:
        await run_to_completion(client, job)
    assert caught.value.is_content_block
    assert caught.value.request_id == job.request_id
    assert any(r.status == 422 for r in server.stats.requests_to("status", "result"))


async def test_expired_request_is_not_found(session: aiohttp.ClientSession) -> None:
    server = SegmindServer(
        SegmindServerSettings(queue_seconds=0.05, seconds_per_step=0.001, retention_seconds=1.5)
    )
    await server.start()
    try:
        client = make_client(session, server.base_url)
        job = await client.submit(GenerationRequest(prompt="short lived"))
        await run_to_completion(client, job)
        await asyncio.sleep(1.7)
        with pytest.raises(NotFound):
            await client.status(job)
        with pytest.raises(NotFound):
            await client.status(client.handle_for("no-such-id", job.request))
    finally:
        await server.stop()


async def test_unknown_model_and_bad_key(server: SegmindServer, session: aiohttp.ClientSession) -> None:
    with pytest.raises(NotFound):
        await make_client(session, server.base_url, model="no-such-model").submit(
            GenerationRequest(prompt="x")
        )
    with pytest.raises(Unauthorized):
        await make_client(session, server.base_url, api_key="wrong-key").submit(GenerationRequest(prompt="x"))
    assert server.stats.submits == []


async def test_insufficient_credits(server: SegmindServer, session: aiohttp.ClientSession) -> None:
    server.inject("insufficient_credits", target="submit")
    with pytest.raises(InsufficientCredits) as caught:
        await make_client(session, server.base_url).submit(GenerationRequest(prompt="x"))
    assert caught.value.status == 406


async def test_submit_rate_limited_carries_the_reset_time(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    server.inject("rate_limit", target="submit", reset_after=3.0)
    client = make_client(session, server.base_url)
    with pytest.raises(RateLimited) as caught:
        await client.submit(GenerationRequest(prompt="x"))
    wait = caught.value.seconds_until_reset()
    assert wait is not None and 2.0 < wait <= 3.0
    assert server.stats.submits == []


async def test_rate_limited_poll_waits_for_the_reset(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="patience"))
    server.inject("rate_limit", target="status", reset_after=1.0)
    started = time.monotonic()
    events = await run_to_completion(client, job)
    assert events[-1].state is SegmindState.COMPLETED
    assert time.monotonic() - started >= 0.9
    status_requests = server.stats.requests_to("status")
    limited_at = next(r.time for r in status_requests if r.status == 429)
    assert all(r.time - limited_at >= 0.9 for r in status_requests if r.time > limited_at)


async def test_polls_are_retried_and_the_job_is_never_submitted_twice(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url, request_timeout=0.5)
    job = await client.submit(GenerationRequest(prompt="resilient"))
    server.inject("server_error", count=2, target="status")
    server.inject("drop", count=1, target="status")
    server.inject("slow", count=1, target="status", seconds=1.5)
    server.inject("server_error", count=1, target="result", status=502)
    events = await run_to_completion(client, job)
    assert events[-1].result is not None
    assert len(server.stats.submits) == 1
    assert len(server.stats.requests_to("submit")) == 1
    statuses = [r.status for r in server.stats.requests_to("status")]
    assert statuses.count(500) + statuses.count(502) == 2 and None in statuses


async def test_polls_give_up_after_bounded_retries(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="unlucky"))
    server.inject("server_error", count=50, target="status", status=503)
    with pytest.raises(ServerError):
        await run_to_completion(client, job)
    assert len(server.stats.requests_to("status")) == client.retry.attempts


async def test_a_submit_is_never_retried_after_it_was_sent(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    server.inject("server_error", target="submit")
    with pytest.raises(ServerError):
        await client.submit(GenerationRequest(prompt="x"))
    server.inject("drop", target="submit", after_accept=True)
    with pytest.raises(SegmindConnectionError):
        await client.submit(GenerationRequest(prompt="y"))
    assert len(server.stats.requests_to("submit")) == 2
    assert len(server.stats.submits) == 1  # the dropped one was accepted: sending it again would bill twice


async def test_a_submit_that_never_connected_is_retried(session: aiohttp.ClientSession) -> None:
    # Nothing listens on this port, so nothing can have reached Segmind: retrying is safe and bounded.
    client = make_client(session, "http://127.0.0.1:9")
    with pytest.raises(SegmindConnectionError):
        await client.submit(GenerationRequest(prompt="x"))


async def test_the_budget_holds_over_a_window(server: SegmindServer, session: aiohttp.ClientSession) -> None:
    budget = RequestBudget(per_minute=4, window=1.0)
    client = make_client(session, server.base_url, budget=budget)
    jobs = await asyncio.gather(*(client.submit(GenerationRequest(prompt=f"job {n}")) for n in range(3)))
    await asyncio.gather(*(run_to_completion(client, job) for job in jobs))
    total = len(server.stats.requests)
    # Three submits and at least a check each (a check at the result URL brings the result too).
    assert total >= 6
    # Arrival times are measured by the server: allow for a few milliseconds of loopback jitter.
    assert server.stats.max_requests_in_window(0.95) <= 4


async def test_budget_tells_waiters_their_position() -> None:
    budget = RequestBudget(per_minute=1, window=0.3)
    positions: list[int] = []
    await budget.acquire()
    second = asyncio.create_task(budget.acquire())
    await asyncio.sleep(0.01)
    third = asyncio.create_task(budget.acquire(lambda position, _delay: positions.append(position)))
    await asyncio.wait_for(asyncio.gather(second, third), timeout=2)
    assert positions[0] == 2 and positions[-1] == 1


async def test_the_deadline_ends_the_wait_with_the_request_id(session: aiohttp.ClientSession) -> None:
    server = SegmindServer(SegmindServerSettings(queue_seconds=0.1, seconds_per_step=1.0))
    await server.start()
    try:
        client = make_client(session, server.base_url, deadline=1.5)
        job = await client.submit(GenerationRequest(prompt="slow"))
        started = time.monotonic()
        with pytest.raises(JobTimeout) as caught:
            await run_to_completion(client, job)
        assert caught.value.request_id == job.request_id
        assert time.monotonic() - started < 3.0
    finally:
        await server.stop()


async def test_the_key_never_appears_in_logs_reprs_or_errors(
    server: SegmindServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="secret keeping"))
    server.inject("server_error", count=2, target="status")
    await run_to_completion(client, job)
    errors: list[Exception] = []
    for kind in ("insufficient_credits", "rate_limit"):
        server.inject(kind, target="submit")  # type: ignore[arg-type]
        try:
            await client.submit(GenerationRequest(prompt="x"))
        except Exception as error:
            errors.append(error)
    try:
        await make_client(session, server.base_url, api_key=API_KEY + "x").submit(
            GenerationRequest(prompt="x")
        )
    except Exception as error:
        errors.append(error)
    assert len(errors) == 3
    assert "retry" in caplog.text
    for text in [caplog.text, repr(client), *map(str, errors), *map(repr, errors)]:
        assert API_KEY not in text


async def test_v1_sync_returns_the_image(server: SegmindServer, session: aiohttp.ClientSession) -> None:
    client = make_client(session, server.base_url)
    image = Image.open(
        io.BytesIO(await client.generate_sync(GenerationRequest(prompt="sync", img_width=640)))
    )
    assert image.size == (640, 1024)
    encoded = await client.generate_sync(GenerationRequest(prompt="sync", base64=True, img_height=512))
    assert Image.open(io.BytesIO(encoded)).size == (1024, 512)
    with pytest.raises(JobFailed) as caught:
        await client.generate_sync(GenerationRequest(prompt="forbidden"))
    assert caught.value.is_content_block


@pytest.mark.parametrize(
    ("status", "body", "error_type"),
    [
        (400, {"error": "img_width must be a multiple of 8"}, BadRequest),
        (401, {"error": "Invalid API key"}, Unauthorized),
        (403, {"error": "Forbidden for this model"}, Forbidden),
        (404, {"error": "Model not found"}, NotFound),
        (406, {"error": "Insufficient credits"}, InsufficientCredits),
        (406, {"error": "Unsupported content type"}, NotAcceptable),
        (429, {"error": "Too many requests"}, RateLimited),
        (500, {"error": "Internal server error"}, ServerError),
        (502, {"error": "Bad gateway"}, ServerError),
        (504, {"error": "Timeout"}, ServerError),
    ],
)
async def test_every_status_code_has_its_typed_error(
    session: aiohttp.ClientSession, status: int, body: dict[str, str], error_type: type[Exception]
) -> None:
    # Some of these (403, a non-credit 406) are not produced by the local server, so a minimal
    # endpoint answers them here with Segmind's error body shape.
    async def answer(_request: web.Request) -> web.Response:
        headers = {"x-rate-limit-reset-at-utc": datetime.now(UTC).isoformat()} if status == 429 else {}
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/v2/sdxl1.0-dreamshaper", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with pytest.raises(error_type) as caught:
            await make_client(session, f"http://127.0.0.1:{port}").submit(GenerationRequest(prompt="x"))
        assert body["error"] in str(caught.value)
    finally:
        await runner.cleanup()


async def busy_client(session: aiohttp.ClientSession, base_url: str) -> SegmindClient:
    """A client whose budget's window is already more than half spent by other requests."""
    budget = RequestBudget(per_minute=40, window=6.0)
    for _ in range(28):
        await budget.acquire()
    return make_client(session, base_url, budget=budget)


async def test_a_busy_budget_checks_a_likely_finished_job_at_its_result_url_and_saves_a_request(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = await busy_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="one request less", img_width=512, img_height=512))
    events = await run_to_completion(client, job)

    assert events[-1].result is not None and events[-1].result.outputs
    mine = [r for r in server.stats.requests_to("status", "result") if job.request_id in r.path]
    assert mine and all(r.target == "result" for r in mine)
    assert client.early_results


async def test_with_room_in_the_budget_the_check_that_finds_a_job_done_brings_its_result_too(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    job = await client.submit(GenerationRequest(prompt="one request less", img_width=512, img_height=512))
    events = await run_to_completion(client, job)

    assert events[-1].result is not None and events[-1].result.outputs
    ended_at = server._jobs[job.request_id].ends_at
    mine = [r for r in server.stats.requests_to("status", "result") if job.request_id in r.path]
    # Not a status check that saw COMPLETED and then a request for the result: one answer brought both.
    after_the_end = [r.target for r in mine if r.time >= ended_at]
    assert after_the_end == ["result"]


async def test_a_loop_running_behind_checks_a_likely_finished_job_at_its_result_url_like_a_busy_budget(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    client.loop_load = lambda: 1.0
    job = await client.submit(GenerationRequest(prompt="the loop is busy", img_width=512, img_height=512))
    events = await run_to_completion(client, job)

    assert events[-1].result is not None and events[-1].result.outputs
    mine = [r for r in server.stats.requests_to("status", "result") if job.request_id in r.path]
    assert mine and all(r.target == "result" for r in mine)


async def test_a_check_put_late_while_the_loop_was_behind_is_planned_again_when_it_catches_up(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = make_client(session, server.base_url)
    # Nothing learnt: the default priors spread this job's possible ends over seconds (queues of 2 s on
    # average), and a busy process checks it only once it has most likely ended, about 6 s from now.
    client.durations = DurationModel()
    load = {"now": 1.0}
    client.loop_load = lambda: load["now"]
    started = time.monotonic()
    job = await client.submit(GenerationRequest(prompt="behind, then not", img_width=512, img_height=512))
    waiting = asyncio.create_task(run_to_completion(client, job))
    await asyncio.sleep(0.3)
    load["now"] = 0.0  # the burst has passed
    events = await waiting
    assert events[-1].result is not None
    # The stand-in's job took well under a second; planned again, it is noticed within about one
    # REPLAN_SECONDS, not at the check put late for the busy loop.
    assert time.monotonic() - started < 3.0


async def test_a_result_url_that_does_not_answer_early_sends_the_client_back_to_status_checks(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    server = SegmindServer(
        SegmindServerSettings(queue_seconds=0.5, seconds_per_step=0.05, early_result="not_found")
    )
    await server.start()
    try:
        client = await busy_client(session, server.base_url)
        client.durations = DurationModel(
            seconds_per_unit=0.0001, queue_seconds=0.01
        )  # expects it done at once
        outcomes = []
        for n in range(6):  # a few odd answers in a row, not one, turn the early checks off
            job = await client.submit(GenerationRequest(prompt=f"not yet {n}", img_width=512, img_height=512))
            events = await run_to_completion(client, job)
            outcomes.append(events[-1].result is not None)
            if not client.early_results:
                break
    finally:
        await server.stop()

    assert all(outcomes)
    assert not client.early_results
    assert "checking status only" in caplog.text
    assert server.stats.status_polls_by_id[job.request_id] >= 1


async def test_a_fixed_poller_keeps_to_status_checks_when_the_budget_is_busy(
    server: SegmindServer, session: aiohttp.ClientSession
) -> None:
    client = await busy_client(session, server.base_url)
    client.poll_interval = 0.3
    job = await client.submit(GenerationRequest(prompt="every so often", img_width=512, img_height=512))
    events = await run_to_completion(client, job)
    assert events[-1].result is not None
    assert server.stats.status_polls_by_id[job.request_id] >= 1
