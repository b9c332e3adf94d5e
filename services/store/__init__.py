"""Persistence for quotas, jobs, leases, flags and command syncs; `open_store` picks the backend from a URL."""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
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
from services.store.guarded import DEFAULT_TIMEOUT, GuardedStore, StoreUnavailable

__all__ = [
    "ACCEPTED_URLS",
    "FINISHED",
    "UNFINISHED",
    "GuardedStore",
    "JobRecord",
    "JobState",
    "OpenFailure",
    "QuotaLimits",
    "QuotaRefusal",
    "QuotaUsage",
    "Reservation",
    "Store",
    "StoreUnavailable",
    "check_database_url",
    "describe_open_failure",
    "new_job_id",
    "open_store",
]

PREFIX_PARAM = "prefix"
REDIS_SCHEMES = ("redis", "rediss")
SQLITE_FORMS = (
    "use sqlite:///data/bot.sqlite3 (a path relative to the working directory), "
    "sqlite:////var/lib/dreamshaper/bot.sqlite3 (an absolute path) or sqlite:///:memory:"
)

ACCEPTED_URLS = (
    "sqlite:///relative/path.sqlite3, sqlite:////absolute/path.sqlite3, sqlite:///:memory:, "
    "redis://host:port/db or rediss://host:port/db (optionally ?prefix=keyprefix:)"
)


async def open_store(
    database_url: str, *, key_prefix: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> GuardedStore:
    """Open the store named by `database_url`; for Redis, `key_prefix` overrides `?prefix=`.

    Every call of the returned store ends within `timeout` seconds or raises `StoreUnavailable`.
    """
    scheme = _scheme(database_url)
    if scheme == "sqlite":
        from services.store.sqlite_store import SQLiteStore

        sqlite = await SQLiteStore.open(_sqlite_path(database_url))
        return GuardedStore(
            sqlite, transient=SQLiteStore.TRANSIENT_ERRORS, timeout=timeout, cancels_promptly=True
        )
    if scheme in ("redis", "rediss"):
        from services.store.redis_store import DEFAULT_PREFIX, RedisStore

        url, url_prefix = _split_prefix(database_url)
        prefix = key_prefix if key_prefix is not None else (url_prefix or DEFAULT_PREFIX)
        shared = await RedisStore.open(url, prefix=prefix)
        return GuardedStore(shared, transient=RedisStore.TRANSIENT_ERRORS, timeout=timeout)
    raise ValueError(f"unsupported database URL {_redact(database_url)!r}; expected one of: {ACCEPTED_URLS}")


def check_database_url(database_url: str) -> None:
    """Raises ValueError saying what is wrong with the URL, so a bad DATABASE_URL stops the bot at start."""
    scheme = _scheme(database_url)
    if scheme == "sqlite":
        _sqlite_path(database_url)
    elif scheme in REDIS_SCHEMES:
        _check_redis_url(database_url)
    elif scheme:
        raise ValueError(f"the scheme {scheme}: is not supported; expected one of: {ACCEPTED_URLS}")
    else:
        raise ValueError(f"it is not a URL (no scheme such as sqlite:); expected one of: {ACCEPTED_URLS}")


def _scheme(database_url: str) -> str:
    # "sqlite:" alone must still count as SQLite, so the message can say what is missing after it.
    name, colon, _ = database_url.partition(":")
    return name.lower() if colon and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", name) else ""


def _sqlite_path(database_url: str) -> str:
    rest = database_url.partition(":")[2]
    path = rest.lstrip("/")
    slashes = len(rest) - len(path)
    if not path:
        raise ValueError(f"it names no database file: {SQLITE_FORMS}")
    if slashes == 2:
        # sqlite://name would silently treat "name" as a host; insist on the explicit form.
        raise ValueError(
            f"sqlite://{path} reads {path.split('/')[0]!r} as a host name: use three slashes for a "
            f"relative path (sqlite:///{path}) or four for an absolute one (sqlite:////{path})"
        )
    if slashes < 2:
        raise ValueError(
            f"it needs three slashes after sqlite: before a relative path (sqlite:///{path}) "
            f"and four before an absolute one (sqlite:////{path})"
        )
    path = rest[len("///") :]  # a fourth slash starts an absolute path
    if path.endswith("/"):
        raise ValueError(
            f"it names a folder, not a database file: add a file name, as in sqlite:///{path}bot.sqlite3"
        )
    return path


def _check_redis_url(database_url: str) -> None:
    parts = urlsplit(database_url)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("its port is not a number from 1 to 65535: use redis://host:6379/0")
    if not parts.hostname:
        raise ValueError("it names no Redis host: use redis://host:6379/0, e.g. redis://127.0.0.1:6379/0")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        # redis-py would ignore it and quietly use database 0, mixing this bot's keys with another's.
        raise ValueError(
            f"the database {database!r} is not a number: use redis://host:6379/0 (0 to 15 on a default server)"
        )


@dataclass(frozen=True)
class OpenFailure:
    """Why the store could not be opened, in the operator's words."""

    message: str
    # The backend may come back by itself (a Redis server restarting), so starting again later may work.
    transient: bool


def describe_open_failure(database_url: str, error: BaseException) -> OpenFailure | None:
    """What `open_store(database_url)` raising `error` means; None for an error that is not the store's."""
    scheme = _scheme(database_url)
    if scheme == "sqlite":
        return _sqlite_open_failure(_sqlite_path(database_url), error)
    if scheme in REDIS_SCHEMES:
        return _redis_open_failure(database_url, error)
    return None


def _sqlite_open_failure(path: str, error: BaseException) -> OpenFailure | None:
    if not isinstance(error, OSError | sqlite3.Error):
        return None
    file = Path(path)
    if isinstance(error, FileExistsError | NotADirectoryError):
        reason = f"its folder {file.parent} cannot be created: part of that path is a file, not a folder"
    elif isinstance(error, OSError):
        reason = f"its folder {file.parent} cannot be created: {error.strerror or error}"
    elif file.is_dir():
        reason = "that is a folder, not a database file"
    elif isinstance(error, sqlite3.DatabaseError) and "not a database" in str(error):
        reason = "that file exists but is not a SQLite database"
    elif not os.access(file.parent, os.W_OK):
        reason = f"the folder {file.parent} is not writable ({error})"
    else:
        reason = str(error)
    return OpenFailure(
        f"cannot open the SQLite database {path}: {reason}; check DATABASE_URL", transient=False
    )


def _redis_open_failure(database_url: str, error: BaseException) -> OpenFailure | None:
    from redis.exceptions import AuthenticationError, RedisError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if not isinstance(error, RedisError | OSError):
        return None
    parts = urlsplit(database_url)
    where = f"Redis at {parts.hostname}:{parts.port or 6379}"
    detail = str(error) or type(error).__name__
    if parts.password:
        detail = detail.replace(parts.password, "***")
    if isinstance(error, AuthenticationError):
        return OpenFailure(f"{where} refused the credentials ({detail}): check DATABASE_URL", transient=False)
    if isinstance(error, RedisConnectionError | RedisTimeoutError | OSError):
        return OpenFailure(
            f"cannot reach {where} ({detail}): check DATABASE_URL and that Redis is running", transient=True
        )
    return OpenFailure(f"{where} refused to open the store ({detail}): check DATABASE_URL", transient=False)


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
