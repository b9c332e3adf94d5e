"""Entry point: check Python, load .env, validate the configuration, open resources, build the bot, run it."""

# The version check must run before the imports below (services need 3.11), hence imports after code.
# Python compiles the whole file before running the check, so all of bot.py stays in syntax Python 3.7
# parses (no walrus, match or except*; 3.7 is the oldest that takes `from __future__ import annotations`).
# tests/test_startup.py runs it under every older interpreter it finds.
# ruff: noqa: E402

from __future__ import annotations

import sys

MINIMUM_PYTHON = (3, 11)


def python_too_old(version: tuple[int, ...]) -> str | None:
    """The message for an interpreter older than the code needs, or None; it replaces an ImportError."""
    if version[:2] >= MINIMUM_PYTHON:
        return None
    found = ".".join(str(part) for part in version[:3])
    return (
        f"The Dreamshaper bot needs Python 3.11 or newer, but this is Python {found} ({sys.executable}). "
        "Create the virtualenv with python3.11 (see README.md)."
    )


_TOO_OLD = python_too_old(tuple(sys.version_info[:3]))
if _TOO_OLD is not None:
    print(_TOO_OLD, file=sys.stderr)
    sys.exit(2)

import argparse
import asyncio
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

import aiohttp
import discord
import yarl
from discord.ext import commands
from dotenv import load_dotenv

from services.config import Config, ConfigError, discord_api_root
from services.jobs import JobService
from services.quota import QuotaGuard
from services.segmind import Forbidden, RequestBudget, SegmindClient, Unauthorized
from services.store import Store, describe_open_failure, open_store
from services.store.base import QuotaLimits

if TYPE_CHECKING:
    from cogs.delivery import JobRunner

log = logging.getLogger("dreamshaper")

EXTENSIONS: tuple[str, ...] = ("cogs.delivery", "cogs.imagine")

# Exit statuses: 2 when only the operator can fix it (retrying changes nothing), 1 when a service that
# may come back is down, so a supervisor's restart can help.
EXIT_CONFIGURATION = 2
EXIT_UNAVAILABLE = 1

# A Redis host that drops packets would otherwise hold the start for as long as TCP keeps trying.
STORE_OPEN_TIMEOUT = 15.0

# discord.py logs request URLs at DEBUG, and interaction webhook URLs carry the interaction token;
# aiosqlite logs every statement with its parameters, and the job record holds that token too.
CHATTY_LOGGERS = ("discord.http", "discord.webhook.async_", "discord.gateway", "aiosqlite")

USAGE = """\
Runs the Dreamshaper Discord bot: /imagine generates images with Dreamshaper SDXL through
Segmind's serverless API, under a per-member quota.

Every setting comes from the environment, and from a .env file beside bot.py (or in a folder above
it) for variables the environment does not set. DISCORD_TOKEN and SEGMIND_API_KEY are required.
.env.example lists every variable with its default and meaning: copy it to .env and fill it in.

Exit status: 0 after a clean stop, 2 for a configuration problem, 1 when Discord or the store cannot
be reached."""


class StartupError(Exception):
    """A start-up problem the operator can fix: reported as one line naming what to check, no traceback."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


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


class DreamshaperBot(commands.AutoShardedBot):
    """The bot and the services it drives; the session and the store belong to the caller, who closes them."""

    def __init__(self, config: Config, *, http_session: aiohttp.ClientSession, store: Store) -> None:
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
        self.http_session = http_session
        self.store = store
        # Built here rather than in setup_hook: the Segmind key is checked before the Discord login, and
        # setup_hook only runs once Discord has answered.
        self.segmind = SegmindClient(
            http_session,
            api_key=config.segmind_api_key,
            base_url=config.segmind_base_url,
            model=config.segmind_model,
            budget=RequestBudget(config.segmind_requests_per_minute),
            deadline=config.segmind_job_deadline_seconds,
        )
        self.quota = QuotaGuard(
            store,
            QuotaLimits(config.quota_daily_images, config.quota_max_concurrent),
            config.quota_exempt_role_ids,
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
        self.runner: JobRunner  # set by the cogs.delivery extension
        self.accepting_jobs = True
        self._shutdown: asyncio.Task[None] | None = None

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self._sync_commands()

    async def _sync_commands(self) -> None:
        if self.config.discord_guild_ids:
            # Guild commands appear at once; global ones can take up to an hour to reach every client.
            for guild_id in self.config.discord_guild_ids:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                try:
                    synced = await self.tree.sync(guild=guild)
                except (discord.Forbidden, discord.NotFound) as error:
                    raise StartupError(
                        f"Discord refused the bot's commands for server {guild_id} ({error.status} "
                        f"{error.text or 'no reason given'}): check DISCORD_GUILD_IDS; the bot must be in every "
                        "server listed there, invited with the applications.commands scope",
                        EXIT_CONFIGURATION,
                    ) from None
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
        # every caller waits for it, so the owner closes the store only once the bot is done with it.
        self.accepting_jobs = False
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._close_discord())
        await asyncio.shield(self._shutdown)

    async def _close_discord(self) -> None:
        await super().close()
        log.info("closed")


async def open_configured_store(database_url: str) -> Store:
    threads_before = set(threading.enumerate())
    try:
        async with asyncio.timeout(STORE_OPEN_TIMEOUT):
            return await open_store(database_url)
    except TimeoutError:
        raise StartupError(
            f"the store did not answer within {STORE_OPEN_TIMEOUT:g} s: check DATABASE_URL and that the "
            "server it names is up",
            EXIT_UNAVAILABLE,
        ) from None
    except Exception as error:
        failure = describe_open_failure(database_url, error)
        if failure is None:
            raise
        await _let_store_threads_end(threads_before)
        raise StartupError(
            failure.message, EXIT_UNAVAILABLE if failure.transient else EXIT_CONFIGURATION
        ) from None


async def _let_store_threads_end(threads_before: set[threading.Thread]) -> None:
    # aiosqlite's worker thread outlives a failed connect and then reports to the event loop; were the loop
    # closed by then (the start is over), it would print a RuntimeError traceback. The loop's own executor
    # threads idle until exit, so they are not waited for.
    started = [
        thread
        for thread in threading.enumerate()
        if thread not in threads_before and not thread.name.startswith("asyncio_")
    ]

    def join_them() -> None:
        for thread in started:
            thread.join(2.0)

    await asyncio.to_thread(join_them)


async def verify_segmind_key(segmind: SegmindClient) -> None:
    """Stops the start on a key Segmind refuses; when the answer is unclear, verify_key logs why and the bot starts."""
    try:
        accepted = await segmind.verify_key()
    except (Unauthorized, Forbidden) as error:
        # Segmind's reason is not repeated: the key is what is wrong, and the key is never shown.
        raise StartupError(
            f"Segmind refused the API key ({error.status}): check SEGMIND_API_KEY "
            "(https://cloud.segmind.com/console/api-keys)",
            EXIT_CONFIGURATION,
        ) from None
    if accepted:
        log.info("Segmind accepted the API key")


async def log_in(bot: DreamshaperBot, config: Config) -> None:
    where = discord.http.Route.BASE
    try:
        await bot.login(config.discord_token)
    except discord.LoginFailure:
        raise StartupError(
            "Discord refused the bot token: check DISCORD_TOKEN (the Bot tab of the developer portal; "
            "resetting the token there invalidates the old one)",
            EXIT_CONFIGURATION,
        ) from None
    except discord.HTTPException as error:
        if error.status == 404:
            raise StartupError(
                f"Discord's API answered 404 Not Found under {where}: check DISCORD_API_BASE; it must be the "
                "proxy's root (http://proxy:8080) or its versioned base (http://proxy:8080/api/v10)",
                EXIT_CONFIGURATION,
            ) from None
        raise StartupError(
            f"Discord's API answered {error.status} {error.response.reason} under {where} while logging in: "
            + _discord_hint(config),
            EXIT_UNAVAILABLE,
        ) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as error:
        reason = str(error) or type(error).__name__
        raise StartupError(
            f"cannot reach Discord's API at {where} ({reason}): {_discord_hint(config)}", EXIT_UNAVAILABLE
        ) from None


def _discord_hint(config: Config) -> str:
    if config.discord_api_base:
        return "check DISCORD_API_BASE and that the proxy it names is up"
    return "check the network (or set DISCORD_API_BASE if Discord is reached through a proxy)"


async def run(config: Config) -> None:
    # The store first: a bad DATABASE_URL stops the start before Discord or Segmind is contacted.
    store = await open_configured_store(config.database_url)
    try:
        async with aiohttp.ClientSession() as http_session:
            await run_bot(DreamshaperBot(config, http_session=http_session, store=store), config)
    finally:
        await store.close()


async def run_bot(bot: DreamshaperBot, config: Config) -> None:
    loop = asyncio.get_running_loop()
    closing: set[asyncio.Task[None]] = set()

    def shut_down(signum: signal.Signals) -> None:
        log.info("%s received: no new jobs; unfinished ones will resume at the next start", signum.name)
        closing.add(asyncio.create_task(bot.close()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shut_down, signum)
    async with bot:
        await verify_segmind_key(bot.segmind)
        if not bot.is_closed():  # a signal during the key check has already stopped the bot
            await log_in(bot, config)
            await bot.connect()
    await asyncio.gather(*closing)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bot.py", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser.parse_args(argv)


def configure_logging(config: Config) -> None:
    discord.utils.setup_logging(level=config.log_level_number, root=True)
    # The bot never joins voice: "voice will NOT be supported" at every start would only be noise.
    discord.VoiceClient.warn_nacl = False
    discord.VoiceClient.warn_dave = False
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(config.log_level_number, logging.INFO))


def main(argv: list[str] | None = None) -> int:
    parse_arguments(argv)
    load_dotenv()
    try:
        config = Config.from_env(os.environ)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIGURATION
    configure_logging(config)
    point_discord_py_at(config.discord_api_base, config.discord_gateway_url)
    try:
        asyncio.run(run(config))
    except StartupError as error:
        log.error("cannot start: %s", error)
        return error.exit_status
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were installed (while the store opened or the key was checked).
        log.info("interrupted during start-up")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
