"""Noticing a blocked event loop: something ran without yielding, and every member's command waited."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Often enough that a stall of a few tens of milliseconds is seen, rarely enough to cost nothing.
DEFAULT_TICK_SECONDS = 0.05
# How much the latest tick counts in `behind`: about the last half second of ticks make it up.
BEHIND_SMOOTHING = 0.2
# `load` is 0 while the loop runs at most this late, and 1 from LOAD_FULL_SECONDS on.
LOAD_FROM_SECONDS = 0.01
LOAD_FULL_SECONDS = 0.1


class LoopWatchdog:
    """A task that sleeps one tick at a time and measures how late it woke.

    The loop wakes a sleeping task on time unless something else held it: how late the tick came is how
    long the loop was blocked (one slow callback, or many queued ones). A wake later than `threshold_ms`
    logs a WARNING "event loop blocked for N ms", so an operator can see the bot fell behind and by how
    much. `longest` keeps the worst lateness seen, for whoever wants the figure without the log, and
    `behind` how late the loop has run lately, for work that can wait while the loop catches up.
    """

    def __init__(self, threshold_ms: float, *, tick: float = DEFAULT_TICK_SECONDS) -> None:
        if threshold_ms <= 0:
            raise ValueError(f"threshold_ms must be > 0, got {threshold_ms}")
        self.threshold_ms = threshold_ms
        self.tick = tick
        self.longest = 0.0  # seconds
        self.behind = 0.0  # seconds, smoothed over the last few ticks
        # Told `behind` after every tick, by whoever sizes its work to what the loop keeps up with.
        self.on_tick: Callable[[float], None] | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> float:
        """How far behind the loop runs lately, from 0 (on time) to 1 (LOAD_FULL_SECONDS or more)."""
        return min(1.0, max(0.0, (self.behind - LOAD_FROM_SECONDS) / (LOAD_FULL_SECONDS - LOAD_FROM_SECONDS)))

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="loop-watchdog")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _watch(self) -> None:
        while True:
            # Not loop.time(): uvloop's clock counts whole milliseconds, coarse beside the thresholds.
            expected = time.monotonic() + self.tick
            await asyncio.sleep(self.tick)
            late = time.monotonic() - expected
            self.longest = max(self.longest, late)
            self.behind += BEHIND_SMOOTHING * (late - self.behind)
            if self.on_tick is not None:
                self.on_tick(self.behind)
            if late * 1000 > self.threshold_ms:
                log.warning("event loop blocked for %d ms", round(late * 1000))
