"""The request budget every call spends from, and the reading of Segmind's rate-limit reset header."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Protocol

from services.segmind.errors import BudgetExhausted

log = logging.getLogger(__name__)

RESET_HEADER = "x-rate-limit-reset-at-utc"
MAX_RESET_AHEAD = 3600.0  # Segmind's limits are per minute: a reset further ahead than this is not real
DEFAULT_MAX_PAUSE = 120.0
# Segmind counts requests per minute as they arrive; two sent exactly a minute apart can arrive closer
# together when the first one was slower on the way, so the bot keeps a second of room.
PLAN_WINDOW_SECONDS = 61.0
# A shared window that keeps failing would otherwise put one warning in the log per request.
SHARED_WARNING_INTERVAL = 60.0
# How often a submit held back for room looks again (room is made by jobs finishing, not by the clock).
ROOM_RECHECK_SECONDS = 1.0
# After the shared window failed, how long requests go by the local window alone before it is tried again.
SHARED_RETRY_SECONDS = 15.0


class Priority(IntEnum):
    """Who goes first when requests wait for the budget: work already at Segmind before new work."""

    IMAGES = 0  # a finished job's output files (not counted by the plan: only the in-flight gate sees it)
    RESULT = 1  # a finished job's result, waiting to be fetched: the cheapest image there is
    STATUS = 2  # a job Segmind is running (and billing) is checked before another is sent
    SUBMIT = 3


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
    """At most `per_minute` requests in any sliding 60 s window, granted in order of `Priority`.

    Shared by every call so that polling many jobs can never exceed the plan's limit, and paused as a whole
    when Segmind answers 429, for at most `max_pause` seconds per 429. Waiting requests go by priority
    (results, then status checks, then submits), and submits take turns by who asked: a member's second
    waiting submit goes after everyone's first, so one member's burst cannot hold a whole server back.
    Within that, first come, first served. A submit also leaves room in the window for the requests that
    jobs already at Segmind will still need (`follow_ups`), so a burst of new work never crowds out the
    checks and results of the work that is paid for.

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
        # Sorted by (priority, the asker's turn, arrival); the ticket is the last element.
        self._line: list[_LineEntry] = []
        self._arrivals = itertools.count()
        self._waiting_by_asker: Counter[int] = Counter()
        self._changed = asyncio.Condition()
        self._paused_until = 0.0
        self.shared = shared
        # When the shared window last said it is full until: every caller in line waits at least that long.
        self._shared_until = 0.0
        self._shared_full_at = -math.inf
        self._warned_at = -math.inf
        self._shared_skip_until = -math.inf
        self._pause_tasks: set[asyncio.Task[None]] = set()
        # The requests that jobs already at Segmind will still need (set by the client that knows them).
        self.follow_ups: Callable[[], int] = lambda: 0

    @property
    def waiting(self) -> int:
        return len(self._line)

    @property
    def min_spacing(self) -> float:
        return self.window / self.per_minute

    def utilisation(self) -> float:
        """The share of the window's requests already spent or asked for (above 1: more wanted than fit).

        With a shared window, this process sees only its own share of it: a shared window found full
        within the last window counts as full."""
        now = self._clock()
        self._forget_old(now)
        # Submits held back for room are not demand on the window until room is made.
        submits = len(self._line) - self._first_submit()
        sendable = min(submits, max(0, self._limit_for(Priority.SUBMIT) - len(self._sent)))
        local = (len(self._sent) + self._first_submit() + sendable) / self.per_minute
        return max(local, 1.0) if now - self._shared_full_at < self.window else local

    def _first_submit(self) -> int:
        """The index of the first submit in line: everything before it is work already at Segmind."""
        return bisect.bisect_left(self._line, (int(Priority.SUBMIT), -1, -1), key=_line_order)

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
        self,
        on_wait: Callable[[int, float], None] | None = None,
        *,
        max_wait: float | None = None,
        priority: Priority = Priority.STATUS,
        asker: Hashable | None = None,
    ) -> None:
        """Waits for a slot. `on_wait(position, seconds)` is told where this caller stands while it waits.

        `asker` (e.g. a member) takes turns with the other askers of the same priority. With `max_wait`,
        gives up (BudgetExhausted, carrying when a slot is expected) as soon as it is clear that no slot can
        be granted within that many seconds, and at the latest when they have passed.
        """
        give_up_at = None if max_wait is None else self._clock() + max(0.0, max_wait)
        ticket = object()
        who = -1 if asker is None else hash(asker)
        turn = 0 if asker is None else self._waiting_by_asker[who]
        entry = (int(priority), turn, who, next(self._arrivals), ticket)
        bisect.insort(self._line, entry, key=_line_order)
        self._waiting_by_asker[who] += 1
        try:
            while True:
                async with self._changed:
                    position = bisect.bisect_left(self._line, _line_order(entry), key=_line_order) + 1
                    limit = self._limit_for(priority)
                    expected = self._expected_delay(position, limit)
                    if position == 1 and expected <= 0 and not self._sharing():
                        self._grant(entry)
                        return
                    if position > 1 or expected > 0:
                        recheck = ROOM_RECHECK_SECONDS if limit < self.per_minute else None
                        await self._wait_turn(position, expected, give_up_at, on_wait, recheck)
                        continue
                # At the head, and this process's window allows. The shared window is asked outside the
                # lock, so the callers behind (and those leaving) never queue behind a slow store.
                expected = await self._take_shared(give_up_at, limit)
                async with self._changed:
                    if expected <= 0:
                        self._grant(entry)
                        return
                    recheck = ROOM_RECHECK_SECONDS if limit < self.per_minute else None
                    await self._wait_turn(1, expected, give_up_at, on_wait, recheck)
        finally:
            self._waiting_by_asker[who] -= 1
            if self._waiting_by_asker[who] <= 0:
                del self._waiting_by_asker[who]
            if self._remove(entry):
                async with self._changed:
                    self._changed.notify_all()

    def count_late_send(self) -> None:
        """A request granted a while ago leaves only now: it takes a second place in the window (the
        plan counts it on arrival), so the window errs on the side of the plan."""
        self._sent.append(self._clock())

    def _grant(self, entry: _LineEntry) -> None:
        """Under the lock: the slot is spent, and the next in line learns it is at the head."""
        self._sent.append(self._clock())
        self._remove(entry)
        self._changed.notify_all()

    def _remove(self, entry: _LineEntry) -> bool:
        """Takes the entry out of the line (found by bisection: lines can be a thousand long)."""
        index = bisect.bisect_left(self._line, _line_order(entry), key=_line_order)
        if index < len(self._line) and self._line[index] is entry:
            del self._line[index]
            return True
        return False

    async def _wait_turn(
        self,
        position: int,
        expected: float,
        give_up_at: float | None,
        on_wait: Callable[[int, float], None] | None,
        recheck: float | None = None,
    ) -> None:
        """Under the lock: waits until the line or the budget changes, or the head's slot comes due (or,
        for a head held back for room, `recheck` seconds: room is made by jobs finishing, not the clock)."""
        timeout = expected if position == 1 else None
        if position == 1 and recheck is not None:
            timeout = min(expected, recheck)
        if give_up_at is not None:
            remaining = give_up_at - self._clock()
            if expected > remaining:
                raise BudgetExhausted(
                    f"no request slot free for {expected:.0f} s",
                    reset_at=datetime.now(UTC) + timedelta(seconds=expected),
                )
            timeout = remaining if timeout is None else min(timeout, remaining)
        if on_wait is not None:
            # A member's place counts the submits ahead, not the checks of jobs already sent.
            first = self._first_submit()
            on_wait(position - first if position > first else position, expected)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=timeout)

    def _sharing(self) -> bool:
        return self.shared is not None and self._clock() >= self._shared_skip_until

    def _limit_for(self, priority: Priority) -> int:
        """How full the window may be for this request: a submit leaves room for the requests that the
        jobs already sent will still need, so their checks and results are never crowded out."""
        if priority is Priority.SUBMIT:
            return self.per_minute - max(0, self.follow_ups())
        return self.per_minute

    async def _take_shared(self, give_up_at: float | None, limit: int) -> float:
        """0 when the shared window (if any) granted a slot, or the seconds it says to wait."""
        if self.shared is None or not self._sharing():
            return 0.0
        bound = None if give_up_at is None else max(0.0, give_up_at - self._clock())
        try:
            async with asyncio.timeout(bound):
                wait = float(await self.shared.take(max(1, limit), self.window))
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
        if limit >= self.per_minute:
            # The window is full for everyone; a submit held back for room is held back alone.
            self._shared_full_at = self._clock()
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

    def _expected_delay(self, position: int, limit: int) -> float:
        """Seconds until the caller at `position` in line gets its slot, if nothing else changes.

        Each caller ahead takes the next slot, and its request then fills the window in turn. The caller
        at the head is granted once the window holds fewer than its `limit` (see `_limit_for`); a limit
        below one waits for jobs to finish, estimated here as the whole window emptying.
        """
        now = self._clock()
        self._forget_old(now)
        allowed = max(1, limit) if position == 1 else self.per_minute
        earliest = max(now, self._paused_until, self._shared_until)
        # The sends that must leave the window before this caller's turn: the window repeats itself, each
        # send making room again one window after it was made.
        waits_for = position - 1 - (allowed - len(self._sent))
        if waits_for < 0:
            return earliest - now
        if not self._sent:
            return earliest + self.window * (waits_for // allowed + 1) - now
        windows, index = divmod(waits_for, len(self._sent))
        return max(earliest, self._sent[index] + self.window * (windows + 1)) - now

    def _forget_old(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - self.window:
            self._sent.popleft()


_LineEntry = tuple[int, int, int, int, object]


def _line_order(entry: _LineEntry) -> tuple[int, int, int]:
    priority, turn, _asker, arrival, _ticket = entry
    return priority, turn, arrival


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
