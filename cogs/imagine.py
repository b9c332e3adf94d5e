"""/imagine, /quota and the result buttons: the Discord side of a generation job."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from cogs import render
from services.images import PreparedImage, prepare_for_upload
from services.jobs import GeneratedImages, JobError, Progress
from services.request import SCHEDULERS, GenerationRequest, RequestValidationError
from services.segmind import InsufficientCredits, JobFailed
from services.store.base import JobRecord, JobState, QuotaRefusal, new_job_id

if TYPE_CHECKING:
    from bot import DreamshaperBot

log = logging.getLogger(__name__)

PROGRESS_EDIT_INTERVAL = 1.5
ASPECTS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "7:9": (896, 1152),
    "9:7": (1152, 896),
    "4:7": (768, 1344),
    "7:4": (1344, 768),
    "2:3": (832, 1216),
    "3:2": (1216, 832),
}
# Interaction-token failures: the 15 minutes passed, or the message was deleted.
UNDELIVERABLE_CODES = {10008, 10015, 50027}

Scheduler = Literal[
    "DDIM",
    "DPM Multi",
    "DPM Single",
    "Euler a",
    "Euler",
    "Heun",
    "DPM2 a Karras",
    "DPM2 Karras",
    "LMS",
    "PNDM",
    "DDPM",
    "UniPC",
]
assert set(Scheduler.__args__) == set(SCHEDULERS)  # type: ignore[attr-defined]


class ProgressMessage:
    """Coalesces progress into at most one edit per interval, however fast events arrive."""

    def __init__(
        self, edit: Callable[[str], Awaitable[Any]], interval: float = PROGRESS_EDIT_INTERVAL
    ) -> None:
        self._edit = edit
        self._interval = interval
        self._pending: str | None = None
        self._shown: str | None = None
        self._last_edit = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def update(self, progress: Progress) -> None:
        if self._closed:
            return
        self._pending = render.progress_text(progress)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending is not None and not self._closed:
            await asyncio.sleep(max(0.0, self._last_edit + self._interval - time.monotonic()))
            text, self._pending = self._pending, None
            if self._closed or text is None or text == self._shown:
                continue
            self._last_edit = time.monotonic()
            try:
                await self._edit(text)
                self._shown = text
            except discord.HTTPException as error:
                log.warning("progress edit failed: %s", error)

    async def finish(self) -> None:
        """Stops progress and waits out the interval, so the final edit keeps the same pace."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.sleep(max(0.0, self._last_edit + self._interval - time.monotonic()))


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"ds:(?P<action>reroll|same|delete|info):(?P<job_id>[A-Za-z0-9_-]{4,40})",
):
    """Result buttons carry the job id, and the job is looked up in the store, so they outlive restarts."""

    LOOK = {
        "reroll": ("Reroll", "🎲", discord.ButtonStyle.primary),
        "same": ("Same seed", "🔁", discord.ButtonStyle.secondary),
        "info": ("Info", "ℹ️", discord.ButtonStyle.secondary),
        "delete": ("Delete", "🗑️", discord.ButtonStyle.danger),
    }

    def __init__(self, action: str, job_id: str) -> None:
        label, emoji, style = self.LOOK[action]
        super().__init__(
            discord.ui.Button(label=label, emoji=emoji, style=style, custom_id=f"ds:{action}:{job_id}")
        )
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button[Any], match: Any, /
    ) -> JobButton:
        return cls(match["action"], match["job_id"])

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = interaction.client.get_cog(Imagine.__cog_name__)  # type: ignore[attr-defined]
        try:
            if isinstance(cog, Imagine):
                await cog.on_button(interaction, self.action, self.job_id)
        except Exception as error:
            await answer_failure(
                interaction, render.unexpected_error_reply(error, f"the {self.action} button")
            )


def result_view(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in ("reroll", "same", "info", "delete"):
        view.add_item(JobButton(action, job_id))
    return view


class Imagine(commands.Cog):
    def __init__(self, bot: DreamshaperBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(JobButton)
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
        aspect=[app_commands.Choice(name=f"{k} ({w}×{h})", value=k) for k, (w, h) in ASPECTS.items()]
    )
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 1500],
        negative_prompt: app_commands.Range[str, 0, 1000] | None = None,
        samples: app_commands.Range[int, 1, 4] | None = None,
        scheduler: Scheduler | None = None,
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
        if await self.bot.jobs.credits_exhausted_until():
            await send_ephemeral(interaction, render.credits_exhausted_reply())
            return
        user = interaction.user
        reservation = await self.bot.quota.reserve(user.id, request.samples, member_role_ids(user))
        if isinstance(reservation, QuotaRefusal):
            await send_ephemeral(interaction, render.quota_refusal_reply(reservation, request.samples))
            return
        try:
            await interaction.response.defer(thinking=True)
        except discord.HTTPException:
            await self.bot.quota.refund(reservation)
            raise
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
        )
        await self.run_job(interaction, job)

    async def run_job(self, interaction: discord.Interaction, job: JobRecord) -> None:
        progress = ProgressMessage(lambda text: interaction.edit_original_response(content=text))
        try:
            generated = await self.bot.jobs.run(job, progress.update)
        except JobError as error:
            await progress.finish()
            await self.report_failure(interaction, error)
            return
        await progress.finish()
        await self.deliver(interaction, generated)

    async def deliver(self, interaction: discord.Interaction, generated: GeneratedImages) -> None:
        request, job = generated.request, generated.job
        prepared = await prepare_for_upload(
            generated.images,
            limit_bytes=interaction.filesize_limit,
            stem=f"dreamshaper_{request.seed}",
        )
        embed = render.result_embed(
            request, inference_time=generated.inference_time, requester=interaction.user.display_name
        )
        try:
            message = await interaction.edit_original_response(
                content=None, embed=embed, attachments=discord_files(prepared), view=result_view(job.id)
            )
        except discord.HTTPException as error:
            if error.code not in UNDELIVERABLE_CODES and not isinstance(error, discord.NotFound):
                raise
            message = await self.deliver_elsewhere(job, embed, prepared)
            if message is None:
                await self.bot.jobs.mark_undeliverable(job, f"HTTP {error.status} code {error.code}")
                return
        await self.bot.jobs.mark_delivered(job, message_id=message.id)

    async def deliver_elsewhere(
        self, job: JobRecord, embed: discord.Embed, prepared: list[PreparedImage]
    ) -> discord.Message | None:
        """The interaction can no longer be edited: post in the channel, pinging only the requester."""
        content = f"<@{job.user_id}>, your images are ready."
        mention_requester = discord.AllowedMentions(users=[discord.Object(job.user_id)])
        targets: list[Callable[[], Awaitable[discord.abc.Messageable]]] = []
        if job.channel_id is not None:
            channel_id = job.channel_id
            targets.append(lambda: self._channel(channel_id))
        targets.append(lambda: self._dm(job.user_id))
        for target in targets:
            try:
                destination = await target()
                return await destination.send(
                    content=content,
                    embed=embed,
                    files=discord_files(prepared),
                    view=result_view(job.id),
                    allowed_mentions=mention_requester,
                )
            except discord.HTTPException as error:
                log.warning("job %s: could not post the result (%s); trying the next place", job.id, error)
        return None

    async def _channel(self, channel_id: int) -> discord.abc.Messageable:
        channel = self.bot.get_channel(channel_id) or await self.bot.fetch_channel(channel_id)
        if not isinstance(channel, discord.abc.Messageable):
            raise discord.NotFound  # type: ignore[call-arg]
        return channel

    async def _dm(self, user_id: int) -> discord.abc.Messageable:
        user = self.bot.get_user(user_id) or await self.bot.fetch_user(user_id)
        return await user.create_dm()

    async def report_failure(self, interaction: discord.Interaction, error: JobError) -> None:
        reply = render.job_failure_reply(error)
        try:
            await interaction.edit_original_response(
                content=reply.text, embed=None, attachments=[], view=None
            )
        except discord.HTTPException as http_error:
            log.warning("job %s: could not show the failure to the member: %s", error.job.id, http_error)
        cause = error.cause
        if isinstance(cause, InsufficientCredits):
            log.error("Segmind says the account is out of credits; new jobs are refused for a while")
            await self.post_mod_log(
                "💳 Segmind reports the bot's account is **out of credits**. Top it up to resume."
            )
        elif isinstance(cause, JobFailed) and cause.is_content_block:
            request = GenerationRequest.from_payload(error.job.request)
            await self.post_mod_log(
                f"🚫 Content filter blocked a prompt from <@{error.job.user_id}> (request `{error.request_id}`):\n"
                f">>> {render.quote_user_text(request.prompt, 1500)}"
            )

    async def post_mod_log(self, text: str) -> None:
        channel_id = self.bot.config.mod_log_channel_id
        if channel_id is None:
            return
        try:
            channel = await self._channel(channel_id)
            await channel.send(
                render.truncate(text, render.MESSAGE_LIMIT), allowed_mentions=discord.AllowedMentions.none()
            )
        except discord.HTTPException as error:
            log.warning("could not post to the mod log channel %d: %s", channel_id, error)

    # -- buttons --

    async def on_button(self, interaction: discord.Interaction, action: str, job_id: str) -> None:
        job = await self.bot.store.get_job(job_id)
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
        await interaction.response.defer()
        await interaction.delete_original_response()
        log.info("job %s: result deleted by %d", job.id, interaction.user.id)


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


def discord_files(prepared: list[PreparedImage]) -> list[discord.File]:
    # A File is consumed by one upload, so every attempt builds fresh ones.
    return [discord.File(io.BytesIO(image.data), filename=image.filename) for image in prepared]


async def answer_failure(interaction: discord.Interaction, reply: render.FailureReply) -> None:
    """Tells the member what went wrong without ever showing a traceback; the log has the details."""
    try:
        if interaction.response.is_done():
            await interaction.edit_original_response(
                content=reply.text, embed=None, attachments=[], view=None
            )
        else:
            await interaction.response.send_message(reply.text, ephemeral=True)
    except discord.HTTPException as error:
        log.warning("could not tell the member about a failure: %s", error)


async def send_ephemeral(interaction: discord.Interaction, text: str) -> None:
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=True)
    else:
        await interaction.response.send_message(text, ephemeral=True)


async def setup(bot: DreamshaperBot) -> None:
    await bot.add_cog(Imagine(bot))
