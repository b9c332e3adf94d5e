"""Entry point: load .env, validate the configuration, set up logging, build the bot and run it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

import aiohttp
import discord
import yarl
from discord.ext import commands
from dotenv import load_dotenv

from services.config import Config, ConfigError
from services.jobs import JobService
from services.quota import QuotaGuard
from services.segmind import RequestBudget, SegmindClient
from services.store import Store, open_store
from services.store.base import QuotaLimits

if TYPE_CHECKING:
    from cogs.delivery import JobRunner

log = logging.getLogger("dreamshaper")

EXTENSIONS: tuple[str, ...] = ("cogs.delivery", "cogs.imagine")


def point_discord_py_at(api_base: str | None, gateway_url: str | None) -> None:
    """Sends REST and gateway traffic to a proxy (or a local stand-in) instead of discord.com.

    Resumes follow the `resume_gateway_url` that READY names, so the initial gateway is all that is needed.
    """
    if api_base:
        discord.http.Route.BASE = f"{api_base.rstrip('/')}/api/v10"
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class DreamshaperBot(commands.AutoShardedBot):
    def __init__(self, config: Config) -> None:
        # Slash commands and buttons arrive as interactions, which need no privileged intents; the guilds
        # intent keeps channels cached for results posted outside the interaction.
        intents = discord.Intents.none()
        intents.guilds = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            # None lets Discord recommend a count; several processes must agree on SHARD_COUNT.
            shard_count=config.shard_count,
            shard_ids=list(config.shard_ids) if config.shard_ids is not None else None,
        )
        self.config = config
        # Built in setup_hook, which runs inside the event loop the sessions belong to.
        self.http_session: aiohttp.ClientSession
        self.segmind: SegmindClient
        self.store: Store
        self.quota: QuotaGuard
        self.jobs: JobService
        self.runner: JobRunner  # set by the cogs.delivery extension
        self.accepting_jobs = True
        self._shutdown: asyncio.Task[None] | None = None

    async def setup_hook(self) -> None:
        self.http_session = aiohttp.ClientSession(raise_for_status=False)
        self.segmind = SegmindClient(
            self.http_session,
            api_key=self.config.segmind_api_key,
            base_url=self.config.segmind_base_url,
            model=self.config.segmind_model,
            budget=RequestBudget(self.config.segmind_requests_per_minute),
            deadline=self.config.segmind_job_deadline_seconds,
        )
        self.store = await open_store(self.config.database_url)
        self.quota = QuotaGuard(
            self.store,
            QuotaLimits(self.config.quota_daily_images, self.config.quota_max_concurrent),
            self.config.quota_exempt_role_ids,
        )
        self.jobs = JobService(
            self.segmind,
            self.store,
            self.quota,
            self.http_session,
            credits_cooloff=self.config.credits_cooloff_seconds,
            rate_limit_max_wait=self.config.rate_limit_max_wait_seconds,
            lease_seconds=self.config.job_lease_seconds,
        )
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self._sync_commands()

    async def _sync_commands(self) -> None:
        if self.config.discord_guild_ids:
            # Guild commands appear at once; global ones can take up to an hour to reach every client.
            for guild_id in self.config.discord_guild_ids:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("synced %d command(s) to guild %d", len(synced), guild_id)
        else:
            synced = await self.tree.sync()
            log.info("synced %d global command(s)", len(synced))

    async def on_ready(self) -> None:
        log.info(
            "connected as %s (%s) to %d guild(s)", self.user, getattr(self.user, "id", "?"), len(self.guilds)
        )

    async def close(self) -> None:
        # Signal handlers and `async with` may both close the bot; the first call does the work and
        # every caller waits for it, so the store is always closed before the process exits.
        self.accepting_jobs = False
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._close_everything())
        await asyncio.shield(self._shutdown)

    async def _close_everything(self) -> None:
        await super().close()
        if hasattr(self, "http_session"):
            await self.http_session.close()
        if hasattr(self, "store"):
            await self.store.close()
        log.info("closed")


async def run(config: Config) -> None:
    bot = DreamshaperBot(config)
    loop = asyncio.get_running_loop()
    closing: set[asyncio.Task[None]] = set()

    def shut_down(signum: signal.Signals) -> None:
        log.info("%s received: no new jobs; unfinished ones will resume at the next start", signum.name)
        closing.add(asyncio.create_task(bot.close()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shut_down, signum)
    async with bot:
        await bot.start(config.discord_token)
    await asyncio.gather(*closing)


def main() -> int:
    load_dotenv()
    try:
        config = Config.from_env(os.environ)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    discord.utils.setup_logging(level=config.log_level_number, root=True)
    # discord.py logs request URLs at DEBUG, and interaction webhook URLs carry the interaction token.
    for name in ("discord.http", "discord.webhook.async_", "discord.gateway"):
        logging.getLogger(name).setLevel(max(config.log_level_number, logging.INFO))
    point_discord_py_at(config.discord_api_base, config.discord_gateway_url)
    try:
        asyncio.run(run(config))
    except discord.LoginFailure:
        log.error("Discord refused the bot token (DISCORD_TOKEN); check it in the developer portal")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
