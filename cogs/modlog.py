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
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, replace
from re import Match
from typing import TYPE_CHECKING, Any, ClassVar, Self

import discord

from cogs import render
from cogs.answers import answer_failure, before_answering, refuse, send_ephemeral
from services.moderation.cases import (
    CASE_ID_PATTERN,
    Action,
    CaseKind,
    Decision,
    ModCase,
)
from services.store.guarded import StoreUnavailable

if TYPE_CHECKING:
    from cogs.app import DreamshaperBot

log = logging.getLogger(__name__)

MOD_CUSTOM_ID = "mod:{action}:{case_id}"
APPEAL_CUSTOM_ID = "appeal:{ref}"
BAN_REF = "ban"  # an appeal of the member's ban in this server, rather than of one blocked prompt
BAN_HOURS = 24
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
    view = discord.utils.MISSING
    if refused.appeal is not None:
        view = discord.ui.View(timeout=None)
        view.add_item(AppealButton(refused.appeal))
    await send_ephemeral(interaction, refused.text, view=view)


class ModLog:
    """Where the bot tells a server's moderators what needs them.

    The channel is the server's own (`/admin modlog`), else `MOD_LOG_CHANNEL_ID`. Posting never holds up a
    member's answer: callers post in the background (`in_background`), and a post that fails is logged.
    """

    def __init__(self, bot: DreamshaperBot) -> None:
        self.bot = bot
        self._posting: set[asyncio.Task[None]] = set()  # held: the loop keeps tasks only weakly

    def in_background(self, posting: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(posting)
        self._posting.add(task)
        task.add_done_callback(self._posting.discard)

    async def post_text(self, text: str, *, guild_id: int | None = None) -> None:
        """A line for the record (an admin's change, an automatic ban): nothing to act on."""
        await self._send(guild_id, content=render.truncate(text, render.MESSAGE_LIMIT))

    async def post_case(self, case: ModCase, *, recorded: bool = False) -> None:
        """Records the case (unless `recorded`) and posts its entry; without the store, the entry is
        posted all the same, without buttons, so the moderators still hear of it."""
        buttons = True
        if not recorded:
            try:
                await self.bot.moderation.open_case(case)
            except StoreUnavailable as error:
                log.warning("case %s: not recorded (%s); posted without buttons", case.id, error)
                buttons = False
        view = case_view(case) if buttons else discord.utils.MISSING
        await self._send(case.guild_id, embed=case_embed(case), view=view)

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


def case_embed(case: ModCase, note: str = "") -> discord.Embed:
    embed = discord.Embed(title=TITLES[case.kind], colour=COLOURS[case.kind])
    if case.member_id is not None:
        embed.add_field(name="Member", value=f"<@{case.member_id}>")
    if case.channel_id is not None:
        embed.add_field(name="Channel", value=f"<#{case.channel_id}>")
    if case.detail:
        embed.add_field(name=_DETAIL_NAMES.get(case.kind, "Detail"), value=render.truncate(case.detail, 1000))
    if case.text:
        embed.description = f">>> {render.quote_user_text(case.text, 1500)}"
    embed.add_field(name="When", value=f"<t:{int(case.created_at)}:f>")
    if case.decision is not None:
        decided = f"{DONE[case.decision.action]} by <@{case.decision.by_id}> <t:{int(case.decision.at)}:R>"
        embed.add_field(name="Decision", value=decided + (f": {note}" if note else ""), inline=False)
    embed.set_footer(text=f"case {case.id}")
    return embed


_DETAIL_NAMES = {
    CaseKind.BLOCKED: "Matched",
    CaseKind.CONTENT: "Request",
    CaseKind.REPORT: "Reports so far",
    CaseKind.HIDDEN: "Reports",
    CaseKind.APPEAL: "Appealing",
}


def case_view(case: ModCase) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in case.actions:
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
        if not interaction.permissions.manage_messages:
            return await refuse(interaction, "Only moderators (Manage Messages) can act on the mod log.")
        if self.case is None or self.case.guild_id not in (None, interaction.guild_id):
            return await refuse(interaction, "This entry is too old to act on; its case is no longer kept.")
        return True

    @contextlib.asynccontextmanager
    async def answering(self, interaction: discord.Interaction[DreamshaperBot]) -> AsyncIterator[None]:
        try:
            yield
        except Exception as error:
            self.answered = True
            await answer_failure(
                interaction, render.unexpected_error_reply(error, f"the {self.label} button")
            )

    async def callback(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        async with self.answering(interaction):
            case = self.case
            if case is None:
                return
            moderation = interaction.client.moderation
            mine = Decision(self.action, interaction.user.id, time.time())
            async with before_answering():
                stood = await moderation.decide(case.id, mine)
            if stood != mine:
                already = "" if stood is None else f"{DONE[stood.action]} by <@{stood.by_id}>"
                await send_ephemeral(interaction, f"Already handled: {already}.")
                return
            # Acting may take longer than the 3 s an answer allows (a restore fetches the images again).
            await interaction.response.defer()
            try:
                note = await self.act(interaction, case)
            except ActionFailed as error:
                await moderation.reopen(case.id, mine)
                await interaction.followup.send(f"❌ {error}", ephemeral=True)
                return
            log.info("case %s: %s by %d", case.id, self.action.value, interaction.user.id)
            await interaction.edit_original_response(
                embed=case_embed(replace(case, decision=mine), note), view=None
            )

    async def act(self, interaction: discord.Interaction[DreamshaperBot], case: ModCase) -> str:
        """Carries the decision out; what came of it, for the entry."""
        return ""


class BanButton(CaseButton, action=Action.BAN, label="Ban 24 h", style=discord.ButtonStyle.danger):
    """Bans the member the entry is about for a day, unless a longer ban already holds."""

    async def act(self, interaction: discord.Interaction[DreamshaperBot], case: ModCase) -> str:
        guild_id = interaction.guild_id
        if case.member_id is None or guild_id is None:
            raise ActionFailed("This entry is about nobody who could be banned.")
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
        if case.job_id is None:
            raise ActionFailed("This entry names no result.")
        if not await interaction.client.runner.delete_result(case.job_id):
            return "it was gone already"
        return ""


class RestoreButton(CaseButton, action=Action.RESTORE, label="Restore", style=discord.ButtonStyle.success):
    """Shows a hidden result's images again, fetched anew from Segmind's outputs."""

    async def act(self, interaction: discord.Interaction[DreamshaperBot], case: ModCase) -> str:
        if case.job_id is None:
            raise ActionFailed("This entry names no result.")
        problem = await interaction.client.runner.restore_result(case.job_id)
        if problem is not None:
            raise ActionFailed(f"The result could not be restored: {problem}. Delete it instead?")
        return ""


class LiftBanButton(CaseButton, action=Action.LIFT, label="Lift ban", style=discord.ButtonStyle.success):
    """Accepts an appeal: lifts the member's ban (and strikes) here, and tells them."""

    async def act(self, interaction: discord.Interaction[DreamshaperBot], case: ModCase) -> str:
        if case.member_id is None or interaction.guild_id is None:
            raise ActionFailed("This appeal names no member.")
        await interaction.client.moderation.unban(interaction.guild_id, case.member_id)
        where = interaction.guild.name if interaction.guild is not None else "the server"
        told = await interaction.client.modlog.tell_member(
            case.member_id, f"✅ Your appeal in **{where}** was accepted: you may use the bot there again."
        )
        return "the member was told" if told else "the member's direct messages are closed"


class UpholdButton(CaseButton, action=Action.UPHOLD, label="Uphold", style=discord.ButtonStyle.secondary):
    """Refuses an appeal, and tells the member."""

    async def act(self, interaction: discord.Interaction[DreamshaperBot], case: ModCase) -> str:
        if case.member_id is None:
            raise ActionFailed("This appeal names no member.")
        where = interaction.guild.name if interaction.guild is not None else "the server"
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
                return AppealForm(f"appeal-{guild_id}-{member}-{int(ban.created_at)}", about, "")
            case = await moderation.case(self.ref)
        if case is None or case.member_id != member:
            return "This can no longer be appealed."
        return AppealForm(f"appeal-{case.id}", "a blocked prompt", case.text)


class AppealForm(discord.ui.Modal, title="Appeal to the moderators"):
    """The member's reason, posted to the mod log as an appeal with Lift ban and Uphold; one per block or
    ban (its case id says which)."""

    reason: discord.ui.TextInput[AppealForm] = discord.ui.TextInput(
        label="Why should the moderators reconsider?",
        style=discord.TextStyle.paragraph,
        min_length=1,
        max_length=APPEAL_LENGTH,
    )

    def __init__(self, case_id: str, about: str, prompt: str) -> None:
        super().__init__(timeout=15 * 60)
        self.case_id, self.about, self.prompt = case_id, about, prompt

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
        bot.modlog.in_background(bot.modlog.post_case(case, recorded=True))

    async def on_error(self, interaction: discord.Interaction[DreamshaperBot], error: Exception, /) -> None:  # type: ignore[override]
        if isinstance(error, StoreUnavailable):
            await send_ephemeral(interaction, render.store_unavailable_reply().text)
            return
        await answer_failure(interaction, render.unexpected_error_reply(error, "the appeal"))


# Every mod-log and appeal button Discord may send a press for.
MODLOG_BUTTONS: tuple[type[discord.ui.DynamicItem[Any]], ...] = (*CASE_BUTTONS.values(), AppealButton)
