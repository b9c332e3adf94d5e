"""What members see: progress lines, the result embed, and the one mapping from errors to replies."""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass

import discord
from discord.app_commands import AppCommandError, MissingPermissions, TransformerError

from services.jobs import DownloadFailed, JobError, Progress, ProgressKind, SubmitInterrupted
from services.moderation.usage import UsageReport
from services.request import GenerationRequest, RequestValidationError
from services.segmind import (
    BadRequest,
    Forbidden,
    InsufficientCredits,
    JobFailed,
    JobTimeout,
    NotAcceptable,
    NotFound,
    RateLimited,
    Unauthorized,
)
from services.store.base import UNLIMITED, Ban, JobRecord, JobState, QuotaRefusal, QuotaUsage
from services.store.guarded import StoreUnavailable

log = logging.getLogger(__name__)

EMBED_DESCRIPTION_LIMIT = 4096
EMBED_FIELD_LIMIT = 1024
MESSAGE_LIMIT = 2000
# Estimates shown to members move in steps of this many seconds.
ETA_ROUNDING = 5

# The API's parameter names, as the /imagine options call them.
OPTION_NAMES = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "samples": "samples",
    "scheduler": "scheduler",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "seed": "seed",
    "img_width": "width",
    "img_height": "height",
}


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quote_user_text(text: str, limit: int) -> str:
    """User text echoed back: markdown escaped so a prompt cannot format (or break) the message."""
    escaped = discord.utils.escape_markdown(text)
    escaped = escaped if len(escaped) <= limit else discord.utils.escape_markdown(text[: limit // 2]) + "…"
    return truncate(escaped, limit)


def relative_time(epoch: float) -> str:
    return f"<t:{int(epoch)}:R>"


def try_again_at(epoch: float) -> str:
    """A time the member's own client shows in their time zone, with how far off it is."""
    return f"at <t:{math.ceil(epoch)}:T> ({relative_time(math.ceil(epoch))})"


def progress_text(progress: Progress) -> str:
    if progress.kind is ProgressKind.WAITING_FOR_SLOT:
        line = f"⏳ Waiting for a turn at Segmind: {ordinal(progress.position or 1)} in line."
        return line + ready_by(progress.ready_at)
    if progress.kind is ProgressKind.RATE_LIMITED:
        when = relative_time(progress.retry_at) if progress.retry_at else "shortly"
        return f"⏳ Segmind is busy; waiting for a slot (next try {when})."
    if progress.kind is ProgressKind.QUEUED:
        return f"📨 Queued… ({progress.elapsed:.0f} s){ready_by(progress.ready_at)}"
    return f"🎨 Generating… {progress.elapsed:.0f} s{ready_by(progress.ready_at)}"


def ready_by(epoch: float | None) -> str:
    """The estimate as a timestamp the member's client counts down itself, so it needs no edits; rounded
    so that small changes in the estimate do not cost one either."""
    if epoch is None:
        return ""
    rounded = math.ceil(epoch / ETA_ROUNDING) * ETA_ROUNDING
    return f" Ready {relative_time(rounded)} (estimate)."


def ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def add_request_fields(embed: discord.Embed, request: GenerationRequest) -> None:
    if request.negative_prompt:
        embed.add_field(
            name="Negative prompt",
            value=quote_user_text(request.negative_prompt, EMBED_FIELD_LIMIT),
            inline=False,
        )
    for name, value in describe_request(request):
        embed.add_field(name=name, value=value)


def describe_request(request: GenerationRequest) -> list[tuple[str, str]]:
    return [
        ("Scheduler", request.scheduler),
        ("Steps", str(request.num_inference_steps)),
        ("Guidance", f"{request.guidance_scale:g}"),
        ("Size", f"{request.img_width}×{request.img_height}"),
        ("Seed", f"`{request.seed}`"),
        ("Images", str(request.samples)),
    ]


def result_embed(
    request: GenerationRequest, *, inference_time: float | None, requester: str
) -> discord.Embed:
    embed = discord.Embed(
        title="Dreamshaper SDXL",
        description=quote_user_text(request.prompt, EMBED_DESCRIPTION_LIMIT),
        colour=discord.Colour.blurple(),
    )
    add_request_fields(embed, request)
    if inference_time is not None:
        embed.add_field(name="Inference", value=f"{inference_time:.1f} s")
    embed.set_footer(text=truncate(f"Requested by {requester}", 200))
    return embed


def imagine_command_line(request: GenerationRequest) -> str:
    """A /imagine line that re-creates the request; quotes are not needed by Discord's option parser."""
    defaults = GenerationRequest(prompt=request.prompt)
    parts = [f"/imagine prompt:{request.prompt}"]
    for field, option in OPTION_NAMES.items():
        value = getattr(request, field)
        if field != "prompt" and (field == "seed" or value != getattr(defaults, field)):
            parts.append(f"{option}:{value:g}" if isinstance(value, float) else f"{option}:{value}")
    return " ".join(parts)


def info_embed(request: GenerationRequest, request_id: str | None) -> discord.Embed:
    embed = discord.Embed(title="Generation parameters", colour=discord.Colour.dark_grey())
    embed.add_field(name="Prompt", value=quote_user_text(request.prompt, EMBED_FIELD_LIMIT), inline=False)
    add_request_fields(embed, request)
    if request_id:
        embed.add_field(name="Segmind request", value=f"`{request_id}`", inline=False)
    line = imagine_command_line(request).replace("```", "'''")
    embed.description = f"Copy to run it again:\n```\n{truncate(line, 3900)}\n```"
    return embed


def typed_value_span(value: object, limit: int = 60) -> str:
    """An option's value as the member typed it, in a code span that no backtick in the value can close.

    Nothing is escaped: markdown is not read inside a code span, so an escape would show as a backslash.
    Resolved options (a member, a channel, a role) show their name, or their id when they have none.
    """
    if not isinstance(value, str | int | float):
        name = getattr(value, "name", None)
        value = name if isinstance(name, str) else getattr(value, "id", value)
    text = truncate(" ".join(str(value).splitlines()), limit)
    if not text:
        return "(empty)"
    # Discord closes a code span only on a backtick run as long as the one that opened it, so the fence is
    # one longer than any run in the value. A backtick at either end would join the fence: a space keeps
    # them apart, and Discord drops a space that sits between a fence and a backtick.
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    before = " " if text.startswith("`") else ""
    after = " " if text.endswith("`") else ""
    return f"{fence}{before}{text}{after}{fence}"


def validation_reply(error: RequestValidationError) -> str:
    option = OPTION_NAMES.get(error.field, error.field)
    allowed = error.allowed.replace("img_width", "width").replace("img_height", "height")
    return truncate(f"❌ `{option}` can't be {typed_value_span(error.value)}: it must be {allowed}.", 1900)


def quota_refusal_reply(refusal: QuotaRefusal, requested: int) -> str:
    if refusal.reason == "concurrent":
        return (
            f"🕒 You already have {refusal.in_flight} generation(s) running; wait for one to finish. "
            f"You have {refusal.remaining_images} image(s) left today."
        )
    when = f" More become available {relative_time(refusal.resets_at)}." if refusal.resets_at else ""
    return (
        f"🧮 You asked for {requested} image(s) but have {refusal.remaining_images} left in your 24-hour quota."
        f"{when}"
    )


def quota_usage_embed(usage: QuotaUsage) -> discord.Embed:
    embed = discord.Embed(title="Your image quota", colour=discord.Colour.green())
    if usage.daily_limit >= UNLIMITED:
        embed.description = (
            f"Your role has no quota. You generated {usage.used_images} image(s) in the last 24 hours."
        )
        return embed
    embed.add_field(name="Used (24 h)", value=f"{usage.used_images} / {usage.daily_limit}")
    embed.add_field(name="Left", value=str(usage.remaining_images))
    embed.add_field(name="Running now", value=f"{usage.in_flight} / {usage.max_concurrent}")
    if usage.resets_at:
        embed.add_field(name="Next image frees up", value=relative_time(usage.resets_at), inline=False)
    return embed


STATE_LABELS = {
    JobState.PENDING: "⏳ waiting",
    JobState.SUBMITTING: "📨 being sent to Segmind",
    JobState.SUBMITTED: "🎨 generating",
    JobState.COMPLETED: "📦 being posted",
    JobState.DELIVERED: "✅ posted",
    JobState.UNDELIVERED: "📬 ready, not posted: use Resend below",
    JobState.FAILED: "⚠️ failed",
}


def jobs_embed(jobs: list[JobRecord]) -> discord.Embed:
    embed = discord.Embed(title="Your recent images", colour=discord.Colour.blurple())
    if not jobs:
        embed.description = "Nothing yet: try `/imagine`."
        return embed
    lines = []
    for job in jobs:
        prompt = quote_user_text(str(job.request.get("prompt", "")), 60)
        state = STATE_LABELS[job.state]
        link = ""
        if job.state is JobState.DELIVERED and job.message_id and job.channel_id:
            link = f" · [open](https://discord.com/channels/{job.guild_id or '@me'}/{job.channel_id}/{job.message_id})"
        lines.append(f"{relative_time(job.created_at)} · {state}{link}\n> {prompt}")
    embed.description = truncate("\n".join(lines), EMBED_DESCRIPTION_LIMIT)
    return embed


def credits_exhausted_reply() -> str:
    return "💳 The bot is out of Segmind credits; the admins have been told. Please try again later."


@dataclass(frozen=True)
class FailureReply:
    text: str
    error_id: str | None = None  # set when the cause was logged with a traceback for the admins


def new_error_id() -> str:
    return secrets.token_hex(3).upper()


def job_failure_reply(error: JobError) -> FailureReply:
    """Maps a failed job to what a member understands; the cause stays in the log."""
    cause = error.cause
    ref = f" (request `{error.request_id}`)" if error.request_id else ""
    charged = (
        " Segmind ran the job, so it counts toward your quota."
        if error.billed
        else " Your quota was not charged."
    )
    if isinstance(cause, InsufficientCredits):
        return FailureReply(credits_exhausted_reply())
    if isinstance(cause, SubmitInterrupted):
        return FailureReply(
            "🔄 The bot restarted while sending your request to Segmind. So that nothing is ever paid for twice "
            "it was not sent again, and it did not count toward your quota. Please try again."
        )
    if isinstance(cause, RateLimited):
        when = try_again_at(error.retry_at) if error.retry_at else "in a few minutes"
        return FailureReply(f"🕒 Segmind is rate limiting the bot. Please try again {when}.{charged}")
    if isinstance(cause, JobFailed) and cause.is_content_block:
        return FailureReply("🚫 This prompt was blocked by the content filter. No image was made." + charged)
    if isinstance(cause, JobFailed):
        return FailureReply(f"⚠️ Segmind could not generate this image{ref}.{charged}")
    if isinstance(cause, Unauthorized | Forbidden | NotAcceptable | BadRequest) or (
        isinstance(cause, NotFound) and error.request_id is None
    ):
        error_id = new_error_id()
        log.error(
            "error %s: Segmind refused the bot's request: %s: %s", error_id, type(cause).__name__, cause
        )
        return FailureReply(
            f"⚙️ The bot is not configured correctly, so nothing was generated. Error id `{error_id}` tells the "
            f"admins what happened.{charged}",
            error_id,
        )
    if isinstance(cause, NotFound):
        return FailureReply(f"⌛ Segmind no longer has this result{ref}.{charged}")
    if isinstance(cause, JobTimeout):
        return FailureReply(f"⌛ Segmind took too long to finish this job{ref}.{charged}")
    if isinstance(cause, DownloadFailed):
        return FailureReply(f"📉 The images were generated but could not be downloaded{ref}.{charged}")
    error_id = new_error_id()
    log.error("error %s: job %s failed", error_id, error.job.id, exc_info=cause)
    return FailureReply(
        f"⚠️ Segmind had a problem with this job{ref}. Error id `{error_id}`.{charged}", error_id
    )


def store_unavailable_reply() -> FailureReply:
    return FailureReply("🗄️ The bot's storage is not responding, so nothing was started. Please try again.")


def unexpected_error_reply(error: BaseException, context: str) -> FailureReply:
    """For errors no command handled; a store outage is not a bug, so it gets its own plain answer."""
    if isinstance(error, StoreUnavailable):
        log.warning("%s: %s", context, error)
        return store_unavailable_reply()
    error_id = new_error_id()
    log.error("error %s: unexpected failure in %s", error_id, context, exc_info=error)
    return FailureReply(f"⚠️ Something went wrong on the bot's side. Error id `{error_id}`.", error_id)


class Refusal(AppCommandError):
    """A command refused for a reason the member can act on; the text is the whole reply."""


def ban_end(ban: Ban) -> str:
    return "until a moderator lifts it" if ban.until is None else f"until {when(ban.until)}"


def when(epoch: float) -> str:
    return f"<t:{int(epoch)}:f> (<t:{int(epoch)}:R>)"


def banned_reply(ban: Ban) -> str:
    reason = f" Reason: {quote_user_text(ban.reason, 300)}" if ban.reason else ""
    return f"⛔ You may not use the bot in this server {ban_end(ban)}.{reason}"


def direct_messages_off_reply() -> str:
    return "🔒 This bot makes images in servers only; use /imagine in a server you share with it."


def usage_embed(report: UsageReport, *, days: int, price: float | None) -> discord.Embed:
    totals = report.totals
    embed = discord.Embed(title=f"Usage here, the last {days} day(s)", colour=discord.Colour.blurple())
    embed.add_field(name="Images", value=str(totals.images))
    embed.add_field(name="Jobs", value=str(totals.jobs))
    embed.add_field(name="Blocked", value=str(totals.blocked))
    embed.add_field(name="Failed", value=str(totals.failed))
    embed.add_field(name="GPU time", value=f"{totals.gpu_seconds:,.1f} s")
    cost = report.cost(price)
    if cost is not None:
        embed.add_field(name="Cost", value=f"${cost:,.2f}")
    top = "\n".join(
        f"<@{member}>: {counts.images} image(s), {counts.jobs} job(s)"
        for member, counts in report.top_members
    )
    embed.add_field(name="Top members", value=top or "nobody yet", inline=False)
    return embed


HIDDEN_RESULT = "🙈 This result was hidden after reports from members, until a moderator looks at it."


def may_not_generate_reply() -> str:
    return (
        "🔒 Your roles in this server don't include making images; ask its admins if you think they should."
    )


def blocked_prompt_reply() -> str:
    # Not which word: the filter is not there to be probed.
    return "🚫 This server's rules don't allow this prompt, so nothing was generated and nothing was charged."


def app_command_error_reply(error: AppCommandError, context: str) -> FailureReply:
    if isinstance(error, Refusal):
        return FailureReply(f"❌ {error}")
    if isinstance(error, MissingPermissions):
        return FailureReply("❌ This needs the Manage Server permission in this server.")
    if isinstance(error, TransformerError):
        return FailureReply(f"❌ {typed_value_span(error.value)} is not a valid value for this option.")
    original = getattr(error, "original", error)
    if isinstance(original, RequestValidationError):
        return FailureReply(validation_reply(original))
    return unexpected_error_reply(original, context)
