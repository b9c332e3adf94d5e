"""How many requests to Segmind are on the wire at once, and who goes next when that many are."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Iterator

from services.segmind.budget import Priority

# Where the limit starts, and its bounds: a few requests always go, and past a few hundred at once the
# answers alone would keep the loop busy, however far away Segmind is.
INITIAL_IN_FLIGHT = 16
LEAST_IN_FLIGHT = 4
MOST_IN_FLIGHT = 256
# How late the event loop may run before the limit comes down (by a fifth at a time; it goes up by one).
LOOP_BEHIND_TARGET = 0.02
DECREASE = 0.8
# How long foreground work holds a submit back at most (see `InFlightGate.foreground`): well within the
# half second (GATE_GRACE_SECONDS) the request budget allows between a grant and the request leaving
# before it counts the request twice.
SUBMIT_HOLD_SECONDS = 0.3
# The loop may run a timer this much before it is due: asyncio allows its clock's resolution, and uvloop
# counts time in whole milliseconds.
_TIMER_EARLY = max(0.001, time.get_clock_info("monotonic").resolution)


class InFlightGate:
    """At most `limit` requests in flight; those waiting go by `Priority`, then in order of arrival.

    The request budget decides how many requests a minute may go; this decides how many at once. Without
    it, a process running a thousand jobs sends a thousand checks together, their answers queue up on the
    event loop, and a finished job's result and images wait behind checks of jobs still running. With it,
    the loop's queue stays short, and whoever brings a finished image home goes first.

    The limit follows the event loop (`adapt`, told how late the loop runs): it grows by one while the
    loop keeps time and shrinks by a fifth while it runs behind, the way TCP finds a link's capacity. So a
    Segmind a few milliseconds away gets a few requests at once and one across an ocean gets many, each
    as many as this process can answer without falling behind.
    """

    def __init__(
        self,
        limit: int = INITIAL_IN_FLIGHT,
        *,
        least: int = LEAST_IN_FLIGHT,
        most: int = MOST_IN_FLIGHT,
        target: float = LOOP_BEHIND_TARGET,
    ) -> None:
        if not 1 <= least <= limit <= most:
            raise ValueError("the limits must satisfy 1 <= least <= limit <= most")
        self.limit = limit
        self.least = least
        self.most = most
        self.target = target
        self.in_flight = 0
        self.waiting = 0
        # A heap; entries of callers that gave up stay in it, done, until they come up and are skipped.
        # (priority, arrival, future, since): `since` on the monotonic clock, for how long a submit is held.
        self._waiting: list[tuple[int, int, asyncio.Future[None], float]] = []
        self._arrivals = itertools.count()
        self._cut = False  # the limit came down for the stall under way
        self._foreground = 0  # blocks under way that submits give way to (see `foreground`)
        self._submits_waiting = 0
        # Wakes the gate when the first hold is over. A timer due at once is a plain Handle under uvloop,
        # with no `when()`, so its time is kept here.
        self._hold_ends: asyncio.Handle | None = None
        self._hold_ends_at = 0.0

    def pressure(self) -> float:
        """From 0 (nobody waits) to 1 (as many wait as are let in at once): how far demand exceeds what
        the loop keeps up with."""
        # Submits held back by foreground work wait by choice, not for want of room.
        held = self._submits_waiting if self._foreground else 0
        return min(1.0, (self.waiting - held) / self.limit)

    @contextlib.contextmanager
    def foreground(self) -> Iterator[None]:
        """While any such block runs, a submit waits at the gate, SUBMIT_HOLD_SECONDS at most; checks,
        results and downloads still go.

        For commands being acknowledged: Discord gives each 3 s, and in a burst the submits of the first
        ones would otherwise share the event loop with the commands still arriving. A submit costs the
        loop more than an acknowledgement, and a member does not notice it leaving a moment later;
        they notice the acknowledgement that does not come. Held submits leave one slot at a time, like any
        waiter, and between commands, when no block runs, they go at once.
        """
        self._foreground += 1
        try:
            yield
        finally:
            self._foreground -= 1
            if not self._foreground:
                self._let_in()

    def commands_under_way(self) -> bool:
        """Whether a `foreground` block runs now: for other work that gives way to commands too."""
        return self._foreground > 0

    def _held(self, priority: int, since: float) -> bool:
        return (
            priority >= Priority.SUBMIT
            and self._foreground > 0
            and time.monotonic() + _TIMER_EARLY < since + SUBMIT_HOLD_SECONDS
        )

    @contextlib.asynccontextmanager
    async def slot(self, priority: Priority) -> AsyncIterator[None]:
        """Holds one of the `limit` slots for the block."""
        await self.enter(priority)
        try:
            yield
        finally:
            self.leave()

    def leave(self) -> None:
        """Gives back a slot `enter` took."""
        self.in_flight -= 1
        self._let_in()

    def adapt(self, behind: float) -> None:
        """The loop runs `behind` seconds late lately: the limit comes down, or goes up by one.

        Down once per stall: `behind` is smoothed, so one stall reads late for several ticks, and the cut
        waits until the loop has been on time again."""
        if behind > self.target:
            if not self._cut:
                self.limit = max(self.least, int(self.limit * DECREASE))
                self._cut = True
            return
        self._cut = False
        self._let_in()
        if self.waiting and not self._top_is_held():
            # Only a limit someone waits at is raised (an idle process would otherwise drift to the most),
            # and not for submits held back by foreground work.
            self.limit = min(self.most, self.limit + 1)
            self._let_in()

    async def enter(self, priority: Priority) -> None:
        """Takes a slot, waiting for one by priority; `leave` gives it back."""
        if self.in_flight < self.limit and not self.waiting and not self._held(priority, time.monotonic()):
            self.in_flight += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (int(priority), next(self._arrivals), future, time.monotonic()))
        self.waiting += 1
        if priority >= Priority.SUBMIT:
            self._submits_waiting += 1
        # Those waiting may all be held submits, with a slot free for this one.
        self._let_in()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Let in just as it was cancelled: the slot goes to the next, or it is lost for good.
                self.in_flight -= 1
                self._let_in()
            else:
                future.cancel()
                self.waiting -= 1
                if priority >= Priority.SUBMIT:
                    self._submits_waiting -= 1
            raise

    def _let_in(self) -> None:
        """Lets the first live waiters in, in order, while slots are free."""
        while self._waiting and self.in_flight < self.limit:
            priority, _arrival, future, since = self._waiting[0]
            if not future.done() and self._held(priority, since):
                # In order of priority, then arrival: every waiter behind a held submit is one too. Its
                # hold ends even if the foreground work does not.
                self._wake_at(since + SUBMIT_HOLD_SECONDS)
                return
            heapq.heappop(self._waiting)
            if not future.done():
                self.waiting -= 1
                if priority >= Priority.SUBMIT:
                    self._submits_waiting -= 1
                self.in_flight += 1
                future.set_result(None)

    def _top_is_held(self) -> bool:
        while self._waiting and self._waiting[0][2].done():
            heapq.heappop(self._waiting)
        return bool(self._waiting) and self._held(self._waiting[0][0], self._waiting[0][3])

    def _wake_at(self, when: float) -> None:
        """One timer for the gate, at the earliest hold's end: `when` is on time.monotonic, which is asyncio's
        clock and, in whole milliseconds, uvloop's."""
        if self._hold_ends is not None and not self._hold_ends.cancelled() and self._hold_ends_at <= when:
            return
        if self._hold_ends is not None:
            self._hold_ends.cancel()
        self._hold_ends_at = when
        self._hold_ends = asyncio.get_running_loop().call_at(when, self._hold_over)

    def _hold_over(self) -> None:
        self._hold_ends = None
        self._let_in()
