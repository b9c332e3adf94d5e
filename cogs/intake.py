"""Taking a job in: the checks, the quota reservation and the saved record, all within Discord's 3 s.

/imagine and the Reroll and Same seed buttons start jobs the same way; once its record is saved, a job
belongs to the job runner, in this process or whichever one resumes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import discord

from cogs import render
from cogs.answers import before_answering, send_ephemeral
from services.request import GenerationRequest
from services.store.base import JobRecord, JobState, QuotaRefusal, new_job_id
from services.store.guarded import StoreUnavailable

if TYPE_CHECKING:
    from cogs.app import DreamshaperBot

log = logging.getLogger(__name__)

# The event loop holds tasks only weakly; these refunds must not be collected before they run.
_refunds: set[asyncio.Task[None]] = set()


async def start_job(
    interaction: discord.Interaction[DreamshaperBot], request: GenerationRequest, *, origin: str
) -> None:
    """Checks, reserves quota and acknowledges within Discord's 3 s, before any call to Segmind."""
    bot = interaction.client
    if not bot.accepting_jobs:
        await send_ephemeral(interaction, "🔄 The bot is restarting; please try again in a minute.")
        return
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
    try:
        await interaction.response.defer(thinking=True)
    except BaseException:
        await bot.jobs.abandon(outcome, "the interaction could not be acknowledged")
        raise
    bot.runner.start(outcome)


async def _record_job(
    interaction: discord.Interaction[DreamshaperBot], request: GenerationRequest, origin: str
) -> JobRecord | str:
    """The saved job, or the refusal to show the member."""
    bot = interaction.client
    if await bot.jobs.credits_exhausted_until():
        return render.credits_exhausted_reply()
    user = interaction.user
    reservation = await bot.quota.reserve(user.id, request.samples, member_role_ids(user))
    if isinstance(reservation, QuotaRefusal):
        return render.quota_refusal_reply(reservation, request.samples)
    now = time.time()
    job = JobRecord(
        id=new_job_id(),
        user_id=user.id,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        request=request.to_payload(),
        reservation_id=reservation.id,
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
    # Saved before Discord shows "thinking…": from this record on, the job and its reservation belong
    # to whichever process runs it, even if this one dies a millisecond later.
    try:
        await bot.store.save_job(job)
    except BaseException:
        # Given back in the background so the member's answer is not held up by the store that just
        # failed; if that fails too, the sweep refunds reservations no saved job owns.
        refund = asyncio.create_task(_refund_quietly(bot, reservation.id))
        _refunds.add(refund)
        refund.add_done_callback(_refunds.discard)
        raise
    return job


async def _refund_quietly(bot: DreamshaperBot, reservation_id: str) -> None:
    try:
        await bot.quota.refund(reservation_id)
    except StoreUnavailable as error:
        log.warning("reservation %s: not refunded yet (%s); the sweep will", reservation_id, error)


def member_role_ids(user: discord.abc.User) -> list[int]:
    return [role.id for role in getattr(user, "roles", [])]
