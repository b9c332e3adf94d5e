"""/imagine, /quota and /jobs: the commands a member uses to generate images and follow them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from cogs import render
from cogs.answers import before_answering, send_ephemeral
from cogs.buttons import ResendButton, can_resend
from cogs.intake import BAN_CHECKED_WHEN_RESERVED, member_role_ids, start_job
from services.request import SCHEDULERS, GenerationRequest, RequestValidationError

if TYPE_CHECKING:
    from cogs.app import DreamshaperBot

PROMPT_MAX = 1500
NEGATIVE_MAX = 1000
ASPECTS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "7:9": (896, 1152),
    "9:7": (1152, 896),
    "4:7": (768, 1344),
    "7:4": (1344, 768),
    "2:3": (832, 1216),
    "3:2": (1216, 832),
}


class Imagine(commands.Cog):
    def __init__(self, bot: DreamshaperBot) -> None:
        self.bot = bot

    @app_commands.command(
        name="imagine",
        description="Generate images with Dreamshaper SDXL",
        extras={BAN_CHECKED_WHEN_RESERVED: True},
    )
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
        interaction: discord.Interaction[DreamshaperBot],
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
        await start_job(interaction, request, origin="command")

    @app_commands.command(name="quota", description="Show how many images you have left")
    async def quota(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        guild_id = interaction.guild_id
        async with before_answering():
            settings = None if guild_id is None else await self.bot.moderation.settings(guild_id)
            limits = self.bot.quota.limits_for(member_role_ids(interaction.user), settings)
            usage = (
                None if limits is None else await self.bot.quota.usage(interaction.user.id, guild_id, limits)
            )
        if usage is None:
            await send_ephemeral(interaction, render.may_not_generate_reply())
            return
        await interaction.response.send_message(embed=render.quota_usage_embed(usage), ephemeral=True)

    @app_commands.command(
        name="jobs", description="Your recent image requests, and results that could not be posted"
    )
    async def jobs(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        async with before_answering():
            jobs = await self.bot.store.recent_jobs(interaction.user.id, limit=10)
        view = discord.ui.View(timeout=None)
        for job in jobs:
            if can_resend(job) and len(view.children) < 5:
                view.add_item(ResendButton(job.id))
        await interaction.response.send_message(
            embed=render.jobs_embed(jobs),
            view=view if view.children else discord.utils.MISSING,
            ephemeral=True,
        )


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
