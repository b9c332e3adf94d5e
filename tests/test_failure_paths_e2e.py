"""The real bot against a broken world: a stuck store, orphaned reservations, stolen leases, bad records,
deliveries that keep failing. Nothing freezes, nothing is stranded, nobody is told a false story."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis.asyncio as aioredis

from devtools.fakes.discord.server import InteractionHandle, StoredMessage
from devtools.fakes.segmind.server import SegmindServerSettings
from devtools.fakes.tcp_proxy import ProxyMode, TcpProxy
from devtools.stack import PROGRESS_MARKS, REDIS_URL, BotStack
from services.store.base import JobRecord, JobState, QuotaLimits, Reservation, new_job_id
from tests.conftest import SEGMIND_KEY, StackFactory, database_url

USER = 1_111_111_111_111_111_111
OTHER_USER = 2_222_222_222_222_222_222


def image_messages(stack: BotStack) -> list[StoredMessage]:
    return [m for m in stack.discord.messages.values() if m.attachments and not m.deleted]


def reply_text(handle: InteractionHandle) -> str:
    callback = handle.callback
    assert callback is not None and callback.type == 4, f"expected an immediate reply, got {handle!r}"
    return str(callback.data.get("content", ""))


def slow_segmind(seconds_per_step: float = 0.08) -> SegmindServerSettings:
    return SegmindServerSettings(
        api_keys=frozenset({SEGMIND_KEY}), queue_seconds=0.5, seconds_per_step=seconds_per_step
    )


class RawStore:
    """Writes and removes records behind the bot's back, as a crashed or older process would leave them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite:")

    @property
    def path(self) -> str:
        return self.url.removeprefix("sqlite:///")

    @property
    def prefix(self) -> str:
        return parse_qs(urlsplit(self.url).query)["prefix"][0]

    def _sqlite(self, statement: str, params: tuple[object, ...]) -> None:
        with sqlite3.connect(self.path, timeout=10) as db:
            db.execute(statement, params)

    async def write_job(self, job_id: str, data: str, *, state: str = "pending") -> None:
        if self.is_sqlite:
            # In a thread: the bot shares this loop, and its own transactions must be able to finish.
            await asyncio.to_thread(
                self._sqlite,
                "INSERT INTO jobs (id, user_id, state, created_at, updated_at, data) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, USER, state, time.time(), time.time(), data),
            )
            return
        client = aioredis.from_url(REDIS_URL)
        try:
            await client.set(f"{self.prefix}job:{job_id}", data)
            await client.zadd(f"{self.prefix}jobs:unfinished", {job_id: time.time()})
        finally:
            await client.aclose()

    async def delete_job(self, job_id: str) -> None:
        if self.is_sqlite:
            await asyncio.to_thread(self._sqlite, "DELETE FROM jobs WHERE id = ?", (job_id,))
            return
        client = aioredis.from_url(REDIS_URL)
        try:
            await client.delete(f"{self.prefix}job:{job_id}")
        finally:
            await client.aclose()


async def latest_job(stack: BotStack, user_id: int = USER) -> JobRecord:
    [job] = await stack.bot.store.recent_jobs(user_id, limit=1)
    return job


async def wait_for_state(stack: BotStack, state: JobState, timeout: float = 30) -> JobRecord:
    deadline = time.monotonic() + timeout
    while True:
        jobs = await stack.bot.store.recent_jobs(USER, limit=1)
        if jobs and jobs[0].state is state:
            return jobs[0]
        assert time.monotonic() < deadline, f"latest job is {jobs[0].state if jobs else None}, not {state}"
        await asyncio.sleep(0.1)


async def imagine_held_at_download(stack: BotStack, prompt: str, *, seconds: float) -> InteractionHandle:
    """Sends /imagine and returns once its image is downloading, which the stand-in holds for `seconds`."""
    stack.segmind.inject("slow", target="output", seconds=seconds)
    handle = await stack.discord.send_slash_command("imagine", {"prompt": prompt})
    await stack.discord.wait_for(
        lambda: any(r.target == "output" for r in stack.segmind.stats.requests), timeout=20
    )
    return handle


# --- the store stops answering -----------------------------------------------------------------------


async def test_a_locked_sqlite_file_still_gets_every_command_answered_in_time(
    make_stack: StackFactory, store_kind: str
) -> None:
    if store_kind != "sqlite":
        pytest.skip("a file lock is SQLite's failure; Redis has its own test")
    stack = await make_stack()
    raw = RawStore(stack.config.database_url)
    locker = sqlite3.connect(raw.path, isolation_level=None, timeout=0.1)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        handle = await stack.discord.send_slash_command("imagine", {"prompt": "while locked"})
        await handle.wait_for_callback(timeout=5)
        assert time.monotonic() - started < 3.0
        assert "storage is not responding" in reply_text(handle) and handle.is_ephemeral
        asked = time.monotonic()
        quota = await stack.discord.send_slash_command("quota")
        await quota.wait_for_callback(timeout=5)
        assert time.monotonic() - asked < 3.0
        # A read needs no write lock (WAL): the member's usage is shown while the other process writes.
        assert quota.callback is not None and quota.callback.type == 4 and quota.is_ephemeral
        assert "storage is not responding" not in str(quota.callback.data)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert not stack.segmind.stats.submits
    handle = await stack.imagine(prompt="after the lock", timeout=30)
    assert handle.original is not None and handle.original.attachments
    usage = await stack.bot.quota.usage(USER, stack.discord.guild_id)
    assert usage.used_images == 1 and usage.in_flight == 0


@pytest.fixture
async def redis_proxy() -> TcpProxy:
    url = urlsplit(REDIS_URL)
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 6379)
    await proxy.start()
    yield proxy  # type: ignore[misc]
    await proxy.stop()


async def proxied_redis_url(proxy: TcpProxy, tmp_path: object) -> str:
    direct = await database_url("redis", tmp_path)  # type: ignore[arg-type]
    parts = urlsplit(direct)
    return parts._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()


async def test_a_hung_redis_still_gets_every_command_answered_in_time(
    make_stack: StackFactory, store_kind: str, redis_proxy: TcpProxy, tmp_path: object
) -> None:
    if store_kind != "redis":
        pytest.skip("runs once, through a proxy in front of Redis")
    stack = await make_stack(DATABASE_URL=await proxied_redis_url(redis_proxy, tmp_path))
    redis_proxy.set_mode(ProxyMode.HANG)
    started = time.monotonic()
    handle = await stack.discord.send_slash_command("imagine", {"prompt": "while redis hangs"})
    await handle.wait_for_callback(timeout=5)
    assert time.monotonic() - started < 3.0
    assert "storage is not responding" in reply_text(handle)
    redis_proxy.set_mode(ProxyMode.FORWARD)
    handle = await stack.imagine(prompt="redis is back", timeout=30)
    assert handle.original is not None and handle.original.attachments


async def test_a_store_outage_right_after_the_submit_keeps_following_the_job(
    make_stack: StackFactory, store_kind: str, redis_proxy: TcpProxy, tmp_path: object
) -> None:
    if store_kind != "redis":
        pytest.skip("runs once, through a proxy in front of Redis")
    stack = await make_stack(
        DATABASE_URL=await proxied_redis_url(redis_proxy, tmp_path), JOB_LEASE_SECONDS="3"
    )
    stack.segmind.inject("slow", target="submit", seconds=1.0)
    handle = await stack.discord.send_slash_command("imagine", {"prompt": "billed, so keep it"})
    await stack.discord.wait_for(lambda: bool(stack.segmind.stats.submits), timeout=10)
    redis_proxy.set_mode(ProxyMode.REFUSE)  # Segmind accepted it; its answer arrives while Redis is gone
    await asyncio.sleep(3.0)
    redis_proxy.set_mode(ProxyMode.FORWARD)
    await stack.settled(handle, timeout=40)
    assert handle.original is not None and handle.original.attachments, handle.original
    assert len(stack.segmind.stats.submits) == 1
    job = await wait_for_state(stack, JobState.DELIVERED)
    assert job.segmind_request_id == stack.segmind.stats.submits[0].request_id


# --- nothing stranded --------------------------------------------------------------------------------


async def test_a_reservation_no_saved_job_owns_is_given_back(make_stack: StackFactory) -> None:
    stack = await make_stack()
    limits = QuotaLimits(daily_images=20, max_concurrent=3)
    # What a process that died between reserving and saving leaves behind, ten minutes ago.
    for _ in range(3):
        await stack.bot.store.reserve(USER, 1, limits, time.time() - 600, guild_id=stack.discord.guild_id)
    refused = await stack.discord.send_slash_command("imagine", {"prompt": "stuck behind ghosts"})
    await refused.wait_for_callback()
    assert "already have 3" in reply_text(refused)

    await stack.bot.runner.sweep()
    usage = await stack.bot.quota.usage(USER, stack.discord.guild_id)
    assert usage.in_flight == 0 and usage.used_images == 0
    handle = await stack.imagine(prompt="free again")
    assert handle.original is not None and handle.original.attachments


async def test_one_unreadable_record_does_not_stop_the_sweep(make_stack: StackFactory) -> None:
    stack = await make_stack()
    raw = RawStore(stack.config.database_url)
    await raw.write_job("broken-json", "{not json")
    # A record from a newer version, with a state this one does not know.
    odd = {"id": "unknown-state", "user_id": USER, "request": {}, "state": "paused", "created_at": 1.0}
    await raw.write_job("unknown-state", json.dumps(odd))
    reservation = await stack.bot.quota.reserve(USER, 1, guild_id=stack.discord.guild_id)
    assert isinstance(reservation, Reservation)
    job = JobRecord(
        id=new_job_id(),
        user_id=USER,
        guild_id=stack.discord.guild_id,
        channel_id=stack.discord.channel_id,
        request={"prompt": "resumed despite its neighbours"},
        reservation_id=reservation.id,
        state=JobState.PENDING,
        created_at=time.time(),
        updated_at=time.time(),
    )
    await stack.bot.store.save_job(job)
    await stack.bot.runner.sweep()
    await wait_for_state(stack, JobState.DELIVERED)
    assert len(image_messages(stack)) == 1


async def test_a_process_that_lost_its_lease_posts_nothing(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await imagine_held_at_download(stack, "whose job is it", seconds=2.0)
    job = await latest_job(stack)
    # Another process took the job over (this one's renewals had lapsed) while the image was downloading.
    assert await stack.bot.store.acquire_lease(job.id, "another-process", 60.0, time.time() + 31)
    await asyncio.sleep(4.0)
    assert not image_messages(stack)
    current = await stack.bot.store.get_job(job.id)
    assert current is not None and current.state is JobState.COMPLETED


async def test_a_delivery_that_always_fails_is_retried_then_offered_by_resend(
    make_stack: StackFactory,
) -> None:
    # An upload limit below what any image needs: every delivery attempt fails the same way.
    stack = await make_stack(discord_options={"attachment_size_limit": 60_000}, JOB_LEASE_SECONDS="1")
    handle = await stack.discord.send_slash_command("imagine", {"prompt": "never fits"})
    await handle.wait_for_callback()
    job = await wait_for_state(stack, JobState.UNDELIVERED, timeout=40)
    assert job.delivery_attempts == 3
    assert len(stack.segmind.stats.submits) == 1
    await stack.discord.wait_for(
        lambda: any("could not be posted" in m.content for m in stack.discord.messages.values()), timeout=10
    )
    listing = await stack.discord.send_slash_command("jobs")
    await stack.settled(listing)
    assert listing.original is not None
    labels = [c["label"] for row in listing.original.components for c in row["components"]]
    assert labels == ["Resend"]


async def test_a_rate_limit_discord_py_gave_up_on_is_waited_out(make_stack: StackFactory) -> None:
    stack = await make_stack()
    handle = await imagine_held_at_download(stack, "patience with discord", seconds=1.0)
    # discord.py tries a rate-limited webhook edit five times, then raises; the message is still there.
    stack.discord.inject("edit_original", status=429, count=5, retry_after=0.1)
    await stack.settled(handle, timeout=40)
    assert sum(r.status == 429 for r in stack.discord.requests) == 5
    assert handle.original is not None and handle.original.attachments
    assert len(image_messages(stack)) == 1


# --- what members see and what the records keep ------------------------------------------------------


async def test_jobs_lists_a_job_in_every_state(make_stack: StackFactory) -> None:
    stack = await make_stack()
    now = time.time()
    for offset, state in enumerate(JobState):
        await stack.bot.store.save_job(
            JobRecord(
                id=new_job_id(),
                user_id=OTHER_USER,
                guild_id=None,
                channel_id=None,
                request={"prompt": f"a job that is {state.value}"},
                reservation_id=None,
                state=state,
                created_at=now + offset,
                updated_at=now + offset,
            )
        )
    listing = await stack.discord.send_slash_command("jobs", user_id=OTHER_USER)
    await stack.settled(listing)
    assert listing.callback is not None
    description = listing.callback.data["embeds"][0]["description"]
    assert description.count("a job that is") == len(JobState)


async def test_records_forget_the_interaction_token_once_the_job_is_over(make_stack: StackFactory) -> None:
    stack = await make_stack()
    delivered = await stack.imagine(prompt="delivered")
    assert delivered.original is not None and delivered.original.attachments
    assert (await wait_for_state(stack, JobState.DELIVERED)).interaction_token is None
    blocked = await stack.imagine(prompt="something forbidden")
    assert blocked.original is not None and "content filter" in blocked.original.content
    assert (await wait_for_state(stack, JobState.FAILED)).interaction_token is None


async def test_the_owner_can_delete_a_result_whose_record_aged_out(make_stack: StackFactory) -> None:
    stack = await make_stack()
    handle = await stack.imagine(prompt="short-lived record")
    message = handle.original
    assert message is not None and message.attachments
    await RawStore(stack.config.database_url).delete_job((await wait_for_state(stack, JobState.DELIVERED)).id)

    stranger = await stack.press(message, "delete", user_id=OTHER_USER, permissions=0)
    assert "too old" in reply_text(stranger) and not message.deleted
    await stack.press(message, "delete")
    assert message.deleted


async def test_the_shutdown_log_does_not_count_a_delivered_job_as_left_over(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    stack = await make_stack()
    handle = await imagine_held_at_download(stack, "delivered while stopping", seconds=1.5)
    # The result edit waits out a rate limit, so the shutdown lands while the delivery is under way.
    stack.discord.inject("edit_original", status=429, count=2, retry_after=2.0)
    await stack.discord.wait_for(lambda: any(r.status == 429 for r in stack.discord.requests), timeout=20)
    with caplog.at_level(logging.INFO, logger="cogs.delivery"):
        await stack.bot.close()
    assert handle.original is not None and handle.original.attachments
    stopped = next(r.getMessage() for r in caplog.records if "job runner stopped" in r.getMessage())
    assert "0 job(s) left to resume" in stopped and "1 finished while stopping" in stopped


async def test_a_job_that_cannot_get_a_slot_in_time_is_told_when_to_try_again(
    make_stack: StackFactory,
) -> None:
    # Two requests a minute: the first job's submit and first status check use them both.
    stack = await make_stack(SEGMIND_REQUESTS_PER_MINUTE="2", RATE_LIMIT_MAX_WAIT_SECONDS="1")
    first = await stack.discord.send_slash_command("imagine", {"prompt": "takes the slots"})
    await first.wait_for_callback()
    await stack.discord.wait_for(lambda: stack.segmind.stats.status_polls >= 1, timeout=10)
    second = await stack.discord.send_slash_command("imagine", {"prompt": "no slot left"}, user_id=OTHER_USER)
    await stack.settled(second, timeout=10)
    assert second.original is not None
    text = second.original.content
    assert re.search(r"try again at <t:\d+:T>", text) and "not charged" in text, text
    assert len(stack.segmind.stats.submits) == 1
    assert (await stack.bot.quota.usage(OTHER_USER, stack.discord.guild_id)).in_flight == 0


async def test_an_acknowledgement_whose_answer_is_lost_is_replaced_by_the_failure(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    lost = [1]
    for route in stack.discord.rest.routes:
        if route.name != "callback":
            continue
        handler = route.handler

        async def answer_lost(call: Any, handler: Any = handler) -> Any:
            # Discord takes the job's first progress line, and the bot never hears so: a 5xx, then the
            # retry is told the interaction was acknowledged already.
            reply = await handler(call)
            if lost[0]:
                lost[0] -= 1
                return 500, {"message": "500: Internal Server Error", "code": 0}
            return reply

        route.handler = answer_lost
    handle = await stack.discord.send_slash_command("imagine", {"prompt": "the lost answer"})
    await stack.discord.wait_for(
        lambda: handle.original is not None and not handle.original.content.startswith(PROGRESS_MARKS),
        timeout=20,
    )
    # Not left saying "queued" for a job that will never run; nothing was sent, nothing is charged.
    assert handle.original is not None and "went wrong" in handle.original.content.lower()
    assert stack.segmind.stats.submits == []
    job = await latest_job(stack)
    assert job.state is JobState.FAILED
    usage = await stack.bot.quota.usage(job.user_id, job.guild_id)
    assert usage.used_images == 0 and usage.in_flight == 0
