"""Time to acknowledge /imagine: from the interaction's creation to the deferral reaching Discord.

The real bot runs in this process, on the same event loop as the Discord and Segmind stand-ins, as in
the end-to-end tests; the figure therefore includes the stand-in's gateway dispatch and its handling of
the callback, which real Discord does elsewhere.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from devtools.bench.report import ACK_HEADERS, Table, median, millis, percentile
from devtools.fakes.discord.models import CALLBACK_DEFERRED_CHANNEL_MESSAGE, InteractionHandle
from devtools.fakes.discord.server import DEFAULT_USER_ID
from devtools.stack import (
    REDIS_URL,
    BotStack,
    Credentials,
    drop_redis_keys,
    redis_answers,
    redis_url,
    running_bot,
    sqlite_url,
    stand_ins,
)

STARTUP_TIMEOUT = 20.0
ACK_TIMEOUT = 10.0
SETTLE_TIMEOUT = 60.0
# Quick jobs keep the bot idle between the one-at-a-time commands without making the run long.
SEGMIND_SETTINGS = {"queue_seconds": 0.2, "seconds_per_step": 0.01, "workers": 4}
BOT_ENV = {
    "SEGMIND_REQUESTS_PER_MINUTE": "6000",
    # High enough that no command is refused: the figure is the path that reserves and defers.
    "QUOTA_DAILY_IMAGES": "10000",
    "QUOTA_MAX_CONCURRENT": "100",
    "LOG_LEVEL": "WARNING",
}


@dataclass
class AckRun:
    store: str
    mode: str
    acks: list[float] = field(default_factory=list)
    refused: int = 0  # answered, but not with a deferral (e.g. a quota refusal)


async def measure_acks(commands: int, burst: int) -> tuple[list[AckRun], list[str]]:
    """SQLite always; Redis when one answers. Returns the runs and notes on what was skipped."""
    runs: list[AckRun] = []
    notes: list[str] = []
    stores = ["sqlite"]
    if await redis_answers():
        stores.append("redis")
    else:
        notes.append(f"No Redis answered at {REDIS_URL}, so only SQLite was measured.")
    credentials = Credentials()
    for store in stores:
        with tempfile.TemporaryDirectory(prefix="bench-ack-") as tmp:
            database = sqlite_url(Path(tmp)) if store == "sqlite" else redis_url("bench-ack")
            try:
                async with (
                    stand_ins(credentials, credentials.segmind_settings(**SEGMIND_SETTINGS)) as env,
                    running_bot(env, database, startup_timeout=STARTUP_TIMEOUT, **BOT_ENV) as stack,
                ):
                    # One command first, not counted: the first one pays for lazy imports and warm caches.
                    await _one_at_a_time(stack, AckRun(store, "warm-up"), 1, first_user=0)
                    runs.append(await _one_at_a_time(stack, AckRun(store, "one at a time"), commands, 1))
                    # Twice: the first burst also pays for growing the store's connection pool.
                    first_user = 1 + commands
                    runs.append(await _all_at_once(stack, AckRun(store, "first burst"), burst, first_user))
                    first_user += burst
                    runs.append(await _all_at_once(stack, AckRun(store, "second burst"), burst, first_user))
            finally:
                await drop_redis_keys(database)
    return runs, notes


def ack_table(runs: list[AckRun], notes: list[str]) -> Table:
    table = Table("Time to acknowledge /imagine", ACK_HEADERS)
    names = {"sqlite": "SQLite", "redis": "Redis"}
    for run in runs:
        mode = {
            "one at a time": "one at a time, each job finished before the next command",
            "first burst": "all at once, from different members",
            "second burst": "all at once again, once those jobs finished",
        }.get(run.mode, run.mode)
        if run.refused:
            mode += f" ({run.refused} not deferred)"
        table.rows.append(
            [
                names.get(run.store, run.store),
                mode,
                str(len(run.acks)),
                millis(median(run.acks)),
                millis(percentile(run.acks, 0.95)),
                millis(max(run.acks)) if run.acks else "–",
            ]
        )
    table.notes.append(
        "From the interaction's creation in the Discord stand-in to the arrival of the bot's deferral "
        "callback, with the real bot in-process (same event loop as the stand-ins). Before deferring the "
        "bot reads the credits flag and reserves quota in the store. One uncounted command warms up first. "
        "The first burst also opens the store's extra connections (Redis: one per concurrent command)."
    )
    table.notes += notes
    return table


async def _send(stack: BotStack, number: int) -> InteractionHandle:
    return await stack.discord.send_slash_command(
        "imagine",
        {"prompt": f"acknowledgement benchmark #{number}", "width": 512, "height": 512},
        user_id=DEFAULT_USER_ID + number,
        username=f"member{number}",
    )


def _record(run: AckRun, handle: InteractionHandle) -> None:
    callback = handle.callback
    assert callback is not None
    run.acks.append(callback.time - handle.created_at)
    if callback.type != CALLBACK_DEFERRED_CHANNEL_MESSAGE:
        run.refused += 1


async def _one_at_a_time(stack: BotStack, run: AckRun, count: int, first_user: int) -> AckRun:
    for number in range(first_user, first_user + count):
        handle = await _send(stack, number)
        await handle.wait_for_callback(ACK_TIMEOUT)
        _record(run, handle)
        await stack.settled(handle, SETTLE_TIMEOUT)
    return run


async def _all_at_once(stack: BotStack, run: AckRun, count: int, first_user: int) -> AckRun:
    # Dispatching does not yield to the bot, so every interaction is out before the first is handled.
    handles = [await _send(stack, number) for number in range(first_user, first_user + count)]
    for handle in handles:
        await handle.wait_for_callback(ACK_TIMEOUT)
        _record(run, handle)
    for handle in handles:
        await stack.settled(handle, SETTLE_TIMEOUT)
    return run
