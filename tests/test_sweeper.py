"""The resume sweep's loop: it outlives a failed sweep, does not burst after a slow one, stops at unload."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from cogs.delivery import JobRunner
from services.store.guarded import StoreUnavailable

INTERVAL = 0.2


class CountingSweeps:
    """Stands in for `JobRunner.sweep`: records when each sweep started and acts out a script."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.started: list[float] = []

    async def __call__(self) -> None:
        self.started.append(asyncio.get_running_loop().time())
        step = self.script[len(self.started) - 1] if len(self.started) <= len(self.script) else "ok"
        if step == "store down":
            raise StoreUnavailable("the store did not answer")
        if step == "bug":
            raise RuntimeError("a bug in one sweep")
        if step == "slow":
            await asyncio.sleep(INTERVAL * 5)


def runner_with(sweeps: CountingSweeps) -> JobRunner:
    bot = SimpleNamespace(jobs=SimpleNamespace(lease_seconds=INTERVAL), store=None, accepting_jobs=True)
    runner = JobRunner(cast(Any, bot))
    runner.sweep = sweeps  # type: ignore[method-assign]
    return runner


async def test_a_failed_sweep_does_not_stop_the_next() -> None:
    sweeps = CountingSweeps(["store down", "bug", "ok"])
    runner = runner_with(sweeps)
    await runner.cog_load()
    try:
        await asyncio.sleep(INTERVAL * 3.5)
    finally:
        await runner.cog_unload()
    assert len(sweeps.started) >= 3


async def test_a_slow_sweep_is_not_followed_by_a_burst() -> None:
    sweeps = CountingSweeps(["slow"])
    runner = runner_with(sweeps)
    await runner.cog_load()
    try:
        await asyncio.sleep(INTERVAL * 8)
    finally:
        await runner.cog_unload()
    gaps = [later - earlier for earlier, later in zip(sweeps.started, sweeps.started[1:], strict=False)]
    # After the slow first sweep (5 intervals), each next one still waits about an interval.
    assert len(gaps) >= 2
    assert min(gaps[1:]) >= INTERVAL * 0.5, gaps


async def test_sweeps_stop_at_unload() -> None:
    sweeps = CountingSweeps([])
    runner = runner_with(sweeps)
    await runner.cog_load()
    await asyncio.sleep(INTERVAL * 1.5)
    await runner.cog_unload()
    count = len(sweeps.started)
    await asyncio.sleep(INTERVAL * 3)
    assert len(sweeps.started) == count
    assert not runner.sweeper.is_running()
