"""The persistence interface: quotas, job records, job leases, timed flags and command syncs.

Every method takes the current time from the caller (`now`) instead of reading a clock, so the
same rules hold for every backend and tests can drive time explicitly.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

if TYPE_CHECKING:
    from services.segmind.budget import SharedWindow

log = logging.getLogger(__name__)


class JobState(StrEnum):
    PENDING = "pending"  # recorded, quota reserved, not yet submitted to Segmind
    # The submit is on its way: if the process dies now, nobody knows whether Segmind accepted it, so
    # the job must not be submitted again.
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"  # Segmind accepted it; segmind_request_id known; being polled
    COMPLETED = "completed"  # images obtained; delivery to Discord pending
    DELIVERED = "delivered"  # terminal
    # Generated and paid for, but no delivery attempt reached the member: `/jobs` offers Resend.
    UNDELIVERED = "undelivered"
    FAILED = "failed"  # terminal


UNFINISHED: frozenset[JobState] = frozenset(
    {JobState.PENDING, JobState.SUBMITTING, JobState.SUBMITTED, JobState.COMPLETED}
)
FINISHED: frozenset[JobState] = frozenset(JobState) - UNFINISHED

JOB_ID_BYTES = 9  # 9 random bytes -> 12 url-safe characters, short enough for button custom_ids


def new_job_id() -> str:
    return secrets.token_urlsafe(JOB_ID_BYTES)


@dataclass(frozen=True)
class JobRecord:
    id: str
    user_id: int
    guild_id: int | None
    channel_id: int | None
    request: dict[str, Any]
    reservation_id: str | None
    state: JobState
    created_at: float
    updated_at: float
    interaction_id: int | None = None
    interaction_token: str | None = field(default=None, repr=False)
    interaction_created_at: float | None = None
    message_id: int | None = None
    application_id: int | None = None
    segmind_request_id: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    origin: str = "command"  # "command", "reroll", "same_seed"
    upload_limit: int | None = None  # the interaction's attachment size limit, for delivery after a restart
    requester_name: str | None = None
    # Epoch seconds when the submit first left for Segmind: the job's deadline counts from here, restarts or not.
    submitted_at: float | None = None
    delivery_attempts: int = 0  # failed attempts to post a completed job; bounded across sweeps

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def evolve(self, now: float, **changes: Any) -> JobRecord:
        """A copy with `changes` applied and `updated_at` bumped to `now`."""
        return replace(self, updated_at=now, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    def to_json(self) -> str:
        """The stored form: `to_dict` as compact JSON, built without `asdict`'s deep copy (a third of the
        cost, at several saves a job), since the encoder only reads the nested request and result."""
        data = {name: getattr(self, name) for name in _JOB_FIELDS}
        data["state"] = self.state.value
        try:
            # orjson: a job is saved at every state change, and the standard encoder was most of the cost.
            return orjson.dumps(data).decode()
        except TypeError:
            # What orjson refuses (an integer past 64 bits in an answer from outside) the standard one takes.
            return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        """A record from its stored form; `UnreadableJob` if it is not one this version understands."""
        if not isinstance(data, dict):
            raise UnreadableJob(f"a job record must be a JSON object, not {type(data).__name__}")
        # Unknown keys are dropped so records written by a newer version still load after a rollback.
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        try:
            values["state"] = JobState(values["state"])
            return cls(**values)
        except (KeyError, TypeError, ValueError) as error:
            raise UnreadableJob(f"{type(error).__name__}: {error}") from None


_JOB_FIELDS = tuple(f.name for f in fields(JobRecord))


class UnreadableJob(ValueError):
    """A stored job record this version cannot load (bad JSON, unknown state, missing fields)."""


def load_job(data: str | bytes, job_id: str) -> JobRecord | None:
    """Parses a stored record; one that cannot be read is logged and skipped, so it strands no other job."""
    try:
        return JobRecord.from_dict(json.loads(data))
    except ValueError as error:  # json's errors and UnreadableJob alike
        log.error("job %s: its stored record cannot be read, so it is skipped: %s", job_id, error)
        return None


# A limit no real usage reaches; well inside the range Lua's doubles represent exactly.
UNLIMITED = 1_000_000_000


@dataclass(frozen=True)
class QuotaLimits:
    daily_images: int
    max_concurrent: int
    window_seconds: float = 86400.0

    def __post_init__(self) -> None:
        if self.daily_images < 0:
            raise ValueError(f"daily_images must be >= 0, got {self.daily_images}")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.window_seconds <= 0:
            raise ValueError(f"window_seconds must be > 0, got {self.window_seconds}")

    @classmethod
    def unlimited(cls, window_seconds: float = 86400.0) -> QuotaLimits:
        """Limits no real usage reaches: reservations are still recorded so usage stays visible."""
        return cls(daily_images=UNLIMITED, max_concurrent=UNLIMITED, window_seconds=window_seconds)


@dataclass(frozen=True)
class Reservation:
    id: str
    user_id: int
    images: int
    created_at: float
    guild_id: int | None = None  # whose limits: a member's quota is per server (None: direct messages)


@dataclass(frozen=True)
class QuotaRefusal:
    reason: Literal["daily", "concurrent"]
    remaining_images: int  # images left in the rolling window right now
    in_flight: int  # reservations of this user still reserved (neither committed nor refunded)
    # When enough images leave the window for this request to fit ("daily"). None for "concurrent",
    # and None for "daily" when the request is larger than the daily limit itself (see exceeds_daily_limit).
    resets_at: float | None
    requested_images: int = 0
    daily_limit: int = 0
    max_concurrent: int = 0

    @property
    def exceeds_daily_limit(self) -> bool:
        """True when waiting will never help: the request alone is larger than the daily limit."""
        return self.reason == "daily" and self.requested_images > self.daily_limit


@dataclass(frozen=True)
class QuotaUsage:
    used_images: int
    remaining_images: int
    in_flight: int
    daily_limit: int
    max_concurrent: int
    resets_at: float | None  # when the oldest counted usage leaves the window (None if nothing counted)


@dataclass(frozen=True)
class SyncClaim:
    """The store's answer to `Store.claim_command_sync`."""

    outcome: Literal["claimed", "busy", "synced"]
    synced_at: float | None = None  # with `synced`: when that sync was recorded


@dataclass(frozen=True)
class Ban:
    """A member who may not use the bot in one server, until `until` (None: until lifted)."""

    guild_id: int
    user_id: int
    until: float | None
    reason: str
    by_id: int | None  # the moderator, None when strikes banned automatically
    created_at: float

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def read(cls, text: str | bytes) -> Ban | None:
        """The stored ban, or None (with a warning) for a record that cannot be read: it bans no one."""
        try:
            return cls.from_json(text)
        except (ValueError, KeyError, TypeError) as error:
            log.warning("a stored ban is unreadable and is ignored: %s", error)
            return None

    @classmethod
    def from_json(cls, text: str | bytes) -> Ban:
        data = json.loads(text)
        return cls(
            guild_id=int(data["guild_id"]),
            user_id=int(data["user_id"]),
            until=None if data.get("until") is None else float(data["until"]),
            reason=str(data.get("reason") or ""),
            by_id=None if data.get("by_id") is None else int(data["by_id"]),
            created_at=float(data["created_at"]),
        )


@dataclass(frozen=True)
class UsageCounts:
    """What one member did in one server on one day, for `/admin usage`."""

    jobs: int = 0  # jobs that reached Segmind
    images: int = 0  # images generated
    blocked: int = 0  # prompts refused by the server's rules or Segmind's filter
    failed: int = 0  # jobs that ended without images for another reason
    gpu_seconds: float = 0.0  # Segmind's inference_time, summed

    def __add__(self, other: UsageCounts) -> UsageCounts:
        return UsageCounts(
            *(getattr(self, name) + getattr(other, name) for name in USAGE_COUNTERS)  # type: ignore[arg-type]
        )


USAGE_COUNTERS = tuple(f.name for f in fields(UsageCounts))
USAGE_RETENTION_DAYS = 100  # `/admin usage` looks back 90 days at most


def usage_day(now: float) -> str:
    """The day (UTC, ISO) usage at `now` counts on."""
    return datetime.fromtimestamp(now, UTC).date().isoformat()


def days_between(first_day: str, last_day: str) -> list[str]:
    """The ISO dates from `first_day` to `last_day`, both included."""
    first, last = date.fromisoformat(first_day), date.fromisoformat(last_day)
    return [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]


@dataclass(frozen=True)
class UsageRow:
    day: str  # ISO date, UTC
    user_id: int
    counts: UsageCounts


class Store(Protocol):
    """What the bot keeps between restarts and shares between its processes, behind one small interface.

    A backend owns its connection and everything stored through it: quota reservations, job records,
    job leases, timed flags and which commands were synced where. It guarantees that each method is one
    atomic step against every other caller, in this process or another one sharing the database, so a
    read-check-write (a reservation within the limits, a lease, a sync claim) can never race. Times come
    from the caller (`now`), so every backend applies the same rules at the same instant.
    """

    async def close(self) -> None: ...

    # Quota, per member per server (`guild_id` None: direct messages). Usage counts reservations that are
    # reserved or committed and were created within the window; in_flight counts those still reserved.
    async def reserve(
        self, user_id: int, images: int, limits: QuotaLimits, now: float, *, guild_id: int | None = None
    ) -> Reservation | QuotaRefusal: ...

    async def commit(self, reservation_id: str) -> None: ...

    async def refund(self, reservation_id: str) -> None: ...

    async def usage(
        self, user_id: int, limits: QuotaLimits, now: float, *, guild_id: int | None = None
    ) -> QuotaUsage: ...

    async def reserve_job(
        self, job: JobRecord, images: int, limits: QuotaLimits, now: float
    ) -> JobRecord | QuotaRefusal | Ban:
        """Reserves `images` for `job.user_id` in `job.guild_id` under the id `job.reservation_id` and saves
        `job`, in one atomic step: the job, returned as saved, or the refusal, with nothing recorded. In a
        server, a member's active ban there refuses first (the Ban), checked in that same step, so a
        command costs no read of its own for it and a ban set a moment before is never missed.

        For a job being taken in: it must be unfinished, and its reservation id one `new_reservation_id`
        made for its member and server (`check_reservable`). No reservation without its job is ever left behind, and
        the record and the reservation cost one trip to the store between them.
        """
        ...

    # Jobs.
    async def save_job(self, job: JobRecord) -> None: ...

    async def settle_job(self, job: JobRecord, *, billed: bool, day: str, counts: UsageCounts) -> None:
        """Saves `job`, commits its reservation (`billed`) or refunds it, and adds `counts` to its member's
        usage in its server on `day` (none is kept for direct messages), in one atomic step.

        For the end of a job at Segmind: what it writes then costs one trip to the store, not three, on
        the way from a finished image to the member.
        """
        ...

    async def get_job(self, job_id: str) -> JobRecord | None: ...

    async def unfinished_jobs(self, created_after: float) -> list[JobRecord]: ...

    # Reservations still reserved (neither committed nor refunded) that were created before `before`.
    async def reserved_before(self, before: float) -> list[str]: ...

    async def recent_jobs(self, user_id: int, limit: int = 10) -> list[JobRecord]: ...

    # Leases: one owner at a time; an expired lease can be taken over.
    async def acquire_lease(self, job_id: str, owner: str, ttl: float, now: float) -> bool: ...

    async def release_lease(self, job_id: str, owner: str) -> None: ...

    # Timed flags.
    async def set_flag(self, name: str, until: float) -> None: ...

    async def get_flag(self, name: str, now: float) -> float | None: ...

    async def clear_flag(self, name: str) -> None: ...

    # Command sync: what each target (an application's global commands, or a server's) was last sent, so
    # that a start syncs only what changed, and one process at a time.
    async def claim_command_sync(
        self, target: str, digest: str, owner: str, now: float, *, ttl: float, max_age: float
    ) -> SyncClaim:
        """Asks to sync `digest` to `target` as `owner` (a token unique to this attempt); one atomic step.

        `busy` while another owner's claim is under way, whatever its digest (a claim lasts the `ttl` its
        claimer gave, or until finished): the caller is to ask again once it ends, since what that owner
        syncs decides whether `digest` still needs syncing. Otherwise `synced` when `digest` is what was
        last synced there, less than `max_age` seconds ago (0: no record counts), with `synced_at`; and
        else `claimed`: the caller holds the claim until `now + ttl` and is to sync, then to call
        `finish_command_sync`.
        """
        ...

    async def finish_command_sync(
        self, target: str, digest: str, owner: str, now: float, *, synced: bool
    ) -> bool:
        """Ends `owner`'s claim: `synced` records `digest` as synced at `now`; otherwise what was synced
        before stays recorded, so the next claimer syncs. False, changing nothing, when `owner` no longer
        holds the claim (it lapsed and another owner took it over, or it was finished already)."""
        ...

    # Server administration: each server's settings (one JSON document, `GuildSettings`), its bans and
    # the strikes (blocked prompts) that may ban automatically.
    async def get_guild_settings(self, guild_id: int) -> str | None: ...

    async def update_guild_settings(self, guild_id: int, change: Callable[[str | None], str]) -> str:
        """Reads the settings, passes them to `change` and stores what it returns, in one atomic step
        (two admins changing settings at once both land); returns what was stored. An exception from
        `change` stores nothing and reaches the caller."""
        ...

    async def set_ban(self, ban: Ban) -> None: ...

    async def lift_ban(self, guild_id: int, user_id: int, now: float) -> bool:
        """False when the member was not banned (or the ban had ended)."""
        ...

    async def get_ban(self, guild_id: int, user_id: int, now: float) -> Ban | None: ...

    async def list_bans(self, guild_id: int, now: float) -> list[Ban]: ...

    async def add_strike(self, guild_id: int, user_id: int, at: float, window: float) -> int:
        """Records a strike at `at`; returns the member's strikes within the `window` seconds up to it."""
        ...

    async def clear_strikes(self, guild_id: int, user_id: int) -> None: ...

    # Mod-log cases (`ModCase`): entries a moderator can act on, each decided once, kept until `expires_at`.
    async def add_case(self, case_id: str, data: str, expires_at: float) -> bool:
        """Records a case unless one with this id exists (False then: an appeal sent twice)."""
        ...

    async def get_case(self, case_id: str) -> tuple[str, str | None] | None:
        """The case and its decision (None while it is open); None for a case not recorded."""
        ...

    async def decide_case(self, case_id: str, decision: str) -> str | None:
        """Records `decision` if the case is still open, in one atomic step; returns the decision that
        stands (this one when it won, the earlier one when another moderator was first), or None for a
        case not recorded."""
        ...

    async def reopen_case(self, case_id: str, decision: str) -> None:
        """Takes `decision` back (its action failed) if it is still the one recorded."""
        ...

    async def add_report(self, job_id: str, user_id: int, expires_at: float) -> int | None:
        """Records a member's report of a job's result: how many members have reported it, or None when
        this one had already."""
        ...

    # Usage per server, day (ISO date, UTC) and member, kept USAGE_RETENTION_DAYS.
    async def add_usage(self, guild_id: int, day: str, user_id: int, counts: UsageCounts) -> None: ...

    async def usage_between(self, guild_id: int, first_day: str, last_day: str) -> list[UsageRow]:
        """Every member's counts on each day from `first_day` to `last_day`, both included."""
        ...

    # The Segmind request budget: several processes on one API key must keep to one limit together.
    def shared_request_window(self, account: str) -> SharedWindow | None:
        """The request window every process on this store spending `account`'s budget shares, or None
        when the backend serves one process only (SQLite), whose own window is then the whole budget.

        `account` names whose plan the requests count against (a digest of the API key, never the key):
        bots on one store with different keys have budgets of their own."""
        ...


# --- Quota rules shared by the backends (the Redis Lua script mirrors them) ---

RESERVED = "reserved"
COMMITTED = "committed"
REFUNDED = "refunded"
COUNTED_STATES = (RESERVED, COMMITTED)


@dataclass(frozen=True)
class QuotaEntry:
    created_at: float
    images: int
    state: str


def new_reservation_id(user_id: int, guild_id: int | None = None) -> str:
    """`<user>.<token>` in direct messages, `<user>.<server>.<token>` in a server: commit and refund find
    the member's quota from the id alone (ids from before quotas were per server have no server part)."""
    token = secrets.token_urlsafe(12)  # url-safe base64 has no "."
    return f"{user_id}.{token}" if guild_id is None else f"{user_id}.{guild_id}.{token}"


def reservation_holder(reservation_id: str) -> tuple[int, int | None] | None:
    """Whose quota a reservation id counts against, (user, server or None); None for an id not made by
    `new_reservation_id`."""
    parts = reservation_id.split(".")
    if (
        len(parts) not in (2, 3)
        or not parts[-1]
        or not all(part.isascii() and part.isdigit() for part in parts[:-1])
    ):
        return None
    return int(parts[0]), int(parts[1]) if len(parts) == 3 else None


def check_images(images: int) -> None:
    if images < 1:
        raise ValueError(f"a reservation needs at least 1 image, got {images}")


def check_reservable(job: JobRecord, images: int, now: float) -> Reservation:
    """The reservation `Store.reserve_job` is to record for `job`; ValueError if the job cannot have one."""
    check_images(images)
    holder = (job.user_id, job.guild_id)
    if job.reservation_id is None or reservation_holder(job.reservation_id) != holder:
        raise ValueError(f"job {job.id}: its reservation id must be one made for member and server {holder}")
    if job.finished:
        raise ValueError(f"job {job.id} is {job.state}: only a job being taken in reserves quota")
    return Reservation(job.reservation_id, job.user_id, images, now, job.guild_id)


def _counted(entries: Iterable[QuotaEntry], limits: QuotaLimits, now: float) -> list[QuotaEntry]:
    cutoff = now - limits.window_seconds
    kept = [e for e in entries if e.state in COUNTED_STATES and e.created_at > cutoff]
    return sorted(kept, key=lambda e: e.created_at)


def summarize(entries: Iterable[QuotaEntry], limits: QuotaLimits, now: float) -> QuotaUsage:
    counted = _counted(entries, limits, now)
    used = sum(e.images for e in counted)
    return QuotaUsage(
        used_images=used,
        remaining_images=max(0, limits.daily_images - used),
        in_flight=sum(1 for e in counted if e.state == RESERVED),
        daily_limit=limits.daily_images,
        max_concurrent=limits.max_concurrent,
        resets_at=counted[0].created_at + limits.window_seconds if counted else None,
    )


def evaluate(
    entries: Iterable[QuotaEntry], images: int, limits: QuotaLimits, now: float
) -> QuotaRefusal | None:
    """The refusal for a request of `images` given the user's entries, or None if it fits.

    The daily limit is checked first: a "concurrent" refusal tells the user to retry shortly, which
    would mislead if the daily limit would refuse them anyway.
    """
    counted = _counted(entries, limits, now)
    used = sum(e.images for e in counted)
    in_flight = sum(1 for e in counted if e.state == RESERVED)
    refusal = {
        "remaining_images": max(0, limits.daily_images - used),
        "in_flight": in_flight,
        "requested_images": images,
        "daily_limit": limits.daily_images,
        "max_concurrent": limits.max_concurrent,
    }
    if used + images > limits.daily_images:
        return QuotaRefusal(reason="daily", resets_at=_fits_at(counted, used, images, limits), **refusal)
    if in_flight >= limits.max_concurrent:
        return QuotaRefusal(reason="concurrent", resets_at=None, **refusal)
    return None


def _fits_at(counted: list[QuotaEntry], used: int, images: int, limits: QuotaLimits) -> float | None:
    if images > limits.daily_images:
        return None
    freed = 0
    for entry in counted:
        freed += entry.images
        if used - freed + images <= limits.daily_images:
            return entry.created_at + limits.window_seconds
    return None
