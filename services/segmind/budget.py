"""The request budget every call spends from, and the reading of Segmind's rate-limit reset header."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from services.segmind.errors import BudgetExhausted

log = logging.getLogger(__name__)

RESET_HEADER = "x-rate-limit-reset-at-utc"
MAX_RESET_AHEAD = 3600.0  # Segmind's limits are per minute: a reset further ahead than this is not real
DEFAULT_MAX_PAUSE = 120.0
# A shared window that keeps failing would otherwise put one warning in the log per request.
SHARED_WARNING_INTERVAL = 60.0
# After the shared window failed, how long requests go by the local window alone before it is tried again.
SHARED_RETRY_SECONDS = 15.0


class SharedWindow(Protocol):
    """A sliding window of sends that several processes spending one API key draw from together.

    Each call is one atomic step against every process sharing it, on one clock of its own.
    """

    async def take(self, limit: int, window: float) -> float:
        """Records a send and returns 0 when fewer than `limit` sends were made in the last `window`
        seconds and no pause is on; otherwise records nothing and returns the seconds to wait first."""
        ...

    async def pause(self, seconds: float) -> None:
        """Holds every send for `seconds` from now, unless a pause already lasts longer."""
        ...


class RequestBudget:
    """At most `per_minute` requests in any sliding 60 s window, granted first come, first served.

    Shared by every call so that polling many jobs can never exceed the plan's limit, and paused as a whole
    when Segmind answers 429, for at most `max_pause` seconds per 429.

    With a `shared` window, the limit and the pauses hold for every process on that window together: the
    caller at the head of this process's line, once the local window lets it go, takes its slot from the
    shared one too, and waits as told when that one is full. A shared window that fails (an outage, a
    timeout) costs nothing but the sharing: that request goes by the local window alone.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        window: float = 60.0,
        max_pause: float = DEFAULT_MAX_PAUSE,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedWindow | None = None,
    ):
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        if not 0 <= max_pause < math.inf:
            raise ValueError("max_pause must be a finite number of seconds >= 0")
        self.per_minute = per_minute
        self.window = window
        self.max_pause = max_pause
        self._clock = clock
        self._sent: deque[float] = deque()
        self._line: deque[object] = deque()
        self._changed = asyncio.Condition()
        self._paused_until = 0.0
        self.shared = shared
        # When the shared window last said it is full until: every caller in line waits at least that long.
        self._shared_until = 0.0
        self._warned_at = -math.inf
        self._shared_skip_until = -math.inf
        self._pause_tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        return len(self._line)

    @property
    def min_spacing(self) -> float:
        return self.window / self.per_minute

    def pause_for(self, seconds: float) -> None:
        # `not > 0` also rejects NaN; the cap keeps one 429 with a far reset from stalling every job.
        if not seconds > 0:
            return
        seconds = min(seconds, self.max_pause)
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        if self.shared is not None:
            self._share_pause(self.shared, seconds)

    def _share_pause(self, shared: SharedWindow, seconds: float) -> None:
        # In the background: the caller that met the 429 must not wait on the store to learn it is paused.
        try:
            task = asyncio.get_running_loop().create_task(self._send_pause(shared, seconds))
        except RuntimeError:  # no loop running, so no request can be waiting on this budget either
            return
        # Held, or the loop could collect the task before it ran.
        self._pause_tasks.add(task)
        task.add_done_callback(self._pause_tasks.discard)

    async def _send_pause(self, shared: SharedWindow, seconds: float) -> None:
        try:
            await shared.pause(seconds)
        except Exception as error:
            self._warn("the pause was not shared with the other processes", error)

    async def acquire(
        self, on_wait: Callable[[int, float], None] | None = None, *, max_wait: float | None = None
    ) -> None:
        """Waits for a slot. `on_wait(position, seconds)` is told where this caller stands while it waits.

        With `max_wait`, gives up (BudgetExhausted, carrying when a slot is expected) as soon as it is clear
        that no slot can be granted within that many seconds, and at the latest when they have passed.
        """
        give_up_at = None if max_wait is None else self._clock() + max(0.0, max_wait)
        ticket = object()
        self._line.append(ticket)
        try:
            while True:
                async with self._changed:
                    position = self._line.index(ticket) + 1
                    expected = self._expected_delay(position)
                    if position == 1 and expected <= 0 and not self._sharing():
                        self._grant(ticket)
                        return
                    if position > 1 or expected > 0:
                        await self._wait_turn(position, expected, give_up_at, on_wait)
                        continue
                # At the head, and this process's window allows. The shared window is asked outside the
                # lock, so the callers behind (and those leaving) never queue behind a slow store.
                expected = await self._take_shared(give_up_at)
                async with self._changed:
                    if expected <= 0:
                        self._grant(ticket)
                        return
                    await self._wait_turn(1, expected, give_up_at, on_wait)
        finally:
            if ticket in self._line:
                self._line.remove(ticket)
                async with self._changed:
                    self._changed.notify_all()

    def _grant(self, ticket: object) -> None:
        """Under the lock: the slot is spent, and the next in line learns it is at the head."""
        self._sent.append(self._clock())
        self._line.remove(ticket)
        self._changed.notify_all()

    async def _wait_turn(
        self,
        position: int,
        expected: float,
        give_up_at: float | None,
        on_wait: Callable[[int, float], None] | None,
    ) -> None:
        """Under the lock: waits until the line or the budget changes, or the head's slot comes due."""
        timeout = expected if position == 1 else None
        if give_up_at is not None:
            remaining = give_up_at - self._clock()
            if expected > remaining:
                raise BudgetExhausted(
                    f"no request slot free for {expected:.0f} s",
                    reset_at=datetime.now(UTC) + timedelta(seconds=expected),
                )
            timeout = remaining if timeout is None else min(timeout, remaining)
        if on_wait is not None:
            on_wait(position, expected)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=timeout)

    def _sharing(self) -> bool:
        return self.shared is not None and self._clock() >= self._shared_skip_until

    async def _take_shared(self, give_up_at: float | None) -> float:
        """0 when the shared window (if any) granted a slot, or the seconds it says to wait."""
        if self.shared is None or not self._sharing():
            return 0.0
        bound = None if give_up_at is None else max(0.0, give_up_at - self._clock())
        try:
            async with asyncio.timeout(bound):
                wait = float(await self.shared.take(self.per_minute, self.window))
        except Exception as error:
            # Jobs must not stall on an outage of the store: requests go by the local window alone for a
            # while, so an outage costs one timeout, not one per request.
            self._shared_skip_until = self._clock() + SHARED_RETRY_SECONDS
            self._warn("sending by this process's window alone", error)
            return 0.0
        if not wait > 0:  # NaN included: a reply that is not a wait is no reason to hold anyone
            return 0.0
        # Far more than a window or a pause can last would be a broken reply, not a reason to stall.
        wait = min(wait, self.window + self.max_pause)
        self._shared_until = self._clock() + wait
        return wait

    def _warn(self, what: str, error: Exception) -> None:
        now = self._clock()
        if now - self._warned_at >= SHARED_WARNING_INTERVAL:
            self._warned_at = now
            log.warning(
                "segmind budget: the shared request window failed (%s: %s); %s",
                type(error).__name__,
                error,
                what,
            )

    def _expected_delay(self, position: int) -> float:
        """Seconds until the caller at `position` in line gets its slot, if nothing else changes.

        Each caller ahead takes the next slot, and its request then fills the window in turn.
        """
        now = self._clock()
        while self._sent and self._sent[0] <= now - self.window:
            self._sent.popleft()
        sends = list(self._sent)
        grant = now
        for _ in range(position):
            grant = max(now, self._paused_until, self._shared_until)
            if len(sends) >= self.per_minute:
                grant = max(grant, sends[-self.per_minute] + self.window)
            sends.append(grant)
        return grant - now


def parse_reset_at(value: str | None, now: datetime | None = None) -> datetime | None:
    """When `x-rate-limit-reset-at-utc` (ISO 8601 or epoch seconds) says the limit resets.

    None when the header is missing or absurd: unparseable, not finite, negative, in the past, or more than
    an hour ahead. A hostile or broken header must neither crash the client nor stall every job.
    """
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        reset_at = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    else:
        if not math.isfinite(seconds) or seconds < 0:
            return None
        try:
            reset_at = datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    ahead = (reset_at - (now or datetime.now(UTC))).total_seconds()
    return reset_at if 0 < ahead <= MAX_RESET_AHEAD else None
