"""Redis store: several bot processes share one Redis; every read-check-write step is a Lua script.

Key layout (all under the configurable prefix):

- `quota:<user>:<server>:times`  sorted set: reservation id -> created_at, a member's in one server
  (`quota:<user>:times` in direct messages, and for reservations from before quotas were per server)
- `quota:<user>:<server>:res`    hash: reservation id -> "<images>:<state>"
- `job:<id>`            JSON of a JobRecord; finished jobs expire after the retention period
- `jobs:unfinished`     sorted set: job id -> created_at, for jobs still in an unfinished state
- `user:<user>:jobs`    sorted set: job id -> created_at, the user's most recent jobs
- `lease:<job id>`      hash: owner, expires_at
- `flag:<name>`         until (epoch seconds)
- `commands:<target>`   hash: synced and synced_at (the digest of the commands last synced there, and
  when), and while a process is syncing, owner (its claim's token) and claimed_until
- `reservations:reserved` sorted set: reservation id -> created_at, for reservations still reserved,
  so one left behind by a process that died before saving its job can be found and refunded
- `segmind:budget`        sorted set: a token per request sent to Segmind -> when (Redis's clock), the
  sliding window every process on one API key draws from
- `case:<id>`             hash: data (a mod-log case as JSON) and, once a moderator acted, decision
- `reports:<job id>`      set: the members who reported the job's result
- `usage:<server>:<day>`  hash: "<member>:<counter>" -> count, for `/admin usage`
- `segmind:budget:paused` until when (Redis's clock) every process holds its requests after a 429

Scripts declare every key they touch in KEYS (reservation ids embed the user and server for that reason).
Times are caller-supplied epoch floats (but for the request window's, which use Redis's clock); redis-py sends floats as repr() and Redis returns scores
with full precision, so comparisons match the SQLite store exactly.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, WatchError

from services.store.base import (
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
    days_between,
    load_job,
    new_reservation_id,
    reservation_holder,
    summarize,
)

DEFAULT_PREFIX = "dreamshaper:"
log = logging.getLogger(__name__)

DEFAULT_JOB_RETENTION = 7 * 86400
RECENT_JOBS_KEPT = 100
# Keys that only exist for bookkeeping outlive the data they describe by this much.
GC_MARGIN = 3600
# Connections to Redis a process keeps at most; each command takes one for well under a millisecond.
MAX_CONNECTIONS = 64
# Two admins saving settings in the same instant retry; this many collisions in a row is an outage.
SETTINGS_ATTEMPTS = 20

# KEYS: times, records, reserved index. ARGV: images, daily, max_concurrent, window, now, new_id, key_ttl.
# Mirrors base.evaluate(); returns {"ok"} or {reason, used, in_flight, resets_score or ""}.
_RESERVE_BODY_LUA = """
local times, records = KEYS[1], KEYS[2]
local images = tonumber(ARGV[1])
local daily = tonumber(ARGV[2])
local max_concurrent = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local cutoff = now - window

local entries = redis.call('ZRANGE', times, 0, -1, 'WITHSCORES')
local scores, counts = {}, {}
local used, in_flight = 0, 0
for i = 1, #entries, 2 do
  local id, score = entries[i], entries[i + 1]
  local record = redis.call('HGET', records, id)
  if (not record) or tonumber(score) <= cutoff then
    redis.call('ZREM', times, id)
    redis.call('HDEL', records, id)
    redis.call('ZREM', KEYS[3], id)
  else
    local sep = string.find(record, ':', 1, true)
    local n = tonumber(string.sub(record, 1, sep - 1))
    local state = string.sub(record, sep + 1)
    if state == 'reserved' or state == 'committed' then
      used = used + n
      if state == 'reserved' then in_flight = in_flight + 1 end
      scores[#scores + 1] = score
      counts[#counts + 1] = n
    end
  end
end

if used + images > daily then
  local resets = ''
  if images <= daily then
    local freed = 0
    for i = 1, #counts do
      freed = freed + counts[i]
      if used - freed + images <= daily then
        resets = scores[i]
        break
      end
    end
  end
  return {'daily', used, in_flight, resets}
end
if in_flight >= max_concurrent then
  return {'concurrent', used, in_flight, ''}
end

redis.call('ZADD', times, ARGV[5], ARGV[6])
redis.call('HSET', records, ARGV[6], ARGV[1] .. ':reserved')
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
redis.call('EXPIRE', times, ARGV[7])
redis.call('EXPIRE', records, ARGV[7])
"""

RESERVE_LUA = _RESERVE_BODY_LUA + "return {'ok'}\n"

# KEYS: as RESERVE_LUA, then the job's record, the unfinished index, the user's recent jobs and, for a job
# in a server, the server's bans. ARGV: as RESERVE_LUA, then the job's JSON, created_at, id, how many recent
# jobs are kept, their index's TTL, the member's id. The reservation and the record of the job that owns it
# are written together or not at all (as save_job writes an unfinished job), and not for a member whose
# ban there has not plainly ended: {"banned", its record} (`Ban.read` has the last word).
RESERVE_JOB_LUA = (
    """
if KEYS[7] then
  local ban = redis.call('HGET', KEYS[7], ARGV[13])
  if ban then
    -- Only a ban that has plainly ended lets the member through here; Python decides about the rest.
    local readable, fields = pcall(cjson.decode, ban)
    local ends = readable and type(fields) == 'table' and fields['until']
    if not (type(ends) == 'number' and ends <= tonumber(ARGV[5])) then return {'banned', ban} end
  end
end
"""
    + _RESERVE_BODY_LUA
    + """
redis.call('SET', KEYS[4], ARGV[8])
redis.call('ZADD', KEYS[5], ARGV[9], ARGV[10])
redis.call('ZADD', KEYS[6], ARGV[9], ARGV[10])
redis.call('ZREMRANGEBYRANK', KEYS[6], 0, -(tonumber(ARGV[11]) + 1))
redis.call('EXPIRE', KEYS[6], ARGV[12])
return {'ok'}
"""
)

# KEYS: times, records, reserved index. ARGV: reservation id, "commit" or "refund".
SETTLE_LUA = """
redis.call('ZREM', KEYS[3], ARGV[1])
local record = redis.call('HGET', KEYS[2], ARGV[1])
if not record then return 0 end
local sep = string.find(record, ':', 1, true)
if string.sub(record, sep + 1) ~= 'reserved' then return 0 end
if ARGV[2] == 'commit' then
  redis.call('HSET', KEYS[2], ARGV[1], string.sub(record, 1, sep) .. 'committed')
else
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 1
"""

# KEYS: lease. ARGV: owner, now, expires_at, key_ttl.
ACQUIRE_LEASE_LUA = """
local current = redis.call('HMGET', KEYS[1], 'owner', 'expires_at')
if current[1] and current[1] ~= ARGV[1] and tonumber(current[2]) > tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'expires_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: sync record. ARGV: digest, owner, now, claimed_until, max_age. Mirrors
# SQLiteStore.claim_command_sync; returns {outcome} or {"synced", synced_at}.
CLAIM_SYNC_LUA = """
local record = redis.call('HMGET', KEYS[1], 'synced', 'synced_at', 'owner', 'claimed_until')
local now = tonumber(ARGV[3])
if record[4] and tonumber(record[4]) > now and record[3] ~= ARGV[2] then
  return {'busy'}
end
local max_age = tonumber(ARGV[5])
if max_age > 0 and record[1] == ARGV[1] and record[2] and tonumber(record[2]) > now - max_age then
  return {'synced', record[2]}
end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'claimed_until', ARGV[4])
return {'claimed'}
"""

# KEYS: sync record. ARGV: owner, digest, now, "1" when it was synced. Returns 1 when `owner` held the claim.
FINISH_SYNC_LUA = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'synced', ARGV[2], 'synced_at', ARGV[3])
end
redis.call('HDEL', KEYS[1], 'owner', 'claimed_until')
return 1
"""

# KEYS: lease. ARGV: owner.
RELEASE_LEASE_LUA = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# KEYS: window, paused. ARGV: limit, window seconds, token. Returns "0" when the send is recorded, else the
# seconds to wait. The clock is Redis's own (TIME) so that processes on machines whose clocks disagree
# still share one window. Strings, since Redis would truncate a Lua number to an integer.
# KEYS: the case. ARGV: the decision. The first decision stands; returns it (nil: no such case).
DECIDE_CASE_LUA = """
if redis.call('HEXISTS', KEYS[1], 'data') == 0 then return false end
redis.call('HSETNX', KEYS[1], 'decision', ARGV[1])
return redis.call('HGET', KEYS[1], 'decision')
"""

# KEYS: the case. ARGV: the decision to take back, only if it is still the one recorded.
REOPEN_CASE_LUA = """
if redis.call('HGET', KEYS[1], 'decision') == ARGV[1] then redis.call('HDEL', KEYS[1], 'decision') end
return 0
"""

TAKE_SLOT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local paused = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if paused > now then
  return tostring(paused - now)
end
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
  return '0'
end
-- A process with a smaller limit can meet more sends than its limit: it waits until enough have left.
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait <= 0 then wait = 0.001 end
return tostring(wait)
"""

# KEYS: paused. ARGV: seconds. A pause only ever extends: one process's short 429 must not end another's.
PAUSE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ends = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if ends > current then
  redis.call('SET', KEYS[1], string.format("%.6f", ends), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return 0
"""


def _refusal(reply: list[Any], images: int, limits: QuotaLimits) -> QuotaRefusal:
    """The refusal RESERVE_LUA (or RESERVE_JOB_LUA) answered: {reason, used, in_flight, resets_score or ""}."""
    reason, used, in_flight, resets_score = reply
    return QuotaRefusal(
        reason=reason,
        remaining_images=max(0, limits.daily_images - int(used)),
        in_flight=int(in_flight),
        resets_at=float(resets_score) + limits.window_seconds if resets_score else None,
        requested_images=images,
        daily_limit=limits.daily_images,
        max_concurrent=limits.max_concurrent,
    )


class RedisRequestWindow:
    """The Segmind request window every process on one Redis store shares (a `SharedWindow`)."""

    def __init__(self, client: aioredis.Redis, prefix: str, account: str) -> None:
        self._window_key = f"{prefix}segmind:budget:{account}"
        self._paused_key = f"{prefix}segmind:budget:{account}:paused"
        self._take_script = client.register_script(TAKE_SLOT_LUA)
        self._pause_script = client.register_script(PAUSE_LUA)

    async def take(self, limit: int, window: float) -> float:
        # A token per send: two sends in one microsecond must count twice.
        token = secrets.token_hex(8)
        reply = await self._take_script(
            keys=[self._window_key, self._paused_key], args=[int(limit), float(window), token]
        )
        return float(reply)

    async def pause(self, seconds: float) -> None:
        if not seconds > 0:
            return
        await self._pause_script(keys=[self._paused_key], args=[float(seconds)])


class RedisStore:
    """The store several bot processes share (one per shard, on any machine), on one Redis database.

    It owns the client connection pool and every key under its prefix, so several bots (or test runs)
    can share a server. Every read-check-write is one Lua script, which Redis runs atomically against
    all other clients; finished jobs and bookkeeping keys expire by themselves. A Redis that is down,
    restarting or out of memory raises one of `TRANSIENT_ERRORS`.
    """

    # A Redis that is down, restarting, read-only or out of memory; OSError for a socket torn mid-call.
    TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        job_retention: int = DEFAULT_JOB_RETENTION,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._job_retention = job_retention
        self._reserve_script = client.register_script(RESERVE_LUA)
        self._reserve_job_script = client.register_script(RESERVE_JOB_LUA)
        self._settle_script = client.register_script(SETTLE_LUA)
        self._acquire_script = client.register_script(ACQUIRE_LEASE_LUA)
        self._release_script = client.register_script(RELEASE_LEASE_LUA)
        self._claim_sync_script = client.register_script(CLAIM_SYNC_LUA)
        self._finish_sync_script = client.register_script(FINISH_SYNC_LUA)
        self._decide_script = client.register_script(DECIDE_CASE_LUA)
        self._reopen_script = client.register_script(REOPEN_CASE_LUA)

    @classmethod
    async def open(
        cls, url: str, *, prefix: str = DEFAULT_PREFIX, job_retention: int = DEFAULT_JOB_RETENTION
    ) -> RedisStore:
        # A bounded pool whose callers wait their turn: redis-py's default one refuses the 101st command
        # in flight (MaxConnectionsError), which a burst of commands reaches at once.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=MAX_CONNECTIONS, timeout=None
        )
        client = aioredis.Redis.from_pool(pool)
        try:
            # Fail at startup, not at the first user command, when Redis is unreachable.
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        return cls(client, prefix=prefix, job_retention=job_retention)

    @property
    def prefix(self) -> str:
        return self._prefix

    async def close(self) -> None:
        await self._redis.aclose()

    def _quota_keys(self, user_id: int, guild_id: int | None) -> list[str]:
        base = (
            f"{self._prefix}quota:{user_id}"
            if guild_id is None
            else f"{self._prefix}quota:{user_id}:{guild_id}"
        )
        return [f"{base}:times", f"{base}:res", self._reserved_key]

    @property
    def _reserved_key(self) -> str:
        return f"{self._prefix}reservations:reserved"

    # --- quota ---

    async def reserve(
        self, user_id: int, images: int, limits: QuotaLimits, now: float, *, guild_id: int | None = None
    ) -> Reservation | QuotaRefusal:
        check_images(images)
        reservation = Reservation(new_reservation_id(user_id, guild_id), user_id, images, now, guild_id)
        reply = await self._reserve_script(
            keys=self._quota_keys(user_id, guild_id), args=self._reserve_args(reservation, limits)
        )
        return reservation if reply[0] == "ok" else _refusal(reply, images, limits)

    async def reserve_job(
        self, job: JobRecord, images: int, limits: QuotaLimits, now: float
    ) -> JobRecord | QuotaRefusal | Ban:
        reservation = check_reservable(job, images, now)
        reply = await self._reserve_job(job, reservation, limits, check_ban=True)
        if reply[0] == "banned":
            ban = Ban.read(reply[1])
            if ban is not None and ban.active(now):
                return ban
            # A record the script took for a ban that Python reads as none (as get_ban would): no ban.
            reply = await self._reserve_job(job, reservation, limits, check_ban=False)
        return job if reply[0] == "ok" else _refusal(reply, images, limits)

    async def _reserve_job(
        self, job: JobRecord, reservation: Reservation, limits: QuotaLimits, *, check_ban: bool
    ) -> list[Any]:
        keys = [
            *self._quota_keys(job.user_id, job.guild_id),
            self._job_key(job.id),
            self._unfinished_key,
            self._user_jobs_key(job.user_id),
        ]
        if check_ban and job.guild_id is not None:  # direct messages have no bans
            keys.append(self._guild_key(job.guild_id, "bans"))
        reply: list[Any] = await self._reserve_job_script(
            keys=keys,
            args=[
                *self._reserve_args(reservation, limits),
                job.to_json(),
                float(job.created_at),
                job.id,
                RECENT_JOBS_KEPT,
                self._job_retention + GC_MARGIN,
                str(job.user_id),
            ],
        )
        return reply

    @staticmethod
    def _reserve_args(reservation: Reservation, limits: QuotaLimits) -> list[Any]:
        return [
            reservation.images,
            limits.daily_images,
            limits.max_concurrent,
            float(limits.window_seconds),
            float(reservation.created_at),
            reservation.id,
            math.ceil(limits.window_seconds) + GC_MARGIN,
        ]

    async def commit(self, reservation_id: str) -> None:
        await self._settle(reservation_id, "commit")

    async def refund(self, reservation_id: str) -> None:
        await self._settle(reservation_id, "refund")

    async def _settle(self, reservation_id: str, action: str, *, pipe: Pipeline | None = None) -> None:
        """Settles the reservation at once, or queued in `pipe` (its transaction) when one is given."""
        holder = reservation_holder(reservation_id)
        if holder is None:
            return  # not an id this store issued, so there is nothing to settle
        await self._settle_script(keys=self._quota_keys(*holder), args=[reservation_id, action], client=pipe)

    async def usage(
        self, user_id: int, limits: QuotaLimits, now: float, *, guild_id: int | None = None
    ) -> QuotaUsage:
        times_key, records_key, _ = self._quota_keys(user_id, guild_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrange(times_key, 0, -1, withscores=True)
            pipe.hgetall(records_key)
            times, records = await pipe.execute()
        entries = []
        for reservation_id, created_at in times:
            record = records.get(reservation_id)
            if record is None:
                continue
            images, _, state = record.partition(":")
            entries.append(QuotaEntry(created_at=float(created_at), images=int(images), state=state))
        return summarize(entries, limits, now)

    # --- jobs ---

    def _job_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _user_jobs_key(self, user_id: int) -> str:
        return f"{self._prefix}user:{user_id}:jobs"

    @property
    def _unfinished_key(self) -> str:
        return f"{self._prefix}jobs:unfinished"

    async def save_job(self, job: JobRecord) -> None:
        # One transaction so the record and its indexes never disagree.
        async with self._redis.pipeline(transaction=True) as pipe:
            self._queue_save_job(pipe, job)
            await pipe.execute()

    async def settle_job(self, job: JobRecord, *, billed: bool, day: str, counts: UsageCounts) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            await self._settle(job.reservation_id or "", "commit" if billed else "refund", pipe=pipe)
            self._queue_save_job(pipe, job)
            if job.guild_id is not None:
                self._queue_usage(pipe, job.guild_id, day, job.user_id, counts)
            await pipe.execute()

    def _queue_save_job(self, pipe: Pipeline, job: JobRecord) -> None:
        data = job.to_json()
        user_jobs = self._user_jobs_key(job.user_id)
        if job.state in UNFINISHED:
            # Unfinished jobs never expire: they must stay until resumed or failed.
            pipe.set(self._job_key(job.id), data)
            pipe.zadd(self._unfinished_key, {job.id: job.created_at})
        else:
            pipe.set(self._job_key(job.id), data, ex=self._job_retention)
            pipe.zrem(self._unfinished_key, job.id)
        pipe.zadd(user_jobs, {job.id: job.created_at})
        pipe.zremrangebyrank(user_jobs, 0, -(RECENT_JOBS_KEPT + 1))
        pipe.expire(user_jobs, self._job_retention + GC_MARGIN)

    async def get_job(self, job_id: str) -> JobRecord | None:
        data = await self._redis.get(self._job_key(job_id))
        return None if data is None else load_job(data, job_id)

    async def reserved_before(self, before: float) -> list[str]:
        return list(await self._redis.zrangebyscore(self._reserved_key, "-inf", f"({float(before)!r}"))

    async def unfinished_jobs(self, created_after: float) -> list[JobRecord]:
        ids = await self._redis.zrangebyscore(self._unfinished_key, f"({float(created_after)!r}", "+inf")
        jobs = await self._load_jobs(ids)
        # The index and the records are written together, but a record is the authority on its state.
        found = [job for job in jobs if job is not None and job.state in UNFINISHED]
        return sorted(found, key=lambda job: (job.created_at, job.id))

    async def recent_jobs(self, user_id: int, limit: int = 10) -> list[JobRecord]:
        if limit <= 0:
            return []
        key = self._user_jobs_key(user_id)
        found: list[JobRecord] = []
        start = 0
        # Finished records expire on their own, so the index can hold ids whose record is gone.
        while len(found) < limit:
            ids = await self._redis.zrevrange(key, start, start + limit - 1)
            if not ids:
                break
            jobs = await self._load_jobs(ids)
            stale = [job_id for job_id, job in zip(ids, jobs, strict=True) if job is None]
            if stale:
                await self._redis.zrem(key, *stale)
            found.extend(job for job in jobs if job is not None)
            start += len(ids) - len(stale)
        return found[:limit]

    async def _load_jobs(self, ids: list[str]) -> list[JobRecord | None]:
        if not ids:
            return []
        values = await self._redis.mget([self._job_key(job_id) for job_id in ids])
        return [
            None if value is None else load_job(value, job_id)
            for job_id, value in zip(ids, values, strict=True)
        ]

    # --- leases ---

    def _lease_key(self, job_id: str) -> str:
        return f"{self._prefix}lease:{job_id}"

    async def acquire_lease(self, job_id: str, owner: str, ttl: float, now: float) -> bool:
        acquired = await self._acquire_script(
            keys=[self._lease_key(job_id)],
            args=[owner, float(now), float(now + ttl), math.ceil(ttl) + GC_MARGIN],
        )
        return bool(acquired)

    async def release_lease(self, job_id: str, owner: str) -> None:
        await self._release_script(keys=[self._lease_key(job_id)], args=[owner])

    # --- flags ---

    def _flag_key(self, name: str) -> str:
        return f"{self._prefix}flag:{name}"

    async def set_flag(self, name: str, until: float) -> None:
        await self._redis.set(self._flag_key(name), repr(float(until)))

    async def get_flag(self, name: str, now: float) -> float | None:
        value = await self._redis.get(self._flag_key(name))
        if value is None or float(value) <= now:
            return None
        return float(value)

    async def clear_flag(self, name: str) -> None:
        await self._redis.delete(self._flag_key(name))

    # --- command sync ---

    def _sync_key(self, target: str) -> str:
        return f"{self._prefix}commands:{target}"

    async def claim_command_sync(
        self, target: str, digest: str, owner: str, now: float, *, ttl: float, max_age: float
    ) -> SyncClaim:
        reply = await self._claim_sync_script(
            keys=[self._sync_key(target)], args=[digest, owner, float(now), float(now + ttl), float(max_age)]
        )
        outcome = reply[0]
        return SyncClaim(outcome, float(reply[1]) if outcome == "synced" else None)

    async def finish_command_sync(
        self, target: str, digest: str, owner: str, now: float, *, synced: bool
    ) -> bool:
        finished = await self._finish_sync_script(
            keys=[self._sync_key(target)], args=[owner, digest, float(now), "1" if synced else "0"]
        )
        return bool(finished)

    # --- server administration ---

    def _guild_key(self, guild_id: int, what: str) -> str:
        return f"{self._prefix}guild:{int(guild_id)}:{what}"

    async def get_guild_settings(self, guild_id: int) -> str | None:
        value = await self._redis.get(self._guild_key(guild_id, "settings"))
        return None if value is None else str(value)

    async def update_guild_settings(self, guild_id: int, change: Callable[[str | None], str]) -> str:
        key = self._guild_key(guild_id, "settings")
        async with self._redis.pipeline(transaction=True) as pipe:
            for _attempt in range(SETTINGS_ATTEMPTS):
                try:
                    # Optimistic: the write goes through only if nobody changed the settings meanwhile.
                    await pipe.watch(key)
                    current = await pipe.get(key)
                    data = change(None if current is None else str(current))
                    pipe.multi()
                    pipe.set(key, data)
                    await pipe.execute()
                    return data
                except WatchError:
                    continue
        raise RedisError(f"the settings of server {guild_id} kept changing under {SETTINGS_ATTEMPTS} updates")

    async def set_ban(self, ban: Ban) -> None:
        await self._redis.hset(self._guild_key(ban.guild_id, "bans"), str(ban.user_id), ban.to_json())

    async def lift_ban(self, guild_id: int, user_id: int, now: float) -> bool:
        key = self._guild_key(guild_id, "bans")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(key, str(user_id))
            pipe.hdel(key, str(user_id))
            data, _removed = await pipe.execute()
        ban = None if data is None else Ban.read(data)
        return ban is not None and ban.active(now)

    async def get_ban(self, guild_id: int, user_id: int, now: float) -> Ban | None:
        data = await self._redis.hget(self._guild_key(guild_id, "bans"), str(user_id))
        ban = None if data is None else Ban.read(data)
        return ban if ban is not None and ban.active(now) else None

    async def list_bans(self, guild_id: int, now: float) -> list[Ban]:
        stored = await self._redis.hgetall(self._guild_key(guild_id, "bans"))
        bans = [ban for data in stored.values() if (ban := Ban.read(data)) is not None and ban.active(now)]
        return sorted(bans, key=lambda ban: ban.user_id)

    async def add_strike(self, guild_id: int, user_id: int, at: float, window: float) -> int:
        key = self._guild_key(guild_id, f"strikes:{int(user_id)}")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", repr(float(at - window)))
            pipe.zadd(key, {f"{float(at)!r}:{secrets.token_hex(4)}": float(at)})
            pipe.zcount(key, f"({float(at - window)!r}", repr(float(at)))
            pipe.expire(key, max(1, math.ceil(window)))
            *_, count, _expiry = await pipe.execute()
        return int(count)

    async def clear_strikes(self, guild_id: int, user_id: int) -> None:
        await self._redis.delete(self._guild_key(guild_id, f"strikes:{int(user_id)}"))

    # --- usage ---

    def _usage_key(self, guild_id: int, day: str) -> str:
        return f"{self._prefix}usage:{int(guild_id)}:{day}"

    async def add_usage(self, guild_id: int, day: str, user_id: int, counts: UsageCounts) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._queue_usage(pipe, guild_id, day, user_id, counts)
            await pipe.execute()

    def _queue_usage(
        self, pipe: Pipeline, guild_id: int, day: str, user_id: int, counts: UsageCounts
    ) -> None:
        key = self._usage_key(guild_id, day)
        for name in USAGE_COUNTERS:
            value = getattr(counts, name)
            if not value:
                continue
            if isinstance(value, float):
                pipe.hincrbyfloat(key, f"{int(user_id)}:{name}", value)
            else:
                pipe.hincrby(key, f"{int(user_id)}:{name}", value)
        pipe.expire(key, USAGE_RETENTION_DAYS * 86400)

    async def usage_between(self, guild_id: int, first_day: str, last_day: str) -> list[UsageRow]:
        days = days_between(first_day, last_day)
        async with self._redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(self._usage_key(guild_id, day))
            stored = await pipe.execute()
        rows = []
        for day, fields in zip(days, stored, strict=True):
            members: dict[int, dict[str, float]] = {}
            for field, value in fields.items():
                user, _, name = str(field).partition(":")
                if user.isdigit() and name in USAGE_COUNTERS:
                    members.setdefault(int(user), {})[name] = float(value)
            for user_id in sorted(members):
                counts = members[user_id]
                rows.append(
                    UsageRow(
                        day,
                        user_id,
                        UsageCounts(
                            **{
                                name: counts.get(name, 0.0)
                                if name == "gpu_seconds"
                                else int(counts.get(name, 0))
                                for name in USAGE_COUNTERS
                            }
                        ),
                    )
                )
        return rows

    # --- mod-log cases and reports ---

    def _case_key(self, case_id: str) -> str:
        return f"{self._prefix}case:{case_id}"

    async def add_case(self, case_id: str, data: str, expires_at: float) -> bool:
        key = self._case_key(case_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "data", data)
            pipe.expireat(key, math.ceil(expires_at))
            added, _expiry = await pipe.execute()
        return bool(added)

    async def get_case(self, case_id: str) -> tuple[str, str | None] | None:
        data, decision = await self._redis.hmget(self._case_key(case_id), ["data", "decision"])
        return None if data is None else (str(data), None if decision is None else str(decision))

    async def decide_case(self, case_id: str, decision: str) -> str | None:
        stood = await self._decide_script(keys=[self._case_key(case_id)], args=[decision])
        return None if stood is None else str(stood)

    async def reopen_case(self, case_id: str, decision: str) -> None:
        await self._reopen_script(keys=[self._case_key(case_id)], args=[decision])

    async def add_report(self, job_id: str, user_id: int, expires_at: float) -> int | None:
        key = f"{self._prefix}reports:{job_id}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.sadd(key, str(int(user_id)))
            pipe.scard(key)
            pipe.expireat(key, math.ceil(expires_at))
            added, count, _expiry = await pipe.execute()
        return int(count) if added else None

    # --- request budget ---

    def shared_request_window(self, account: str) -> RedisRequestWindow:
        return RedisRequestWindow(self._redis, self._prefix, account)
