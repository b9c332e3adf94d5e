"""The `bot_processes` fixture: `python bot.py` as real processes (`devtools.launcher`) against the
in-test stand-ins; each test picks the store (`tests.conftest.database_url`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devtools.launcher import BotLauncher
from devtools.stack import stand_ins
from tests.conftest import CREDENTIALS

__all__ = ["bot_processes"]

# Every process gets these on top of the stand-ins' configuration; a test's start may override them.
BOT_ENV = {
    "SEGMIND_REQUESTS_PER_MINUTE": "600",
    # The stand-in's jobs take about a second, where the bot's first estimates are for real Segmind.
    "SEGMIND_MAX_POLL_SECONDS": "1",
    "QUOTA_DAILY_IMAGES": "20",
    "QUOTA_MAX_CONCURRENT": "10",
    "JOB_LEASE_SECONDS": "2",
    "LOG_LEVEL": "INFO",
}


@pytest.fixture
async def bot_processes(tmp_path: Path) -> AsyncIterator[BotLauncher]:
    settings = CREDENTIALS.segmind_settings(queue_seconds=0.5, seconds_per_step=0.15)
    # A killed bot's gateway session must end quickly, or events would wait for a resume that never comes.
    async with stand_ins(CREDENTIALS, settings, gateway_resume_timeout=0.5) as env:
        launcher = BotLauncher(env, tmp_path, env=BOT_ENV)
        try:
            yield launcher
        finally:
            await launcher.stop_all()


async def wait_for_first_poll(processes: BotLauncher) -> None:
    """Until Segmind has been asked about the first submitted job. The bot checks only after it recorded the
    request id, so a kill from here on is a kill mid-job, not one between Segmind's answer and the record."""

    def polled() -> bool:
        stats = processes.segmind.stats
        if not stats.submits:
            return False
        # At its status URL, or at its result URL (where a busy bot checks a job that has likely ended).
        request_id = stats.submits[0].request_id
        return any(request_id in record.path for record in stats.requests_to("status", "result"))

    await processes.discord.wait_for(polled, timeout=20)
