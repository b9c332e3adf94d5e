"""When to check a job's status: the states Segmind reports, the duration estimate, the polling schedule.

Everything here is pure: no I/O and no clock reads. Times are passed in, as seconds on the one clock the
caller uses for all of them (the client uses `time.monotonic`), so the schedule can be driven with
made-up times in tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from services.request import GenerationRequest

FIRST_POLL_DELAY = 0.75
# A floor under the budget's own spacing, so a generous plan does not turn polling into a busy loop.
MIN_POLL_INTERVAL = 0.5


class SegmindState(StrEnum):
    """A job's state as its status answer names it; FAILED comes with HTTP 422 and an `error` text."""

    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


@dataclass
class DurationModel:
    """Expected queue and inference time, learnt from the `metrics` of finished jobs.

    Inference time is modelled as proportional to steps * megapixels * samples, which is how diffusion cost
    scales; the priors are typical serverless SDXL figures and are replaced as soon as real jobs finish.
    """

    seconds_per_unit: float = 0.15
    queue_seconds: float = 2.0
    smoothing: float = 0.3

    @staticmethod
    def work_units(request: GenerationRequest) -> float:
        return request.num_inference_steps * request.megapixels * request.samples

    def expected_inference(self, request: GenerationRequest) -> float:
        return self.seconds_per_unit * self.work_units(request)

    def learn(self, request: GenerationRequest, metrics: Mapping[str, Any]) -> None:
        inference = positive_number(metrics.get("inference_time"))
        if inference is not None:
            observed = inference / self.work_units(request)
            self.seconds_per_unit += self.smoothing * (observed - self.seconds_per_unit)
        queued = metrics.get("queue_time")
        if isinstance(queued, int | float) and not isinstance(queued, bool) and 0 <= queued < math.inf:
            self.queue_seconds += self.smoothing * (queued - self.queue_seconds)


def next_poll_delay(
    *,
    state: SegmindState | None,
    since_submit: float,
    processing_for: float | None,
    expected_queue: float,
    expected_inference: float,
    min_interval: float,
    max_interval: float,
) -> float:
    """How long to wait before the next status check.

    Halving the expected remaining time converges on the expected finish without polling a long job
    every second; once overdue, the interval grows again so a stalled job does not drain the budget.
    """
    if state is None:
        return FIRST_POLL_DELAY
    if state is SegmindState.QUEUED:
        remaining = max(expected_queue - since_submit, 0.0) + expected_inference
        delay = max(remaining / 2, since_submit / 2)
    else:
        remaining = expected_inference - (processing_for or 0.0)
        delay = remaining / 2 if remaining > 0 else min_interval - remaining / 4
    return min(max_interval, max(min_interval, delay))


class PollSchedule:
    """The status checks of one job: `observe` what each check saw, ask `next_delay` when to check again.

    The inference estimate is taken from `durations` once, when the wait starts; the queue estimate is
    read afresh on every call, so what other jobs teach the model while this one waits counts at once.
    Every delay is capped by `deadline_at`, and `expired` says when the wait must end.
    """

    def __init__(
        self,
        durations: DurationModel,
        request: GenerationRequest,
        *,
        submitted_at: float,
        deadline_at: float,
        min_interval: float,
        max_interval: float,
    ) -> None:
        self.durations = durations
        self.expected_inference = durations.expected_inference(request)
        self.submitted_at = submitted_at
        self.deadline_at = deadline_at
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.state: SegmindState | None = None
        self.processing_since: float | None = None
        self._last_seen_queued = submitted_at

    def observe(self, state: SegmindState, at: float) -> None:
        """Records that a status check answered `state` at `at`."""
        if state is SegmindState.QUEUED:
            self._last_seen_queued = at
        if state is self.state:
            return
        if state is SegmindState.PROCESSING:
            # The job started somewhere between the last QUEUED answer and now; sparse polls
            # while queued would otherwise make every later estimate of its finish late.
            expected_start = self.submitted_at + self.durations.queue_seconds
            self.processing_since = min(at, max(self._last_seen_queued, expected_start))
        self.state = state

    def next_delay(self, at: float) -> float:
        """Seconds from `at` until the next status check, never past the deadline."""
        delay = next_poll_delay(
            state=self.state,
            since_submit=at - self.submitted_at,
            processing_for=None if self.processing_since is None else at - self.processing_since,
            expected_queue=self.durations.queue_seconds,
            expected_inference=self.expected_inference,
            min_interval=self.min_interval,
            max_interval=self.max_interval,
        )
        return max(0.0, min(delay, self.time_left(at)))

    def time_left(self, at: float) -> float:
        return self.deadline_at - at

    def expired(self, at: float) -> bool:
        return at >= self.deadline_at


def positive_number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    return None
