"""Persistence for quotas, jobs, leases and flags; ``open_store`` picks the backend from a URL."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from services.store.base import (
    FINISHED,
    UNFINISHED,
    JobRecord,
    JobState,
    QuotaLimits,
    QuotaRefusal,
    QuotaUsage,
    Reservation,
    Store,
    new_job_id,
)

__all__ = [
    "ACCEPTED_URLS",
    "FINISHED",
    "UNFINISHED",
    "JobRecord",
    "JobState",
    "QuotaLimits",
    "QuotaRefusal",
    "QuotaUsage",
    "Reservation",
    "Store",
    "new_job_id",
    "open_store",
]

SQLITE_PREFIX = "sqlite:///"
PREFIX_PARAM = "prefix"

ACCEPTED_URLS = (
    "sqlite:///relative/path.sqlite3, sqlite:////absolute/path.sqlite3, sqlite:///:memory:, "
    "redis://host:port/db or rediss://host:port/db (optionally ?prefix=keyprefix:)"
)


async def open_store(database_url: str, *, key_prefix: str | None = None) -> Store:
    """Open the store named by ``database_url``; for Redis, ``key_prefix`` overrides ``?prefix=``."""
    scheme = database_url.partition("://")[0].lower() if "://" in database_url else ""
    if scheme == "sqlite":
        from services.store.sqlite_store import SQLiteStore

        return await SQLiteStore.open(_sqlite_path(database_url))
    if scheme in ("redis", "rediss"):
        from services.store.redis_store import DEFAULT_PREFIX, RedisStore

        url, url_prefix = _split_prefix(database_url)
        prefix = key_prefix if key_prefix is not None else (url_prefix or DEFAULT_PREFIX)
        return await RedisStore.open(url, prefix=prefix)
    raise ValueError(f"unsupported database URL {_redact(database_url)!r}; expected one of: {ACCEPTED_URLS}")


def _sqlite_path(database_url: str) -> str:
    if not database_url.startswith(SQLITE_PREFIX):
        # sqlite://name would silently treat "name" as a host; insist on the explicit form.
        raise ValueError(
            f"malformed SQLite URL {database_url!r}: use three slashes for a relative path "
            "(sqlite:///data/bot.sqlite3), four for an absolute one (sqlite:////var/lib/bot.sqlite3), "
            "or sqlite:///:memory:"
        )
    path = database_url[len(SQLITE_PREFIX) :]
    if not path or path.endswith("/"):
        raise ValueError(f"SQLite URL {database_url!r} names no database file")
    return path


def _split_prefix(url: str) -> tuple[str, str | None]:
    # redis-py would reject an unknown query parameter, so the key prefix is taken out first.
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((value for key, value in query if key == PREFIX_PARAM), None)
    rest = urlencode([(key, value) for key, value in query if key != PREFIX_PARAM])
    return urlunsplit(parts._replace(query=rest)), prefix


def _redact(url: str) -> str:
    # A Redis URL may carry a password; never echo it into logs or error messages.
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
