"""One Segmind request budget for every process on one Redis store: the shared window in Redis, two
budgets drawing from it, what happens when it fails, and two real shard processes against the stand-in."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devtools.launcher import BotLauncher
from services.segmind import BudgetExhausted, RequestBudget
from services.store import GuardedStore, open_store
from services.store.base import Store
from services.store.redis_store import RedisStore
from tests.conftest import database_url
from tests.processes import bot_processes
from tests.test_shards import SECOND_CHANNEL_ID, SECOND_GUILD_ID, start_two_shards

__all__ = ["bot_processes"]

# Whose plan the requests count against, as the bot names it (a digest of the API key).
ACCOUNT = "plan-a"


@pytest.fixture
async def two_stores(tmp_path: Path) -> AsyncIterator[tuple[GuardedStore, GuardedStore]]:
    """Two stores on one fresh Redis prefix, each with a connection of its own, as two processes have."""
    url = await database_url("redis", tmp_path)
    first = await open_store(url)
    second = await open_store(url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best = first = 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


# --- the window in Redis ------------------------------------------------------------------------------


async def test_two_connections_taking_slots_at_once_are_granted_exactly_the_limit(
    two_stores: tuple[GuardedStore, GuardedStore],
) -> None:
    windows = []
    for store in two_stores:
        assert isinstance(store.backend, RedisStore)
        windows.append(store.backend.shared_request_window(ACCOUNT))
    replies = await asyncio.gather(*(windows[n % 2].take(5, 60.0) for n in range(20)))
    assert sum(1 for wait in replies if wait == 0) == 5
    assert all(0 < wait <= 60 for wait in replies if wait != 0)
    # Full for both, whoever asks.
    assert 0 < await windows[0].take(5, 60.0) <= 60
    assert 0 < await windows[1].take(5, 60.0) <= 60


async def test_a_slot_frees_when_the_oldest_send_leaves_the_window(
    two_stores: tuple[GuardedStore, GuardedStore],
) -> None:
    first, second = (store.shared_request_window(ACCOUNT) for store in two_stores)
    assert first is not None and second is not None
    assert await first.take(2, 0.4) == 0
    await asyncio.sleep(0.1)
    assert await second.take(2, 0.4) == 0
    wait = await second.take(2, 0.4)
    assert 0.2 < wait <= 0.3 + 0.05  # until the first send, 0.1 s older, leaves
    await asyncio.sleep(wait)
    assert await first.take(2, 0.4) == 0


async def test_a_pause_from_one_process_holds_the_other_and_only_ever_extends(
    two_stores: tuple[GuardedStore, GuardedStore],
) -> None:
    first, second = (store.shared_request_window(ACCOUNT) for store in two_stores)
    assert first is not None and second is not None
    await first.pause(30)
    assert 29 < await second.take(100, 60.0) <= 30
    await second.pause(1)  # a shorter pause must not end a longer one
    assert 28 < await first.take(100, 60.0) <= 30


async def test_bots_with_different_keys_on_one_store_have_budgets_of_their_own(
    two_stores: tuple[GuardedStore, GuardedStore],
) -> None:
    mine, theirs = two_stores[0].shared_request_window(ACCOUNT), two_stores[1].shared_request_window("plan-b")
    assert mine is not None and theirs is not None
    assert await mine.take(1, 60.0) == 0
    assert await mine.take(1, 60.0) > 0
    assert await theirs.take(1, 60.0) == 0
    await mine.pause(30)
    assert await theirs.take(2, 60.0) == 0


async def test_sqlite_has_no_shared_window(tmp_path: Path) -> None:
    store: Store = await open_store(await database_url("sqlite", tmp_path))
    try:
        assert store.shared_request_window(ACCOUNT) is None
    finally:
        await store.close()


# --- budgets drawing from it --------------------------------------------------------------------------


async def test_two_budgets_on_one_window_keep_the_limit_together_and_both_get_slots(
    two_stores: tuple[GuardedStore, GuardedStore],
) -> None:
    limit, window, run_for = 6, 2.0, 5.0
    budgets = [
        RequestBudget(limit, window=window, shared=store.shared_request_window(ACCOUNT))
        for store in two_stores
    ]
    granted: list[tuple[float, int]] = []
    stop_at = time.monotonic() + run_for

    async def keep_asking(which: int) -> None:
        while time.monotonic() < stop_at:
            try:
                await budgets[which].acquire(max_wait=stop_at - time.monotonic())
            except BudgetExhausted:
                return
            granted.append((time.monotonic(), which))

    await asyncio.gather(*(keep_asking(n % 2) for n in range(16)))
    times = [at for at, _ in granted]
    # A little under the window: a grant is recorded here a moment after Redis's clock counted it.
    assert most_in_any_window(times, window - 0.1) <= limit
    assert len(granted) >= limit * 2  # the window kept sliding: at least the first and two later turns
    per_budget = [sum(1 for _, which in granted if which == n) for n in range(2)]
    assert min(per_budget) >= 2, per_budget
    # Neither stood still: each was granted slots in the second half of the run too.
    late = {which for at, which in granted if at > stop_at - run_for / 2}
    assert late == {0, 1}


async def test_a_429_in_one_budget_pauses_the_other(two_stores: tuple[GuardedStore, GuardedStore]) -> None:
    first, second = (RequestBudget(600, shared=store.shared_request_window(ACCOUNT)) for store in two_stores)
    first.pause_for(0.6)
    await asyncio.sleep(0.1)  # the pause is shared in the background
    waits: list[tuple[int, float]] = []
    started = time.monotonic()
    await second.acquire(lambda position, seconds: waits.append((position, seconds)))
    assert time.monotonic() - started >= 0.4
    assert waits and waits[0][0] == 1 and 0.3 < waits[0][1] <= 0.6
    # A caller that cannot wait that long is told at once, with when to expect a slot.
    first.pause_for(5)
    await asyncio.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(BudgetExhausted) as refused:
        await second.acquire(max_wait=1.0)
    assert time.monotonic() - started < 0.5
    assert refused.value.reset_at is not None


# --- a shared window that fails -----------------------------------------------------------------------


class BrokenWindow:
    def __init__(self, *, hang: bool = False) -> None:
        self.hang = hang
        self.calls = 0

    async def take(self, limit: int, window: float) -> float:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        raise ConnectionError("Redis went away")

    async def pause(self, seconds: float) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        raise ConnectionError("Redis went away")


class WindowOnlyBackend:
    """A backend whose only working part is its shared window (the budget needs nothing else)."""

    def __init__(self, window: BrokenWindow) -> None:
        self.window = window

    def shared_request_window(self, account: str) -> BrokenWindow:
        return self.window

    async def close(self) -> None:
        pass


async def test_a_failing_shared_window_leaves_the_local_window_in_charge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = BrokenWindow()
    budget = RequestBudget(3, window=60.0, shared=broken)
    with caplog.at_level(logging.WARNING, logger="services.segmind.budget"):
        for _ in range(3):
            await asyncio.wait_for(budget.acquire(), 1.0)
        # The local limit still holds.
        with pytest.raises(BudgetExhausted):
            await budget.acquire(max_wait=0.1)
        budget.pause_for(0.05)
        await asyncio.sleep(0.05)
    # One take failed, after which the window rests for a while (SHARED_RETRY_SECONDS); then the pause.
    assert broken.calls == 2
    warnings = [record for record in caplog.records if "shared request window failed" in record.message]
    assert len(warnings) == 1  # at most one a minute, however many requests met the outage


async def test_a_hung_shared_window_costs_one_timeout_not_one_per_request() -> None:
    hung = BrokenWindow(hang=True)
    store = GuardedStore(WindowOnlyBackend(hung), transient=(ConnectionError,), timeout=0.5)  # type: ignore[arg-type]
    budget = RequestBudget(600, shared=store.shared_request_window(ACCOUNT))
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(budget.acquire() for _ in range(6))), 10.0)
    # One timeout for all six (0.5 s), where a timeout each would take 3 s.
    assert time.monotonic() - started < 1.5
    assert hung.calls == 1


async def test_max_wait_holds_while_the_shared_window_hangs() -> None:
    hung = BrokenWindow(hang=True)
    budget = RequestBudget(600, shared=hung)
    started = time.monotonic()
    await asyncio.wait_for(budget.acquire(max_wait=0.2), 5.0)  # the local window has room: it goes
    assert time.monotonic() - started < 1.5  # bounded by max_wait, not by the hang


# --- two shard processes against the stand-in ---------------------------------------------------------


async def test_two_shard_processes_never_send_more_than_the_limit_together(
    bot_processes: BotLauncher, tmp_path: Path
) -> None:
    limit = 6
    await start_two_shards(
        bot_processes,
        tmp_path,
        SEGMIND_REQUESTS_PER_MINUTE=str(limit),
        QUOTA_DAILY_IMAGES="100",
        QUOTA_MAX_CONCURRENT="100",
    )
    discord = bot_processes.discord
    # Each process alone wants more than the whole limit: its key check and six submits.
    sends = []
    for n in range(12):
        where = (
            {"guild_id": discord.guild_id, "channel_id": discord.channel_id}
            if n % 2
            else {"guild_id": SECOND_GUILD_ID, "channel_id": SECOND_CHANNEL_ID}
        )
        sends.append(discord.send_slash_command("imagine", {"prompt": f"shared budget {n}"}, **where))
    await asyncio.gather(*sends)
    segmind = bot_processes.segmind
    await discord.wait_for(lambda: len(segmind.stats.requests) >= limit, timeout=20)
    await asyncio.sleep(3.0)  # room for the requests one process alone would still send
    # Output downloads come from Segmind's file host and do not count against the plan.
    assert segmind.stats.max_requests_in_window(60.0, targets=("submit", "status", "result")) == limit
