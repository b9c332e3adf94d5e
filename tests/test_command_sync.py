"""Commands are synced only when they changed (or their record is a day old, or `SYNC_COMMANDS=always`),
and by one process at a time: the others wait for it, then sync only what it did not.

The store's claim (both backends), the real bot's tree over the Discord stand-in, and `python bot.py`
processes restarting on one store or starting side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import discord
import pytest
from discord import app_commands

from cogs.app import CommandsRefused
from devtools.launcher import BotLauncher
from services.config import Config, ConfigError
from services.store import JobRecord, JobState, Store, new_job_id, open_store
from services.store.sqlite_store import SCHEMA_VERSION
from tests.conftest import StackFactory, database_url
from tests.processes import bot_processes
from tests.test_store import DAY, NOW, Backend, backend, store

__all__ = ["backend", "bot_processes", "store"]

TTL = 60.0
MAX_AGE = DAY


async def claim(store: Store, digest: str, owner: str, now: float, *, max_age: float = MAX_AGE) -> str:
    return (await store.claim_command_sync("app:guild", digest, owner, now, ttl=TTL, max_age=max_age)).outcome


async def synced(store: Store, digest: str, owner: str, now: float) -> bool:
    return await store.finish_command_sync("app:guild", digest, owner, now, synced=True)


# --- the store's claim ----------------------------------------------------------------------------------


async def test_a_claim_blocks_every_other_claimer_until_it_is_finished(store: Store) -> None:
    assert await claim(store, "v1", "a", NOW) == "claimed"
    assert await claim(store, "v1", "b", NOW + 1) == "busy"
    # A rolling deploy: the other version's commands wait too, rather than overwrite the live claim.
    assert await claim(store, "v2", "b", NOW + 1) == "busy"
    # Another target is a claim of its own.
    other = await store.claim_command_sync("app:other", "v1", "b", NOW + 1, ttl=TTL, max_age=MAX_AGE)
    assert other.outcome == "claimed"
    assert await synced(store, "v1", "a", NOW + 2)
    answer = await store.claim_command_sync("app:guild", "v1", "c", NOW + 3, ttl=TTL, max_age=MAX_AGE)
    assert answer.outcome == "synced"
    assert answer.synced_at == NOW + 2
    assert await claim(store, "v2", "c", NOW + 3) == "claimed"


async def test_a_failed_sync_leaves_the_commands_to_sync_again(store: Store) -> None:
    assert await claim(store, "v1", "a", NOW) == "claimed"
    assert await synced(store, "v1", "a", NOW)
    assert await claim(store, "v2", "b", NOW + 1) == "claimed"
    assert await store.finish_command_sync("app:guild", "v2", "b", NOW + 1, synced=False)
    # v1 is still what Discord has: v2 is claimed again at once, and v1 stays unchanged.
    assert await claim(store, "v1", "c", NOW + 2) == "synced"
    assert await claim(store, "v2", "c", NOW + 2) == "claimed"


async def test_a_record_older_than_its_max_age_counts_as_unknown(store: Store) -> None:
    assert await claim(store, "v1", "a", NOW) == "claimed"
    assert await synced(store, "v1", "a", NOW)
    assert await claim(store, "v1", "b", NOW + MAX_AGE - 1) == "synced"
    assert await claim(store, "v1", "b", NOW + MAX_AGE + 1) == "claimed"


async def test_a_max_age_of_zero_trusts_no_record(store: Store) -> None:
    assert await claim(store, "v1", "a", NOW) == "claimed"
    assert await synced(store, "v1", "a", NOW)
    assert await claim(store, "v1", "b", NOW + 1, max_age=0) == "claimed"
    # Still one process at a time.
    assert await claim(store, "v1", "c", NOW + 1, max_age=0) == "busy"


async def test_a_claim_left_by_a_process_that_died_lapses(store: Store) -> None:
    assert await claim(store, "v1", "a", NOW) == "claimed"
    assert await claim(store, "v1", "b", NOW + TTL - 1) == "busy"
    assert await claim(store, "v1", "b", NOW + TTL + 1) == "claimed"


async def test_a_stale_owner_cannot_finish_the_claim_that_replaced_its_own(store: Store) -> None:
    assert await claim(store, "v1", "stale", NOW) == "claimed"
    assert await claim(store, "v2", "new", NOW + TTL + 1) == "claimed"
    # The stale owner's sync ends late: it neither records v1 nor ends the new owner's claim.
    assert not await synced(store, "v1", "stale", NOW + TTL + 2)
    assert await claim(store, "v1", "other", NOW + TTL + 2) == "busy"
    assert await synced(store, "v2", "new", NOW + TTL + 3)
    assert not await synced(store, "v2", "new", NOW + TTL + 3), "a claim is finished once"
    assert await claim(store, "v2", "other", NOW + TTL + 4) == "synced"
    assert await claim(store, "v1", "other", NOW + TTL + 4) == "claimed"


async def test_concurrent_claims_across_store_instances_have_one_winner(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    claims = [
        (first if i % 2 else second).claim_command_sync(
            "app:guild", f"v{i % 3}", f"owner-{i}", NOW, ttl=TTL, max_age=MAX_AGE
        )
        for i in range(8)
    ]
    outcomes = [answer.outcome for answer in await asyncio.gather(*claims)]
    assert sorted(outcomes) == ["busy"] * 7 + ["claimed"]


async def test_the_synced_commands_survive_a_reopen(backend: Backend) -> None:
    store = await backend.open()
    assert await claim(store, "v1", "a", NOW) == "claimed"
    assert await synced(store, "v1", "a", NOW)
    await backend.close_all()
    reopened = await backend.open()
    assert await claim(reopened, "v1", "b", NOW + 1) == "synced"


async def test_a_sqlite_file_with_the_previous_sync_table_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    store = await open_store(f"sqlite:///{path}")
    job = JobRecord(
        id=new_job_id(), user_id=1, guild_id=None, channel_id=None, request={}, reservation_id=None,
        state=JobState.PENDING, created_at=NOW, updated_at=NOW,
    )  # fmt: skip
    await store.save_job(job)
    await store.close()
    # The layout schema version 2 gave the table, with a record of a sync.
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(
            "DROP TABLE command_syncs;"
            "CREATE TABLE command_syncs"
            " (target TEXT PRIMARY KEY, synced TEXT, claimed TEXT, claimed_until REAL);"
            "INSERT INTO command_syncs VALUES ('app:guild', 'v1', 'v2', 0);"
            "PRAGMA user_version=2;"
        )
    reopened = await open_store(f"sqlite:///{path}")
    try:
        # The old record says nothing of when it was synced, so it counts as unknown; the jobs stay.
        assert await claim(reopened, "v1", "a", NOW) == "claimed"
        assert await synced(reopened, "v1", "a", NOW)
        assert await claim(reopened, "v1", "b", NOW + 1) == "synced"
        assert await reopened.get_job(job.id) == job
    finally:
        await reopened.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_sync_commands_is_changed_or_always() -> None:
    required = {"DISCORD_TOKEN": "token", "SEGMIND_API_KEY": "key"}
    assert Config.from_env(required).sync_commands == "changed"
    assert Config.from_env({**required, "SYNC_COMMANDS": "Always"}).sync_commands == "always"
    with pytest.raises(ConfigError) as caught:
        Config.from_env({**required, "SYNC_COMMANDS": "never"})
    assert caught.value.problems == ["SYNC_COMMANDS='never' is invalid: expected changed or always"]


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

    tree.add_command(
        app_commands.Command(name="ping", description="Answers pong", callback=ping), guild=guild
    )
    stand_in.inject("sync_commands", status=403, code=50001)
    with pytest.raises(CommandsRefused):
        await tree.sync_if_changed(guild)
    await tree.sync_if_changed(guild)
    assert len(stand_in.requests_for("sync_commands")) == 3
    assert "ping" in {command["name"] for command in stand_in.synced_commands[stand_in.guild_id]}
    await tree.sync_if_changed(guild)
    assert len(stand_in.requests_for("sync_commands")) == 3


# Claims as short and polls as quick as the tests need, with the real bot's tree.
POLL = 0.02


async def logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Returns once a line containing `text` is logged; fails after 5 s."""
    for _ in range(500):
        if any(text in record.getMessage() for record in caplog.records):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"nothing logged {text!r}")


def add_ping(tree: app_commands.CommandTree, guild: discord.Object) -> None:
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")

    tree.add_command(
        app_commands.Command(name="ping", description="Answers pong", callback=ping), guild=guild
    )


@pytest.mark.parametrize("outcome", ["synced", "failed"])
async def test_the_tree_waits_for_the_process_syncing_and_syncs_only_if_it_failed(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture, outcome: str
) -> None:
    stack = await make_stack()
    stand_in, tree, store = stack.discord, stack.bot.tree, stack.bot.store
    guild = discord.Object(id=stand_in.guild_id)
    add_ping(tree, guild)
    target, digest = tree.sync_target(guild), tree.digest(guild)
    winner = await store.claim_command_sync(target, digest, "winner", time.time(), ttl=60, max_age=DAY)
    assert winner.outcome == "claimed"

    with caplog.at_level("INFO", logger="dreamshaper"):
        loser = asyncio.create_task(tree.sync_if_changed(guild, poll_seconds=POLL))
        await logged(caplog, "waiting for its claim to end")
        assert not loser.done()
        await store.finish_command_sync(target, digest, "winner", time.time(), synced=outcome == "synced")
        await loser
    messages = [record.getMessage() for record in caplog.records]
    if outcome == "synced":
        assert len(stand_in.requests_for("sync_commands")) == 1
        assert "commands synced by another process to guild" in " ".join(messages)
    else:
        assert len(stand_in.requests_for("sync_commands")) == 2
        assert "ping" in {command["name"] for command in stand_in.synced_commands[stand_in.guild_id]}
    assert not any(message.startswith("commands unchanged") for message in messages)


async def test_a_claim_for_other_commands_blocks_and_then_these_are_synced(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A rolling deploy: the old version claims while the new one, whose commands are recorded, starts.
    stack = await make_stack()
    stand_in, tree, store = stack.discord, stack.bot.tree, stack.bot.store
    guild = discord.Object(id=stand_in.guild_id)
    target = tree.sync_target(guild)
    old = await store.claim_command_sync(target, "old-version", "old", time.time(), ttl=60, max_age=DAY)
    assert old.outcome == "claimed"

    with caplog.at_level("INFO", logger="dreamshaper"):
        new = asyncio.create_task(tree.sync_if_changed(guild, poll_seconds=POLL))
        await logged(caplog, "waiting for its claim to end")
        assert len(stand_in.requests_for("sync_commands")) == 1
        await store.finish_command_sync(target, "old-version", "old", time.time(), synced=True)
        await new
    assert len(stand_in.requests_for("sync_commands")) == 2
    assert await store.finish_command_sync(target, "old-version", "old", time.time(), synced=True) is False


async def test_a_sync_killed_midway_is_taken_over_once_its_claim_lapses(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack()
    stand_in, tree, store = stack.discord, stack.bot.tree, stack.bot.store
    guild = discord.Object(id=stand_in.guild_id)
    add_ping(tree, guild)
    target, digest = tree.sync_target(guild), tree.digest(guild)
    # Claimed by a process that is killed before it finishes.
    dead = await store.claim_command_sync(target, digest, "dead", time.time(), ttl=0.3, max_age=DAY)
    assert dead.outcome == "claimed"

    with caplog.at_level("INFO", logger="dreamshaper"):
        await tree.sync_if_changed(guild, poll_seconds=POLL)
    assert len(stand_in.requests_for("sync_commands")) == 2
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "synced 5 command(s) to guild" in messages
    assert "commands unchanged" not in messages


async def test_a_record_older_than_a_day_is_synced_again(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack()
    stand_in, tree, store = stack.discord, stack.bot.tree, stack.bot.store
    guild = discord.Object(id=stand_in.guild_id)
    target, digest = tree.sync_target(guild), tree.digest(guild)
    # What the start recorded, as if it had been synced two days ago.
    then = time.time() - 2 * DAY
    assert (
        await store.claim_command_sync(target, digest, "then", then, ttl=60, max_age=0)
    ).outcome == "claimed"
    assert await store.finish_command_sync(target, digest, "then", then, synced=True)

    with caplog.at_level("INFO", logger="dreamshaper"):
        await tree.sync_if_changed(guild)
        assert len(stand_in.requests_for("sync_commands")) == 2
        assert not any(r.getMessage().startswith("commands unchanged") for r in caplog.records)
        await tree.sync_if_changed(guild)
    assert len(stand_in.requests_for("sync_commands")) == 2
    assert any(r.getMessage().startswith("commands unchanged, not synced") for r in caplog.records)


async def test_sync_commands_always_syncs_at_every_start(make_stack: StackFactory) -> None:
    stack = await make_stack(SYNC_COMMANDS="always")
    stand_in, tree = stack.discord, stack.bot.tree
    guild = discord.Object(id=stand_in.guild_id)
    assert len(stand_in.requests_for("sync_commands")) == 1
    await tree.sync_if_changed(guild)
    await tree.sync_if_changed(guild)
    assert len(stand_in.requests_for("sync_commands")) == 3


async def test_past_its_wait_the_tree_syncs_without_a_claim(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack()
    stand_in, tree, store = stack.discord, stack.bot.tree, stack.bot.store
    guild = discord.Object(id=stand_in.guild_id)
    add_ping(tree, guild)
    target = tree.sync_target(guild)
    hog = await store.claim_command_sync(target, "other", "hog", time.time(), ttl=60, max_age=DAY)
    assert hog.outcome == "claimed"

    with caplog.at_level("INFO", logger="dreamshaper"):
        await tree.sync_if_changed(guild, poll_seconds=POLL, wait_seconds=0.2)
    assert len(stand_in.requests_for("sync_commands")) == 2
    assert any("held the claim to sync the commands" in r.getMessage() for r in caplog.records)


# --- `python bot.py`, restarted or started side by side -------------------------------------------------


def log_says(process: object, text: str) -> bool:
    return text in process.log()  # type: ignore[attr-defined]


@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
async def test_a_second_start_with_the_same_commands_does_not_sync_unless_told_to(
    bot_processes: BotLauncher, tmp_path: Path, store_kind: str
) -> None:
    database = await database_url(store_kind, tmp_path)
    stand_in = bot_processes.discord
    first = await bot_processes.start(database, ready_count=1)
    assert len(stand_in.requests_for("sync_commands")) == 1
    assert log_says(first, "synced 4 command(s) to guild")
    first.terminate()
    assert await first.wait(15) == 0

    second = await bot_processes.start(database, ready_count=2)
    assert len(stand_in.requests_for("sync_commands")) == 1
    assert log_says(second, "commands unchanged, not synced to guild")
    second.terminate()
    assert await second.wait(15) == 0

    third = await bot_processes.start(database, ready_count=3, SYNC_COMMANDS="always")
    assert len(stand_in.requests_for("sync_commands")) == 2
    assert log_says(third, "synced 4 command(s) to guild")


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
    assert sum("synced 4 command(s)" in log for log in logs) == 1, logs
    # The other found the sync recorded, or waited for it.
    assert (
        sum(
            "commands unchanged, not synced" in log or "commands synced by another process" in log
            for log in logs
        )
        == 1
    ), logs
