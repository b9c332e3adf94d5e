"""Benchmarks whose figures go in the README: timing claims live here, never in timed tests.

    .venv/bin/python -m devtools.bench [--quick]

Each member-facing workload runs twice in one run, against fresh local stand-ins: the bot as it is and
the same bot polling every 1 s as Segmind's own SDK does (`SEGMIND_POLL_SECONDS=1`); the table puts them
side by side with ratios (`devtools.bench.workloads` says how each figure is measured):

1. predictable jobs (queue time exponential, mean 2 s; run time ∝ steps x megapixels x images ± 5 %);
2. unpredictable jobs (300 in flight, 20-40 s each whatever the options);
3. a plan's limit (50 requests per sliding minute, enforced by the stand-in with 429s), with bursts of four
   from some members and single jobs from others; then the same on two shard processes sharing Redis;
4. a community's burst: 1,000 /imagine within a second on one process (`devtools.bench.burst`).

Then `fit_for_upload` on four noisy 2048x2048 images, and SIGTERM to exit of `python bot.py`.

The Markdown tables go to stdout, progress to stderr. `--quick` shrinks every part to check that the
benchmark runs; its figures are not for the README. Needs only requirements.txt; the shard run needs a
Redis at `devtools.stack.REDIS_URL` and is skipped without one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from devtools.bench.burst import BurstFigures, measure_burst_in_a_fresh_driver
from devtools.bench.compare import COMPARE_HEADERS, add_plan, add_predictable, add_unpredictable, ratio
from devtools.bench.images import fit_table, measure_fit
from devtools.bench.report import Table, millis, seconds
from devtools.bench.shutdown import measure_shutdown, shutdown_table
from devtools.bench.workloads import (
    FIXED_POLLER_ENV,
    THIS_BOT,
    Command,
    RunFigures,
    Workload,
    burst_commands,
    plan_commands,
    poisson_commands,
    run_both,
    run_workload,
)
from devtools.stack import REDIS_URL, redis_answers

log = logging.getLogger("devtools.bench")

PLAN_LIMIT = 50  # Segmind's pro plan
NO_BUDGET = {"SEGMIND_REQUESTS_PER_MINUTE": "1000000"}
# Realistic Segmind timings: a queue of about 2 s, then 0.2 s per step per megapixel per image, ± 5 %.
SEGMIND_TIMING: dict[str, object] = {
    "queue_seconds": 2.0,
    "queue_distribution": "exponential",
    "seconds_per_step": 0.2,
    "inference_jitter": 0.05,
    "workers": 2000,
    "seed": 7,
}
ONE_IMAGE = {"steps": 30, "width": 1024, "height": 1024, "samples": 1}


@dataclass(frozen=True)
class Plan:
    predictable: Workload
    unpredictable: Workload
    plan: Workload
    shards: Workload
    burst_commands: int
    burst_runs: int
    fit_runs: int
    shutdown_runs: int


def warm_up(count: int, options: dict[str, object] | None = None) -> list[Command]:
    """Jobs answered before the measured ones, so the bot is measured as it runs, not as it starts."""
    commands = poisson_commands(count, 0.01, seed=99)
    return [
        Command(c.at, c.member + 10_000, {**(options or c.options), "prompt": f"warm-up {n}"})
        for n, c in enumerate(commands)
    ]


def plan_for(quick: bool) -> Plan:
    scale = 0.25 if quick else 1.0
    timing = {**SEGMIND_TIMING, "queue_seconds": 2.0 * scale, "seconds_per_step": 0.2 * scale}
    unpredictable_range = (20.0 * scale / 2, 40.0 * scale / 2) if quick else (20.0, 40.0)
    plan_env = {
        "SEGMIND_REQUESTS_PER_MINUTE": str(PLAN_LIMIT),
        # Members are told their place in line; nobody's job is dropped for waiting its turn.
        "RATE_LIMIT_MAX_WAIT_SECONDS": "1800",
        "SEGMIND_JOB_DEADLINE_SECONDS": "1800",
    }
    # The SDK has no client-side budget and raises on a 429; the bot's nearest is no budget, no waiting.
    sdk_env = {**NO_BUDGET, "RATE_LIMIT_MAX_WAIT_SECONDS": "0.1"}
    plan_commands_ = plan_commands(1, 2, 1.0, seed=3) if quick else plan_commands(10, 20, 20.0, seed=3)
    plan = Workload(
        "plan",
        {**timing, "requests_per_minute": PLAN_LIMIT},
        plan_commands_,
        bot_env=plan_env,
        baseline_env=sdk_env,
    )
    return Plan(
        predictable=Workload(
            "predictable",
            timing,
            poisson_commands(3 if quick else 40, 0.5 if quick else 1.5, seed=1),
            warm_up=warm_up(2 if quick else 12),
            bot_env=NO_BUDGET,
        ),
        unpredictable=Workload(
            "unpredictable",
            {**timing, "inference_range": unpredictable_range},
            burst_commands(6 if quick else 300, 1.0 if quick else 3.0, options=ONE_IMAGE),
            warm_up=warm_up(2 if quick else 12, ONE_IMAGE),
            bot_env=NO_BUDGET,
        ),
        plan=plan,
        shards=Workload(
            "plan, two shards", plan.segmind, plan.commands, bot_env=plan_env, shards=2, store="redis"
        ),
        burst_commands=10 if quick else 1000,
        burst_runs=1 if quick else 3,
        fit_runs=1 if quick else 5,
        shutdown_runs=1 if quick else 3,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.bench",
        description="Measure polling cost, acknowledgement time, image fitting and shutdown; print Markdown.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run (under a minute) that checks the benchmark works (default: the full run)",
    )
    return parser.parse_args(argv)


def machine_line(quick: bool) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    line = (
        f"Figures from `python -m devtools.bench{' --quick' if quick else ''}` on {os.cpu_count()} CPU(s), "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, {when}."
    )
    if quick:
        line += " Quick run: fewer samples and Segmind timings scaled down; not figures for the README."
    return line


async def run(plan: Plan) -> list[Table]:
    compared = Table("This bot and a fixed 1 s poller, side by side", COMPARE_HEADERS)

    _progress("predictable jobs, both pollers")
    add_predictable(compared, *await run_both(plan.predictable))
    _progress("unpredictable jobs, both pollers")
    add_unpredictable(compared, *await run_both(plan.unpredictable))
    _progress("a plan's limit, both pollers (the longest part)")
    ours, fixed = await run_both(plan.plan)
    plan_label = f"{len(ours.jobs)} jobs from {plan.plan.members} members, a {PLAN_LIMIT}-per-minute plan"
    add_plan(compared, ours, fixed, limit=PLAN_LIMIT, label=plan_label)
    if await redis_answers():
        _progress("a plan's limit, two shard processes on one Redis")
        add_shards(compared, await run_workload(plan.shards, THIS_BOT, {}))
    else:
        compared.notes.append(f"No Redis answered at {REDIS_URL}: the two-shard run was skipped.")
    _progress("a community's burst, both pollers")
    burst_env = {**NO_BUDGET, "QUOTA_MAX_CONCURRENT": "2"}
    burst_segmind = SEGMIND_TIMING if plan.burst_commands > 100 else {}
    ours_bursts: list[BurstFigures] = []
    fixed_bursts: list[BurstFigures] = []
    for _ in range(plan.burst_runs):
        # Each in a driver of its own, as fresh as the bot it measures; the two take turns, so a change in
        # the machine's speed during the run falls on both alike.
        ours_bursts.append(
            await measure_burst_in_a_fresh_driver(
                plan.burst_commands, bot_env=burst_env, segmind=burst_segmind
            )
        )
        fixed_bursts.append(
            await measure_burst_in_a_fresh_driver(
                plan.burst_commands, bot_env={**burst_env, **FIXED_POLLER_ENV}, segmind=burst_segmind
            )
        )
    add_burst(compared, ours_bursts, fixed_bursts)
    compared.notes.append(
        "Each workload ran twice in this one run on fresh stand-ins: the fixed poller is the same bot with "
        "`SEGMIND_POLL_SECONDS=1`; for the plan's limit it also has no client-side budget and gives a job up "
        "on a 429 to its submit, as Segmind's SDK does. Segmind stand-in: queue time exponential (mean 2 s), "
        "then 0.2 s per step per megapixel per image ± 5 % (or 20–40 s whatever the options); every "
        "status check, submit and result counts against the plan's limit. The predictable and unpredictable "
        "runs follow 12 uncounted jobs, so the bot is measured as it runs, not as it starts."
    )
    tables = [compared]

    _progress("fitting images under the upload limit")
    fits, idle_stall = await measure_fit(plan.fit_runs)
    tables.append(fit_table(fits, idle_stall, plan.fit_runs))

    _progress("shutdown")
    tables.append(shutdown_table(await measure_shutdown(plan.shutdown_runs)))
    return tables


def add_shards(table: Table, ours: RunFigures) -> None:
    label = f"the same, on two shard processes sharing one Redis ({PLAN_LIMIT}-per-minute plan)"
    table.rows.append([label, "images delivered per minute", "", f"{ours.images_per_minute:.1f}", ""])
    table.rows.append([label, "jobs failed / 429s received", "", f"{ours.failed} / {ours.rate_limited}", ""])
    used = ours.most_in_a_minute / PLAN_LIMIT
    table.rows.append(
        [
            label,
            "most requests in a sliding minute",
            "",
            f"{ours.most_in_a_minute} ({used:.0%} of the plan)",
            "",
        ]
    )


def median_run(runs: Sequence[BurstFigures]) -> BurstFigures:
    """The run whose CPU per job is the median: every figure shown comes from that one burst."""
    return sorted(runs, key=lambda figures: figures.cpu_per_job)[len(runs) // 2]


def add_burst(table: Table, ours_runs: Sequence[BurstFigures], fixed_runs: Sequence[BurstFigures]) -> None:
    ours, fixed = median_run(ours_runs), median_run(fixed_runs)
    label = f"{ours.commands} `/imagine` within a second, one process"

    def row(figure: str, mine: float, theirs: float, shown: Callable[[float], str]) -> None:
        table.rows.append([label, figure, shown(theirs), shown(mine), ratio(mine, theirs)])

    row("acknowledged after, p50", ours.ack_p50, fixed.ack_p50, millis)
    row("acknowledged after, p99", ours.ack_p99, fixed.ack_p99, millis)
    row(
        "longest event-loop stall",
        ours.longest_stall or 0.0,
        fixed.longest_stall or 0.0,
        millis,
    )
    row("bot CPU per job", ours.cpu_per_job, fixed.cpu_per_job, millis)
    row("bot peak RSS", ours.peak_rss, fixed.peak_rss, lambda v: f"{v / 2**20:.0f} MB")
    row("delivery lag, mean", ours.delivery_lag_mean, fixed.delivery_lag_mean, seconds)
    table.rows.append([label, "jobs failed", str(fixed.failed), str(ours.failed), ""])
    if len(ours_runs) > 1:
        # From run to run the machine's speed moves the figures by a tenth or so: all the runs are shown.
        table.notes.append(
            f"The burst ran {len(ours_runs)} times for each poller, taking turns; shown is the run with the "
            "median CPU per job. Every run (CPU per job · acknowledged p99 · longest stall · delivery lag · "
            "jobs failed): "
            f"this bot {_burst_runs(ours_runs)}; the fixed poller {_burst_runs(fixed_runs)}."
        )
    table.notes.extend(ours.notes)


def _burst_runs(runs: Sequence[BurstFigures]) -> str:
    return ", ".join(
        f"{millis(f.cpu_per_job)} · {millis(f.ack_p99)} · {millis(f.longest_stall or 0.0)} · "
        f"{seconds(f.delivery_lag_mean)} · {f.failed}"
        for f in runs
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    # discord.py warns about optional voice libraries on every start; the bot needs no voice.
    logging.getLogger("discord.client").setLevel(logging.ERROR)
    tables = asyncio.run(run(plan_for(args.quick)))
    print(machine_line(args.quick))
    for table in tables:
        print()
        print(table.markdown())
    _progress("done")
    return 0


_STARTED = time.monotonic()


def _progress(message: str) -> None:
    print(f"bench [{time.monotonic() - _STARTED:5.1f} s]: {message}", file=sys.stderr, flush=True)
