"""SQLite store: WAL mode, the writes of one event-loop turn committed together in one transaction.

Writes wait in a queue: whatever is waiting when the writer comes round runs as one `BEGIN IMMEDIATE`
transaction, each write in a savepoint of its own, with one commit for all of them, and each caller's
await ends only once that commit is done. A burst of commands therefore costs a few commits, not one per
step of every job; and across processes sharing the file, `BEGIN IMMEDIATE` still takes SQLite's write
lock before anything is read, so a read-check-write cannot race another writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from services.store.base import (
    COMMITTED,
    FINISHED,
    REFUNDED,
    RESERVED,
    UNFINISHED,
    USAGE_COUNTERS,
    USAGE_RETENTION_DAYS,
    Ban,
    JobRecord,
    QuotaEntry,
    QuotaLimits,
    QuotaRefusal,
    QuotaUsage,
    Reservation,
    SyncClaim,
    UsageCounts,
    UsageRow,
    check_images,
    check_reservable,
    evaluate,
    load_job,
    new_reservation_id,
    summarize,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], T]

MEMORY = ":memory:"
SCHEMA_VERSION = 5
# Below this version `command_syncs` had another layout; it only caches what was synced, so it is dropped
# and recreated (the next start syncs once more) rather than migrated.
COMMAND_SYNCS_SINCE = 3
# Since this version a reservation counts against its member's quota in one server (`guild_id`, 0 for
# direct messages); older reservations are a member's in direct messages.
PER_SERVER_QUOTA_SINCE = 5
NO_SERVER = 0
DEFAULT_BUSY_TIMEOUT = 10.0
# Between tries to turn a new file to WAL while another process does the same (on the store's thread).
WAL_SWITCH_RETRY_SECONDS = 0.01
# One commit serves this many writes at most: each of their callers wakes when it is done, and waking
# hundreds at once would hold the event loop (and every command waiting on it) for as long as they all run.
MAX_WRITES_PER_TRANSACTION = 64
# The loop's commits leave the log to grow; the thread folds it back into the file after this many.
CHECKPOINT_EVERY_COMMITS = 100
DEFAULT_JOB_RETENTION = 7 * 86400.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL,
    images INTEGER NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL,
    guild_id INTEGER NOT NULL DEFAULT 0
);
DROP INDEX IF EXISTS reservations_user_time;
CREATE INDEX IF NOT EXISTS reservations_member_time ON reservations (user_id, guild_id, created_at);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state_time ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_user_time ON jobs (user_id, created_at);
CREATE TABLE IF NOT EXISTS leases (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS flags (
    name TEXT PRIMARY KEY,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS guild_settings (
    guild_id INTEGER PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bans (
    guild_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    until REAL,
    data TEXT NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);
CREATE TABLE IF NOT EXISTS strikes (
    guild_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS strikes_member_time ON strikes (guild_id, user_id, at);
CREATE TABLE IF NOT EXISTS mod_cases (
    id TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    decision TEXT,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    guild_id INTEGER NOT NULL,
    day TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    jobs INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0,
    blocked INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    gpu_seconds REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (guild_id, day, user_id)
);
CREATE TABLE IF NOT EXISTS reports (
    job_id TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (job_id, user_id)
);
CREATE TABLE IF NOT EXISTS command_syncs (
    target TEXT PRIMARY KEY,
    synced TEXT,
    synced_at REAL,
    owner TEXT,
    claimed_until REAL
);
"""

_USAGE_COLUMNS = ", ".join(USAGE_COUNTERS)
_USAGE_SLOTS = ", ".join("?" for _ in USAGE_COUNTERS)
_USAGE_SUMS = ", ".join(f"{name} = {name} + excluded.{name}" for name in USAGE_COUNTERS)
_UNFINISHED_SQL = ", ".join(f"'{state.value}'" for state in sorted(UNFINISHED))
_FINISHED_SQL = ", ".join(f"'{state.value}'" for state in sorted(FINISHED))


class SQLiteStore:
    """The store of one process (or a few on one machine): one SQLite file it opens and closes.

    It owns two connections to the file, the schema (created or extended at open, where the command-sync
    cache of an older layout is recreated and finished jobs past their retention are pruned) and the queue
    of writes waiting for the next transaction. Statements run on the event loop's own connection, which
    never waits for a lock: they take microseconds, where handing each one to a thread would make it wait
    for the interpreter lock behind everything the loop does (milliseconds each, under load). When another
    process holds the write lock, the transaction goes to a thread whose connection waits it out, and that
    thread also runs the checkpoints, the only step that flushes the file to disk.

    It guarantees that each method is one atomic step, against this process's other calls and against
    other processes sharing the file; that a write's await returns only once the transaction holding it is
    committed; and that a write that fails fails its own caller alone, while a transaction that fails as a
    whole (a locked, full or vanished file; a commit that did not go through) fails every caller whose
    write it held, each with one of `TRANSIENT_ERRORS`. A caller cancelled before its transaction began
    leaves nothing behind; one cancelled later may still find its write committed, as with any database.
    """

    # What a locked, full or vanished database file raises; anything else is a bug, not an outage.
    TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)

    def __init__(
        self, db: sqlite3.Connection, patient_db: sqlite3.Connection | None, thread: ThreadPoolExecutor
    ) -> None:
        self._db = db  # the event loop's; never waits for a lock
        self._patient_db = patient_db  # the thread's; None for a database in memory, which nobody shares
        self._thread = thread
        self._waiting: list[_Write[Any]] = []
        self._writer: asyncio.Task[None] | None = None
        self._commits = 0  # since the last checkpoint
        self._checkpoint: asyncio.Future[None] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        job_retention: float = DEFAULT_JOB_RETENTION,
    ) -> SQLiteStore:
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        loop = asyncio.get_running_loop()
        patient_db: sqlite3.Connection | None = None
        db: sqlite3.Connection | None = None
        try:
            if path == MEMORY:
                db = _connect(path, busy_timeout=0.0)
                _prepare(db, path, job_retention)
            else:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                # Opened and prepared on the thread: the schema may have to wait for another process's lock.
                patient_db = await loop.run_in_executor(thread, _connect_patient, path, busy_timeout)
                await loop.run_in_executor(thread, _use_wal, patient_db, busy_timeout)
                await loop.run_in_executor(thread, _prepare, patient_db, path, job_retention)
                db = await loop.run_in_executor(thread, _connect_for_the_loop, path, busy_timeout)
        except BaseException:
            if db is not None:
                db.close()
            if patient_db is not None:
                await loop.run_in_executor(thread, patient_db.close)
            thread.shutdown(wait=False)
            raise
        return cls(db, patient_db, thread)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Writes already accepted are committed before the connections go.
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        loop = asyncio.get_running_loop()
        try:
            self._db.close()
            if self._patient_db is not None:
                # Last to close, so it is the one that folds the log back into the file, on its thread.
                await loop.run_in_executor(self._thread, self._patient_db.close)
        finally:
            self._thread.shutdown(wait=False)

    # --- running statements ---

    async def _call(self, operation: Operation[T]) -> T:
        """Runs `operation` outside any transaction (a read); on the thread if another process holds a
        lock."""
        try:
            return operation(self._db)
        except sqlite3.OperationalError as error:
            if self._patient_db is None or not _busy(error):
                raise
        return await asyncio.get_running_loop().run_in_executor(self._thread, operation, self._patient_db)

    async def _write(self, operation: Operation[T]) -> T:
        """Runs `operation` in the next transaction the store commits; returns once that commit is done."""
        if self._closed:
            raise sqlite3.ProgrammingError("the store is closed")
        write: _Write[T] = _Write(operation, asyncio.get_running_loop().create_future())
        self._waiting.append(write)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting(), name="sqlite-store-writer")
        return await write.future

    async def _write_waiting(self) -> None:
        # Started by the first write of a loop turn, so it finds every write made in that turn waiting.
        loop = asyncio.get_running_loop()
        while self._waiting:
            # A caller that gave up before its turn is left out, so nothing it asked for happens.
            waiting = [write for write in self._waiting if not write.future.cancelled()]
            batch, self._waiting = waiting[:MAX_WRITES_PER_TRANSACTION], waiting[MAX_WRITES_PER_TRANSACTION:]
            if not batch:
                continue
            operations = [write.operation for write in batch]
            try:
                outcomes = self._run_batch(self._db, operations, may_defer=self._patient_db is not None)
            except _LockHeld:
                waited = loop.run_in_executor(self._thread, self._run_batch, self._patient_db, operations)
                try:
                    outcomes = await asyncio.shield(waited)
                except asyncio.CancelledError:
                    # Only the loop's own end cancels the writer; its callers are cancelled with it.
                    for write in batch:
                        write.future.cancel()
                    raise
            for write, outcome in zip(batch, outcomes, strict=True):
                if write.future.done():
                    continue
                if outcome.error is not None:
                    write.future.set_exception(outcome.error)
                else:
                    write.future.set_result(outcome.value)
            self._maybe_checkpoint()
            # The callers just woken (and the commands waiting on the loop) run before the next transaction.
            await asyncio.sleep(0)

    def _run_batch(
        self, db: sqlite3.Connection, operations: list[Operation[Any]], *, may_defer: bool = False
    ) -> list[_Outcome]:
        """Every operation in one transaction, its outcomes in the same order.

        With `may_defer`, a write lock another process holds raises `_LockHeld` before anything ran, for
        the caller to try again on the connection that waits for it.
        """
        failed: dict[int, _Outcome] = {}
        while True:
            try:
                try:
                    db.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as error:
                    if may_defer and _busy(error):
                        raise _LockHeld from error
                    raise
                values, culprit = _apply(db, operations, failed)
                if culprit is None:
                    self._commit(db)
                    break
            except _LockHeld:
                raise
            except Exception as error:
                _roll_back(db)
                # Each caller gets an exception of its own: they are raised, and their tracebacks grow apart.
                return [_Outcome(error=_copy_of(error)) for _ in operations]
            except BaseException:  # the process is being interrupted: nothing of the batch is kept
                _roll_back(db)
                raise
            # One write failed on its own account (a bug, not the file): everything is undone and run again
            # without it, so that it alone fails, and the others commit as if it had never been asked for.
            _roll_back(db)
            failed[culprit[0]] = _Outcome(error=culprit[1])
        self._commits += 1
        return [failed.get(index) or _Outcome(value=value) for index, value in enumerate(values)]

    @staticmethod
    def _commit(db: sqlite3.Connection) -> None:
        db.execute("COMMIT")

    def _maybe_checkpoint(self) -> None:
        """Every so many commits, the thread copies the log into the file (flushing it to disk there)."""
        if self._patient_db is None or self._commits < CHECKPOINT_EVERY_COMMITS:
            return
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        self._commits = 0
        self._checkpoint = asyncio.get_running_loop().run_in_executor(
            self._thread, _checkpoint, self._patient_db
        )
        # A checkpoint that fails is tried again after the next commits; it loses nothing meanwhile.
        self._checkpoint.add_done_callback(lambda done: done.cancelled() or done.exception())

    # --- quota ---

    async def reserve(
        self, user_id: int, images: int, limits: QuotaLimits, now: float, *, guild_id: int | None = None
    ) -> Reservation | QuotaRefusal:
        check_images(images)
        reservation = Reservation(new_reservation_id(user_id, guild_id), user_id, images, now, guild_id)
        refusal = await self._write(lambda db: _reserve(db, reservation, limits))
        return reservation if refusal is None else refusal

    async def reserve_job(
        self, job: JobRecord, images: int, limits: QuotaLimits, now: float
    ) -> JobRecord | QuotaRefusal | Ban:
        reservation = check_reservable(job, images, now)
        row = _job_row(job)
        guild_id = job.guild_id

        def reserve_and_save(db: sqlite3.Connection) -> QuotaRefusal | Ban | None:
            ban = None if guild_id is None else _active_ban(db, guild_id, job.user_id, now)
            if ban is not None:
                return ban
            refusal = _reserve(db, reservation, limits)
            if refusal is None:
                _save_job(db, row)
            return refusal

        refusal = await self._write(reserve_and_save)
        return job if refusal is None else refusal

    async def commit(self, reservation_id: str) -> None:
        await self._write(lambda db: _settle(db, reservation_id, COMMITTED))

    async def refund(self, reservation_id: str) -> None:
        await self._write(lambda db: _settle(db, reservation_id, REFUNDED))

    async def usage(
        self, user_id: int, limits: QuotaLimits, now: float, *, guild_id: int | None = None
    ) -> QuotaUsage:
        server = NO_SERVER if guild_id is None else guild_id
        entries = await self._call(lambda db: _entries(db, user_id, server, now - limits.window_seconds))
        return summarize(entries, limits, now)

    # --- jobs ---

    async def save_job(self, job: JobRecord) -> None:
        row = _job_row(job)
        await self._write(lambda db: _save_job(db, row))

    async def settle_job(self, job: JobRecord, *, billed: bool, day: str, counts: UsageCounts) -> None:
        row = _job_row(job)
        reservation_id = job.reservation_id or ""
        usage = None if job.guild_id is None else _usage_row(job.guild_id, day, job.user_id, counts)

        def settle(db: sqlite3.Connection) -> None:
            _settle(db, reservation_id, COMMITTED if billed else REFUNDED)
            _save_job(db, row)
            if usage is not None:
                _add_usage(db, usage)

        await self._write(settle)

    async def get_job(self, job_id: str) -> JobRecord | None:
        jobs = await self._select_jobs("WHERE id = ?", (job_id,))
        return jobs[0] if jobs else None

    async def unfinished_jobs(self, created_after: float) -> list[JobRecord]:
        return await self._select_jobs(
            f"WHERE state IN ({_UNFINISHED_SQL}) AND created_at > ? ORDER BY created_at, id", (created_after,)
        )

    async def recent_jobs(self, user_id: int, limit: int = 10) -> list[JobRecord]:
        if limit <= 0:
            return []
        return await self._select_jobs(
            "WHERE user_id = ? ORDER BY created_at DESC, id DESC LIMIT ?", (user_id, limit)
        )

    async def _select_jobs(self, clause: str, params: tuple[object, ...]) -> list[JobRecord]:
        rows = await self._call(
            lambda db: db.execute(f"SELECT id, data FROM jobs {clause}", params).fetchall()
        )
        return [job for row in rows if (job := load_job(row[1], row[0])) is not None]

    async def reserved_before(self, before: float) -> list[str]:
        rows = await self._call(
            lambda db: db.execute(
                "SELECT id FROM reservations WHERE state = ? AND created_at < ? ORDER BY created_at",
                (RESERVED, before),
            ).fetchall()
        )
        return [row[0] for row in rows]

    # --- leases ---

    async def acquire_lease(self, job_id: str, owner: str, ttl: float, now: float) -> bool:
        def acquire(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT owner, expires_at FROM leases WHERE job_id = ?", (job_id,)).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            db.execute(
                "INSERT INTO leases (job_id, owner, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (job_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
                (job_id, owner, now + ttl),
            )
            return True

        return await self._write(acquire)

    async def release_lease(self, job_id: str, owner: str) -> None:
        await self._write(
            lambda db: db.execute("DELETE FROM leases WHERE job_id = ? AND owner = ?", (job_id, owner))
        )

    # --- flags ---

    async def set_flag(self, name: str, until: float) -> None:
        await self._write(
            lambda db: db.execute(
                "INSERT INTO flags (name, until) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET until = excluded.until",
                (name, until),
            )
        )

    async def get_flag(self, name: str, now: float) -> float | None:
        row = await self._call(
            lambda db: db.execute("SELECT until FROM flags WHERE name = ?", (name,)).fetchone()
        )
        if row is None or row[0] <= now:
            return None
        return float(row[0])

    async def clear_flag(self, name: str) -> None:
        await self._write(lambda db: db.execute("DELETE FROM flags WHERE name = ?", (name,)))

    # --- command sync ---

    async def claim_command_sync(
        self, target: str, digest: str, owner: str, now: float, *, ttl: float, max_age: float
    ) -> SyncClaim:
        def claim(db: sqlite3.Connection) -> SyncClaim:
            row = db.execute(
                "SELECT synced, synced_at, owner, claimed_until FROM command_syncs WHERE target = ?",
                (target,),
            ).fetchone()
            if row is not None:
                synced, synced_at, claim_owner, claimed_until = row
                if claimed_until is not None and claimed_until > now and claim_owner != owner:
                    return SyncClaim("busy")
                if max_age > 0 and synced == digest and synced_at is not None and synced_at > now - max_age:
                    return SyncClaim("synced", synced_at)
            db.execute(
                "INSERT INTO command_syncs (target, owner, claimed_until) VALUES (?, ?, ?)"
                " ON CONFLICT (target) DO UPDATE SET owner = excluded.owner,"
                " claimed_until = excluded.claimed_until",
                (target, owner, now + ttl),
            )
            return SyncClaim("claimed")

        return await self._write(claim)

    async def finish_command_sync(
        self, target: str, digest: str, owner: str, now: float, *, synced: bool
    ) -> bool:
        recorded = (digest, now) if synced else (None, None)

        def finish(db: sqlite3.Connection) -> bool:
            # The owner guard: a claimer whose claim lapsed and was taken over must not overwrite what the
            # new owner records.
            cursor = db.execute(
                "UPDATE command_syncs SET synced = coalesce(?, synced), synced_at = coalesce(?, synced_at),"
                " owner = NULL, claimed_until = NULL WHERE target = ? AND owner = ?",
                (*recorded, target, owner),
            )
            return cursor.rowcount == 1

        return await self._write(finish)

    # --- server administration ---

    async def get_guild_settings(self, guild_id: int) -> str | None:
        row = await self._call(
            lambda db: db.execute(
                "SELECT data FROM guild_settings WHERE guild_id = ?", (guild_id,)
            ).fetchone()
        )
        return None if row is None else str(row[0])

    async def update_guild_settings(self, guild_id: int, change: Callable[[str | None], str]) -> str:
        def update(db: sqlite3.Connection) -> str:
            # Inside the writer's BEGIN IMMEDIATE: nobody else writes between this read and the write.
            row = db.execute("SELECT data FROM guild_settings WHERE guild_id = ?", (guild_id,)).fetchone()
            data = change(None if row is None else str(row[0]))
            db.execute(
                "INSERT INTO guild_settings (guild_id, data) VALUES (?, ?)"
                " ON CONFLICT (guild_id) DO UPDATE SET data = excluded.data",
                (guild_id, data),
            )
            return data

        return await self._write(update)

    async def set_ban(self, ban: Ban) -> None:
        await self._write(
            lambda db: db.execute(
                "INSERT INTO bans (guild_id, user_id, until, data) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (guild_id, user_id) DO UPDATE SET until = excluded.until, data = excluded.data",
                (ban.guild_id, ban.user_id, ban.until, ban.to_json()),
            )
        )

    async def lift_ban(self, guild_id: int, user_id: int, now: float) -> bool:
        def lift(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT until FROM bans WHERE guild_id = ? AND user_id = ?", (guild_id, user_id)
            ).fetchone()
            db.execute("DELETE FROM bans WHERE guild_id = ? AND user_id = ?", (guild_id, user_id))
            return row is not None and (row[0] is None or row[0] > now)

        return await self._write(lift)

    async def get_ban(self, guild_id: int, user_id: int, now: float) -> Ban | None:
        return await self._call(lambda db: _active_ban(db, guild_id, user_id, now))

    async def list_bans(self, guild_id: int, now: float) -> list[Ban]:
        rows = await self._call(
            lambda db: db.execute(
                "SELECT data FROM bans WHERE guild_id = ? AND (until IS NULL OR until > ?) ORDER BY user_id",
                (guild_id, now),
            ).fetchall()
        )
        return [ban for row in rows if (ban := Ban.read(row[0])) is not None]

    async def add_strike(self, guild_id: int, user_id: int, at: float, window: float) -> int:
        def strike(db: sqlite3.Connection) -> int:
            db.execute(
                "DELETE FROM strikes WHERE guild_id = ? AND user_id = ? AND at <= ?",
                (guild_id, user_id, at - window),
            )
            db.execute(
                "INSERT INTO strikes (guild_id, user_id, at) VALUES (?, ?, ?)", (guild_id, user_id, at)
            )
            row = db.execute(
                "SELECT count(*) FROM strikes WHERE guild_id = ? AND user_id = ? AND at > ? AND at <= ?",
                (guild_id, user_id, at - window, at),
            ).fetchone()
            return int(row[0])

        return await self._write(strike)

    async def add_case(self, case_id: str, data: str, expires_at: float) -> bool:
        def add(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "INSERT INTO mod_cases (id, data, expires_at) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (case_id, data, expires_at),
            )
            return cursor.rowcount == 1

        return await self._write(add)

    async def get_case(self, case_id: str) -> tuple[str, str | None] | None:
        row = await self._call(
            # Kept until they expire, like Redis's keys; the rows themselves go at the next start.
            lambda db: db.execute(
                "SELECT data, decision FROM mod_cases WHERE id = ? AND expires_at > ?", (case_id, time.time())
            ).fetchone()
        )
        return None if row is None else (str(row[0]), None if row[1] is None else str(row[1]))

    async def decide_case(self, case_id: str, decision: str) -> str | None:
        def decide(db: sqlite3.Connection) -> str | None:
            now = time.time()
            db.execute(
                "UPDATE mod_cases SET decision = ? WHERE id = ? AND decision IS NULL AND expires_at > ?",
                (decision, case_id, now),
            )
            row = db.execute(
                "SELECT decision FROM mod_cases WHERE id = ? AND expires_at > ?", (case_id, now)
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._write(decide)

    async def reopen_case(self, case_id: str, decision: str) -> None:
        await self._write(
            lambda db: db.execute(
                "UPDATE mod_cases SET decision = NULL WHERE id = ? AND decision = ?", (case_id, decision)
            )
        )

    async def add_report(self, job_id: str, user_id: int, expires_at: float) -> int | None:
        def report(db: sqlite3.Connection) -> int | None:
            cursor = db.execute(
                "INSERT INTO reports (job_id, user_id, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (job_id, user_id) DO NOTHING",
                (job_id, user_id, expires_at),
            )
            if cursor.rowcount != 1:
                return None
            return int(db.execute("SELECT count(*) FROM reports WHERE job_id = ?", (job_id,)).fetchone()[0])

        return await self._write(report)

    async def add_usage(self, guild_id: int, day: str, user_id: int, counts: UsageCounts) -> None:
        usage = _usage_row(guild_id, day, user_id, counts)
        await self._write(lambda db: _add_usage(db, usage))

    async def usage_between(self, guild_id: int, first_day: str, last_day: str) -> list[UsageRow]:
        rows = await self._call(
            lambda db: db.execute(
                f"SELECT day, user_id, {_USAGE_COLUMNS} FROM usage"
                " WHERE guild_id = ? AND day >= ? AND day <= ? ORDER BY day, user_id",
                (guild_id, first_day, last_day),
            ).fetchall()
        )
        return [UsageRow(str(row[0]), int(row[1]), UsageCounts(*row[2:])) for row in rows]

    async def clear_strikes(self, guild_id: int, user_id: int) -> None:
        await self._write(
            lambda db: db.execute(
                "DELETE FROM strikes WHERE guild_id = ? AND user_id = ?", (guild_id, user_id)
            )
        )

    # --- request budget ---

    def shared_request_window(self, account: str) -> None:
        # Shards run as processes on one Redis; a SQLite deployment is one process, whose own window is
        # the whole budget.
        return None


@dataclass
class _Write(Generic[T]):
    operation: Operation[T]
    future: asyncio.Future[T]


@dataclass(frozen=True)
class _Outcome:
    value: Any = None
    error: BaseException | None = None


# --- statements, run on the store's thread ---


def _apply(
    db: sqlite3.Connection, operations: list[Operation[Any]], failed: dict[int, _Outcome]
) -> tuple[list[Any], tuple[int, Exception] | None]:
    """Runs the operations not known to fail, in order: their values, and the first that raised, if any.

    Without a savepoint each: they cost two statements a write, and a write that fails is rare (a bug).
    """
    values: list[Any] = []
    for index, operation in enumerate(operations):
        if index in failed:
            values.append(None)
            continue
        try:
            values.append(operation(db))
        except SQLiteStore.TRANSIENT_ERRORS:
            raise  # the file failed: the whole transaction is in doubt
        except Exception as error:
            return values, (index, error)
    return values, None


class _LockHeld(Exception):
    """Another process holds the database's write lock: the transaction is to wait for it on the thread."""


def _connect(path: str, *, busy_timeout: float, check_same_thread: bool = True) -> sqlite3.Connection:
    # isolation_level=None: the sqlite3 module must not open transactions behind our back, or BEGIN
    # IMMEDIATE would fail with "cannot start a transaction within a transaction".
    return sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=check_same_thread
    )


def _connect_patient(path: str, busy_timeout: float) -> sqlite3.Connection:
    # Made on the store's thread and only ever used there.
    return _connect(path, busy_timeout=busy_timeout)


def _connect_for_the_loop(path: str, patience: float) -> sqlite3.Connection:
    """The connection the loop uses, made on the store's thread: its first statements may wait for another
    process opening the same file, and only then is it told never to wait."""
    db = _connect(path, busy_timeout=patience, check_same_thread=False)
    # NORMAL is durable against application crashes in WAL mode, only an OS crash may lose the last
    # transactions, which is fine for quota and job bookkeeping; and a commit then writes the log without
    # flushing it to disk, so it costs the loop no wait on the disk.
    db.execute("PRAGMA synchronous=NORMAL")
    # The checkpoints (which do flush) are the thread's, never a commit's on the loop.
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("PRAGMA busy_timeout=0")
    return db


def _busy(error: sqlite3.Error) -> bool:
    return getattr(error, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _checkpoint(db: sqlite3.Connection) -> None:
    # PASSIVE: copies what it can without waiting for, or blocking, anyone.
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _use_wal(db: sqlite3.Connection, patience: float) -> None:
    """Turns a new file to WAL, waiting up to `patience` seconds for other processes doing the same.

    Each of two processes switching one new file at once holds a read lock and wants the write lock: SQLite
    answers one of them "database is locked" at once, without waiting (either would wait forever). Once the
    other's switch is done, the file is WAL already and the switch costs nothing.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if not _busy(error) or time.monotonic() >= deadline:
                raise
        time.sleep(WAL_SWITCH_RETRY_SECONDS)


def _prepare(db: sqlite3.Connection, path: str, job_retention: float) -> None:
    if path != MEMORY:
        db.execute("PRAGMA synchronous=NORMAL")
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("PRAGMA user_version").fetchone()
        if row is not None and row[0] < COMMAND_SYNCS_SINCE:
            db.execute("DROP TABLE IF EXISTS command_syncs")
        columns = {column[1] for column in db.execute("PRAGMA table_info(reservations)").fetchall()}
        if columns and "guild_id" not in columns:
            db.execute(f"ALTER TABLE reservations ADD COLUMN guild_id INTEGER NOT NULL DEFAULT {NO_SERVER}")
        for statement in filter(str.strip, SCHEMA.split(";")):
            db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        cutoff = time.time() - job_retention
        db.execute(f"DELETE FROM jobs WHERE state IN ({_FINISHED_SQL}) AND updated_at < ?", (cutoff,))
        db.execute("DELETE FROM leases WHERE expires_at < ?", (cutoff,))
        db.execute("DELETE FROM mod_cases WHERE expires_at < ?", (time.time(),))
        db.execute("DELETE FROM reports WHERE expires_at < ?", (time.time(),))
        oldest = datetime.fromtimestamp(time.time() - USAGE_RETENTION_DAYS * 86400, UTC).date().isoformat()
        db.execute("DELETE FROM usage WHERE day < ?", (oldest,))
        db.execute("COMMIT")
    except BaseException:
        _roll_back(db)
        raise


def _roll_back(db: sqlite3.Connection) -> None:
    # A no-op outside a transaction; a connection too broken to roll back reports itself on the next call.
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _copy_of(error: BaseException) -> BaseException:
    try:
        return copy.copy(error)
    except Exception:
        return error


def _reserve(db: sqlite3.Connection, reservation: Reservation, limits: QuotaLimits) -> QuotaRefusal | None:
    """Records `reservation` if it fits the limits; otherwise the refusal, recording nothing."""
    user_id, now = reservation.user_id, reservation.created_at
    server = NO_SERVER if reservation.guild_id is None else reservation.guild_id
    cutoff = now - limits.window_seconds
    # Entries outside the window never count again; trimming keeps the per-member scan short.
    db.execute(
        "DELETE FROM reservations WHERE user_id = ? AND guild_id = ? AND created_at <= ?",
        (user_id, server, cutoff),
    )
    refusal = evaluate(_entries(db, user_id, server, cutoff), reservation.images, limits, now)
    if refusal is not None:
        return refusal
    db.execute(
        "INSERT INTO reservations (id, user_id, guild_id, images, created_at, state) VALUES (?, ?, ?, ?, ?, ?)",
        (reservation.id, user_id, server, reservation.images, now, RESERVED),
    )
    return None


def _settle(db: sqlite3.Connection, reservation_id: str, state: str) -> None:
    db.execute(
        "UPDATE reservations SET state = ? WHERE id = ? AND state = ?", (state, reservation_id, RESERVED)
    )


def _entries(db: sqlite3.Connection, user_id: int, server: int, cutoff: float) -> list[QuotaEntry]:
    rows = db.execute(
        "SELECT created_at, images, state FROM reservations"
        " WHERE user_id = ? AND guild_id = ? AND created_at > ? AND state IN (?, ?) ORDER BY created_at, id",
        (user_id, server, cutoff, RESERVED, COMMITTED),
    ).fetchall()
    return [QuotaEntry(created_at=row[0], images=row[1], state=row[2]) for row in rows]


def _usage_row(guild_id: int, day: str, user_id: int, counts: UsageCounts) -> tuple[object, ...]:
    return (guild_id, day, user_id, *(getattr(counts, name) for name in USAGE_COUNTERS))


def _add_usage(db: sqlite3.Connection, usage: tuple[object, ...]) -> None:
    db.execute(
        f"INSERT INTO usage (guild_id, day, user_id, {_USAGE_COLUMNS}) VALUES (?, ?, ?, {_USAGE_SLOTS})"
        f" ON CONFLICT (guild_id, day, user_id) DO UPDATE SET {_USAGE_SUMS}",
        usage,
    )


_JobRow = tuple[str, int, str, float, float, str]


def _job_row(job: JobRecord) -> _JobRow:
    # Encoded by the caller, on the event loop: the store's thread only runs statements.
    data = job.to_json()
    return (job.id, job.user_id, job.state.value, job.created_at, job.updated_at, data)


def _active_ban(db: sqlite3.Connection, guild_id: int, user_id: int, now: float) -> Ban | None:
    row = db.execute(
        "SELECT data FROM bans WHERE guild_id = ? AND user_id = ? AND (until IS NULL OR until > ?)",
        (guild_id, user_id, now),
    ).fetchone()
    return None if row is None else Ban.read(row[0])


def _save_job(db: sqlite3.Connection, row: _JobRow) -> None:
    db.execute(
        "INSERT INTO jobs (id, user_id, state, created_at, updated_at, data) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, state = excluded.state,"
        " created_at = excluded.created_at, updated_at = excluded.updated_at, data = excluded.data",
        row,
    )
