"""The bot itself: the services it drives, its cogs and buttons, and its command tree.

`bot.py` opens the store and the HTTP session, builds a `DreamshaperBot` around them, runs it and closes
them; tests and devtools build it the same way against local stand-ins.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Coroutine, Mapping
from typing import Any, cast

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands

from cogs import render
from cogs.admin import Admin
from cogs.answers import answer_failure
from cogs.buttons import JOB_BUTTONS
from cogs.delivery import JobRunner
from cogs.imagine import Imagine
from cogs.intake import BAN_CHECKED_WHEN_RESERVED, ban_refusal
from cogs.modlog import MODLOG_BUTTONS, ModLog, send_refusal
from services.config import Config, discord_api_root
from services.jobs import JobService
from services.moderation.policy import AutoModUnavailable, Moderation
from services.quota import QuotaGuard
from services.segmind import PLAN_WINDOW_SECONDS, RequestBudget, SegmindClient
from services.store import Store, StoreUnavailable
from services.store.base import QuotaLimits
from services.watchdog import LoopWatchdog

log = logging.getLogger("dreamshaper")

# How long one process's claim to sync the commands keeps the others waiting. The sync is one PUT, so this
# is ample; a process that dies mid-sync leaves a claim that lapses after this, and a waiting one syncs.
SYNC_CLAIM_SECONDS = 60.0
# The store's record is the only evidence of what Discord has, and the commands can change behind its back
# (deleted in the developer portal, synced by another deployment or version): a record this old counts
# as unknown, so the first start after it syncs again.
SYNC_RECORD_SECONDS = 24 * 3600.0
# How often a process waiting for another's claim asks the store whether it ended.
SYNC_POLL_SECONDS = 0.5
# Connections to Discord the bot keeps open at most (discord.py's own default has no limit): a burst of
# commands then reuses them for its acknowledgements and edits instead of opening a connection (a TLS
# handshake, at Discord) for each one in flight.
DISCORD_CONNECTIONS = 64
# Collections of the middle generation before a full one (Python's default: 10); see keep_collections_short.
FULL_COLLECTION_EVERY = 100
# Long enough for a claim under way to lapse and for one more process's sync; past it, a process syncs
# without a claim rather than start with commands nobody synced.
SYNC_WAIT_SECONDS = 2 * SYNC_CLAIM_SECONDS


def point_discord_py_at(api_base: str | None, gateway_url: str | None) -> None:
    """Sends REST and gateway traffic to a proxy (or a local stand-in) instead of discord.com.

    `api_base` may be the proxy's root or its versioned base (root + /api/v10); discord.py's paths are
    relative to the versioned base, which is rebuilt from the root so the version is the one it speaks.
    Resumes follow the `resume_gateway_url` that READY names, so the initial gateway is all that is needed.
    """
    if api_base:
        discord.http.Route.BASE = f"{discord_api_root(api_base)}/api/v{discord.http.INTERNAL_API_VERSION}"
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


def keep_collections_short() -> None:
    """Keeps the garbage collector's full passes rare and short, once the bot is built.

    A full pass scans every object the process holds: with a thousand jobs in flight that stops the event
    loop for about 100 ms, and by default one came every couple of seconds of a burst. What exists once the
    bot is set up (modules, discord.py's state) stays for the process's life and is set aside from the
    scans; and a full pass waits for ten times as many young ones as by default, while young cycles are
    still collected as often as ever.
    """
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def segmind_account(config: Config) -> str:
    """Whose Segmind plan the bot's requests count against, as a name safe to store: a digest of the key."""
    return hashlib.sha256(config.segmind_api_key.encode()).hexdigest()[:16]


class CommandsRefused(Exception):
    """Discord refused the commands for a server (403 or 404): the bot is not in it, or lacks the scope."""

    def __init__(self, guild_id: int, error: discord.HTTPException) -> None:
        super().__init__(f"Discord refused the commands for server {guild_id}: {error.status} {error.text}")
        self.guild_id = guild_id
        self.status = error.status
        self.reason = error.text


class DreamshaperTree(app_commands.CommandTree["DreamshaperBot"]):
    """The bot's slash commands, with the one place a failed command becomes a reply, and syncs only of
    what changed.

    `on_error` answers every command error no command handled itself: a member sees what went wrong
    (the reply texts are `render`'s), never a traceback; an unexpected error is logged with an error id
    the reply repeats. `sync_if_changed` syncs one target (the global commands, or a server's) only when
    the digest of what would be sent differs from the one the store recorded for it in the last day (or
    always, with `SYNC_COMMANDS=always`), one process at a time: the others wait for the claim's holder
    and then sync only if what it left recorded is not their commands.
    """

    async def interaction_check(self, interaction: discord.Interaction[DreamshaperBot], /) -> bool:
        # A banned member is told so, for every command but /admin (an admin cannot lock a server out), by
        # the command itself where it checks when it reserves.
        command = interaction.command
        if command is not None and (
            command.qualified_name.split()[0] == "admin" or command.extras.get(BAN_CHECKED_WHEN_RESERVED)
        ):
            return True
        refusal = await ban_refusal(interaction)
        if refusal is not None:
            await send_refusal(interaction, refusal)
            return False
        return True

    async def on_error(
        self, interaction: discord.Interaction[DreamshaperBot], error: app_commands.AppCommandError, /
    ) -> None:
        command = interaction.command.qualified_name if interaction.command else "a command"
        await answer_failure(interaction, render.app_command_error_reply(error, f"/{command}"))

    def digest(self, guild: discord.abc.Snowflake | None) -> str:
        """A hash of the payload `sync` would send for `guild` (None: the global commands), order aside."""
        payload = sorted(
            (command.to_dict(self) for command in self.get_commands(guild=guild)),
            key=lambda command: (command.get("type", 1), command["name"]),
        )
        return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def sync_target(self, guild: discord.abc.Snowflake | None) -> str:
        """The store's name for where the commands for `guild` (None: the global ones) are synced."""
        # Per application: another bot sharing the store has commands of its own.
        return f"{self.client.application_id}:{'global' if guild is None else guild.id}"

    async def sync_if_changed(
        self,
        guild: discord.abc.Snowflake | None = None,
        *,
        claim_seconds: float = SYNC_CLAIM_SECONDS,
        poll_seconds: float = SYNC_POLL_SECONDS,
        wait_seconds: float = SYNC_WAIT_SECONDS,
    ) -> None:
        """Syncs the commands for `guild` (None: the global ones) unless the store records them as synced
        there within `SYNC_RECORD_SECONDS`; with `SYNC_COMMANDS=always`, whatever the store records.

        One process syncs a target at a time. While another holds the claim (whatever commands it syncs),
        this one asks the store again every `poll_seconds`, and once that claim ends (finished, or lapsed
        `claim_seconds` after a process died) finds these commands synced or syncs them itself. After
        `wait_seconds` of waiting, or when the store does not answer, it syncs without a claim.
        Raises `CommandsRefused` when Discord refuses a server's commands (403 or 404).
        """
        store = self.client.store
        where = "globally" if guild is None else f"to guild {guild.id}"
        target, digest = self.sync_target(guild), self.digest(guild)
        # Per attempt, so a claim this attempt lost to a lapse can never be finished by it.
        owner = secrets.token_urlsafe(9)
        max_age = 0.0 if self.client.config.sync_commands == "always" else SYNC_RECORD_SECONDS
        loop = asyncio.get_running_loop()
        started, deadline = time.time(), loop.time() + wait_seconds
        waiting = False
        while True:
            try:
                claim = await store.claim_command_sync(
                    target, digest, owner, time.time(), ttl=claim_seconds, max_age=max_age
                )
            except StoreUnavailable as error:
                log.warning("could not tell whether the commands changed (%s); syncing them %s", error, where)
                await self._sync(guild, where)
                # The claim may have reached the store before it stopped answering; then this ends it.
                await self._finish(target, digest, owner, synced=True)
                return
            if claim.outcome == "claimed":
                break
            if claim.outcome == "synced":
                if claim.synced_at is not None and claim.synced_at >= started:
                    log.info("commands synced by another process %s", where)
                else:
                    log.info("commands unchanged, not synced %s", where)
                return
            if loop.time() >= deadline:
                log.warning(
                    "another process held the claim to sync the commands %s for over %g s; syncing them",
                    where,
                    wait_seconds,
                )
                await self._sync(guild, where)
                return
            if not waiting:
                log.info("another process claimed the commands' sync %s; waiting for its claim to end", where)
                waiting = True
            await asyncio.sleep(poll_seconds)
        try:
            await self._sync(guild, where)
        except BaseException:
            await self._finish(target, digest, owner, synced=False)
            raise
        if await self._finish(target, digest, owner, synced=True) is False:
            log.warning(
                "the claim to sync the commands %s lapsed before the sync ended, so it is not recorded", where
            )

    async def _sync(self, guild: discord.abc.Snowflake | None, where: str) -> None:
        try:
            synced = await self.sync(guild=guild)
        except (discord.Forbidden, discord.NotFound) as error:
            if guild is None:
                raise
            raise CommandsRefused(guild.id, error) from None
        log.info("synced %d command(s) %s", len(synced), where)

    async def _finish(self, target: str, digest: str, owner: str, *, synced: bool) -> bool | None:
        """Ends this attempt's claim: False if it held none (any more), None if the store did not answer."""
        try:
            return await self.client.store.finish_command_sync(
                target, digest, owner, time.time(), synced=synced
            )
        except StoreUnavailable as error:
            # The claim lapses by itself; the next claimer then syncs (again, if this sync went through).
            log.warning("could not record the command sync for %s: %s", target, error)
            return None


class DreamshaperBot(commands.AutoShardedBot):
    """The bot: the services it drives, the cogs and buttons members use, and its lifecycle.

    It owns the Segmind client, the quota guard, the job service and the job runner, built from one
    `Config`; the HTTP session and the store belong to the caller, who opens them before and closes
    them after the bot (they are shared with whatever else runs in the process). It guarantees that:
    every message it sends pings nobody unless the code says whom; its result buttons answer on any
    message they were ever posted on, whichever cog is loaded; commands are synced only when they
    changed, by one process; a watchdog logs every time its event loop was blocked longer than
    `LOOP_STALL_WARNING_MS`, from `setup_hook` to `close`, and the garbage collector's full passes are
    kept rare and short (`keep_collections_short`); a burst of commands shares a bounded set of
    connections to Discord; and `close` is safe to call from several places at once: the first caller
    does the work and every caller waits for it, so the store can be closed once `close` returns.
    """

    def __init__(self, config: Config, *, http_session: aiohttp.ClientSession, store: Store) -> None:
        # discord.py warns at every client's construction that voice needs PyNaCl and davey; this bot never
        # joins voice. Here, not in main(), so every way of building the bot is spared the noise.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        # Slash commands and buttons arrive as interactions, which need no privileged intents; the guilds
        # intent keeps channels cached for results posted outside the interaction (and a thread's parent,
        # whose age restriction the thread has), and AutoMod rule events keep `/admin automod` fresh.
        intents = discord.Intents.none()
        intents.guilds = True
        intents.auto_moderation_configuration = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            tree_cls=DreamshaperTree,
            # None lets Discord recommend a count; several processes must agree on SHARD_COUNT.
            shard_count=config.shard_count,
            shard_ids=list(config.shard_ids) if config.shard_ids is not None else None,
            connector=aiohttp.TCPConnector(limit=DISCORD_CONNECTIONS),
        )
        self.config = config
        self.http_session = http_session
        self.store = store
        # Built here rather than in setup_hook: the Segmind key is checked before the Discord login, and
        # setup_hook only runs once Discord has answered.
        self.segmind = SegmindClient(
            http_session,
            api_key=config.segmind_api_key,
            base_url=config.segmind_base_url,
            model=config.segmind_model,
            # Shards on one API key spend one budget together, through the store they share.
            budget=RequestBudget(
                config.segmind_requests_per_minute,
                window=PLAN_WINDOW_SECONDS,
                shared=store.shared_request_window(segmind_account(config)),
            ),
            deadline=config.segmind_job_deadline_seconds,
            max_poll_interval=config.segmind_max_poll_seconds,
            poll_interval=config.segmind_poll_seconds,
        )
        self.quota = QuotaGuard(
            store,
            QuotaLimits(config.quota_daily_images, config.quota_max_concurrent),
            config.quota_exempt_role_ids,
            server_ceiling=config.quota_server_max_daily_images,
        )
        self.jobs = JobService(
            self.segmind,
            store,
            self.quota,
            http_session,
            credits_cooloff=config.credits_cooloff_seconds,
            rate_limit_max_wait=config.rate_limit_max_wait_seconds,
            lease_seconds=config.job_lease_seconds,
        )
        self.moderation = Moderation(store, fetch_automod_rules=self._fetch_automod_rules)
        self.runner = JobRunner(self)
        self.modlog = ModLog(self)
        self.watchdog = LoopWatchdog(config.loop_stall_warning_ms)
        # A loop running behind makes every request dearer: fewer checks, and the loop's work in flight
        # follows what it can keep up with.
        self.segmind.loop_load = lambda: max(self.watchdog.load(), self.segmind.in_flight.pressure())
        self.watchdog.on_tick = self.segmind.in_flight.adapt
        self.accepting_jobs = True
        self._shutdown: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # held: the loop keeps tasks only weakly

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs work a member's answer must not wait for (a mod-log post, an undo, a count)."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fetch_automod_rules(self, guild_id: int) -> list[Mapping[str, Any]]:
        """A server's AutoMod rules as Discord has them (the bot needs Manage Server to read them)."""
        guild = self.get_guild(guild_id)
        if guild is None:
            raise AutoModUnavailable("the server is not available to the bot right now")
        try:
            return [rule.to_dict() for rule in await guild.fetch_automod_rules()]
        except discord.Forbidden:
            raise AutoModUnavailable(
                "the bot needs the Manage Server permission to read AutoMod rules"
            ) from None
        except discord.HTTPException as error:
            raise AutoModUnavailable(f"Discord answered {error.status}") from None
        except aiohttp.ClientError as error:
            # The admin is told in words; the exception's name goes to the log only.
            log.warning("server %d: AutoMod rules: %s", guild_id, type(error).__name__)
            raise AutoModUnavailable("Discord could not be reached") from None
        except (KeyError, TypeError, ValueError) as error:
            # An answer discord.py could not read is Discord's problem, not every prompt's.
            log.warning("server %d: AutoMod rules: unreadable answer (%s)", guild_id, error)
            raise AutoModUnavailable("Discord's answer could not be read") from None

    @property
    def tree(self) -> DreamshaperTree:
        # The one passed as tree_cls, typed as such.
        return cast(DreamshaperTree, super().tree)

    async def setup_hook(self) -> None:
        self.watchdog.start()
        # The runner first: it is removed first at close, so jobs stop before anything they use.
        await self.add_cog(self.runner)
        await self.add_cog(Imagine(self))
        await self.add_cog(Admin(self, self.moderation))
        self.add_dynamic_items(*JOB_BUTTONS, *MODLOG_BUTTONS)
        await self._sync_commands()
        keep_collections_short()

    async def _sync_commands(self) -> None:
        if not self.config.discord_guild_ids:
            await self.tree.sync_if_changed()
            return
        # Guild commands appear at once; global ones can take up to an hour to reach every client.
        for guild_id in self.config.discord_guild_ids:
            guild = discord.Object(id=guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync_if_changed(guild)

    async def on_ready(self) -> None:
        log.info(
            "connected as %s (%s) to %d guild(s)", self.user, getattr(self.user, "id", "?"), len(self.guilds)
        )

    async def close(self) -> None:
        # Signal handlers and `async with` may both close the bot; the first call does the work and
        # every caller waits for it, so the owner closes the store only once the bot is done with it.
        self.accepting_jobs = False
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._close_discord())
        await asyncio.shield(self._shutdown)

    async def _close_discord(self) -> None:
        try:
            await super().close()
        finally:
            await self.watchdog.stop()
        log.info("closed")
