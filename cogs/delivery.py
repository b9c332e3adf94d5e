"""Runs recorded jobs to the end and delivers them, whether they started a second ago or before a restart.

Everything needed to reach the member is in the job record (the interaction token, the channel, the
requester), so delivery works the same in the process that took the command and in one that resumed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from discord.ext import commands, tasks

from cogs import render
from cogs.buttons import RerollButton, result_view
from cogs.modlog import BAN_REF, AppealButton
from services.images import ImageDecodeError, PreparedImage, prepare_for_upload
from services.jobs import (
    GeneratedImages,
    JobError,
    Lease,
    LeaseLost,
    Progress,
    ProgressKind,
    uninterruptible,
)
from services.moderation.cases import CaseKind, ModCase, new_case_id
from services.request import GenerationRequest
from services.segmind import InsufficientCredits, JobFailed
from services.store.base import Ban, JobRecord, JobState
from services.store.guarded import StoreUnavailable

if TYPE_CHECKING:
    from cogs.app import DreamshaperBot

log = logging.getLogger(__name__)

PROGRESS_EDIT_INTERVAL = 1.5
PROGRESS_TICK_SECONDS = 5.0
# Edits that change no state (the seconds, the estimate, the place in line) the whole process may make per
# second, shared by every job's progress line: a few jobs tick freely, a thousand share them, so each job
# costs a bounded few edits.
PROGRESS_TICKS_PER_SECOND = 20.0
# From this load of the loop watchdog on, state changes draw on that allowance too (see TickAllowance).
LOOP_BEHIND_FOR_PROGRESS = 0.5
# A loop turn longer than this means the loop is busy: the next job waits before it begins (StartLine).
BUSY_TURN_SECONDS = 0.002
MAX_START_HOLD_SECONDS = 0.05
# While commands are being acknowledged no job begins, for this long at most (from when it asked): a burst
# of a thousand commands a second acknowledges each within Discord's 3 s only with the loop to itself.
COMMANDS_FIRST_SECONDS = 1.0
COMMANDS_CHECK_SECONDS = 0.005
# How long the result waits for a progress edit already sent; discord.py's own retries fit well within it.
EDIT_LANDING_SECONDS = 10.0
# Discord invalidates interaction tokens after 15 minutes; stop using one a little before that.
TOKEN_LIFETIME = 15 * 60 - 30
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
SERVER_ERROR_ATTEMPTS = 3
MAX_DISCORD_RETRY_AFTER = 60.0


class TickAllowance:
    """The process's allowance of progress edits that change no state: `per_second`, up to one second's
    worth saved up.

    A progress line changes state when the job moves on (waiting for a turn, rate limited, queued,
    generating); everything else it shows (the seconds so far, the estimate, the place in line) only
    ticks. State changes never ask for the allowance, so they always go first; ticks take what is left,
    and one that finds none is skipped. While the event loop runs behind (`loop_behind`), state changes
    ask for the allowance too, and one that finds none waits: the loop's time goes to the results that
    are ready, and a job that finishes meanwhile needs no progress edit at all.
    """

    def __init__(
        self,
        per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        loop_behind: Callable[[], bool] = lambda: False,
    ) -> None:
        if per_second <= 0:
            raise ValueError(f"per_second must be > 0, got {per_second}")
        self.per_second = per_second
        self.loop_behind = loop_behind
        self._clock = clock
        self._tokens = per_second
        self._updated = clock()

    def allows(self, *, change: bool) -> bool:
        """Whether an edit may go now; `change`: it shows a change of state, not only a tick."""
        if change and not self.loop_behind():
            return True
        return self.take()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.per_second, self._tokens + (now - self._updated) * self.per_second)
        self._updated = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _state_of(progress: Progress) -> tuple[object, ...]:
    # What makes a change worth an edit whatever the load. The seconds, the estimate and the place in line
    # only tick: with a thousand jobs in line every place moves at every turn, and each move would cost
    # every waiting member's message an edit.
    return (progress.kind, progress.retry_at)


class ProgressMessage:
    """Coalesces progress into at most one edit per interval, however fast events arrive.

    A change of state is shown within one interval of its arrival, and between Segmind status checks
    (which grow sparse on long jobs) the elapsed seconds keep moving, so the member can see the job is
    alive. Those ticks (an edit that changes no state) draw on `ticks`, the process's `TickAllowance`
    when one is given: under a burst of jobs a tick may be skipped, a state change never is. The result
    is not progress: `finish` hands the message over at once, without waiting out the interval.
    """

    def __init__(
        self,
        edit: Callable[[str], Awaitable[Any]],
        interval: float = PROGRESS_EDIT_INTERVAL,
        *,
        ticks: TickAllowance | None = None,
        shown: Progress | None = None,
    ) -> None:
        self._edit = edit
        self._interval = interval
        self._ticks = ticks
        self._pending: str | None = None
        self._pending_state: tuple[object, ...] | None = None
        self._shown: str | None = None
        self._shown_state: tuple[object, ...] | None = None
        self._last_edit = float("-inf")
        self._progress: Progress | None = None
        self._progress_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._editing = False
        self._closed = False
        if shown is not None:
            # The message already shows this (the command's acknowledgement): it was, in effect, an edit.
            self._shown, self._shown_state = render.progress_text(shown), _state_of(shown)
            # The ticker moves its seconds on from here, and the next edit keeps the pace from here.
            self._progress, self._progress_at = shown, time.monotonic()
            self._last_edit = self._progress_at

    def update(self, progress: Progress) -> None:
        if self._closed:
            return
        self._progress, self._progress_at = progress, time.monotonic()
        self._pending = render.progress_text(progress)
        self._pending_state = _state_of(progress)
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())

    def _ticking(self) -> bool:
        return self._progress is not None and self._progress.kind in (
            ProgressKind.QUEUED,
            ProgressKind.GENERATING,
        )

    async def _flush(self) -> None:
        while not self._closed:
            if self._pending is None:
                if not self._ticking():
                    return
                # Woken by the next change, so it is not held back until the tick.
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PROGRESS_TICK_SECONDS):
                        await self._changed.wait()
                if self._pending is None and self._progress is not None and self._ticking():
                    moved = self._progress.elapsed + time.monotonic() - self._progress_at
                    self._pending = render.progress_text(replace(self._progress, elapsed=moved))
                    self._pending_state = _state_of(self._progress)
                continue
            await asyncio.sleep(max(0.0, self._last_edit + self._interval - time.monotonic()))
            text, self._pending = self._pending, None
            state = self._pending_state
            if self._closed or text is None or text == self._shown:
                continue
            change = state != self._shown_state
            if self._ticks is not None and not self._ticks.allows(change=change):
                if change and self._pending is None:
                    # Held, not lost: tried again an interval on, unless a newer change or the result
                    # comes first.
                    self._pending, self._pending_state = text, state
                    await asyncio.sleep(self._interval)
                continue  # a tick is skipped: the next one may find some allowance
            self._last_edit = time.monotonic()
            self._editing = True
            try:
                await self._edit(text)
                self._shown, self._shown_state = text, state
            except TokenExpired:
                self._closed = True  # nothing more can be shown; the result will be posted elsewhere
            except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as error:
                # A lost progress edit must not end the job; discord.py lets network errors through.
                log.warning("progress edit failed: %s", error or type(error).__name__)
            finally:
                self._editing = False

    async def finish(self) -> None:
        """Stops progress at once; an edit already on its way is let through first.

        Its request may have left already: cut off, it could still reach Discord after the result and
        overwrite the result's text. It is given `EDIT_LANDING_SECONDS` to land.
        """
        self._closed = True
        task = self._task
        if task is None or task.done():
            return
        if self._editing:
            await asyncio.wait({task}, timeout=EDIT_LANDING_SECONDS)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            log.warning("progress stopped on an error: %r", task.exception())


def _carries_job(message: discord.Message, job_id: str) -> bool:
    return any(
        getattr(child, "custom_id", None) == RerollButton.custom_id_for(job_id)
        for row in message.components
        for child in getattr(row, "children", [])
    )


def discord_files(prepared: list[PreparedImage]) -> list[discord.File]:
    # A File is consumed by one upload, so every attempt builds fresh ones.
    return [discord.File(io.BytesIO(image.data), filename=image.filename) for image in prepared]


class JobMessage:
    """The interaction's original response, reached through its webhook token while the token lives."""

    def __init__(self, bot: DreamshaperBot, job: JobRecord) -> None:
        self.job = job
        self._webhook: discord.Webhook | None = None
        if job.application_id and job.interaction_token:
            self._webhook = discord.Webhook.partial(job.application_id, job.interaction_token, client=bot)

    @property
    def usable(self) -> bool:
        created = self.job.interaction_created_at
        return self._webhook is not None and created is not None and time.time() < created + TOKEN_LIFETIME

    async def edit(self, **fields: Any) -> discord.Message:
        if not self.usable or self._webhook is None:
            raise TokenExpired
        # '@original' addresses the interaction's first response, exactly as Interaction does.
        return await self._webhook.edit_message("@original", **fields)  # type: ignore[arg-type]

    async def show(self, text: str) -> None:
        await self.edit(content=text)


class TokenExpired(Exception):
    pass


class StartLine:
    """Lets jobs begin one at a time, in the order they were started, at the pace the event loop allows.

    Beginning a job costs a few store writes and the submit to Segmind; a thousand begun at once would
    hold every command arriving meanwhile (and its acknowledgement, due within 3 s) behind them. While
    `commands_under_way` says commands are being acknowledged, no job begins (COMMANDS_FIRST_SECONDS at
    most from when it asked). Between two beginnings the line lets the loop turn once, and when that turn
    was long (the loop is busy) it waits as long again before the next: on an idle loop jobs begin at
    once, under a burst the commands go first. Jobs begin whatever the load, only later.
    """

    def __init__(self, commands_under_way: Callable[[], bool] = lambda: False) -> None:
        self._commands_under_way = commands_under_way
        # (ticket, when it asked, on the loop's clock)
        self._waiting: deque[tuple[asyncio.Future[None], float]] = deque()
        self._opener: asyncio.Task[None] | None = None

    async def turn(self) -> None:
        """Returns when it is this caller's turn to begin."""
        loop = asyncio.get_running_loop()
        ticket: asyncio.Future[None] = loop.create_future()
        self._waiting.append((ticket, loop.time()))
        if self._opener is None or self._opener.done():
            self._opener = asyncio.create_task(self._open(), name="job-start-line")
        await ticket

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            ticket, asked_at = self._waiting[0]
            if ticket.done():  # its job was cancelled while it waited
                self._waiting.popleft()
                continue
            if self._commands_under_way() and loop.time() < asked_at + COMMANDS_FIRST_SECONDS:
                await asyncio.sleep(COMMANDS_CHECK_SECONDS)
                continue
            self._waiting.popleft()
            ticket.set_result(None)
            # Not loop.time(): uvloop's clock counts whole milliseconds, too coarse for BUSY_TURN_SECONDS.
            began = time.monotonic()
            await asyncio.sleep(0)
            turn = time.monotonic() - began
            if turn > BUSY_TURN_SECONDS:
                await asyncio.sleep(min(turn, MAX_START_HOLD_SECONDS))


class JobRunner(commands.Cog):
    """Owns every running job of this process: fresh ones, and unfinished ones found in the store.

    A job runs here only while this process holds its lease, so of several processes sharing a store one
    drives it, and one that lost the lease posts nothing. A sweep, every lease period from `cog_load` to
    `cog_unload`, resumes jobs no live process holds (after a crash or a restart) and closes those past
    Segmind's retention; a failed sweep is logged and the next one comes on time. Delivery and the
    record of it go together, so a resumed job is posted once. At `cog_unload` running jobs are cancelled
    once their state is written, for the next start to resume. Under a burst the commands go first: jobs
    begin through a `StartLine`, and their progress lines share one `TickAllowance`, so each job's
    progress costs a bounded few edits however many run.
    """

    def __init__(self, bot: DreamshaperBot) -> None:
        self.bot = bot
        self._running: dict[str, asyncio.Task[None]] = {}
        self._credits_reported_until = 0.0
        self._last_sweep_ended = -math.inf
        self.progress_ticks = TickAllowance(
            PROGRESS_TICKS_PER_SECOND, loop_behind=lambda: bot.watchdog.load() >= LOOP_BEHIND_FOR_PROGRESS
        )
        self._start_line = StartLine(self._commands_under_way)

    def _commands_under_way(self) -> bool:
        # Asked of the Segmind client each time: it is the bot's, not this cog's, to build or replace.
        return self.bot.segmind.in_flight.commands_under_way()

    async def cog_load(self) -> None:
        self.sweeper.change_interval(seconds=self.bot.jobs.lease_seconds)
        self.sweeper.start()

    async def cog_unload(self) -> None:
        await self.stop()

    # -- lifecycle --

    def start(self, job: JobRecord, *, shown: Progress | None = None) -> asyncio.Task[None] | None:
        """Runs `job` in the background; `shown`: the progress its message shows already, if known."""
        if not self.bot.accepting_jobs or job.id in self._running:
            return None  # it is in the store: the next start (or another process) carries it on
        task = asyncio.create_task(self.execute(job, shown), name=f"job-{job.id}")
        self._running[job.id] = task
        task.add_done_callback(lambda _t: self._running.pop(job.id, None))
        return task

    async def stop(self) -> None:
        """Running jobs are cancelled after their state is written, to be resumed later."""
        self.sweeper.cancel()
        running = {job_id: task for job_id, task in self._running.items() if not task.done()}
        for task in running.values():
            task.cancel()
        if running:
            await asyncio.wait(running.values(), timeout=8)
        # A delivery under way finishes before its task stops, so only the record tells what is left over.
        left = 0
        for job_id in running:
            try:
                record = await self.bot.store.get_job(job_id)
            except StoreUnavailable:
                record = None
            left += record is None or not record.finished
        log.info(
            "job runner stopped; %d job(s) left to resume at the next start, %d finished while stopping",
            left,
            len(running) - left,
        )

    # The interval is the lease period, known once the bot is built: cog_load sets it.
    @tasks.loop()
    async def sweeper(self) -> None:
        # tasks.loop keeps a fixed rate, so after a slow sweep (a struggling store) the iterations it
        # missed would run back to back against that same store: those catch-ups are skipped instead.
        if time.monotonic() - self._last_sweep_ended < self.bot.jobs.lease_seconds / 2:
            return
        # Caught here: an exception would end the loop, and the next sweep may well succeed.
        try:
            await self.sweep()
        except StoreUnavailable as error:
            log.warning("could not look for unfinished jobs: %s", error)
        except Exception:
            log.exception("could not look for unfinished jobs")
        finally:
            self._last_sweep_ended = time.monotonic()

    async def sweep(self) -> None:
        """Resumes unfinished jobs that no live process holds; closes those Segmind no longer keeps.

        A completed job's images stay downloadable for days, so only jobs that still needed Segmind's
        one-hour result are closed when they are older than that.
        """
        await self.bot.jobs.reclaim_orphaned_reservations()
        fresh, stale = await self.bot.jobs.unfinished()
        for job in [*fresh, *(job for job in stale if job.state is JobState.COMPLETED)]:
            self.start(job)
        for job in stale:
            if job.state is not JobState.COMPLETED and job.id not in self._running:
                await self._close_stale(job)

    async def _close_stale(self, job: JobRecord) -> None:
        async with self.bot.jobs.lease(job.id) as ours:
            current = await self.bot.store.get_job(job.id) if ours else None
            if current is None or current.finished:
                return
            await self.bot.jobs.abandon(current, "past Segmind's one-hour retention")
            await self._tell_requester(
                current,
                f"⌛ <@{current.user_id}>, your image request could not be finished; it was not charged.",
            )

    # -- one job --

    async def execute(self, job: JobRecord, shown: Progress | None = None) -> None:
        # The job is in the store, and stays there whatever happens while it waits its turn.
        await self._start_line.turn()
        try:
            async with self.bot.jobs.lease(job.id) as lease:
                current = await self.bot.store.get_job(job.id) if lease else None
                if current is not None and not current.finished:
                    await self._carry_on(current, lease, shown)
        except LeaseLost:
            log.warning("job %s: another process took it over; this one posts nothing", job.id)
        except Exception:
            # The job keeps its recorded state, so the next sweep tries it again.
            log.exception("job %s: unexpected failure; it will be retried", job.id)

    async def _carry_on(self, job: JobRecord, lease: Lease, shown: Progress | None = None) -> None:
        if job.state is JobState.COMPLETED and await self._posted_before(job):
            return
        message = JobMessage(self.bot, job)
        progress = ProgressMessage(message.show, ticks=self.progress_ticks, shown=shown)
        try:
            generated = await self.bot.jobs.resume(job, progress.update)
        except JobError as error:
            await progress.finish()
            await uninterruptible(self.report_failure(message, error))
            return
        finally:
            await progress.finish()  # also on an unexpected error, or the ticker would outlive the job
        # Posting and recording the delivery go together, or a resumed job would be posted twice.
        await uninterruptible(self.deliver(generated, lease))

    async def deliver(self, generated: GeneratedImages, lease: Lease) -> None:
        """Posts the images where the member will see them, while this process still holds the job.

        The job's interaction (its original response) is tried first, then the channel, then a DM.

        A failure that may pass (Discord 5xx or rate limits, images Pillow cannot prepare) leaves the job
        completed for the next sweep, a bounded number of times; then the member is told and `/jobs`
        offers Resend.
        """
        job, request = generated.job, generated.request
        message = JobMessage(self.bot, job)
        try:
            prepared = await prepare_for_upload(
                generated.images,
                limit_bytes=job.upload_limit or DEFAULT_UPLOAD_LIMIT,
                stem=f"dreamshaper_{request.seed}",
            )
        except (ImageDecodeError, ValueError) as error:
            await self._delivery_failed(job, f"the images could not be prepared for Discord: {error}")
            return
        embed = render.result_embed(
            request, inference_time=generated.inference_time, requester=job.requester_name or "a member"
        )
        await lease.confirm()
        sent, passing = await self._edit_with_retries(message, embed, prepared)
        if sent is None:
            await lease.confirm()
            sent, elsewhere_passing = await self._deliver_elsewhere(job, embed, prepared)
            passing = passing or elsewhere_passing
        if sent is not None:
            await self.bot.jobs.mark_delivered(job, message_id=sent.id)
        elif passing:
            await self._delivery_failed(job, "Discord kept failing (server errors or rate limits)")
        else:
            job = await self.bot.jobs.mark_undeliverable(job, "no channel, DM or interaction could take it")
            await self._tell_undelivered(job)

    async def _delivery_failed(self, job: JobRecord, reason: str) -> None:
        job = await self.bot.jobs.delivery_failed(job, reason)
        if job.state is JobState.UNDELIVERED:
            await self._tell_undelivered(job)

    async def _tell_undelivered(self, job: JobRecord) -> None:
        await self._tell_requester(
            job,
            f"📬 <@{job.user_id}>, your images are ready but could not be posted; `/jobs` can resend them.",
        )

    async def _edit_with_retries(
        self, message: JobMessage, embed: discord.Embed, prepared: list[PreparedImage]
    ) -> tuple[discord.Message | None, bool]:
        """The result edited into the original response; (None, True) when Discord kept failing."""
        # discord.py already waits out 429s and retries 5xx a few times; this covers longer outages, and a
        # 429 that discord.py gave up on, which says nothing about whether the message still exists.
        for attempt in range(SERVER_ERROR_ATTEMPTS):
            try:
                edited = await message.edit(
                    content=None,
                    embed=embed,
                    attachments=discord_files(prepared),
                    view=result_view(message.job.id),
                )
                return edited, False
            except TokenExpired:
                return None, False
            except discord.HTTPException as error:
                if not _passing(error):
                    log.info(
                        "job %s: the original response is gone (%s); posting elsewhere", message.job.id, error
                    )
                    return None, False
                log.warning(
                    "job %s: Discord failed the result edit (%s); retrying", message.job.id, error.status
                )
                await asyncio.sleep(_retry_after(error, attempt))
        return None, True

    async def _deliver_elsewhere(
        self, job: JobRecord, embed: discord.Embed, prepared: list[PreparedImage]
    ) -> tuple[discord.Message | None, bool]:
        """Posts in the channel, pinging only the requester; failing that, a direct message.

        The flag says whether any place failed in a way that may pass (a Discord 5xx or rate limit).
        """
        content = f"<@{job.user_id}>, your images are ready."
        passing = False
        for destination in await self._destinations(job):
            try:
                sent = await destination.send(
                    content=content,
                    embed=embed,
                    files=discord_files(prepared),
                    view=result_view(job.id),
                    allowed_mentions=discord.AllowedMentions(users=[discord.Object(job.user_id)]),
                )
                return sent, False
            except discord.HTTPException as error:
                passing = passing or _passing(error)
                log.warning("job %s: could not post the result (%s); trying the next place", job.id, error)
        return None, passing

    async def _posted_before(self, job: JobRecord) -> bool:
        """A process stopped between posting a result in the channel and recording it: find that post.

        Edits of the original response can simply be repeated, but a second channel post would be a
        duplicate, so the channel's recent messages are searched for this job's buttons first.
        """
        if job.channel_id is None or self.bot.user is None:
            return False
        try:
            channel = await self.channel(job.channel_id)
            async for message in channel.history(limit=50):
                if message.author.id == self.bot.user.id and _carries_job(message, job.id):
                    await self.bot.jobs.mark_delivered(job, message_id=message.id)
                    return True
        except (discord.HTTPException, LookupError) as error:
            log.info("job %s: could not search the channel for an earlier post: %s", job.id, error)
        return False

    async def _destinations(self, job: JobRecord) -> list[discord.abc.Messageable]:
        destinations: list[discord.abc.Messageable] = []
        lookups: list[Callable[[], Awaitable[discord.abc.Messageable]]] = []
        if job.channel_id is not None:
            lookups.append(lambda: self.channel(job.channel_id or 0))
        lookups.append(lambda: self._dm(job.user_id))
        for lookup in lookups:
            with contextlib.suppress(discord.HTTPException, LookupError):
                destinations.append(await lookup())
        return destinations

    async def channel(self, channel_id: int) -> discord.abc.Messageable:
        channel = self.bot.get_channel(channel_id) or await self.bot.fetch_channel(channel_id)
        if not isinstance(channel, discord.abc.Messageable):
            raise LookupError(f"channel {channel_id} cannot take messages")
        return channel

    async def _dm(self, user_id: int) -> discord.abc.Messageable:
        user = self.bot.get_user(user_id) or await self.bot.fetch_user(user_id)
        return await user.create_dm()

    async def _tell_requester(self, job: JobRecord, text: str) -> None:
        for destination in await self._destinations(job):
            try:
                await destination.send(
                    text, allowed_mentions=discord.AllowedMentions(users=[discord.Object(job.user_id)])
                )
                return
            except discord.HTTPException:
                continue

    async def report_failure(self, message: JobMessage, error: JobError) -> None:
        reply = render.job_failure_reply(error)
        text = reply.text
        cause = error.cause
        view: discord.ui.View | None = None
        if isinstance(cause, JobFailed) and cause.is_content_block:
            case, ban = await self._content_blocked(error.job, error.request_id)
            if ban is not None:
                text = f"{text}\n{render.banned_reply(ban)}"
            appeal = BAN_REF if ban is not None else None if case is None else case.id
            if (
                appeal is not None
                and error.job.guild_id is not None
                and await self.bot.modlog.channel_id(error.job.guild_id)
            ):
                view = discord.ui.View(timeout=None)
                view.add_item(AppealButton(appeal))
        try:
            await message.edit(content=text, embed=None, attachments=[], view=view)
        except (discord.HTTPException, TokenExpired):
            await self._tell_requester(error.job, f"<@{error.job.user_id}> {text}")
        if isinstance(cause, InsufficientCredits) and time.time() > self._credits_reported_until:
            # Jobs queued behind the first one fail the same way; the admins need to hear it once.
            self._credits_reported_until = time.time() + self.bot.config.credits_cooloff_seconds
            log.error("Segmind says the account is out of credits; new jobs are refused for a while")
            # The operator's to act on (MOD_LOG_CHANNEL_ID), not one server's.
            credits = ModCase(
                new_case_id(),
                CaseKind.CREDITS,
                None,
                time.time(),
                text="Segmind reports the bot's account is out of credits. Top it up to resume.",
            )
            await self.bot.modlog.post_case(credits)

    async def _content_blocked(
        self, job: JobRecord, request_id: str | None
    ) -> tuple[ModCase | None, Ban | None]:
        """Segmind's filter refused the prompt: a mod-log entry (recorded now, so the member's Appeal finds
        it, and posted in the background), and a strike like a blocked prompt's; the case (None when the
        store could not take it), and the ban the strike earned, if it did."""
        case = ModCase(
            new_case_id(),
            CaseKind.CONTENT,
            job.guild_id,
            time.time(),
            member_id=job.user_id,
            channel_id=job.channel_id,
            job_id=job.id,
            text=GenerationRequest.from_payload(job.request).prompt,
            detail=f"`{request_id}`" if request_id else "",
        )
        modlog = self.bot.modlog
        try:
            await self.bot.moderation.open_case(case)
            self.bot.in_background(modlog.post_case(case, recorded=True))
            ban = (
                None if job.guild_id is None else await self.bot.moderation.strike(job.guild_id, job.user_id)
            )
        except StoreUnavailable as error:
            log.warning("job %s: the content block was not recorded or counted: %s", job.id, error)
            self.bot.in_background(modlog.post_case(case))
            return None, None
        if ban is not None:
            banned = f"⛔ <@{job.user_id}> was banned {render.ban_end(ban)}: {ban.reason}."
            self.bot.in_background(modlog.post_text(banned, guild_id=job.guild_id))
        return case, ban

    async def delete_result(self, channel_id: int, message_id: int) -> bool:
        """Deletes a posted result (for a moderator); False when it was gone already."""
        try:
            await self.bot.get_partial_messageable(channel_id).get_partial_message(message_id).delete()
        except discord.NotFound:
            return False
        log.info("message %d: result deleted by a moderator", message_id)
        return True

    async def hide_result(self, channel_id: int, message_id: int) -> None:
        """Replaces a reported result's images with a notice, through the channel (the reporter's own
        interaction could not); a moderator's Restore puts them back."""
        message = self.bot.get_partial_messageable(channel_id).get_partial_message(message_id)
        try:
            await message.edit(content=render.HIDDEN_RESULT, embed=None, attachments=[], view=None)
        except discord.HTTPException as error:
            log.warning("message %d: the reported result could not be hidden: %s", message_id, error)

    async def restore_result(self, job_id: str, channel_id: int, message_id: int) -> str | None:
        """Puts a hidden result's images back into its message, fetched anew; None once done, else why it
        could not be."""
        job = await self.bot.store.get_job(job_id)
        if job is None:
            return "its job's record is no longer kept"
        request = GenerationRequest.from_payload(job.request)
        try:
            generated = await self.bot.jobs.fetch_again(job, request)
            prepared = await prepare_for_upload(
                generated.images,
                limit_bytes=job.upload_limit or DEFAULT_UPLOAD_LIMIT,
                stem=f"dreamshaper_{request.seed}",
            )
        except (JobError, ImageDecodeError, ValueError) as error:
            return str(getattr(error, "cause", error))
        embed = render.result_embed(
            request, inference_time=generated.inference_time, requester=job.requester_name or "a member"
        )
        message = self.bot.get_partial_messageable(channel_id).get_partial_message(message_id)
        try:
            await message.edit(
                content=None, embed=embed, attachments=discord_files(prepared), view=result_view(job.id)
            )
        except discord.NotFound:
            return "the message was deleted"
        except discord.HTTPException as error:
            return f"Discord refused the edit ({error.status})"
        log.info("job %s: result restored by a moderator", job_id)
        return None


def _passing(error: discord.HTTPException) -> bool:
    """Whether Discord's refusal may pass: a server error, or a rate limit discord.py stopped waiting out."""
    return error.status >= 500 or error.status == 429


def _retry_after(error: discord.HTTPException, attempt: int) -> float:
    header = getattr(error.response, "headers", {}).get("Retry-After")
    try:
        wait = float(header) if header is not None else 2.0**attempt
    except ValueError:
        wait = 2.0**attempt
    return min(MAX_DISCORD_RETRY_AFTER, max(0.5, wait)) if math.isfinite(wait) else 2.0**attempt
