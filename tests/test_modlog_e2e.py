"""The mod log end to end: entries moderators act on, reports that hide a result, and appeals."""

from __future__ import annotations

import asyncio

from devtools.fakes.discord.models import DEFAULT_MEMBER_PERMISSIONS
from devtools.fakes.discord.server import InteractionHandle, StoredMessage
from devtools.stack import BotStack
from tests.conftest import BLOCKED_WORD, StackFactory
from tests.test_admin_e2e import (
    ADMIN,
    ADMIN_PERMISSIONS,
    MEMBER,
    OTHER_CHANNEL,
    OTHER_GUILD,
    admin,
    case_entry,
    fields_of,
    reply_of,
)

MODERATOR = 4_444_444_444_444_444_444
SECOND_MODERATOR = 4_444_444_444_444_444_445
REPORTERS = [5_555_555_555_555_555_551, 5_555_555_555_555_555_552, 5_555_555_555_555_555_553]
MANAGE_MESSAGES = 1 << 13
MODERATOR_PERMISSIONS = DEFAULT_MEMBER_PERMISSIONS | MANAGE_MESSAGES


def buttons(message: StoredMessage) -> dict[str, str]:
    """Label → custom_id of the message's buttons."""
    return {c["label"]: c["custom_id"] for row in message.components for c in row["components"]}


async def press(
    stack: BotStack,
    message: StoredMessage,
    label: str,
    user_id: int = MODERATOR,
    permissions: int = MODERATOR_PERMISSIONS,
) -> InteractionHandle:
    handle = await stack.discord.press_button(
        message, buttons(message)[label], user_id=user_id, permissions=permissions
    )
    await handle.wait_for_callback(timeout=10)
    return handle


def followups(stack: BotStack, handle: InteractionHandle) -> list[str]:
    return [
        m.content for m in stack.discord.messages.values() if m.interaction_id == handle.id and m.ephemeral
    ]


def direct_messages(stack: BotStack, user_id: int) -> list[str]:
    channel = stack.discord.dm_channel(user_id)
    return [m.content for m in stack.discord.messages.values() if m.channel_id == channel]


async def blocked_prompt(stack: BotStack) -> tuple[InteractionHandle, StoredMessage]:
    await admin(stack, "blocklist add", terms="kid")
    refused = await stack.imagine(prompt="a kid", user_id=MEMBER)
    assert "rules don't allow" in reply_of(refused)
    return refused, await case_entry(stack, "Prompt blocked by this server's rules")


async def test_a_moderator_bans_from_the_entry_and_it_says_who_did(make_stack: StackFactory) -> None:
    stack = await make_stack()
    _, entry = await blocked_prompt(stack)
    assert list(buttons(entry)) == ["Ban 24 h", "Dismiss"]

    member_press = await press(
        stack, entry, "Ban 24 h", user_id=MEMBER, permissions=DEFAULT_MEMBER_PERMISSIONS
    )
    assert "Only moderators" in reply_of(member_press)

    banned = await press(stack, entry, "Ban 24 h")
    await stack.discord.wait_for(lambda: "Decision" in fields_of(entry), 10)
    assert banned.callback is not None and banned.callback.type == 6  # the entry itself is edited
    decision = fields_of(entry)["Decision"]
    assert decision.startswith(f"🔨 Banned for 24 h by <@{MODERATOR}>") and "banned until <t:" in decision
    assert entry.components == []  # decided: nothing left to press

    refused = await stack.imagine(prompt="a lighthouse", user_id=MEMBER)
    assert reply_of(refused).startswith("⛔ You may not use the bot in this server until <t:")
    assert "a prompt this server's rules block" in reply_of(refused)
    assert stack.segmind.stats.submits == []


async def test_two_moderators_at_once_one_decision_and_buttons_survive_a_restart(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    _, entry = await blocked_prompt(stack)
    await stack.restart()
    ids = buttons(entry)
    both = await asyncio.gather(
        stack.discord.press_button(
            entry, ids["Ban 24 h"], user_id=MODERATOR, permissions=MODERATOR_PERMISSIONS
        ),
        stack.discord.press_button(
            entry, ids["Dismiss"], user_id=SECOND_MODERATOR, permissions=MODERATOR_PERMISSIONS
        ),
    )
    for handle in both:
        await handle.wait_for_callback(timeout=10)
    await stack.discord.wait_for(lambda: "Decision" in fields_of(entry), 10)
    losers = [h for h in both if h.callback is not None and h.callback.type == 4]
    assert len(losers) == 1 and reply_of(losers[0]).startswith("Already handled:")
    banned = await stack.bot.moderation.active_ban(stack.discord.guild_id, MEMBER)
    assert (banned is not None) == fields_of(entry)["Decision"].startswith("🔨")


async def test_reports_hide_a_result_until_a_moderator_restores_it(make_stack: StackFactory) -> None:
    stack = await make_stack(REPORTS_TO_HIDE="3")
    made = await stack.imagine(prompt="a lighthouse", user_id=MEMBER)
    result = made.original
    assert result is not None and result.attachments

    own = await press(stack, result, "Report", user_id=MEMBER, permissions=DEFAULT_MEMBER_PERMISSIONS)
    assert "your own result" in reply_of(own)
    first = await press(stack, result, "Report", user_id=REPORTERS[0], permissions=DEFAULT_MEMBER_PERMISSIONS)
    assert "moderators have been told" in reply_of(first)
    again = await press(stack, result, "Report", user_id=REPORTERS[0], permissions=DEFAULT_MEMBER_PERMISSIONS)
    assert "reported this result already" in reply_of(again)
    await press(stack, result, "Report", user_id=REPORTERS[1], permissions=DEFAULT_MEMBER_PERMISSIONS)
    assert result.attachments  # two reports: still shown

    third = await press(stack, result, "Report", user_id=REPORTERS[2], permissions=DEFAULT_MEMBER_PERMISSIONS)
    assert third.callback is not None and third.callback.type == 7  # the answer is the edit that hides it
    assert "hidden after reports" in result.content and not result.attachments and result.components == []
    await stack.discord.wait_for(lambda: any("hidden" in text for text in followups(stack, third)), 10)

    report = await case_entry(stack, "Result reported", nth=2)
    assert list(buttons(report)) == ["Ban 24 h", "Dismiss", "Delete result"]
    assert fields_of(report)["Member"] == f"<@{MEMBER}>" and "a lighthouse" in report.embeds[0]["description"]
    hidden = await case_entry(stack, "Result hidden after reports")
    assert list(buttons(hidden)) == ["Restore", "Delete result", "Ban 24 h"]

    # Restoring needs the images again: while Segmind's outputs fail, nothing changes and the entry stays open.
    stack.segmind.inject("server_error", count=100, target="output", status=503)
    failed = await press(stack, hidden, "Restore")
    await stack.discord.wait_for(
        lambda: any("could not be restored" in t for t in followups(stack, failed)), 30
    )
    assert "Decision" not in fields_of(hidden) and "Restore" in buttons(hidden) and not result.attachments
    stack.segmind.clear_faults()

    await press(stack, hidden, "Restore")
    await stack.discord.wait_for(lambda: bool(result.attachments), 20)
    assert "hidden" not in (result.content or "") and "Report" in buttons(result)
    await stack.discord.wait_for(lambda: "Decision" in fields_of(hidden), 10)
    assert fields_of(hidden)["Decision"].startswith(f"👁️ Result restored by <@{MODERATOR}>")

    # A moderator looked: a fourth member's report is counted and posted, and does not hide it again.
    fourth = await press(stack, result, "Report", user_id=ADMIN, permissions=DEFAULT_MEMBER_PERMISSIONS)
    assert "moderators have been told" in reply_of(fourth)
    fourth_entry = await case_entry(stack, "Result reported", nth=3)
    assert fields_of(fourth_entry)["Reports"] == "4" and fourth_entry.components == []
    assert fields_of(fourth_entry)["Decided already"].startswith(f"👁️ Result restored by <@{MODERATOR}>")
    assert result.attachments
    # One decision per result, whichever of its entries holds the button.
    late = await press(stack, report, "Delete result", user_id=SECOND_MODERATOR)
    assert reply_of(late).startswith("Already handled: 👁️ Result restored")
    assert not result.deleted


async def test_a_blocked_member_appeals_and_the_moderators_answer(make_stack: StackFactory) -> None:
    stack = await make_stack()
    refused, _ = await blocked_prompt(stack)
    reply = refused.original
    assert reply is not None and list(buttons(reply)) == ["Appeal"]

    opened = await stack.discord.press_button(reply, buttons(reply)["Appeal"], user_id=MEMBER)
    await opened.wait_for_callback(timeout=10)
    assert opened.modal is not None and "Appeal" in opened.modal["title"]
    field = opened.modal["components"][0]["components"][0]["custom_id"]
    sent = await stack.discord.submit_modal(opened, {field: "It was about a goat kid on a farm."})
    await sent.wait_for_callback(timeout=10)
    assert "appeal was sent" in reply_of(sent)

    appeal = await case_entry(stack, "Appeal")
    assert list(buttons(appeal)) == ["Lift ban", "Uphold"]
    assert "goat kid on a farm" in appeal.embeds[0]["description"]
    assert "The prompt: a kid" in appeal.embeds[0]["description"]

    twice = await stack.discord.press_button(reply, buttons(reply)["Appeal"], user_id=MEMBER)
    await twice.wait_for_callback(timeout=10)
    resent = await stack.discord.submit_modal(twice, {field: "Please?"})
    await resent.wait_for_callback(timeout=10)
    assert "appealed this already" in reply_of(resent)

    await press(stack, appeal, "Uphold")
    await stack.discord.wait_for(
        lambda: any("decision stands" in dm for dm in direct_messages(stack, MEMBER)), 10
    )
    await stack.discord.wait_for(lambda: "Decision" in fields_of(appeal), 10)
    assert "the member was told" in fields_of(appeal)["Decision"]


async def test_a_banned_member_appeals_the_ban_and_a_moderator_lifts_it(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await admin(stack, "ban", member=MEMBER, reason="spam")
    refused = await stack.imagine(prompt="a lighthouse", user_id=MEMBER)
    reply = refused.original
    assert reply is not None and "Appeal" in buttons(reply)
    opened = await stack.discord.press_button(reply, buttons(reply)["Appeal"], user_id=MEMBER)
    await opened.wait_for_callback(timeout=10)
    assert opened.modal is not None
    field = opened.modal["components"][0]["components"][0]["custom_id"]
    sent = await stack.discord.submit_modal(opened, {field: "I will not spam again."})
    await sent.wait_for_callback(timeout=10)

    appeal = await case_entry(stack, "Appeal")
    assert "the ban until a moderator lifts it (spam)" in fields_of(appeal)["Appealing"]
    by_a_member = await press(
        stack, appeal, "Lift ban", user_id=ADMIN, permissions=DEFAULT_MEMBER_PERMISSIONS
    )
    assert "Only moderators (Manage Messages)" in reply_of(by_a_member)
    await press(stack, appeal, "Lift ban")
    await stack.discord.wait_for(lambda: any("accepted" in dm for dm in direct_messages(stack, MEMBER)), 10)
    allowed = await stack.imagine(prompt="a lighthouse", user_id=MEMBER)
    assert allowed.original is not None and allowed.original.attachments


async def test_the_operators_mod_log_acts_for_servers_without_their_own(make_stack: StackFactory) -> None:
    # Commands synced globally, so that they work in a second server; MOD_LOG_CHANNEL_ID is the first's.
    stack = await make_stack(DISCORD_GUILD_IDS="")
    stack.discord.add_guild(OTHER_GUILD, OTHER_CHANNEL)
    added = await stack.discord.send_slash_command(
        "admin blocklist add",
        {"terms": "kid"},
        user_id=ADMIN,
        permissions=ADMIN_PERMISSIONS,
        channel_id=OTHER_CHANNEL,
    )
    await stack.settled(added, 10)
    refused = await stack.discord.send_slash_command(
        "imagine", {"prompt": "a kid"}, user_id=MEMBER, channel_id=OTHER_CHANNEL
    )
    await stack.settled(refused, 10)
    entry = await case_entry(stack, "Prompt blocked by this server's rules")
    assert fields_of(entry)["Channel"] == f"<#{OTHER_CHANNEL}>"

    await press(stack, entry, "Ban 24 h")
    await stack.discord.wait_for(lambda: "Decision" in fields_of(entry), 10)
    # The ban is in the server the prompt came from, not the one the mod log is in.
    assert await stack.bot.moderation.active_ban(OTHER_GUILD, MEMBER) is not None
    assert await stack.bot.moderation.active_ban(stack.discord.guild_id, MEMBER) is None


async def test_a_moderator_deletes_a_reported_result(make_stack: StackFactory) -> None:
    stack = await make_stack()
    made = await stack.imagine(prompt="a lighthouse", user_id=MEMBER)
    result = made.original
    assert result is not None and result.attachments
    await press(stack, result, "Report", user_id=REPORTERS[0], permissions=DEFAULT_MEMBER_PERMISSIONS)
    report = await case_entry(stack, "Result reported")
    assert fields_of(report)["Reported by"] == f"<@{REPORTERS[0]}>"
    member_press = await press(
        stack, report, "Delete result", user_id=REPORTERS[1], permissions=DEFAULT_MEMBER_PERMISSIONS
    )
    assert "Only moderators" in reply_of(member_press) and not result.deleted
    await press(stack, report, "Delete result")
    await stack.discord.wait_for(lambda: result.deleted, 10)
    await stack.discord.wait_for(lambda: "Decision" in fields_of(report), 10)
    assert fields_of(report)["Decision"].startswith(f"🗑️ Result deleted by <@{MODERATOR}>")


async def test_segminds_content_blocks_count_as_strikes_and_reach_the_mod_log(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    await admin(stack, "strikes", blocks=2, hours=1)
    first = await stack.imagine(prompt=f"a {BLOCKED_WORD} scene", user_id=MEMBER)
    assert first.original is not None and "content filter" in first.original.content
    entry = await case_entry(stack, "Segmind's content filter")
    assert list(buttons(entry)) == ["Ban 24 h", "Dismiss"]
    assert list(buttons(first.original)) == ["Appeal"]
    other = await stack.discord.press_button(first.original, buttons(first.original)["Appeal"], user_id=ADMIN)
    await other.wait_for_callback(timeout=10)
    assert "Only the member whose prompt it was" in reply_of(other)
    mine = await stack.discord.press_button(first.original, buttons(first.original)["Appeal"], user_id=MEMBER)
    await mine.wait_for_callback(timeout=10)
    assert mine.modal is not None
    second = await stack.imagine(prompt=f"another {BLOCKED_WORD} scene", user_id=MEMBER)
    assert (
        second.original is not None
        and "You may not use the bot in this server until" in second.original.content
    )
    assert await stack.bot.moderation.active_ban(stack.discord.guild_id, MEMBER) is not None


async def test_running_out_of_credits_is_an_entry_for_the_operator(make_stack: StackFactory) -> None:
    stack = await make_stack()
    stack.segmind.inject("insufficient_credits", target="submit")
    await stack.imagine(prompt="a cat", user_id=MEMBER)
    entry = await case_entry(stack, "Segmind is out of credits")
    assert list(buttons(entry)) == ["Dismiss"]
    await press(stack, entry, "Dismiss")
    await stack.discord.wait_for(lambda: "Decision" in fields_of(entry), 10)
    assert fields_of(entry)["Decision"].startswith(f"👌 Dismissed by <@{MODERATOR}>")


async def test_one_member_cannot_flood_the_mod_log_with_blocked_prompts(make_stack: StackFactory) -> None:
    stack = await make_stack(MOD_LOG_QUIET_SECONDS="1.5")
    await admin(stack, "blocklist add", terms="kid, gore*")
    for prompt in ("a kid", "a kid again", "gore fest", "a kid once more"):
        refused = await stack.imagine(prompt=prompt, user_id=MEMBER)
        assert "rules don't allow" in reply_of(refused)  # every one refused, and counted
    await stack.imagine(prompt="a kid as well", user_id=REPORTERS[0])
    first, other = await case_entry(stack, "Prompt blocked"), await case_entry(stack, "Prompt blocked", nth=1)
    assert {fields_of(first)["Member"], fields_of(other)["Member"]} == {f"<@{MEMBER}>", f"<@{REPORTERS[0]}>"}
    # The three held back arrive together once the member's quiet time is over, terms and all.
    digest = await case_entry(stack, "Prompt blocked", nth=2)
    description = digest.embeds[0]["description"]
    assert (
        "1. a kid again" in description
        and "2. gore fest" in description
        and "3. a kid once more" in description
    )
    assert "`kid`" in fields_of(digest)["Matched"] and "`gore*`" in fields_of(digest)["Matched"]
    assert fields_of(digest)["Blocked since the last entry"].startswith("3 prompt(s) in <#")
    assert list(buttons(digest)) == ["Ban 24 h", "Dismiss"]
    await asyncio.sleep(2.0)
    entries = [
        m for m in stack.discord.messages.values() if m.embeds and "Prompt blocked" in m.embeds[0]["title"]
    ]
    assert len(entries) == 3
