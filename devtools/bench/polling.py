"""Polling cost: Segmind requests per job and how late completion is noticed, adaptive vs a fixed 1 s poll.

Per job shape, three chains of jobs in sequence run at the same time against one local Segmind server:
the adaptive client from its priors (as after a restart), the adaptive client after warm-up jobs have
taught its `DurationModel` (the steady state of a bot that has been running), and a fixed 1 s poll. The
server has more workers than there are jobs at once, so no chain delays another. What each poller spent
is read from the server's own request log, per request id.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from devtools.bench.report import POLLING_HEADERS, Table, median_and_max
from devtools.fakes.segmind.jobs import Job
from devtools.fakes.segmind.params import GenerationParams
from devtools.fakes.segmind.server import SegmindServer, SegmindServerSettings
from devtools.fakes.segmind.stats import SegmindStats
from services.request import GenerationRequest
from services.segmind import DurationModel, RequestBudget, SegmindClient

API_KEY = "sg_bench_polling_key"
FIXED_INTERVAL = 1.0
# Far above what a few chains can spend, so the figures show the polling policy and not the budget.
BUDGET_PER_MINUTE = 100_000
# Real queue times vary. With a fixed one every job would last a whole number of seconds here and a 1 s
# poller would hit each completion within milliseconds; a spread of one second makes its phase random.
QUEUE_JITTER = 1.0


class JitteredSegmindServer(SegmindServer):
    """The local server with each job's queue time drawn from queue_seconds ± QUEUE_JITTER / 2."""

    def __init__(self, settings: SegmindServerSettings, *, seed: int = 7) -> None:
        super().__init__(settings)
        self._rng = random.Random(seed)

    def _schedule_job(self, params: GenerationParams, *, queue_seconds: float) -> Job:
        jitter = self._rng.uniform(-QUEUE_JITTER / 2, QUEUE_JITTER / 2)
        return super()._schedule_job(params, queue_seconds=max(0.0, queue_seconds + jitter))


@dataclass(frozen=True)
class PollingCase:
    label: str
    steps: int
    size: int
    jobs: int  # per chain, in sequence, so the adaptive poller learns from each one before the next


@dataclass
class JobFigures:
    requests: int  # submit + status polls + result GET
    notice_delay: float  # seconds from the job's completion on the server to the poll that saw it


@dataclass
class CaseFigures:
    case: PollingCase
    cold: list[JobFigures] = field(default_factory=list)  # adaptive, starting from the priors
    steady: list[JobFigures] = field(default_factory=list)  # adaptive, after the warm-up jobs
    fixed: list[JobFigures] = field(default_factory=list)


async def measure_polling(
    cases: list[PollingCase], *, queue_seconds: float, seconds_per_step: float, warm_up_jobs: int
) -> list[CaseFigures]:
    server = JitteredSegmindServer(
        SegmindServerSettings(
            api_keys=frozenset({API_KEY}),
            queue_seconds=queue_seconds,
            seconds_per_step=seconds_per_step,
            workers=len(cases) * (3 + warm_up_jobs),
        )
    )
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            figures = [CaseFigures(case) for case in cases]
            chains = []
            for entry in figures:
                chains.append(_adaptive_chain(session, server, entry, entry.cold, warm_up_jobs=0))
                chains.append(_adaptive_chain(session, server, entry, entry.steady, warm_up_jobs))
                chains.append(_fixed_chain(session, server, entry))
            await asyncio.gather(*chains)
            return figures
    finally:
        await server.stop()


def polling_table(
    figures: list[CaseFigures], *, queue_seconds: float, seconds_per_step: float, warm_up_jobs: int
) -> Table:
    table = Table("Polling cost per job", POLLING_HEADERS)
    for entry in figures:
        label = entry.case.label
        table.rows.append(_row(label, "adaptive, first job (priors)", entry.cold[:1]))
        learning = "job 2" if len(entry.cold) == 2 else f"jobs 2–{len(entry.cold)}"
        table.rows.append(_row(label, f"adaptive, {learning} (learning)", entry.cold[1:]))
        table.rows.append(_row(label, "adaptive, steady state", entry.steady))
        table.rows.append(_row(label, f"fixed {FIXED_INTERVAL:.1f} s", entry.fixed))
    per_1024 = seconds_per_step * 30
    table.notes.append(
        f"Local Segmind server: {queue_seconds:g} ± {QUEUE_JITTER / 2:g} s in the queue, then "
        f"{seconds_per_step:g} s per step at 1024² (30 steps at 1024² = {per_1024:g} s; time grows with "
        "pixels). One image per job; each chain runs its jobs one after another. The steady state is a "
        f"client whose model first learnt from {warm_up_jobs} concurrent 30-step 1024² jobs (not counted). "
        "A request is the submit, every status GET and the result "
        'GET. "Noticed after" runs from the job\'s end on the server (submit time + `metrics.total_time`) '
        "to the arrival of the status GET that answered COMPLETED."
    )
    return table


def _row(label: str, poller: str, jobs: list[JobFigures]) -> list[str]:
    return [
        label,
        poller,
        str(len(jobs)),
        median_and_max([job.requests for job in jobs], "count"),
        median_and_max([job.notice_delay for job in jobs]),
    ]


def _request(case: PollingCase, number: int) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"polling benchmark {case.label} #{number}",
        num_inference_steps=case.steps,
        img_width=case.size,
        img_height=case.size,
        seed=number,
    )


async def _adaptive_chain(
    session: aiohttp.ClientSession,
    server: SegmindServer,
    entry: CaseFigures,
    into: list[JobFigures],
    warm_up_jobs: int,
) -> None:
    # A fresh model per chain: without warm-up its first job starts from the priors, as after a restart.
    client = SegmindClient(
        session,
        api_key=API_KEY,
        base_url=server.base_url,
        budget=RequestBudget(BUDGET_PER_MINUTE),
        durations=DurationModel(),
    )
    # The model's cost per step scales with pixels as the server's does, so short jobs teach it long ones.
    warm_up = PollingCase("warm-up", 30, 1024, warm_up_jobs)
    await asyncio.gather(*(_run_adaptive(client, warm_up, number) for number in range(warm_up_jobs)))
    for number in range(entry.case.jobs):
        request_id, metrics = await _run_adaptive(client, entry.case, number)
        into.append(_figures(server.stats, request_id, metrics))


async def _run_adaptive(
    client: SegmindClient, case: PollingCase, number: int
) -> tuple[str, Mapping[str, Any]]:
    job = await client.submit(_request(case, number))
    metrics: Mapping[str, Any] = {}
    async for event in client.wait(job):
        if event.result is not None:
            metrics = event.result.metrics
    return job.request_id, metrics


async def _fixed_chain(session: aiohttp.ClientSession, server: SegmindServer, entry: CaseFigures) -> None:
    """What Segmind's own SDK does: a status GET every second until COMPLETED, then the result GET."""
    headers = {"x-api-key": API_KEY}
    for number in range(entry.case.jobs):
        payload = _request(entry.case, number).to_payload()
        async with session.post(
            f"{server.base_url}/v2/{server.settings.model}", json=payload, headers=headers
        ) as response:
            queued = await response.json()
        while True:
            await asyncio.sleep(FIXED_INTERVAL)
            async with session.get(queued["status_url"], headers=headers) as response:
                status = (await response.json())["status"]
            if status == "COMPLETED":
                break
            if status == "FAILED":
                raise RuntimeError(f"benchmark job {queued['request_id']} failed")
        async with session.get(queued["response_url"], headers=headers) as response:
            result = await response.json()
        entry.fixed.append(_figures(server.stats, queued["request_id"], result["metrics"]))


def _figures(stats: SegmindStats, request_id: str, metrics: Mapping[str, Any]) -> JobFigures:
    submitted_at = next(record.time for record in stats.submits if record.request_id == request_id)
    ended_at = submitted_at + float(metrics["total_time"])
    mine = [record for record in stats.requests_to("status", "result") if request_id in record.path]
    # Both pollers stop at the first COMPLETED, so their last status GET is the one that saw it.
    last_status = max(record.time for record in mine if record.target == "status")
    return JobFigures(requests=1 + len(mine), notice_delay=last_status - ended_at)
