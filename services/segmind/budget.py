"""The request budget every call spends from, and the reading of Segmind's rate-limit reset header."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from services.segmind.errors import BudgetExhausted

RESET_HEADER = "x-rate-limit-reset-at-utc"
MAX_RESET_AHEAD = 3600.0  # Segmind's limits are per minute: a reset further ahead than this is not real
DEFAULT_MAX_PAUSE = 120.0


class RequestBudget:
    """At most `per_minute` requests in any sliding 60 s window, granted first come, first served.

    Shared by every call so that polling many jobs can never exceed the plan's limit, and paused as a whole
    when Segmind answers 429, for at most `max_pause` seconds per 429.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        window: float = 60.0,
        max_pause: float = DEFAULT_MAX_PAUSE,
        clock: Callable[[], float] = time.monotonic,
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
        self._paused_until = max(self._paused_until, self._clock() + min(seconds, self.max_pause))

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
            async with self._changed:
                while True:
                    position = self._line.index(ticket) + 1
                    expected = self._expected_delay(position)
                    if position == 1 and expected <= 0:
                        self._sent.append(self._clock())
                        return
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
        finally:
            self._line.remove(ticket)
            async with self._changed:
                self._changed.notify_all()

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
            grant = max(now, self._paused_until)
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
