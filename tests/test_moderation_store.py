"""Server administration in the store, on every backend: settings changed atomically, bans, strikes."""

from __future__ import annotations

import asyncio
import json
from unittest.mock import patch

import pytest

from services.store import Store
from services.store.base import (
    Ban,
    JobRecord,
    JobState,
    QuotaLimits,
    UsageCounts,
    UsageRow,
    new_job_id,
    new_reservation_id,
)
from tests import test_store
from tests.test_store import DAY, HOUR, NOW, Backend

backend = test_store.backend  # every backend, as the store's own suite runs them

GUILD, OTHER_GUILD = 100, 200
MEMBER, OTHER_MEMBER, MOD = 1, 2, 3
ROOMY = QuotaLimits(daily_images=100, max_concurrent=100)


def add_term(term: str):  # type: ignore[no-untyped-def]
    def change(current: str | None) -> str:
        data = json.loads(current) if current else {"terms": []}
        data["terms"].append(term)
        return json.dumps(data)

    return change


async def test_settings_are_kept_per_server_and_shared_by_every_process(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    assert await first.get_guild_settings(GUILD) is None
    stored = await first.update_guild_settings(GUILD, add_term("kid"))
    assert json.loads(stored) == {"terms": ["kid"]}
    assert await second.get_guild_settings(GUILD) == stored
    assert await second.get_guild_settings(OTHER_GUILD) is None


async def test_changes_made_at_once_by_two_processes_all_land(backend: Backend) -> None:
    stores: list[Store] = [await backend.open(), await backend.open()]
    await asyncio.gather(
        *(stores[n % 2].update_guild_settings(GUILD, add_term(f"term{n}")) for n in range(20))
    )
    stored = await stores[0].get_guild_settings(GUILD)
    assert stored is not None and sorted(json.loads(stored)["terms"]) == sorted(f"term{n}" for n in range(20))


async def test_a_change_that_fails_stores_nothing_and_reaches_the_caller(backend: Backend) -> None:
    store = await backend.open()
    await store.update_guild_settings(GUILD, add_term("kept"))

    def refuse(current: str | None) -> str:
        raise ValueError("too many terms")

    with pytest.raises(ValueError, match="too many terms"):
        await store.update_guild_settings(GUILD, refuse)
    assert json.loads(await store.get_guild_settings(GUILD) or "{}") == {"terms": ["kept"]}


async def test_a_ban_holds_until_it_ends_or_is_lifted(backend: Backend) -> None:
    store = await backend.open()
    timed = Ban(GUILD, MEMBER, until=NOW + HOUR, reason="spam", by_id=MOD, created_at=NOW)
    forever = Ban(GUILD, OTHER_MEMBER, until=None, reason="", by_id=None, created_at=NOW)
    await store.set_ban(timed)
    await store.set_ban(forever)
    assert await store.get_ban(GUILD, MEMBER, NOW) == timed
    assert await store.get_ban(OTHER_GUILD, MEMBER, NOW) is None  # per server
    assert await store.get_ban(GUILD, MEMBER, NOW + HOUR) is None  # over
    assert await store.list_bans(GUILD, NOW) == [timed, forever]
    assert await store.list_bans(GUILD, NOW + DAY) == [forever]
    assert await store.lift_ban(GUILD, OTHER_MEMBER, NOW) is True
    assert await store.lift_ban(GUILD, OTHER_MEMBER, NOW) is False
    assert await store.lift_ban(GUILD, MEMBER, NOW + DAY) is False  # it had ended already
    assert await store.list_bans(GUILD, NOW) == []


def job_in(guild_id: int | None, user_id: int = MEMBER) -> JobRecord:
    return JobRecord(
        id=new_job_id(),
        user_id=user_id,
        guild_id=guild_id,
        channel_id=None,
        request={"prompt": "a lighthouse"},
        reservation_id=new_reservation_id(user_id, guild_id),
        state=JobState.PENDING,
        created_at=NOW,
        updated_at=NOW,
    )


async def test_a_member_banned_in_a_server_has_no_job_reserved_there(backend: Backend) -> None:
    store = await backend.open()
    ban = Ban(GUILD, MEMBER, until=NOW + HOUR, reason="spam", by_id=MOD, created_at=NOW)
    await store.set_ban(ban)
    forever = Ban(GUILD, OTHER_MEMBER + 1, until=None, reason="", by_id=None, created_at=NOW)
    await store.set_ban(forever)
    refused, refused_forever = job_in(GUILD), job_in(GUILD, OTHER_MEMBER + 1)
    assert await store.reserve_job(refused, 1, ROOMY, NOW) == ban
    assert await store.reserve_job(refused_forever, 1, ROOMY, NOW + 365 * DAY) == forever
    assert await store.get_job(refused.id) is None and await store.get_job(refused_forever.id) is None
    assert (await store.usage(MEMBER, ROOMY, NOW, guild_id=GUILD)).used_images == 0
    # Elsewhere, in direct messages, for other members and once the ban is over, jobs are reserved.
    for job, at in [
        (job_in(OTHER_GUILD), NOW),
        (job_in(None), NOW),
        (job_in(GUILD, OTHER_MEMBER), NOW),
        (job_in(GUILD), NOW + HOUR),
    ]:
        assert await store.reserve_job(job, 1, ROOMY, at) == job
        assert await store.get_job(job.id) == job


async def test_a_ban_record_that_cannot_be_read_bans_no_one_from_reserving(backend: Backend) -> None:
    store = await backend.open()
    # Without its server, member and date: the store's script may take it for a ban, Python reads none.
    with patch.object(Ban, "to_json", lambda _ban: '{"until": null, "reason": "?"}'):
        await store.set_ban(Ban(GUILD, MEMBER, until=None, reason="?", by_id=None, created_at=NOW))
    job = job_in(GUILD)
    assert await store.reserve_job(job, 1, ROOMY, NOW) == job
    assert await store.get_job(job.id) == job
    assert (await store.usage(MEMBER, ROOMY, NOW, guild_id=GUILD)).used_images == 1


async def test_a_new_ban_replaces_the_members_old_one(backend: Backend) -> None:
    store = await backend.open()
    await store.set_ban(Ban(GUILD, MEMBER, until=NOW + HOUR, reason="first", by_id=MOD, created_at=NOW))
    longer = Ban(GUILD, MEMBER, until=NOW + DAY, reason="again", by_id=MOD, created_at=NOW + 60)
    await store.set_ban(longer)
    assert await store.list_bans(GUILD, NOW) == [longer]


async def test_strikes_count_within_their_window_per_member_and_server(backend: Backend) -> None:
    store = await backend.open()
    counts = [await store.add_strike(GUILD, MEMBER, NOW + n * HOUR, DAY) for n in range(3)]
    assert counts == [1, 2, 3]
    assert await store.add_strike(GUILD, OTHER_MEMBER, NOW, DAY) == 1
    assert await store.add_strike(OTHER_GUILD, MEMBER, NOW, DAY) == 1
    # A day after the first two, only the third and this one are within the window.
    assert await store.add_strike(GUILD, MEMBER, NOW + DAY + HOUR, DAY) == 2
    await store.clear_strikes(GUILD, MEMBER)
    assert await store.add_strike(GUILD, MEMBER, NOW + DAY + 2 * HOUR, DAY) == 1
    assert await store.add_strike(GUILD, OTHER_MEMBER, NOW + HOUR, DAY) == 2  # others keep theirs


async def test_a_case_is_decided_once_whichever_process_is_first(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    assert await first.add_case("c1", '{"kind":"blocked"}', NOW + DAY)
    assert not await second.add_case("c1", '{"kind":"other"}', NOW + DAY)  # the first record stays
    assert await second.get_case("c1") == ('{"kind":"blocked"}', None)
    decisions = await asyncio.gather(
        *((first if n % 2 else second).decide_case("c1", json.dumps({"action": f"a{n}"})) for n in range(10))
    )
    assert len(set(decisions)) == 1  # every moderator is told the one decision that stands
    assert await first.get_case("c1") == ('{"kind":"blocked"}', decisions[0])
    assert await first.decide_case("unknown", "{}") is None
    assert await first.get_case("unknown") is None


async def test_a_decision_whose_action_failed_is_taken_back(backend: Backend) -> None:
    store = await backend.open()
    await store.add_case("c2", "{}", NOW + DAY)
    assert await store.decide_case("c2", "ban") == "ban"
    await store.reopen_case("c2", "dismiss")  # not the one recorded: nothing changes
    assert await store.get_case("c2") == ("{}", "ban")
    await store.reopen_case("c2", "ban")
    assert await store.get_case("c2") == ("{}", None)
    assert await store.decide_case("c2", "dismiss") == "dismiss"


async def test_each_member_reports_a_result_once(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    assert await first.add_report("job1", MEMBER, NOW + DAY) == 1
    assert await second.add_report("job1", MEMBER, NOW + DAY) is None
    assert await second.add_report("job1", OTHER_MEMBER, NOW + DAY) == 2
    assert await first.add_report("job2", MEMBER, NOW + DAY) == 1


async def test_usage_adds_up_per_server_day_and_member(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    await first.add_usage(GUILD, "2026-11-30", MEMBER, UsageCounts(jobs=1, images=4, gpu_seconds=2.5))
    await second.add_usage(GUILD, "2026-11-30", MEMBER, UsageCounts(jobs=1, images=1, gpu_seconds=0.25))
    await second.add_usage(GUILD, "2026-11-30", OTHER_MEMBER, UsageCounts(blocked=1))
    await first.add_usage(GUILD, "2026-12-01", MEMBER, UsageCounts(failed=1, jobs=1))
    await first.add_usage(OTHER_GUILD, "2026-12-01", MEMBER, UsageCounts(images=9))
    rows = await second.usage_between(GUILD, "2026-11-29", "2026-12-01")
    assert rows == [
        UsageRow("2026-11-30", MEMBER, UsageCounts(jobs=2, images=5, gpu_seconds=2.75)),
        UsageRow("2026-11-30", OTHER_MEMBER, UsageCounts(blocked=1)),
        UsageRow("2026-12-01", MEMBER, UsageCounts(jobs=1, failed=1)),
    ]
    assert await first.usage_between(GUILD, "2026-12-01", "2026-12-01") == rows[2:]
    assert await first.usage_between(GUILD, "2026-11-01", "2026-11-29") == []
