"""/admin: one command group for a server's admins, every change written to the mod log."""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from cogs import render
from services.moderation.automod import AutoModRule
from services.moderation.chart import MAX_DAYS, images_per_day_chart
from services.moderation.policy import AutoModUnavailable, Moderation
from services.moderation.settings import MAX_ROLE_TIERS, NO_LIMIT, GuildSettings, Scope
from services.moderation.terms import Term, TermError, parse_terms
from services.moderation.usage import summarise

if TYPE_CHECKING:
    from cogs.app import DreamshaperBot

log = logging.getLogger(__name__)

MAX_BAN_HOURS = 24 * 365
MAX_STRIKE_BLOCKS = 100
MAX_DAILY_IMAGES = 100_000
MAX_CONCURRENT_JOBS = 50
AUTOMOD_READ_SECONDS = 2.0
SCOPES = [
    app_commands.Choice(name="everywhere", value=Scope.EVERYWHERE.value),
    app_commands.Choice(name="outside-nsfw", value=Scope.OUTSIDE_NSFW.value),
]


def _guild_id(interaction: discord.Interaction[DreamshaperBot]) -> int:
    if interaction.guild_id is None:  # guild_only: Discord never offers /admin in direct messages
        raise render.Refusal("/admin works in servers only.")
    return interaction.guild_id


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class Admin(commands.GroupCog, group_name="admin", group_description="Set up the bot for this server"):
    """The server's own settings, changed by its admins in Discord and shared by every shard.

    Registered with Manage Server as the default permission and for servers only, so Discord shows it to
    admins alone (a server can grant it to others in its integration settings). Every reply is ephemeral,
    every change goes to the mod log as "<admin> set <what> <before> → <after>", and a bad value is
    refused with a reply that names it.
    """

    blocklist = app_commands.Group(name="blocklist", description="Terms that may not appear in prompts")

    def __init__(self, bot: DreamshaperBot, moderation: Moderation) -> None:
        self.bot = bot
        self.moderation = moderation
        super().__init__()

    async def interaction_check(self, interaction: discord.Interaction[DreamshaperBot]) -> bool:
        # Discord enforces default_member_permissions for the server, but a server can hand /admin to any
        # role; Manage Server is still asked for, so what the command changes stays an admin's to change.
        # The permissions Discord resolved for the member in this channel, sent with the interaction.
        if interaction.guild_id is None or not interaction.permissions.manage_guild:
            raise app_commands.MissingPermissions(["manage_guild"])
        return True

    # -- settings --

    @app_commands.command(name="settings", description="Everything this server has set, at a glance")
    async def settings(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        guild_id = _guild_id(interaction)
        settings = await self.moderation.settings(guild_id)
        bans = await self.moderation.bans(guild_id)
        embed = self._settings_embed(settings, banned=len(bans))
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="modlog", description="Where the bot posts what moderators should see")
    @app_commands.describe(channel="The mod log channel for this server")
    async def modlog(
        self, interaction: discord.Interaction[DreamshaperBot], channel: discord.TextChannel
    ) -> None:
        guild_id = _guild_id(interaction)
        before, _ = await self.moderation.change(guild_id, lambda s: replace(s, modlog_channel_id=channel.id))
        old = before.modlog_channel_id or self.bot.config.mod_log_channel_id
        await self._log_and_reply(
            interaction, f"set the mod log {f'<#{old}>' if old else 'none'} → {channel.mention}"
        )

    @app_commands.command(name="quota", description="This server's limits for each member")
    @app_commands.describe(
        daily="Images per member per day (0: only members with a role tier may generate)",
        concurrent="Jobs a member may have running at once",
        reset="Back to the bot's defaults for both",
    )
    async def quota(
        self,
        interaction: discord.Interaction[DreamshaperBot],
        daily: app_commands.Range[int, 0, MAX_DAILY_IMAGES] | None = None,
        concurrent: app_commands.Range[int, 1, MAX_CONCURRENT_JOBS] | None = None,
        reset: bool = False,
    ) -> None:
        if reset and (daily is not None or concurrent is not None):
            raise render.Refusal("Give `reset` alone, or `daily` and `concurrent` without it.")
        if not reset and daily is None and concurrent is None:
            raise render.Refusal("Give `daily`, `concurrent` or both; /admin settings shows what is set now.")

        def edit(settings: GuildSettings) -> GuildSettings:
            if reset:
                return replace(settings, daily_images=None, max_concurrent=None)
            return replace(
                settings,
                daily_images=settings.daily_images if daily is None else daily,
                max_concurrent=settings.max_concurrent if concurrent is None else concurrent,
            )

        before, after = await self.moderation.change(_guild_id(interaction), edit)
        defaults = self.bot.config
        changes = []
        if before.daily_images != after.daily_images or daily is not None:
            old = _or(before.daily_images, defaults.quota_daily_images)
            changes.append(f"the daily images {old} → {_or(after.daily_images, defaults.quota_daily_images)}")
        if before.max_concurrent != after.max_concurrent or concurrent is not None:
            old = _or(before.max_concurrent, defaults.quota_max_concurrent)
            changes.append(
                f"the jobs at once {old} → {_or(after.max_concurrent, defaults.quota_max_concurrent)}"
            )
        if not changes:
            raise render.Refusal("This server already has the bot's defaults.")
        ceiling = defaults.quota_server_max_daily_images
        note = ""
        if ceiling is not None and (after.daily_images or 0) > ceiling:
            note = f" (the bot's operator caps it at {ceiling} a day)"
        await self._log_and_reply(interaction, "set " + " and ".join(changes), note=note)

    @app_commands.command(name="role", description="A daily limit for members with a role")
    @app_commands.describe(
        role="The role",
        daily="Images per day for its members (0: may not generate, -1: no limit; leave out to remove)",
    )
    async def role(
        self,
        interaction: discord.Interaction[DreamshaperBot],
        role: discord.Role,
        daily: app_commands.Range[int, NO_LIMIT, MAX_DAILY_IMAGES] | None = None,
    ) -> None:
        guild_id = _guild_id(interaction)
        if role.id == guild_id:
            raise render.Refusal("@everyone is every member: set its limit with /admin quota.")

        def edit(settings: GuildSettings) -> GuildSettings:
            tiers = dict(settings.role_tiers)
            if daily is None:
                tiers.pop(role.id, None)
            else:
                tiers[role.id] = daily
            if len(tiers) > MAX_ROLE_TIERS:
                raise render.Refusal(f"A server can have at most {MAX_ROLE_TIERS} role tiers.")
            return replace(settings, role_tiers=tiers)

        before, _ = await self.moderation.change(guild_id, edit)
        old = before.role_tiers.get(role.id)
        if daily is None and old is None:
            raise render.Refusal(f"{role.mention} has no tier here.")
        ceiling = self.bot.config.quota_server_max_daily_images
        capped = ceiling is not None and daily is not None and (daily == NO_LIMIT or daily > ceiling)
        await self._log_and_reply(
            interaction,
            f"set the daily images of {role.mention} {_tier(old)} → {_tier(daily)}",
            note=f" (the bot's operator caps it at {ceiling} a day)" if capped else "",
        )

    @app_commands.command(
        name="automod", description="Also apply this server's AutoMod keyword rules to prompts"
    )
    @app_commands.describe(
        enabled="On: prompts are checked against the AutoMod keyword rules that block messages"
    )
    async def automod(self, interaction: discord.Interaction[DreamshaperBot], enabled: bool) -> None:
        guild_id = _guild_id(interaction)
        note = ""
        if enabled:
            # Read now, so an admin hears at once when the bot cannot (it needs Manage Server).
            try:
                async with asyncio.timeout(AUTOMOD_READ_SECONDS):  # the answer is due within 3 s
                    rules = await self.moderation.load_automod_rules(guild_id)
            except AutoModUnavailable as error:
                raise render.Refusal(f"AutoMod rules can't be applied: {error}.") from None
            except TimeoutError:
                raise render.Refusal(
                    "Discord did not send the AutoMod rules in time; please try again."
                ) from None
            note = f" ({rules} rule(s) that block messages apply to prompts; members with Manage Server are exempt)"
        before, _ = await self.moderation.change(guild_id, lambda s: replace(s, automod=enabled))
        await self._log_and_reply(
            interaction, f"set the AutoMod rules {_on(before.automod)} → {_on(enabled)}", note=note
        )

    @commands.Cog.listener()
    async def on_automod_rule_create(self, rule: discord.AutoModRule) -> None:
        self.moderation.put_automod_rule(rule.guild.id, rule.id, AutoModRule.from_payload(rule.to_dict()))

    @commands.Cog.listener()
    async def on_automod_rule_update(self, rule: discord.AutoModRule) -> None:
        self.moderation.put_automod_rule(rule.guild.id, rule.id, AutoModRule.from_payload(rule.to_dict()))

    @commands.Cog.listener()
    async def on_automod_rule_delete(self, rule: discord.AutoModRule) -> None:
        self.moderation.put_automod_rule(rule.guild.id, rule.id, None)

    @app_commands.command(
        name="strikes", description="Ban members automatically after repeated blocked prompts"
    )
    @app_commands.describe(blocks="Blocked prompts within 24 hours that ban (0: off)", hours="For how long")
    async def strikes(
        self,
        interaction: discord.Interaction[DreamshaperBot],
        blocks: app_commands.Range[int, 0, MAX_STRIKE_BLOCKS],
        hours: app_commands.Range[int, 1, MAX_BAN_HOURS] = 24,
    ) -> None:
        on = blocks > 0
        before, _ = await self.moderation.change(
            _guild_id(interaction),
            lambda s: replace(s, strike_blocks=blocks if on else None, strike_hours=hours if on else None),
        )
        old = _strikes(before)
        new = f"{blocks} blocks in 24 h → banned {hours} h" if on else "off"
        await self._log_and_reply(interaction, f"set the strikes {old} → {new}")

    @app_commands.command(name="ban", description="Stop a member from using the bot here")
    @app_commands.describe(member="The member", hours="For how long (default: until lifted)", reason="Why")
    async def ban(
        self,
        interaction: discord.Interaction[DreamshaperBot],
        member: discord.User,
        hours: app_commands.Range[int, 1, MAX_BAN_HOURS] | None = None,
        reason: app_commands.Range[str, 1, 300] | None = None,
    ) -> None:
        if member.bot:
            raise render.Refusal(f"{member.mention} is a bot; there is nothing to ban.")
        ban = await self.moderation.ban(
            _guild_id(interaction), member.id, hours=hours, reason=reason or "", by_id=interaction.user.id
        )
        await self._log_and_reply(
            interaction, f"banned {member.mention} {render.ban_end(ban)}" + (f" ({reason})" if reason else "")
        )

    @app_commands.command(name="unban", description="Lift a member's ban")
    @app_commands.describe(member="The member")
    async def unban(self, interaction: discord.Interaction[DreamshaperBot], member: discord.User) -> None:
        if not await self.moderation.unban(_guild_id(interaction), member.id):
            raise render.Refusal(f"{member.mention} is not banned here.")
        await self._log_and_reply(interaction, f"lifted the ban of {member.mention}")

    @app_commands.command(name="bans", description="Who may not use the bot here, and until when")
    async def bans(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        bans = await self.moderation.bans(_guild_id(interaction))
        if not bans:
            await interaction.response.send_message("Nobody is banned here.", ephemeral=True)
            return
        lines = [
            f"<@{ban.user_id}> {render.ban_end(ban)}"
            + (f" by <@{ban.by_id}>" if ban.by_id else " (strikes)")
            + (f": {render.quote_user_text(ban.reason, 200)}" if ban.reason else "")
            for ban in bans
        ]
        embed = discord.Embed(
            title=f"Banned here ({len(lines)})", description=render.truncate("\n".join(lines), 4000)
        )
        await interaction.response.send_message(embed=embed, ephemeral=True)

    # -- usage --

    @app_commands.command(name="usage", description="What this server used: images, jobs, blocks, GPU time")
    @app_commands.describe(days="How many days back, today included (default 7)")
    async def usage(
        self, interaction: discord.Interaction[DreamshaperBot], days: app_commands.Range[int, 1, MAX_DAYS] = 7
    ) -> None:
        guild_id = _guild_id(interaction)
        # The read and the chart may take longer than the 3 s an answer allows on a busy store.
        await interaction.response.defer(ephemeral=True, thinking=True)
        today = datetime.now(UTC).date()
        first = today - timedelta(days=days - 1)
        rows = await self.bot.store.usage_between(guild_id, first.isoformat(), today.isoformat())
        report = summarise(rows, first, today)
        title = f"Images per day, {first:%d %b} to {today:%d %b %Y} (UTC)"  # the default font has no dashes
        chart = await asyncio.to_thread(images_per_day_chart, report.images_per_day, title=title)
        embed = render.usage_embed(report, days=days, price=self.bot.config.segmind_price_per_gpu_second)
        embed.set_image(url="attachment://usage.png")
        await interaction.followup.send(
            embed=embed, file=discord.File(io.BytesIO(chart), filename="usage.png"), ephemeral=True
        )

    # -- blocklist --

    @blocklist.command(
        name="add", description="Block terms (comma-separated; word, prefix*, *suffix, *anywhere*)"
    )
    @app_commands.describe(
        terms="Terms, comma-separated",
        scope="everywhere (the default), or outside-nsfw: allowed in age-restricted channels",
    )
    @app_commands.choices(scope=SCOPES)
    async def blocklist_add(
        self,
        interaction: discord.Interaction[DreamshaperBot],
        terms: app_commands.Range[str, 1, 1000],
        scope: app_commands.Choice[str] | None = None,
    ) -> None:
        where = Scope(scope.value) if scope is not None else Scope.EVERYWHERE
        parsed = _terms(terms)
        await self.moderation.change(_guild_id(interaction), lambda s: _with_terms(s, parsed, where))
        listed = ", ".join(f"`{term.text}`" for term in parsed)
        await self._log_and_reply(interaction, f"blocked {listed} ({where.value})")

    @blocklist.command(name="remove", description="Unblock terms (comma-separated, as they were added)")
    @app_commands.describe(terms="Terms, comma-separated")
    async def blocklist_remove(
        self, interaction: discord.Interaction[DreamshaperBot], terms: app_commands.Range[str, 1, 1000]
    ) -> None:
        texts = [text for text in (part.strip() for part in terms.split(",")) if text]
        missing: list[str] = []

        def edit(settings: GuildSettings) -> GuildSettings:
            changed, not_there = settings.without_terms(texts)
            missing[:] = not_there
            return changed

        await self.moderation.change(_guild_id(interaction), edit)
        removed = [text for text in texts if text not in missing]
        if not removed:
            raise render.Refusal(f"None of these are on the blocklist: {', '.join(f'`{t}`' for t in texts)}.")
        note = f" (not on the list: {', '.join(f'`{t}`' for t in missing)})" if missing else ""
        await self._log_and_reply(interaction, f"unblocked {', '.join(f'`{t}`' for t in removed)}", note=note)

    @blocklist.command(name="list", description="The blocked terms")
    async def blocklist_list(self, interaction: discord.Interaction[DreamshaperBot]) -> None:
        settings = await self.moderation.settings(_guild_id(interaction))
        if not settings.blocked:
            await interaction.response.send_message("Nothing is blocked here yet.", ephemeral=True)
            return
        lines = [
            f"`{entry.term.text}`" + ("" if entry.scope is Scope.EVERYWHERE else " (outside age-restricted)")
            for entry in settings.blocked
        ]
        embed = discord.Embed(
            title=f"Blocked terms ({len(lines)})", description=render.truncate(", ".join(lines), 4000)
        )
        await interaction.response.send_message(embed=embed, ephemeral=True)

    # -- replies and the mod log --

    async def _log_and_reply(
        self, interaction: discord.Interaction[DreamshaperBot], what: str, *, note: str = ""
    ) -> None:
        log.info("server %s: %s %s", interaction.guild_id, interaction.user.id, what)
        # The admin's answer first (within Discord's 3 s); the mod log may wait out a rate limit.
        await interaction.response.send_message(
            render.truncate(f"Done: {what}{note}.", render.MESSAGE_LIMIT), ephemeral=True
        )
        modlog = self.bot.modlog
        self.bot.in_background(
            modlog.post_text(f"{interaction.user.mention} {what}", guild_id=interaction.guild_id)
        )

    def _settings_embed(self, settings: GuildSettings, *, banned: int) -> discord.Embed:
        defaults = self.bot.config
        embed = discord.Embed(title="This server's settings")
        daily = _or(settings.daily_images, defaults.quota_daily_images)
        ceiling = defaults.quota_server_max_daily_images
        capped = (
            f" (capped at {ceiling} by the bot's operator)" if ceiling is not None and daily > ceiling else ""
        )
        embed.add_field(name="Images per member per day", value=f"{daily}{capped}")
        embed.add_field(
            name="Jobs at once", value=str(_or(settings.max_concurrent, defaults.quota_max_concurrent))
        )
        tiers = (
            ", ".join(f"<@&{role}>: {_tier(daily)}" for role, daily in settings.role_tiers.items()) or "none"
        )
        embed.add_field(name="Role tiers", value=render.truncate(tiers, 1000), inline=False)
        embed.add_field(name="Blocked terms", value=f"{len(settings.blocked)} (/admin blocklist list)")
        embed.add_field(name="AutoMod rules applied", value="yes" if settings.automod else "no")
        embed.add_field(name="Strikes", value=_strikes(settings))
        embed.add_field(name="Banned members", value=f"{banned} (/admin bans)")
        channel = settings.modlog_channel_id or defaults.mod_log_channel_id
        embed.add_field(name="Mod log", value=f"<#{channel}>" if channel else "not set")
        return embed


def _terms(text: str) -> list[Term]:
    try:
        return parse_terms(text)
    except TermError as error:
        raise render.Refusal(f"{error}.") from None


def _with_terms(settings: GuildSettings, terms: list[Term], scope: Scope) -> GuildSettings:
    try:
        return settings.with_terms(terms, scope)
    except TermError as error:
        raise render.Refusal(f"{error}.") from None


def _strikes(settings: GuildSettings) -> str:
    if settings.strike_blocks and settings.strike_hours:
        return f"{settings.strike_blocks} blocks in 24 h → banned {settings.strike_hours} h"
    return "off"


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _on(value: bool) -> str:
    return "on" if value else "off"


def _tier(daily: int | None) -> str:
    if daily is None:
        return "none"
    return "no limit" if daily == NO_LIMIT else "may not generate" if daily == 0 else f"{daily} a day"
