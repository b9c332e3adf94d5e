"""Shared fixtures: the real bot, started in-process against the local Discord and Segmind stand-ins
(`devtools.stack` builds them), and a fresh store of either kind for each test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

try:
    import uvloop
except ImportError:  # not built on Windows: the tests run on asyncio's loop alone there
    uvloop = None

from devtools.fakes.segmind.settings import SegmindServerSettings
from devtools.stack import (
    REDIS_URL,
    BotStack,
    Credentials,
    drop_redis_keys,
    redis_answers,
    redis_prefix,
    redis_url,
    running_bot,
    sqlite_url,
    stand_ins,
)

SEGMIND_KEY = "sg_e2e_secret_key_93b1"
BOT_TOKEN = "bot.e2e.secret-token-77"
CREDENTIALS = Credentials(BOT_TOKEN, SEGMIND_KEY)
BLOCKED_WORD = "forbidden"

# The bot runs on uvloop (bot.py); these modules' code leans on how the loop keeps time (timers, turns),
# so their tests run on both loops. The rest drive the bot in-process on asyncio's own loop.
BOTH_LOOPS = frozenset(
    {"test_inflight.py", "test_watchdog.py", "test_store_batching.py", "test_progress_message.py"}
)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in BOTH_LOOPS and uvloop is not None:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


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


StackFactory = Callable[..., Awaitable[BotStack]]

# The Redis stores the running test asked for; `redis_keys_removed` deletes their keys when it ends.
_redis_stores: list[str] = []


async def database_url(kind: str, tmp_path: Path) -> str:
    """A fresh store: a SQLite file, or a Redis database under a key prefix of its own, emptied when the
    test ends."""
    if kind == "sqlite":
        return sqlite_url(tmp_path)
    if not await redis_answers():
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail(f"Redis is required (REQUIRE_REDIS=1) but {REDIS_URL} does not answer")
        pytest.skip(f"no Redis at {REDIS_URL}")
    url = redis_url("test")
    _redis_stores.append(url)
    return url


@pytest.fixture(autouse=True)
def redis_keys_removed() -> Iterator[None]:
    """Every key a test's Redis stores wrote is deleted after the test, its bots and processes have ended
    (an autouse fixture is torn down after the fixtures the test asked for)."""
    yield
    stores, _redis_stores[:] = list(_redis_stores), []
    for url in stores:
        asyncio.run(drop_redis_keys(url))
    left = [url for url in stores if asyncio.run(drop_redis_keys(url))]
    assert not left, f"keys written again under {[redis_prefix(url) for url in left]} after the test ended"


@pytest.fixture(params=["sqlite", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Every end-to-end test runs on both stores: one process on SQLite, many on Redis."""
    return str(request.param)


@pytest.fixture
async def make_stack(tmp_path: Path, store_kind: str) -> AsyncIterator[StackFactory]:
    """Builds stand-ins and a bot on them, as often as a test asks; all are stopped when it ends, newest
    first, and checked for internal errors and leaked secrets."""
    started: list[BotStack] = []
    running = contextlib.AsyncExitStack()

    async def make(
        segmind_settings: SegmindServerSettings | None = None,
        discord_options: dict[str, object] | None = None,
        **env: str,
    ) -> BotStack:
        settings = segmind_settings or CREDENTIALS.segmind_settings(
            queue_seconds=0.3, seconds_per_step=0.02, blocked_words=frozenset({BLOCKED_WORD})
        )
        stand_in_env = await running.enter_async_context(
            stand_ins(CREDENTIALS, settings, **(discord_options or {}))
        )
        database = await database_url(store_kind, tmp_path / str(len(started)))
        bot_env = {
            "SEGMIND_REQUESTS_PER_MINUTE": "600",
            # The stand-in's jobs take about a second, where the bot's first estimates are for real Segmind.
            "SEGMIND_MAX_POLL_SECONDS": "1",
            "QUOTA_DAILY_IMAGES": "20",
            "QUOTA_MAX_CONCURRENT": "3",
            # The stand-in's guild has one text channel; moderators read the same one here.
            "MOD_LOG_CHANNEL_ID": str(stand_in_env.discord.channel_id),
            **env,
        }
        stack = await running.enter_async_context(running_bot(stand_in_env, database, **bot_env))
        started.append(stack)
        return stack

    yield make

    await running.aclose()
    for stack in reversed(started):
        assert not stack.discord.internal_errors, stack.discord.internal_errors
        assert_nothing_leaked(stack)


def assert_nothing_leaked(stack: BotStack) -> None:
    """Whatever a test did, Discord never received a traceback, the Segmind key or the bot token."""
    for request in stack.discord.requests:
        sent = json.dumps(request.json or {}, ensure_ascii=False)
        for secret in ("Traceback", 'File "', SEGMIND_KEY, BOT_TOKEN):
            assert secret not in sent, f"{secret!r} sent to Discord in {request!r}"
