"""The stand-in environment, built in one place: the Discord and Segmind stand-ins, a bot configuration
pointing at them, a store, and the real bot (`DreamshaperBot`, unmodified) running in this process.

    async with stand_ins(Credentials()) as env, running_bot(env, sqlite_url(folder)) as stack:
        handle = await stack.imagine(prompt="a lighthouse")

The tests' fixtures, the demo, the benchmarks and the fault suite all build it from here. The bot as a
process of its own (`python bot.py`) is `devtools.launcher`, configured by the same `StandIns.bot_env`.
This is the one module under devtools/ and tests/ that imports the bot's class.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import redis.asyncio as redis

from cogs import render
from cogs.app import DreamshaperBot, point_discord_py_at
from cogs.buttons import CUSTOM_ID
from devtools.fakes.discord.models import (
    CALLBACK_CHANNEL_MESSAGE,
    CALLBACK_DEFERRED_UPDATE_MESSAGE,
    FLAG_EPHEMERAL,
    InteractionHandle,
    StoredMessage,
)
from devtools.fakes.discord.server import DiscordStandIn
from devtools.fakes.segmind.server import SegmindServer
from devtools.fakes.segmind.settings import SegmindServerSettings
from services.config import Config
from services.jobs import Progress, ProgressKind
from services.store import open_store

# Redis database 15, which a developer's bot (database 0 by default) leaves alone; every user of it here
# writes under a key prefix of its own.
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
STARTUP_TIMEOUT = 15.0  # for READY, then again for the command sync
STOP_TIMEOUT = 10.0
# The first word of every progress line (waiting for a slot, queued at Segmind, generating), taken from
# the bot's own renderer so the two cannot drift: any other answer to a command is final.
PROGRESS_MARKS: tuple[str, ...] = tuple(
    sorted({render.progress_text(Progress(kind)).split(" ", 1)[0] for kind in ProgressKind})
)


@dataclass(frozen=True)
class Credentials:
    """The bot token the Discord stand-in accepts and the key the Segmind stand-in accepts.

    Each stand-in accepts only its own, so the bot's configuration is exercised as with real ones; they
    mean nothing anywhere else.
    """

    bot_token: str = "bot.stand-in.token-3f9a"
    segmind_key: str = "sg_stand_in_key_7e21"

    def segmind_settings(self, **settings: Any) -> SegmindServerSettings:
        """Settings for a Segmind stand-in that accepts only this key; `settings` are the other fields."""
        return SegmindServerSettings(api_keys=frozenset({self.segmind_key}), **settings)


@dataclass
class StandIns:
    """The two stand-ins, listening, and the credentials they accept."""

    discord: DiscordStandIn
    segmind: SegmindServer
    credentials: Credentials

    def bot_env(self, database_url: str, **overrides: str) -> dict[str, str]:
        """The bot's configuration as environment variables: these stand-ins, their credentials, the
        guild to sync the commands to, and `database_url`; `overrides` add to or replace any of them."""
        return {
            "DISCORD_TOKEN": self.credentials.bot_token,
            "SEGMIND_API_KEY": self.credentials.segmind_key,
            "SEGMIND_BASE_URL": self.segmind.base_url,
            "DATABASE_URL": database_url,
            "DISCORD_GUILD_IDS": str(self.discord.guild_id),
            "DISCORD_API_BASE": self.discord.api_base,
            "DISCORD_GATEWAY_URL": self.discord.gateway_url,
            **overrides,
        }


@contextlib.asynccontextmanager
async def stand_ins(
    credentials: Credentials, segmind: SegmindServerSettings | None = None, **discord_options: Any
) -> AsyncIterator[StandIns]:
    """Starts a Segmind stand-in (with `segmind`'s settings, by default accepting only the credentials'
    key) and a Discord stand-in (accepting only their bot token; `discord_options` go to `DiscordStandIn`)
    on free loopback ports, and stops both at the end."""
    server = SegmindServer(segmind or credentials.segmind_settings())
    await server.start()
    try:
        async with DiscordStandIn(bot_token=credentials.bot_token, **discord_options) as discord:
            yield StandIns(discord, server, credentials)
    finally:
        await server.stop()


class BotStopped(RuntimeError):
    """The in-process bot's task ended while something was waiting for it."""


@dataclass
class BotStack:
    """The stand-ins and the real bot running on this event loop, with a member's view of it."""

    discord: DiscordStandIn
    segmind: SegmindServer
    config: Config
    bot: DreamshaperBot
    task: asyncio.Task[None]

    async def imagine(self, timeout: float = 20, **options: object) -> InteractionHandle:
        """Sends /imagine and waits until the bot's answer is final (result, error or refusal).

        `user_id`, `roles`, `permissions` and `username` among `options` say who sends it.
        """
        handle = await self.discord.send_slash_command("imagine", options, **self._user(options))
        await self.settled(handle, timeout)
        return handle

    async def press(
        self, message: StoredMessage, action: str, timeout: float = 20, **user: object
    ) -> InteractionHandle:
        """Presses the message's button for `action` (reroll, same, info, delete, resend) and waits for the
        answer."""
        prefix = CUSTOM_ID.format(action=action, job_id="")
        button = next(
            c["custom_id"]
            for row in message.components
            for c in row["components"]
            if c["custom_id"].startswith(prefix)
        )
        handle = await self.discord.press_button(message, button, **user)  # type: ignore[arg-type]
        await self.settled(handle, timeout)
        return handle

    async def settled(self, handle: InteractionHandle, timeout: float = 20) -> None:
        """Waits until the interaction's answer is final: a reply, a result, an error, or a deletion."""

        await self.discord.wait_for(lambda: is_answered(handle), timeout)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Waits until `predicate()` holds: TimeoutError after `timeout`, BotStopped if the bot stops first."""
        await self.discord.wait_for(lambda: predicate() or self.task.done(), timeout)
        if not predicate():
            raise BotStopped(f"the bot stopped unexpectedly ({self.exit_reason()})")

    async def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Waits for the bot's READY from the gateway, then for its commands synced to the stand-in's guild."""
        ready_before = self.discord.gateway.ready_count
        try:
            await self.wait_for(lambda: self.discord.gateway.ready_count > ready_before, timeout)
        except TimeoutError as error:
            raise TimeoutError(
                f"the bot did not connect to the Discord stand-in within {timeout:g} s"
            ) from error
        try:
            # To the test server, or globally for a bot started without DISCORD_GUILD_IDS.
            synced = self.discord.synced_commands
            await self.wait_for(lambda: bool(synced.get(self.discord.guild_id) or synced.get(None)), timeout)
        except TimeoutError as error:
            raise TimeoutError(f"the bot did not sync its commands within {timeout:g} s") from error

    async def restart(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Stops the bot and starts a new one on the same configuration, HTTP session and store."""
        await self.stop()
        self.bot = DreamshaperBot(self.config, http_session=self.bot.http_session, store=self.bot.store)
        self.task = asyncio.create_task(self.bot.start(self.config.discord_token))
        await self.wait_until_ready(timeout)

    async def stop(self) -> None:
        """Closes the bot and waits (up to `STOP_TIMEOUT`) for its task to end; the session and store stay open."""
        await self.bot.close()
        # The task ends once the gateway connection is closed; how it ended was reported already if it mattered.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, STOP_TIMEOUT)

    def exit_reason(self) -> str:
        """How the bot's task ended, in a few words (for a task that has ended)."""
        if self.task.cancelled():
            return "it was cancelled"
        error = self.task.exception()
        if error is None:
            return "it returned without an error"
        return " ".join(f"{type(error).__name__}: {error}".split())

    @staticmethod
    def _user(options: dict[str, object]) -> dict[str, object]:
        return {
            key: options.pop(key) for key in ("user_id", "roles", "permissions", "username") if key in options
        }


def started_a_job(handle: InteractionHandle) -> bool:
    """Whether the command was acknowledged as a job: its answer is the job's first progress line, where
    a refusal is a reply of its own."""
    callback = handle.callback
    if callback is None or callback.type != CALLBACK_CHANNEL_MESSAGE:
        return False
    data = callback.data or {}
    # A job's line is public; refusals are only for the member who asked.
    public = not int(data.get("flags") or 0) & FLAG_EPHEMERAL
    return public and str(data.get("content") or "").startswith(PROGRESS_MARKS)


def is_answered(handle: InteractionHandle) -> bool:
    """Whether the interaction's answer is final: a reply, a result, an error, or a deletion."""
    callback, original = handle.callback, handle.original
    if callback is None:
        return False
    if callback.type == CALLBACK_CHANNEL_MESSAGE and not started_a_job(handle):
        return True
    if callback.type == CALLBACK_DEFERRED_UPDATE_MESSAGE:
        return original is not None and original.deleted
    return original is not None and not original.loading and is_final(original)


def is_final(message: StoredMessage) -> bool:
    """A message that is a result (attachments) or an error, not a progress line."""
    if message.attachments:
        return True
    return bool(message.content) and not message.content.startswith(PROGRESS_MARKS)


@contextlib.asynccontextmanager
async def running_bot(
    stand_ins: StandIns, database_url: str, *, startup_timeout: float = STARTUP_TIMEOUT, **env: str
) -> AsyncIterator[BotStack]:
    """The real bot in this process, configured by `StandIns.bot_env(database_url, **env)`, connected and
    with its commands synced (`BotStack.wait_until_ready`).

    As in `bot.run`, the HTTP session and the store are opened first, outlive the bot (and a restart of
    it) and are closed last.
    """
    config = Config.from_env(stand_ins.bot_env(database_url, **env))
    point_discord_py_at(config.discord_api_base, config.discord_gateway_url)
    async with aiohttp.ClientSession() as http_session:
        store = await open_store(config.database_url)
        try:
            bot = DreamshaperBot(config, http_session=http_session, store=store)
            task = asyncio.create_task(bot.start(config.discord_token))
            stack = BotStack(stand_ins.discord, stand_ins.segmind, config, bot, task)
            try:
                await stack.wait_until_ready(startup_timeout)
                yield stack
            finally:
                await stack.stop()
        finally:
            await store.close()


# ---- stores --------------------------------------------------------------------------------------


def sqlite_url(folder: Path) -> str:
    """A SQLite store in `folder` (created by the store if missing)."""
    return f"sqlite:///{folder}/bot.sqlite3"


def redis_url(label: str) -> str:
    """A store in the Redis at `REDIS_URL`, under a new key prefix that starts with `label`."""
    separator = "&" if "?" in REDIS_URL else "?"
    return f"{REDIS_URL}{separator}prefix={label}-{uuid.uuid4().hex[:8]}:"


def redis_prefix(database_url: str) -> str | None:
    """The key prefix a Redis store URL names (`?prefix=`), or None."""
    return parse_qs(urlsplit(database_url).query).get("prefix", [None])[0]


async def redis_answers(url: str = REDIS_URL) -> bool:
    client = redis.from_url(url)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def drop_redis_keys(database_url: str) -> int:
    """Deletes every key under the prefix a Redis store URL names; returns how many there were.

    A URL without a prefix (the store's default one) is left alone: other stores may share it.
    """
    prefix = redis_prefix(database_url)
    if not prefix:
        return 0
    client = redis.from_url(database_url.partition("?")[0])
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
        return len(keys)
    finally:
        await client.aclose()
