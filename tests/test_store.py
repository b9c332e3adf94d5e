"""One suite for every Store backend: SQLite always, Redis when reachable (required when REQUIRE_REDIS=1)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.store import (
    JobRecord,
    JobState,
    QuotaLimits,
    QuotaRefusal,
    Reservation,
    Store,
    new_job_id,
    open_store,
)
from services.store.base import UsageCounts, UsageRow, new_reservation_id
from services.store.redis_store import RedisStore

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_REDIS = os.environ.get("REQUIRE_REDIS") == "1"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Real wall-clock based so the SQLite store's retention pruning at open never touches test records.
NOW = float(int(time.time()))
HOUR = 3600.0
DAY = 24 * HOUR
LIMITS = QuotaLimits(daily_images=5, max_concurrent=2)
ROOMY = QuotaLimits(daily_images=5, max_concurrent=100)

_redis_problem: list[str] = []


async def _redis_unreachable() -> str | None:
    """Why Redis cannot be used for tests, or None if it can; checked once per session."""
    if not _redis_problem:
        client = aioredis.from_url(REDIS_URL, socket_connect_timeout=1.0)
        try:
            await client.ping()
            _redis_problem.append("")
        except (OSError, aioredis.RedisError) as exc:
            _redis_problem.append(f"Redis at {REDIS_URL} is unreachable ({exc}); set TEST_REDIS_URL")
        finally:
            await client.aclose()
    return _redis_problem[0] or None


async def _require_redis() -> None:
    problem = await _redis_unreachable()
    if problem:
        if REQUIRE_REDIS:
            pytest.fail(f"REQUIRE_REDIS=1 but {problem}")
        pytest.skip(problem)


@dataclass
class Backend:
    """Opens stores that share one database, so tests can use several instances or reopen."""

    kind: str
    url: str
    key_prefix: str | None = None
    opened: list[Store] = field(default_factory=list)

    async def open(self) -> Store:
        store = await open_store(self.url, key_prefix=self.key_prefix)
        self.opened.append(store)
        return store

    async def close_all(self) -> None:
        for store in self.opened:
            await store.close()
        self.opened.clear()


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        backend = Backend("sqlite", f"sqlite:///{tmp_path / 'store.sqlite3'}")
        yield backend
        await backend.close_all()
        return
    await _require_redis()
    prefix = f"test:{uuid.uuid4().hex}:"
    backend = Backend("redis", REDIS_URL, key_prefix=prefix)
    try:
        yield backend
    finally:
        await backend.close_all()
        await _delete_prefix(prefix)


async def _delete_prefix(prefix: str) -> None:
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()


async def _reserve_ok(
    store: Store, user_id: int, images: int, limits: QuotaLimits, now: float
) -> Reservation:
    result = await store.reserve(user_id, images, limits, now)
    assert isinstance(result, Reservation), result
    return result


async def _refused(store: Store, user_id: int, images: int, limits: QuotaLimits, now: float) -> QuotaRefusal:
    result = await store.reserve(user_id, images, limits, now)
    assert isinstance(result, QuotaRefusal), result
    return result


# --- quota ---


async def test_reserve_within_limits(store: Store) -> None:
    reservation = await _reserve_ok(store, 1, 2, LIMITS, NOW)
    assert (reservation.user_id, reservation.images, reservation.created_at) == (1, 2, NOW)

    usage = await store.usage(1, LIMITS, NOW + 1)
    assert usage.used_images == 2
    assert usage.remaining_images == 3
    assert usage.in_flight == 1
    assert (usage.daily_limit, usage.max_concurrent) == (5, 2)
    assert usage.resets_at == NOW + DAY


async def test_usage_of_unknown_user_is_empty(store: Store) -> None:
    usage = await store.usage(404, LIMITS, NOW)
    assert (usage.used_images, usage.remaining_images, usage.in_flight, usage.resets_at) == (0, 5, 0, None)


async def test_daily_refusal_reports_remaining_and_when_the_request_fits(store: Store) -> None:
    await store.commit((await _reserve_ok(store, 1, 2, ROOMY, NOW - 23 * HOUR)).id)
    await store.commit((await _reserve_ok(store, 1, 2, ROOMY, NOW - 10 * HOUR)).id)

    assert isinstance(await store.reserve(1, 1, ROOMY, NOW), Reservation)
    # 5 of 5 used now; the oldest two images leave the window in one hour.
    refusal = await _refused(store, 1, 2, ROOMY, NOW)
    assert refusal.reason == "daily"
    assert refusal.remaining_images == 0
    assert refusal.in_flight == 1
    assert refusal.resets_at == NOW + HOUR
    assert not refusal.exceeds_daily_limit
    assert (refusal.requested_images, refusal.daily_limit) == (2, 5)
    # Three images need the second batch to leave as well.
    assert (await _refused(store, 1, 3, ROOMY, NOW)).resets_at == NOW + 14 * HOUR
    # Five images need everything gone, including the one reserved just now.
    assert (await _refused(store, 1, 5, ROOMY, NOW)).resets_at == NOW + DAY


async def test_rolling_window_counts_23_hours_ago_but_not_25(store: Store) -> None:
    await store.commit((await _reserve_ok(store, 1, 5, LIMITS, NOW - 23 * HOUR)).id)
    await store.commit((await _reserve_ok(store, 2, 5, LIMITS, NOW - 25 * HOUR)).id)

    assert (await _refused(store, 1, 1, LIMITS, NOW)).remaining_images == 0
    assert isinstance(await store.reserve(2, 5, LIMITS, NOW), Reservation)
    # Exactly one window later the old usage no longer counts.
    assert isinstance(await store.reserve(1, 1, LIMITS, NOW + HOUR), Reservation)


async def test_request_larger_than_the_daily_limit_never_fits(store: Store) -> None:
    refusal = await _refused(store, 1, 6, LIMITS, NOW)
    assert refusal.reason == "daily"
    assert refusal.resets_at is None
    assert refusal.exceeds_daily_limit
    assert refusal.remaining_images == 5


async def test_concurrent_refusal_until_a_reservation_settles(store: Store) -> None:
    first = await _reserve_ok(store, 1, 1, LIMITS, NOW)
    second = await _reserve_ok(store, 1, 1, LIMITS, NOW)
    refusal = await _refused(store, 1, 1, LIMITS, NOW)
    assert refusal.reason == "concurrent"
    assert (refusal.in_flight, refusal.remaining_images, refusal.resets_at) == (2, 3, None)

    await store.commit(first.id)
    third = await _reserve_ok(store, 1, 1, LIMITS, NOW)
    await store.refund(second.id)
    await _reserve_ok(store, 1, 1, LIMITS, NOW)
    assert (await store.usage(1, LIMITS, NOW)).in_flight == 2
    await store.refund(third.id)
    assert (await store.usage(1, LIMITS, NOW)).in_flight == 1


async def test_daily_limit_is_reported_before_concurrency(store: Store) -> None:
    await _reserve_ok(store, 1, 2, LIMITS, NOW)
    await _reserve_ok(store, 1, 2, LIMITS, NOW)
    assert (await _refused(store, 1, 2, LIMITS, NOW)).reason == "daily"
    assert (await _refused(store, 1, 1, LIMITS, NOW)).reason == "concurrent"


async def test_refund_returns_images(store: Store) -> None:
    reservation = await _reserve_ok(store, 1, 5, LIMITS, NOW)
    await _refused(store, 1, 1, LIMITS, NOW)
    await store.refund(reservation.id)
    usage = await store.usage(1, LIMITS, NOW)
    assert (usage.used_images, usage.remaining_images, usage.in_flight, usage.resets_at) == (0, 5, 0, None)
    await _reserve_ok(store, 1, 5, LIMITS, NOW)


async def test_commit_keeps_images_and_a_later_refund_is_a_no_op(store: Store) -> None:
    reservation = await _reserve_ok(store, 1, 3, LIMITS, NOW)
    await store.commit(reservation.id)
    await store.commit(reservation.id)
    await store.refund(reservation.id)
    usage = await store.usage(1, LIMITS, NOW)
    assert (usage.used_images, usage.in_flight) == (3, 0)


async def test_refund_is_idempotent_and_final(store: Store) -> None:
    reservation = await _reserve_ok(store, 1, 3, LIMITS, NOW)
    await store.refund(reservation.id)
    await store.refund(reservation.id)
    await store.commit(reservation.id)
    usage = await store.usage(1, LIMITS, NOW)
    assert (usage.used_images, usage.in_flight) == (0, 0)


async def test_unknown_reservation_ids_are_ignored(store: Store) -> None:
    for reservation_id in ("", "nope", "12.unknown", "x.y"):
        await store.commit(reservation_id)
        await store.refund(reservation_id)


async def test_users_have_separate_quotas(store: Store) -> None:
    await _reserve_ok(store, 1, 5, LIMITS, NOW)
    await _reserve_ok(store, 2, 5, LIMITS, NOW)
    assert (await store.usage(2, LIMITS, NOW)).used_images == 5


async def test_a_member_has_a_quota_in_each_server_and_in_direct_messages(store: Store) -> None:
    in_one = await store.reserve(1, 5, LIMITS, NOW, guild_id=10)
    assert isinstance(in_one, Reservation)
    assert isinstance(await store.reserve(1, 1, LIMITS, NOW, guild_id=10), QuotaRefusal)
    # The same member in another server, and in direct messages, starts afresh.
    assert isinstance(await store.reserve(1, 5, LIMITS, NOW, guild_id=20), Reservation)
    assert isinstance(await store.reserve(1, 2, LIMITS, NOW), Reservation)
    assert (await store.usage(1, LIMITS, NOW, guild_id=10)).used_images == 5
    assert (await store.usage(1, LIMITS, NOW)).used_images == 2

    await store.refund(in_one.id)  # the id alone finds the server's quota
    assert (await store.usage(1, LIMITS, NOW, guild_id=10)).used_images == 0
    assert (await store.usage(1, LIMITS, NOW, guild_id=20)).used_images == 5


async def test_a_job_reserves_in_its_own_server(store: Store) -> None:
    job = _job(1, guild_id=10, reservation_id=new_reservation_id(1, 10))
    assert await store.reserve_job(job, 5, LIMITS, NOW) == job
    assert (await store.usage(1, LIMITS, NOW, guild_id=10)).used_images == 5
    assert (await store.usage(1, LIMITS, NOW)).used_images == 0
    # A reservation id made for another server does not fit the job.
    with pytest.raises(ValueError, match="member and server"):
        await store.reserve_job(
            _job(1, guild_id=10, reservation_id=new_reservation_id(1, 20)), 1, LIMITS, NOW
        )


async def test_reserving_no_images_is_an_error(store: Store) -> None:
    with pytest.raises(ValueError, match="at least 1 image"):
        await store.reserve(1, 0, LIMITS, NOW)


async def test_concurrent_reserves_never_exceed_the_quota(store: Store) -> None:
    await _reserve_ok(store, 1, 2, ROOMY, NOW - HOUR)
    results = await asyncio.gather(*(store.reserve(1, 1, ROOMY, NOW) for _ in range(10)))
    assert sum(isinstance(r, Reservation) for r in results) == 3
    assert all(r.reason == "daily" for r in results if isinstance(r, QuotaRefusal))
    assert (await store.usage(1, ROOMY, NOW)).used_images == 5


async def test_concurrent_reserves_across_store_instances(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    await _reserve_ok(first, 1, 2, ROOMY, NOW - HOUR)
    calls = [(first if i % 2 else second).reserve(1, 1, ROOMY, NOW) for i in range(10)]
    results = await asyncio.gather(*calls)
    assert sum(isinstance(r, Reservation) for r in results) == 3
    assert (await second.usage(1, ROOMY, NOW)).used_images == 5


async def test_cancelled_reserve_leaves_the_store_usable(store: Store) -> None:
    limits = QuotaLimits(daily_images=100, max_concurrent=100)
    granted = 0
    # Cancel at successive scheduling points so every await inside reserve() gets hit by one of them.
    for steps in range(12):
        task = asyncio.create_task(store.reserve(1, 1, limits, NOW))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            granted += isinstance(await task, Reservation)
        assert isinstance(await store.reserve(1, 1, limits, NOW), Reservation)
        granted += 1
    usage = await store.usage(1, limits, NOW)
    # A reserve cancelled after its write landed leaves a reservation the caller never saw; it
    # counts until it leaves the window, which is the accepted cost of cancelling mid-call.
    assert granted <= usage.used_images <= 24


CROSS_PROCESS_SNIPPET = """
import asyncio, sys, time
from services.store import QuotaLimits, Reservation, open_store

async def main(url, prefix, start, now, attempts, daily):
    store = await open_store(url, key_prefix=prefix or None)
    try:
        limits = QuotaLimits(daily_images=daily, max_concurrent=1000)
        await asyncio.sleep(max(0.0, start - time.time()))
        results = []
        for _ in range(attempts):
            results.append(await store.reserve(7, 1, limits, now))
        print(sum(isinstance(r, Reservation) for r in results))
    finally:
        await store.close()

url, prefix, start, now, attempts, daily = sys.argv[1:]
asyncio.run(main(url, prefix, float(start), float(now), int(attempts), int(daily)))
"""


def test_stores_opening_one_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    # Shard processes started together on one new file: each store on a thread of its own with its own loop
    # (SQLite locks the file the same for connections of one process as of many), and many rounds, since
    # the clash happens in a few.
    def open_and_close(path: Path, together: threading.Barrier, errors: list[BaseException]) -> None:
        async def main() -> None:
            together.wait()
            store = await open_store(f"sqlite:///{path}")
            await store.close()

        try:
            asyncio.run(main())
        except Exception as error:
            errors.append(error)

    errors: list[BaseException] = []
    for round_ in range(40):
        together = threading.Barrier(4)
        path = tmp_path / f"round-{round_}" / "jobs.sqlite3"
        openers = [threading.Thread(target=open_and_close, args=(path, together, errors)) for _ in range(4)]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join()
    assert errors == []


async def test_two_processes_share_the_quota_exactly(backend: Backend) -> None:
    daily, attempts = 25, 20
    start = time.time() + 1.0  # both processes begin together once their imports are done
    args = [backend.url, backend.key_prefix or "", repr(start), repr(NOW), str(attempts), str(daily)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CROSS_PROCESS_SNIPPET,
            *args,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [await process.communicate() for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()
    granted = [int(stdout) for stdout, _ in outputs]
    assert sum(granted) == daily, granted
    store = await backend.open()
    usage = await store.usage(7, QuotaLimits(daily_images=daily, max_concurrent=1000), NOW)
    assert (usage.used_images, usage.in_flight) == (daily, daily)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_quota_matches_a_reference_model(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    limits = QuotaLimits(daily_images=6, max_concurrent=3, window_seconds=10 * HOUR)
    model: dict[str, tuple[int, int, float, str]] = {}  # id -> user, images, created_at, state
    now = NOW
    for _ in range(120):
        now += rng.choice([0.0, 0.5, 60.0, HOUR, 3 * HOUR])
        user = rng.choice([1, 2])
        action = rng.random()
        if action < 0.5:
            images = rng.randint(1, 4)
            expected = _model_reserve(model, user, images, limits, now)
            result = await store.reserve(user, images, limits, now)
            if expected is None:
                assert isinstance(result, Reservation), result
                model[result.id] = (user, images, now, "reserved")
            else:
                assert isinstance(result, QuotaRefusal), (result, expected)
                assert (
                    result.reason,
                    result.remaining_images,
                    result.in_flight,
                    result.resets_at,
                ) == expected
        elif model and action < 0.8:
            reservation_id = rng.choice(sorted(model))
            owner, images, created_at, state = model[reservation_id]
            settle = rng.choice(["commit", "refund"])
            await getattr(store, settle)(reservation_id)
            if state == "reserved":
                model[reservation_id] = (
                    owner,
                    images,
                    created_at,
                    "committed" if settle == "commit" else "refunded",
                )
        else:
            usage = await store.usage(user, limits, now)
            counted = _model_counted(model, user, limits, now)
            assert usage.used_images == sum(images for images, _, _ in counted)
            assert usage.in_flight == sum(1 for _, _, state in counted if state == "reserved")
            assert usage.resets_at == (
                min(t for _, t, _ in counted) + limits.window_seconds if counted else None
            )


def _model_counted(
    model: dict[str, tuple[int, int, float, str]], user: int, limits: QuotaLimits, now: float
) -> list[tuple[int, float, str]]:
    return sorted(
        (
            (images, created_at, state)
            for owner, images, created_at, state in model.values()
            if owner == user and state != "refunded" and created_at > now - limits.window_seconds
        ),
        key=lambda entry: entry[1],
    )


def _model_reserve(
    model: dict[str, tuple[int, int, float, str]], user: int, images: int, limits: QuotaLimits, now: float
) -> tuple[str, int, int, float | None] | None:
    counted = _model_counted(model, user, limits, now)
    used = sum(n for n, _, _ in counted)
    in_flight = sum(1 for _, _, state in counted if state == "reserved")
    remaining = max(0, limits.daily_images - used)
    if used + images > limits.daily_images:
        resets_at = None
        if images <= limits.daily_images:
            left = used
            for n, created_at, _ in counted:
                left -= n
                if left + images <= limits.daily_images:
                    resets_at = created_at + limits.window_seconds
                    break
        return ("daily", remaining, in_flight, resets_at)
    if in_flight >= limits.max_concurrent:
        return ("concurrent", remaining, in_flight, None)
    return None


# --- jobs ---


def _job(
    user_id: int = 1, created_at: float = NOW, state: JobState = JobState.PENDING, **changes: object
) -> JobRecord:
    job = JobRecord(
        id=new_job_id(),
        user_id=user_id,
        guild_id=None,
        channel_id=None,
        request={"prompt": "a lighthouse"},
        reservation_id=None,
        state=state,
        created_at=created_at,
        updated_at=created_at,
    )
    return job.evolve(created_at, **changes)


async def test_job_roundtrip_keeps_every_field(store: Store) -> None:
    job = JobRecord(
        id=new_job_id(),
        user_id=123456789012345678,
        guild_id=223456789012345678,
        channel_id=323456789012345678,
        request={
            "prompt": "a castle",
            "samples": 2,
            "seed": 999_999_999_999_999,
            "guidance": 7.5,
            "nested": {"list": [1, "two", None, True]},
        },
        reservation_id="123456789012345678.abc",
        state=JobState.COMPLETED,
        created_at=NOW + 0.123456,
        updated_at=NOW + 9.876543,
        interaction_id=423456789012345678,
        interaction_token="token-ÄÖ-✓",
        interaction_created_at=NOW + 0.5,
        message_id=523456789012345678,
        application_id=623456789012345678,
        segmind_request_id="seg-req-1",
        result={"urls": ["https://example.invalid/a.png"], "seed": 42, "metrics": {"seconds": 3.25}},
        error="temporary: retried",
        origin="same_seed",
    )
    await store.save_job(job)
    loaded = await store.get_job(job.id)
    assert loaded == job
    assert isinstance(loaded.state, JobState)


async def test_a_record_with_an_integer_past_64_bits_is_saved_all_the_same(store: Store) -> None:
    # Segmind's metrics are an answer from outside: a number the fast encoder refuses must not lose the job.
    job = _job(state=JobState.COMPLETED, result={"outputs": [], "metrics": {"queue_time": 10**30}})
    await store.save_job(job)
    assert await store.get_job(job.id) == job


async def test_settling_a_job_saves_it_settles_its_reservation_and_counts_its_usage(store: Store) -> None:
    day = "2026-12-01"
    billed = _job(1, guild_id=10, reservation_id=new_reservation_id(1, 10))
    refunded = _job(1, guild_id=10, reservation_id=new_reservation_id(1, 10))
    for job in (billed, refunded):
        assert await store.reserve_job(job, 2, LIMITS, NOW) == job
    completed = billed.evolve(NOW + 9, state=JobState.COMPLETED, segmind_request_id="r1")
    await store.settle_job(
        completed, billed=True, day=day, counts=UsageCounts(jobs=1, images=2, gpu_seconds=1.5)
    )
    failed = refunded.evolve(NOW + 9, state=JobState.FAILED, error="no")
    await store.settle_job(failed, billed=False, day=day, counts=UsageCounts(failed=1))

    assert await store.get_job(billed.id) == completed
    assert await store.get_job(refunded.id) == failed
    usage = await store.usage(1, LIMITS, NOW + 10, guild_id=10)
    assert (usage.used_images, usage.in_flight) == (2, 0)  # the refund gave its images back
    assert await store.usage_between(10, day, day) == [
        UsageRow(day, 1, UsageCounts(jobs=1, images=2, failed=1, gpu_seconds=1.5))
    ]
    # Settled once: a second settle of the same reservation changes nothing.
    await store.settle_job(failed, billed=False, day=day, counts=UsageCounts())
    assert (await store.usage(1, LIMITS, NOW + 10, guild_id=10)).used_images == 2


async def test_settling_a_direct_message_job_counts_no_server_usage(store: Store) -> None:
    job = _job(2, reservation_id=new_reservation_id(2, None))
    assert await store.reserve_job(job, 1, LIMITS, NOW) == job
    done = job.evolve(NOW + 5, state=JobState.COMPLETED)
    await store.settle_job(done, billed=True, day="2026-12-01", counts=UsageCounts(jobs=1, images=1))
    assert await store.get_job(job.id) == done
    assert (await store.usage(2, LIMITS, NOW + 6)).used_images == 1


async def test_get_unknown_job_is_none(store: Store) -> None:
    assert await store.get_job("missing") is None


async def test_save_job_upserts(store: Store) -> None:
    job = _job()
    await store.save_job(job)
    updated = job.evolve(NOW + 5, state=JobState.SUBMITTED, segmind_request_id="r1")
    await store.save_job(updated)
    assert await store.get_job(job.id) == updated
    assert [j.id for j in await store.recent_jobs(1)] == [job.id]


async def test_unfinished_jobs_filters_by_state_and_age(store: Store) -> None:
    old = _job(created_at=NOW - 2 * HOUR)
    jobs = {state: _job(created_at=NOW + index, state=state) for index, state in enumerate(JobState)}
    for job in [old, *jobs.values()]:
        await store.save_job(job)

    found = await store.unfinished_jobs(created_after=NOW - HOUR)
    assert [job.id for job in found] == [
        jobs[s].id for s in (JobState.PENDING, JobState.SUBMITTING, JobState.SUBMITTED, JobState.COMPLETED)
    ]
    assert (await store.unfinished_jobs(NOW - 3 * HOUR))[0].id == old.id
    # created_after is exclusive.
    assert jobs[JobState.PENDING].id not in [job.id for job in await store.unfinished_jobs(NOW)]

    await store.save_job(jobs[JobState.SUBMITTED].evolve(NOW + 10, state=JobState.FAILED, error="boom"))
    await store.save_job(old.evolve(NOW + 10, state=JobState.DELIVERED))
    remaining = await store.unfinished_jobs(NOW - 3 * HOUR)
    assert [job.id for job in remaining] == [
        jobs[JobState.PENDING].id,
        jobs[JobState.SUBMITTING].id,
        jobs[JobState.COMPLETED].id,
    ]


async def test_recent_jobs_newest_first_per_user(store: Store) -> None:
    mine = [_job(user_id=1, created_at=NOW + i, state=JobState.DELIVERED) for i in range(5)]
    theirs = [_job(user_id=2, created_at=NOW + i + 0.5) for i in range(3)]
    for job in [*mine, *theirs]:
        await store.save_job(job)

    assert [j.id for j in await store.recent_jobs(1, limit=3)] == [j.id for j in reversed(mine)][:3]
    assert [j.id for j in await store.recent_jobs(1)] == [j.id for j in reversed(mine)]
    assert [j.id for j in await store.recent_jobs(2)] == [j.id for j in reversed(theirs)]
    assert await store.recent_jobs(3) == []
    assert await store.recent_jobs(1, limit=0) == []


# --- leases ---


async def test_lease_has_one_owner_until_it_expires(store: Store) -> None:
    assert await store.acquire_lease("job1", "a", ttl=30, now=NOW)
    assert not await store.acquire_lease("job1", "b", ttl=30, now=NOW + 10)
    assert await store.acquire_lease("job2", "b", ttl=30, now=NOW + 10)
    # Renewal by the owner extends the lease past its first expiry.
    assert await store.acquire_lease("job1", "a", ttl=30, now=NOW + 20)
    assert not await store.acquire_lease("job1", "b", ttl=30, now=NOW + 40)
    assert await store.acquire_lease("job1", "b", ttl=30, now=NOW + 50)
    assert not await store.acquire_lease("job1", "a", ttl=30, now=NOW + 51)


async def test_lease_release_only_by_owner(store: Store) -> None:
    assert await store.acquire_lease("job1", "a", ttl=30, now=NOW)
    await store.release_lease("job1", "b")
    assert not await store.acquire_lease("job1", "b", ttl=30, now=NOW + 1)
    await store.release_lease("job1", "a")
    assert await store.acquire_lease("job1", "b", ttl=30, now=NOW + 1)
    await store.release_lease("never-leased", "a")


async def test_concurrent_lease_acquisition_has_one_winner(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    attempts = [(first if i % 2 else second).acquire_lease("job1", f"owner{i}", 30, NOW) for i in range(8)]
    assert sum(await asyncio.gather(*attempts)) == 1


# --- flags ---


async def test_flags_expire(store: Store) -> None:
    assert await store.get_flag("credits", NOW) is None
    await store.set_flag("credits", NOW + 600.25)
    assert await store.get_flag("credits", NOW) == NOW + 600.25
    assert await store.get_flag("credits", NOW + 600.25) is None
    await store.set_flag("credits", NOW + 60)
    assert await store.get_flag("credits", NOW) == NOW + 60
    await store.clear_flag("credits")
    assert await store.get_flag("credits", NOW) is None
    await store.clear_flag("never-set")


# --- persistence and opening ---


async def test_data_survives_close_and_reopen(backend: Backend) -> None:
    store = await backend.open()
    reservation = await _reserve_ok(store, 1, 2, LIMITS, NOW)
    job = _job(reservation_id=reservation.id)
    await store.save_job(job)
    await store.acquire_lease(job.id, "a", ttl=30, now=NOW)
    await store.set_flag("credits", NOW + 60)
    await backend.close_all()

    reopened = await backend.open()
    assert (await reopened.usage(1, LIMITS, NOW)).used_images == 2
    await reopened.commit(reservation.id)
    assert (await reopened.usage(1, LIMITS, NOW)).in_flight == 0
    assert await reopened.get_job(job.id) == job
    assert [j.id for j in await reopened.unfinished_jobs(NOW - 1)] == [job.id]
    assert not await reopened.acquire_lease(job.id, "b", ttl=30, now=NOW + 1)
    assert await reopened.get_flag("credits", NOW) == NOW + 60


@pytest.mark.parametrize(
    "url",
    [
        "postgres://localhost/bot",
        "data/bot.sqlite3",
        "",
        "sqlite://data/bot.sqlite3",
        "sqlite:///",
        "mysql://x",
    ],
)
async def test_open_store_rejects_unknown_urls(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite:///"):
        await open_store(url)


async def test_open_store_error_hides_passwords() -> None:
    with pytest.raises(ValueError) as excinfo:
        await open_store("postgres://bot:hunter2@db/bot")
    assert "hunter2" not in str(excinfo.value)
    assert "redis://" in str(excinfo.value)


async def test_sqlite_relative_path_creates_directories_and_uses_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_store("sqlite:///nested/dir/bot.sqlite3")
    try:
        await store.set_flag("x", NOW + 1)
    finally:
        await store.close()
    path = tmp_path / "nested" / "dir" / "bot.sqlite3"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_sqlite_file_from_before_per_server_quotas_keeps_its_reservations(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(
            "CREATE TABLE reservations (id TEXT PRIMARY KEY, user_id INTEGER NOT NULL,"
            " images INTEGER NOT NULL, created_at REAL NOT NULL, state TEXT NOT NULL);"
            "CREATE INDEX reservations_user_time ON reservations (user_id, created_at);"
            f"INSERT INTO reservations VALUES ('1.old', 1, 3, {NOW}, 'reserved');"
            "PRAGMA user_version=4;"
        )
    store = await open_store(f"sqlite:///{path}")
    try:
        # An old reservation is the member's in direct messages, and still settles by its id.
        usage = await store.usage(1, LIMITS, NOW)
        assert (usage.used_images, usage.in_flight) == (3, 1)
        await store.commit("1.old")
        assert (await store.usage(1, LIMITS, NOW)).in_flight == 0
        assert isinstance(await store.reserve(1, 5, LIMITS, NOW, guild_id=10), Reservation)
    finally:
        await store.close()


async def test_sqlite_absolute_path_and_memory(tmp_path: Path) -> None:
    absolute = await open_store(f"sqlite:///{tmp_path}/abs.sqlite3")  # tmp_path starts with "/"
    await absolute.close()
    assert (tmp_path / "abs.sqlite3").exists()

    memory = await open_store("sqlite:///:memory:")
    try:
        await _reserve_ok(memory, 1, 1, LIMITS, NOW)
        assert (await memory.usage(1, LIMITS, NOW)).used_images == 1
    finally:
        await memory.close()


async def test_redis_key_prefix_from_url_and_argument() -> None:
    await _require_redis()
    base = f"test:{uuid.uuid4().hex}:"
    from_url = await open_store(f"{REDIS_URL}?prefix={base}url:")
    from_arg = await open_store(f"{REDIS_URL}?prefix={base}url:", key_prefix=f"{base}arg:")
    default = await open_store(REDIS_URL)
    try:
        backends = [store.backend for store in (from_url, from_arg, default)]
        assert all(isinstance(backend, RedisStore) for backend in backends)
        assert tuple(backend.prefix for backend in backends) == (  # type: ignore[attr-defined]
            f"{base}url:",
            f"{base}arg:",
            "dreamshaper:",
        )
        await from_url.set_flag("f", NOW + 60)
        assert await from_arg.get_flag("f", NOW) is None
    finally:
        for store in (from_url, from_arg, default):
            await store.close()
        await _delete_prefix(base)


async def test_redis_unreachable_fails_at_open() -> None:
    with pytest.raises((OSError, aioredis.RedisError)):
        await open_store("redis://127.0.0.1:1/0")


async def test_reservations_still_reserved_are_listed_by_age(backend: Backend) -> None:
    store = await backend.open()
    old = await store.reserve(1, 1, LIMITS, NOW - 600)
    settled = await store.reserve(2, 1, LIMITS, NOW - 600)
    refunded = await store.reserve(3, 1, LIMITS, NOW - 600)
    young = await store.reserve(4, 1, LIMITS, NOW)
    assert all(isinstance(r, Reservation) for r in (old, settled, refunded, young))
    await store.commit(settled.id)  # type: ignore[union-attr]
    await store.refund(refunded.id)  # type: ignore[union-attr]
    assert await store.reserved_before(NOW - 300) == [old.id]  # type: ignore[union-attr]
    assert sorted(await store.reserved_before(NOW + 1)) == sorted([old.id, young.id])  # type: ignore[union-attr]


async def test_a_record_that_cannot_be_read_is_skipped_not_fatal(backend: Backend) -> None:
    store = await backend.open()
    good = _job(state=JobState.SUBMITTED)
    await store.save_job(good)
    for job_id, data in (("bad-json", "{nope"), ("bad-state", '{"id": "bad-state", "state": "paused"}')):
        if backend.kind == "sqlite":
            with sqlite3.connect(backend.url.removeprefix("sqlite:///")) as db:
                db.execute(
                    "INSERT INTO jobs (id, user_id, state, created_at, updated_at, data) VALUES (?, 1, ?, ?, ?, ?)",
                    (job_id, "pending", NOW, NOW, data),
                )
        else:
            client = aioredis.from_url(REDIS_URL)
            await client.set(f"{backend.key_prefix}job:{job_id}", data)
            await client.zadd(f"{backend.key_prefix}jobs:unfinished", {job_id: NOW})
            await client.zadd(f"{backend.key_prefix}user:1:jobs", {job_id: NOW})
            await client.aclose()
    assert [job.id for job in await store.unfinished_jobs(0.0)] == [good.id]
    assert [job.id for job in await store.recent_jobs(1)] == [good.id]
    assert await store.get_job("bad-json") is None
