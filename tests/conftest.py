"""Shared fixtures: the real bot, started in-process against the local Discord and Segmind stand-ins."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis

from bot import DreamshaperBot, point_discord_py_at
from devtools.discord_server import DiscordStandIn, InteractionHandle, StoredMessage
from devtools.segmind_server import SegmindServer, SegmindServerSettings
from services.config import Config
from services.store import open_store

SEGMIND_KEY = "sg_e2e_secret_key_93b1"
BOT_TOKEN = "bot.e2e.secret-token-77"
BLOCKED_WORD = "forbidden"

# The example payload on Segmind's Dreamshaper SDXL API page, as given there.
PAGE_EXAMPLE: dict[str, object] = {
    "prompt": "cinematic photo of portrait of cyberpunk (the Grumpy Cat:1.25) in a spacesuit, looking with endless "
    "sadness at the universe passing by, cyberpunk 2077 city bg,  2d masterpiece by john Wilhelm, (grumpy:1.2), "
    "(cyberpunk:1.4), photo-realistic, octane render, hdr, neon, lens flares, ( best quality:1.9), active "
    "asymmetrical pose, (action-packed:1.8),  trending on artstation, 8k, 35mm photograph, film, bokeh, "
    "professional, 4k, highly detailed",
    "negative_prompt": "drawing, painting, crayon, sketch, graphite, impressionist, noisy, blurry, soft, deformed, "
    "ugly, [deformed | disfigured], poorly drawn, [bad : wrong] anatomy, [extra | missing | floating | disconnected] "
    "limb, (mutated hands and fingers), blurry",
    "samples": 1,
    "scheduler": "UniPC",
    "num_inference_steps": 35,
    "guidance_scale": 7,
    "seed": 1135424276,
    "img_width": 896,
    "img_height": 1152,
    "base64": False,
}


@dataclass
class BotStack:
    discord: DiscordStandIn
    segmind: SegmindServer
    bot: DreamshaperBot
    config: Config

    async def imagine(self, timeout: float = 20, **options: object) -> InteractionHandle:
        """Sends /imagine and waits until the bot's answer is final (result, error or refusal)."""
        handle = await self.discord.send_slash_command("imagine", options, **self._user(options))
        await self.settled(handle, timeout)
        return handle

    async def press(
        self, message: StoredMessage, action: str, timeout: float = 20, **user: object
    ) -> InteractionHandle:
        button = next(
            c["custom_id"]
            for row in message.components
            for c in row["components"]
            if c["custom_id"].startswith(f"ds:{action}:")
        )
        handle = await self.discord.press_button(message, button, **user)  # type: ignore[arg-type]
        await self.settled(handle, timeout)
        return handle

    async def settled(self, handle: InteractionHandle, timeout: float = 20) -> None:
        """Waits until the interaction's answer is final: a reply, a result, an error, or a deletion."""

        def done() -> bool:
            callback = handle.callback
            if callback is None:
                return False
            if callback.type == 4:
                return True
            original = handle.original
            if callback.type == 6:
                return original is not None and original.deleted
            return original is not None and not original.loading and is_final(original)

        await self.discord.wait_for(done, timeout)

    @staticmethod
    def _user(options: dict[str, object]) -> dict[str, object]:
        return {
            key: options.pop(key) for key in ("user_id", "roles", "permissions", "username") if key in options
        }


def is_final(message: StoredMessage) -> bool:
    """A message that is a result (attachments) or an error, not a progress line."""
    if message.attachments:
        return True
    return bool(message.content) and not message.content.startswith(("⏳", "📨", "🎨"))


StackFactory = Callable[..., Awaitable[BotStack]]

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


async def redis_available() -> bool:
    client = redis.from_url(REDIS_URL)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def database_url(kind: str, tmp_path: Path) -> str:
    """A fresh store: a SQLite file, or a Redis database under a key prefix of its own."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/bot.sqlite3"
    if not await redis_available():
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail(f"Redis is required (REQUIRE_REDIS=1) but {REDIS_URL} does not answer")
        pytest.skip(f"no Redis at {REDIS_URL}")
    return f"{REDIS_URL}?prefix=test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(params=["sqlite", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Every end-to-end test runs on both stores: one process on SQLite, many on Redis."""
    return str(request.param)


@pytest.fixture
async def make_stack(tmp_path: Path, store_kind: str) -> AsyncIterator[StackFactory]:
    started: list[tuple[BotStack, asyncio.Task[None]]] = []
    # Like bot.run: the sessions and stores are opened here, outlive their bots, and are closed last.
    resources = contextlib.AsyncExitStack()

    async def make(
        segmind_settings: SegmindServerSettings | None = None,
        discord_options: dict[str, object] | None = None,
        **env: str,
    ) -> BotStack:
        segmind = SegmindServer(
            segmind_settings
            or SegmindServerSettings(
                api_keys=frozenset({SEGMIND_KEY}),
                queue_seconds=0.3,
                seconds_per_step=0.02,
                blocked_words=frozenset({BLOCKED_WORD}),
            )
        )
        await segmind.start()
        discord = DiscordStandIn(bot_token=BOT_TOKEN, **(discord_options or {}))  # type: ignore[arg-type]
        await discord.start()
        config = Config.from_env(
            {
                "DISCORD_TOKEN": BOT_TOKEN,
                "SEGMIND_API_KEY": SEGMIND_KEY,
                "SEGMIND_BASE_URL": segmind.base_url,
                "SEGMIND_REQUESTS_PER_MINUTE": "600",
                "DATABASE_URL": await database_url(store_kind, tmp_path / str(len(started))),
                "DISCORD_GUILD_IDS": str(discord.guild_id),
                "DISCORD_API_BASE": discord.api_base,
                "DISCORD_GATEWAY_URL": discord.gateway_url,
                "QUOTA_DAILY_IMAGES": "20",
                "QUOTA_MAX_CONCURRENT": "3",
                # The stand-in's guild has one text channel; moderators read the same one here.
                "MOD_LOG_CHANNEL_ID": str(discord.channel_id),
                **env,
            }
        )
        point_discord_py_at(config.discord_api_base, config.discord_gateway_url)
        http_session = await resources.enter_async_context(aiohttp.ClientSession())
        store = await open_store(config.database_url)
        resources.push_async_callback(store.close)
        bot = DreamshaperBot(config, http_session=http_session, store=store)
        task = asyncio.create_task(bot.start(config.discord_token))
        stack = BotStack(discord, segmind, bot, config)
        started.append((stack, task))
        await discord.wait_until_ready(timeout=15)
        await discord.wait_for(lambda: bool(discord.synced_commands.get(discord.guild_id)), timeout=15)
        return stack

    yield make

    async with resources:
        for stack, task in reversed(started):
            await stack.bot.close()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=10)
            await stack.discord.stop()
            await stack.segmind.stop()
            assert not stack.discord.internal_errors, stack.discord.internal_errors
            assert_nothing_leaked(stack)


def assert_nothing_leaked(stack: BotStack) -> None:
    """Whatever a test did, Discord never received a traceback, the Segmind key or the bot token."""
    for request in stack.discord.requests:
        sent = json.dumps(request.json or {}, ensure_ascii=False)
        for secret in ("Traceback", 'File "', SEGMIND_KEY, BOT_TOKEN):
            assert secret not in sent, f"{secret!r} sent to Discord in {request!r}"
