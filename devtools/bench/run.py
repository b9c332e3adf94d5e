"""Benchmarks whose figures go in the README: timing claims live here, never in timed tests.

    .venv/bin/python -m devtools.bench [--quick]

Measures, against the local stand-ins:

1. polling cost: Segmind requests per job and how late completion is noticed, the adaptive client
   (`SegmindClient.submit` + `wait`) against a fixed 1 s poll, as Segmind's own SDK does;
2. time to acknowledge /imagine with the real bot in-process, on SQLite and (if one answers) Redis;
3. `fit_for_upload` on four noisy 2048x2048 images, and the event-loop stall of `prepare_for_upload`;
4. SIGTERM to exit of `python bot.py`, idle and with a job in flight.

The Markdown tables go to stdout, progress to stderr. `--quick` shortens every part (and scales the
Segmind timings down by four) to check that the benchmark runs; its figures are not for the README.
Needs only requirements.txt; Redis is measured when one answers at `devtools.stack.REDIS_URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from devtools.bench.ack import ack_table, measure_acks
from devtools.bench.images import fit_table, measure_fit
from devtools.bench.polling import PollingCase, measure_polling, polling_table
from devtools.bench.report import Table
from devtools.bench.shutdown import measure_shutdown, shutdown_table

log = logging.getLogger("devtools.bench")

# Realistic Segmind timings: about 2 s in the queue, then ~6 s for 30 steps at 1024².
QUEUE_SECONDS = 2.0
SECONDS_PER_STEP = 0.2
QUICK_TIME_SCALE = 0.25


@dataclass(frozen=True)
class Plan:
    polling_cases: list[PollingCase]
    queue_seconds: float
    seconds_per_step: float
    warm_up_jobs: int
    ack_commands: int
    ack_burst: int
    fit_runs: int
    shutdown_runs: int


def plan_for(quick: bool) -> Plan:
    if quick:
        return Plan(
            # The long job shape adds nothing to a check that the benchmark runs, only time.
            polling_cases=[PollingCase("30 steps, 1024²", 30, 1024, jobs=2)],
            queue_seconds=QUEUE_SECONDS * QUICK_TIME_SCALE,
            seconds_per_step=SECONDS_PER_STEP * QUICK_TIME_SCALE,
            warm_up_jobs=3,
            ack_commands=4,
            ack_burst=4,
            fit_runs=1,
            shutdown_runs=1,
        )
    return Plan(
        # The long case gets fewer jobs so that both finish at about the same time.
        polling_cases=[
            PollingCase("30 steps, 1024²", 30, 1024, jobs=8),
            PollingCase("60 steps, 1536²", 60, 1536, jobs=4),
        ],
        queue_seconds=QUEUE_SECONDS,
        seconds_per_step=SECONDS_PER_STEP,
        # With the model's smoothing of 0.3, eight jobs bring the priors within 2% of the truth here.
        warm_up_jobs=8,
        ack_commands=20,
        ack_burst=20,
        fit_runs=5,
        shutdown_runs=3,
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
    tables: list[Table] = []

    _progress("polling cost (jobs in sequence; the longest part)")
    timings = {
        "queue_seconds": plan.queue_seconds,
        "seconds_per_step": plan.seconds_per_step,
        "warm_up_jobs": plan.warm_up_jobs,
    }
    polling = await measure_polling(plan.polling_cases, **timings)
    tables.append(polling_table(polling, **timings))

    _progress("time to acknowledge /imagine")
    runs, notes = await measure_acks(plan.ack_commands, plan.ack_burst)
    tables.append(ack_table(runs, notes))

    _progress("fitting images under the upload limit")
    fits, idle_stall = await measure_fit(plan.fit_runs)
    tables.append(fit_table(fits, idle_stall, plan.fit_runs))

    _progress("shutdown")
    tables.append(shutdown_table(await measure_shutdown(plan.shutdown_runs)))
    return tables


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
