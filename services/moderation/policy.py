"""What a server's rules say about a member and a prompt: bans, blocked terms, AutoMod, strikes."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal

from services.moderation.automod import AutoModRule, first_hit
from services.moderation.cases import CASE_RETENTION_SECONDS, Decision, ModCase
from services.moderation.settings import GuildSettings
from services.store.base import Ban, Store

# How long a process trusts the settings it read: a change made on another shard shows within this.
SETTINGS_CACHE_SECONDS = 5.0
STRIKE_WINDOW_SECONDS = 24 * 3600.0
HOUR = 3600.0


@dataclass(frozen=True)
class PromptBlock:
    """Why a prompt was refused: for the mod log only (the member is never told which word)."""

    source: Literal["blocklist", "automod"]
    matched: str  # the term or pattern
    rule: str | None = None  # the AutoMod rule's name


class Moderation:
    """Each server's rules as its admins set them: kept in the store, so every shard applies the same.

    Settings are read through a short per-process cache (`SETTINGS_CACHE_SECONDS`) and changed through
    the store's atomic update, so two admins changing them at once both land and every shard sees the
    change within the cache's time. AutoMod rules are held in memory, as Discord sends them to this
    process (fetched when a server turns the option on, and kept fresh from the gateway's rule events).
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        cache_seconds: float = SETTINGS_CACHE_SECONDS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._settings: dict[int, tuple[float, GuildSettings]] = {}
        self._texts: dict[int, str | None] = {}  # the stored text each cached settings came from
        self._automod: dict[int, dict[int, AutoModRule]] = {}

    # -- settings --

    async def settings(self, guild_id: int) -> GuildSettings:
        cached = self._settings.get(guild_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        stored = await self._store.get_guild_settings(guild_id)
        if cached is not None and self._texts.get(guild_id) == stored:
            settings = cached[1]  # unchanged: its compiled blocklist is kept too
        else:
            settings = GuildSettings.from_json(guild_id, stored)
            self._texts[guild_id] = stored
        self._settings[guild_id] = (now, settings)
        return settings

    async def change(
        self, guild_id: int, edit: Callable[[GuildSettings], GuildSettings]
    ) -> tuple[GuildSettings, GuildSettings]:
        """Applies `edit` to the stored settings in one atomic step; returns them before and after."""
        before: list[GuildSettings] = []

        def change(stored: str | None) -> str:
            before[:] = [GuildSettings.from_json(guild_id, stored)]
            return edit(before[0]).to_json()

        stored = await self._store.update_guild_settings(guild_id, change)
        after = GuildSettings.from_json(guild_id, stored)
        self._settings[guild_id] = (time.monotonic(), after)
        self._texts[guild_id] = stored
        return before[0], after

    # -- AutoMod rules, as Discord sends them --

    def knows_automod_rules(self, guild_id: int) -> bool:
        return guild_id in self._automod

    def set_automod_rules(self, guild_id: int, rules: Iterable[AutoModRule]) -> None:
        self._automod[guild_id] = {rule.id: rule for rule in rules}

    def put_automod_rule(self, guild_id: int, rule_id: int, rule: AutoModRule | None) -> None:
        """A rule created or changed (None: deleted, or no longer one that applies to prompts)."""
        rules = self._automod.get(guild_id)
        if rules is None:
            return  # not followed here: the full list is fetched when it is needed
        if rule is None:
            rules.pop(rule_id, None)
        else:
            rules[rule_id] = rule

    # -- prompts --

    async def check_prompt(
        self,
        guild_id: int,
        prompt: str,
        *,
        age_restricted: bool,
        role_ids: Collection[int],
        channel_ids: Collection[int],
    ) -> PromptBlock | None:
        """Whether the server's rules refuse this prompt (the blocklist, then its AutoMod rules if on)."""
        settings = await self.settings(guild_id)
        term = settings.blocklist_for(age_restricted=age_restricted).match(prompt)
        if term is not None:
            return PromptBlock("blocklist", term.text)
        if settings.automod:
            rules = self._automod.get(guild_id, {}).values()
            hit = first_hit(rules, prompt, role_ids=role_ids, channel_ids=channel_ids)
            if hit is not None:
                return PromptBlock("automod", hit.matched, hit.rule_name)
        return None

    # -- mod-log cases and reports --

    async def open_case(self, case: ModCase) -> bool:
        """Records the case; False when one with its id exists (an appeal sent twice)."""
        return await self._store.add_case(case.id, case.to_json(), case.created_at + CASE_RETENTION_SECONDS)

    async def case(self, case_id: str) -> ModCase | None:
        stored = await self._store.get_case(case_id)
        return None if stored is None else ModCase.read(stored)

    async def decide(self, case_id: str, decision: Decision) -> Decision | None:
        """Records `decision` unless the case was decided already; the decision that stands (None for a
        case no longer kept)."""
        stood = await self._store.decide_case(case_id, decision.to_json())
        return None if stood is None else Decision.read(stood)

    async def reopen(self, case_id: str, decision: Decision) -> None:
        await self._store.reopen_case(case_id, decision.to_json())

    async def report(self, job_id: str, user_id: int) -> int | None:
        """Counts a member's report of a result: the members who reported it so far, or None when this one
        had already."""
        return await self._store.add_report(job_id, user_id, self._clock() + CASE_RETENTION_SECONDS)

    # -- bans and strikes --

    async def active_ban(self, guild_id: int, user_id: int) -> Ban | None:
        return await self._store.get_ban(guild_id, user_id, self._clock())

    async def ban(
        self, guild_id: int, user_id: int, *, hours: float | None, reason: str, by_id: int | None
    ) -> Ban:
        now = self._clock()
        ban = Ban(guild_id, user_id, None if hours is None else now + hours * HOUR, reason[:500], by_id, now)
        await self._store.set_ban(ban)
        # The ban answers the strikes so far: once it ends (or is lifted) the member starts afresh.
        await self._store.clear_strikes(guild_id, user_id)
        return ban

    async def unban(self, guild_id: int, user_id: int) -> bool:
        lifted = await self._store.lift_ban(guild_id, user_id, self._clock())
        await self._store.clear_strikes(guild_id, user_id)
        return lifted

    async def bans(self, guild_id: int) -> list[Ban]:
        return await self._store.list_bans(guild_id, self._clock())

    async def strike(self, guild_id: int, user_id: int) -> Ban | None:
        """Counts a blocked prompt; the ban it earned when the server's strikes rule says so, else None."""
        settings = await self.settings(guild_id)
        if settings.strike_blocks is None or settings.strike_hours is None:
            return None
        strikes = await self._store.add_strike(guild_id, user_id, self._clock(), STRIKE_WINDOW_SECONDS)
        if strikes < settings.strike_blocks:
            return None
        reason = f"{strikes} blocked prompts within 24 hours"
        return await self.ban(guild_id, user_id, hours=settings.strike_hours, reason=reason, by_id=None)
