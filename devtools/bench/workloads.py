"""The member-facing workloads, each run twice: the bot as it is, and the same bot polling every 1 s.

Every run starts fresh stand-ins in this process and the bot as `python bot.py` (one process, or one per
shard), sends the workload's /imagine commands at their times from their members, and waits until every
one has its final answer. What each job cost and how late it was is read from the stand-ins' own records:

* delivered after: from the job's end on the Segmind stand-in (its timeline's `ends_at`) to the arrival of
  the upload of its images at the Discord stand-in;
* status calls: the GETs the Segmind stand-in answered about the job's request id (at its status URL, or at
  its result URL, where the bot checks a job that has likely ended), less the one result fetch every
  job needs;
* acknowledged after: from the interaction's creation to the acknowledgement's arrival;
* submitted after: from the interaction's creation to the submit's arrival (what a member waits for a turn);
* "Generating" shown after: from the first status check that could have seen the job running to the first
  edit of its message that says so.

Both stand-ins and the driver share this process; the bot runs in its own, so its CPU time and peak RSS
(from /proc) are the bot's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.bench.process import cpu_seconds, peak_rss
from devtools.fakes.discord.models import InteractionHandle, RecordedRequest
from devtools.fakes.discord.server import DiscordStandIn
from devtools.fakes.segmind.server import SegmindServer
from devtools.fakes.segmind.stats import SubmitRecord
from devtools.launcher import BotLauncher, BotProcess
from devtools.stack import Credentials, drop_redis_keys, is_final, redis_url, sqlite_url, stand_ins

FIXED_POLLER = "fixed 1 s poller"
THIS_BOT = "this bot"
# What Segmind's SDK does: a status GET every second and no client-side budget.
FIXED_POLLER_ENV = {"SEGMIND_POLL_SECONDS": "1"}
FIRST_MEMBER = 5_000_000_000_000_000_000
SECOND_GUILD = 1300000000004194304  # on shard 1 of 2, as (id >> 22) % 2 says
SECOND_CHANNEL = 1300000000004194305
SETTLE_TIMEOUT = 900.0

BASE_ENV = {
    "QUOTA_DAILY_IMAGES": "100000",
    "QUOTA_MAX_CONCURRENT": "100",
    "LOG_LEVEL": "INFO",
    "JOB_LEASE_SECONDS": "30",
}

# The options members pick, and how often: time at Segmind grows with steps x pixels x images.
SIZES = ((1024, 1024), (832, 1216), (1216, 832))
STEPS = (20, 30, 40)
SAMPLES = ((1, 0.5), (2, 0.3), (4, 0.2))


@dataclass(frozen=True)
class Command:
    at: float  # seconds after the run's start
    member: int
    options: dict[str, object]


@dataclass(frozen=True)
class Workload:
    name: str
    segmind: dict[str, Any]  # the stand-in's settings
    commands: list[Command]
    warm_up: list[Command] = field(default_factory=list)  # answered first and not counted: a bot that has run
    bot_env: dict[str, str] = field(default_factory=dict)  # for both variants
    baseline_env: dict[str, str] = field(
        default_factory=dict
    )  # the fixed poller's, on top of FIXED_POLLER_ENV
    shards: int = 1
    store: str = "sqlite"

    @property
    def members(self) -> int:
        return len({command.member for command in self.commands})


@dataclass
class JobFigures:
    member: int
    images: int
    delivered: bool
    acked_after: float | None
    submitted_after: float | None
    lag: float | None
    status_calls: int
    generating_shown_after: float | None


@dataclass
class RunFigures:
    workload: Workload
    variant: str
    jobs: list[JobFigures]
    elapsed: float  # first command to last answer
    rate_limited: int  # 429s the Segmind stand-in answered
    most_in_a_minute: int  # the most keyed requests within any sliding 60 s
    cpu_seconds: float
    peak_rss: int  # bytes, the largest of the processes

    @property
    def delivered(self) -> list[JobFigures]:
        return [job for job in self.jobs if job.delivered]

    @property
    def failed(self) -> int:
        return len(self.jobs) - len(self.delivered)

    @property
    def images_per_minute(self) -> float:
        images = sum(job.images for job in self.delivered)
        return 60 * images / self.elapsed if self.elapsed > 0 else math.nan

    def lags(self) -> list[float]:
        return [job.lag for job in self.delivered if job.lag is not None]

    def status_calls(self) -> list[float]:
        return [job.status_calls for job in self.delivered]

    def acks(self) -> list[float]:
        return [job.acked_after for job in self.jobs if job.acked_after is not None]

    def cpu_per_job(self) -> float:
        return self.cpu_seconds / len(self.jobs) if self.jobs else math.nan

    def submit_wait(self, jobs_per_member: int) -> list[float]:
        """How long the members who sent `jobs_per_member` commands waited for each submit."""
        counts = {job.member: 0 for job in self.jobs}
        for job in self.jobs:
            counts[job.member] += 1
        return [
            job.submitted_after
            for job in self.jobs
            if counts[job.member] == jobs_per_member and job.submitted_after is not None
        ]

    def generating_shown(self) -> list[float]:
        return [job.generating_shown_after for job in self.jobs if job.generating_shown_after is not None]


def request_options(rng: random.Random, prompt: str) -> dict[str, object]:
    width, height = rng.choice(SIZES)
    samples = rng.choices([s for s, _ in SAMPLES], weights=[w for _, w in SAMPLES])[0]
    return {
        "prompt": prompt,
        "steps": rng.choice(STEPS),
        "width": width,
        "height": height,
        "samples": samples,
    }


def poisson_commands(count: int, mean_gap: float, seed: int) -> list[Command]:
    """`count` commands from as many members, arriving as a Poisson process."""
    rng = random.Random(seed)
    at, commands = 0.0, []
    for n in range(count):
        commands.append(Command(at, FIRST_MEMBER + n, request_options(rng, f"poisson job {n}")))
        at += rng.expovariate(1 / mean_gap)
    return commands


def burst_commands(count: int, within: float, *, options: dict[str, object]) -> list[Command]:
    """`count` commands from as many members, spread evenly over `within` seconds."""
    return [
        Command(within * n / count, FIRST_MEMBER + n, {**options, "prompt": f"burst job {n}"})
        for n in range(count)
    ]


def plan_commands(bursts: int, singles: int, within: float, seed: int) -> list[Command]:
    """Members who send four commands at once, and members who send one, in a random order."""
    rng = random.Random(seed)
    commands = []
    senders = [(FIRST_MEMBER + n, 4) for n in range(bursts)] + [
        (FIRST_MEMBER + bursts + n, 1) for n in range(singles)
    ]
    for member, count in senders:
        at = rng.uniform(0, within)
        for n in range(count):
            options = request_options(rng, f"member {member - FIRST_MEMBER} job {n}")
            commands.append(Command(at + 0.01 * n, member, options))
    return sorted(commands, key=lambda command: command.at)


async def run_both(workload: Workload) -> tuple[RunFigures, RunFigures]:
    """The bot as it is, then the fixed poller, on the same commands and the same stand-in seed."""
    ours = await run_workload(workload, THIS_BOT, {})
    fixed = await run_workload(workload, FIXED_POLLER, {**FIXED_POLLER_ENV, **workload.baseline_env})
    return ours, fixed


async def run_workload(workload: Workload, variant: str, variant_env: dict[str, str]) -> RunFigures:
    credentials = Credentials()
    settings = credentials.segmind_settings(**workload.segmind)
    with tempfile.TemporaryDirectory(prefix="dreamshaper-bench-") as folder:
        workdir = Path(folder)
        database = sqlite_url(workdir) if workload.store == "sqlite" else redis_url("bench")
        try:
            async with stand_ins(credentials, settings) as env:
                launcher = BotLauncher(env, workdir, env={**BASE_ENV, **workload.bot_env, **variant_env})
                processes = await _start(launcher, database, workload)
                try:
                    return await _drive(workload, variant, env.discord, env.segmind, processes)
                finally:
                    await launcher.stop_all()
        finally:
            if workload.store == "redis":
                await drop_redis_keys(database)


async def _start(launcher: BotLauncher, database: str, workload: Workload) -> list[BotProcess]:
    if workload.shards == 1:
        return [await launcher.start(database, ready_count=1)]
    launcher.discord.add_guild(SECOND_GUILD, SECOND_CHANNEL, "Second Guild")
    guilds = f"{launcher.discord.guild_id},{SECOND_GUILD}"
    common = {"SHARD_COUNT": str(workload.shards), "DISCORD_GUILD_IDS": guilds}
    return [
        await launcher.start(database, ready_count=shard + 1, SHARD_IDS=str(shard), **common)
        for shard in range(workload.shards)
    ]


async def _drive(
    workload: Workload,
    variant: str,
    discord: DiscordStandIn,
    segmind: SegmindServer,
    processes: list[BotProcess],
) -> RunFigures:
    if workload.warm_up:
        await _send_all(workload, discord, workload.warm_up)
        segmind.stats.reset()
        discord.requests.clear()
    cpu_before = sum(cpu_seconds(p.process.pid) for p in processes)
    started = time.monotonic()
    handles = await _send_all(workload, discord, workload.commands)
    last_answer = max((r.time for r in discord.requests if r.method in ("PATCH", "POST")), default=started)
    cpu = sum(cpu_seconds(p.process.pid) for p in processes) - cpu_before
    rss = max(peak_rss(p.process.pid) for p in processes)
    records = _Records.index(discord, segmind, [handle.token for _, handle in handles])
    return RunFigures(
        workload=workload,
        variant=variant,
        jobs=[_job_figures(command, handle, records, segmind) for command, handle in handles],
        elapsed=last_answer - started,
        rate_limited=sum(1 for record in segmind.stats.requests if record.status == 429),
        most_in_a_minute=segmind.stats.max_requests_in_window(60.0, targets=("submit", "status", "result")),
        cpu_seconds=cpu,
        peak_rss=rss,
    )


async def _send_all(
    workload: Workload, discord: DiscordStandIn, commands: list[Command]
) -> list[tuple[Command, InteractionHandle]]:
    """Sends the commands at their times and waits until each has its final answer."""
    started = time.monotonic()
    handles: list[tuple[Command, InteractionHandle]] = []

    async def send(number: int, command: Command) -> None:
        await asyncio.sleep(max(0.0, started + command.at - time.monotonic()))
        where = {}
        if workload.shards > 1 and number % 2:
            where = {"guild_id": SECOND_GUILD, "channel_id": SECOND_CHANNEL}
        handle = await discord.send_slash_command("imagine", command.options, user_id=command.member, **where)
        handles.append((command, handle))

    await asyncio.gather(*(send(n, command) for n, command in enumerate(commands)))

    def settled() -> bool:
        return all(h.original is not None and is_final(h.original) for _, h in handles)

    with contextlib.suppress(TimeoutError):
        await discord.wait_for(settled, timeout=SETTLE_TIMEOUT)
    return handles


@dataclass
class _Records:
    """The stand-ins' request logs, indexed once by interaction token and by Segmind request id."""

    discord: dict[str, list[RecordedRequest]]
    status_checks: dict[str, list[float]]
    submits: dict[str, SubmitRecord]  # by prompt

    @classmethod
    def index(cls, discord: DiscordStandIn, segmind: SegmindServer, tokens: list[str]) -> _Records:
        wanted = set(tokens)
        by_token: dict[str, list[RecordedRequest]] = {token: [] for token in tokens}
        for request in discord.requests:
            for part in request.path.split("/"):
                if part in wanted:
                    by_token[part].append(request)
                    break
        checks: dict[str, list[float]] = {}
        for record in segmind.stats.requests_to("status", "result"):
            # /v2/requests/{id}/status or /v2/requests/{id}
            parts = record.path.rstrip("/").split("/")
            request_id = parts[-2] if record.target == "status" else parts[-1]
            checks.setdefault(request_id, []).append(record.time)
        submits = {str(s.payload.get("prompt")): s for s in segmind.stats.submits}
        return cls(by_token, checks, submits)


def _job_figures(
    command: Command, handle: InteractionHandle, records: _Records, segmind: SegmindServer
) -> JobFigures:
    submit = records.submits.get(str(command.options["prompt"]))
    job = segmind._jobs.get(submit.request_id) if submit is not None else None
    mine = records.discord.get(handle.token, [])
    uploads = [r.time for r in mine if r.files]
    delivered = bool(handle.original is not None and handle.original.attachments and uploads)
    lag = uploads[0] - job.ends_at if delivered and job is not None else None
    callback = handle.callback
    checks = records.status_checks.get(submit.request_id, []) if submit is not None else []
    shown_after = None
    if job is not None:
        running = [t for t in checks if job.starts_at <= t < job.ends_at]
        shown = [r.time for r in mine if r.method == "PATCH" and "Generating" in str(r.json)]
        later = [t for t in shown if running and t >= running[0]]
        shown_after = later[0] - running[0] if later else None
    return JobFigures(
        member=command.member,
        images=int(command.options.get("samples", 1)),  # type: ignore[call-overload]
        delivered=delivered,
        acked_after=None if callback is None else callback.time - handle.created_at,
        submitted_after=None if submit is None else submit.time - handle.created_at,
        lag=lag,
        # Every job's result is fetched once, by a result request of its own or by the last check.
        status_calls=max(0, len(checks) - 1),
        generating_shown_after=shown_after,
    )


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan
