"""Who goes first when the request budget is full: work already at Segmind, then members in turn."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from devtools.fakes.segmind.server import SegmindServer, SegmindServerSettings
from services.jobs import JobService, Progress, ProgressKind
from services.quota import QuotaGuard
from services.request import GenerationRequest
from services.segmind import DurationModel, Priority, RequestBudget, SegmindClient
from services.store import Store, open_store
from services.store.base import JobRecord, JobState, QuotaLimits, Reservation, new_job_id


async def grant_order(budget: RequestBudget, askers: list[tuple[str, Priority, object]]) -> list[str]:
    """Queues every asker (in this order) behind a full window and returns who was granted when."""
    await budget.acquire()  # fills the window of one
    granted: list[str] = []

    async def ask(name: str, priority: Priority, asker: object) -> None:
        await budget.acquire(priority=priority, asker=asker)
        granted.append(name)

    tasks = []
    for name, priority, asker in askers:
        tasks.append(asyncio.create_task(ask(name, priority, asker)))
        await asyncio.sleep(0)  # each is in line before the next arrives
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    return granted


async def test_results_go_before_status_checks_and_those_before_submits() -> None:
    order = await grant_order(
        RequestBudget(per_minute=1, window=0.1),
        [
            ("submit", Priority.SUBMIT, None),
            ("status", Priority.STATUS, None),
            ("result", Priority.RESULT, None),
        ],
    )
    assert order == ["result", "status", "submit"]


async def test_members_take_turns_and_arrival_decides_within_a_turn() -> None:
    order = await grant_order(
        RequestBudget(per_minute=1, window=0.1),
        [
            ("ann 1", Priority.SUBMIT, "ann"),
            ("ann 2", Priority.SUBMIT, "ann"),
            ("ann 3", Priority.SUBMIT, "ann"),
            ("bob 1", Priority.SUBMIT, "bob"),
            ("cid 1", Priority.SUBMIT, "cid"),
            ("bob 2", Priority.SUBMIT, "bob"),
        ],
    )
    assert order == ["ann 1", "bob 1", "cid 1", "ann 2", "bob 2", "ann 3"]


async def test_the_window_still_holds_whatever_the_order() -> None:
    clock = [0.0]
    budget = RequestBudget(per_minute=2, window=10.0, clock=lambda: clock[0])
    await budget.acquire(priority=Priority.SUBMIT)
    await budget.acquire(priority=Priority.RESULT)
    assert budget.utilisation() == 1.0
    waiting = asyncio.create_task(budget.acquire(priority=Priority.RESULT))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    clock[0] = 10.5
    async with budget._changed:  # the clock is made up, so the waiter is woken by hand
        budget._changed.notify_all()
    await asyncio.wait_for(waiting, timeout=2)


@pytest.fixture
async def server() -> AsyncIterator[SegmindServer]:
    server = SegmindServer(SegmindServerSettings(queue_seconds=0.1, seconds_per_step=0.005, workers=8))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(f"sqlite:///{tmp_path}/order.sqlite3")
    yield store
    await store.close()


async def job_for(service: JobService, user_id: int, prompt: str) -> JobRecord:
    request = GenerationRequest(prompt=prompt, img_width=512, img_height=512)
    reservation = await service.quota.reserve(user_id, request.samples)
    assert isinstance(reservation, Reservation)
    now = time.time()
    return JobRecord(
        id=new_job_id(),
        user_id=user_id,
        guild_id=1,
        channel_id=2,
        request=request.to_payload(),
        reservation_id=reservation.id,
        state=JobState.PENDING,
        created_at=now,
        updated_at=now,
    )


async def test_a_member_with_one_job_is_sent_before_another_members_burst_over_real_sockets(
    server: SegmindServer, store: Store
) -> None:
    async with aiohttp.ClientSession() as session:
        budget = RequestBudget(per_minute=1, window=0.3)
        client = SegmindClient(
            session,
            api_key="k",
            base_url=server.base_url,
            budget=budget,
            durations=DurationModel(seconds_per_unit=0.005, queue_seconds=0.1),
        )
        quota = QuotaGuard(store, QuotaLimits(daily_images=10, max_concurrent=5), frozenset())
        service = JobService(client, store, quota, session, credits_cooloff=60, rate_limit_max_wait=60.0)
        await budget.acquire()  # someone else's request has just filled the window
        burst = [await job_for(service, 1, f"burst {n}") for n in range(4)]
        single = await job_for(service, 2, "single")
        seen: list[Progress] = []
        runs = [asyncio.create_task(service.run(job, lambda _p: None)) for job in burst]
        await asyncio.sleep(0.05)
        runs.append(asyncio.create_task(service.run(single, seen.append)))
        await asyncio.wait_for(asyncio.gather(*runs), timeout=60)

    prompts = [record.payload["prompt"] for record in server.stats.submits]
    assert prompts.index("single") == 1, prompts
    waiting = [p for p in seen if p.kind is ProgressKind.WAITING_FOR_SLOT]
    assert waiting and waiting[0].position is not None and waiting[0].position >= 2
    # The member is told when the images are likely ready: after the wait for the slot, not before.
    assert waiting[0].ready_at is not None and waiting[0].ready_at > time.time() - 60


async def test_a_submit_leaves_room_in_the_window_for_the_jobs_already_sent() -> None:
    budget = RequestBudget(per_minute=4, window=0.5)
    budget.follow_ups = lambda: 2  # one job at Segmind: a check and its result still to come
    await budget.acquire(priority=Priority.SUBMIT)
    await budget.acquire(priority=Priority.SUBMIT)  # 2 sent + 2 to come: the window is spoken for
    order: list[str] = []

    async def ask(name: str, priority: Priority) -> None:
        await budget.acquire(priority=priority)
        order.append(name)

    submit = asyncio.create_task(ask("submit", Priority.SUBMIT))
    await asyncio.sleep(0.05)
    status = asyncio.create_task(ask("status", Priority.STATUS))
    await asyncio.wait_for(status, timeout=0.3)  # the room kept for it: no wait
    assert order == ["status"]
    await asyncio.wait_for(submit, timeout=3)  # once the first sends have left the window
    assert order == ["status", "submit"]
