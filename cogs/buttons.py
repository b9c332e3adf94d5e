"""The buttons on a result, one `DynamicItem` per action, each carrying its job's id in its custom_id.

The job itself is looked up in the store, so the buttons work on messages posted before a restart and in
whichever process Discord sends the press to. The custom_id format ("ds:<action>:<job id>") is what
messages already posted carry: it must not change.

discord.py only logs what `from_custom_id` or `callback` raise, and takes an exception in
`interaction_check` for "not allowed", so any of them failing would leave the member with "This
interaction failed". Each step here answers the member itself instead: `from_custom_id` replies when the
job cannot be looked up, `interaction_check` says why a press is refused, and `callback` turns an
unexpected error into a reply with an error id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from re import Match
from typing import TYPE_CHECKING, Any, ClassVar, Self

import discord

from cogs import render
from cogs.answers import answer_failure, before_answering, refuse, send_ephemeral
from cogs.intake import ban_refusal, start_job
from cogs.modlog import DONE, Refused, send_refusal
from services.jobs import JobError
from services.moderation.cases import CaseKind, ModCase
from services.request import GenerationRequest
from services.store.base import JobRecord, JobState

if TYPE_CHECKING:
    from cogs.app import DreamshaperBot

log = logging.getLogger(__name__)

CUSTOM_ID = "ds:{action}:{job_id}"
JOB_ID_PATTERN = r"[A-Za-z0-9_-]{4,40}"
TOO_OLD = "This result is too old; its settings are no longer kept."


def _template(action: str) -> str:
    return CUSTOM_ID.format(action=action, job_id=f"(?P<job_id>{JOB_ID_PATTERN})")


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=_template("(?P<action>[a-z]+)")
):
    """A button about one job: the base of the result buttons, never registered itself.

    A subclass names its action and look in its class line; `custom_id_for` is the one place its
    custom_id is built. Dispatch runs `from_custom_id` (loads the job, within the time an answer allows),
    then `interaction_check` (the job must still be recorded; subclasses add who may press), then the
    subclass's `callback`, which acts inside `answering`.
    """

    action: ClassVar[str]
    label: ClassVar[str]
    emoji: ClassVar[str]
    style: ClassVar[discord.ButtonStyle]

    def __init_subclass__(cls, *, action: str, label: str, emoji: str, style: discord.ButtonStyle) -> None:
        super().__init_subclass__(template=_template(action))
        cls.action, cls.label, cls.emoji, cls.style = action, label, emoji, style

    def __init__(self, job_id: str, job: JobRecord | None = None) -> None:
        super().__init__(
            discord.ui.Button(
                label=self.label, emoji=self.emoji, style=self.style, custom_id=self.custom_id_for(job_id)
            )
        )
        self.job_id = job_id
        self.job = job
        self.banned: Refused | None = None  # what a banned presser is told
        self.answered = False

    @classmethod
    def custom_id_for(cls, job_id: str) -> str:
        return CUSTOM_ID.format(action=cls.action, job_id=job_id)

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[DreamshaperBot],
        item: discord.ui.Item[Any],
        match: Match[str],
        /,
    ) -> Self:
        button = cls(match["job_id"])
        async with button.answering(interaction), before_answering():
            # Together: each is a trip to the store, and the press must be answered within 3 s.
            button.job, button.banned = await asyncio.gather(
                interaction.client.store.get_job(button.job_id), ban_refusal(interaction)
            )
        return button

    async def interaction_check(self, interaction: discord.Interaction[DreamshaperBot], /) -> bool:
        if self.answered:
            return False
        if self.job is None:
            return await refuse(interaction, TOO_OLD)
        if self.banned is not None:
            await send_refusal(interaction, self.banned)
            return False
        return True

    @property
    def record(self) -> JobRecord:
        """The job; `interaction_check` lets a press through to `callback` only once it was found."""
        if self.job is None:
            raise LookupError(f"job {self.job_id} is not recorded")
        return self.job

    @contextlib.asynccontextmanager
    async def answering(self, interaction: discord.Interaction[DreamshaperBot]) -> AsyncIterator[None]:
        """Whatever fails inside is answered (a store outage plainly, anything else with an error id)."""
        try:
            yield
        except Exception as error:
            self.answered = True
            await answer_failure(
                interaction, render.unexpected_error_reply(error, f"the {self.action} button")
            )


class RerollButton(JobButton, action="reroll", label="Reroll", emoji="🎲", style=discord.ButtonStyle.primary):
    """Runs the same request again with a new random seed, for whoever presses it."""

    async def callback(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        async with self.answering(interaction):
            request = GenerationRequest.from_payload(self.record.request).with_new_seed()
            await start_job(interaction, request, origin="reroll")


class SameSeedButton(
    JobButton, action="same", label="Same seed", emoji="🔁", style=discord.ButtonStyle.secondary
):
    """Runs the very same request again, seed included, for whoever presses it."""

    async def callback(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        async with self.answering(interaction):
            request = GenerationRequest.from_payload(self.record.request)
            await start_job(interaction, request, origin="same_seed")


class InfoButton(JobButton, action="info", label="Info", emoji="ℹ️", style=discord.ButtonStyle.secondary):
    """Shows every parameter of the request, to the presser only."""

    async def callback(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        async with self.answering(interaction):
            job = self.record
            request = GenerationRequest.from_payload(job.request)
            await interaction.response.send_message(
                embed=render.info_embed(request, job.segmind_request_id), ephemeral=True
            )


class DeleteButton(JobButton, action="delete", label="Delete", emoji="🗑️", style=discord.ButtonStyle.danger):
    """Deletes the result, for the member who asked for it or a moderator, even once its record aged out."""

    async def interaction_check(self, interaction: discord.Interaction[DreamshaperBot], /) -> bool:
        if self.answered:
            return False
        if self.job is None:
            return may_delete_unrecorded(interaction) or await refuse(interaction, TOO_OLD)
        if interaction.user.id == self.job.user_id or interaction.permissions.manage_messages:
            return True
        return await refuse(
            interaction, "Only the member who asked for these images, or a moderator, can delete them."
        )

    async def callback(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        async with self.answering(interaction):
            await interaction.response.defer()
            await interaction.delete_original_response()
            log.info("job %s: result deleted by %d", self.job_id, interaction.user.id)


class ReportButton(
    JobButton, action="report", label="Report", emoji="🚩", style=discord.ButtonStyle.secondary
):
    """Tells the moderators about a result, for members other than its requester; one report per member.

    Each report is a mod-log entry; the report that reaches REPORTS_TO_HIDE hides the result (its images
    replaced by a notice) and posts an entry with Restore and Delete result.
    """

    async def interaction_check(self, interaction: discord.Interaction[DreamshaperBot], /) -> bool:
        if not await super().interaction_check(interaction):
            return False
        if interaction.guild_id is None:
            return await refuse(interaction, "Reports go to a server's moderators; there are none here.")
        if interaction.user.id == self.record.user_id:
            return await refuse(interaction, "This is your own result: Delete removes it.")
        return True

    async def callback(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        async with self.answering(interaction):
            bot, job, message = interaction.client, self.record, interaction.message
            if message is None or not await bot.modlog.channel_id(interaction.guild_id):
                await send_ephemeral(
                    interaction, "This server has no mod log, so a report would reach nobody."
                )
                return
            # One case per result, whichever entry a moderator acts on: reports never act twice.
            case = ModCase(
                f"report-{job.id}",
                CaseKind.REPORT,
                interaction.guild_id,
                time.time(),
                member_id=job.user_id,
                channel_id=message.channel.id,
                job_id=job.id,
                message_id=message.id,
                text=GenerationRequest.from_payload(job.request).prompt,
            )
            async with before_answering():
                reports = await bot.moderation.report(job.id, interaction.user.id)
                if reports is not None:
                    await bot.moderation.open_case(case)
                    current = await bot.moderation.case(case.id)
                    decided = None if current is None else current.decision
                    # Once per result, and not once a moderator decided on it (a restored result stays).
                    hide = (
                        decided is None
                        and reports >= bot.config.reports_to_hide
                        and await bot.moderation.open_case(
                            replace(case, id=f"hidden-{job.id}", kind=CaseKind.HIDDEN)
                        )
                    )
            if reports is None:
                await send_ephemeral(
                    interaction, "You have reported this result already; the moderators know."
                )
                return
            log.info("job %s: reported by %d (%d so far)", job.id, interaction.user.id, reports)
            fields = [("Reported by", f"<@{interaction.user.id}>"), ("Reports", f"{reports}"), _link(message)]
            if decided is not None:
                fields.append(("Decided already", f"{DONE[decided.action]} by <@{decided.by_id}>"))
            bot.in_background(
                bot.modlog.post_case(case, recorded=True, fields=fields, buttons=decided is None)
            )
            thanks = "🚩 Thank you: the moderators have been told."
            if not hide:
                await send_ephemeral(interaction, thanks)
                return
            log.info("job %s: hidden after %d reports", job.id, reports)
            hidden = [("Reports", f"{reports} members"), _link(message)]
            bot.in_background(bot.modlog.post_case(case, recorded=True, kind=CaseKind.HIDDEN, fields=hidden))
            try:
                # The press came from the result's own message: this answer is the edit that hides it.
                await interaction.response.edit_message(
                    content=render.HIDDEN_RESULT, embed=None, attachments=[], view=None
                )
            except discord.HTTPException:
                bot.in_background(bot.runner.hide_result(message.channel.id, message.id))
            await send_ephemeral(interaction, f"{thanks} The result is hidden until they look at it.")


def _link(message: discord.Message) -> tuple[str, str]:
    return ("Result", f"[jump to it]({message.jump_url})")


class ResendButton(JobButton, action="resend", label="Resend", emoji="📬", style=discord.ButtonStyle.primary):
    """Delivers a finished job's images into this interaction, for results that could not be posted.

    Offered by `/jobs` to the requester only; the job's lease and a fresh read make a second press (or
    another process) see that the images were already resent.
    """

    async def interaction_check(self, interaction: discord.Interaction[DreamshaperBot], /) -> bool:
        if not await super().interaction_check(interaction):
            return False
        if interaction.user.id == self.record.user_id:
            return True
        return await refuse(interaction, "Only the member who asked for these images can have them resent.")

    async def callback(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        async with self.answering(interaction), contextlib.AsyncExitStack() as held:
            bot = interaction.client
            async with before_answering():
                lease = await held.enter_async_context(bot.jobs.lease(self.job_id))
                current = await bot.store.get_job(self.job_id) if lease else None
            if current is None or not can_resend(current):
                await send_ephemeral(interaction, "These images have already been posted: see `/jobs`.")
                return
            await interaction.response.defer(thinking=True)
            try:
                generated = await bot.jobs.recover_images(
                    current, GenerationRequest.from_payload(current.request)
                )
            except JobError as error:
                await interaction.edit_original_response(content=render.job_failure_reply(error).text)
                return
            resent = replace(
                generated.job,
                channel_id=interaction.channel_id,
                guild_id=interaction.guild_id,
                application_id=interaction.application_id,
                interaction_token=interaction.token,
                interaction_created_at=interaction.created_at.timestamp(),
                upload_limit=interaction.filesize_limit,
            )
            await bot.runner.deliver(replace(generated, job=resent), lease)


# Every job button Discord may send a press for, including those on messages posted long ago.
JOB_BUTTONS: tuple[type[JobButton], ...] = (
    RerollButton,
    SameSeedButton,
    InfoButton,
    DeleteButton,
    ReportButton,
    ResendButton,
)


def result_view(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for button in (RerollButton, SameSeedButton, InfoButton, DeleteButton, ReportButton):
        view.add_item(button(job_id))
    return view


def can_resend(job: JobRecord) -> bool:
    return job.state is JobState.UNDELIVERED


def may_delete_unrecorded(interaction: discord.Interaction) -> bool:
    """Whether the presser may delete a result whose job record has aged out of the store.

    The message itself still says whose it is: the interaction that made it, or the requester the bot
    pinged when it posted the result in the channel.
    """
    if interaction.permissions.manage_messages:
        return True
    message = interaction.message
    if message is None:
        return False
    metadata = message.interaction_metadata
    if metadata is not None:
        return metadata.user.id == interaction.user.id
    return message.raw_mentions[:1] == [interaction.user.id]
