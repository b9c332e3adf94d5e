"""The loop watchdog: a blocked event loop is logged with how long it was blocked, alone and in the bot."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from pathlib import Path

import pytest

from cogs.app import FULL_COLLECTION_EVERY
from devtools.stack import running_bot, sqlite_url, stand_ins
from services.segmind.inflight import INITIAL_IN_FLIGHT
from services.watchdog import LOAD_FROM_SECONDS, LoopWatchdog
from tests.conftest import CREDENTIALS

BLOCKED = re.compile(r"event loop blocked for (\d+) ms")
BLOCK_SECONDS = 0.4


def blocked_for(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [
        int(match.group(1))
        for record in caplog.records
        if record.levelno == logging.WARNING and (match := BLOCKED.fullmatch(record.getMessage()))
    ]


async def block_the_loop(seconds: float) -> None:
    await asyncio.sleep(0.1)  # the watchdog is asleep in its tick when the loop stops turning
    time.sleep(seconds)  # noqa: ASYNC251 -- the blocking call whose effect the test is about
    await asyncio.sleep(0.2)  # its next tick comes late, and says so


async def test_a_blocked_loop_is_logged_with_how_long_it_was_blocked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="services.watchdog")
    watchdog = LoopWatchdog(threshold_ms=100, tick=0.02)
    watchdog.start()
    try:
        await block_the_loop(BLOCK_SECONDS)
    finally:
        await watchdog.stop()
    stalls = blocked_for(caplog)
    # The tick that was due during the block is late by about the block, less what was left of its sleep.
    assert stalls and max(stalls) >= BLOCK_SECONDS * 1000 / 2, caplog.text
    assert watchdog.longest >= BLOCK_SECONDS / 2
    assert not watchdog.running


async def test_stalls_under_the_threshold_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="services.watchdog")
    # A threshold far above the block: a loaded machine may add to it, but not that much.
    watchdog = LoopWatchdog(threshold_ms=BLOCK_SECONDS * 1000 * 10, tick=0.02)
    watchdog.start()
    try:
        await block_the_loop(BLOCK_SECONDS)
    finally:
        await watchdog.stop()
    assert blocked_for(caplog) == []
    assert watchdog.longest > 0


async def test_a_loop_running_behind_shows_in_its_load_and_is_told_at_every_tick() -> None:
    watchdog = LoopWatchdog(threshold_ms=1000, tick=0.02)
    told: list[float] = []
    watchdog.on_tick = told.append
    watchdog.start()
    try:
        await asyncio.sleep(0.2)
        assert watchdog.load() == 0.0 and told and max(told) < LOAD_FROM_SECONDS
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # noqa: ASYNC251 -- the blocking call whose effect the test is about
        await asyncio.sleep(0)
        await asyncio.sleep(0.03)
        assert watchdog.load() > 0.2
    finally:
        await watchdog.stop()
    # Smoothed: one late tick counts for a part of its lateness, and on-time ticks wear it off.
    assert max(told) < 0.3


def test_the_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threshold_ms"):
        LoopWatchdog(threshold_ms=0)


async def test_the_bot_watches_its_loop_from_start_to_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.watchdog")
    async with (
        stand_ins(CREDENTIALS) as env,
        running_bot(env, sqlite_url(tmp_path), LOOP_STALL_WARNING_MS="100") as stack,
    ):
        assert stack.bot.watchdog.running
        assert stack.bot.watchdog.threshold_ms == 100
        await block_the_loop(BLOCK_SECONDS)
        # Requests to Segmind follow the loop: fewer at once while it ran behind.
        assert stack.bot.segmind.in_flight.limit < INITIAL_IN_FLIGHT
        await stack.stop()
        assert not stack.bot.watchdog.running
    assert any(stall >= BLOCK_SECONDS * 1000 / 2 for stall in blocked_for(caplog)), caplog.text


async def test_the_bot_keeps_full_collections_rare_and_short(tmp_path: Path) -> None:
    threshold = gc.get_threshold()
    try:
        async with stand_ins(CREDENTIALS) as env, running_bot(env, sqlite_url(tmp_path)):
            # What the set-up bot holds is left out of the scans, and full passes come ten times as rarely.
            assert gc.get_freeze_count() > 0
            assert gc.get_threshold() == (threshold[0], threshold[1], FULL_COLLECTION_EVERY)
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
