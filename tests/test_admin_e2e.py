"""/admin end to end: a server's blocklist, set in Discord, refuses prompts before anything is spent."""

from __future__ import annotations

import asyncio

from devtools.fakes.discord.models import BOT_ROLE_PERMISSIONS, DEFAULT_MEMBER_PERMISSIONS
from devtools.fakes.discord.server import InteractionHandle, StoredMessage
from devtools.stack import BotStack
from tests.conftest import BLOCKED_WORD, StackFactory
from tests.test_usage_chart import bar_heights

MEMBER = 1_111_111_111_111_111_111
ARTIST = 1_111_111_111_111_111_112
GUEST = 1_111_111_111_111_111_113
ADMIN = 3_333_333_333_333_333_333
ARTISTS_ROLE = 1_400_000_000_000_000_001
GUESTS_ROLE = 1_400_000_000_000_000_002
OTHER_GUILD = 1_500_000_000_000_000_000
OTHER_CHANNEL = 1_500_000_000_000_000_001
MANAGE_GUILD = 1 << 5
ADMIN_PERMISSIONS = DEFAULT_MEMBER_PERMISSIONS | MANAGE_GUILD


def reply_of(handle: InteractionHandle) -> str:
    callback = handle.callback
    assert callback is not None and callback.type == 4, f"expected an immediate reply, got {handle!r}"
    assert handle.is_ephemeral
    return str(callback.data.get("content", ""))


def mod_log(stack: BotStack) -> list[StoredMessage]:
    return [
        m
        for m in stack.discord.messages.values()
        if m.channel_id == stack.discord.channel_id and m.interaction_id is None and m.webhook_id is None
    ]


async def case_entry(stack: BotStack, title: str, *, nth: int = 0) -> StoredMessage:
    """The mod log's `nth` entry (oldest first) whose title holds `title`, once it is posted."""

    def entries() -> list[StoredMessage]:
        return [m for m in mod_log(stack) if m.embeds and title in m.embeds[0].get("title", "")]

    await stack.discord.wait_for(lambda: len(entries()) > nth, 10)
    return entries()[nth]


def fields_of(message: StoredMessage) -> dict[str, str]:
    return {f["name"]: f["value"] for f in message.embeds[0].get("fields", [])}


async def admin(stack: BotStack, command: str, **options: object) -> InteractionHandle:
    handle = await stack.discord.send_slash_command(
        f"admin {command}", options, user_id=ADMIN, username="admin", permissions=ADMIN_PERMISSIONS
    )
    await stack.settled(handle, 10)
    return handle


async def test_a_blocked_prompt_is_refused_before_anything_is_spent_and_the_mod_log_is_told(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    added = await admin(stack, "blocklist add", terms="kid, gore*")
    assert reply_of(added) == "Done: blocked `kid`, `gore*` (everywhere)."
    await stack.discord.wait_for(lambda: any("blocked `kid`, `gore*`" in m.content for m in mod_log(stack)))
    assert any(f"<@{ADMIN}>" in m.content for m in mod_log(stack))

    refused = await stack.imagine(prompt="a k1d in a garden", user_id=MEMBER)
    text = reply_of(refused)
    assert "rules don't allow this prompt" in text and "kid" not in text  # not which word
    assert stack.segmind.stats.submits == []
    usage = await stack.bot.quota.usage(MEMBER, stack.discord.guild_id)
    assert usage.used_images == 0 and usage.in_flight == 0
    entry = await case_entry(stack, "Prompt blocked by this server's rules")
    fields = fields_of(entry)
    assert fields["Member"] == f"<@{MEMBER}>" and fields["Matched"].startswith("`kid`")
    assert "a k1d in a garden" in entry.embeds[0]["description"]

    allowed = await stack.imagine(prompt="skid marks on a wet road", user_id=MEMBER)
    assert allowed.original is not None and allowed.original.attachments


async def test_terms_are_listed_removed_and_shown_in_the_settings(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await admin(stack, "blocklist add", terms="kid", scope="outside-nsfw")
    await admin(stack, "blocklist add", terms="*gore*")
    listed = await admin(stack, "blocklist list")
    assert listed.callback is not None and listed.is_ephemeral
    description = listed.callback.data["embeds"][0]["description"]
    assert "`kid` (outside age-restricted)" in description and "`*gore*`" in description

    removed = await admin(stack, "blocklist remove", terms="kid, never added")
    assert "unblocked `kid`" in reply_of(removed) and "not on the list: `never added`" in reply_of(removed)
    settings = await admin(stack, "settings")
    assert settings.callback is not None and settings.is_ephemeral
    fields = {f["name"]: f["value"] for f in settings.callback.data["embeds"][0]["fields"]}
    assert fields["Blocked terms"] == "1 (/admin blocklist list)" and fields[
        "Images per member per day"
    ] == str(stack.bot.config.quota_daily_images)
    allowed = await stack.imagine(prompt="a kid flying a kite", user_id=MEMBER)
    assert allowed.original is not None and allowed.original.attachments


async def test_bad_terms_and_missing_permissions_get_a_reply_that_names_them(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    bad = await admin(stack, "blocklist add", terms="fine, *")
    assert reply_of(bad).startswith("❌ “*” has no letters or digits to match")
    nothing = await admin(stack, "blocklist remove", terms="never added")
    assert "None of these are on the blocklist" in reply_of(nothing)

    member = await stack.discord.send_slash_command("admin blocklist add", {"terms": "x"}, user_id=MEMBER)
    await stack.settled(member, 10)
    assert "Manage Server" in reply_of(member)
    listed = await admin(stack, "blocklist list")
    assert "Nothing is blocked" in reply_of(listed)


async def test_admin_is_registered_for_server_admins_only(make_stack: StackFactory) -> None:
    stack = await make_stack()
    synced = stack.discord.synced_commands[stack.discord.guild_id]
    command = next(c for c in synced if c["name"] == "admin")
    assert int(command["default_member_permissions"]) == MANAGE_GUILD
    assert command.get("dm_permission") is False or command.get("contexts") == [0]
    groups = {o["name"]: o for o in command["options"]}
    assert {"settings", "blocklist"} <= set(groups)
    assert {o["name"] for o in groups["blocklist"]["options"]} == {"add", "remove", "list"}


async def test_a_banned_member_is_told_until_when_for_commands_and_buttons_and_can_be_unbanned(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    result = await stack.imagine(prompt="a lighthouse", user_id=MEMBER)
    assert result.original is not None and result.original.attachments
    banned = await admin(stack, "ban", member=MEMBER, hours=24, reason="spamming the channel")
    assert reply_of(banned).startswith(f"Done: banned <@{MEMBER}> until <t:")
    await stack.discord.wait_for(lambda: any(f"banned <@{MEMBER}>" in m.content for m in mod_log(stack)))

    refused = await stack.imagine(prompt="a lighthouse again", user_id=MEMBER)
    text = reply_of(refused)
    assert text.startswith("⛔ You may not use the bot in this server until <t:") and "spamming" in text
    press = await stack.press(result.original, "reroll", user_id=MEMBER)
    assert "You may not use the bot" in reply_of(press)
    assert len(stack.segmind.stats.submits) == 1  # only the first job ever reached Segmind

    listed = await admin(stack, "bans")
    assert listed.callback is not None
    assert f"<@{MEMBER}> until <t:" in listed.callback.data["embeds"][0]["description"]
    assert f"by <@{ADMIN}>" in listed.callback.data["embeds"][0]["description"]
    lifted = await admin(stack, "unban", member=MEMBER)
    assert reply_of(lifted) == f"Done: lifted the ban of <@{MEMBER}>."
    again = await admin(stack, "unban", member=MEMBER)
    assert "is not banned here" in reply_of(again)
    allowed = await stack.imagine(prompt="a lighthouse once more", user_id=MEMBER)
    assert allowed.original is not None and allowed.original.attachments


async def test_strikes_ban_a_member_after_repeated_blocked_prompts(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await admin(stack, "blocklist add", terms="kid")
    set_strikes = await admin(stack, "strikes", blocks=2, hours=6)
    assert reply_of(set_strikes) == "Done: set the strikes off → 2 blocks in 24 h → banned 6 h."
    first = await stack.imagine(prompt="a kid", user_id=MEMBER)
    assert "rules don't allow" in reply_of(first) and "may not use" not in reply_of(first)
    second = await stack.imagine(prompt="a k i d", user_id=MEMBER)
    assert "You may not use the bot in this server until <t:" in reply_of(second)
    await stack.discord.wait_for(lambda: any("2 blocked prompts" in m.content for m in mod_log(stack)))
    third = await stack.imagine(prompt="a harmless lighthouse", user_id=MEMBER)
    assert reply_of(third).startswith("⛔ You may not use the bot")
    # Banned, a blocked prompt is answered with the ban alone: no new case, no strike on top of it.
    await asyncio.sleep(0.5)  # the entries of the earlier blocks are posted in the background
    entries = len(mod_log(stack))
    fourth = await stack.imagine(prompt="a kid again", user_id=MEMBER)
    assert reply_of(fourth).startswith("⛔ You may not use the bot") and "rules" not in reply_of(fourth)
    await asyncio.sleep(0.5)  # the time a case's entry takes to be posted, which none is
    assert len(mod_log(stack)) == entries
    assert stack.segmind.stats.submits == []


async def test_the_mod_log_channel_is_the_servers_own_once_set(make_stack: StackFactory) -> None:
    stack = await make_stack()
    channel = stack.discord.channel_id
    moved = await admin(stack, "modlog", channel=channel)
    assert reply_of(moved) == f"Done: set the mod log <#{channel}> → <#{channel}>."
    settings = await admin(stack, "settings")
    assert settings.callback is not None
    fields = {f["name"]: f["value"] for f in settings.callback.data["embeds"][0]["fields"]}
    assert fields["Mod log"] == f"<#{channel}>" and fields["Strikes"] == "off"


async def dm_imagine(stack: BotStack, prompt: str) -> InteractionHandle:
    handle = await stack.discord.send_slash_command(
        "imagine", {"prompt": prompt}, user_id=MEMBER, channel_id=stack.discord.dm_channel(MEMBER)
    )
    await stack.settled(handle, 20)
    return handle


async def test_imagine_in_direct_messages_is_off_unless_the_operator_turns_it_on(
    make_stack: StackFactory,
) -> None:
    # Commands synced globally, as a bot in production is, so they can be used in a direct message too.
    off = await make_stack(DISCORD_GUILD_IDS="")
    refused = await dm_imagine(off, "a lighthouse")
    assert "servers only" in reply_of(refused)
    assert off.segmind.stats.submits == []

    on = await make_stack(DISCORD_GUILD_IDS="", ALLOW_DIRECT_MESSAGES="true")
    made = await dm_imagine(on, "a lighthouse")
    assert made.original is not None and made.original.attachments


def delivered(handle: InteractionHandle) -> bool:
    return handle.original is not None and bool(handle.original.attachments)


async def test_a_servers_quota_and_role_tiers_hold_per_member_per_server(make_stack: StackFactory) -> None:
    # Commands synced globally, so that they can be used in a second server too.
    stack = await make_stack(DISCORD_GUILD_IDS="")
    stack.discord.add_role(ARTISTS_ROLE, "artists")
    stack.discord.add_role(GUESTS_ROLE, "guests")
    assert "Give `daily`, `concurrent` or both" in reply_of(await admin(stack, "quota"))
    assert "already has the bot's defaults" in reply_of(await admin(stack, "quota", reset=True))
    assert reply_of(await admin(stack, "quota", daily=1)) == "Done: set the daily images 20 → 1."
    tier = await admin(stack, "role", role=ARTISTS_ROLE, daily=3)
    assert reply_of(tier) == f"Done: set the daily images of <@&{ARTISTS_ROLE}> none → 3 a day."
    await admin(stack, "role", role=GUESTS_ROLE, daily=0)
    await stack.discord.wait_for(lambda: any("the daily images 20 → 1" in m.content for m in mod_log(stack)))
    assert any(f"<@{ADMIN}> set the daily images 20 → 1" in m.content for m in mod_log(stack))

    assert delivered(await stack.imagine(prompt="a lighthouse", user_id=MEMBER))
    over = await stack.imagine(prompt="another lighthouse", user_id=MEMBER)
    assert "have 0 left" in reply_of(over)
    assert delivered(
        await stack.imagine(prompt="a lighthouse", samples=3, user_id=ARTIST, roles=[ARTISTS_ROLE])
    )
    refused = await stack.imagine(prompt="a lighthouse", user_id=GUEST, roles=[GUESTS_ROLE])
    assert "roles in this server don't include making images" in reply_of(refused)
    # The most generous tier a member holds wins.
    both = await stack.imagine(prompt="a lighthouse", user_id=GUEST, roles=[GUESTS_ROLE, ARTISTS_ROLE])
    assert delivered(both)
    assert len(stack.segmind.stats.submits) == 3

    quota = await stack.discord.send_slash_command("quota", {}, user_id=MEMBER)
    await stack.settled(quota, 10)
    assert quota.callback is not None
    fields = {f["name"]: f["value"] for f in quota.callback.data["embeds"][0]["fields"]}
    assert fields["Used (24 h)"] == "1 / 1"

    # Another server has its own limits (the defaults) and its own count for the same member.
    stack.discord.add_guild(OTHER_GUILD, OTHER_CHANNEL)
    elsewhere = await stack.discord.send_slash_command(
        "imagine", {"prompt": "a lighthouse"}, user_id=MEMBER, channel_id=OTHER_CHANNEL
    )
    await stack.settled(elsewhere, 20)
    assert delivered(elsewhere)
    assert (await stack.bot.quota.usage(MEMBER, OTHER_GUILD)).used_images == 1

    removed = await admin(stack, "role", role=ARTISTS_ROLE)
    assert reply_of(removed) == f"Done: set the daily images of <@&{ARTISTS_ROLE}> 3 a day → none."
    assert "has no tier here" in reply_of(await admin(stack, "role", role=ARTISTS_ROLE))
    everyone = await admin(stack, "role", role=stack.discord.guild_id, daily=5)
    assert "set its limit with /admin quota" in reply_of(everyone)
    assert reply_of(await admin(stack, "quota", reset=True)) == "Done: set the daily images 1 → 20."


async def test_the_operators_ceiling_caps_what_a_server_sets(make_stack: StackFactory) -> None:
    stack = await make_stack(QUOTA_SERVER_MAX_DAILY_IMAGES="2")
    stack.discord.add_role(ARTISTS_ROLE, "artists")
    raised = await admin(stack, "quota", daily=50)
    assert reply_of(raised) == "Done: set the daily images 20 → 50 (the bot's operator caps it at 2 a day)."
    unlimited = await admin(stack, "role", role=ARTISTS_ROLE, daily=-1)
    assert "caps it at 2 a day" in reply_of(unlimited)
    assert delivered(
        await stack.imagine(prompt="a lighthouse", samples=2, user_id=ARTIST, roles=[ARTISTS_ROLE])
    )
    over = await stack.imagine(prompt="one more", user_id=ARTIST, roles=[ARTISTS_ROLE])
    assert "have 0 left" in reply_of(over)


async def test_usage_sums_the_period_with_a_chart_and_the_cost(make_stack: StackFactory) -> None:
    stack = await make_stack(SEGMIND_PRICE_PER_GPU_SECOND="0.5")
    await admin(stack, "blocklist add", terms="kid")
    assert delivered(await stack.imagine(prompt="a lighthouse", samples=2, user_id=MEMBER))
    assert delivered(await stack.imagine(prompt="a harbour", user_id=ARTIST))
    await stack.imagine(prompt="a kid", user_id=GUEST)  # the blocklist
    await stack.imagine(prompt=f"a {BLOCKED_WORD} thing", user_id=GUEST)  # Segmind's filter

    async def report() -> InteractionHandle:
        handle = await stack.discord.send_slash_command(
            "admin usage", {"days": 7}, user_id=ADMIN, username="admin", permissions=ADMIN_PERMISSIONS
        )
        await stack.settled(handle, 10)
        return handle

    handle = await report()
    for _ in range(50):  # the blocklist's count is written in the background
        if fields_of_embed(handle)["Blocked"] == "2":
            break
        await asyncio.sleep(0.1)
        handle = await report()
    message = handle.original
    assert message is not None and message.ephemeral
    fields = fields_of_embed(handle)
    assert (fields["Images"], fields["Jobs"], fields["Failed"]) == ("3", "3", "0")
    jobs = [job for user in (MEMBER, ARTIST) for job in await stack.bot.store.recent_jobs(user)]
    gpu = sum(float((job.result or {})["metrics"]["inference_time"]) for job in jobs)
    assert gpu > 0
    assert fields["GPU time"] == f"{gpu:,.1f} s" and fields["Cost"] == f"${gpu * 0.5:,.2f}"
    top = fields["Top members"].splitlines()
    assert top[0].startswith(f"<@{MEMBER}>: 2 image(s)") and top[1].startswith(f"<@{ARTIST}>: 1 image(s)")
    assert message.embeds[0]["image"]["url"] == "attachment://usage.png"
    chart = next(a for a in message.attachments if a.filename == "usage.png")
    heights = bar_heights(chart.data, 7)
    assert heights[-1] > 0 and heights[:-1] == [0] * 6  # everything happened today


def fields_of_embed(handle: InteractionHandle) -> dict[str, str]:
    assert handle.original is not None and handle.original.embeds
    return {f["name"]: f["value"] for f in handle.original.embeds[0].get("fields", [])}


NSFW_CHANNEL = 1_300_000_000_000_000_201
NSFW_THREAD = 1_300_000_000_000_000_202
PLAIN_THREAD = 1_300_000_000_000_000_203


async def imagine_in(stack: BotStack, channel_id: int, prompt: str, **who: object) -> InteractionHandle:
    handle = await stack.discord.send_slash_command(
        "imagine",
        {"prompt": prompt},
        channel_id=channel_id,
        **who,  # type: ignore[arg-type]
    )
    await stack.settled(handle, 20)
    return handle


async def test_outside_nsfw_terms_are_allowed_in_age_restricted_channels_and_their_threads(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    stack.discord.add_channel(NSFW_CHANNEL, name="after-dark", nsfw=True)
    stack.discord.add_thread(NSFW_THREAD, NSFW_CHANNEL)
    stack.discord.add_thread(PLAIN_THREAD, stack.discord.channel_id)
    await admin(stack, "blocklist add", terms="gore*", scope="outside-nsfw")
    assert delivered(await imagine_in(stack, NSFW_CHANNEL, "a gorefest battle", user_id=MEMBER))
    assert delivered(await imagine_in(stack, NSFW_THREAD, "a gorefest battle", user_id=MEMBER))
    assert "rules don't allow" in reply_of(
        await imagine_in(stack, PLAIN_THREAD, "a gorefest battle", user_id=MEMBER)
    )
    assert "rules don't allow" in reply_of(await stack.imagine(prompt="a gorefest battle", user_id=MEMBER))


async def test_the_servers_automod_rules_apply_to_prompts_and_stay_fresh(make_stack: StackFactory) -> None:
    stack = await make_stack()
    refused = await admin(stack, "automod", enabled=True)
    assert "needs the Manage Server permission" in reply_of(refused)
    settings = await admin(stack, "settings")
    assert settings.callback is not None
    assert {f["name"]: f["value"] for f in settings.callback.data["embeds"][0]["fields"]}[
        "AutoMod rules applied"
    ] == "no"

    stack.discord.set_bot_permissions(BOT_ROLE_PERMISSIONS | MANAGE_GUILD)
    cats = stack.discord.put_automod_rule(
        {
            "name": "No cats",
            "trigger_metadata": {
                "keyword_filter": ["*cat*"],
                "regex_patterns": [],
                "allow_list": ["black cat*"],
            },
        }
    )
    stack.discord.put_automod_rule(
        {
            "name": "Tell us about dogs",
            "trigger_metadata": {"keyword_filter": ["dog"], "regex_patterns": [], "allow_list": []},
            "actions": [{"type": 2, "metadata": {"channel_id": str(stack.discord.channel_id)}}],
        }
    )
    on = await admin(stack, "automod", enabled=True)
    assert reply_of(on) == (
        "Done: set the AutoMod rules off → on (1 rule(s) that block messages apply to prompts;"
        " members with Manage Server are exempt)."
    )
    blocked = await stack.imagine(prompt="a cute caterpillar", user_id=MEMBER)
    assert "rules don't allow" in reply_of(blocked)
    entry = await case_entry(stack, "Prompt blocked by this server's rules")
    assert "AutoMod rule “No cats”" in fields_of(entry)["Matched"]
    assert delivered(await stack.imagine(prompt="a black cat on a wall", user_id=MEMBER))  # its allow list
    assert delivered(await stack.imagine(prompt="a dog", user_id=MEMBER))  # an alert-only rule
    exempt = await stack.discord.send_slash_command(
        "imagine", {"prompt": "a cat"}, user_id=ADMIN, permissions=ADMIN_PERMISSIONS
    )
    await stack.settled(exempt, 20)
    assert delivered(exempt)  # Discord's AutoMod does not apply to Manage Server either

    # Kept fresh from the gateway: a rule changed in Discord applies without another read.
    stack.discord.put_automod_rule(
        {**cats, "trigger_metadata": {"keyword_filter": ["owl"], "regex_patterns": [], "allow_list": []}}
    )
    for _ in range(50):
        answer = await stack.imagine(prompt="a cat and an owl", user_id=ARTIST)
        if "rules don't allow" in str((answer.callback.data if answer.callback else {}).get("content")):
            break
        await asyncio.sleep(0.1)
    assert "rules don't allow" in reply_of(answer)
    assert delivered(await stack.imagine(prompt="a cat", user_id=MEMBER))
    stack.discord.delete_automod_rule(int(cats["id"]))
    for _ in range(50):
        answer = await stack.imagine(prompt="an owl", user_id=GUEST)
        if delivered(answer):
            break
        await asyncio.sleep(0.1)
    assert delivered(answer)
    reads = [r for r in stack.discord.requests if r.route == "automod_rules"]
    assert len(reads) == 2  # the refused attempt and the one that turned it on; events did the rest


async def test_automod_exempt_roles_and_channels_hold_for_prompts(make_stack: StackFactory) -> None:
    stack = await make_stack()
    stack.discord.set_bot_permissions(BOT_ROLE_PERMISSIONS | MANAGE_GUILD)
    stack.discord.add_role(ARTISTS_ROLE, "artists")
    stack.discord.add_channel(NSFW_CHANNEL, name="staff")
    stack.discord.add_thread(NSFW_THREAD, NSFW_CHANNEL)
    stack.discord.put_automod_rule(
        {
            "name": "No cats",
            "trigger_metadata": {
                "keyword_filter": ["cat"],
                "regex_patterns": [r"\bdogg+o\b"],
                "allow_list": [],
            },
            "exempt_roles": [str(ARTISTS_ROLE)],
            "exempt_channels": [str(NSFW_CHANNEL)],
        }
    )
    await admin(stack, "automod", enabled=True)
    assert "rules don't allow" in reply_of(await stack.imagine(prompt="a cat", user_id=MEMBER))
    assert "rules don't allow" in reply_of(await stack.imagine(prompt="a cute doggggo", user_id=MEMBER))
    assert delivered(await stack.imagine(prompt="a cat", user_id=ARTIST, roles=[ARTISTS_ROLE]))
    assert delivered(await imagine_in(stack, NSFW_CHANNEL, "a cat", user_id=MEMBER))
    assert delivered(await imagine_in(stack, NSFW_THREAD, "a cat", user_id=MEMBER))  # its parent is exempt
