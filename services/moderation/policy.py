"""What a server's rules say about a member and a prompt: bans, blocked terms, AutoMod, strikes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from services.moderation.automod import AutoModRule, first_hit
from services.moderation.cases import CASE_RETENTION_SECONDS, Decision, ModCase
from services.moderation.settings import GuildSettings
from services.store.base import Ban, Store

log = logging.getLogger(__name__)

# How long a process trusts the settings it read: a change made on another shard shows within this.
SETTINGS_CACHE_SECONDS = 5.0
# A prompt waits this long at most for a server's AutoMod rules to be read from Discord (inside the 3 s
# an answer allows); rules that could not be read are asked for again after AUTOMOD_RETRY_SECONDS.
AUTOMOD_FETCH_SECONDS = 0.8
AUTOMOD_RETRY_SECONDS = 60.0
# Rules older than this are read again in the background (still applied meanwhile): gateway events keep
# them fresh while they arrive, and this catches what a lost session or a lost permission missed.
AUTOMOD_REFRESH_SECONDS = 600.0

RulesFetcher = Callable[[int], Awaitable[list[Mapping[str, Any]]]]


class AutoModUnavailable(Exception):
    """A server's AutoMod rules cannot be read from Discord; the text says why (for the admin)."""


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
        fetch_automod_rules: RulesFetcher | None = None,
    ) -> None:
        self._store = store
        self._fetch_automod_rules = fetch_automod_rules
        self._automod_failed: dict[int, float] = {}  # server -> when its rules last could not be read
        self._automod_read_at: dict[int, float] = {}  # server -> when its rules were last read
        self._reading: dict[int, asyncio.Future[GuildSettings]] = {}  # settings reads under way
        self._refreshing: dict[int, asyncio.Task[None]] = {}
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
        # A burst of commands in one server waits for one read, not a read each.
        reading = self._reading.get(guild_id)
        if reading is None:
            reading = asyncio.ensure_future(self._read_settings(guild_id, cached, now))
            self._reading[guild_id] = reading
            reading.add_done_callback(lambda _done: self._reading.pop(guild_id, None))
        return await asyncio.shield(reading)

    async def _read_settings(
        self, guild_id: int, cached: tuple[float, GuildSettings] | None, now: float
    ) -> GuildSettings:
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

    async def load_automod_rules(self, guild_id: int) -> int:
        """Reads the server's rules from Discord now; how many apply to prompts. AutoModUnavailable when
        they cannot be read."""
        if self._fetch_automod_rules is None:
            raise AutoModUnavailable("this bot reads no AutoMod rules")
        payloads = await self._fetch_automod_rules(guild_id)
        rules = [rule for payload in payloads if (rule := AutoModRule.from_payload(payload)) is not None]
        self.set_automod_rules(guild_id, rules)
        self._automod_read_at[guild_id] = time.monotonic()
        self._automod_failed.pop(guild_id, None)
        return len(rules)

    async def _automod_rules(self, guild_id: int) -> Iterable[AutoModRule]:
        """The rules as last read (read now, briefly, when this process has none yet for the server). Rules
        that cannot be read apply as none: a Discord outage must not stop every prompt (logged)."""
        rules = self._automod.get(guild_id)
        if rules is not None:
            read_at = self._automod_read_at.get(guild_id, 0.0)
            if time.monotonic() - read_at > AUTOMOD_REFRESH_SECONDS and guild_id not in self._refreshing:
                task = asyncio.create_task(self._refresh_automod_rules(guild_id))
                self._refreshing[guild_id] = task
                task.add_done_callback(lambda _done: self._refreshing.pop(guild_id, None))
            return rules.values()
        failed_at = self._automod_failed.get(guild_id)
        if failed_at is not None and time.monotonic() - failed_at < AUTOMOD_RETRY_SECONDS:
            return ()
        try:
            async with asyncio.timeout(AUTOMOD_FETCH_SECONDS):
                await self.load_automod_rules(guild_id)
        except (AutoModUnavailable, TimeoutError) as error:
            self._automod_failed[guild_id] = time.monotonic()
            log.warning(
                "server %d: its AutoMod rules could not be read (%s); prompts are checked without them",
                guild_id,
                error or "timed out",
            )
            return ()
        return self._automod.get(guild_id, {}).values()

    async def _refresh_automod_rules(self, guild_id: int) -> None:
        try:
            await self.load_automod_rules(guild_id)
        except AutoModUnavailable as error:
            # Tried again after another AUTOMOD_REFRESH_SECONDS; the rules last read still apply.
            self._automod_read_at[guild_id] = time.monotonic()
            log.warning("server %d: its AutoMod rules could not be read again (%s)", guild_id, error)

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
        automod_exempt: bool = False,
    ) -> PromptBlock | None:
        """Whether the server's rules refuse this prompt (the blocklist, then its AutoMod rules if on).

        `automod_exempt`: the member has Manage Server or Administrator, whom Discord's AutoMod never
        applies to either."""
        settings = await self.settings(guild_id)
        term = settings.blocklist_for(age_restricted=age_restricted).match(prompt)
        if term is not None:
            return PromptBlock("blocklist", term.text)
        if settings.automod and not automod_exempt:
            rules = await self._automod_rules(guild_id)
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
