"""SQLite store: one aiosqlite connection per process, WAL mode, writes in BEGIN IMMEDIATE transactions.

Within a process an asyncio.Lock keeps coroutines from interleaving statements on the shared
connection; across processes sharing the file, BEGIN IMMEDIATE takes SQLite's write lock before
anything is read, so a read-check-write sequence cannot race another writer.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from services.store.base import (
    COMMITTED,
    FINISHED,
    REFUNDED,
    RESERVED,
    UNFINISHED,
    JobRecord,
    QuotaEntry,
    QuotaLimits,
    QuotaRefusal,
    QuotaUsage,
    Reservation,
    SyncClaim,
    check_images,
    evaluate,
    load_job,
    new_reservation_id,
    summarize,
)

MEMORY = ":memory:"
SCHEMA_VERSION = 3
# Below this version `command_syncs` had another layout; it only caches what was synced, so it is dropped
# and recreated (the next start syncs once more) rather than migrated.
COMMAND_SYNCS_SINCE = 3
DEFAULT_BUSY_TIMEOUT = 10.0
DEFAULT_JOB_RETENTION = 7 * 86400.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL,
    images INTEGER NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_user_time ON reservations (user_id, created_at);
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
CREATE TABLE IF NOT EXISTS command_syncs (
    target TEXT PRIMARY KEY,
    synced TEXT,
    synced_at REAL,
    owner TEXT,
    claimed_until REAL
);
"""

_UNFINISHED_SQL = ", ".join(f"'{state.value}'" for state in sorted(UNFINISHED))
_FINISHED_SQL = ", ".join(f"'{state.value}'" for state in sorted(FINISHED))


class SQLiteStore:
    """The store of one process (or a few on one machine): one SQLite file it opens and closes.

    It owns the aiosqlite connection, the schema (created or extended at open, where the command-sync
    cache of an older layout is recreated and finished jobs past their retention are pruned) and the
    lock that keeps this process's coroutines from interleaving statements. Every read-check-write runs
    in one `BEGIN IMMEDIATE` transaction, so it is atomic against other processes sharing the file too; a
    locked or vanished file raises one of `TRANSIENT_ERRORS`.
    """

    # What a locked, full or vanished database file raises; anything else is a bug, not an outage.
    TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        job_retention: float = DEFAULT_JOB_RETENTION,
    ) -> SQLiteStore:
        if path != MEMORY:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the sqlite3 module must not open transactions behind our back,
        # or BEGIN IMMEDIATE would fail with "cannot start a transaction within a transaction".
        db = await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
        store = cls(db)
        try:
            await store._prepare(path, job_retention)
        except BaseException:
            await db.close()
            raise
        return store

    async def _prepare(self, path: str, job_retention: float) -> None:
        if path != MEMORY:
            await self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against application crashes in WAL mode, only an OS crash may lose
            # the last transactions, which is fine for quota and job bookkeeping.
            await self._db.execute("PRAGMA synchronous=NORMAL")
        async with self._transaction() as db:
            cursor = await db.execute("PRAGMA user_version")
            row = await cursor.fetchone()
            if row is not None and row[0] < COMMAND_SYNCS_SINCE:
                await db.execute("DROP TABLE IF EXISTS command_syncs")
            for statement in filter(str.strip, SCHEMA.split(";")):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            cutoff = time.time() - job_retention
            await db.execute(
                f"DELETE FROM jobs WHERE state IN ({_FINISHED_SQL}) AND updated_at < ?", (cutoff,)
            )
            await db.execute("DELETE FROM leases WHERE expires_at < ?", (cutoff,))

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await self._db.commit()
            except BaseException:
                # A cancelled await does not stop the statement already queued on aiosqlite's thread,
                # so BEGIN may still run after we gave up on it. rollback() is queued behind it and
                # is a no-op outside a transaction, leaving the connection clean either way.
                await asyncio.shield(self._db.rollback())
                raise

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            yield self._db

    # --- quota ---

    async def reserve(
        self, user_id: int, images: int, limits: QuotaLimits, now: float
    ) -> Reservation | QuotaRefusal:
        check_images(images)
        cutoff = now - limits.window_seconds
        async with self._transaction() as db:
            # Entries outside the window never count again; trimming keeps the per-user scan short.
            await db.execute(
                "DELETE FROM reservations WHERE user_id = ? AND created_at <= ?", (user_id, cutoff)
            )
            entries = await self._entries(db, user_id, cutoff)
            refusal = evaluate(entries, images, limits, now)
            if refusal is not None:
                return refusal
            reservation = Reservation(new_reservation_id(user_id), user_id, images, now)
            await db.execute(
                "INSERT INTO reservations (id, user_id, images, created_at, state) VALUES (?, ?, ?, ?, ?)",
                (reservation.id, user_id, images, now, RESERVED),
            )
        return reservation

    async def commit(self, reservation_id: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE reservations SET state = ? WHERE id = ? AND state = ?",
                (COMMITTED, reservation_id, RESERVED),
            )

    async def refund(self, reservation_id: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE reservations SET state = ? WHERE id = ? AND state = ?",
                (REFUNDED, reservation_id, RESERVED),
            )

    async def usage(self, user_id: int, limits: QuotaLimits, now: float) -> QuotaUsage:
        async with self._reading() as db:
            entries = await self._entries(db, user_id, now - limits.window_seconds)
        return summarize(entries, limits, now)

    @staticmethod
    async def _entries(db: aiosqlite.Connection, user_id: int, cutoff: float) -> list[QuotaEntry]:
        cursor = await db.execute(
            "SELECT created_at, images, state FROM reservations"
            " WHERE user_id = ? AND created_at > ? AND state IN (?, ?) ORDER BY created_at, id",
            (user_id, cutoff, RESERVED, COMMITTED),
        )
        rows = await cursor.fetchall()
        return [QuotaEntry(created_at=row[0], images=row[1], state=row[2]) for row in rows]

    # --- jobs ---

    async def save_job(self, job: JobRecord) -> None:
        data = json.dumps(job.to_dict(), separators=(",", ":"))
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO jobs (id, user_id, state, created_at, updated_at, data) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, state = excluded.state,"
                " created_at = excluded.created_at, updated_at = excluded.updated_at, data = excluded.data",
                (job.id, job.user_id, job.state.value, job.created_at, job.updated_at, data),
            )

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
        async with self._reading() as db:
            cursor = await db.execute(f"SELECT id, data FROM jobs {clause}", params)
            rows = await cursor.fetchall()
        return [job for row in rows if (job := load_job(row[1], row[0])) is not None]

    async def reserved_before(self, before: float) -> list[str]:
        async with self._reading() as db:
            cursor = await db.execute(
                "SELECT id FROM reservations WHERE state = ? AND created_at < ? ORDER BY created_at",
                (RESERVED, before),
            )
            rows = await cursor.fetchall()
        return [row[0] for row in rows]

    # --- leases ---

    async def acquire_lease(self, job_id: str, owner: str, ttl: float, now: float) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute("SELECT owner, expires_at FROM leases WHERE job_id = ?", (job_id,))
            row = await cursor.fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            await db.execute(
                "INSERT INTO leases (job_id, owner, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (job_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
                (job_id, owner, now + ttl),
            )
        return True

    async def release_lease(self, job_id: str, owner: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM leases WHERE job_id = ? AND owner = ?", (job_id, owner))

    # --- flags ---

    async def set_flag(self, name: str, until: float) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO flags (name, until) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET until = excluded.until",
                (name, until),
            )

    async def get_flag(self, name: str, now: float) -> float | None:
        async with self._reading() as db:
            cursor = await db.execute("SELECT until FROM flags WHERE name = ?", (name,))
            row = await cursor.fetchone()
        if row is None or row[0] <= now:
            return None
        return float(row[0])

    async def clear_flag(self, name: str) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM flags WHERE name = ?", (name,))

    # --- command sync ---

    async def claim_command_sync(
        self, target: str, digest: str, owner: str, now: float, *, ttl: float, max_age: float
    ) -> SyncClaim:
        async with self._transaction() as db:
            cursor = await db.execute(
                "SELECT synced, synced_at, owner, claimed_until FROM command_syncs WHERE target = ?",
                (target,),
            )
            row = await cursor.fetchone()
            if row is not None:
                synced, synced_at, claim_owner, claimed_until = row
                if claimed_until is not None and claimed_until > now and claim_owner != owner:
                    return SyncClaim("busy")
                if max_age > 0 and synced == digest and synced_at is not None and synced_at > now - max_age:
                    return SyncClaim("synced", synced_at)
            await db.execute(
                "INSERT INTO command_syncs (target, owner, claimed_until) VALUES (?, ?, ?)"
                " ON CONFLICT (target) DO UPDATE SET owner = excluded.owner,"
                " claimed_until = excluded.claimed_until",
                (target, owner, now + ttl),
            )
        return SyncClaim("claimed")

    async def finish_command_sync(
        self, target: str, digest: str, owner: str, now: float, *, synced: bool
    ) -> bool:
        recorded = (digest, now) if synced else (None, None)
        async with self._transaction() as db:
            # The owner guard: a claimer whose claim lapsed and was taken over must not overwrite what the
            # new owner records.
            cursor = await db.execute(
                "UPDATE command_syncs SET synced = coalesce(?, synced), synced_at = coalesce(?, synced_at),"
                " owner = NULL, claimed_until = NULL WHERE target = ? AND owner = ?",
                (*recorded, target, owner),
            )
            return cursor.rowcount == 1

    # --- request budget ---

    def shared_request_window(self, account: str) -> None:
        # Shards run as processes on one Redis; a SQLite deployment is one process, whose own window is
        # the whole budget.
        return None
