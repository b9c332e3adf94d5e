"""Taking a job in: the checks, the quota reservation and the saved record, all within Discord's 3 s.

The reservation and the record are one step of the store, and the credits flag is read from memory most
of the time, so a command waits on the store once before it is acknowledged.

/imagine and the Reroll and Same seed buttons start jobs the same way; once its record is saved, a job
belongs to the job runner, in this process or whichever one resumes it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import discord

from cogs import render
from cogs.answers import before_answering, send_ephemeral
from cogs.modlog import BAN_REF, Refused, send_refusal
from services.jobs import Progress, ProgressKind
from services.moderation.cases import CaseKind, ModCase, new_case_id
from services.request import GenerationRequest
from services.store.base import (
    Ban,
    JobRecord,
    JobState,
    QuotaRefusal,
    UsageCounts,
    new_job_id,
    new_reservation_id,
)
from services.store.guarded import StoreUnavailable

if TYPE_CHECKING:
    from cogs.app import DreamshaperBot

log = logging.getLogger(__name__)

# In a command's `extras`: its member's ban is checked in the same store step as the reservation (see
# `Store.reserve_job`), so the tree's own check, a read of its own before the command runs, is skipped.
BAN_CHECKED_WHEN_RESERVED = "ban_checked_when_reserved"


async def start_job(
    interaction: discord.Interaction[DreamshaperBot], request: GenerationRequest, *, origin: str
) -> None:
    """Checks, reserves quota and acknowledges within Discord's 3 s, before any call to Segmind."""
    bot = interaction.client
    if not bot.accepting_jobs:
        await send_ephemeral(interaction, "🔄 The bot is restarting; please try again in a minute.")
        return
    # Until this command is acknowledged no job begins (1 s at most) and new submits to Segmind wait (0.3 s
    # at most); status checks, results and downloads still go.
    with bot.segmind.in_flight.foreground():
        await _take_in(interaction, request, origin)


async def _take_in(
    interaction: discord.Interaction[DreamshaperBot], request: GenerationRequest, origin: str
) -> None:
    bot = interaction.client
    try:
        async with before_answering():
            outcome = await _record_job(interaction, request, origin)
    except StoreUnavailable as error:
        log.warning("could not record a job for %d: %s", interaction.user.id, error)
        await send_ephemeral(interaction, render.store_unavailable_reply().text)
        return
    if isinstance(outcome, str):
        await send_ephemeral(interaction, outcome)
        return
    if isinstance(outcome, Refused):
        await send_refusal(interaction, outcome)
        return
    # The acknowledgement is the job's first progress line: the member sees the estimate at once, and the
    # line costs no edit of its own (a thousand commands in a second would cost a thousand).
    first = Progress(ProgressKind.QUEUED, ready_at=time.time() + bot.segmind.expected_duration(request))
    try:
        await interaction.response.send_message(render.progress_text(first))
    except BaseException:
        await bot.jobs.abandon(outcome, "the interaction could not be acknowledged")
        raise
    bot.runner.start(outcome, shown=first)


async def _record_job(
    interaction: discord.Interaction[DreamshaperBot], request: GenerationRequest, origin: str
) -> JobRecord | Refused | str:
    """The saved job, or the refusal to show the member."""
    bot = interaction.client
    if interaction.guild_id is None and not bot.config.allow_direct_messages:
        return render.direct_messages_off_reply()
    user = interaction.user
    role_ids = member_role_ids(user)
    settings = None if interaction.guild_id is None else await bot.moderation.settings(interaction.guild_id)
    limits = bot.quota.limits_for(role_ids, settings)
    if limits is None:
        return await ban_refusal(interaction) or render.may_not_generate_reply()
    if interaction.guild_id is not None:
        case = await _blocked(interaction, interaction.guild_id, request.prompt)
        if case is not None:
            # A banned member is told of the ban, not given a case, a strike or a block on top of it.
            if (banned := await ban_refusal(interaction)) is not None:
                return banned
            counts = UsageCounts(blocked=1)
            bot.in_background(bot.jobs.count_usage(interaction.guild_id, interaction.user.id, counts))
            appeal = await _record_case(bot, case)
            ban = await interaction.client.moderation.strike(interaction.guild_id, interaction.user.id)
            if ban is None:
                return Refused(render.blocked_prompt_reply(), appeal=appeal)
            modlog = bot.modlog
            banned = f"⛔ <@{interaction.user.id}> was banned {render.ban_end(ban)}: {ban.reason}."
            bot.in_background(modlog.post_text(banned, guild_id=interaction.guild_id))
            return Refused(f"{render.blocked_prompt_reply()}\n{render.banned_reply(ban)}", appeal=BAN_REF)
    # Read from the store at most once a second, however many commands arrive (the store's flag cache).
    if await bot.jobs.credits_exhausted_until():
        return await ban_refusal(interaction) or render.credits_exhausted_reply()
    now = time.time()
    job = JobRecord(
        id=new_job_id(),
        user_id=user.id,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        # The seed is drawn now, so the record the job runs from is the one it was reserved with.
        request=request.with_concrete_seed().to_payload(),
        reservation_id=new_reservation_id(user.id, interaction.guild_id),
        state=JobState.PENDING,
        created_at=now,
        updated_at=now,
        interaction_id=interaction.id,
        interaction_token=interaction.token,
        interaction_created_at=interaction.created_at.timestamp(),
        application_id=interaction.application_id,
        origin=origin,
        upload_limit=interaction.filesize_limit,
        requester_name=user.display_name,
    )
    # Reserved and saved in one step, before the command is acknowledged: from this record on, the job and
    # its reservation belong to whichever process runs it, even if this one dies a millisecond later. The
    # member's ban is checked in that step too, the refusals above (rare) having read it on their own.
    try:
        outcome = await bot.quota.reserve_job(job, request.samples, limits)
    except BaseException:
        # The step may still land after its caller gave up: it is undone in the background, so the
        # member's answer is not held up by the store that just failed.
        bot.in_background(_withdraw(bot, job))
        raise
    if isinstance(outcome, QuotaRefusal):
        return render.quota_refusal_reply(outcome, request.samples)
    if isinstance(outcome, Ban):
        return Refused(render.banned_reply(outcome), appeal=BAN_REF)
    return outcome


async def _withdraw(bot: DreamshaperBot, job: JobRecord) -> None:
    """Undoes a job the member was told was not started, whether or not its record reached the store."""
    try:
        await bot.quota.refund(job.reservation_id or "")
        saved = await bot.store.get_job(job.id)
        if saved is not None and not saved.finished:
            await bot.jobs.record(
                saved, state=JobState.FAILED, error="not recorded in time; nothing was started"
            )
    except StoreUnavailable as error:
        # A reservation no saved job owns is refunded by the sweep; a saved job is resumed by it.
        log.warning("job %s: not withdrawn yet (%s); the sweep will see to it", job.id, error)


async def _blocked(
    interaction: discord.Interaction[DreamshaperBot], guild_id: int, prompt: str
) -> ModCase | None:
    """The server's rules against this prompt, checked before anything is reserved or sent: None when it
    may run, else the mod-log case, with the term that matched (the member is not told which)."""
    channel = interaction.channel
    parent_id = getattr(channel, "parent_id", None)
    bot = interaction.client
    block = await bot.moderation.check_prompt(
        guild_id,
        prompt,
        age_restricted=_age_restricted(channel),
        role_ids=member_role_ids(interaction.user),
        channel_ids=[interaction.channel_id or 0, *([parent_id] if parent_id else [])],
        automod_exempt=interaction.permissions.manage_guild or interaction.permissions.administrator,
    )
    if block is None:
        return None
    source = f"AutoMod rule “{block.rule}”" if block.source == "automod" else "the blocklist"
    log.info("server %d: a prompt from %d was blocked by %s", guild_id, interaction.user.id, source)
    case = ModCase(
        new_case_id(),
        CaseKind.BLOCKED,
        guild_id,
        time.time(),
        member_id=interaction.user.id,
        channel_id=interaction.channel_id,
        text=prompt,
        detail=f"`{block.matched}` ({source})",
    )
    return case


async def _record_case(bot: DreamshaperBot, case: ModCase) -> str | None:
    """Records the case before the member is answered, so their Appeal finds it, and posts its entry in
    the background; the id to appeal, or None when the store could not take it (the entry is posted all
    the same)."""
    try:
        await bot.moderation.open_case(case)
    except StoreUnavailable as error:
        log.warning("case %s: not recorded (%s)", case.id, error)
        bot.modlog.post_blocked(case, recorded=False)
        return None
    bot.modlog.post_blocked(case, recorded=True)
    return case.id


async def ban_refusal(interaction: discord.Interaction[DreamshaperBot]) -> Refused | None:
    """What a banned member is told, for their commands and buttons in this server, with Appeal; None for
    others (and when the store cannot say: the command then meets the outage itself and says so)."""
    if interaction.guild_id is None:
        return None
    try:
        async with before_answering():
            ban = await interaction.client.moderation.active_ban(interaction.guild_id, interaction.user.id)
    except StoreUnavailable:
        return None
    return None if ban is None else Refused(render.banned_reply(ban), appeal=BAN_REF)


def _age_restricted(channel: object) -> bool:
    # A thread is as age-restricted as the channel it is in (Thread.is_nsfw asks its parent).
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def member_role_ids(user: discord.abc.User) -> list[int]:
    return [role.id for role in getattr(user, "roles", [])]
