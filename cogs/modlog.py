"""The mod log: entries moderators act on with buttons, and the member's side of it, the appeal.

Every entry that needs a moderator (a blocked prompt, a content block, a report, a hidden result, an
appeal, credits running out) is a `ModCase` in the store and an embed in the server's mod log channel with
one button per action. Each action is its own `DynamicItem` carrying the case id, so the buttons work after
a restart and on whichever shard Discord sends the press to; the store keeps the first decision only, and
the entry is edited to say who did what.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from re import Match
from typing import TYPE_CHECKING, Any, ClassVar, Self

import discord

from cogs import render
from cogs.answers import answer_failure, before_answering, refuse, send_ephemeral
from services.moderation.cases import (
    ACTIONS,
    CASE_ID_PATTERN,
    Action,
    CaseKind,
    Decision,
    ModCase,
    new_case_id,
)
from services.store.guarded import StoreUnavailable

if TYPE_CHECKING:
    from cogs.app import DreamshaperBot

log = logging.getLogger(__name__)

MOD_CUSTOM_ID = "mod:{action}:{case_id}"
APPEAL_CUSTOM_ID = "appeal:{ref}"
BAN_REF = "ban"  # an appeal of the member's ban in this server, rather than of one blocked prompt
BAN_HOURS = 24
QUIET_MEMBERS_KEPT = 10_000
DIGEST_PROMPTS = 20  # prompts listed in one digest entry; the rest are counted


@dataclass
class _Quiet:
    """A member's minute since their last blocked-prompt entry, and what was blocked meanwhile."""

    since: float
    held: list[ModCase] = field(default_factory=list)
    digest: asyncio.Task[None] | None = None


APPEAL_LENGTH = 1000

TITLES = {
    CaseKind.BLOCKED: "🚫 Prompt blocked by this server's rules",
    CaseKind.CONTENT: "🚫 Prompt blocked by Segmind's content filter",
    CaseKind.REPORT: "🚩 Result reported",
    CaseKind.HIDDEN: "🙈 Result hidden after reports",
    CaseKind.APPEAL: "📨 Appeal",
    CaseKind.CREDITS: "💳 Segmind is out of credits",
}
COLOURS = {
    CaseKind.BLOCKED: discord.Colour.orange(),
    CaseKind.CONTENT: discord.Colour.orange(),
    CaseKind.REPORT: discord.Colour.red(),
    CaseKind.HIDDEN: discord.Colour.red(),
    CaseKind.APPEAL: discord.Colour.blurple(),
    CaseKind.CREDITS: discord.Colour.gold(),
}
BAN_REASONS = {
    CaseKind.BLOCKED: "a prompt this server's rules block",
    CaseKind.CONTENT: "a prompt Segmind's content filter blocked",
    CaseKind.REPORT: "an image members reported",
    CaseKind.HIDDEN: "an image members reported",
}
DONE = {
    Action.BAN: "🔨 Banned for 24 h",
    Action.DISMISS: "👌 Dismissed",
    Action.DELETE: "🗑️ Result deleted",
    Action.RESTORE: "👁️ Result restored",
    Action.LIFT: "✅ Ban lifted",
    Action.UPHOLD: "⚖️ Upheld",
}


@dataclass(frozen=True)
class Refused:
    """What a member is told when the bot will not make their image, and what they may appeal: a case
    id (a blocked prompt), `BAN_REF` (their ban here), or nothing."""

    text: str
    appeal: str | None = None


async def send_refusal(interaction: discord.Interaction[DreamshaperBot], refused: Refused) -> None:
    """The refusal, with Appeal when there is something to appeal and a mod log to take it."""
    view = discord.utils.MISSING
    if refused.appeal is not None and await interaction.client.modlog.channel_id(interaction.guild_id):
        view = discord.ui.View(timeout=None)
        view.add_item(AppealButton(refused.appeal))
    await send_ephemeral(interaction, refused.text, view=view)


class ModLog:
    """Where the bot tells a server's moderators what needs them.

    The channel is the server's own (`/admin modlog`), else `MOD_LOG_CHANNEL_ID`. Posting never holds up a
    member's answer: callers post in the background (`bot.in_background`), and a post that fails is logged.
    """

    def __init__(self, bot: DreamshaperBot) -> None:
        self.bot = bot
        self._quiet: dict[tuple[int | None, int], _Quiet] = {}  # (server, member) -> their quiet time
        self.quiet_seconds = bot.config.mod_log_quiet_seconds

    def post_blocked(self, case: ModCase, *, recorded: bool) -> None:
        """A blocked prompt's entry, in the background. One member gets one entry per server per
        MOD_LOG_QUIET_SECONDS, so a member cannot flood the mod log: the prompts blocked in between are
        posted together, in one entry, when that time is over."""
        key = (case.guild_id, case.member_id or 0)
        now = time.monotonic()
        quiet = self._quiet.get(key)
        if quiet is not None and now - quiet.since < self.quiet_seconds:
            quiet.held.append(case)
            if quiet.digest is None:
                quiet.digest = asyncio.create_task(
                    self._post_digest(key, self.quiet_seconds - (now - quiet.since))
                )
            return
        if len(self._quiet) > QUIET_MEMBERS_KEPT:
            self._quiet = {
                k: v for k, v in self._quiet.items() if now - v.since < self.quiet_seconds or v.held
            }
        self._quiet[key] = _Quiet(now)
        self.bot.in_background(self.post_case(case, recorded=recorded))

    async def _post_digest(self, key: tuple[int | None, int], delay: float) -> None:
        await asyncio.sleep(delay)
        quiet = self._quiet[key]
        held, quiet.held, quiet.digest = quiet.held, [], None
        quiet.since = time.monotonic()  # the digest is this minute's entry
        first = held[0]
        prompts = "\n".join(f"{number}. {case.text}" for number, case in enumerate(held[:DIGEST_PROMPTS], 1))
        more = f"\n… and {len(held) - DIGEST_PROMPTS} more" if len(held) > DIGEST_PROMPTS else ""
        digest = replace(
            first,
            id=new_case_id(),
            created_at=time.time(),
            text=prompts + more,
            detail=", ".join(dict.fromkeys(case.detail for case in held)),
        )
        channels = " ".join(dict.fromkeys(f"<#{case.channel_id}>" for case in held if case.channel_id))
        fields = [("Blocked since the last entry", f"{len(held)} prompt(s) in {channels}")]
        await self.post_case(digest, fields=fields)

    async def post_text(self, text: str, *, guild_id: int | None = None) -> None:
        """A line for the record (an admin's change, an automatic ban): nothing to act on."""
        await self._send(guild_id, content=render.truncate(text, render.MESSAGE_LIMIT))

    async def post_case(
        self,
        case: ModCase,
        *,
        recorded: bool = False,
        kind: CaseKind | None = None,
        fields: Sequence[tuple[str, str]] = (),
        buttons: bool = True,
    ) -> None:
        """Records the case (unless `recorded`) and posts an entry for it: looking like `kind` (the case's
        own by default) and with its buttons (unless `buttons` is False: decided already), plus `fields`.
        Without the store the entry is posted all the same, without buttons, so the moderators still hear
        of it."""
        if not recorded:
            try:
                await self.bot.moderation.open_case(case)
            except StoreUnavailable as error:
                log.warning("case %s: not recorded (%s); posted without buttons", case.id, error)
                buttons = False
        view = case_view(case, kind) if buttons else discord.utils.MISSING
        await self._send(case.guild_id, embed=case_embed(case, kind, fields), view=view)

    async def channel_id(self, guild_id: int | None) -> int | None:
        default = self.bot.config.mod_log_channel_id
        if guild_id is None:
            return default
        try:
            return (await self.bot.moderation.settings(guild_id)).modlog_channel_id or default
        except StoreUnavailable as error:
            log.warning("could not read the mod log channel of server %d: %s", guild_id, error)
            return default

    async def _send(self, guild_id: int | None, **message: Any) -> None:
        channel_id = await self.channel_id(guild_id)
        if channel_id is None:
            return
        try:
            channel = await self.bot.runner.channel(channel_id)
            await channel.send(**message, allowed_mentions=discord.AllowedMentions.none())
        except (discord.HTTPException, LookupError) as error:
            log.warning("could not post to the mod log channel %d: %s", channel_id, error)

    async def tell_member(self, user_id: int, text: str) -> bool:
        """A direct message to the member; False when Discord would not deliver it (DMs closed)."""
        try:
            user = self.bot.get_user(user_id) or await self.bot.fetch_user(user_id)
            await user.send(text)
            return True
        except discord.HTTPException as error:
            log.info("could not send a direct message to %d: %s", user_id, error)
            return False


def case_embed(
    case: ModCase, kind: CaseKind | None = None, fields: Sequence[tuple[str, str]] = ()
) -> discord.Embed:
    kind = kind or case.kind
    embed = discord.Embed(title=TITLES[kind], colour=COLOURS[kind])
    if case.member_id is not None:
        embed.add_field(name="Member", value=f"<@{case.member_id}>")
    if case.channel_id is not None:
        embed.add_field(name="Channel", value=f"<#{case.channel_id}>")
    if case.detail:
        embed.add_field(name=_DETAIL_NAMES.get(case.kind, "Detail"), value=render.truncate(case.detail, 1000))
    for name, value in fields:
        embed.add_field(name=name, value=render.truncate(value, 1000))
    if case.text:
        embed.description = f">>> {render.quote_user_text(case.text, 1500)}"
    embed.add_field(name="When", value=f"<t:{int(case.created_at)}:f>")
    embed.set_footer(text=f"case {case.id}")
    return embed


def decided_embed(
    entry: discord.Message | None, case: ModCase, decision: Decision, note: str
) -> discord.Embed:
    """The entry as it was posted (its fields kept), with who did what added."""
    embed = entry.embeds[0].copy() if entry is not None and entry.embeds else case_embed(case)
    done = f"{DONE[decision.action]} by <@{decision.by_id}> <t:{int(decision.at)}:R>" + (
        f": {note}" if note else ""
    )
    return embed.add_field(name="Decision", value=render.truncate(done, 1000), inline=False)


_DETAIL_NAMES = {
    CaseKind.BLOCKED: "Matched",
    CaseKind.CONTENT: "Request",
    CaseKind.APPEAL: "Appealing",
}


def case_view(case: ModCase, kind: CaseKind | None = None) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in ACTIONS[kind or case.kind]:
        view.add_item(CASE_BUTTONS[action](case.id))
    return view


class ActionFailed(Exception):
    """A moderator's action could not be carried out; the case stays open, and the text says why."""


class CaseButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=MOD_CUSTOM_ID.format(action="(?P<action>[a-z]+)", case_id=f"(?P<case_id>{CASE_ID_PATTERN})"),
):
    """A moderator's button on a mod-log entry: the base of one class per action, never registered itself.

    `from_custom_id` loads the case (within the time an answer allows), `interaction_check` asks for
    Manage Messages in the case's server, and `callback` records the decision first (the store keeps the
    first one only, so two moderators cannot both act), then carries it out with `act` and edits the
    entry to show who did what. An action that fails takes its decision back and says why.
    """

    action: ClassVar[Action]
    label: ClassVar[str]
    style: ClassVar[discord.ButtonStyle]

    def __init_subclass__(cls, *, action: Action, label: str, style: discord.ButtonStyle) -> None:
        super().__init_subclass__(
            template=MOD_CUSTOM_ID.format(action=action.value, case_id=f"(?P<case_id>{CASE_ID_PATTERN})")
        )
        cls.action, cls.label, cls.style = action, label, style

    def __init__(self, case_id: str, case: ModCase | None = None) -> None:
        super().__init__(
            discord.ui.Button(
                label=self.label,
                style=self.style,
                custom_id=MOD_CUSTOM_ID.format(action=self.action.value, case_id=case_id),
            )
        )
        self.case_id = case_id
        self.case = case
        self.answered = False

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[DreamshaperBot],
        item: discord.ui.Item[Any],
        match: Match[str],
        /,
    ) -> Self:
        button = cls(match["case_id"])
        async with button.answering(interaction), before_answering():
            button.case = await interaction.client.moderation.case(button.case_id)
        return button

    async def interaction_check(self, interaction: discord.Interaction[DreamshaperBot], /) -> bool:
        if self.answered:
            return False
        # Manage Messages, as for deleting a member's message.
        if not interaction.permissions.manage_messages:
            return await refuse(
                interaction, f"Only moderators (Manage Messages) can {self.label.lower()} here."
            )
        case = self.case
        if case is None:
            return await refuse(interaction, "This entry is too old to act on; its case is no longer kept.")
        # The case's own server, or the operator's mod log (MOD_LOG_CHANNEL_ID) that speaks for every
        # server without one of its own.
        if (
            case.guild_id != interaction.guild_id
            and interaction.channel_id != interaction.client.config.mod_log_channel_id
        ):
            return await refuse(interaction, "This entry belongs to another server's moderators.")
        return True

    @contextlib.asynccontextmanager
    async def answering(self, interaction: discord.Interaction[DreamshaperBot]) -> AsyncIterator[None]:
        try:
            yield
        except Exception as error:
            self.answered = True
            await _answer(interaction, render.unexpected_error_reply(error, f"the {self.label} button").text)

    async def callback(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        case = self.case
        if case is None:
            return
        bot = interaction.client
        mine = Decision(self.action, interaction.user.id, time.time())
        try:
            async with before_answering():
                stood = await bot.moderation.decide(case.id, mine)
        except StoreUnavailable:
            # The decision may have landed all the same: it is taken back, so the case stays open.
            bot.in_background(_take_back(bot, case.id, mine))
            await _answer(interaction, f"❌ {render.store_unavailable_reply().text}")
            return
        if stood is None:
            await _answer(interaction, "This entry's case is no longer kept; nothing was done.")
            return
        if stood != mine:
            await _answer(interaction, f"Already handled: {DONE[stood.action]} by <@{stood.by_id}>.")
            return
        try:
            # Acting may take longer than the 3 s an answer allows (a restore fetches the images again).
            await interaction.response.defer()
            note = await self.act(interaction, case)
        except BaseException as error:
            bot.in_background(_take_back(bot, case.id, mine))
            if not isinstance(error, Exception):
                raise
            if isinstance(error, ActionFailed):
                problem = str(error)
            elif isinstance(error, StoreUnavailable):
                problem = render.store_unavailable_reply().text
            else:
                problem = render.unexpected_error_reply(error, f"the {self.label} button").text
            await _answer(interaction, f"❌ {problem} The entry stays open.")
            return
        log.info("case %s: %s by %d", case.id, self.action.value, interaction.user.id)
        await interaction.edit_original_response(
            embed=decided_embed(interaction.message, case, mine, note), view=None
        )

    async def act(self, interaction: discord.Interaction[DreamshaperBot], case: ModCase) -> str:
        """Carries the decision out; what came of it, for the entry."""
        return ""


class BanButton(CaseButton, action=Action.BAN, label="Ban 24 h", style=discord.ButtonStyle.danger):
    """Bans the member the entry is about for a day, unless a longer ban already holds."""

    async def act(self, interaction: discord.Interaction[DreamshaperBot], case: ModCase) -> str:
        guild_id = case.guild_id
        if case.member_id is None or guild_id is None:
            raise ActionFailed("This entry is about nobody who could be banned here.")
        moderation = interaction.client.moderation
        current = await moderation.active_ban(guild_id, case.member_id)
        if current is not None and (current.until is None or current.until >= time.time() + BAN_HOURS * 3600):
            return f"already banned {render.ban_end(current)}"
        ban = await moderation.ban(
            guild_id,
            case.member_id,
            hours=BAN_HOURS,
            reason=BAN_REASONS.get(case.kind, "from the mod log"),
            by_id=interaction.user.id,
        )
        return f"banned {render.ban_end(ban)}"


class DismissButton(CaseButton, action=Action.DISMISS, label="Dismiss", style=discord.ButtonStyle.secondary):
    """Nothing to do: the entry is marked as seen."""


class DeleteResultButton(
    CaseButton, action=Action.DELETE, label="Delete result", style=discord.ButtonStyle.danger
):
    """Deletes the reported result from its channel."""

    async def act(self, interaction: discord.Interaction[DreamshaperBot], case: ModCase) -> str:
        if case.channel_id is None or case.message_id is None:
            raise ActionFailed("This entry names no result.")
        try:
            deleted = await interaction.client.runner.delete_result(case.channel_id, case.message_id)
        except discord.HTTPException as error:
            raise ActionFailed(
                f"Discord refused to delete it ({error.status}: {error.text or 'no reason'})."
            ) from None
        return "" if deleted else "it was gone already"


class RestoreButton(CaseButton, action=Action.RESTORE, label="Restore", style=discord.ButtonStyle.success):
    """Shows a hidden result's images again, fetched anew from Segmind's outputs."""

    async def act(self, interaction: discord.Interaction[DreamshaperBot], case: ModCase) -> str:
        if case.job_id is None or case.channel_id is None or case.message_id is None:
            raise ActionFailed("This entry names no result.")
        problem = await interaction.client.runner.restore_result(
            case.job_id, case.channel_id, case.message_id
        )
        if problem is not None:
            raise ActionFailed(f"The result could not be restored: {problem}. Delete it instead?")
        return ""


class LiftBanButton(CaseButton, action=Action.LIFT, label="Lift ban", style=discord.ButtonStyle.success):
    """Accepts an appeal: the appealed ban (if it still holds) and the member's strikes go, and they are told.

    It lifts the ban appealed only: a newer ban set since is left for /admin unban.
    """

    async def act(self, interaction: discord.Interaction[DreamshaperBot], case: ModCase) -> str:
        if case.member_id is None or case.guild_id is None:
            raise ActionFailed("This appeal names no member here.")
        moderation = interaction.client.moderation
        current = await moderation.active_ban(case.guild_id, case.member_id)
        if case.ban_at is not None and current is not None and current.created_at != case.ban_at:
            raise ActionFailed("The member was banned again since this appeal; see /admin bans.")
        await moderation.unban(case.guild_id, case.member_id)
        where = _server_name(interaction)
        again = " you may use the bot there again." if current is not None else " thank you for explaining."
        told = await interaction.client.modlog.tell_member(
            case.member_id, f"✅ Your appeal in **{where}** was accepted:{again}"
        )
        lifted = "ban lifted" if current is not None else "no ban held"
        return f"{lifted}; " + ("the member was told" if told else "the member's direct messages are closed")


class UpholdButton(CaseButton, action=Action.UPHOLD, label="Uphold", style=discord.ButtonStyle.secondary):
    """Refuses an appeal, and tells the member."""

    async def act(self, interaction: discord.Interaction[DreamshaperBot], case: ModCase) -> str:
        if case.member_id is None:
            raise ActionFailed("This appeal names no member.")
        where = _server_name(interaction)
        told = await interaction.client.modlog.tell_member(
            case.member_id, f"⚖️ Your appeal in **{where}** was reviewed by a moderator: the decision stands."
        )
        return "the member was told" if told else "the member's direct messages are closed"


CASE_BUTTONS: dict[Action, type[CaseButton]] = {
    Action.BAN: BanButton,
    Action.DISMISS: DismissButton,
    Action.DELETE: DeleteResultButton,
    Action.RESTORE: RestoreButton,
    Action.LIFT: LiftBanButton,
    Action.UPHOLD: UpholdButton,
}


class AppealButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=APPEAL_CUSTOM_ID.format(ref=f"(?P<ref>{BAN_REF}|{CASE_ID_PATTERN})"),
):
    """On a blocked or banned member's reply: opens a form for their reason, for the moderators."""

    def __init__(self, ref: str) -> None:
        super().__init__(
            discord.ui.Button(
                label="Appeal",
                emoji="📨",
                style=discord.ButtonStyle.secondary,
                custom_id=APPEAL_CUSTOM_ID.format(ref=ref),
            )
        )
        self.ref = ref

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[DreamshaperBot],
        item: discord.ui.Item[Any],
        match: Match[str],
        /,
    ) -> Self:
        return cls(match["ref"])

    async def callback(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        try:
            form = await self._form(interaction)
            if isinstance(form, str):
                await send_ephemeral(interaction, form)
                return
            await interaction.response.send_modal(form)
        except StoreUnavailable:
            await send_ephemeral(interaction, render.store_unavailable_reply().text)
        except Exception as error:
            await answer_failure(interaction, render.unexpected_error_reply(error, "the Appeal button"))

    async def _form(self, interaction: discord.Interaction[DreamshaperBot]) -> AppealForm | str:
        """The form for this appeal, or why there is nothing to appeal."""
        guild_id, member = interaction.guild_id, interaction.user.id
        if guild_id is None:
            return "Appeals are for a server's moderators; there are none here."
        moderation = interaction.client.moderation
        async with before_answering():
            if self.ref == BAN_REF:
                ban = await moderation.active_ban(guild_id, member)
                if ban is None:
                    return "You are not banned here any more."
                about = f"the ban {render.ban_end(ban)}" + (f" ({ban.reason})" if ban.reason else "")
                return AppealForm(
                    f"appeal-{guild_id}-{member}-{int(ban.created_at)}", about, "", ban_at=ban.created_at
                )
            case = await moderation.case(self.ref)
        if case is None:
            return "This can no longer be appealed."
        if case.member_id != member:
            return "Only the member whose prompt it was can appeal it."
        about = "a prompt Segmind's filter blocked" if case.kind is CaseKind.CONTENT else "a blocked prompt"
        return AppealForm(f"appeal-{case.id}", about, case.text)


class AppealForm(discord.ui.Modal, title="Appeal to the moderators"):
    """The member's reason, posted to the mod log as an appeal with Lift ban and Uphold; one per block or
    ban (its case id says which)."""

    reason: discord.ui.TextInput[AppealForm] = discord.ui.TextInput(
        label="Why should the moderators reconsider?",
        style=discord.TextStyle.paragraph,
        min_length=1,
        max_length=APPEAL_LENGTH,
    )

    def __init__(self, case_id: str, about: str, prompt: str, *, ban_at: float | None = None) -> None:
        super().__init__(timeout=15 * 60)
        self.case_id, self.about, self.prompt, self.ban_at = case_id, about, prompt, ban_at

    async def on_submit(self, interaction: discord.Interaction[DreamshaperBot], /) -> None:  # type: ignore[override]
        bot = interaction.client
        words = self.reason.value
        text = f"{words}\n\nThe prompt: {self.prompt}" if self.prompt else words
        case = ModCase(
            id=self.case_id,
            kind=CaseKind.APPEAL,
            guild_id=interaction.guild_id,
            created_at=time.time(),
            member_id=interaction.user.id,
            channel_id=interaction.channel_id,
            text=text,
            detail=self.about,
            ban_at=self.ban_at,
        )
        async with before_answering():
            added = await bot.moderation.open_case(case)
        if not added:
            await send_ephemeral(interaction, "You have appealed this already; the moderators will answer.")
            return
        log.info("case %s: %d appealed %s", case.id, interaction.user.id, self.about)
        await send_ephemeral(
            interaction,
            "📨 Your appeal was sent to the moderators. They answer by direct message where they can.",
        )
        bot.in_background(bot.modlog.post_case(case, recorded=True))

    async def on_error(self, interaction: discord.Interaction[DreamshaperBot], error: Exception, /) -> None:  # type: ignore[override]
        if isinstance(error, StoreUnavailable):
            await send_ephemeral(interaction, render.store_unavailable_reply().text)
            return
        await answer_failure(interaction, render.unexpected_error_reply(error, "the appeal"))


def _server_name(interaction: discord.Interaction) -> str:
    return interaction.guild.name if interaction.guild is not None else "the server"


async def _answer(interaction: discord.Interaction, text: str) -> None:
    """An ephemeral answer to the moderator; the entry itself is never overwritten with it."""
    try:
        await send_ephemeral(interaction, text)
    except discord.HTTPException as error:
        log.warning("could not answer a mod-log button: %s", error)


async def _take_back(bot: DreamshaperBot, case_id: str, decision: Decision) -> None:
    """Reopens a case whose decision was not carried out; retried a few times while the store is down."""
    for attempt in range(5):
        try:
            await bot.moderation.reopen(case_id, decision)
            return
        except StoreUnavailable as error:
            log.warning("case %s: could not be reopened yet (%s)", case_id, error)
            await asyncio.sleep(2.0**attempt)
    log.error("case %s: left decided (%s) though its action failed", case_id, decision.action.value)


# Every mod-log and appeal button Discord may send a press for.
MODLOG_BUTTONS: tuple[type[discord.ui.DynamicItem[Any]], ...] = (*CASE_BUTTONS.values(), AppealButton)
