"""Settings of the stand-in Segmind server, and their checked update from JSON (the control API)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_MODEL = "sdxl1.0-dreamshaper"


@dataclass
class SegmindServerSettings:
    api_keys: frozenset[str] | None = None  # None: any non-empty x-api-key is accepted
    model: str = DEFAULT_MODEL  # other model names answer 404
    queue_seconds: float = 0.5  # minimum time a job stays QUEUED
    seconds_per_step: float = 0.02  # per step, for one 1024x1024 sample; scales with pixels and samples
    workers: int = 2  # jobs run at most this many at once; the rest stay QUEUED
    retention_seconds: float = 3600.0  # status and result answer 404 this long after a job finishes
    blocked_words: frozenset[str] = field(default_factory=frozenset)  # whole word, any case -> FAILED
    requests_per_minute: int | None = None  # per key, sliding 60 s window; over it -> 429
    public_base_url: str | None = None  # base of absolute URLs; default: the request's own host


def settings_to_json(settings: SegmindServerSettings) -> dict[str, Any]:
    """The settings as JSON; accepted keys are reported by count only, never echoed."""
    described: dict[str, Any] = {item.name: getattr(settings, item.name) for item in fields(settings)}
    described["api_keys"] = None if settings.api_keys is None else len(settings.api_keys)
    described["blocked_words"] = sorted(settings.blocked_words)
    return described


def apply_settings_json(settings: SegmindServerSettings, changes: object) -> None:
    """Check every change first and apply them only if all are valid; a ValueError says what is wrong."""
    if not isinstance(changes, dict):
        raise ValueError("settings must be a JSON object")
    unknown = set(changes) - set(_PARSERS)
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    parsed = {name: _PARSERS[name](name, value) for name, value in changes.items()}
    for name, value in parsed.items():
        setattr(settings, name, value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _non_negative(name: str, value: object) -> float:
    if not _is_number(value) or value < 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a number >= 0")
    return float(value)  # type: ignore[arg-type]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1")
    return value


def _optional_positive_int(name: str, value: object) -> int | None:
    return None if value is None else _positive_int(name, value)


def _word_set(name: str, value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name} must be a list of strings")
    return frozenset(value)


def _optional_word_set(name: str, value: object) -> frozenset[str] | None:
    return None if value is None else _word_set(name, value)


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _optional_text(name: str, value: object) -> str | None:
    return None if value is None else _text(name, value)


_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "api_keys": _optional_word_set,
    "model": _text,
    "queue_seconds": _non_negative,
    "seconds_per_step": _non_negative,
    "workers": _positive_int,
    "retention_seconds": _non_negative,
    "blocked_words": _word_set,
    "requests_per_minute": _optional_positive_int,
    "public_base_url": _optional_text,
}
