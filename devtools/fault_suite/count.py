"""Counting the fault suite's outcome from what the stand-ins recorded, never from what the bot says.

Each command's prompt carries a unique tag, so a Segmind submit (its payload) and a Discord message with
images (its embed) are traced back to the command without asking the bot.

Faults whose answer has an HTTP status of its own (5xx, 429, a dropped connection) are counted from the
Segmind stand-in's request records. The others (slow answers and most hostile ones: a 200 that is
malformed, huge, or lists foreign URLs or extra outputs) look like any answer in the records, so the suite
attributes them: only one fault is pending per target at a time, and the stand-in serves faults in the
order injected, so the first `count` requests to reach the target after an injection are the ones it hit.

The suite's other origin (where a hostile Segmind points URLs and redirects) records every request; one
carrying the Segmind key is a leak, counted as `key_sent_elsewhere`, and fails the run like a lost job.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.fakes.discord.models import RecordedRequest, StoredMessage
from devtools.fakes.discord.server import DiscordStandIn, InteractionHandle
from devtools.fakes.segmind.server import SegmindServer
from devtools.fakes.segmind.stats import RequestRecord
from devtools.fault_suite.plan import PlannedCommand
from devtools.stack import PROGRESS_MARKS


@dataclass
class FiredCommand:
    planned: PlannedCommand
    fired_at: float  # seconds since the suite started
    user_id: int
    handle: InteractionHandle | None = None
    fire_error: str | None = None


@dataclass
class KillRecord:
    at: float
    planned_at: float
    style: str
    process: str
    in_flight: list[str]  # tags acknowledged and not yet delivered at the kill
    submitted_in_flight: list[str]  # of those, the ones Segmind had accepted
    on_target: bool  # the moment aimed at was reached (else the kill came when the wait ran out)
    restarted_ready_at: float | None = None


@dataclass
class InjectedFault:
    name: str
    target: str
    count: int
    params: dict[str, Any]
    planned_at: float
    injected_at: float | None = None  # None: never injected (the run ended first)
    detail: str = ""
    # Segmind faults: how many requests had reached the target when this fault was injected (its hits
    # are the next `count` of them; see the module docstring).
    first_request: int | None = None


@dataclass
class CommandOutcome:
    index: int
    tag: str
    member: int
    fired_at: float
    acknowledged: bool
    submits: list[str]  # Segmind request ids accepted for this command
    image_messages: list[dict[str, Any]]  # one entry per distinct Discord message holding its images
    uploads: int  # accepted uploads of its images (an edit replacing the same images counts again)
    delivered_after: float | None  # seconds from the command to its first accepted upload
    final_text: str | None  # what the original response says when it holds no images

    @property
    def delivered(self) -> bool:
        return bool(self.image_messages)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tag": self.tag,
            "member": self.member,
            "fired_at": round(self.fired_at, 3),
            "acknowledged": self.acknowledged,
            "submits": self.submits,
            "image_messages": self.image_messages,
            "uploads": self.uploads,
            "delivered_after": None if self.delivered_after is None else round(self.delivered_after, 3),
            "final_text": self.final_text,
        }


@dataclass
class Tally:
    jobs: int
    acknowledged: int
    submits: int
    commands_submitted: int
    delivered: int
    lost: int
    duplicate_submits: int  # commands submitted to Segmind more than once
    duplicate_deliveries: int  # commands whose images are in more than one Discord message
    misdelivered: int  # an interaction's response holding another command's images
    unmatched_submits: int  # submits whose prompt names no command of this run
    re_uploads: int  # uploads beyond one per message: the same message edited with the same images again
    delivered_in_channel: int  # delivered as a channel (or DM) message instead of the original response

    @property
    def duplicated(self) -> int:
        return self.duplicate_submits + self.duplicate_deliveries

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0 and self.duplicated == 0 and self.misdelivered == 0 and not self.unmatched_submits
        )


@dataclass
class SuiteReport:
    options: dict[str, Any]
    tally: Tally
    commands: list[CommandOutcome]
    faults_planned: dict[str, int]
    faults_injected: dict[str, int]
    faults_served: dict[str, int]  # what the stand-ins recorded answering with a fault
    injections: list[InjectedFault]
    kills: list[KillRecord]
    processes: list[dict[str, Any]]
    wall_seconds: float
    latency: dict[str, float]
    log_findings: dict[str, Any]
    problems: list[dict[str, Any]] = field(default_factory=list)
    requests_elsewhere: int = 0  # requests that reached the other origin
    key_sent_elsewhere: int = 0  # of those, the ones carrying the Segmind key (in a header or the URL)

    @property
    def ok(self) -> bool:
        return self.tally.ok and self.key_sent_elsewhere == 0

    def to_json(self) -> dict[str, Any]:
        tally = self.tally
        return {
            "ok": self.ok,
            "options": self.options,
            "jobs": tally.jobs,
            "acknowledged": tally.acknowledged,
            "submits": tally.submits,
            "commands_submitted": tally.commands_submitted,
            "delivered": tally.delivered,
            "lost": tally.lost,
            "duplicated": tally.duplicated,
            "duplicate_submits": tally.duplicate_submits,
            "duplicate_deliveries": tally.duplicate_deliveries,
            "misdelivered": tally.misdelivered,
            "unmatched_submits": tally.unmatched_submits,
            "re_uploads": tally.re_uploads,
            "delivered_in_channel": tally.delivered_in_channel,
            "requests_elsewhere": self.requests_elsewhere,
            "key_sent_elsewhere": self.key_sent_elsewhere,
            "kills": len(self.kills),
            "kills_on_target": sum(1 for kill in self.kills if kill.on_target),
            "wall_seconds": round(self.wall_seconds, 1),
            "latency_seconds": self.latency,
            "faults_planned": self.faults_planned,
            "faults_injected": self.faults_injected,
            "faults_served": self.faults_served,
            "problems": self.problems,
            "kill_log": [vars(kill) for kill in self.kills],
            "injection_log": [vars(injection) for injection in self.injections],
            "processes": self.processes,
            "log_findings": self.log_findings,
            "per_command": [outcome.to_json() for outcome in self.commands],
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False, default=str) + "\n")

    def table(self) -> str:
        tally = self.tally
        rows = [
            ("jobs (commands sent)", tally.jobs),
            ("acknowledged by the bot", tally.acknowledged),
            ("Segmind submits", tally.submits),
            ("commands submitted", tally.commands_submitted),
            ("delivered", tally.delivered),
            ("  of which in the channel", tally.delivered_in_channel),
            ("lost", tally.lost),
            ("duplicated (submit)", tally.duplicate_submits),
            ("duplicated (delivery)", tally.duplicate_deliveries),
            ("misdelivered", tally.misdelivered),
            ("re-uploads to the same message", tally.re_uploads),
            ("requests to the other origin", self.requests_elsewhere),
            ("key_sent_elsewhere", self.key_sent_elsewhere),
            (
                "kills (SIGKILL) / on target",
                f"{len(self.kills)} / {sum(1 for k in self.kills if k.on_target)}",
            ),
            ("wall time", f"{self.wall_seconds:.1f} s"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines.append("faults served (as recorded by the stand-ins):")
        lines += [f"  {name:<{width - 2}}  {count}" for name, count in sorted(self.faults_served.items())]
        lines.append("faults injected (planned -> injected):")
        lines += [
            f"  {name:<{width - 2}}  {self.faults_planned.get(name, 0)} -> {self.faults_injected.get(name, 0)}"
            for name in sorted(self.faults_planned)
        ]
        lines.append(f"result: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


# -- counting --------------------------------------------------------------------------------------


def tag_in(text: str, tag: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(tag)}(?!\w)", text) is not None


def message_text(message: StoredMessage) -> str:
    parts = [message.content or ""]
    for embed in message.embeds:
        parts += [str(embed.get("title") or ""), str(embed.get("description") or "")]
    return "\n".join(parts)


def payload_text(payload: Any) -> str:
    if not isinstance(payload, dict):
        return ""
    parts = [str(payload.get("content") or "")]
    for embed in payload.get("embeds") or []:
        if isinstance(embed, dict):
            parts.append(str(embed.get("description") or ""))
    return "\n".join(parts)


def is_progress(text: str) -> bool:
    return text.startswith(PROGRESS_MARKS)


def command_outcomes(
    fired: list[FiredCommand], discord: DiscordStandIn, segmind: SegmindServer, zero: float
) -> tuple[list[CommandOutcome], int]:
    """Each command's outcome, and how many submits belong to no command."""
    tags = {command.planned.tag: command for command in fired}
    submits: dict[str, list[str]] = {tag: [] for tag in tags}
    unmatched = 0
    for submit in segmind.stats.submits:
        prompt = str(submit.payload.get("prompt") or "")
        owners = [tag for tag in tags if tag_in(prompt, tag)]
        if len(owners) != 1:
            unmatched += 1
            continue
        submits[owners[0]].append(submit.request_id)

    image_messages: dict[str, list[StoredMessage]] = {tag: [] for tag in tags}
    for message in discord.messages.values():
        if not message.attachments:
            continue
        text = message_text(message)
        for tag in tags:
            if tag_in(text, tag):
                image_messages[tag].append(message)

    uploads: dict[str, list[RecordedRequest]] = {tag: [] for tag in tags}
    for request in discord.requests:
        if not request.files or request.status is None or not 200 <= request.status < 300:
            continue
        text = payload_text(request.json)
        for tag in tags:
            if tag_in(text, tag):
                uploads[tag].append(request)

    outcomes = []
    for tag, command in tags.items():
        handle = command.handle
        original = handle.original if handle is not None else None
        messages = image_messages[tag]
        first_upload = min((r.time for r in uploads[tag]), default=None)
        final_text = None
        if original is not None and not original.attachments:
            final_text = original.content or ("(thinking…)" if original.loading else "")
        outcomes.append(
            CommandOutcome(
                index=command.planned.index,
                tag=tag,
                member=command.planned.member,
                fired_at=command.fired_at,
                acknowledged=handle is not None and handle.callback is not None,
                submits=submits[tag],
                image_messages=[describe_message(m, handle, discord) for m in messages],
                uploads=len(uploads[tag]),
                delivered_after=None if first_upload is None else first_upload - zero - command.fired_at,
                final_text=final_text,
            )
        )
    return outcomes, unmatched


def describe_message(
    message: StoredMessage, handle: InteractionHandle | None, discord: DiscordStandIn
) -> dict[str, Any]:
    if handle is not None and handle.original is not None and handle.original.id == message.id:
        where = "original"
    elif message.interaction_id is not None:
        where = f"response to interaction {message.interaction_id}"
    elif message.channel_id == discord.channel_id:
        where = "channel"
    else:
        where = f"channel {message.channel_id}"
    return {
        "message_id": message.id,
        "where": where,
        "images": len(message.attachments),
        "content": message.content,
        "deleted": message.deleted,
    }


def tally(outcomes: list[CommandOutcome], submits_total: int, unmatched: int) -> Tally:
    return Tally(
        jobs=len(outcomes),
        acknowledged=sum(o.acknowledged for o in outcomes),
        submits=submits_total,
        commands_submitted=sum(1 for o in outcomes if o.submits),
        delivered=sum(o.delivered for o in outcomes),
        lost=sum(not o.delivered for o in outcomes),
        duplicate_submits=sum(1 for o in outcomes if len(o.submits) > 1),
        duplicate_deliveries=sum(1 for o in outcomes if len(o.image_messages) > 1),
        misdelivered=sum(
            1 for o in outcomes for m in o.image_messages if m["where"].startswith("response to interaction")
        ),
        unmatched_submits=unmatched,
        re_uploads=sum(max(0, o.uploads - len(o.image_messages)) for o in outcomes),
        delivered_in_channel=sum(
            1 for o in outcomes if o.delivered and all(m["where"] != "original" for m in o.image_messages)
        ),
    )


def faults_served(
    discord: DiscordStandIn,
    segmind: SegmindServer,
    attributed: Iterable[tuple[str, RequestRecord]] = (),
) -> dict[str, int]:
    """Every request the stand-ins answered with a fault (or dropped), by kind and target.

    `attributed` names the fault that hit each request the records alone cannot tell (see the module
    docstring); those are counted under that name, and not again by their status.
    """
    served: Counter[str] = Counter()
    seen: set[int] = set()
    for name, record in attributed:
        served[f"{name}:{record.target}"] += 1
        seen.add(id(record))
    for record in segmind.stats.requests:
        if id(record) in seen:
            continue
        if record.status is None:
            served[f"segmind_drop:{record.target}"] += 1
        elif record.status >= 500:
            served[f"segmind_{record.status}:{record.target}"] += 1
        elif record.status == 429:
            served[f"segmind_429:{record.target}"] += 1
    for request in discord.requests:
        if request.status is None:
            continue
        if request.status == 429 or request.status >= 500:
            served[f"discord_{request.status}:{request.route}"] += 1
        elif request.status == 401 and request.route in ("edit_original", "followup", "get_original"):
            served[f"discord_401_expired_token:{request.route}"] += 1
    return dict(sorted(served.items()))


def latency_summary(outcomes: list[CommandOutcome]) -> dict[str, float]:
    times = sorted(o.delivered_after for o in outcomes if o.delivered_after is not None)
    if not times:
        return {}

    def pick(q: float) -> float:
        return round(times[min(len(times) - 1, int(q * len(times)))], 2)

    return {"median": pick(0.5), "p90": pick(0.9), "max": round(times[-1], 2)}


# -- evidence for the problems found ---------------------------------------------------------------

_JOB_SUBMITTED = re.compile(r"job (\S+): submitted as (\S+)")


def scan_logs(logs: dict[str, str]) -> dict[str, Any]:
    """Tracebacks and ERROR lines in the bot's logs: not counted, but shown so they get looked at."""
    errors = []
    tracebacks = 0
    for name, text in logs.items():
        tracebacks += text.count("Traceback (most recent call last)")
        errors += [f"{name}: {line}" for line in text.splitlines() if " ERROR " in line]
    return {"tracebacks": tracebacks, "error_lines": len(errors), "first_error_lines": errors[:20]}


def problems(
    outcomes: list[CommandOutcome], kills: list[KillRecord], logs: dict[str, str]
) -> list[dict[str, Any]]:
    """For each lost or duplicated command: what the stand-ins saw, the kills around it, its log lines."""
    job_of_request: dict[str, str] = {}
    for text in logs.values():
        for match in _JOB_SUBMITTED.finditer(text):
            job_of_request[match.group(2)] = match.group(1)
    found = []
    for outcome in outcomes:
        issues = []
        if not outcome.delivered:
            issues.append("lost")
        if len(outcome.submits) > 1:
            issues.append("submitted more than once")
        if len(outcome.image_messages) > 1:
            issues.append("delivered more than once")
        if not issues:
            continue
        job_ids = sorted({job_of_request[r] for r in outcome.submits if r in job_of_request})
        needles = [*outcome.submits, *(f"job {job_id}:" for job_id in job_ids)]
        lines = [
            f"{name}: {line}"
            for name, text in logs.items()
            for line in text.splitlines()
            if any(needle in line for needle in needles)
        ]
        found.append(
            {
                "tag": outcome.tag,
                "issues": issues,
                "acknowledged": outcome.acknowledged,
                "submits": outcome.submits,
                "job_ids": job_ids,
                "image_messages": outcome.image_messages,
                "final_text": outcome.final_text,
                "fired_at": round(outcome.fired_at, 3),
                "kills_while_in_flight": [
                    round(kill.at, 3) for kill in kills if outcome.tag in kill.in_flight
                ],
                "log_lines": lines[:60],
            }
        )
    return found
