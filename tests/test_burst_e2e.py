"""Many members at once, over real sockets: every acknowledged command is already in the store (a kill
right after loses nothing), and each image is decoded once on its way from Segmind to Discord."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from PIL import ImageFile

from cogs.app import DISCORD_CONNECTIONS
from devtools.fakes.discord.models import CALLBACK_CHANNEL_MESSAGE
from devtools.fakes.discord.server import DEFAULT_USER_ID
from devtools.launcher import BotLauncher
from devtools.stack import PROGRESS_MARKS, REDIS_URL, redis_prefix
from tests.conftest import StackFactory, database_url
from tests.processes import bot_processes

__all__ = ["bot_processes"]

MEMBERS = 40


async def stored_jobs(database: str) -> dict[int, dict[str, object]]:
    """Every job record in the store, by the interaction that asked for it, read behind the bot's back."""
    if database.startswith("sqlite:"):
        with sqlite3.connect(database.removeprefix("sqlite:///")) as db:
            rows = [json.loads(row[0]) for row in db.execute("SELECT data FROM jobs")]
    else:
        client = aioredis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"{redis_prefix(database)}job:*")]
            rows = [json.loads(value) for value in await client.mget(keys)] if keys else []
        finally:
            await client.aclose()
    return {int(row["interaction_id"]): row for row in rows if row.get("interaction_id")}


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_every_command_acknowledged_before_a_kill_is_in_the_store(
    bot_processes: BotLauncher, tmp_path: Path, store: str
) -> None:
    database = await database_url(store, tmp_path)
    bot = await bot_processes.start(database, ready_count=1, QUOTA_MAX_CONCURRENT="1")
    discord = bot_processes.discord
    # All dispatched before the bot reads the first: its store writes them in shared transactions.
    handles = [
        await discord.send_slash_command(
            "imagine", {"prompt": f"member {n}"}, user_id=DEFAULT_USER_ID + n, username=f"m{n}"
        )
        for n in range(MEMBERS)
    ]
    await discord.wait_for(lambda: sum(h.acknowledged for h in handles) >= MEMBERS // 2, timeout=30)
    bot.kill()
    await bot.wait(10)

    acknowledged = [h for h in handles if h.callback is not None]
    # Every one acknowledged as a job (its first progress line), none refused.
    assert all(
        h.callback is not None
        and h.callback.type == CALLBACK_CHANNEL_MESSAGE
        and str((h.callback.data or {}).get("content", "")).startswith(PROGRESS_MARKS)
        for h in acknowledged
    )
    jobs = await stored_jobs(database)
    missing = [h.id for h in acknowledged if h.id not in jobs]
    assert missing == [], f"{len(missing)} of {len(acknowledged)} acknowledged commands not in the store"
    # Each saved with the reservation it was given, in the same step.
    assert all(jobs[h.id]["reservation_id"] for h in acknowledged)
    assert all(
        str(jobs[h.id]["reservation_id"]).startswith(f"{jobs[h.id]['user_id']}.") for h in acknowledged
    )


async def test_each_image_is_decoded_once_on_its_way_to_discord(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack()
    decodes = 0
    original = ImageFile.ImageFile.load

    def load(image: ImageFile.ImageFile) -> object:
        nonlocal decodes
        decodes += 1
        return original(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    handle = await stack.imagine(prompt="two pictures, one decode each", samples=2, timeout=30)
    assert handle.original is not None and len(handle.original.attachments) == 2
    # In this process the Segmind stand-in renders its pictures too; those are encodes, not loads.
    assert decodes == 2


async def test_a_burst_of_commands_is_answered_and_delivered(make_stack: StackFactory) -> None:
    stack = await make_stack(QUOTA_MAX_CONCURRENT="1")
    handles = [
        await stack.discord.send_slash_command(
            "imagine", {"prompt": f"burst {n}"}, user_id=DEFAULT_USER_ID + n, username=f"m{n}"
        )
        for n in range(MEMBERS)
    ]
    await asyncio.gather(*(stack.settled(handle, timeout=60) for handle in handles))
    assert all(h.original is not None and h.original.attachments for h in handles)
    assert len(stack.segmind.stats.submits) == MEMBERS
    # Forty members at once, over a bounded set of connections to Discord.
    assert stack.bot.http.connector.limit == DISCORD_CONNECTIONS


async def test_a_job_that_lands_after_its_member_was_told_nothing_started_is_withdrawn(
    make_stack: StackFactory, store_kind: str
) -> None:
    if store_kind != "sqlite":
        pytest.skip("a file lock is SQLite's way of answering late")
    stack = await make_stack()
    path = stack.config.database_url.removeprefix("sqlite:///")
    other_process = sqlite3.connect(path, isolation_level=None)
    other_process.execute("BEGIN IMMEDIATE")
    try:
        handle = await stack.discord.send_slash_command("imagine", {"prompt": "too late to start"})
        await handle.wait_for_callback(timeout=10)
        assert handle.callback is not None and handle.callback.type == 4
        assert "storage is not responding" in str(handle.callback.data)
    finally:
        other_process.execute("COMMIT")  # the write that waited for the lock now goes through
        other_process.close()

    async def withdrawn() -> None:
        while True:
            job = (await stored_jobs(stack.config.database_url)).get(handle.id)
            if job is not None and job["state"] == "failed":
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(withdrawn(), 20)
    await stack.bot.runner.sweep()
    await asyncio.sleep(0.5)
    assert stack.segmind.stats.submits == []
    usage = await stack.bot.quota.usage(DEFAULT_USER_ID, stack.discord.guild_id)
    assert (usage.used_images, usage.in_flight) == (0, 0)
