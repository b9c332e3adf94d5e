"""Injected faults: the next N matching requests get a Segmind-style failure instead of the normal answer."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

FaultKind = Literal["insufficient_credits", "rate_limit", "server_error", "drop", "slow"]
FaultTarget = Literal["submit", "status", "result", "output", "v1", "any"]

FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
FAULT_TARGETS: tuple[str, ...] = get_args(FaultTarget)
DEFAULT_SERVER_ERRORS: tuple[int, ...] = (500, 502, 504)

# name -> (type check, default); a default of None means the parameter is required.
_PARAMS: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "insufficient_credits": {},
    "rate_limit": {"reset_after": ((int, float), 2.0)},
    "server_error": {"status": (int, None)},
    "drop": {"after_accept": (bool, False)},
    "slow": {"seconds": ((int, float), 1.0)},
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
        if value is None:
            continue
        if isinstance(value, bool) and bool not in _as_tuple(types):
            raise ValueError(f"{name} has the wrong type")
        if not isinstance(value, types):
            raise ValueError(f"{name} has the wrong type")
        checked[name] = value
    status = checked.get("status")
    if status is not None and not 500 <= status <= 599:
        raise ValueError("status must be a 5xx code")
    return checked


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
