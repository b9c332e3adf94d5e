"""Shutdown: SIGTERM to process exit for `python bot.py`, idle and with a job waiting on Segmind.

Each run starts fresh stand-ins, a fresh SQLite store and a new bot process, so no run inherits a job
left unfinished by the one before.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from devtools.bench.report import SHUTDOWN_HEADERS, Table, median, seconds
from devtools.launcher import BotLauncher
from devtools.stack import Credentials, sqlite_url, stand_ins

EXIT_TIMEOUT = 30.0
# Long enough that the job is still queued or generating when the signal arrives.
SEGMIND_SETTINGS = {"queue_seconds": 2.0, "seconds_per_step": 0.2}
# After the submit is recorded, let the bot write it down and settle into its wait for the next poll.
IN_FLIGHT_PAUSE = 0.5
BOT_ENV = {
    "SEGMIND_REQUESTS_PER_MINUTE": "600",
    "QUOTA_DAILY_IMAGES": "20",
    "QUOTA_MAX_CONCURRENT": "10",
    "JOB_LEASE_SECONDS": "2",
    "LOG_LEVEL": "INFO",
}


@dataclass
class ShutdownFigures:
    state: str
    durations: list[float] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)
    tracebacks: int = 0  # runs whose log holds a traceback


async def measure_shutdown(runs: int) -> list[ShutdownFigures]:
    idle = ShutdownFigures("idle (connected, no job)")
    busy = ShutdownFigures("a job in flight (submitted, waiting on Segmind)")
    for _ in range(runs):
        await _one_run(idle, with_job=False)
        await _one_run(busy, with_job=True)
    return [idle, busy]


def shutdown_table(figures: list[ShutdownFigures]) -> Table:
    table = Table("Shutdown", SHUTDOWN_HEADERS)
    for entry in figures:
        codes = ", ".join(str(code) for code in sorted(set(entry.exit_codes)))
        if entry.tracebacks:
            codes += f" ({entry.tracebacks} run(s) logged a traceback)"
        table.rows.append(
            [
                entry.state,
                str(len(entry.durations)),
                seconds(median(entry.durations)),
                seconds(max(entry.durations)) if entry.durations else "–",
                codes,
            ]
        )
    table.notes.append(
        "`python bot.py` as a subprocess against the stand-ins, SQLite store; from sending SIGTERM to the "
        "process's exit as seen by its parent. The job is sent as /imagine and signalled "
        f"{IN_FLIGHT_PAUSE:g} s after Segmind recorded its submit."
    )
    return table


async def _one_run(figures: ShutdownFigures, *, with_job: bool) -> None:
    credentials = Credentials()
    segmind_settings = credentials.segmind_settings(**SEGMIND_SETTINGS)
    with tempfile.TemporaryDirectory(prefix="bench-shutdown-") as tmp:
        async with stand_ins(credentials, segmind_settings, gateway_resume_timeout=0.5) as env:
            discord, segmind = env.discord, env.segmind
            launcher = BotLauncher(env, Path(tmp), env=BOT_ENV)
            try:
                bot = await launcher.start(sqlite_url(Path(tmp)))
                await discord.wait_for(lambda: bool(discord.synced_commands.get(discord.guild_id)), 20)
                if with_job:
                    handle = await discord.send_slash_command("imagine", {"prompt": "a shutdown benchmark"})
                    await handle.wait_for_callback(10)
                    await discord.wait_for(lambda: bool(segmind.stats.submits), 20)
                    await asyncio.sleep(IN_FLIGHT_PAUSE)
                started = time.monotonic()
                bot.terminate()
                code = await bot.wait(EXIT_TIMEOUT)
                figures.durations.append(time.monotonic() - started)
                figures.exit_codes.append(code)
                if "Traceback" in bot.log():
                    figures.tracebacks += 1
            finally:
                await launcher.stop_all()
