"""The Dreamshaper SDXL request parameters, validated the way Segmind's API page states them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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
MIN_SEED = -1
MAX_SEED = 999_999_999_999_999
MIN_SIDE = 512
MAX_SIDE = 2048
SIDE_MULTIPLE = 8


class InvalidParameter(ValueError):
    """A request parameter that breaks the API page's rules; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    samples: int = 1
    scheduler: str = "UniPC"
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    seed: int = -1
    img_width: int = 1024
    img_height: int = 1024
    base64: bool = False

    def as_payload(self) -> dict[str, Any]:
        return asdict(self)


def parse_generation_params(body: object) -> GenerationParams:
    """Validate a decoded JSON body; unknown keys are ignored, as a lenient public API does."""
    if not isinstance(body, dict):
        raise InvalidParameter("body", "Request body must be a JSON object")
    return GenerationParams(
        prompt=_prompt(body),
        negative_prompt=_string(body, "negative_prompt", default=""),
        samples=_integer(body, "samples", low=1, high=4, default=1),
        scheduler=_scheduler(body),
        num_inference_steps=_integer(body, "num_inference_steps", low=20, high=100, default=30),
        guidance_scale=_number(body, "guidance_scale", low=1.0, high=25.0, default=7.5),
        seed=_integer(body, "seed", low=MIN_SEED, high=MAX_SEED, default=-1),
        img_width=_side(body, "img_width"),
        img_height=_side(body, "img_height"),
        base64=_boolean(body, "base64", default=False),
    )


def _is_integer(value: object) -> bool:
    # bool is a subclass of int in Python, but JSON true/false are not numbers.
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt(body: dict[str, Any]) -> str:
    value = body.get("prompt")
    if not isinstance(value, str) or not value.strip():
        raise InvalidParameter("prompt", "prompt is required and must be a non-empty string")
    return value


def _string(body: dict[str, Any], name: str, *, default: str) -> str:
    if name not in body:
        return default
    value = body[name]
    if not isinstance(value, str):
        raise InvalidParameter(name, f"{name} must be a string")
    return value


def _integer(body: dict[str, Any], name: str, *, low: int, high: int, default: int) -> int:
    if name not in body:
        return default
    value = body[name]
    if not _is_integer(value) or not low <= value <= high:
        raise InvalidParameter(name, f"{name} must be an integer between {low} and {high}")
    return int(value)


def _number(body: dict[str, Any], name: str, *, low: float, high: float, default: float) -> float:
    if name not in body:
        return default
    value = body[name]
    numeric = _is_integer(value) or isinstance(value, float)
    if not numeric or not math.isfinite(value) or not low <= value <= high:
        raise InvalidParameter(name, f"{name} must be a number between {low:g} and {high:g}")
    return float(value)


def _side(body: dict[str, Any], name: str) -> int:
    if name not in body:
        return 1024
    value = body[name]
    in_range = _is_integer(value) and MIN_SIDE <= value <= MAX_SIDE
    if not in_range or value % SIDE_MULTIPLE:
        rule = f"an integer between {MIN_SIDE} and {MAX_SIDE} in multiples of {SIDE_MULTIPLE}"
        raise InvalidParameter(name, f"{name} must be {rule}")
    return int(value)


def _scheduler(body: dict[str, Any]) -> str:
    value = body.get("scheduler", "UniPC")
    if value not in SCHEDULERS:
        raise InvalidParameter("scheduler", "scheduler must be one of: " + ", ".join(SCHEDULERS))
    return str(value)


def _boolean(body: dict[str, Any], name: str, *, default: bool) -> bool:
    if name not in body:
        return default
    value = body[name]
    if not isinstance(value, bool):
        raise InvalidParameter(name, f"{name} must be a boolean")
    return value
