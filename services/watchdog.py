"""Noticing a blocked event loop: something ran without yielding, and every member's command waited."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

# Often enough that a stall of a few tens of milliseconds is seen, rarely enough to cost nothing.
DEFAULT_TICK_SECONDS = 0.05


class LoopWatchdog:
    """A task that sleeps one tick at a time and measures how late it woke.

    The loop wakes a sleeping task on time unless something else held it: how late the tick came is how
    long the loop was blocked (one slow callback, or many queued ones). A wake later than `threshold_ms`
    logs a WARNING "event loop blocked for N ms", so an operator can see the bot fell behind and by how
    much. `longest` keeps the worst lateness seen, for whoever wants the figure without the log.
    """

    def __init__(self, threshold_ms: float, *, tick: float = DEFAULT_TICK_SECONDS) -> None:
        if threshold_ms <= 0:
            raise ValueError(f"threshold_ms must be > 0, got {threshold_ms}")
        self.threshold_ms = threshold_ms
        self.tick = tick
        self.longest = 0.0  # seconds
        self._task: asyncio.Task[None] | None = None

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
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.tick
            await asyncio.sleep(self.tick)
            late = loop.time() - expected
            self.longest = max(self.longest, late)
            if late * 1000 > self.threshold_ms:
                log.warning("event loop blocked for %d ms", round(late * 1000))
