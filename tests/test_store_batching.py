"""Writes grouped into transactions, a job reserved and saved in one step, flags read once a second.

SQLite commits the writes waiting together, each caller still awaiting its own durable result; a commit
that fails fails every caller whose write it held; a write that fails on its own fails alone. Both stores
reserve a job's images and save the job in one atomic step.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.store import GuardedStore, StoreUnavailable, open_store
from services.store.base import (
    JobRecord,
    JobState,
    QuotaLimits,
    QuotaRefusal,
    new_job_id,
    new_reservation_id,
)
from services.store.sqlite_store import SQLiteStore
from tests.conftest import database_url

NOW = float(int(time.time()))
ROOMY = QuotaLimits(daily_images=1000, max_concurrent=1000)


def job_for(user_id: int, *, reservation: bool = True, state: JobState = JobState.PENDING) -> JobRecord:
    return JobRecord(
        id=new_job_id(),
        user_id=user_id,
        guild_id=None,
        channel_id=None,
        request={"prompt": f"member {user_id}"},
        reservation_id=new_reservation_id(user_id) if reservation else None,
        state=state,
        created_at=NOW,
        updated_at=NOW,
    )


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[GuardedStore]:
    store = await open_store(f"sqlite:///{tmp_path / 'bot.sqlite3'}")
    yield store
    await store.close()


def backend_of(store: GuardedStore) -> SQLiteStore:
    assert isinstance(store.backend, SQLiteStore)
    return store.backend


def stored_ids(path: Path) -> set[str]:
    """What another connection (another process, or the next start) finds committed in the file."""
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT id FROM jobs")}


class CountedCommits:
    """Stands in for the store's commit: counts them, and fails the first `failures`."""

    def __init__(self, failures: int = 0) -> None:
        self.commits = 0
        self.failures = failures

    def __call__(self, db: sqlite3.Connection) -> None:
        self.commits += 1
        if self.commits <= self.failures:
            raise sqlite3.OperationalError("disk I/O error")
        db.execute("COMMIT")


# --- SQLite: one commit for many writers ---


async def test_concurrent_writes_share_commits_and_each_is_durable_when_its_await_returns(
    sqlite_store: GuardedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = CountedCommits()
    monkeypatch.setattr(backend_of(sqlite_store), "_commit", commits)
    jobs = [job_for(user) for user in range(1, 101)]
    not_yet_durable: list[str] = []

    async def take_in(job: JobRecord) -> None:
        saved = await sqlite_store.reserve_job(job, 1, ROOMY, NOW)
        assert saved == job
        # Checked the moment this caller may acknowledge: a kill from here on must not lose the job.
        if job.id not in stored_ids(tmp_path / "bot.sqlite3"):
            not_yet_durable.append(job.id)

    await asyncio.gather(*(take_in(job) for job in jobs))
    assert not_yet_durable == []
    assert stored_ids(tmp_path / "bot.sqlite3") == {job.id for job in jobs}
    # A hundred reservations and records: a handful of commits, not one (or two) per job.
    assert commits.commits <= 10, commits.commits


async def test_a_failing_commit_fails_every_caller_whose_write_it_held(
    sqlite_store: GuardedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = CountedCommits(failures=1)
    monkeypatch.setattr(backend_of(sqlite_store), "_commit", commits)
    jobs = [job_for(user) for user in range(1, 21)]
    outcomes = await asyncio.gather(*(sqlite_store.save_job(job) for job in jobs), return_exceptions=True)
    failed = [
        job for job, outcome in zip(jobs, outcomes, strict=True) if isinstance(outcome, StoreUnavailable)
    ]
    assert len(failed) == len(jobs), outcomes  # all twenty waited for that one commit
    assert "disk I/O error" in str(outcomes[0])
    # Nothing of theirs was kept, and the store carries on.
    assert stored_ids(tmp_path / "bot.sqlite3") == set()
    await sqlite_store.save_job(jobs[0])
    assert stored_ids(tmp_path / "bot.sqlite3") == {jobs[0].id}


async def test_a_write_that_fails_on_its_own_fails_alone_and_leaves_nothing(
    sqlite_store: GuardedStore, tmp_path: Path
) -> None:
    backend = backend_of(sqlite_store)
    before, after = job_for(1), job_for(2)

    def half_done_then_broken(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO flags (name, until) VALUES ('half-done', 1)")
        raise ValueError("a bug in this write")

    outcomes = await asyncio.gather(
        sqlite_store.save_job(before),
        backend._write(half_done_then_broken),
        sqlite_store.save_job(after),
        return_exceptions=True,
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], ValueError)
    assert stored_ids(tmp_path / "bot.sqlite3") == {before.id, after.id}
    assert await sqlite_store.get_flag("half-done", 0.0) is None


async def test_a_write_cancelled_before_its_transaction_leaves_nothing(
    sqlite_store: GuardedStore, tmp_path: Path
) -> None:
    kept, dropped = job_for(1), job_for(2)
    cancelled = asyncio.ensure_future(sqlite_store.save_job(dropped))
    await asyncio.sleep(0)  # its write is waiting for the next transaction
    cancelled.cancel()
    await sqlite_store.save_job(kept)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert stored_ids(tmp_path / "bot.sqlite3") == {kept.id}


async def test_a_lock_held_by_another_process_is_waited_out_without_blocking_the_loop(
    sqlite_store: GuardedStore, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "bot.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    job = job_for(1)
    saving = asyncio.ensure_future(sqlite_store.save_job(job))
    ticks = 0
    for _ in range(10):  # the loop keeps turning while the write waits for the lock
        await asyncio.sleep(0.02)
        ticks += 1
    assert not saving.done()
    # Reads need no write lock: another member's /quota or /jobs is answered meanwhile.
    assert await sqlite_store.get_job(job.id) is None
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(saving, 10)
    assert ticks == 10
    assert stored_ids(tmp_path / "bot.sqlite3") == {job.id}


# --- both stores: reserve and save in one step ---


@pytest.fixture(params=["sqlite", "redis"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[GuardedStore]:
    store = await open_store(await database_url(request.param, tmp_path))
    yield store
    await store.close()


async def test_reserve_job_saves_the_job_with_its_reservation(any_store: GuardedStore) -> None:
    job = job_for(7)
    assert await any_store.reserve_job(job, 2, ROOMY, NOW) == job
    assert await any_store.get_job(job.id) == job
    assert [found.id for found in await any_store.unfinished_jobs(0.0)] == [job.id]
    assert [found.id for found in await any_store.recent_jobs(7)] == [job.id]
    usage = await any_store.usage(7, ROOMY, NOW)
    assert (usage.used_images, usage.in_flight) == (2, 1)
    await any_store.refund(job.reservation_id or "")
    assert (await any_store.usage(7, ROOMY, NOW)).used_images == 0


async def test_a_refused_job_is_not_saved(any_store: GuardedStore) -> None:
    limits = QuotaLimits(daily_images=3, max_concurrent=10)
    first, second = job_for(8), job_for(8)
    assert await any_store.reserve_job(first, 3, limits, NOW) == first
    refusal = await any_store.reserve_job(second, 1, limits, NOW)
    assert isinstance(refusal, QuotaRefusal) and refusal.reason == "daily"
    assert await any_store.get_job(second.id) is None
    assert [found.id for found in await any_store.recent_jobs(8)] == [first.id]


async def test_concurrent_jobs_never_exceed_the_quota(any_store: GuardedStore) -> None:
    limits = QuotaLimits(daily_images=5, max_concurrent=100)
    jobs = [job_for(9) for _ in range(12)]
    outcomes = await asyncio.gather(*(any_store.reserve_job(job, 1, limits, NOW) for job in jobs))
    saved = [outcome for outcome in outcomes if isinstance(outcome, JobRecord)]
    assert len(saved) == 5
    assert {job.id for job in await any_store.unfinished_jobs(0.0)} == {job.id for job in saved}


@pytest.mark.parametrize(
    "job",
    [
        job_for(10, reservation=False),
        job_for(10).evolve(NOW, reservation_id=new_reservation_id(11)),
        job_for(10, state=JobState.DELIVERED),
    ],
    ids=["no reservation id", "another member's reservation id", "a finished job"],
)
async def test_reserve_job_refuses_a_job_that_cannot_be_taken_in(
    any_store: GuardedStore, job: JobRecord
) -> None:
    with pytest.raises(ValueError):
        await any_store.reserve_job(job, 1, ROOMY, NOW)
    assert await any_store.get_job(job.id) is None


# --- flags: read once a second, whatever the number of commands ---


class CountingFlags:
    """A backend's flags, counting the reads that reach it."""

    def __init__(self) -> None:
        self.flags: dict[str, float] = {}
        self.reads = 0

    async def get_flag(self, name: str, now: float) -> float | None:
        self.reads += 1
        await asyncio.sleep(0.01)
        until = self.flags.get(name)
        return until if until is not None and until > now else None

    async def set_flag(self, name: str, until: float) -> None:
        self.flags[name] = until

    async def clear_flag(self, name: str) -> None:
        self.flags.pop(name, None)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


async def test_a_burst_of_flag_reads_reaches_the_backend_once() -> None:
    backend = CountingFlags()
    store = GuardedStore(backend, transient=(OSError,), flag_cache_seconds=60)  # type: ignore[arg-type]
    answers = await asyncio.gather(*(store.get_flag("credits", NOW) for _ in range(200)))
    assert answers == [None] * 200
    assert await store.get_flag("credits", NOW) is None
    assert backend.reads == 1


async def test_a_flag_set_here_is_seen_at_once_and_one_set_elsewhere_within_the_cache_time() -> None:
    backend = CountingFlags()
    store = GuardedStore(backend, transient=(OSError,), flag_cache_seconds=0.2)  # type: ignore[arg-type]
    assert await store.get_flag("credits", NOW) is None
    await store.set_flag("credits", NOW + 60)
    assert await store.get_flag("credits", NOW) == NOW + 60
    assert await store.get_flag("credits", NOW + 61) is None  # still cached, and over by then
    await store.clear_flag("credits")
    assert await store.get_flag("credits", NOW) is None
    backend.flags["credits"] = NOW + 30  # set by another process sharing the store
    await asyncio.sleep(0.3)
    assert await store.get_flag("credits", NOW) == NOW + 30


async def test_more_redis_calls_at_once_than_connections_wait_their_turn(tmp_path: Path) -> None:
    store = await open_store(await database_url("redis", tmp_path))
    try:
        jobs = [job_for(user) for user in range(1, 301)]
        outcomes = await asyncio.gather(*(store.reserve_job(job, 1, ROOMY, NOW) for job in jobs))
        assert outcomes == jobs  # none refused for want of a connection
    finally:
        await store.close()
