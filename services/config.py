"""The bot's configuration: read once from the environment, validated as a whole, then frozen."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast, get_args
from urllib.parse import urlsplit

from services.store import check_database_url

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# When the slash commands are synced at start: only when they changed (or the record of the last sync is a
# day old), or at every start, to repair commands changed behind the bot's back at once.
SyncCommands = Literal["changed", "always"]

# Proxy guides give either the root or discord.py's Route.BASE (root + /api/v10); both name the same root.
_DISCORD_API_PATH = re.compile(r"/api(?:/v\d+)?/*$", re.IGNORECASE)


class ConfigError(Exception):
    """Every problem found in the environment, reported together so one fix-and-restart is enough."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(
            f"The bot cannot start: {len(problems)} configuration problem(s):\n{lines}\n"
            "See .env.example for every variable, its default and its meaning."
        )


@dataclass(frozen=True)
class Config:
    # Secrets are kept out of repr so a logged or printed Config never leaks them.
    discord_token: str = field(repr=False)
    segmind_api_key: str = field(repr=False)
    segmind_base_url: str = "https://api.segmind.com"
    segmind_model: str = "sdxl1.0-dreamshaper"
    segmind_requests_per_minute: int = 50
    segmind_job_deadline_seconds: float = 600.0
    segmind_max_poll_seconds: float = 10.0
    # None: status checks follow the learnt durations; a number: a check every that many seconds, as
    # Segmind's own SDK does (predictable, and the baseline the benchmark compares against).
    segmind_poll_seconds: float | None = None
    # What Segmind charges per second of GPU time, for the cost `/admin usage` shows (None: no cost shown).
    segmind_price_per_gpu_second: float | None = None
    database_url: str = "sqlite:///data/bot.sqlite3"
    quota_daily_images: int = 40
    quota_max_concurrent: int = 2
    quota_exempt_role_ids: frozenset[int] = frozenset()
    # The most images a day a server's own settings (/admin quota, /admin role) may give a member: the
    # operator's bill is theirs to cap. None: servers may set any limit, or none.
    quota_server_max_daily_images: int | None = None
    discord_guild_ids: tuple[int, ...] = ()
    mod_log_channel_id: int | None = None
    # No server's rules apply in a direct message, so /imagine is off there unless an operator turns it on.
    allow_direct_messages: bool = False
    reports_to_hide: int = 3  # distinct members' reports that hide a result until a moderator looks
    # One blocked-prompt entry per member per server within this time; those in between come in one digest.
    mod_log_quiet_seconds: float = 60.0
    credits_cooloff_seconds: float = 600.0
    rate_limit_max_wait_seconds: float = 120.0
    job_lease_seconds: float = 30.0
    shard_count: int | None = None
    shard_ids: tuple[int, ...] | None = None
    discord_api_base: str | None = None
    discord_gateway_url: str | None = None
    log_level: str = "INFO"
    sync_commands: SyncCommands = "changed"
    loop_stall_warning_ms: int = 250

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        reader = _EnvReader(environ)
        values: dict[str, Any] = {
            "discord_token": reader.required("DISCORD_TOKEN"),
            "segmind_api_key": reader.required("SEGMIND_API_KEY"),
            "segmind_base_url": reader.get("SEGMIND_BASE_URL", _http_url, cls.segmind_base_url),
            "segmind_model": reader.get("SEGMIND_MODEL", _model_name, cls.segmind_model),
            "segmind_requests_per_minute": reader.get(
                "SEGMIND_REQUESTS_PER_MINUTE", _int_at_least(1), cls.segmind_requests_per_minute
            ),
            "segmind_job_deadline_seconds": reader.get(
                "SEGMIND_JOB_DEADLINE_SECONDS", _positive_float, cls.segmind_job_deadline_seconds
            ),
            "segmind_max_poll_seconds": reader.get(
                "SEGMIND_MAX_POLL_SECONDS", _at_least_half_a_second, cls.segmind_max_poll_seconds
            ),
            "segmind_poll_seconds": reader.get("SEGMIND_POLL_SECONDS", _at_least_half_a_second, None),
            "segmind_price_per_gpu_second": reader.get("SEGMIND_PRICE_PER_GPU_SECOND", _price, None),
            "database_url": reader.get("DATABASE_URL", _database_url, cls.database_url),
            "quota_daily_images": reader.get("QUOTA_DAILY_IMAGES", _int_at_least(0), cls.quota_daily_images),
            "quota_max_concurrent": reader.get(
                "QUOTA_MAX_CONCURRENT", _int_at_least(1), cls.quota_max_concurrent
            ),
            "quota_exempt_role_ids": frozenset(reader.get("QUOTA_EXEMPT_ROLE_IDS", _snowflake_list, ())),
            "quota_server_max_daily_images": reader.get(
                "QUOTA_SERVER_MAX_DAILY_IMAGES", _int_at_least(1), None
            ),
            "discord_guild_ids": reader.get("DISCORD_GUILD_IDS", _snowflake_list, ()),
            "mod_log_channel_id": reader.get("MOD_LOG_CHANNEL_ID", _snowflake, None),
            "allow_direct_messages": reader.get("ALLOW_DIRECT_MESSAGES", _boolean, False),
            "reports_to_hide": reader.get("REPORTS_TO_HIDE", _int_at_least(1), cls.reports_to_hide),
            "mod_log_quiet_seconds": reader.get(
                "MOD_LOG_QUIET_SECONDS", _positive_float, cls.mod_log_quiet_seconds
            ),
            "credits_cooloff_seconds": reader.get(
                "CREDITS_COOLOFF_SECONDS", _positive_float, cls.credits_cooloff_seconds
            ),
            "rate_limit_max_wait_seconds": reader.get(
                "RATE_LIMIT_MAX_WAIT_SECONDS", _positive_float, cls.rate_limit_max_wait_seconds
            ),
            "job_lease_seconds": reader.get("JOB_LEASE_SECONDS", _at_least_one_second, cls.job_lease_seconds),
            "shard_count": reader.get("SHARD_COUNT", _int_at_least(1), None),
            "shard_ids": reader.get("SHARD_IDS", _shard_ids, None),
            "discord_api_base": reader.get("DISCORD_API_BASE", discord_api_root, None),
            "discord_gateway_url": reader.get("DISCORD_GATEWAY_URL", _ws_url, None),
            "log_level": reader.get("LOG_LEVEL", _log_level, cls.log_level),
            "sync_commands": reader.get("SYNC_COMMANDS", _sync_commands, cls.sync_commands),
            "loop_stall_warning_ms": reader.get(
                "LOOP_STALL_WARNING_MS", _int_at_least(1), cls.loop_stall_warning_ms
            ),
        }
        _check_shards(values["shard_count"], values["shard_ids"], reader.problems)
        if reader.problems:
            raise ConfigError(reader.problems)
        return cls(**values)

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]


class _EnvReader:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.problems: list[str] = []

    def required(self, name: str) -> str:
        value = self._environ.get(name, "").strip()
        if not value:
            self.problems.append(f"{name} is required but not set")
        return value

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            return parse(raw)
        except ValueError as exc:
            self.problems.append(f"{name}={_without_credentials(raw)!r} is invalid: {exc}")
            return default


def _without_credentials(raw: str) -> str:
    """URLs such as DATABASE_URL may carry a password; an error message must not repeat it."""
    return re.sub(r"^([A-Za-z][\w+.-]*:/*)?[^@]*@", lambda m: f"{m.group(1) or ''}***@", raw)


def _at_least_one_second(raw: str) -> float:
    value = _positive_float(raw)
    if value < 1:
        raise ValueError("expected at least 1 second")
    return value


def _at_least_half_a_second(raw: str) -> float:
    # Status checks are never closer together than half a second (the schedule's shortest interval).
    value = _positive_float(raw)
    if value < 0.5:
        raise ValueError("expected at least 0.5 seconds")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected a whole number") from None
        if value < minimum:
            raise ValueError(f"expected a whole number of at least {minimum}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise ValueError("expected a positive number of seconds")
    return value


def _price(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a price in dollars, such as 0.0015") from None
    if not 0 <= value < float("inf"):
        raise ValueError("expected a price of 0 or more")
    return value


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise ValueError("expected true or false")


def _snowflake(raw: str) -> int:
    if not raw.isdigit() or int(raw) == 0:
        raise ValueError("expected a Discord id (digits only)")
    return int(raw)


def _snowflake_list(raw: str) -> tuple[int, ...]:
    return tuple(_snowflake(part.strip()) for part in raw.split(",") if part.strip())


def _shard_ids(raw: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError("expected comma-separated shard numbers such as 0,1") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise ValueError("expected distinct shard numbers of 0 or more")
    return ids


def _check_shards(count: int | None, ids: tuple[int, ...] | None, problems: list[str]) -> None:
    if ids is not None and count is None:
        problems.append("SHARD_IDS needs SHARD_COUNT: the total number of shards across every process")
    elif ids is not None and count is not None and max(ids) >= count:
        problems.append(f"SHARD_IDS must be below SHARD_COUNT={count}")


def _url_with_scheme(raw: str, schemes: tuple[str, ...]) -> str:
    expected = " or ".join(f"{scheme}://" for scheme in schemes)
    scheme, separator, _ = raw.partition("://")
    if not separator or scheme.lower() not in schemes:
        raise ValueError(f"expected a URL starting with {expected}")
    try:
        parts = urlsplit(raw)
        # A port that is not a number raises here, at start, rather than at the first request.
        _ = parts.port
    except ValueError:
        raise ValueError("its port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"it names no host after {scheme}://")
    return raw.rstrip("/")


def _http_url(raw: str) -> str:
    return _url_with_scheme(raw, ("https", "http"))


def _ws_url(raw: str) -> str:
    return _url_with_scheme(raw, ("wss", "ws"))


def discord_api_root(raw: str) -> str:
    """The proxy's root, whether `raw` is that root or the versioned base (root + /api or /api/vN)."""
    return _DISCORD_API_PATH.sub("", _http_url(raw)).rstrip("/")


def _database_url(raw: str) -> str:
    check_database_url(raw)
    return raw


def _model_name(raw: str) -> str:
    if "/" in raw or " " in raw:
        raise ValueError("expected a model slug such as sdxl1.0-dreamshaper")
    return raw


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return level


def _sync_commands(raw: str) -> SyncCommands:
    modes = get_args(SyncCommands)
    mode = raw.lower()
    if mode not in modes:
        raise ValueError(f"expected {' or '.join(modes)}")
    return cast(SyncCommands, mode)
