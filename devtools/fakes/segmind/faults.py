"""Injected faults: the next N matching requests get a Segmind-style failure instead of the normal answer.

Besides plain failures, the hostile kinds play a Segmind (or something between it and the bot) that does
not follow its own API, so the client's defences can be tested:

* `foreign_urls` (submit, result; `origin` required, `path` optional): the request is handled
  normally, but a submit answer's `status_url` / `response_url` point at `origin` (the job is still
  created), and a result's output URLs point at `origin` + `path` (`path` default: the output's own
  path, so a second stand-in can serve it), e.g. `http://169.254.169.254` + `/latest/meta-data/`.
* `redirect` (any target; `location` required): `307` with `Location: location`, an absolute URL;
  the request itself is not handled.
* `odd_reset` (any target; `value` required): `429` whose `x-rate-limit-reset-at-utc` is `value`
  verbatim (`"inf"`, `"-1"`, `"garbage"`, `"99999999999"`, ...).
* `huge_body` (status, result; `mib` default 200, `content_length` default false): `200` with a
  JSON body of about `mib` MiB, streamed (a valid-looking PROCESSING prefix, padding, then the closing of
  the object), never held in memory whole; `content_length` declares its size up front instead of
  sending it chunked.
* `malformed` (submit, status, result; `body` required, `after_accept` default false): `200` with
  `body` as raw text under `Content-Type: application/json` (`"not json"`, `"[]"`,
  `'{"status": "WEIRD"}'`). On a submit with `after_accept`, the job is created first.
* `echo_key` (submit, status, result): the error text echoes the received `x-api-key`: on status and result a
  `422` FAILED answer, on submit a `500`.
* `odd_image` (output; `format` required): the output file is served as `mpo` (a multi-picture JPEG,
  as Pillow writes it with `save_all`), `gif`, `bmp`, `tiff`, `png`, `webp`, `truncated` (a
  JPEG cut in half) or `garbage` (not an image; served as `image/jpeg`).
* `many_outputs` (result; `outputs` default 12, 1 to 100): a completed result lists that many outputs,
  every one a downloadable JPEG (or base64 JPEG data when the job asked for base64). The parameter is not
  called `count`, which already says how many requests a fault hits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from yarl import URL

FaultKind = Literal[
    "insufficient_credits",
    "rate_limit",
    "server_error",
    "drop",
    "slow",
    "foreign_urls",
    "redirect",
    "odd_reset",
    "huge_body",
    "malformed",
    "echo_key",
    "odd_image",
    "many_outputs",
]
FaultTarget = Literal["submit", "status", "result", "output", "v1", "any"]

FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
FAULT_TARGETS: tuple[str, ...] = get_args(FaultTarget)
DEFAULT_SERVER_ERRORS: tuple[int, ...] = (500, 502, 504)
ODD_IMAGE_FORMATS: tuple[str, ...] = ("mpo", "gif", "bmp", "tiff", "png", "webp", "truncated", "garbage")
MAX_HUGE_BODY_MIB = 4096
MAX_OUTPUTS = 100

_REQUIRED = object()

# name -> (type check, default); a default of _REQUIRED must be given, a default of None may be left out.
_PARAMS: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "insufficient_credits": {},
    "rate_limit": {"reset_after": ((int, float), 2.0)},
    "server_error": {"status": (int, None)},
    "drop": {"after_accept": (bool, False)},
    "slow": {"seconds": ((int, float), 1.0)},
    "foreign_urls": {"origin": (str, _REQUIRED), "path": (str, None)},
    "redirect": {"location": (str, _REQUIRED)},
    "odd_reset": {"value": (str, _REQUIRED)},
    "huge_body": {"mib": ((int, float), 200), "content_length": (bool, False)},
    "malformed": {"body": (str, _REQUIRED), "after_accept": (bool, False)},
    "echo_key": {},
    "odd_image": {"format": (str, _REQUIRED)},
    "many_outputs": {"outputs": (int, 12)},
}

# Kinds that mean something only for some targets; the others apply to any target.
_TARGETS: dict[str, tuple[str, ...]] = {
    "foreign_urls": ("submit", "result"),
    "huge_body": ("status", "result"),
    "malformed": ("submit", "status", "result"),
    "echo_key": ("submit", "status", "result"),
    "odd_image": ("output",),
    "many_outputs": ("result",),
}


@dataclass
class Fault:
    kind: FaultKind
    target: FaultTarget
    remaining: int
    params: dict[str, Any]
    _statuses: Iterator[int] = field(repr=False, default_factory=lambda: iter(()))

    def matches(self, target: str) -> bool:
        return self.remaining > 0 and self.target in ("any", target)

    def next_server_status(self) -> int:
        """The status of this hit of a server_error fault: fixed if given, else 500, 502, 504, 500, ..."""
        fixed = self.params.get("status")
        return int(fixed) if fixed is not None else next(self._statuses)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "remaining": self.remaining, **self.params}


def build_fault(kind: str, *, count: int, target: str, params: dict[str, Any]) -> Fault:
    """Check a fault's description and build it; a ValueError says what is wrong."""
    if kind not in FAULT_KINDS:
        raise ValueError(f"kind must be one of: {', '.join(FAULT_KINDS)}")
    if target not in FAULT_TARGETS:
        raise ValueError(f"target must be one of: {', '.join(FAULT_TARGETS)}")
    allowed_targets = _TARGETS.get(kind)
    if allowed_targets is not None and target not in allowed_targets:
        raise ValueError(f"target of {kind} must be one of: {', '.join(allowed_targets)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError("count must be a positive integer")
    checked = _checked_params(kind, params)
    return Fault(
        kind=kind,  # type: ignore[arg-type]
        target=target,  # type: ignore[arg-type]
        remaining=count,
        params=checked,
        _statuses=itertools.cycle(DEFAULT_SERVER_ERRORS),
    )


def _checked_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    allowed = _PARAMS[kind]
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(f"unknown parameter(s) for {kind}: {', '.join(sorted(unknown))}")
    checked: dict[str, Any] = {}
    for name, (types, default) in allowed.items():
        value = params.get(name, default)
        if value is _REQUIRED:
            raise ValueError(f"{kind} needs the parameter {name}")
        if value is None:
            continue
        if isinstance(value, bool) and bool not in _as_tuple(types):
            raise ValueError(f"{name} has the wrong type")
        if not isinstance(value, types):
            raise ValueError(f"{name} has the wrong type")
        checked[name] = value
    for name, value in checked.items():
        check = _VALUE_CHECKS.get(name)
        if check is not None:
            check(value)
    return checked


def _check_status(status: int) -> None:
    if not 500 <= status <= 599:
        raise ValueError("status must be a 5xx code")


def _check_absolute(name: str, value: str, *, path_allowed: bool) -> None:
    try:
        url = URL(value)
    except ValueError:
        url = URL()
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{name} must be an absolute http(s) URL")
    if not path_allowed and url.path not in ("", "/"):
        raise ValueError(f"{name} must be an origin (scheme, host, port) without a path")


def _check_path(path: str) -> None:
    if not path.startswith("/"):
        raise ValueError("path must start with /")


def _check_mib(mib: float) -> None:
    if not 0 < mib <= MAX_HUGE_BODY_MIB:  # also false for NaN
        raise ValueError(f"mib must be a number above 0 and at most {MAX_HUGE_BODY_MIB}")


def _check_format(image_format: str) -> None:
    if image_format not in ODD_IMAGE_FORMATS:
        raise ValueError(f"format must be one of: {', '.join(ODD_IMAGE_FORMATS)}")


def _check_outputs(outputs: int) -> None:
    if not 1 <= outputs <= MAX_OUTPUTS:
        raise ValueError(f"outputs must be between 1 and {MAX_OUTPUTS}")


_VALUE_CHECKS: dict[str, Callable[[Any], None]] = {
    "status": _check_status,
    "origin": lambda value: _check_absolute("origin", value, path_allowed=False),
    "location": lambda value: _check_absolute("location", value, path_allowed=True),
    "path": _check_path,
    "mib": _check_mib,
    "format": _check_format,
    "outputs": _check_outputs,
}


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


class FaultBook:
    """Faults waiting to be served, taken in the order they were injected."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        self._faults.append(fault)

    def clear(self) -> None:
        self._faults.clear()

    def take(self, target: str) -> Fault | None:
        """Spend one use of the first fault that applies to this request's target."""
        for fault in self._faults:
            if fault.matches(target):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault
        return None

    def describe(self) -> list[dict[str, Any]]:
        return [fault.describe() for fault in self._faults]
