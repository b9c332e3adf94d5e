"""Delivery when Discord misbehaves: rate limits and 5xx on edits, deleted messages, nowhere to post."""

from __future__ import annotations

import asyncio

from devtools.fakes.discord.server import InteractionHandle, StoredMessage
from devtools.fakes.segmind.server import SegmindServerSettings
from devtools.stack import BotStack
from services.store.base import JobState
from tests.conftest import SEGMIND_KEY, StackFactory

USER = 1_111_111_111_111_111_111


def image_messages(stack: BotStack) -> list[StoredMessage]:
    return [m for m in stack.discord.messages.values() if m.attachments and not m.deleted]


def slow_segmind() -> SegmindServerSettings:
    return SegmindServerSettings(api_keys=frozenset({SEGMIND_KEY}), queue_seconds=1.0, seconds_per_step=0.08)


async def test_a_rate_limited_edit_waits_its_turn_and_the_images_arrive(make_stack: StackFactory) -> None:
    stack = await make_stack()
    stack.discord.inject("edit_original", status=429, count=2, retry_after=0.5)
    handle = await stack.imagine(prompt="rate limited edits")
    assert handle.original is not None and len(handle.original.attachments) == 1
    assert any(r.status == 429 for r in stack.discord.requests)


async def test_discord_5xx_on_edits_is_retried(make_stack: StackFactory) -> None:
    stack = await make_stack()
    # discord.py itself tries a request five times over 16 s; the sixth 502 is left for the bot to ride out.
    stack.discord.inject("edit_original", status=502, count=6)
    handle = await stack.imagine(prompt="flaky edits", timeout=60)
    assert handle.original is not None and len(handle.original.attachments) == 1
    assert sum(r.status == 502 for r in stack.discord.requests) == 6
    assert len(image_messages(stack)) == 1


async def test_a_deleted_message_gets_its_result_in_the_channel(make_stack: StackFactory) -> None:
    stack = await make_stack(segmind_settings=slow_segmind())
    handle = await stack.discord.send_slash_command("imagine", {"prompt": "deleted while drawing"})
    original = await handle.wait_for_original(resolved=False)
    stack.discord.delete_message(original.id)
    await stack.discord.wait_for(lambda: bool(image_messages(stack)), timeout=30)
    [posted] = image_messages(stack)
    assert posted.content.startswith(f"<@{USER}>") and posted.interaction_id is None
    assert len(stack.segmind.stats.submits) == 1


async def test_an_undeliverable_result_can_be_fetched_from_jobs(make_stack: StackFactory) -> None:
    stack = await make_stack(segmind_settings=slow_segmind())
    await make_undeliverable(stack, "nowhere to go")

    listing = await stack.discord.send_slash_command("jobs")
    await stack.settled(listing)
    assert listing.is_ephemeral
    assert listing.callback is not None
    embed = listing.callback.data["embeds"][0]
    assert "ready, not posted" in embed["description"] and "nowhere to go" in embed["description"]
    message = listing.original
    assert message is not None
    resent = await stack.press(message, "resend")
    assert resent.original is not None and len(resent.original.attachments) == 1
    assert len(stack.segmind.stats.submits) == 1


async def test_jobs_lists_delivered_results_with_a_link(make_stack: StackFactory) -> None:
    stack = await make_stack()
    handle: InteractionHandle = await stack.imagine(prompt="for the history")
    assert handle.original is not None
    listing = await stack.discord.send_slash_command("jobs")
    await stack.settled(listing)
    assert listing.callback is not None
    description = listing.callback.data["embeds"][0]["description"]
    assert "for the history" in description and "posted" in description
    assert f"/{handle.original.id})" in description


async def make_undeliverable(stack: BotStack, prompt: str) -> None:
    """A result with nowhere to go: the token expired, and neither the channel nor a DM takes it."""
    handle = await stack.discord.send_slash_command("imagine", {"prompt": prompt})
    await handle.wait_for_callback()
    stack.discord.expire_interaction_tokens()
    stack.discord.inject("channel_message", status=403, count=10, code=50013)
    await wait_for_latest_job(stack, JobState.UNDELIVERED, timeout=30)


async def wait_for_latest_job(stack: BotStack, state: JobState, timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        jobs = await stack.bot.store.recent_jobs(USER, limit=1)
        if jobs and jobs[0].state is state:
            return
        assert asyncio.get_running_loop().time() < deadline, (
            f"latest job is {jobs[0].state if jobs else None}"
        )
        await asyncio.sleep(0.1)


async def test_when_the_channel_refuses_the_result_goes_by_direct_message(make_stack: StackFactory) -> None:
    stack = await make_stack(segmind_settings=slow_segmind())
    handle = await stack.discord.send_slash_command("imagine", {"prompt": "by direct message"})
    await handle.wait_for_callback()
    stack.discord.expire_interaction_tokens()
    stack.discord.inject("channel_message", status=403, count=1, code=50013)
    dm_channel = stack.discord.dm_channel(USER)
    await stack.discord.wait_for(
        lambda: any(m.channel_id == dm_channel and m.attachments for m in stack.discord.messages.values()),
        timeout=30,
    )
    await wait_for_latest_job(stack, JobState.DELIVERED)
    assert len(image_messages(stack)) == 1


async def test_pressing_resend_twice_posts_once(make_stack: StackFactory) -> None:
    stack = await make_stack(segmind_settings=slow_segmind())
    await make_undeliverable(stack, "only once please")
    listing = await stack.discord.send_slash_command("jobs")
    await stack.settled(listing)
    assert listing.original is not None
    button = next(
        c["custom_id"]
        for row in listing.original.components
        for c in row["components"]
        if "resend" in c["custom_id"]
    )
    first, second = await asyncio.gather(
        stack.discord.press_button(listing.original, button),
        stack.discord.press_button(listing.original, button),
    )
    await stack.settled(first)
    await stack.settled(second)
    await asyncio.sleep(1.0)
    assert len(image_messages(stack)) == 1


async def test_commands_during_shutdown_are_told_to_come_back(make_stack: StackFactory) -> None:
    stack = await make_stack()
    stack.bot.accepting_jobs = False  # what close() sets first, while the gateway is still connected
    handle = await stack.imagine(prompt="too late")
    callback = handle.callback
    assert callback is not None and "restarting" in callback.data["content"]
    assert stack.segmind.stats.submits == []
    assert (await stack.bot.quota.usage(USER, stack.discord.guild_id)).used_images == 0
