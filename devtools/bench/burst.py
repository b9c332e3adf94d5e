"""A community's burst on one process: many /imagine within one second, against `python bot.py`.

The stand-ins run in this process (the driver), the bot as a subprocess of its own (`BotLauncher`), so the
bot's CPU time and memory are its own and can be read from /proc. Every command comes from a different
member, at evenly spread moments of one second, and the run lasts until every job is answered. Measured:

* acknowledgement: from the interaction's creation at the Discord stand-in to the arrival of the bot's
  deferral there (the job is recorded in the store before the bot defers);
* the longest event-loop stall, from the bot's own watchdog (started with a low `LOOP_STALL_WARNING_MS`,
  its "event loop blocked for N ms" warnings read from the log);
* the bot's CPU seconds per job (utime + stime from /proc/<pid>/stat, from just before the burst to the
  last delivery: intake, polling, progress edits, downloads, image checks, uploads) and its peak RSS
  (VmHWM from /proc/<pid>/status, read before it exits);
* delivery lag: from the moment the job is COMPLETED on the Segmind stand-in's timeline (its `ends_at`)
  to the arrival of the upload carrying its images at the Discord stand-in.

The driver watches its own event loop too: when the stand-ins fall behind (their loop late, or their CPU
near a whole core), the figures say so, since then part of each measured time is theirs, not the bot's.
The stand-in's picture renderer is memoised per image shape for the run (`shared_renders`): rendering a
thousand distinct pictures would cost the driver seconds of CPU on the very core the bot needs, and
every job's bytes still travel and are checked one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from devtools.bench.process import cpu_seconds, machine_cpu_seconds, peak_rss
from devtools.bench.report import Table, mebibytes, median, millis, percentile, seconds
from devtools.fakes.discord.models import InteractionHandle
from devtools.fakes.discord.server import DEFAULT_USER_ID
from devtools.fakes.segmind import jobs as segmind_jobs
from devtools.launcher import BotLauncher, BotProcess
from devtools.stack import (
    Credentials,
    StandIns,
    drop_redis_keys,
    is_answered,
    redis_url,
    sqlite_url,
    stand_ins,
)

Store = Literal["sqlite", "redis"]

STALL_WARNING_MS = 10
SPREAD_SECONDS = 1.0
ACK_TIMEOUT = 30.0
WARM_UP_TIMEOUT = 60.0
# Generous: a slow bot is what a benchmark is there to show, not a reason to give up on it.
DELIVERY_TIMEOUT = 300.0
DRIVER_TICK = 0.01
WAIT_INTERVAL = 0.1
# Past these the driver itself is a bottleneck of what was measured, and the figures carry a note.
DRIVER_LAG_NOTE = 0.02
DRIVER_BUSY_NOTE = 0.8
OTHERS_BUSY_NOTE = 0.1
BOT_ENV = {
    "SEGMIND_REQUESTS_PER_MINUTE": "1000000",
    # Every member may run: the figures are the path that reserves, records, defers and delivers.
    "QUOTA_DAILY_IMAGES": "1000000",
    "QUOTA_MAX_CONCURRENT": "1000000",
    "LOOP_STALL_WARNING_MS": str(STALL_WARNING_MS),
    "LOG_LEVEL": "INFO",
}
SEGMIND_SETTINGS: dict[str, object] = {"queue_seconds": 2.0, "seconds_per_step": 0.2, "workers": 2000}
_STALL = re.compile(r"event loop blocked for (\d+) ms")


@dataclass
class BurstFigures:
    """One burst's figures; times in seconds, sizes in bytes."""

    store: str
    commands: int
    delivered: int
    failed: int  # answered without images: refused, or the job failed
    ack_p50: float
    ack_p99: float
    ack_max: float
    sent_over: float  # from the first command to the last, as the stand-in dispatched them
    longest_stall: float | None  # None: the bot's log holds no stall warning over STALL_WARNING_MS
    stall_warnings: int
    cpu_per_job: float
    peak_rss: int
    delivery_lag_mean: float
    delivery_lag_p95: float
    progress_edits_per_job: float  # edits of the original response without files (the progress line)
    status_polls_per_job: float  # Segmind status checks
    results_per_job: float  # Segmind result requests: one per job, more when checks go to the result URL
    driver_lag_max: float  # the driver's own event loop, during the burst
    driver_cpu_share: float  # the driver's CPU time over wall time, during the burst (1.0 = one core)
    others_cpu_share: float  # every other process on the machine, likewise: their load skews every figure
    notes: list[str] = field(default_factory=list)


async def measure_burst(
    commands: int,
    *,
    bot_env: dict[str, str],
    segmind: dict[str, object],
    store: Store = "sqlite",
    shared_renders: bool = True,
    keep_log: Path | None = None,
) -> BurstFigures:
    """Starts the stand-ins and `python bot.py` on `store`, sends `commands` /imagine from distinct members
    evenly over one second, waits until every one is answered, and measures.

    `bot_env` adds to or overrides the bot's environment (`BOT_ENV`; a `DATABASE_URL` there replaces the
    store `store` names), `segmind` is passed to the Segmind stand-in's settings as it is. `keep_log`
    names a file to copy the bot's log to, for a look at what it did.
    """
    credentials = Credentials()
    settings = credentials.segmind_settings(**segmind)
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        folder = Path(tmp)
        database = bot_env.get("DATABASE_URL") or (
            sqlite_url(folder) if store == "sqlite" else redis_url("bench-burst")
        )
        try:
            with _memoised_renders(shared_renders):
                async with stand_ins(credentials, settings, gateway_resume_timeout=0.5) as env:
                    launcher = BotLauncher(env, folder, env={**BOT_ENV, **bot_env})
                    try:
                        bot = await launcher.start(database)
                        return await _burst(env, bot, commands, _store_name(database))
                    finally:
                        await launcher.stop_all()
                        if keep_log is not None and launcher.started:
                            _copy_log(launcher.started[-1], keep_log)
        finally:
            await drop_redis_keys(database)


async def _burst(env: StandIns, bot: BotProcess, commands: int, store: str) -> BurstFigures:
    discord = env.discord
    await discord.wait_for(lambda: bool(discord.synced_commands.get(discord.guild_id)), 20)
    # One uncounted job first: it pays for lazy imports, first connections and warm caches.
    warm_up = await _send(env, 0, "warm-up")
    await discord.wait_for(lambda: is_answered(warm_up), WARM_UP_TIMEOUT)
    warm_up_uploads = len(_uploads(env))
    warm_up_requests = len(discord.requests)
    warm_up_results = len(env.segmind.stats.requests_to("result"))

    watcher = _DriverWatch()
    cpu_before = cpu_seconds(bot.process.pid)
    machine_before, wall_before, driver_before = machine_cpu_seconds(), time.monotonic(), time.process_time()
    with _driver_collector_paused():
        async with watcher.watching():
            handles = await _send_spread(env, commands)
            await _wait_for_each(handles, lambda h: h.acknowledged, ACK_TIMEOUT)
            await _wait_for_each(handles, is_answered, DELIVERY_TIMEOUT)
    cpu_after = cpu_seconds(bot.process.pid)
    machine_used = machine_cpu_seconds() - machine_before
    others = machine_used - (cpu_after - cpu_before) - (time.process_time() - driver_before)
    others_share = max(0.0, others) / (time.monotonic() - wall_before)
    rss = peak_rss(bot.process.pid)
    await bot.end(signal.SIGTERM, timeout=30)

    acks = [h.callback.time - h.created_at for h in handles if h.callback is not None]
    delivered = [h for h in handles if h.original is not None and h.original.attachments]
    delivered_ids = {h.id for h in delivered}
    lags = _delivery_lags(env, delivered, skip=warm_up_uploads)
    stalls = [int(ms) / 1000 for ms in _STALL.findall(bot.log())]
    figures = BurstFigures(
        store=store,
        commands=commands,
        delivered=len(delivered),
        failed=len(handles) - len(delivered),
        ack_p50=median(acks),
        ack_p99=percentile(acks, 0.99),
        ack_max=max(acks),
        sent_over=handles[-1].created_at - handles[0].created_at,
        longest_stall=max(stalls) if stalls else None,
        stall_warnings=len(stalls),
        cpu_per_job=(cpu_after - cpu_before) / commands,
        peak_rss=rss,
        delivery_lag_mean=sum(lags) / len(lags) if lags else float("nan"),
        delivery_lag_p95=percentile(lags, 0.95),
        progress_edits_per_job=_progress_edits(env, skip=warm_up_requests) / commands,
        status_polls_per_job=_status_polls(env, handles) / commands,
        results_per_job=(len(env.segmind.stats.requests_to("result")) - warm_up_results) / commands,
        driver_lag_max=watcher.lag_max,
        driver_cpu_share=watcher.cpu_share,
        others_cpu_share=others_share,
    )
    figures.notes += _driver_notes(figures, watcher)
    figures.notes += _failure_notes([h for h in handles if h.id not in delivered_ids])
    return figures


def _failure_notes(failed: list[InteractionHandle]) -> list[str]:
    """What the members without images were told, most common first."""
    answers: Counter[str] = Counter()
    for handle in failed:
        text = handle.original.content if handle.original is not None else "(no answer)"
        answers[" ".join(text.split())[:120]] += 1
    return [f"{count} member(s) were told: {text}" for text, count in answers.most_common(5)]


async def _send(env: StandIns, number: int, label: str) -> InteractionHandle:
    # The prompt names the command, so its Segmind job can be found again by the prompt it carries.
    return await env.discord.send_slash_command(
        "imagine",
        {"prompt": _prompt(number, label)},
        user_id=DEFAULT_USER_ID + 1 + number,
        username=f"member{number}",
    )


def _prompt(number: int, label: str) -> str:
    return f"burst benchmark {label} #{number}"


async def _send_spread(env: StandIns, commands: int) -> list[InteractionHandle]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    handles: list[InteractionHandle] = []
    for number in range(1, commands + 1):
        # Sleeping only when ahead of schedule: a driver that falls behind sends at once to catch up.
        delay = started + SPREAD_SECONDS * (number - 1) / commands - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        handles.append(await _send(env, number, "burst"))
    return handles


async def _wait_for_each(
    handles: list[InteractionHandle], done: Callable[[InteractionHandle], bool], timeout: float
) -> None:
    """Until `done` holds for every handle, checked a few times a second.

    Not the stand-in's own `wait_for`, which checks again at every request it answers: over a thousand
    handles, that check would cost the stand-ins more CPU than answering the requests.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = list(handles)
    while pending:
        pending = [handle for handle in pending if not done(handle)]
        if not pending:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(handles)} commands not answered within {timeout:g} s")
        await asyncio.sleep(WAIT_INTERVAL)


def _uploads(env: StandIns) -> list[Any]:
    return [request for request in env.discord.requests if request.files]


def _delivery_lags(env: StandIns, delivered: list[InteractionHandle], *, skip: int) -> list[float]:
    """For each delivered job: its upload's arrival at Discord minus its completion on Segmind's timeline."""
    prompts = {_prompt_of(record.payload): record.request_id for record in env.segmind.stats.submits}
    # The stand-in keeps each job's timeline; completion is a moment on it, not an event it records.
    timelines = env.segmind._jobs
    uploads: dict[str, float] = {}
    for request in _uploads(env)[skip:]:
        # Edits of the original response: /webhooks/{application id}/{interaction token}/messages/@original
        parts = request.path.split("/")
        if len(parts) > 3 and parts[1] == "webhooks":
            uploads.setdefault(parts[3], request.time)
    lags = []
    for handle in delivered:
        request_id = prompts.get(_prompt(_number(handle), "burst"))
        job = timelines.get(request_id) if request_id else None
        arrived = uploads.get(handle.token)
        if job is not None and arrived is not None:
            lags.append(arrived - job.ends_at)
    return lags


def _progress_edits(env: StandIns, *, skip: int) -> int:
    return sum(
        1 for request in env.discord.requests[skip:] if request.route == "edit_original" and not request.files
    )


def _status_polls(env: StandIns, handles: list[InteractionHandle]) -> int:
    prompts = {_prompt(_number(handle), "burst") for handle in handles}
    polls = env.segmind.stats.status_polls_by_id
    return sum(
        polls[record.request_id]
        for record in env.segmind.stats.submits
        if _prompt_of(record.payload) in prompts
    )


def _prompt_of(payload: dict[str, Any]) -> str:
    return str(payload.get("prompt", ""))


def _number(handle: InteractionHandle) -> int:
    return int(handle.user["id"]) - DEFAULT_USER_ID - 1


def _copy_log(bot: BotProcess, to: Path) -> None:
    to.write_text(bot.log())


def _store_name(database: str) -> str:
    return "Redis" if database.startswith(("redis:", "rediss:")) else "SQLite"


@contextlib.contextmanager
def _driver_collector_paused() -> Iterator[None]:
    """No garbage collection in this process while the burst runs.

    The stand-ins' heap grows with every request they record, and a full collection of it in the middle
    of a burst stopped their loop for 70 ms: every acknowledgement or upload arriving meanwhile was timed
    late, as if the bot had been slow. What exists before the burst is frozen out of collections, and the
    burst's own garbage is collected once it is over."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
        gc.collect()


class _DriverWatch:
    """How late this process's own loop woke, and how busy it was, while the burst ran."""

    def __init__(self) -> None:
        self.lag_max = 0.0
        self.lags: list[float] = []
        self.cpu_share = 0.0

    @contextlib.asynccontextmanager
    async def watching(self) -> Any:
        task = asyncio.create_task(self._tick())
        wall, cpu = time.monotonic(), time.process_time()
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.cpu_share = (time.process_time() - cpu) / max(1e-9, time.monotonic() - wall)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + DRIVER_TICK
            await asyncio.sleep(DRIVER_TICK)
            late = loop.time() - expected
            self.lags.append(late)
            self.lag_max = max(self.lag_max, late)


def _driver_notes(figures: BurstFigures, watcher: _DriverWatch) -> list[str]:
    notes = []
    lag_p99 = percentile(watcher.lags, 0.99)
    if lag_p99 > DRIVER_LAG_NOTE or figures.driver_lag_max > figures.ack_p99:
        notes.append(
            "The stand-ins' own loop (this process) was late by up to "
            f"{figures.driver_lag_max * 1000:.0f} ms "
            f"(p99 {lag_p99 * 1000:.0f} ms): part of the acknowledgement and delivery times is theirs."
        )
    if figures.driver_cpu_share > DRIVER_BUSY_NOTE:
        notes.append(
            f"The stand-ins used {figures.driver_cpu_share:.0%} of a core during the burst, competing with "
            "the bot for the machine's CPUs."
        )
    if figures.others_cpu_share > OTHERS_BUSY_NOTE:
        notes.append(
            f"Other processes on the machine used {figures.others_cpu_share:.0%} of a core meanwhile: "
            "every figure here is worse than on a quiet machine."
        )
    if figures.sent_over > SPREAD_SECONDS * 1.2:
        notes.append(f"The commands went out over {figures.sent_over:.2f} s, not {SPREAD_SECONDS:g} s.")
    return notes


@contextlib.contextmanager
def _memoised_renders(enabled: bool) -> Iterator[None]:
    """The Segmind stand-in renders one picture per image shape for the run, instead of one per job."""
    if not enabled:
        yield
        return
    original = segmind_jobs.render_sample

    @functools.lru_cache(maxsize=64)
    def render(width: int, height: int, samples: int, index: int) -> bytes:
        return original(seed=0, index=index, samples=samples, width=width, height=height, prompt="burst")

    def shared(*, seed: int, index: int, samples: int, width: int, height: int, prompt: str) -> bytes:
        return render(width, height, samples, index)

    segmind_jobs.render_sample = shared  # type: ignore[assignment]
    try:
        yield
    finally:
        segmind_jobs.render_sample = original  # type: ignore[assignment]


def figures_lines(figures: BurstFigures) -> list[str]:
    """The figures as a few readable lines (for a terminal; `python -m devtools.bench` makes the tables)."""
    stall = (
        f"none over {STALL_WARNING_MS} ms"
        if figures.longest_stall is None
        else f"{figures.longest_stall * 1000:.0f} ms"
    )
    return [
        f"{figures.store}: {figures.commands} commands over {figures.sent_over:.2f} s; "
        f"delivered {figures.delivered}, failed {figures.failed}",
        f"ack p50 {figures.ack_p50 * 1000:.1f} ms, p99 {figures.ack_p99 * 1000:.1f} ms, "
        f"max {figures.ack_max * 1000:.1f} ms",
        f"longest loop stall {stall} ({figures.stall_warnings} warnings)",
        f"bot CPU {figures.cpu_per_job * 1000:.2f} ms per job, peak RSS {figures.peak_rss / 2**20:.0f} MiB",
        f"delivery lag mean {figures.delivery_lag_mean:.3f} s, p95 {figures.delivery_lag_p95:.3f} s",
        f"per job: {figures.progress_edits_per_job:.2f} progress edits, "
        f"{figures.status_polls_per_job:.2f} Segmind status checks, {figures.results_per_job:.2f} requests at the "
        "result URL (checks there included)",
        f"driver: loop late up to {figures.driver_lag_max * 1000:.0f} ms, "
        f"CPU {figures.driver_cpu_share:.0%} of a core; other processes {figures.others_cpu_share:.0%}",
        *figures.notes,
    ]


BURST_HEADERS = (
    "store",
    "commands",
    "delivered (failed)",
    "acknowledged, p50 / p99 / max",
    "longest loop stall",
    "bot CPU per job",
    "peak RSS",
    "delivery lag, mean (p95)",
)


def burst_table(runs: list[BurstFigures]) -> Table:
    """The runs as one table for `python -m devtools.bench`, their notes under it."""
    table = Table("A burst of /imagine on one process", BURST_HEADERS)
    for figures in runs:
        table.rows.append(
            [
                figures.store,
                f"{figures.commands} in {figures.sent_over:.2f} s",
                f"{figures.delivered} ({figures.failed})",
                " / ".join(millis(value) for value in (figures.ack_p50, figures.ack_p99, figures.ack_max)),
                "–" if figures.longest_stall is None else millis(figures.longest_stall),
                millis(figures.cpu_per_job),
                mebibytes(figures.peak_rss),
                f"{seconds(figures.delivery_lag_mean)} ({seconds(figures.delivery_lag_p95)})",
            ]
        )
        table.notes += [f"{figures.store}: {note}" for note in figures.notes]
    table.notes.insert(
        0,
        "`python bot.py` against the stand-ins (this process), each command from another member, spread "
        "evenly over one second; acknowledged = interaction created → deferral at the Discord stand-in; "
        f"stalls from the bot's own watchdog (LOOP_STALL_WARNING_MS={STALL_WARNING_MS}); CPU = utime + stime "
        "of the bot from just before the burst to its last delivery, over the commands; delivery lag = "
        "COMPLETED on the Segmind stand-in's timeline → the upload's arrival at the Discord stand-in.",
    )
    return table


async def measure_burst_in_a_fresh_driver(
    commands: int, *, bot_env: dict[str, str], segmind: dict[str, object], store: Store = "sqlite"
) -> BurstFigures:
    """`measure_burst` in a driver process of its own, started for this burst alone.

    The stand-ins live in the driver: after a quarter of an hour of other workloads, its heap and its
    records of every request make its own loop slower, and a thousand commands in a second measure that
    as much as the bot. A fresh driver measures the bot."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtools.bench.burst",
        "--commands",
        str(commands),
        "--store",
        store,
        "--bot-env",
        json.dumps(bot_env),
        "--segmind",
        json.dumps(segmind),
        "--json",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the burst's driver exited with status {process.returncode}")
    return BurstFigures(**json.loads(out))


async def _main(
    commands: int, store: Store, bot_env: dict[str, str], segmind: dict[str, object], as_json: bool
) -> None:
    figures = await measure_burst(commands, bot_env=bot_env, segmind=segmind, store=store)
    print(json.dumps(asdict(figures)) if as_json else "\n".join(figures_lines(figures)))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m devtools.bench.burst", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--bot-env", type=json.loads, default={}, help="JSON object: the bot's environment")
    parser.add_argument(
        "--segmind",
        type=json.loads,
        default=SEGMIND_SETTINGS,
        help="JSON object: the Segmind stand-in's settings",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    arguments = parser.parse_args()
    asyncio.run(
        _main(arguments.commands, arguments.store, arguments.bot_env, arguments.segmind, arguments.json)
    )
