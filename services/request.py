"""The Dreamshaper SDXL request: the API page's parameter table as code."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

SCHEDULERS: tuple[str, ...] = (
    "DDIM",
    "DPM Multi",
    "DPM Single",
    "Euler a",
    "Euler",
    "Heun",
    "DPM2 a Karras",
    "DPM2 Karras",
    "LMS",
    "PNDM",
    "DDPM",
    "UniPC",
)
SAMPLES_RANGE = (1, 4)
STEPS_RANGE = (20, 100)
GUIDANCE_RANGE = (1.0, 25.0)
SEED_RANGE = (-1, 999_999_999_999_999)
SIZE_RANGE = (512, 2048)
SIZE_STEP = 8
RANDOM_SEED = -1


class RequestValidationError(ValueError):
    """A rejected parameter: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        super().__init__(f"{field}={shown} is not allowed: {allowed}")


@dataclass(frozen=True)
class GenerationRequest:
    """Field names are the API's own, so serialising is a plain dict."""

    prompt: str
    negative_prompt: str = ""
    samples: int = 1
    scheduler: str = "UniPC"
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    seed: int = RANDOM_SEED
    img_width: int = 1024
    img_height: int = 1024
    base64: bool = False

    def __post_init__(self) -> None:
        _check_text("prompt", self.prompt, required=True)
        _check_text("negative_prompt", self.negative_prompt, required=False)
        _check_int("samples", self.samples, *SAMPLES_RANGE)
        if self.scheduler not in SCHEDULERS:
            raise RequestValidationError("scheduler", self.scheduler, f"one of {', '.join(SCHEDULERS)}")
        _check_int("num_inference_steps", self.num_inference_steps, *STEPS_RANGE)
        _check_number("guidance_scale", self.guidance_scale, *GUIDANCE_RANGE)
        _check_int("seed", self.seed, *SEED_RANGE)
        _check_size("img_width", self.img_width)
        _check_size("img_height", self.img_height)
        if not isinstance(self.base64, bool):
            raise RequestValidationError("base64", self.base64, "true or false")

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> GenerationRequest:
        """Builds a request from API-named fields, rejecting unknown ones (a typo must not pass silently)."""
        known = set(cls.__dataclass_fields__)
        for name in payload:
            if name not in known:
                raise RequestValidationError(
                    name, payload[name], f"not a parameter; known: {', '.join(sorted(known))}"
                )
        if "prompt" not in payload:
            raise RequestValidationError("prompt", None, "a prompt is required")
        return cls(**payload)

    def to_payload(self) -> dict[str, Any]:
        # Every field is a plain value, so a flat copy is `asdict` without its deep copy (several a job).
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def with_concrete_seed(self, rng: random.Random | None = None) -> GenerationRequest:
        """Replaces seed -1 with a real one, so every result can be shown and reproduced."""
        if self.seed != RANDOM_SEED:
            return self
        return replace(self, seed=(rng or random.SystemRandom()).randint(0, SEED_RANGE[1]))

    def with_new_seed(self, rng: random.Random | None = None) -> GenerationRequest:
        return replace(self, seed=RANDOM_SEED).with_concrete_seed(rng)

    @property
    def megapixels(self) -> float:
        return self.img_width * self.img_height / 1_000_000


def nearest_valid_sizes(value: int) -> tuple[int, int]:
    """The two valid sizes around a value that is not a multiple of 8, clamped to the allowed range."""
    lower = max(SIZE_RANGE[0], min(SIZE_RANGE[1], value // SIZE_STEP * SIZE_STEP))
    upper = lower + SIZE_STEP if lower + SIZE_STEP <= SIZE_RANGE[1] else lower - SIZE_STEP
    return tuple(sorted((lower, upper)))  # type: ignore[return-value]


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python, but `true` is not a step count.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(field: str, value: object, *, required: bool) -> None:
    if not isinstance(value, str):
        raise RequestValidationError(field, value, "text")
    if required and not value.strip():
        raise RequestValidationError(field, value, "non-blank text")


def _check_int(field: str, value: object, low: int, high: int, allowed: str = "") -> None:
    allowed = allowed or f"a whole number from {low} to {high}"
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        raise RequestValidationError(field, value, allowed)


def _check_number(field: str, value: object, low: float, high: float) -> None:
    allowed = f"a number from {low:g} to {high:g}"
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise RequestValidationError(field, value, allowed)
    if not low <= value <= high:
        raise RequestValidationError(field, value, allowed)


def _check_size(field: str, value: object) -> None:
    low, high = SIZE_RANGE
    allowed = f"a multiple of {SIZE_STEP} from {low} to {high}"
    _check_int(field, value, low, high, allowed)
    if value % SIZE_STEP:  # type: ignore[operator]
        below, above = nearest_valid_sizes(value)  # type: ignore[arg-type]
        raise RequestValidationError(field, value, f"{allowed}; the nearest are {below} and {above}")
