"""The side-by-side table: each workload's figures for the fixed 1 s poller and this bot, with ratios."""

from __future__ import annotations

import math
from collections.abc import Callable

from devtools.bench.report import Table, millis, percentile, seconds
from devtools.bench.workloads import RunFigures, mean

COMPARE_HEADERS = ("workload", "figure", "fixed 1 s poller", "this bot", "this bot / fixed")


def ratio(ours: float, fixed: float) -> str:
    if math.isnan(ours) or math.isnan(fixed) or fixed == 0:
        return "–"
    return f"{ours / fixed:.2f}"


class Comparison:
    """Rows of one workload, each a figure taken from both runs the same way."""

    def __init__(self, table: Table, label: str, ours: RunFigures, fixed: RunFigures) -> None:
        self.table, self.label, self.ours, self.fixed = table, label, ours, fixed

    def row(
        self,
        figure: str,
        value: Callable[[RunFigures], float],
        shown: Callable[[float], str],
        *,
        ratio_too: bool = True,
    ) -> None:
        ours, fixed = value(self.ours), value(self.fixed)
        self.table.rows.append(
            [self.label, figure, shown(fixed), shown(ours), ratio(ours, fixed) if ratio_too else ""]
        )


def count(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}" if not float(value).is_integer() else f"{value:.0f}"


def megabytes(value: float) -> str:
    return "–" if math.isnan(value) else f"{value / 2**20:.0f} MB"


def add_predictable(table: Table, ours: RunFigures, fixed: RunFigures) -> None:
    rows = Comparison(
        table, f"{len(ours.jobs)} jobs, Poisson arrivals, time ∝ steps × pixels × images", ours, fixed
    )
    rows.row("delivery lag (ended at Segmind → images at Discord), mean", lambda r: mean(r.lags()), seconds)
    rows.row("status calls per job", lambda r: mean(r.status_calls()), count)
    rows.row(
        '"Generating" shown after the check that saw it, max',
        lambda r: max(r.generating_shown(), default=math.nan),
        seconds,
    )
    rows.row("jobs failed", lambda r: r.failed, count, ratio_too=False)


def add_unpredictable(table: Table, ours: RunFigures, fixed: RunFigures) -> None:
    rows = Comparison(
        table, f"{len(ours.jobs)} jobs in flight, 20–40 s each whatever the options", ours, fixed
    )
    rows.row("delivery lag, mean", lambda r: mean(r.lags()), seconds)
    rows.row("delivery lag, p95", lambda r: percentile(r.lags(), 0.95), seconds)
    rows.row("status calls per job", lambda r: mean(r.status_calls()), count)
    rows.row("`/imagine` acknowledged after, p50", lambda r: percentile(r.acks(), 0.5), millis)
    rows.row("bot CPU per job", lambda r: r.cpu_per_job(), millis)
    rows.row("bot peak RSS", lambda r: r.peak_rss, megabytes)
    rows.row("jobs failed", lambda r: r.failed, count, ratio_too=False)


def add_plan(table: Table, ours: RunFigures, fixed: RunFigures, *, limit: int, label: str) -> None:
    rows = Comparison(table, label, ours, fixed)
    rows.row("images delivered per minute", lambda r: r.images_per_minute, count)
    rows.row("jobs failed", lambda r: r.failed, count, ratio_too=False)
    rows.row("429s received", lambda r: r.rate_limited, count, ratio_too=False)
    rows.row(
        f"most requests in a sliding minute (limit {limit})",
        lambda r: r.most_in_a_minute,
        count,
        ratio_too=False,
    )
    # The fixed poller sends every submit at once (and most then fail): a ratio of waits would say nothing.
    rows.row(
        "submit waited, members with 1 job, mean", lambda r: mean(r.submit_wait(1)), seconds, ratio_too=False
    )
    rows.row(
        "submit waited, members with 4 jobs, mean", lambda r: mean(r.submit_wait(4)), seconds, ratio_too=False
    )
    rows.row(
        "1-job members' wait / 4-job members' wait",
        lambda r: mean(r.submit_wait(1)) / mean(r.submit_wait(4)) if r.submit_wait(4) else math.nan,
        lambda v: "–" if math.isnan(v) else f"{v:.2f}",
        ratio_too=False,
    )
