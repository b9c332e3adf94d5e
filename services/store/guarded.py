"""Every store call bounded in time, and every backend outage reported as one exception.

A hung Redis or a SQLite file locked by another process must never hold an interaction past Discord's
3 s or freeze a job: the caller gets `StoreUnavailable` and decides what to tell the member.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from services.store.base import (
    Ban,
    JobRecord,
    QuotaLimits,
    QuotaRefusal,
    QuotaUsage,
    Reservation,
    Store,
    SyncClaim,
    UsageCounts,
    UsageRow,
)

if TYPE_CHECKING:
    from services.segmind.budget import SharedWindow

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
# Flags (the out-of-credits cool-off) are read before every command: a burst of commands makes one read a
# second of them, not one each. Set or cleared here, a flag is seen at once; by another process, within this.
DEFAULT_FLAG_CACHE_SECONDS = 1.0
# Every request to Segmind waits on the shared window: a store that is slow to answer must cost each one
# little, after which the request goes by its process's own window.
REQUEST_WINDOW_TIMEOUT = 1.0


class StoreUnavailable(Exception):
    """The store did not answer in time, or its backend failed; nothing else about the call is known."""


class GuardedStore:
    """The store the bot uses: a backend whose every call ends within `timeout` seconds, or at once when
    its caller is cancelled, and whose outages all raise `StoreUnavailable`.

    It owns the backend: closing it (or leaving its `async with` block) closes the backend. The backend
    call runs in a task of its own: on a timeout or a cancellation that task is cancelled but not awaited,
    because a statement stuck behind SQLite's lock (or a Redis socket that stopped answering) would
    otherwise keep the caller waiting for the very thing the timeout is meant to cut short. Errors that
    are not an outage (a bug, a bad argument) pass through unchanged.

    A backend whose calls end at once when cancelled (`cancels_promptly`: SQLite's, whose calls only ever
    wait for their transaction's turn) is simply cancelled on a timeout, in the caller's own task: a task
    per call would cost more than most of its calls.

    Flag reads are answered from memory for `flag_cache_seconds` after the backend last gave the flag
    (0: never): what this store sets or clears is known at once, what another process does within that.
    """

    def __init__(
        self,
        backend: Store,
        *,
        transient: tuple[type[BaseException], ...],
        timeout: float = DEFAULT_TIMEOUT,
        flag_cache_seconds: float = DEFAULT_FLAG_CACHE_SECONDS,
        cancels_promptly: bool = False,
    ) -> None:
        self.backend = backend
        self.timeout = timeout
        self._transient = transient
        self._cancels_promptly = cancels_promptly
        self._flag_cache_seconds = flag_cache_seconds
        # name -> (when it was read, on the monotonic clock; the flag's end, None when it was not set)
        self._flags: dict[str, tuple[float, float | None]] = {}
        self._flag_reads: dict[str, asyncio.Future[float | None]] = {}

    async def _guard(self, call: Awaitable[T], timeout: float | None = None) -> T:
        timeout = self.timeout if timeout is None else timeout
        if self._cancels_promptly:
            try:
                async with asyncio.timeout(timeout):
                    return await call
            except TimeoutError:
                raise StoreUnavailable(f"the store did not answer within {timeout:g} s") from None
            except self._transient as error:
                raise StoreUnavailable(f"the store failed: {type(error).__name__}: {error}") from error
        task = asyncio.ensure_future(call)
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            _abandon(task)
            raise StoreUnavailable(f"the store did not answer within {timeout:g} s") from None
        except asyncio.CancelledError:
            _abandon(task)
            raise
        except self._transient as error:
            raise StoreUnavailable(f"the store failed: {type(error).__name__}: {error}") from error

    async def __aenter__(self) -> GuardedStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.backend.close()

    async def reserve(
        self, user_id: int, images: int, limits: QuotaLimits, now: float, *, guild_id: int | None = None
    ) -> Reservation | QuotaRefusal:
        return await self._guard(self.backend.reserve(user_id, images, limits, now, guild_id=guild_id))

    async def commit(self, reservation_id: str) -> None:
        await self._guard(self.backend.commit(reservation_id))

    async def refund(self, reservation_id: str) -> None:
        await self._guard(self.backend.refund(reservation_id))

    async def usage(
        self, user_id: int, limits: QuotaLimits, now: float, *, guild_id: int | None = None
    ) -> QuotaUsage:
        return await self._guard(self.backend.usage(user_id, limits, now, guild_id=guild_id))

    async def reserved_before(self, before: float) -> list[str]:
        return await self._guard(self.backend.reserved_before(before))

    async def reserve_job(
        self, job: JobRecord, images: int, limits: QuotaLimits, now: float
    ) -> JobRecord | QuotaRefusal | Ban:
        return await self._guard(self.backend.reserve_job(job, images, limits, now))

    async def save_job(self, job: JobRecord) -> None:
        await self._guard(self.backend.save_job(job))

    async def settle_job(self, job: JobRecord, *, billed: bool, day: str, counts: UsageCounts) -> None:
        await self._guard(self.backend.settle_job(job, billed=billed, day=day, counts=counts))

    async def get_job(self, job_id: str) -> JobRecord | None:
        return await self._guard(self.backend.get_job(job_id))

    async def unfinished_jobs(self, created_after: float) -> list[JobRecord]:
        return await self._guard(self.backend.unfinished_jobs(created_after))

    async def recent_jobs(self, user_id: int, limit: int = 10) -> list[JobRecord]:
        return await self._guard(self.backend.recent_jobs(user_id, limit))

    async def acquire_lease(self, job_id: str, owner: str, ttl: float, now: float) -> bool:
        return await self._guard(self.backend.acquire_lease(job_id, owner, ttl, now))

    async def release_lease(self, job_id: str, owner: str) -> None:
        await self._guard(self.backend.release_lease(job_id, owner))

    async def set_flag(self, name: str, until: float) -> None:
        # Forgotten first: should the write fail or be cut short, the next read asks the backend.
        self._flags.pop(name, None)
        await self._guard(self.backend.set_flag(name, until))
        self._flags[name] = (time.monotonic(), until)

    async def get_flag(self, name: str, now: float) -> float | None:
        cached = self._flags.get(name)
        if cached is not None and time.monotonic() - cached[0] < self._flag_cache_seconds:
            until = cached[1]
        else:
            # Callers arriving while the flag is being read wait for that read instead of making their own.
            reading = self._flag_reads.get(name)
            if reading is None:
                reading = asyncio.ensure_future(self._read_flag(name, now))
                self._flag_reads[name] = reading
                reading.add_done_callback(lambda done: self._flag_read_done(name, done))
            until = await asyncio.shield(reading)
        return until if until is not None and until > now else None

    async def _read_flag(self, name: str, now: float) -> float | None:
        read_at = time.monotonic()
        until = await self._guard(self.backend.get_flag(name, now))
        cached = self._flags.get(name)
        # A set or clear that ended while this read was under way knows better than the read.
        if cached is None or cached[0] <= read_at:
            self._flags[name] = (read_at, until)
        return until

    def _flag_read_done(self, name: str, done: asyncio.Future[float | None]) -> None:
        if self._flag_reads.get(name) is done:
            del self._flag_reads[name]
        # Retrieved, so a read whose callers all gave up does not log "exception was never retrieved".
        if not done.cancelled():
            done.exception()

    async def clear_flag(self, name: str) -> None:
        self._flags.pop(name, None)
        await self._guard(self.backend.clear_flag(name))
        self._flags[name] = (time.monotonic(), None)

    async def claim_command_sync(
        self, target: str, digest: str, owner: str, now: float, *, ttl: float, max_age: float
    ) -> SyncClaim:
        return await self._guard(
            self.backend.claim_command_sync(target, digest, owner, now, ttl=ttl, max_age=max_age)
        )

    async def finish_command_sync(
        self, target: str, digest: str, owner: str, now: float, *, synced: bool
    ) -> bool:
        return await self._guard(self.backend.finish_command_sync(target, digest, owner, now, synced=synced))

    async def get_guild_settings(self, guild_id: int) -> str | None:
        return await self._guard(self.backend.get_guild_settings(guild_id))

    async def update_guild_settings(self, guild_id: int, change: Callable[[str | None], str]) -> str:
        return await self._guard(self.backend.update_guild_settings(guild_id, change))

    async def set_ban(self, ban: Ban) -> None:
        await self._guard(self.backend.set_ban(ban))

    async def lift_ban(self, guild_id: int, user_id: int, now: float) -> bool:
        return await self._guard(self.backend.lift_ban(guild_id, user_id, now))

    async def get_ban(self, guild_id: int, user_id: int, now: float) -> Ban | None:
        return await self._guard(self.backend.get_ban(guild_id, user_id, now))

    async def list_bans(self, guild_id: int, now: float) -> list[Ban]:
        return await self._guard(self.backend.list_bans(guild_id, now))

    async def add_strike(self, guild_id: int, user_id: int, at: float, window: float) -> int:
        return await self._guard(self.backend.add_strike(guild_id, user_id, at, window))

    async def clear_strikes(self, guild_id: int, user_id: int) -> None:
        await self._guard(self.backend.clear_strikes(guild_id, user_id))

    async def add_case(self, case_id: str, data: str, expires_at: float) -> bool:
        return await self._guard(self.backend.add_case(case_id, data, expires_at))

    async def get_case(self, case_id: str) -> tuple[str, str | None] | None:
        return await self._guard(self.backend.get_case(case_id))

    async def decide_case(self, case_id: str, decision: str) -> str | None:
        return await self._guard(self.backend.decide_case(case_id, decision))

    async def reopen_case(self, case_id: str, decision: str) -> None:
        await self._guard(self.backend.reopen_case(case_id, decision))

    async def add_report(self, job_id: str, user_id: int, expires_at: float) -> int | None:
        return await self._guard(self.backend.add_report(job_id, user_id, expires_at))

    async def add_usage(self, guild_id: int, day: str, user_id: int, counts: UsageCounts) -> None:
        await self._guard(self.backend.add_usage(guild_id, day, user_id, counts))

    async def usage_between(self, guild_id: int, first_day: str, last_day: str) -> list[UsageRow]:
        return await self._guard(self.backend.usage_between(guild_id, first_day, last_day))

    def shared_request_window(self, account: str) -> SharedWindow | None:
        window = self.backend.shared_request_window(account)
        return None if window is None else GuardedWindow(self, window)


class GuardedWindow:
    """A backend's shared request window, each call bounded by `REQUEST_WINDOW_TIMEOUT` (or the store's
    own timeout, if shorter) and its outages raised as `StoreUnavailable`, like every store call."""

    def __init__(self, store: GuardedStore, window: SharedWindow) -> None:
        self._store = store
        self._window = window

    @property
    def _timeout(self) -> float:
        return min(REQUEST_WINDOW_TIMEOUT, self._store.timeout)

    async def take(self, limit: int, window: float) -> float:
        return await self._store._guard(self._window.take(limit, window), self._timeout)

    async def pause(self, seconds: float) -> None:
        await self._store._guard(self._window.pause(seconds), self._timeout)


def _abandon(task: asyncio.Future[object]) -> None:
    task.cancel()
    # Retrieved so an abandoned call that fails later does not log "exception was never retrieved".
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
