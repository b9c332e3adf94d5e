"""Entry point: check Python, read the arguments and .env, validate the configuration, configure logging,
open the store and the HTTP session, run the bot (`cogs.app`) and close them."""

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
import gc
import logging
import os
import signal
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import discord
from dotenv import load_dotenv

try:
    import uvloop
except ImportError:  # it does not build on Windows, where the standard loop runs the bot, more slowly
    uvloop = None

from cogs.app import CommandsRefused, DreamshaperBot, point_discord_py_at
from services.config import Config, ConfigError
from services.segmind import Forbidden, SegmindClient, Unauthorized
from services.store import GuardedStore, describe_open_failure, open_store

log = logging.getLogger("dreamshaper")
# Young objects are collected after this many allocations instead of CPython's 700: a burst of commands
# allocates fast enough to run a collection several hundred times a second, each on the event loop.
GC_YOUNG_THRESHOLD = 20_000

# Exit statuses: 2 when only the operator can fix it (retrying changes nothing), 1 when a service that
# may come back is down, so a supervisor's restart can help.
EXIT_CONFIGURATION = 2
EXIT_UNAVAILABLE = 1

# The --env-file value that reads no file at all (tests pass it, so a developer's .env never leaks in).
NO_ENV_FILE = "none"

# A Redis host that drops packets would otherwise hold the start for as long as TCP keeps trying.
STORE_OPEN_TIMEOUT = 15.0

# discord.py logs request URLs at DEBUG, and interaction webhook URLs carry the interaction token;
# aiosqlite logs every statement with its parameters, and the job record holds that token too.
CHATTY_LOGGERS = ("discord.http", "discord.webhook.async_", "discord.gateway", "aiosqlite")

USAGE = """\
Runs the Dreamshaper Discord bot: /imagine generates images with Dreamshaper SDXL through
Segmind's serverless API, under a per-member quota.

Every setting comes from the environment, and from a .env file beside bot.py (or in a folder above
it, or the one --env-file names) for variables the environment does not set. DISCORD_TOKEN and
SEGMIND_API_KEY are required. .env.example lists every variable with its default and meaning: copy
it to .env and fill it in.

Exit status: 0 after a clean stop, 2 for a configuration problem, 1 when Discord or the store cannot
be reached."""


class StartupError(Exception):
    """A start-up problem the operator can fix: reported as one line naming what to check, no traceback."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


async def open_configured_store(database_url: str) -> GuardedStore:
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
        if thread not in threads_before and not thread.name.startswith(("asyncio_", "uvloop_"))
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
    except CommandsRefused as refused:
        raise StartupError(
            f"Discord refused the bot's commands for server {refused.guild_id} ({refused.status} "
            f"{refused.reason or 'no reason given'}): check DISCORD_GUILD_IDS; the bot must be in every "
            "server listed there, invited with the applications.commands scope",
            EXIT_CONFIGURATION,
        ) from None
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
    async with await open_configured_store(config.database_url) as store, aiohttp.ClientSession() as session:
        await run_bot(DreamshaperBot(config, http_session=session, store=store), config)


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
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help=f"read settings the environment does not set from PATH instead (default: the .env beside "
        f"bot.py or in a folder above it); {NO_ENV_FILE} reads no file",
    )
    return parser.parse_args(argv)


def load_env_file(env_file: str | None) -> None:
    """Adds the file's settings to the environment, which wins where both set one; a missing file named
    explicitly raises FileNotFoundError."""
    if env_file is None:
        load_dotenv()  # finds the .env beside bot.py or in a folder above it, if there is one
    elif env_file != NO_ENV_FILE:
        if not Path(env_file).is_file():
            raise FileNotFoundError(env_file)
        load_dotenv(env_file)


def configure_logging(config: Config) -> None:
    discord.utils.setup_logging(level=config.log_level_number, root=True)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(config.log_level_number, logging.INFO))


def tune_garbage_collector() -> None:
    # What is loaded by now (modules, classes, discord.py's tables) lives until exit: frozen, it is left
    # out of every later collection's scan, so a full collection under load walks only the bot's own data.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD)


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    # uvloop's sockets, timers and callbacks are libuv's, in C, where asyncio's are Python: in a burst of a
    # thousand jobs the loop's own work is a large share of the bot's CPU.
    if uvloop is None:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        load_env_file(arguments.env_file)
    except FileNotFoundError:
        print(f"bot.py: --env-file {arguments.env_file}: no such file", file=sys.stderr)
        return EXIT_CONFIGURATION
    try:
        config = Config.from_env(os.environ)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIGURATION
    configure_logging(config)
    point_discord_py_at(config.discord_api_base, config.discord_gateway_url)
    tune_garbage_collector()
    try:
        run_event_loop(run(config))
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
