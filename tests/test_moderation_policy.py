"""A server's rules applied: blocked prompts, AutoMod, bans and strikes, shared by every process."""

from __future__ import annotations

import asyncio

from services.moderation.automod import AutoModRule
from services.moderation.policy import HOUR, AutoModUnavailable, Moderation
from services.moderation.settings import GuildSettings, Scope
from services.moderation.terms import parse_terms
from tests import test_store
from tests.test_store import NOW, Backend

backend = test_store.backend  # every backend, as the store's own suite runs them

GUILD = 100
MEMBER, MOD = 1, 2
CHANNEL = 10


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def blocking(terms: str, scope: Scope = Scope.EVERYWHERE):  # type: ignore[no-untyped-def]
    return lambda settings: settings.with_terms(parse_terms(terms), scope)


async def check(moderation: Moderation, prompt: str, *, age_restricted: bool = False):  # type: ignore[no-untyped-def]
    return await moderation.check_prompt(
        GUILD, prompt, age_restricted=age_restricted, role_ids=[], channel_ids=[CHANNEL]
    )


async def test_a_blocked_term_refuses_the_prompt_and_says_which_term_only_to_the_caller(
    backend: Backend,
) -> None:
    moderation = Moderation(await backend.open())
    before, after = await moderation.change(GUILD, blocking("kid, gore*", Scope.OUTSIDE_NSFW))
    assert before == GuildSettings(GUILD) and len(after.blocked) == 2
    block = await check(moderation, "a K1D in a garden")
    assert block is not None and (block.source, block.matched) == ("blocklist", "kid")
    assert await check(moderation, "gory details", age_restricted=True) is None
    assert await check(moderation, "a skid mark") is None


async def test_a_change_on_one_process_is_seen_by_the_others(backend: Backend) -> None:
    first = Moderation(await backend.open(), cache_seconds=0.0)
    second = Moderation(await backend.open(), cache_seconds=0.0)
    assert await check(second, "a kid") is None
    await asyncio.gather(first.change(GUILD, blocking("kid")), second.change(GUILD, blocking("gore")))
    assert await check(second, "a kid") is not None and await check(first, "gore") is not None


async def test_automod_rules_apply_only_when_the_server_turned_them_on(backend: Backend) -> None:
    moderation = Moderation(await backend.open())
    rule = AutoModRule.from_payload(
        {
            "id": "7",
            "name": "No cats",
            "event_type": 1,
            "trigger_type": 1,
            "trigger_metadata": {"keyword_filter": ["cat"]},
            "actions": [{"type": 1, "metadata": {}}],
            "enabled": True,
        }
    )
    assert rule is not None
    moderation.set_automod_rules(GUILD, [rule])
    assert await check(moderation, "a cat") is None
    await moderation.change(GUILD, lambda settings: GuildSettings(GUILD, automod=True))
    block = await check(moderation, "a cat")
    assert block is not None and (block.source, block.rule) == ("automod", "No cats")
    moderation.put_automod_rule(GUILD, 7, None)  # deleted on Discord
    assert await check(moderation, "a cat") is None


async def test_a_ban_ends_when_its_hours_are_over(backend: Backend) -> None:
    clock = Clock()
    moderation = Moderation(await backend.open(), clock=clock)
    ban = await moderation.ban(GUILD, MEMBER, hours=24, reason="spam", by_id=MOD)
    assert ban.until == NOW + 24 * HOUR
    assert await moderation.active_ban(GUILD, MEMBER) == ban
    clock.now += 24 * HOUR
    assert await moderation.active_ban(GUILD, MEMBER) is None
    await moderation.ban(GUILD, MEMBER, hours=None, reason="", by_id=MOD)
    assert [b.user_id for b in await moderation.bans(GUILD)] == [MEMBER]
    assert await moderation.unban(GUILD, MEMBER) is True
    assert await moderation.bans(GUILD) == []


async def test_strikes_ban_automatically_once_the_server_set_them(backend: Backend) -> None:
    clock = Clock()
    moderation = Moderation(await backend.open(), clock=clock)
    assert await moderation.strike(GUILD, MEMBER) is None  # off until set
    await moderation.change(GUILD, lambda settings: GuildSettings(GUILD, strike_blocks=2, strike_hours=6))
    assert await moderation.strike(GUILD, MEMBER) is None
    clock.now += HOUR
    ban = await moderation.strike(GUILD, MEMBER)
    assert ban is not None and ban.by_id is None and ban.until == clock.now + 6 * HOUR
    assert "2 blocked prompts" in ban.reason
    assert await moderation.active_ban(GUILD, MEMBER) == ban
    # The ban answered those strikes: lifted, one more blocked prompt does not ban again at once.
    assert await moderation.unban(GUILD, MEMBER) is True
    assert await moderation.strike(GUILD, MEMBER) is None
    clock.now += 7 * HOUR  # likewise once a ban has run out
    assert await moderation.strike(GUILD, MEMBER) is not None
    clock.now += 7 * HOUR
    assert await moderation.strike(GUILD, MEMBER) is None


def cats_rule(rule_id: str = "7", keyword: str = "cat") -> dict[str, object]:
    return {
        "id": rule_id,
        "name": f"No {keyword}s",
        "event_type": 1,
        "trigger_type": 1,
        "trigger_metadata": {"keyword_filter": [keyword]},
        "actions": [{"type": 1, "metadata": {}}],
        "enabled": True,
    }


async def test_rules_are_read_from_discord_once_and_a_failure_lets_prompts_through(backend: Backend) -> None:
    asked: list[int] = []
    answers: list[object] = [AutoModUnavailable("Discord answered 503"), [cats_rule()]]

    async def fetch(guild_id: int) -> list[dict[str, object]]:
        asked.append(guild_id)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    moderation = Moderation(await backend.open(), fetch_automod_rules=fetch)
    await moderation.change(GUILD, lambda settings: GuildSettings(GUILD, automod=True))
    assert await check(moderation, "a cat") is None  # unreadable: checked without them, not refused
    assert await check(moderation, "a cat") is None and asked == [GUILD]  # not asked again at once
    assert await moderation.load_automod_rules(GUILD) == 1
    assert await check(moderation, "a cat") is not None
    assert await check(moderation, "a dog") is None and asked == [GUILD, GUILD]
    # Members Discord's AutoMod exempts (Manage Server) are exempt here too; the blocklist still applies.
    exempt = await moderation.check_prompt(
        GUILD, "a cat", age_restricted=False, role_ids=[], channel_ids=[CHANNEL], automod_exempt=True
    )
    assert exempt is None


async def test_a_burst_of_commands_in_one_server_reads_its_settings_once(backend: Backend) -> None:
    store = await backend.open()
    moderation = Moderation(store)
    await moderation.change(GUILD, blocking("kid"))
    moderation = Moderation(store)  # a fresh process: nothing cached
    reads = 0
    read = store.get_guild_settings

    async def counted(guild_id: int) -> str | None:
        nonlocal reads
        reads += 1
        return await read(guild_id)

    store.get_guild_settings = counted  # type: ignore[method-assign]
    blocks = await asyncio.gather(*(check(moderation, "a kid") for _ in range(200)))
    assert all(block is not None for block in blocks) and reads == 1
