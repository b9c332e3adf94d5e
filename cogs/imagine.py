"""/imagine, /quota and the result buttons: the Discord side of a generation job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from cogs import render
from cogs.delivery import JobButton, JobMessage, answer_failure
from services.jobs import JobError
from services.request import SCHEDULERS, GenerationRequest, RequestValidationError
from services.store.base import JobRecord, JobState, QuotaRefusal, new_job_id
from services.store.guarded import StoreUnavailable

if TYPE_CHECKING:
    from bot import DreamshaperBot

log = logging.getLogger(__name__)

PROMPT_MAX = 1500
NEGATIVE_MAX = 1000
# Store work an interaction waits on before its answer; twice this still leaves time within Discord's 3 s.
ACK_STORE_SECONDS = 1.2
ASPECTS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "7:9": (896, 1152),
    "9:7": (1152, 896),
    "4:7": (768, 1344),
    "7:4": (1344, 768),
    "2:3": (832, 1216),
    "3:2": (1216, 832),
}


@contextlib.asynccontextmanager
async def before_answering() -> AsyncIterator[None]:
    """Bounds store work that an interaction's first answer waits on, so a stuck store still gets a reply."""
    try:
        async with asyncio.timeout(ACK_STORE_SECONDS):
            yield
    except TimeoutError:
        raise StoreUnavailable(f"the store did not answer within {ACK_STORE_SECONDS:g} s") from None


class Imagine(commands.Cog):
    def __init__(self, bot: DreamshaperBot) -> None:
        self.bot = bot
        self._background: set[asyncio.Task[None]] = set()

    async def cog_load(self) -> None:
        self.bot.tree.on_error = self.on_app_command_error  # type: ignore[method-assign]

    async def on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        command = interaction.command.qualified_name if interaction.command else "a command"
        await answer_failure(interaction, render.app_command_error_reply(error, f"/{command}"))

    # -- commands --

    @app_commands.command(name="imagine", description="Generate images with Dreamshaper SDXL")
    @app_commands.describe(
        prompt="What to draw",
        negative_prompt="What to keep out of the image",
        samples="How many images (1-4)",
        scheduler="The sampler (default UniPC)",
        steps="Denoising steps, 20-100 (default 30): more is slower and often finer",
        guidance="How closely to follow the prompt, 1-25 (default 7.5)",
        seed="-1 for random; reuse a seed to reproduce an image",
        width="Width in pixels, 512-2048, a multiple of 8 (overrides aspect)",
        height="Height in pixels, 512-2048, a multiple of 8 (overrides aspect)",
        aspect="Preset size, used when width and height are not given (default 1:1)",
    )
    @app_commands.choices(
        scheduler=[app_commands.Choice(name=name, value=name) for name in SCHEDULERS],
        aspect=[app_commands.Choice(name=f"{k} ({w}×{h})", value=k) for k, (w, h) in ASPECTS.items()],
    )
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, PROMPT_MAX],
        negative_prompt: app_commands.Range[str, 0, NEGATIVE_MAX] | None = None,
        samples: app_commands.Range[int, 1, 4] | None = None,
        scheduler: str | None = None,
        steps: app_commands.Range[int, 20, 100] | None = None,
        guidance: app_commands.Range[float, 1.0, 25.0] | None = None,
        seed: app_commands.Range[int, -1, 999_999_999_999_999] | None = None,
        width: app_commands.Range[int, 512, 2048] | None = None,
        height: app_commands.Range[int, 512, 2048] | None = None,
        aspect: str | None = None,
    ) -> None:
        try:
            request = build_request(
                prompt=prompt,
                negative_prompt=negative_prompt,
                samples=samples,
                scheduler=scheduler,
                steps=steps,
                guidance=guidance,
                seed=seed,
                width=width,
                height=height,
                aspect=aspect,
            )
        except RequestValidationError as error:
            await send_ephemeral(interaction, render.validation_reply(error))
            return
        await self.start_job(interaction, request, origin="command")

    @app_commands.command(name="quota", description="Show how many images you have left")
    async def quota(self, interaction: discord.Interaction) -> None:
        async with before_answering():
            usage = await self.bot.quota.usage(interaction.user.id)
        exempt = self.bot.quota.is_exempt(member_role_ids(interaction.user))
        await interaction.response.send_message(
            embed=render.quota_usage_embed(usage, exempt=exempt), ephemeral=True
        )

    # -- the job --

    async def start_job(
        self, interaction: discord.Interaction, request: GenerationRequest, *, origin: str
    ) -> None:
        """Checks, reserves quota and acknowledges within Discord's 3 s, before any call to Segmind."""
        if not self.bot.accepting_jobs:
            await send_ephemeral(interaction, "🔄 The bot is restarting; please try again in a minute.")
            return
        try:
            async with before_answering():
                outcome = await self._record_job(interaction, request, origin)
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
            await self.bot.jobs.abandon(outcome, "the interaction could not be acknowledged")
            raise
        self.bot.runner.start(outcome)

    async def _record_job(
        self, interaction: discord.Interaction, request: GenerationRequest, origin: str
    ) -> JobRecord | str:
        """The saved job, or the refusal to show the member."""
        if await self.bot.jobs.credits_exhausted_until():
            return render.credits_exhausted_reply()
        user = interaction.user
        reservation = await self.bot.quota.reserve(user.id, request.samples, member_role_ids(user))
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
            await self.bot.store.save_job(job)
        except BaseException:
            # Given back in the background so the member's answer is not held up by the store that just
            # failed; if that fails too, the sweep refunds reservations no saved job owns.
            refund = asyncio.create_task(self._refund_quietly(reservation.id))
            self._background.add(refund)
            refund.add_done_callback(self._background.discard)
            raise
        return job

    async def _refund_quietly(self, reservation_id: str) -> None:
        try:
            await self.bot.quota.refund(reservation_id)
        except StoreUnavailable as error:
            log.warning("reservation %s: not refunded yet (%s); the sweep will", reservation_id, error)

    # -- buttons --

    async def on_button(self, interaction: discord.Interaction, action: str, job_id: str) -> None:
        async with before_answering():
            job = await self.bot.store.get_job(job_id)
        if job is None and action == "delete" and may_delete_unrecorded(interaction):
            await self.delete_message(interaction, job_id)
            return
        if job is None:
            await send_ephemeral(interaction, "This result is too old; its settings are no longer kept.")
            return
        request = GenerationRequest.from_payload(job.request)
        if action == "info":
            await interaction.response.send_message(
                embed=render.info_embed(request, job.segmind_request_id), ephemeral=True
            )
        elif action == "delete":
            await self.delete_result(interaction, job)
        elif action == "resend":
            await self.resend(interaction, job)
        elif action == "reroll":
            await self.start_job(interaction, request.with_new_seed(), origin="reroll")
        else:
            await self.start_job(interaction, request, origin="same_seed")

    async def delete_result(self, interaction: discord.Interaction, job: JobRecord) -> None:
        permissions = interaction.permissions
        if interaction.user.id != job.user_id and not permissions.manage_messages:
            await send_ephemeral(
                interaction, "Only the member who asked for these images, or a moderator, can delete them."
            )
            return
        await self.delete_message(interaction, job.id)

    async def delete_message(self, interaction: discord.Interaction, job_id: str) -> None:
        await interaction.response.defer()
        await interaction.delete_original_response()
        log.info("job %s: result deleted by %d", job_id, interaction.user.id)

    @app_commands.command(
        name="jobs", description="Your recent image requests, and results that could not be posted"
    )
    async def jobs(self, interaction: discord.Interaction) -> None:
        async with before_answering():
            jobs = await self.bot.store.recent_jobs(interaction.user.id, limit=10)
        view = discord.ui.View(timeout=None)
        for job in jobs:
            if can_resend(job) and len(view.children) < 5:
                view.add_item(JobButton("resend", job.id))
        await interaction.response.send_message(
            embed=render.jobs_embed(jobs),
            view=view if view.children else discord.utils.MISSING,
            ephemeral=True,
        )

    async def resend(self, interaction: discord.Interaction, job: JobRecord) -> None:
        """Delivers a finished job's images into this interaction, for results that could not be posted."""
        if interaction.user.id != job.user_id:
            await send_ephemeral(
                interaction, "Only the member who asked for these images can have them resent."
            )
            return
        async with contextlib.AsyncExitStack() as held:
            # The lease and a fresh read make a second press (or another process) see it already resent.
            async with before_answering():
                lease = await held.enter_async_context(self.bot.jobs.lease(job.id))
                current = await self.bot.store.get_job(job.id) if lease else None
            if current is None or not can_resend(current):
                await send_ephemeral(interaction, "These images have already been posted: see `/jobs`.")
                return
            await interaction.response.defer(thinking=True)
            try:
                generated = await self.bot.jobs.recover_images(
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
            await self.bot.runner.deliver(
                JobMessage(self.bot, resent), replace(generated, job=resent), lease
            )


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


def build_request(
    *,
    prompt: str,
    negative_prompt: str | None,
    samples: int | None,
    scheduler: str | None,
    steps: int | None,
    guidance: float | None,
    seed: int | None,
    width: int | None,
    height: int | None,
    aspect: str | None,
) -> GenerationRequest:
    """Omitted options take the API's defaults; the size comes from width/height, else the aspect preset."""
    # Discord's client enforces these lengths, but a raw interaction can carry any text.
    for name, text, limit in (
        ("prompt", prompt, PROMPT_MAX),
        ("negative_prompt", negative_prompt, NEGATIVE_MAX),
    ):
        if isinstance(text, str) and len(text) > limit:
            raise RequestValidationError(name, f"{len(text)} characters", f"at most {limit} characters")
    if aspect is not None and aspect not in ASPECTS:
        raise RequestValidationError("aspect", aspect, f"one of {', '.join(ASPECTS)}")
    preset_width, preset_height = ASPECTS[aspect or "1:1"]
    fields: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "samples": samples,
        "scheduler": scheduler,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "img_width": preset_width if width is None else width,
        "img_height": preset_height if height is None else height,
    }
    return GenerationRequest.from_payload(
        {name: value for name, value in fields.items() if value is not None}
    )


def member_role_ids(user: discord.abc.User) -> list[int]:
    return [role.id for role in getattr(user, "roles", [])]


async def send_ephemeral(interaction: discord.Interaction, text: str) -> None:
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=True)
    else:
        await interaction.response.send_message(text, ephemeral=True)


async def setup(bot: DreamshaperBot) -> None:
    await bot.add_cog(Imagine(bot))
