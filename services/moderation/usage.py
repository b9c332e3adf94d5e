"""`/admin usage`: a server's usage over a period, summed from the store's per-day counts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

from services.store.base import UsageCounts, UsageRow

TOP_MEMBERS = 5


@dataclass(frozen=True)
class UsageReport:
    first_day: date
    last_day: date
    totals: UsageCounts
    images_per_day: list[tuple[date, int]]  # every day of the period, oldest first, zero included
    top_members: list[tuple[int, UsageCounts]]  # most images first

    def cost(self, price_per_gpu_second: float | None) -> float | None:
        return None if price_per_gpu_second is None else self.totals.gpu_seconds * price_per_gpu_second


def summarise(
    rows: Iterable[UsageRow], first_day: date, last_day: date, *, top: int = TOP_MEMBERS
) -> UsageReport:
    totals = UsageCounts()
    per_day: dict[date, int] = defaultdict(int)
    per_member: dict[int, UsageCounts] = defaultdict(UsageCounts)
    for row in rows:
        totals += row.counts
        per_day[date.fromisoformat(row.day)] += row.counts.images
        per_member[row.user_id] += row.counts
    days = [first_day + timedelta(days=n) for n in range((last_day - first_day).days + 1)]
    ranked = sorted(
        ((member, counts) for member, counts in per_member.items() if counts.images or counts.jobs),
        key=lambda item: (-item[1].images, -item[1].jobs, item[0]),
    )
    return UsageReport(first_day, last_day, totals, [(day, per_day[day]) for day in days], ranked[:top])
