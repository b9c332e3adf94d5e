"""Commands are synced only when they changed, and by one process of several starting together.

The store's claim (both backends), the real bot's tree over the Discord stand-in, and `python bot.py`
processes restarting on one store or starting side by side.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import discord
import pytest
from discord import app_commands

from cogs.app import CommandsRefused
from devtools.launcher import BotLauncher
from services.store import Store
from tests.conftest import StackFactory, database_url
from tests.processes import bot_processes
from tests.test_store import NOW, Backend, backend, store

__all__ = ["backend", "bot_processes", "store"]

TTL = 60.0


# --- the store's claim ----------------------------------------------------------------------------------


async def test_a_claim_is_granted_once_until_it_is_finished(store: Store) -> None:
    assert await store.claim_command_sync("app:guild", "v1", NOW, TTL)
    assert not await store.claim_command_sync("app:guild", "v1", NOW + 1, TTL)
    # Another target, or other commands for the same target, are claims of their own.
    assert await store.claim_command_sync("app:other", "v1", NOW + 1, TTL)
    await store.finish_command_sync("app:guild", "v1", synced=True)
    assert not await store.claim_command_sync("app:guild", "v1", NOW + 2, TTL)
    assert not await store.claim_command_sync("app:guild", "v1", NOW + 10 * TTL, TTL)
    assert await store.claim_command_sync("app:guild", "v2", NOW + 3, TTL)


async def test_a_failed_sync_leaves_the_commands_to_sync_again(store: Store) -> None:
    assert await store.claim_command_sync("app:guild", "v1", NOW, TTL)
    await store.finish_command_sync("app:guild", "v1", synced=True)
    assert await store.claim_command_sync("app:guild", "v2", NOW + 1, TTL)
    await store.finish_command_sync("app:guild", "v2", synced=False)
    # v1 is still what Discord has: v2 is claimed again at once, and v1 stays unchanged.
    assert not await store.claim_command_sync("app:guild", "v1", NOW + 2, TTL)
    assert await store.claim_command_sync("app:guild", "v2", NOW + 2, TTL)


async def test_a_claim_left_by_a_process_that_died_lapses(store: Store) -> None:
    assert await store.claim_command_sync("app:guild", "v1", NOW, TTL)
    assert not await store.claim_command_sync("app:guild", "v1", NOW + TTL - 1, TTL)
    assert await store.claim_command_sync("app:guild", "v1", NOW + TTL + 1, TTL)


async def test_concurrent_claims_across_store_instances_have_one_winner(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    claims = [(first if i % 2 else second).claim_command_sync("app:guild", "v1", NOW, TTL) for i in range(8)]
    assert sum(await asyncio.gather(*claims)) == 1


async def test_the_synced_commands_survive_a_reopen(backend: Backend) -> None:
    store = await backend.open()
    assert await store.claim_command_sync("app:guild", "v1", NOW, TTL)
    await store.finish_command_sync("app:guild", "v1", synced=True)
    await backend.close_all()
    reopened = await backend.open()
    assert not await reopened.claim_command_sync("app:guild", "v1", NOW + 1, TTL)


# --- the real bot's tree, over the Discord stand-in -----------------------------------------------------


async def test_the_tree_syncs_only_changed_commands_and_retries_a_refused_sync(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack()
    stand_in, tree = stack.discord, stack.bot.tree
    guild = discord.Object(id=stand_in.guild_id)
    assert len(stand_in.requests_for("sync_commands")) == 1

    with caplog.at_level("INFO", logger="dreamshaper"):
        await tree.sync_if_changed(guild)
    assert len(stand_in.requests_for("sync_commands")) == 1
    assert any(r.getMessage().startswith("commands unchanged, not synced") for r in caplog.records)

    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")

    tree.add_command(app_commands.Command(name="ping", description="Answers pong", callback=ping), guild=guild)
    stand_in.inject("sync_commands", status=403, code=50001)
    with pytest.raises(CommandsRefused):
        await tree.sync_if_changed(guild)
    await tree.sync_if_changed(guild)
    assert len(stand_in.requests_for("sync_commands")) == 3
    assert "ping" in {command["name"] for command in stand_in.synced_commands[stand_in.guild_id]}
    await tree.sync_if_changed(guild)
    assert len(stand_in.requests_for("sync_commands")) == 3


# --- `python bot.py`, restarted or started side by side -------------------------------------------------


def log_says(process: object, text: str) -> bool:
    return text in process.log()  # type: ignore[attr-defined]


@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
async def test_a_second_start_with_the_same_commands_does_not_sync(
    bot_processes: BotLauncher, tmp_path: Path, store_kind: str
) -> None:
    database = await database_url(store_kind, tmp_path)
    stand_in = bot_processes.discord
    first = await bot_processes.start(database, ready_count=1)
    assert len(stand_in.requests_for("sync_commands")) == 1
    assert log_says(first, "synced 3 command(s) to guild")
    first.terminate()
    assert await first.wait(15) == 0

    second = await bot_processes.start(database, ready_count=2)
    assert len(stand_in.requests_for("sync_commands")) == 1
    assert log_says(second, "commands unchanged, not synced to guild")


@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
async def test_two_processes_starting_together_sync_once(
    bot_processes: BotLauncher, tmp_path: Path, store_kind: str
) -> None:
    database = await database_url(store_kind, tmp_path)
    # One launcher (and folder, for the logs) per shard, so both processes can be launched at once.
    shards = []
    for shard in ("0", "1"):
        (tmp_path / f"shard-{shard}").mkdir()
        shards.append(
            BotLauncher(bot_processes.stand_ins, tmp_path / f"shard-{shard}", env=bot_processes.defaults)
        )
    try:
        await asyncio.gather(
            *(
                launcher.start(database, ready_count=2, SHARD_COUNT="2", SHARD_IDS=str(shard))
                for shard, launcher in enumerate(shards)
            )
        )
        logs = [process.log() for launcher in shards for process in launcher.started]
    finally:
        for launcher in shards:
            await launcher.stop_all()
    assert len(bot_processes.discord.requests_for("sync_commands")) == 1, logs
    assert sum("synced 3 command(s)" in log for log in logs) == 1, logs
    assert sum("commands unchanged, not synced" in log for log in logs) == 1, logs
