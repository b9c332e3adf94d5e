"""Per-member image quotas on top of the store: each server's limits and role tiers, the `.env` defaults
and exempt roles, and an injectable clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from services.moderation.settings import GuildSettings
from services.store.base import (
    UNLIMITED,
    Ban,
    JobRecord,
    QuotaLimits,
    QuotaRefusal,
    QuotaUsage,
    Reservation,
    Store,
)


class QuotaGuard:
    """Each member's image quota in each server: the limits that apply, applied to the store's reservations.

    It owns the policy (the `.env` limits as defaults, the roles exempt from them, each server's own limits
    and role tiers, the clock), not the counts: those live in the store, per member per server, whose
    `reserve` checks and records in one atomic step, so the limits hold exactly across concurrent commands
    and across processes. A reservation is settled once, by `commit` when Segmind billed the job or
    `refund` when it did not; members without a limit get reservations too, under limits nobody reaches,
    so their usage reads like everyone else's.
    """

    def __init__(
        self,
        store: Store,
        limits: QuotaLimits,
        exempt_role_ids: frozenset[int],
        clock: Callable[[], float] = time.time,
        *,
        server_ceiling: int | None = None,
    ) -> None:
        self._store = store
        self._limits = limits
        self._server_ceiling = server_ceiling
        self._exempt_role_ids = frozenset(exempt_role_ids)
        self._clock = clock
        # Same window as the real limits, so an exempt member's usage reads like everyone else's.
        self._exempt_limits = QuotaLimits.unlimited(limits.window_seconds)

    @property
    def limits(self) -> QuotaLimits:
        """The `.env` defaults, for servers that set none."""
        return self._limits

    def is_exempt(self, role_ids: Iterable[int]) -> bool:
        return not self._exempt_role_ids.isdisjoint(role_ids)

    def limits_for(
        self, role_ids: Iterable[int], settings: GuildSettings | None = None
    ) -> QuotaLimits | None:
        """A member's limits in a server (`settings`; None: direct messages, the defaults), or None when the
        member may not generate there (a tier of 0, or a daily limit of 0).

        The most generous rule wins: `QUOTA_EXEMPT_ROLE_IDS` lifts every limit, then the server's role
        tiers (no limit, else the most images), then the server's daily limit, then the default. What a
        server set is capped at QUOTA_SERVER_MAX_DAILY_IMAGES, when the operator set one."""
        roles = list(role_ids)
        if self.is_exempt(roles):
            return self._exempt_limits
        if settings is None:
            return self._limits
        daily = settings.daily_limit(roles, self._limits.daily_images)
        concurrent = settings.max_concurrent or self._limits.max_concurrent
        if daily == 0:
            return None
        if self._server_ceiling is not None and (daily is None or daily > self._server_ceiling):
            daily = self._server_ceiling
        return QuotaLimits(
            daily_images=UNLIMITED if daily is None else daily,
            max_concurrent=concurrent,
            window_seconds=self._limits.window_seconds,
        )

    async def reserve(
        self, user_id: int, images: int, limits: QuotaLimits | None = None, *, guild_id: int | None = None
    ) -> Reservation | QuotaRefusal:
        return await self._store.reserve(
            user_id, images, self._limits if limits is None else limits, self._clock(), guild_id=guild_id
        )

    async def reserve_job(
        self, job: JobRecord, images: int, limits: QuotaLimits
    ) -> JobRecord | QuotaRefusal | Ban:
        """Reserves `images` for the job's member in the job's server under `job.reservation_id` and saves
        the job, in one step of the store: the saved job, or the refusal (the member's ban in the server
        first) with nothing recorded."""
        return await self._store.reserve_job(job, images, limits, self._clock())

    async def commit(self, reservation: Reservation | str) -> None:
        await self._store.commit(_reservation_id(reservation))

    async def refund(self, reservation: Reservation | str) -> None:
        await self._store.refund(_reservation_id(reservation))

    async def usage(
        self, user_id: int, guild_id: int | None = None, limits: QuotaLimits | None = None
    ) -> QuotaUsage:
        """A member's usage in a server (None: direct messages), counted against `limits` (default: the
        `.env` limits)."""
        limits = self._limits if limits is None else limits
        return await self._store.usage(user_id, limits, self._clock(), guild_id=guild_id)


def _reservation_id(reservation: Reservation | str) -> str:
    return reservation if isinstance(reservation, str) else reservation.id
