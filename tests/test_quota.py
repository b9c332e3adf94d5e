"""QuotaGuard: limits on the guard's clock, exempt roles, and settling by reservation or id."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.moderation.settings import NO_LIMIT, GuildSettings
from services.quota import QuotaGuard
from services.store import QuotaLimits, QuotaRefusal, Reservation, Store, open_store
from services.store.base import UNLIMITED

START = 1_750_000_000.0
HOUR = 3600.0
LIMITS = QuotaLimits(daily_images=4, max_concurrent=2)
ADMIN_ROLE = 900
SERVER = 10
ARTISTS, GUESTS, PATRONS = 31, 32, 33


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    store = await open_store("sqlite:///:memory:")
    yield store
    await store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def guard(store: Store, clock: FakeClock) -> QuotaGuard:
    return QuotaGuard(store, LIMITS, exempt_role_ids=frozenset({ADMIN_ROLE}), clock=clock)


async def test_reservation_is_stamped_with_the_guard_clock(guard: QuotaGuard, clock: FakeClock) -> None:
    reservation = await guard.reserve(1, 2)
    assert isinstance(reservation, Reservation)
    assert (reservation.user_id, reservation.images, reservation.created_at) == (1, 2, clock.now)


async def test_limits_apply_and_roll_with_the_clock(guard: QuotaGuard, clock: FakeClock) -> None:
    first = await guard.reserve(1, 3)
    assert isinstance(first, Reservation)
    await guard.commit(first)
    clock.advance(2 * HOUR)

    refusal = await guard.reserve(1, 2)
    assert isinstance(refusal, QuotaRefusal)
    assert (refusal.reason, refusal.remaining_images, refusal.resets_at) == ("daily", 1, START + 24 * HOUR)

    clock.advance(22 * HOUR)
    assert isinstance(await guard.reserve(1, 2), Reservation)


async def test_concurrency_limit(guard: QuotaGuard) -> None:
    await guard.reserve(1, 1)
    await guard.reserve(1, 1)
    refusal = await guard.reserve(1, 1, guard.limits_for([5, 6]))
    assert isinstance(refusal, QuotaRefusal)
    assert (refusal.reason, refusal.in_flight) == ("concurrent", 2)


async def test_exempt_roles_bypass_limits_but_are_recorded(guard: QuotaGuard) -> None:
    reservations = [await guard.reserve(1, 4, guard.limits_for([5, ADMIN_ROLE])) for _ in range(3)]
    assert all(isinstance(r, Reservation) for r in reservations)

    usage = await guard.usage(1)
    assert (usage.used_images, usage.in_flight, usage.daily_limit) == (12, 3, LIMITS.daily_images)
    assert usage.remaining_images == 0
    # Without the role the same member is held to the normal limits.
    assert isinstance(await guard.reserve(1, 1), QuotaRefusal)

    await guard.refund(reservations[0])
    await guard.commit(reservations[1].id)
    usage = await guard.usage(1)
    assert (usage.used_images, usage.in_flight) == (8, 1)


async def test_is_exempt(guard: QuotaGuard) -> None:
    assert guard.is_exempt([1, ADMIN_ROLE])
    assert not guard.is_exempt([1, 2])
    assert not guard.is_exempt(())
    assert guard.limits == LIMITS


async def test_settling_by_object_or_id(guard: QuotaGuard) -> None:
    kept = await guard.reserve(1, 1)
    returned = await guard.reserve(1, 1)
    assert isinstance(kept, Reservation)
    assert isinstance(returned, Reservation)
    await guard.commit(kept.id)
    await guard.refund(returned)
    await guard.refund(kept)  # committed: stays counted
    usage = await guard.usage(1)
    assert (usage.used_images, usage.in_flight, usage.resets_at) == (1, 0, START + 24 * HOUR)


async def test_usage_reads_the_guard_clock(guard: QuotaGuard, clock: FakeClock) -> None:
    reservation = await guard.reserve(1, 2)
    assert isinstance(reservation, Reservation)
    await guard.commit(reservation)
    clock.advance(24 * HOUR)
    usage = await guard.usage(1)
    assert (usage.used_images, usage.remaining_images, usage.resets_at) == (0, 4, None)


def test_a_server_without_settings_has_the_defaults(guard: QuotaGuard) -> None:
    assert guard.limits_for([5]) == LIMITS
    assert guard.limits_for([5], GuildSettings(SERVER)) == LIMITS


def test_a_server_sets_its_own_limits_and_role_tiers(guard: QuotaGuard) -> None:
    settings = GuildSettings(
        SERVER,
        daily_images=20,
        max_concurrent=3,
        role_tiers={ARTISTS: 100, GUESTS: 0, PATRONS: NO_LIMIT},
    )

    def daily(*roles: int) -> int | None:
        limits = guard.limits_for(roles, settings)
        return None if limits is None else limits.daily_images

    assert daily() == 20
    assert daily(ARTISTS) == 100
    assert daily(GUESTS) is None  # may not generate: no limits at all
    # The most generous tier a member holds wins.
    assert daily(GUESTS, ARTISTS) == 100
    assert daily(ARTISTS, PATRONS) == UNLIMITED
    # `QUOTA_EXEMPT_ROLE_IDS` stays a default that lifts every limit.
    assert daily(GUESTS, ADMIN_ROLE) == UNLIMITED
    limits = guard.limits_for([ARTISTS], settings)
    assert limits is not None and limits.max_concurrent == 3


def test_a_server_daily_limit_of_zero_stops_members_without_a_tier(guard: QuotaGuard) -> None:
    settings = GuildSettings(SERVER, daily_images=0, role_tiers={ARTISTS: 5})
    assert guard.limits_for([], settings) is None
    limits = guard.limits_for([ARTISTS], settings)
    assert limits is not None and limits.daily_images == 5


async def test_limits_are_per_member_per_server(guard: QuotaGuard) -> None:
    assert isinstance(await guard.reserve(1, 4, guild_id=SERVER), Reservation)
    assert isinstance(await guard.reserve(1, 1, guild_id=SERVER), QuotaRefusal)
    assert isinstance(await guard.reserve(1, 4, guild_id=SERVER + 1), Reservation)
    assert (await guard.usage(1, SERVER)).used_images == 4
    assert (await guard.usage(1)).used_images == 0


def test_what_a_server_sets_is_capped_by_the_operators_ceiling(store: Store, clock: FakeClock) -> None:
    capped = QuotaGuard(store, LIMITS, frozenset({ADMIN_ROLE}), clock, server_ceiling=10)
    settings = GuildSettings(SERVER, daily_images=50, role_tiers={ARTISTS: NO_LIMIT, GUESTS: 0})

    def daily(*roles: int) -> int | None:
        limits = capped.limits_for(roles, settings)
        return None if limits is None else limits.daily_images

    assert daily() == 10 and daily(ARTISTS) == 10
    assert daily(GUESTS) is None  # a ceiling never lets anyone generate who may not
    assert daily(ADMIN_ROLE) == UNLIMITED  # the operator's own exempt roles are not the servers' to lift
    assert capped.limits_for([], GuildSettings(SERVER, daily_images=3)) == QuotaLimits(
        3, LIMITS.max_concurrent
    )
