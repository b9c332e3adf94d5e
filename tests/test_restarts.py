"""Nothing lost: the real bot process killed, stopped and restarted mid-job, on either store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from devtools.fakes.discord.server import InteractionHandle
from devtools.launcher import BotLauncher, BotProcess
from tests.conftest import database_url
from tests.processes import bot_processes, wait_for_first_poll

__all__ = ["bot_processes"]

STORES = ["sqlite", "redis"]


def deliveries(processes: BotLauncher, handle: InteractionHandle) -> int:
    """How many times images were posted for this interaction (its original response or the channel)."""
    uploads = [
        r
        for r in processes.discord.requests
        if r.files
        and (handle.token in r.path or r.path.startswith(f"/channels/{handle.channel_id}/messages"))
    ]
    return len(uploads)


async def wait_for_submit(processes: BotLauncher, count: int = 1) -> None:
    await processes.discord.wait_for(lambda: len(processes.segmind.stats.submits) >= count, timeout=20)


async def start_one_job(
    processes: BotLauncher, database: str, prompt: str, **options: object
) -> tuple[BotProcess, InteractionHandle]:
    """The first bot process, with one /imagine acknowledged."""
    first = await processes.start(database, ready_count=1)
    handle = await processes.discord.send_slash_command("imagine", {"prompt": prompt, **options})
    await handle.wait_for_callback()
    return first, handle


async def wait_for_images(processes: BotLauncher, handle: InteractionHandle, timeout: float = 40) -> None:
    await processes.discord.wait_for(lambda: deliveries(processes, handle) >= 1, timeout=timeout)
    # Give a duplicate delivery, if there were one, time to show up.
    await asyncio.sleep(1.0)


@pytest.mark.parametrize("store", STORES)
async def test_sigkill_mid_generation_then_restart_delivers_once(
    bot_processes: BotLauncher, tmp_path: Path, store: str
) -> None:
    database = await database_url(store, tmp_path)
    first, handle = await start_one_job(bot_processes, database, "survives a crash", samples=2)
    await wait_for_first_poll(bot_processes)
    first.kill()
    await first.wait(10)

    second = await bot_processes.start(database, ready_count=2)
    await wait_for_images(bot_processes, handle)

    assert len(bot_processes.segmind.stats.submits) == 1
    assert deliveries(bot_processes, handle) == 1
    assert handle.original is not None and len(handle.original.attachments) == 2
    assert "resumed, following" in second.log()


@pytest.mark.parametrize("store", STORES)
async def test_sigterm_stops_within_ten_seconds_and_the_job_resumes(
    bot_processes: BotLauncher, tmp_path: Path, store: str
) -> None:
    database = await database_url(store, tmp_path)
    first, handle = await start_one_job(bot_processes, database, "a clean stop")
    await wait_for_submit(bot_processes)
    stopping = time.monotonic()
    first.terminate()
    assert await first.wait(10) == 0
    assert time.monotonic() - stopping < 10
    log = first.log()
    assert "SIGTERM received" in log and "Traceback" not in log

    await bot_processes.start(database, ready_count=2)
    await wait_for_images(bot_processes, handle)
    assert len(bot_processes.segmind.stats.submits) == 1
    assert deliveries(bot_processes, handle) == 1


@pytest.mark.parametrize("store", STORES)
async def test_a_job_killed_before_its_submit_is_submitted_once_after_restart(
    bot_processes: BotLauncher, tmp_path: Path, store: str
) -> None:
    database = await database_url(store, tmp_path)
    bot_processes.segmind.inject("rate_limit", target="submit", reset_after=4.0)
    first, handle = await start_one_job(bot_processes, database, "waiting its turn")
    await bot_processes.discord.wait_for(
        lambda: bool(bot_processes.segmind.stats.requests_to("submit")), timeout=20
    )
    first.kill()
    await first.wait(10)
    assert bot_processes.segmind.stats.submits == []

    await bot_processes.start(database, ready_count=2)
    await wait_for_images(bot_processes, handle)
    assert len(bot_processes.segmind.stats.submits) == 1
    assert deliveries(bot_processes, handle) == 1


@pytest.mark.parametrize("store", STORES)
async def test_sigterm_while_a_submit_hangs_never_submits_twice(
    bot_processes: BotLauncher, tmp_path: Path, store: str
) -> None:
    database = await database_url(store, tmp_path)
    # Segmind takes the job at once but its answer is slow to come back.
    bot_processes.segmind.inject("slow", target="submit", seconds=20.0)
    first, handle = await start_one_job(bot_processes, database, "answer in doubt")
    await wait_for_submit(bot_processes)
    stopping = time.monotonic()
    first.terminate()
    assert await first.wait(15) == 0
    assert time.monotonic() - stopping < 10

    await bot_processes.start(database, ready_count=2)
    original = handle.original
    await bot_processes.discord.wait_for(
        lambda: (
            original is not None and not original.loading and not original.content.startswith(("⏳", "📨"))
        ),
        timeout=20,
    )
    await asyncio.sleep(3.0)  # a second submit, were there one, would have been sent by now
    assert len(bot_processes.segmind.stats.requests_to("submit")) == 1
    assert deliveries(bot_processes, handle) == 0
    assert original is not None and "restarted while sending" in original.content
