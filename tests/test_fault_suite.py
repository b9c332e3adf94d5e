"""The fault suite, small: the real bot process under Segmind and Discord faults and a SIGKILL, on either store.

The small run holds every fault kind at least once, the hostile Segmind answers included (see
devtools/fault_suite/plan.py), and none may cost a job or send the Segmind key to another origin.

The edge tests each aim one kill at a moment the bot does not survive yet (see devtools/fault_suite/plan.py,
PlannedKill): they are expected to fail until the bot handles that moment, and fail loudly (strict) once
it does, so the marker can go.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiohttp
import pytest

from devtools.fault_suite.plan import FAULT_NAMES, HOSTILE_FAULT_NAMES, KillStyle, make_plan
from devtools.fault_suite.suite import (
    SEGMIND_KEY,
    OtherOrigin,
    SuiteOptions,
    SuiteReport,
    parse_args,
    run_suite,
)
from tests.conftest import database_url

STORES = ["sqlite", "redis"]


class LostOrDuplicated(AssertionError):
    """Raised only for the outcome under test, so an edge test cannot pass as expected for another reason."""


def explain(report: SuiteReport) -> str:
    lines = [report.table()]
    for problem in report.problems:
        lines.append(f"{problem['tag']}: {problem['issues']}; submits {problem['submits']}")
        lines += [f"    {line}" for line in problem["log_lines"][-15:]]
    lines += report.log_findings["first_error_lines"]
    lines.append(f"injections: {[vars(i) for i in report.injections]}")
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
    # Seed 146 plans every hostile kind early and near the head of its target's queue, ahead of any slow
    # answer: a result is fetched once per job, so one queued behind a few others may find no job left.
    report = await run_small(tmp_path, store, jobs=8, kills=1, seed=146)
    why = explain(report)
    counts = report.tally

    assert counts.jobs == counts.acknowledged == 8, why
    assert counts.lost == 0, why
    assert counts.duplicate_submits == 0 and counts.submits == 8, why
    assert counts.duplicate_deliveries == 0 and counts.misdelivered == 0, why
    assert counts.delivered == 8, why
    assert report.key_sent_elsewhere == 0, why
    assert report.ok, why

    # The faults really happened, as the stand-ins recorded them.
    assert served(report, "segmind_") >= 2, why
    assert served(report, "discord_429") + served(report, "discord_5") >= 1, why
    assert report.faults_injected.get("token_expired") == 1 and counts.delivered_in_channel >= 1, why
    for name in HOSTILE_FAULT_NAMES:
        assert report.faults_injected.get(name, 0) >= 1, (name, why)
        assert served(report, f"{name}:") >= 1, (name, why)
    [kill] = report.kills
    assert kill.on_target and kill.submitted_in_flight, why
    assert [p["how_ended"] for p in report.processes] == ["killed", "terminated"], why
    assert report.log_findings["tracebacks"] == 0, why
    # A key sent elsewhere fails the run like a lost job.
    assert not dataclasses.replace(report, key_sent_elsewhere=1).ok


def test_the_plan_holds_each_hostile_kind_within_what_the_bot_retries() -> None:
    plan = make_plan(jobs=40, kills=3, seed=1)
    names = {fault.name for fault in plan.faults}
    assert set(FAULT_NAMES) <= names
    for fault in plan.faults:
        if fault.name not in HOSTILE_FAULT_NAMES:
            continue
        assert fault.count <= (2 if fault.target in ("submit", "output") else 3), fault
        if fault.name == "segmind_odd_image":
            assert fault.target == "output" and fault.params == {"format": "mpo"}, fault
        if fault.name == "segmind_huge_body":
            assert fault.target == "status" and 8 <= fault.params["mib"] <= 20, fault
        if fault.name == "segmind_many_outputs":
            assert fault.target == "result" and fault.params["outputs"] > 2, fault
        if fault.name == "segmind_odd_reset":
            assert fault.params["value"] in ("inf", "-1", "garbage", "99999999999"), fault
    # Faults that make a job fail by design are not in the suite.
    assert not any("echo_key" in name for name in FAULT_NAMES)


async def test_the_other_origin_counts_requests_that_carry_the_key() -> None:
    elsewhere = OtherOrigin(SEGMIND_KEY)
    await elsewhere.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"{elsewhere.base_url}/steal", headers={"x-api-key": SEGMIND_KEY}
            ) as reply:
                assert reply.status == 404
            async with session.get(f"{elsewhere.base_url}/v2/requests/x/status") as reply:
                assert reply.status == 404
            async with session.post(f"{elsewhere.base_url}/q?key={SEGMIND_KEY}") as reply:
                assert reply.status == 404
    finally:
        await elsewhere.stop()
    assert [r.path for r in elsewhere.requests] == ["/steal", "/v2/requests/x/status", "/q"]
    assert [[name.lower() for name in r.key_in] for r in elsewhere.key_sent] == [["x-api-key"], ["url"]]


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 40)", "(default: 1)", "(default: 3)", "(default: sqlite)", "(default: 120.0)"):
        assert shown in text


@pytest.mark.parametrize("style", ["after_ack", "after_channel_post"])
async def test_a_kill_at_an_edge_moment_loses_and_duplicates_nothing(
    tmp_path: Path, style: KillStyle
) -> None:
    """Killed just after the command was acknowledged, or just after a channel post but before it was
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
