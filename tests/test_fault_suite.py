"""The fault suite, small: the real bot process under Segmind and Discord faults and a SIGKILL, on either store.

The edge tests each aim one kill at a moment the bot does not survive yet (see devtools/fault_plan.py,
PlannedKill): they are expected to fail until the bot handles that moment, and fail loudly (strict) once
it does, so the marker can go.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.fault_plan import KillStyle
from devtools.fault_suite import SuiteOptions, SuiteReport, run_suite
from tests.processes import database_url

STORES = ["sqlite", "redis"]


class LostOrDuplicated(AssertionError):
    """Raised only for the outcome under test, so an edge test cannot pass as expected for another reason."""


def explain(report: SuiteReport) -> str:
    lines = [report.table()]
    for problem in report.problems:
        lines.append(f"{problem['tag']}: {problem['issues']}; submits {problem['submits']}")
        lines += [f"    {line}" for line in problem["log_lines"][-15:]]
    lines += report.log_findings["first_error_lines"]
    return "\n".join(lines)


async def run_small(tmp_path: Path, store: str, **options: object) -> SuiteReport:
    settings = {
        "store": store,
        "database_url": await database_url(store, tmp_path),
        "workdir": tmp_path,
        "settle_timeout": 60.0,
        "quiet_seconds": 3.0,
        **options,
    }
    return await run_suite(SuiteOptions(**settings), say=lambda _line: None)  # type: ignore[arg-type]


def served(report: SuiteReport, prefix: str) -> int:
    return sum(count for kind, count in report.faults_served.items() if kind.startswith(prefix))


@pytest.mark.parametrize("store", STORES)
async def test_nothing_lost_or_duplicated_under_faults_and_a_kill(tmp_path: Path, store: str) -> None:
    report = await run_small(tmp_path, store, jobs=8, kills=1, seed=3)
    why = explain(report)
    counts = report.tally

    assert counts.jobs == counts.acknowledged == 8, why
    assert counts.lost == 0, why
    assert counts.duplicate_submits == 0 and counts.submits == 8, why
    assert counts.duplicate_deliveries == 0 and counts.misdelivered == 0, why
    assert counts.delivered == 8, why

    # The faults really happened, as the stand-ins recorded them.
    assert served(report, "segmind_") >= 2, why
    assert served(report, "discord_429") + served(report, "discord_5") >= 1, why
    assert report.faults_injected.get("token_expired") == 1 and counts.delivered_in_channel >= 1, why
    [kill] = report.kills
    assert kill.on_target and kill.submitted_in_flight, why
    assert [p["how_ended"] for p in report.processes] == ["killed", "terminated"], why
    assert report.log_findings["tracebacks"] == 0, why


@pytest.mark.parametrize("style", ["after_ack", "after_channel_post"])
async def test_a_kill_at_an_edge_moment_loses_and_duplicates_nothing(
    tmp_path: Path, style: KillStyle
) -> None:
    """Killed just after Discord showed "thinking…", or just after a channel post but before it was
    recorded: the job is resumed from its record, and an earlier post is found instead of posted again."""
    report = await run_small(tmp_path, "sqlite", jobs=2, kills=0, faults=0, seed=5, edge_kills=(style,))
    why = explain(report)
    [kill] = report.kills
    assert kill.style == style and kill.on_target, why
    assert report.tally.jobs == report.tally.acknowledged == 3, why
    if report.tally.lost or report.tally.duplicated or report.tally.misdelivered:
        raise LostOrDuplicated(why)


async def test_a_kill_while_a_submit_is_on_its_way_never_submits_twice(tmp_path: Path) -> None:
    """Segmind has no idempotency key, so a job whose submit answer died with the process cannot be
    known to exist: it is closed and its member told, rather than risk a second bill."""
    report = await run_small(
        tmp_path, "sqlite", jobs=2, kills=0, faults=0, seed=5, edge_kills=("during_submit",)
    )
    why = explain(report)
    [kill] = report.kills
    assert kill.style == "during_submit" and kill.on_target, why
    assert report.tally.duplicate_submits == 0 and report.tally.duplicate_deliveries == 0, why
    in_doubt = [c for c in report.commands if not c.image_messages]
    assert len(in_doubt) <= 1, why
    for command in in_doubt:
        assert command.final_text and "restarted while sending" in command.final_text, why
