"""Settings of the stand-in Segmind server, and their checked update from JSON (the control API)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

DEFAULT_MODEL = "sdxl1.0-dreamshaper"
QueueDistribution = Literal["fixed", "exponential"]
QUEUE_DISTRIBUTIONS: tuple[str, ...] = get_args(QueueDistribution)
# How the result URL answers before the job has ended: with its state, as the status URL does, or 404.
EarlyResult = Literal["state", "not_found"]
EARLY_RESULTS: tuple[str, ...] = get_args(EarlyResult)


@dataclass
class SegmindServerSettings:
    api_keys: frozenset[str] | None = None  # None: any non-empty x-api-key is accepted
    model: str = DEFAULT_MODEL  # other model names answer 404
    queue_seconds: float = 0.5  # minimum time a job stays QUEUED (see queue_distribution)
    seconds_per_step: float = 0.02  # per step, for one 1024x1024 sample; scales with pixels and samples
    workers: int = 2  # jobs run at most this many at once; the rest stay QUEUED
    retention_seconds: float = 3600.0  # status and result answer 404 this long after a job finishes
    blocked_words: frozenset[str] = field(default_factory=frozenset)  # whole word, any case -> FAILED
    requests_per_minute: int | None = None  # per key, sliding 60 s window; over it -> 429
    public_base_url: str | None = None  # base of absolute URLs; default: the request's own host
    early_result: EarlyResult = "state"  # the result URL of an unfinished job: its state, or 404
    # fixed: every job waits queue_seconds; exponential: each job's wait is drawn with that mean.
    queue_distribution: QueueDistribution = "fixed"
    # Each job's processing time from its parameters is multiplied by uniform(1 - j, 1 + j).
    inference_jitter: float = 0.0
    # When set, processing takes uniform(lo, hi) seconds whatever the parameters (inference_jitter unused).
    inference_range: tuple[float, float] | None = None
    # Seeds the server's one random.Random (queue and processing times, seeds for -1); None: a random seed.
    seed: int | None = None

    def __post_init__(self) -> None:
        # The timing settings are checked here too, so that a bad command line or constructor call fails
        # at once rather than producing nonsense timelines later.
        for name in _TIMING_SETTINGS:
            setattr(self, name, _PARSERS[name](name, getattr(self, name)))


def settings_to_json(settings: SegmindServerSettings) -> dict[str, Any]:
    """The settings as JSON; accepted keys are reported by count only, never echoed."""
    described: dict[str, Any] = {item.name: getattr(settings, item.name) for item in fields(settings)}
    described["api_keys"] = None if settings.api_keys is None else len(settings.api_keys)
    described["blocked_words"] = sorted(settings.blocked_words)
    described["inference_range"] = (
        None if settings.inference_range is None else list(settings.inference_range)
    )
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
    # JSON's 1e999 parses as infinity, which no timeline can hold.
    if not _is_number(value) or not 0 <= value < math.inf:  # type: ignore[operator]
        raise ValueError(f"{name} must be a finite number >= 0")
    return float(value)  # type: ignore[arg-type]


def _queue_distribution(name: str, value: object) -> QueueDistribution:
    if value not in QUEUE_DISTRIBUTIONS:
        choices = " or ".join(f'"{choice}"' for choice in QUEUE_DISTRIBUTIONS)
        raise ValueError(f"{name} must be {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def _early_result(name: str, value: object) -> EarlyResult:
    if value not in EARLY_RESULTS:
        raise ValueError(f"{name} must be " + " or ".join(f'"{choice}"' for choice in EARLY_RESULTS))
    return value  # type: ignore[return-value]


def _jitter(name: str, value: object) -> float:
    if not _is_number(value) or not 0 <= value < 1:  # type: ignore[operator]
        raise ValueError(f"{name} must be a number >= 0 and < 1, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _optional_range(name: str, value: object) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(_is_number(item) for item in value):
        raise ValueError(f"{name} must be null or a list of two numbers [low, high], got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high)) or not 0 <= low <= high:
        raise ValueError(f"{name} must be finite with 0 <= low <= high, got [{low:g}, {high:g}]")
    return (low, high)


def _optional_int(name: str, value: object) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be null or an integer, got {value!r}")
    return value


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
    "early_result": _early_result,
    "queue_distribution": _queue_distribution,
    "inference_jitter": _jitter,
    "inference_range": _optional_range,
    "seed": _optional_int,
}
_TIMING_SETTINGS = ("queue_distribution", "inference_jitter", "inference_range", "seed")
