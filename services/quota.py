"""Per-user image quotas on top of the store, with role-based exemptions and an injectable clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from services.store.base import JobRecord, QuotaLimits, QuotaRefusal, QuotaUsage, Reservation, Store


class QuotaGuard:
    """Each member's image quota: the limits and exempt roles applied to the store's reservations.

    It owns the policy (one set of limits, the roles exempt from them, the clock), not the counts: those
    live in the store, whose `reserve` checks and records in one atomic step, so the limits hold exactly
    across concurrent commands and across processes. A reservation is settled once, by `commit` when
    Segmind billed the job or `refund` when it did not; exempt members get reservations too, under limits
    nobody reaches, so their usage reads like everyone else's.
    """

    def __init__(
        self,
        store: Store,
        limits: QuotaLimits,
        exempt_role_ids: frozenset[int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._limits = limits
        self._exempt_role_ids = frozenset(exempt_role_ids)
        self._clock = clock
        # Same window as the real limits, so an exempt member's usage reads like everyone else's.
        self._exempt_limits = QuotaLimits.unlimited(limits.window_seconds)

    @property
    def limits(self) -> QuotaLimits:
        return self._limits

    def is_exempt(self, role_ids: Iterable[int]) -> bool:
        return not self._exempt_role_ids.isdisjoint(role_ids)

    async def reserve(
        self, user_id: int, images: int, role_ids: Iterable[int] = ()
    ) -> Reservation | QuotaRefusal:
        return await self._store.reserve(user_id, images, self._limits_for(role_ids), self._clock())

    async def reserve_job(
        self, job: JobRecord, images: int, role_ids: Iterable[int] = ()
    ) -> JobRecord | QuotaRefusal:
        """Reserves `images` for the job's member under `job.reservation_id` and saves the job, in one step
        of the store: the saved job, or the refusal with nothing recorded."""
        return await self._store.reserve_job(job, images, self._limits_for(role_ids), self._clock())

    def _limits_for(self, role_ids: Iterable[int]) -> QuotaLimits:
        # Exempt members still get a recorded reservation so commit, refund and usage behave the same.
        return self._exempt_limits if self.is_exempt(role_ids) else self._limits

    async def commit(self, reservation: Reservation | str) -> None:
        await self._store.commit(_reservation_id(reservation))

    async def refund(self, reservation: Reservation | str) -> None:
        await self._store.refund(_reservation_id(reservation))

    async def usage(self, user_id: int) -> QuotaUsage:
        return await self._store.usage(user_id, self._limits, self._clock())


def _reservation_id(reservation: Reservation | str) -> str:
    return reservation if isinstance(reservation, str) else reservation.id
