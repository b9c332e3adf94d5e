"""The job service with the real client, the local Segmind server and a SQLite store: quota settlement."""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from devtools.fakes.segmind.images import render_sample
from devtools.fakes.segmind.server import SegmindServer, SegmindServerSettings
from services.images import prepare_for_upload
from services.jobs import (
    MIN_DOWNLOAD_SECONDS,
    DownloadFailed,
    JobError,
    JobService,
    Progress,
    ProgressKind,
    SubmitInterrupted,
)
from services.quota import QuotaGuard
from services.request import GenerationRequest
from services.segmind import (
    DurationModel,
    InsufficientCredits,
    JobFailed,
    JobTimeout,
    RateLimited,
    RequestBudget,
    RetryPolicy,
    SegmindClient,
)
from services.store import Store, open_store
from services.store.base import JobRecord, JobState, QuotaLimits, Reservation, new_job_id

USER = 4242


@pytest.fixture
async def server() -> AsyncIterator[SegmindServer]:
    server = SegmindServer(
        SegmindServerSettings(
            queue_seconds=0.2, seconds_per_step=0.01, blocked_words=frozenset({"forbidden"})
        )
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(f"sqlite:///{tmp_path}/jobs.sqlite3")
    yield store
    await store.close()


@pytest.fixture
async def service(server: SegmindServer, store: Store) -> AsyncIterator[JobService]:
    async with aiohttp.ClientSession() as session:
        client = SegmindClient(
            session,
            api_key="k",
            base_url=server.base_url,
            budget=RequestBudget(600),
            retry=RetryPolicy(base_delay=0.05, max_delay=0.1),
            durations=DurationModel(seconds_per_unit=0.01, queue_seconds=0.2),
        )
        quota = QuotaGuard(store, QuotaLimits(daily_images=10, max_concurrent=5), frozenset())
        yield JobService(client, store, quota, session, credits_cooloff=60, rate_limit_max_wait=2.0)


async def new_job(service: JobService, request: GenerationRequest) -> JobRecord:
    reservation = await service.quota.reserve(USER, request.samples)
    assert isinstance(reservation, Reservation)
    now = time.time()
    return JobRecord(
        id=new_job_id(),
        user_id=USER,
        guild_id=1,
        channel_id=2,
        request=request.to_payload(),
        reservation_id=reservation.id,
        state=JobState.PENDING,
        created_at=now,
        updated_at=now,
    )


async def test_a_finished_job_charges_its_images_and_is_recorded(service: JobService, store: Store) -> None:
    seen: list[Progress] = []
    job = await new_job(
        service, GenerationRequest(prompt="two owls", samples=2, img_width=512, img_height=512)
    )
    generated = await service.run(job, seen.append)

    assert len(generated.images) == 2
    assert generated.request.seed >= 0
    assert {p.kind for p in seen} <= {ProgressKind.QUEUED, ProgressKind.GENERATING}
    usage = await service.quota.usage(USER)
    assert (usage.used_images, usage.in_flight) == (2, 0)
    stored = await store.get_job(job.id)
    assert stored is not None and stored.state is JobState.COMPLETED
    assert stored.segmind_request_id == generated.job.segmind_request_id
    assert stored.request["seed"] == generated.request.seed
    await service.mark_delivered(generated.job, message_id=99)
    delivered = await store.get_job(job.id)
    assert delivered is not None and delivered.state is JobState.DELIVERED and delivered.message_id == 99


async def test_a_finished_job_closes_its_wait_at_segmind_instead_of_leaving_it_to_the_collector(
    service: JobService,
) -> None:
    # An async generator left open is closed by the loop later, a task and a wake-up of its own per job;
    # a thousand jobs finishing together pay for that in CPU.
    left_open: list[str] = []
    firstiter, finalizer = sys.get_asyncgen_hooks()

    def note(generator: Any) -> None:
        left_open.append(generator.__qualname__)
        if finalizer is not None:
            finalizer(generator)

    sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=note)
    try:
        job = await new_job(service, GenerationRequest(prompt="two owls", samples=1))
        generated = await service.run(job, lambda _p: None)
        del generated
        gc.collect()
    finally:
        sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=finalizer)
    assert left_open == []


async def test_a_content_block_refunds_and_says_so(service: JobService, store: Store) -> None:
    job = await new_job(service, GenerationRequest(prompt="something forbidden", samples=3))
    with pytest.raises(JobError) as caught:
        await service.run(job, lambda _p: None)
    assert isinstance(caught.value.cause, JobFailed) and caught.value.cause.is_content_block
    assert caught.value.billed is False and caught.value.request_id
    usage = await service.quota.usage(USER)
    assert (usage.used_images, usage.in_flight) == (0, 0)
    stored = await store.get_job(job.id)
    assert stored is not None and stored.state is JobState.FAILED


async def test_out_of_credits_refunds_and_starts_the_cool_off(
    service: JobService, server: SegmindServer
) -> None:
    server.inject("insufficient_credits", target="submit")
    job = await new_job(service, GenerationRequest(prompt="x"))
    with pytest.raises(JobError) as caught:
        await service.run(job, lambda _p: None)
    assert isinstance(caught.value.cause, InsufficientCredits)
    assert (await service.quota.usage(USER)).used_images == 0
    until = await service.credits_exhausted_until()
    assert until is not None and until > time.time() + 50


async def test_rate_limit_waits_for_the_reset_then_submits_once(
    service: JobService, server: SegmindServer
) -> None:
    server.inject("rate_limit", target="submit", reset_after=1.0)
    seen: list[Progress] = []
    job = await new_job(service, GenerationRequest(prompt="x"))
    await service.run(job, seen.append)
    assert seen[0].kind is ProgressKind.RATE_LIMITED and seen[0].retry_at is not None
    assert len(server.stats.submits) == 1


async def test_rate_limit_past_the_bound_refunds_with_a_retry_time(
    service: JobService, server: SegmindServer
) -> None:
    server.inject("rate_limit", target="submit", reset_after=30.0)
    job = await new_job(service, GenerationRequest(prompt="x", samples=2))
    with pytest.raises(JobError) as caught:
        await service.run(job, lambda _p: None)
    assert isinstance(caught.value.cause, RateLimited)
    assert caught.value.retry_at is not None and caught.value.retry_at > time.time() + 20
    assert (await service.quota.usage(USER)).used_images == 0
    assert server.stats.submits == []


async def test_a_download_that_keeps_failing_is_reported_with_the_request_id(
    service: JobService, server: SegmindServer
) -> None:
    server.inject("server_error", count=10, target="output", status=503)
    job = await new_job(service, GenerationRequest(prompt="x"))
    with pytest.raises(JobError) as caught:
        await service.run(job, lambda _p: None)
    assert isinstance(caught.value.cause, DownloadFailed)
    assert caught.value.billed is True and caught.value.request_id
    # Segmind ran the job, so its image counts even though it never arrived.
    assert (await service.quota.usage(USER)).used_images == 1


async def test_a_passing_download_failure_is_retried(service: JobService, server: SegmindServer) -> None:
    server.inject("server_error", count=1, target="output", status=502)
    job = await new_job(service, GenerationRequest(prompt="x"))
    generated = await service.run(job, lambda _p: None)
    assert len(generated.images) == 1


async def test_jobs_waiting_for_the_request_budget_are_told_their_place(
    server: SegmindServer, store: Store
) -> None:
    async with aiohttp.ClientSession() as session:
        client = SegmindClient(
            session,
            api_key="k",
            base_url=server.base_url,
            budget=RequestBudget(per_minute=1, window=0.4),
            durations=DurationModel(seconds_per_unit=0.01, queue_seconds=0.2),
        )
        quota = QuotaGuard(store, QuotaLimits(daily_images=10, max_concurrent=5), frozenset())
        service = JobService(client, store, quota, session, credits_cooloff=60, rate_limit_max_wait=2.0)
        seen: list[list[Progress]] = [[], [], []]
        jobs = [await new_job(service, GenerationRequest(prompt=f"job {n}")) for n in range(3)]
        await asyncio.gather(*(service.run(job, seen[n].append) for n, job in enumerate(jobs)))
    positions = [p.position for progress in seen for p in progress if p.kind is ProgressKind.WAITING_FOR_SLOT]
    assert 2 in positions
    assert len(server.stats.submits) == 3


async def test_a_job_interrupted_while_submitting_is_never_sent_again(
    service: JobService, server: SegmindServer, store: Store
) -> None:
    job = await new_job(service, GenerationRequest(prompt="in doubt"))
    await store.save_job(job.evolve(time.time(), state=JobState.SUBMITTING))
    with pytest.raises(JobError) as caught:
        await service.resume(job.evolve(time.time(), state=JobState.SUBMITTING), lambda _p: None)
    assert isinstance(caught.value.cause, SubmitInterrupted)
    assert server.stats.submits == []
    assert (await service.quota.usage(USER)).in_flight == 0
    stored = await store.get_job(job.id)
    assert stored is not None and stored.state is JobState.FAILED


async def test_a_submit_records_that_it_is_on_its_way_before_it_leaves(
    service: JobService, server: SegmindServer, store: Store
) -> None:
    server.inject("slow", target="submit", seconds=1.0)
    job = await new_job(service, GenerationRequest(prompt="on its way"))
    running = asyncio.create_task(service.run(job, lambda _p: None))
    await asyncio.sleep(0.5)
    stored = await store.get_job(job.id)
    assert stored is not None and stored.state is JobState.SUBMITTING
    # Cancelling now (a shutdown) waits for Segmind's answer so its request id is kept.
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    stored = await store.get_job(job.id)
    assert stored is not None and stored.state is JobState.SUBMITTED and stored.segmind_request_id


async def test_a_resumed_job_keeps_the_deadline_of_its_first_submit(
    service: JobService, server: SegmindServer, store: Store
) -> None:
    server.settings.seconds_per_step = 10.0  # far longer than any deadline here
    service.client.deadline = 3.0
    job = await new_job(service, GenerationRequest(prompt="slow"))
    submitted = await service.client.submit(GenerationRequest.from_payload(job.request))
    # Recorded by a process that submitted it 2.5 s ago and has since restarted.
    job = await service.record(
        job,
        state=JobState.SUBMITTED,
        segmind_request_id=submitted.request_id,
        submitted_at=time.time() - 2.5,
    )
    started = time.monotonic()
    with pytest.raises(JobError) as caught:
        await service.resume(job, lambda _p: None)
    assert isinstance(caught.value.cause, JobTimeout)
    assert time.monotonic() - started < 2.0


async def test_downloads_are_bounded_by_the_job_deadline(service: JobService, server: SegmindServer) -> None:
    service.client.deadline = 2.0
    server.inject("slow", target="output", count=10, seconds=30.0)
    job = await new_job(service, GenerationRequest(prompt="x"))
    started = time.monotonic()
    with pytest.raises(JobError) as caught:
        await service.run(job, lambda _p: None)
    assert isinstance(caught.value.cause, DownloadFailed)
    assert time.monotonic() - started < MIN_DOWNLOAD_SECONDS + 3.0


async def test_outputs_beyond_the_samples_asked_for_are_not_fetched(
    service: JobService, server: SegmindServer
) -> None:
    server.inject("many_outputs", target="result", outputs=12)
    job = await new_job(service, GenerationRequest(prompt="x", samples=2))
    generated = await service.run(job, lambda _p: None)
    assert len(generated.images) == 2
    assert sum(r.target == "output" for r in server.stats.requests) == 2


async def test_a_multi_picture_jpeg_is_delivered_as_a_jpeg(
    service: JobService, server: SegmindServer
) -> None:
    server.inject("odd_image", target="output", format="mpo")
    job = await new_job(service, GenerationRequest(prompt="x"))
    generated = await service.run(job, lambda _p: None)
    [prepared] = await prepare_for_upload(generated.images, limit_bytes=10 * 1024 * 1024, stem="x")
    assert prepared.content_type == "image/jpeg" and prepared.filename.endswith(".jpeg")


@pytest.mark.parametrize(
    ("origin", "path"),
    [
        ("http://169.254.169.254", "/latest/meta-data/"),
        ("http://[::ffff:169.254.169.254]", "/latest/meta-data/"),
        ("http://10.0.0.1", "/image.jpeg"),
    ],
)
async def test_output_urls_off_limits_are_never_fetched(
    service: JobService, server: SegmindServer, origin: str, path: str
) -> None:
    server.inject("foreign_urls", target="result", origin=origin, path=path)
    job = await new_job(service, GenerationRequest(prompt="x"))
    started = time.monotonic()
    with pytest.raises(JobError) as caught:
        await service.run(job, lambda _p: None)
    assert isinstance(caught.value.cause, DownloadFailed)
    assert time.monotonic() - started < 5.0  # refused before any connection was tried


async def test_output_files_never_carry_the_key(service: JobService, server: SegmindServer) -> None:
    seen: list[dict[str, str]] = []

    async def image(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(body=render_sample(seed=1, index=0, samples=1, width=64, height=64, prompt="x"))

    app = web.Application()
    app.router.add_get("/{tail:.*}", image)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        server.inject("foreign_urls", target="result", origin=f"http://127.0.0.1:{port}")
        job = await new_job(service, GenerationRequest(prompt="x"))
        generated = await service.run(job, lambda _p: None)
    finally:
        await runner.cleanup()
    assert len(generated.images) == 1 and len(seen) == 1
    assert "x-api-key" not in {name.lower() for name in seen[0]}
