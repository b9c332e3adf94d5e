"""The result buttons always answer: a hung or failing store, an unexpected error, a missing record, a
presser who may not, or the /imagine cog not loaded.

discord.py only logs what a `DynamicItem` raises, so each of these would otherwise end in Discord's
"This interaction failed" for the member.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cogs import render
from devtools.fakes.discord.models import InteractionHandle, StoredMessage
from devtools.stack import BotStack
from services.request import GenerationRequest
from services.store.base import JobRecord, JobState, new_job_id
from tests.conftest import StackFactory
from tests.test_failure_paths_e2e import RawStore, wait_for_state

USER = 1_111_111_111_111_111_111
OTHER_USER = 2_222_222_222_222_222_222


def ephemeral_text(handle: InteractionHandle) -> str:
    callback = handle.callback
    assert callback is not None and callback.type == 4, f"expected an immediate reply, got {handle!r}"
    assert handle.is_ephemeral
    return str(callback.data.get("content", ""))


async def first_result(stack: BotStack) -> StoredMessage:
    handle = await stack.imagine(prompt="a lighthouse at dusk")
    message = handle.original
    assert message is not None and message.attachments
    return message


def button_of(message: StoredMessage, action: str) -> str:
    return next(
        c["custom_id"] for row in message.components for c in row["components"] if c["label"] == action
    )


async def test_a_press_while_the_store_hangs_is_answered_within_three_seconds(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack()
    message = await first_result(stack)

    async def hang(job_id: str) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(stack.bot.store.backend, "get_job", hang)  # type: ignore[attr-defined]
    started = time.monotonic()
    handle = await stack.discord.press_button(message, button_of(message, "Info"))
    await handle.wait_for_callback(timeout=5)
    assert time.monotonic() - started < 3.0
    assert "storage is not responding" in ephemeral_text(handle)


async def test_an_unexpected_failure_looking_up_the_job_is_answered_with_an_error_id(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack()
    message = await first_result(stack)

    async def broken(job_id: str) -> None:
        raise RuntimeError("a bug in the store")

    monkeypatch.setattr(stack.bot.store.backend, "get_job", broken)  # type: ignore[attr-defined]
    info = await stack.press(message, "info")
    text = ephemeral_text(info)
    assert "Something went wrong on the bot's side" in text and "Error id" in text
    assert "a bug in the store" not in text


async def test_an_unexpected_failure_in_the_action_is_answered_with_an_error_id(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack()
    message = await first_result(stack)

    def broken(*args: object) -> None:
        raise RuntimeError("a bug in the renderer")

    monkeypatch.setattr(render, "info_embed", broken)
    info = await stack.press(message, "info")
    assert "Error id" in ephemeral_text(info)


async def test_buttons_answer_with_the_imagine_cog_unloaded(make_stack: StackFactory) -> None:
    stack = await make_stack()
    message = await first_result(stack)
    await stack.bot.remove_cog("Imagine")

    info = await stack.press(message, "info")
    assert info.callback is not None and info.callback.data["embeds"]
    reroll = await stack.press(message, "reroll")
    assert reroll.original is not None and reroll.original.attachments
    assert len(stack.segmind.stats.submits) == 2


async def test_a_button_whose_record_aged_out_says_so_and_starts_nothing(make_stack: StackFactory) -> None:
    stack = await make_stack()
    message = await first_result(stack)
    await RawStore(stack.config.database_url).delete_job((await wait_for_state(stack, JobState.DELIVERED)).id)

    reroll = await stack.press(message, "reroll")
    assert "too old" in ephemeral_text(reroll)
    assert len(stack.segmind.stats.submits) == 1


async def test_resend_is_refused_to_anyone_but_the_requester(make_stack: StackFactory) -> None:
    stack = await make_stack()
    now = time.time()
    await stack.bot.store.save_job(
        JobRecord(
            id=new_job_id(),
            user_id=USER,
            guild_id=stack.discord.guild_id,
            channel_id=stack.discord.channel_id,
            request=GenerationRequest(prompt="kept for later").to_payload(),
            reservation_id=None,
            state=JobState.UNDELIVERED,
            created_at=now,
            updated_at=now,
        )
    )
    listing = await stack.discord.send_slash_command("jobs")
    await stack.settled(listing)
    assert listing.original is not None

    stranger = await stack.press(listing.original, "resend", user_id=OTHER_USER)
    assert "Only the member who asked for these images can have them resent." in ephemeral_text(stranger)
    assert stack.segmind.stats.requests == []
