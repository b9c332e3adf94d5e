"""The usage report: a period's rows summed, every day shown, members ranked by images."""

from __future__ import annotations

from datetime import date

from services.moderation.usage import summarise
from services.store.base import UsageCounts, UsageRow


def test_every_day_of_the_period_is_shown_and_members_are_ranked_by_images() -> None:
    rows = [
        UsageRow("2026-11-28", 1, UsageCounts(jobs=1, images=1, gpu_seconds=1.5)),
        UsageRow("2026-11-30", 2, UsageCounts(jobs=2, images=8, gpu_seconds=4.0)),
        UsageRow("2026-11-30", 3, UsageCounts(blocked=2)),
        UsageRow("2026-11-30", 1, UsageCounts(jobs=1, images=1, failed=1)),
    ]
    report = summarise(rows, date(2026, 11, 27), date(2026, 12, 1), top=5)
    assert report.totals == UsageCounts(jobs=4, images=10, blocked=2, failed=1, gpu_seconds=5.5)
    assert report.images_per_day == [
        (date(2026, 11, 27), 0),
        (date(2026, 11, 28), 1),
        (date(2026, 11, 29), 0),
        (date(2026, 11, 30), 9),
        (date(2026, 12, 1), 0),
    ]
    # A member who only had prompts blocked generated nothing: not among the top.
    assert [member for member, _ in report.top_members] == [2, 1]
    assert report.cost(None) is None and report.cost(0.01) == 0.055


def test_the_top_is_cut_to_its_length() -> None:
    rows = [UsageRow("2026-12-01", member, UsageCounts(jobs=1, images=member)) for member in range(1, 9)]
    report = summarise(rows, date(2026, 12, 1), date(2026, 12, 1), top=3)
    assert [member for member, _ in report.top_members] == [8, 7, 6]
