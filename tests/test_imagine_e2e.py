"""The real bot, end to end: /imagine over the Discord stand-in's gateway and REST, images from the local Segmind."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import re

import pytest
from PIL import Image

from devtools.fakes.discord.server import InteractionHandle, StoredMessage
from devtools.fakes.segmind.server import SegmindServerSettings
from devtools.stack import BotStack, started_a_job
from tests.conftest import BLOCKED_WORD, SEGMIND_KEY, StackFactory

OTHER_USER = 2_222_222_222_222_222_222
PROGRESS_PREFIXES = ("⏳", "📨", "🎨")


def result_of(handle: InteractionHandle) -> StoredMessage:
    message = handle.original
    assert message is not None, "no original response"
    assert message.attachments, f"no images; the message says: {message.content!r}"
    return message


def fields_of(message: StoredMessage) -> dict[str, str]:
    return {field["name"]: field["value"] for field in message.embeds[0]["fields"]}


def decoded_sizes(message: StoredMessage) -> list[tuple[int, int]]:
    sizes = []
    for attachment in message.attachments:
        image = Image.open(io.BytesIO(attachment.data))
        image.load()
        sizes.append(image.size)
    return sizes


def ephemeral_text(handle: InteractionHandle) -> str:
    callback = handle.callback
    assert callback is not None and callback.type == 4, f"expected an immediate reply, got {handle!r}"
    assert handle.is_ephemeral
    return str(callback.data.get("content", ""))


async def test_imagine_delivers_images_with_embed_and_buttons(make_stack: StackFactory) -> None:
    stack = await make_stack()
    handle = await stack.imagine(prompt="a lighthouse at dusk", samples=2, aspect="7:9", seed=1234)

    callback = handle.callback
    assert callback is not None and started_a_job(handle)  # within Discord's window
    assert callback.time - handle.created_at < 3.0
    message = result_of(handle)
    assert decoded_sizes(message) == [(896, 1152)] * 2
    fields = fields_of(message)
    assert fields["Seed"] == "`1234`"
    assert fields["Size"] == "896×1152"
    assert fields["Scheduler"] == "UniPC" and fields["Steps"] == "30" and fields["Guidance"] == "7.5"
    assert "Inference" in fields
    assert "lighthouse" in message.embeds[0]["description"]
    labels = [c["label"] for row in message.components for c in row["components"]]
    assert labels == ["Reroll", "Same seed", "Info", "Delete", "Report"]
    assert stack.segmind.stats.submits[0].payload["seed"] == 1234


async def test_a_random_seed_is_made_concrete_and_shown(make_stack: StackFactory) -> None:
    stack = await make_stack()
    handle = await stack.imagine(prompt="a quiet forest")
    shown = fields_of(result_of(handle))["Seed"].strip("`")
    assert int(shown) >= 0
    assert stack.segmind.stats.submits[0].payload["seed"] == int(shown)


async def test_each_state_change_of_a_job_is_one_info_line_with_its_ids(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = SegmindServerSettings(
        api_keys=frozenset({SEGMIND_KEY}), queue_seconds=1.0, seconds_per_step=0.05
    )
    stack = await make_stack(segmind_settings=settings)
    with caplog.at_level(logging.INFO):
        handle = await stack.imagine(prompt="told once", timeout=40)
        result_of(handle)
        # Recorded as delivered just after the upload the member sees.
        for _ in range(200):
            if any(": delivered" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.05)
    request_id = stack.segmind.stats.submits[0].request_id
    bot_lines = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and r.name.startswith(("services.", "cogs."))
    ]
    job_id = next(m.group(1) for line in bot_lines if (m := re.match(r"job (\S+): submitted as", line)))
    told = [
        re.sub(r" (\(|after ).*", "", line.replace(job_id, "J").replace(request_id, "R"))
        for line in bot_lines
        if job_id in line or request_id in line
    ]
    # QUEUED is what the submit said, and COMPLETED is the job's own line once its images are in.
    assert told in (
        [
            "job J: pending",
            "job J: submitted as R",
            "segmind R: PROCESSING",
            "job J: completed",
            "job J: delivered",
        ],
        ["job J: pending", "job J: submitted as R", "job J: completed", "job J: delivered"],
    ), told


async def test_progress_edits_are_shown_and_paced(make_stack: StackFactory) -> None:
    settings = SegmindServerSettings(
        api_keys=frozenset({SEGMIND_KEY}), queue_seconds=1.5, seconds_per_step=0.15
    )
    stack = await make_stack(segmind_settings=settings)
    handle = await stack.imagine(prompt="slow and steady", timeout=40)
    message = result_of(handle)
    progress = [payload.get("content") or "" for _, payload in message.edits]
    assert any(text.startswith(("📨", "🎨")) for text in progress), progress
    # Progress edits keep their pace; the result (the last edit) is posted as soon as it is ready.
    *progress_edits, (_, result) = message.edits
    assert result.get("attachments"), result
    times = [at for at, _ in progress_edits]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps and min(gaps) >= 1.45, gaps


async def test_out_of_range_values_from_a_raw_interaction_are_refused_and_nothing_is_charged(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    cases = [
        ([("samples", 4, 7)], "samples", "from 1 to 4"),
        ([("width", 4, 515)], "width", "512 and 520"),
        ([("steps", 4, 5000)], "steps", "from 20 to 100"),
        ([("guidance", 10, 99.5)], "guidance", "from 1 to 25"),
        ([("scheduler", 3, "Turbo")], "scheduler", "UniPC"),
        ([("seed", 4, 10**15)], "seed", "999999999999999"),
        ([("aspect", 3, "16:9")], "aspect", "1:1"),
        ([("negative_prompt", 3, "x" * 5000)], "negative_prompt", "at most 1000 characters"),
    ]
    for extra, option, allowed in cases:
        raw = [{"name": "prompt", "type": 3, "value": "a cat"}] + [
            {"name": name, "type": kind, "value": value} for name, kind, value in extra
        ]
        handle = await stack.discord.send_slash_command("imagine", raw_options=raw)
        await stack.settled(handle)
        text = ephemeral_text(handle)
        assert f"`{option}`" in text and allowed in text, text
    for prompt, allowed in (("   ", "non-blank"), ("y" * 6000, "at most 1500 characters")):
        bad = await stack.discord.send_slash_command(
            "imagine", raw_options=[{"name": "prompt", "type": 3, "value": prompt}]
        )
        await stack.settled(bad)
        assert "`prompt`" in ephemeral_text(bad) and allowed in ephemeral_text(bad)
    assert stack.segmind.stats.submits == []
    usage = await stack.bot.quota.usage(1_111_111_111_111_111_111, stack.discord.guild_id)
    assert usage.used_images == 0 and usage.in_flight == 0


async def test_quota_refusal_says_what_is_left_and_when_it_resets(make_stack: StackFactory) -> None:
    stack = await make_stack(QUOTA_DAILY_IMAGES="3")
    await stack.imagine(prompt="first", samples=2)
    handle = await stack.imagine(prompt="second", samples=2)
    text = ephemeral_text(handle)
    assert "1 left" in text and re.search(r"<t:\d+:R>", text), text
    assert len(stack.segmind.stats.submits) == 1

    quota = await stack.discord.send_slash_command("quota")
    await stack.settled(quota)
    assert quota.is_ephemeral
    embed = quota.callback.data["embeds"][0]  # type: ignore[union-attr]
    values = {field["name"]: field["value"] for field in embed["fields"]}
    assert values["Used (24 h)"] == "2 / 3" and values["Left"] == "1"


async def test_ten_simultaneous_commands_with_three_images_left_submit_exactly_three(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(QUOTA_DAILY_IMAGES="3", QUOTA_MAX_CONCURRENT="10")
    handles = await asyncio.gather(
        *(stack.discord.send_slash_command("imagine", {"prompt": f"cat {n}"}) for n in range(10))
    )
    await asyncio.gather(*(stack.settled(handle, timeout=40) for handle in handles))
    delivered = [h for h in handles if h.original is not None and h.original.attachments]
    refused = [h for h in handles if h.callback is not None and not started_a_job(h)]
    assert len(delivered) == 3 and len(refused) == 7
    assert len(stack.segmind.stats.submits) == 3


async def test_exempt_roles_have_no_quota(make_stack: StackFactory) -> None:
    stack = await make_stack(QUOTA_DAILY_IMAGES="1", QUOTA_EXEMPT_ROLE_IDS="777")
    stack.discord.add_role(777, "Patrons")

    def role_known() -> bool:
        guild = stack.bot.get_guild(stack.discord.guild_id)
        return guild is not None and guild.get_role(777) is not None

    await stack.discord.wait_for(role_known)
    assert len(decoded_sizes(result_of(await stack.imagine(prompt="one", samples=2, roles=[777])))) == 2
    assert len(decoded_sizes(result_of(await stack.imagine(prompt="two", samples=2, roles=[777])))) == 2
    refused = await stack.imagine(prompt="three", samples=2, user_id=OTHER_USER)
    assert "1 left" in ephemeral_text(refused)


async def test_out_of_credits_is_explained_reported_and_cooled_off(make_stack: StackFactory) -> None:
    stack = await make_stack()
    stack.segmind.inject("insufficient_credits", target="submit")
    handle = await stack.imagine(prompt="a cat")
    assert handle.original is not None
    assert "out of Segmind credits" in handle.original.content
    assert "admins have been told" in handle.original.content
    await stack.discord.wait_for(lambda: any("out of credits" in text_of(m) for m in channel_messages(stack)))

    again = await stack.imagine(prompt="another cat")
    assert "out of Segmind credits" in ephemeral_text(again)
    assert len(stack.segmind.stats.requests_to("submit")) == 1
    assert (await stack.bot.quota.usage(1_111_111_111_111_111_111, stack.discord.guild_id)).used_images == 0


async def test_rate_limit_waits_for_a_slot_then_delivers(make_stack: StackFactory) -> None:
    stack = await make_stack()
    stack.segmind.inject("rate_limit", target="submit", reset_after=2.0)
    handle = await stack.imagine(prompt="patience", timeout=30)
    message = result_of(handle)
    assert any("waiting for a slot" in (payload.get("content") or "") for _, payload in message.edits)
    assert len(stack.segmind.stats.submits) == 1


async def test_rate_limit_past_the_bound_says_when_to_try_again(make_stack: StackFactory) -> None:
    stack = await make_stack(RATE_LIMIT_MAX_WAIT_SECONDS="1")
    stack.segmind.inject("rate_limit", target="submit", reset_after=60.0)
    handle = await stack.imagine(prompt="impatient")
    assert handle.original is not None
    text = handle.original.content
    assert "try again" in text and re.search(r"<t:\d+:R>", text), text
    assert "not charged" in text


def text_of(message: StoredMessage) -> str:
    """What a message says: its content, and its embeds' title, description and fields."""
    parts = [message.content]
    for embed in message.embeds:
        parts += [embed.get("title", ""), embed.get("description", "")]
        parts += [f"{field['name']}: {field['value']}" for field in embed.get("fields", [])]
    return "\n".join(parts)


async def test_content_block_is_explained_and_reported_to_moderators(make_stack: StackFactory) -> None:
    stack = await make_stack()
    handle = await stack.imagine(prompt=f"something {BLOCKED_WORD} @everyone", samples=2)
    message = handle.original
    assert message is not None and not message.attachments
    assert "blocked by the content filter" in message.content
    request_id = stack.segmind.stats.submits[0].request_id
    await stack.discord.wait_for(lambda: any(request_id in text_of(m) for m in channel_messages(stack)))
    report = next(m for m in channel_messages(stack) if request_id in text_of(m))
    assert "Segmind's content filter" in text_of(report)
    assert BLOCKED_WORD in text_of(report) and "<@1111111111111111111>" in text_of(report)
    assert report.allowed_mentions == {"parse": []}
    labels = [c["label"] for row in report.components for c in row["components"]]
    assert labels == ["Ban 24 h", "Dismiss"]
    assert (await stack.bot.quota.usage(1_111_111_111_111_111_111, stack.discord.guild_id)).used_images == 0


async def test_a_bad_key_is_a_configuration_problem_with_an_error_id(make_stack: StackFactory) -> None:
    stack = await make_stack(SEGMIND_API_KEY="wrong-key")
    handle = await stack.imagine(prompt="a cat")
    assert handle.original is not None
    text = handle.original.content
    assert "not configured correctly" in text and re.search(r"Error id `[0-9A-F]{6}`", text), text
    assert "401" not in text and "wrong-key" not in text


async def test_a_segmind_outage_reports_the_request_id(make_stack: StackFactory) -> None:
    stack = await make_stack()
    stack.segmind.inject("server_error", count=50, target="status", status=503)
    handle = await stack.imagine(prompt="unlucky", timeout=40)
    assert handle.original is not None
    request_id = stack.segmind.stats.submits[0].request_id
    assert request_id in handle.original.content


async def test_no_message_can_ping_anyone(make_stack: StackFactory) -> None:
    stack = await make_stack()
    handle = await stack.imagine(prompt="@everyone look <@&123> **bold** at this", negative_prompt="@here")
    message = result_of(handle)
    assert message.allowed_mentions == {"parse": []}
    assert "\\*\\*bold\\*\\*" in message.embeds[0]["description"]
    for request in stack.discord.requests:
        if request.json and any(key in request.json for key in ("content", "embeds")):
            assert request.json.get("allowed_mentions") == {"parse": []} or "data" in request.json, request


async def test_images_are_fitted_under_the_upload_limit(make_stack: StackFactory) -> None:
    stack = await make_stack(discord_options={"attachment_size_limit": 400 * 1024})
    handle = await stack.imagine(prompt="big ones", samples=4, width=2048, height=2048, timeout=40)
    message = result_of(handle)
    assert len(message.attachments) == 4
    assert sum(len(a.data) for a in message.attachments) <= 400 * 1024
    assert all(size[0] > 0 for size in decoded_sizes(message))
    assert not any(r.status == 413 for r in stack.discord.requests)


async def test_reroll_and_same_seed_run_new_jobs(make_stack: StackFactory) -> None:
    stack = await make_stack()
    first = result_of(await stack.imagine(prompt="a red kite", seed=42))
    reroll = await stack.press(first, "reroll")
    rerolled = result_of(reroll)
    assert rerolled.id != first.id
    assert fields_of(rerolled)["Seed"] != "`42`"
    same = result_of(await stack.press(first, "same"))
    assert fields_of(same)["Seed"] == "`42`"
    seeds = [submit.payload["seed"] for submit in stack.segmind.stats.submits]
    assert seeds[0] == 42 and seeds[2] == 42 and seeds[1] != 42


async def test_info_shows_every_parameter_to_the_presser_only(make_stack: StackFactory) -> None:
    stack = await make_stack()
    first = result_of(await stack.imagine(prompt="a blue kite", negative_prompt="rain", steps=25, seed=7))
    info = await stack.press(first, "info")
    assert info.is_ephemeral
    embed = info.callback.data["embeds"][0]  # type: ignore[union-attr]
    assert "/imagine prompt:a blue kite" in embed["description"]
    assert "steps:25" in embed["description"] and "seed:7" in embed["description"]
    assert "negative_prompt:rain" in embed["description"]


async def test_delete_is_for_the_requester_or_moderators(make_stack: StackFactory) -> None:
    stack = await make_stack()
    first = result_of(await stack.imagine(prompt="a green kite"))
    stranger = await stack.press(first, "delete", user_id=OTHER_USER, permissions=0)
    assert "Only the member" in ephemeral_text(stranger)
    assert not first.deleted
    await stack.press(first, "delete")
    assert first.deleted

    second = result_of(await stack.imagine(prompt="a yellow kite"))
    await stack.press(second, "delete", user_id=OTHER_USER, permissions=1 << 13)  # Manage Messages
    assert second.deleted


async def test_buttons_keep_working_after_a_restart(make_stack: StackFactory) -> None:
    stack = await make_stack()
    first = result_of(await stack.imagine(prompt="a kite after restart", seed=5))
    await stack.restart()  # a new bot on the same store
    same = result_of(await stack.press(first, "same"))
    assert fields_of(same)["Seed"] == "`5`"


async def test_a_result_after_the_token_expired_goes_to_the_channel_pinging_only_the_requester(
    make_stack: StackFactory,
) -> None:
    settings = SegmindServerSettings(
        api_keys=frozenset({SEGMIND_KEY}), queue_seconds=1.0, seconds_per_step=0.05
    )
    stack = await make_stack(segmind_settings=settings)
    handle = await stack.discord.send_slash_command("imagine", {"prompt": "late delivery"})
    await handle.wait_for_callback()
    stack.discord.expire_interaction_tokens()
    await stack.discord.wait_for(lambda: any(m.attachments for m in channel_messages(stack)), timeout=30)
    message = next(m for m in channel_messages(stack) if m.attachments)
    assert message.content.startswith("<@1111111111111111111>")
    assert message.allowed_mentions is not None
    assert [str(user) for user in message.allowed_mentions["users"]] == ["1111111111111111111"]
    assert message.allowed_mentions.get("parse") == []
    labels = [c["label"] for row in message.components for c in row["components"]]
    assert "Reroll" in labels


def channel_messages(stack: BotStack) -> list[StoredMessage]:
    return [
        m
        for m in stack.discord.messages.values()
        if m.channel_id == stack.discord.channel_id and m.interaction_id is None and m.webhook_id is None
    ]
