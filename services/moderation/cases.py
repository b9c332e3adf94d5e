"""Mod-log cases: the entries moderators act on with buttons, and the one decision each gets."""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

log = logging.getLogger(__name__)

CASE_ID_BYTES = 9  # 12 url-safe characters: room in a button's custom_id
CASE_ID_PATTERN = r"[A-Za-z0-9_-]{4,64}"
CASE_RETENTION_SECONDS = 90 * 86400.0  # a case older than this can no longer be acted on


class CaseKind(StrEnum):
    BLOCKED = "blocked"  # the server's blocklist or AutoMod rules refused a prompt
    CONTENT = "content"  # Segmind's content filter refused a prompt
    REPORT = "report"  # a member reported a result
    HIDDEN = "hidden"  # a result hidden after enough reports
    APPEAL = "appeal"  # a member appealed a block or a ban
    CREDITS = "credits"  # Segmind's account ran out of credits


class Action(StrEnum):
    BAN = "ban"  # ban the member for a day
    DISMISS = "dismiss"
    DELETE = "delete"  # delete the reported result
    RESTORE = "restore"  # show a hidden result again
    LIFT = "lift"  # accept an appeal: lift the ban
    UPHOLD = "uphold"  # refuse an appeal


# The buttons each entry carries, in order.
ACTIONS: dict[CaseKind, tuple[Action, ...]] = {
    CaseKind.BLOCKED: (Action.BAN, Action.DISMISS),
    CaseKind.CONTENT: (Action.BAN, Action.DISMISS),
    CaseKind.REPORT: (Action.BAN, Action.DISMISS, Action.DELETE),
    CaseKind.HIDDEN: (Action.RESTORE, Action.DELETE, Action.BAN),
    CaseKind.APPEAL: (Action.LIFT, Action.UPHOLD),  # Lift ban accepts an appeal: ban and strikes go
    CaseKind.CREDITS: (Action.DISMISS,),
}


def new_case_id() -> str:
    return secrets.token_urlsafe(CASE_ID_BYTES)


@dataclass(frozen=True)
class Decision:
    action: Action
    by_id: int
    at: float

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "action": self.action.value}, separators=(",", ":"))

    @classmethod
    def read(cls, text: str) -> Decision | None:
        try:
            data = json.loads(text)
            return cls(Action(data["action"]), int(data["by_id"]), float(data["at"]))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("a case's stored decision is unreadable: %s", error)
            return None


@dataclass(frozen=True)
class ModCase:
    """One mod-log entry: what happened, to whom, and (once a moderator acted) the decision.

    Kept in the store under its id, which the entry's buttons carry, so the buttons work after a restart
    and on any shard; the store records the first decision only, so two moderators pressing at once
    cannot both act.
    """

    id: str
    kind: CaseKind
    guild_id: int | None
    created_at: float
    member_id: int | None = None  # whom it is about
    channel_id: int | None = None
    job_id: str | None = None
    message_id: int | None = None  # the result reported, in `channel_id`
    text: str = ""  # the prompt, or the member's own words (an appeal)
    detail: str = ""  # what matched, the request id, the ban appealed
    ban_at: float | None = None  # the appealed ban's `created_at`: Lift ban lifts that ban only
    decision: Decision | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {name: getattr(self, name) for name in _STORED}
        data["kind"] = self.kind.value
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def read(cls, stored: tuple[str, str | None]) -> ModCase | None:
        """The case from the store's (data, decision); None, with a warning, for one that cannot be read."""
        text, decision = stored
        try:
            data = json.loads(text)
            case = cls(
                id=str(data["id"]),
                kind=CaseKind(data["kind"]),
                guild_id=None if data.get("guild_id") is None else int(data["guild_id"]),
                created_at=float(data["created_at"]),
                member_id=None if data.get("member_id") is None else int(data["member_id"]),
                channel_id=None if data.get("channel_id") is None else int(data["channel_id"]),
                job_id=None if data.get("job_id") is None else str(data["job_id"]),
                message_id=None if data.get("message_id") is None else int(data["message_id"]),
                text=str(data.get("text", "")),
                detail=str(data.get("detail", "")),
                ban_at=None if data.get("ban_at") is None else float(data["ban_at"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("a stored mod-log case is unreadable and is ignored: %s", error)
            return None
        return case if decision is None else replace(case, decision=Decision.read(decision))


_STORED = (
    "id",
    "kind",
    "guild_id",
    "created_at",
    "member_id",
    "channel_id",
    "job_id",
    "message_id",
    "text",
    "detail",
    "ban_at",
)
