"""Many processes, one truth: two bot processes (shards 0 and 1 of 2) sharing one Redis store."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from devtools.launcher import BotLauncher, BotProcess
from devtools.stack import started_a_job
from tests.conftest import database_url
from tests.processes import bot_processes, wait_for_first_poll

__all__ = ["bot_processes"]

# Discord routes a guild to shard (guild_id >> 22) % shard_count: these two land on shards 0 and 1.
SECOND_GUILD_ID = 1_300_000_000_004_194_304
SECOND_CHANNEL_ID = 1_300_000_000_004_194_404
USER = 3_333_333_333_333_333_333


async def start_two_shards(
    processes: BotLauncher, tmp_path: Path, **env: str
) -> tuple[str, list[BotProcess]]:
    database = await database_url("redis", tmp_path)
    processes.discord.add_guild(SECOND_GUILD_ID, SECOND_CHANNEL_ID, "Second Guild")
    guilds = f"{processes.discord.guild_id},{SECOND_GUILD_ID}"
    common = {"SHARD_COUNT": "2", "DISCORD_GUILD_IDS": guilds, **env}
    first = await processes.start(database, ready_count=1, SHARD_IDS="0", **common)
    second = await processes.start(database, ready_count=2, SHARD_IDS="1", **common)
    return database, [first, second]


async def test_each_servers_quota_holds_exactly_with_two_processes(
    bot_processes: BotLauncher, tmp_path: Path
) -> None:
    await start_two_shards(bot_processes, tmp_path, QUOTA_DAILY_IMAGES="3", QUOTA_MAX_CONCURRENT="10")
    discord = bot_processes.discord
    sends = []
    for n in range(10):
        where = (
            {"guild_id": discord.guild_id, "channel_id": discord.channel_id}
            if n % 2
            else {"guild_id": SECOND_GUILD_ID, "channel_id": SECOND_CHANNEL_ID}
        )
        sends.append(
            discord.send_slash_command("imagine", {"prompt": f"shared quota {n}"}, user_id=USER, **where)
        )
    handles = await asyncio.gather(*sends)
    await discord.wait_for(lambda: all(h.callback is not None for h in handles), timeout=20)
    refused = [h for h in handles if h.callback is not None and not started_a_job(h)]
    accepted = [h for h in handles if started_a_job(h)]
    # A member's limits are per server: three images in each.
    assert len(refused) == 4 and len(accepted) == 6
    assert Counter(h.guild_id for h in accepted) == {discord.guild_id: 3, SECOND_GUILD_ID: 3}
    await discord.wait_for(
        lambda: all(h.original is not None and h.original.attachments for h in accepted), timeout=60
    )
    assert len(bot_processes.segmind.stats.submits) == 6
    # Both processes took commands: each shard answered the guild Discord routed to it.
    answered_guilds = {h.guild_id for h in handles}
    assert answered_guilds == {discord.guild_id, SECOND_GUILD_ID}


async def test_a_job_started_on_one_process_is_resumed_by_the_other_and_delivered_once(
    bot_processes: BotLauncher, tmp_path: Path
) -> None:
    _, processes = await start_two_shards(bot_processes, tmp_path)
    discord = bot_processes.discord
    handle = await discord.send_slash_command("imagine", {"prompt": "handed over", "samples": 2})
    await handle.wait_for_callback()
    await wait_for_first_poll(bot_processes)
    # Shard 0 takes the command, but the other process's first sweep, if it runs meanwhile, may find the
    # job recorded and not yet begun, and begin it: whichever submitted it is the one killed.
    driving = [p for p in processes if "submitted as" in p.log()]
    assert len(driving) == 1
    driving[0].kill()
    survivor = next(p for p in processes if p is not driving[0])

    await discord.wait_for(
        lambda: handle.original is not None and bool(handle.original.attachments), timeout=60
    )
    await asyncio.sleep(2.0)  # room for a duplicate, were there one
    uploads = [r for r in discord.requests if r.files]
    assert len(uploads) == 1
    assert len(bot_processes.segmind.stats.submits) == 1
    logs = "\n".join(f"--- {p.name}:\n{p.log()[-3000:]}" for p in bot_processes.started)
    assert "resumed" in survivor.log(), logs


MODERATOR = 4_444_444_444_444_444_444
MANAGE_GUILD, MANAGE_MESSAGES = 1 << 5, 1 << 13


async def test_settings_cases_and_bans_are_shared_by_the_shard_processes(
    bot_processes: BotLauncher, tmp_path: Path
) -> None:
    discord = bot_processes.discord
    # The first server's channel is the operator's mod log: its entries speak for the second server too.
    env = {"MOD_LOG_CHANNEL_ID": str(discord.channel_id)}
    database, (_first, second_process) = await start_two_shards(bot_processes, tmp_path, **env)
    second = {"guild_id": SECOND_GUILD_ID, "channel_id": SECOND_CHANNEL_ID}
    added = await discord.send_slash_command(
        "admin blocklist add", {"terms": "kid"}, user_id=MODERATOR, permissions=MANAGE_GUILD, **second
    )
    await discord.wait_for(lambda: added.callback is not None, timeout=10)
    refused = await discord.send_slash_command("imagine", {"prompt": "a kid"}, user_id=USER, **second)
    await discord.wait_for(lambda: refused.callback is not None, timeout=10)

    def entry() -> list:  # type: ignore[type-arg]
        return [
            m
            for m in discord.messages.values()
            if m.channel_id == discord.channel_id and m.embeds and "Prompt blocked" in m.embeds[0]["title"]
        ]

    await discord.wait_for(lambda: bool(entry()), timeout=10)
    posted = entry()[0]
    ban_button = next(
        c["custom_id"] for row in posted.components for c in row["components"] if c["label"] == "Ban 24 h"
    )
    # The press is the first server's, so the first shard's process takes it; the ban is the second's.
    pressed = await discord.press_button(posted, ban_button, user_id=MODERATOR, permissions=MANAGE_MESSAGES)
    await discord.wait_for(lambda: pressed.callback is not None, timeout=10)
    await discord.wait_for(
        lambda: any(f["name"] == "Decision" for f in posted.embeds[0]["fields"]), timeout=10
    )

    banned = await discord.send_slash_command("imagine", {"prompt": "a lighthouse"}, user_id=USER, **second)
    await discord.wait_for(lambda: banned.callback is not None, timeout=10)
    assert banned.callback is not None and banned.callback.type == 4
    assert "You may not use the bot in this server until" in str(banned.callback.data.get("content"))
    assert {added.guild_id, refused.guild_id} == {SECOND_GUILD_ID} and pressed.guild_id == discord.guild_id

    # The second server's shard moves to a new process: its settings and bans are where it left them.
    second_process.kill()
    common = {"SHARD_COUNT": "2", "DISCORD_GUILD_IDS": f"{discord.guild_id},{SECOND_GUILD_ID}", **env}
    await bot_processes.start(database, ready_count=3, SHARD_IDS="1", **common)
    still_banned = await discord.send_slash_command(
        "imagine", {"prompt": "a lighthouse"}, user_id=USER, **second
    )
    await discord.wait_for(lambda: still_banned.callback is not None, timeout=10)
    assert "You may not use the bot" in str(still_banned.callback.data.get("content"))  # type: ignore[union-attr]
    blocked = await discord.send_slash_command(
        "imagine", {"prompt": "a k1d"}, user_id=MODERATOR + 1, **second
    )
    await discord.wait_for(lambda: blocked.callback is not None, timeout=10)
    assert "rules don't allow" in str(blocked.callback.data.get("content"))  # type: ignore[union-attr]
    assert bot_processes.segmind.stats.submits == []
