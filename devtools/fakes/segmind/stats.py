"""What the stand-in Segmind server saw, so client tests can assert on their own traffic."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SubmitRecord:
    """A job the server accepted (v2 submit) or a v1 call it ran."""

    request_id: str
    payload: dict[str, Any]
    time: float  # time.monotonic() when accepted


@dataclass
class RequestRecord:
    method: str
    path: str
    target: str  # submit, status, result, output, v1 or other
    time: float  # time.monotonic() on arrival
    status: int | None = None  # None: no HTTP answer was sent (connection dropped, or still in flight)


@dataclass
class SegmindStats:
    submits: list[SubmitRecord] = field(default_factory=list)
    sync_calls: list[SubmitRecord] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    status_polls: int = 0
    status_polls_by_id: Counter[str] = field(default_factory=Counter)
    # 429s from the plan limit (requests_per_minute); injected rate_limit faults are not counted here,
    # though like every answer they show in `requests` as status 429.
    rate_limited: int = 0

    def reset(self) -> None:
        self.submits.clear()
        self.sync_calls.clear()
        self.requests.clear()
        self.status_polls = 0
        self.status_polls_by_id.clear()
        self.rate_limited = 0

    def requests_to(self, *targets: str) -> list[RequestRecord]:
        """Requests aimed at any of these targets (all requests when none are named)."""
        return [record for record in self.requests if not targets or record.target in targets]

    def max_requests_in_window(self, window: float = 60.0, targets: Iterable[str] | None = None) -> int:
        """The largest number of requests that arrived within any `window` seconds."""
        if window <= 0:
            return 0
        times = sorted(record.time for record in self.requests_to(*(targets or ())))
        best = 0
        first = 0
        for last, arrived in enumerate(times):
            while arrived - times[first] >= window:
                first += 1
            best = max(best, last - first + 1)
        return best

    def to_json(self) -> dict[str, Any]:
        return {
            "submits": [asdict(record) for record in self.submits],
            "sync_calls": [asdict(record) for record in self.sync_calls],
            "requests": [asdict(record) for record in self.requests],
            "status_polls": self.status_polls,
            "status_polls_by_id": dict(self.status_polls_by_id),
            "rate_limited": self.rate_limited,
        }
