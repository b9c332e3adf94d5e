"""When to check a job's status: the states Segmind reports, what finished jobs taught, the schedule.

Everything here is pure: no I/O and no clock reads. Times are passed in, as seconds on the one clock the
caller uses for all of them (the client uses `time.monotonic`), so the schedule can be driven with
made-up times in tests.

How the checks are spaced. A job's end is uncertain: its queue time varies from job to job, and so, less,
does its run. `DurationModel` keeps the recent spread of both, so the schedule knows the job's possible
ends as a set of candidates, narrowed by what each check saw (still QUEUED at 4 s: it has not started;
PROCESSING at 6 s after QUEUED at 4 s: it started in between). The next check is due once

    P(the job has ended by then | it had not when last checked) x the wait  >=  `lateness`

A check where an end is unlikely is skipped, and where ends crowd, checks crowd too: that spacing (the
gap grows as one over the square root of the chance of finishing per second) is the one that notices ends
soonest for a given number of checks. Past every candidate (an overdue job) the gap grows again, up to
`max_interval`, so a stalled job neither drains the budget nor is noticed later than that.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from services.request import GenerationRequest

# A floor under the budget's own spacing, so a generous plan does not turn polling into a busy loop.
MIN_POLL_INTERVAL = 0.25
# The expected lateness, in seconds, a check must be worth. Lower: ends are noticed sooner, with more checks.
LATENESS_PER_CHECK = 0.06
# Finished jobs whose durations make up the estimate; old ones drop out, so a change in Segmind's load shows.
SAMPLES_KEPT = 64
# Below this many finished jobs the priors still count alongside what was learnt.
SAMPLES_TRUSTED = 8
# Each part of a job's time (queue, run) is represented by at most this many quantiles.
CANDIDATES_PER_PART = 12
# How much less a start noticed late costs than an end noticed late (it only widens the end's window).
START_LATENESS_FACTOR = 12.0
# With the budget short of room, a job is checked once it has ended with this chance.
BUSY_QUANTILE = 0.9
# How far the first few jobs may shrink the priors' scale (see _with_prior).
MIN_PRIOR_SCALE = 0.1
# The priors' spread: run times within ±10 % of the expected, queue times exponential around their mean.
# A request's run varies little from job to job on the same GPUs; the queue is where the spread is. So the
# first job to finish pins runs down, and jobs sent before eight have finished (a burst at start-up) are
# checked for their start, which then tells their end.
PRIOR_RUN_SPREAD = 0.1


class SegmindState(StrEnum):
    """A job's state as its status answer names it; FAILED comes with HTTP 422 and an `error` text."""

    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


@dataclass
class DurationModel:
    """Queue and run times learnt from the `metrics` of finished jobs: their spread, not only their mean.

    Run time is modelled either as proportional to steps * megapixels * samples (how diffusion cost scales)
    or as a duration whatever the request, whichever the recent jobs fit more tightly. The priors are
    typical serverless SDXL figures; they give way as jobs finish.
    """

    seconds_per_unit: float = 0.15  # the prior for the run time per work unit
    queue_seconds: float = 2.0  # the prior mean queue time
    queue_samples: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))
    unit_samples: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))
    run_samples: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))
    learnt: int = field(default=0, compare=False)  # finished jobs learnt from, ever
    _shapes: dict[str, tuple[float, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @staticmethod
    def work_units(request: GenerationRequest) -> float:
        return request.num_inference_steps * request.megapixels * request.samples

    def learn(self, request: GenerationRequest, metrics: Mapping[str, Any]) -> None:
        self.learnt += 1
        self._shapes.clear()
        inference = positive_number(metrics.get("inference_time"))
        if inference is not None:
            self.unit_samples.append(inference / self.work_units(request))
            self.run_samples.append(inference)
        queued = metrics.get("queue_time")
        if isinstance(queued, int | float) and not isinstance(queued, bool) and 0 <= queued < math.inf:
            self.queue_samples.append(float(queued))

    def queue_candidates(self) -> list[float]:
        """Possible queue times, from the recent jobs and (while they are few) the prior."""
        return list(self._shape("queue"))

    def run_candidates(self, request: GenerationRequest) -> list[float]:
        """Possible run times for this request."""
        shape = self._shape("run")
        if self._shape("per unit") == ():
            return list(shape)
        units = self.work_units(request)
        return [per_unit * units for per_unit in self._shape("per unit")]

    def _shape(self, part: str) -> tuple[float, ...]:
        """The candidates of one part, kept until the next job is learnt: a burst builds a thousand
        schedules from the same few figures. "per unit" is empty when plain run times fit better."""
        cached = self._shapes.get(part)
        if cached is not None:
            return cached
        if part == "queue":
            prior = [-self.queue_seconds * math.log(1 - (i + 0.5) / 8) for i in range(8)]
            shape = tuple(_quantiles(_with_prior(self.queue_samples, prior), CANDIDATES_PER_PART))
        elif part == "run":
            shape = tuple(_quantiles(self.run_samples, CANDIDATES_PER_PART))
        else:
            plain = len(self.run_samples) >= SAMPLES_TRUSTED and _spread(self.run_samples) < _spread(
                self.unit_samples
            )
            prior = [self.seconds_per_unit * (1 + PRIOR_RUN_SPREAD * (2 * i / 8 - 1)) for i in range(9)]
            shape = (
                () if plain else tuple(_quantiles(_with_prior(self.unit_samples, prior), CANDIDATES_PER_PART))
            )
        self._shapes[part] = shape
        return shape

    def expected_total(self, request: GenerationRequest) -> float:
        """The mean time from submit to the end, for estimates shown before a job is sent."""
        return statistics.fmean(self.queue_candidates()) + statistics.fmean(self.run_candidates(request))


class PollSchedule:
    """The status checks of one job: `observe` what each check saw, ask `next_delay` when to check again.

    The candidates for the job's end are built from `durations` when the wait starts and narrowed by every
    change of state. They are built again whenever `durations` has learnt from twice as many jobs as when
    they were last built: a burst sent while little was known would otherwise follow the priors all the
    way. Every delay is capped by `deadline_at`, and `expired` says when the wait must end.
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
        lateness: float = LATENESS_PER_CHECK,
    ) -> None:
        if not min_interval > 0:
            raise ValueError("min_interval must be a positive number of seconds")
        self.submitted_at = submitted_at
        self.deadline_at = deadline_at
        self.min_interval = min_interval
        self.max_interval = max(min_interval, max_interval)
        self.lateness = lateness
        self.state: SegmindState | None = None
        self.processing_seen_at: float | None = None
        self._durations = durations
        self._request = request
        self._queued_seen_at = submitted_at
        self._checked_at = submitted_at
        self._starts: list[float] = []
        self._learn_from_durations()

    def _learn_from_durations(self) -> None:
        self._learnt = self._durations.learnt
        self._queue = self._durations.queue_candidates()
        self._run = self._durations.run_candidates(self._request)
        # Knowing when a job started pins its end down only if its run varies less than its queue wait.
        self._probe_start = _spread_width(self._run) < _spread_width(self._queue)
        self._ends = self._candidate_ends()

    def observe(self, state: SegmindState, at: float) -> None:
        """Records that a status check answered `state` at `at`."""
        self._checked_at = at
        if state is SegmindState.QUEUED:
            self._queued_seen_at = at
            # QUEUED after PROCESSING: put back in the queue; it starts again, later.
            self.processing_seen_at = None
        elif state is SegmindState.PROCESSING and self.processing_seen_at is None:
            self.processing_seen_at = at
        self.state = state
        if self._durations.learnt >= 2 * max(1, self._learnt):
            self._learn_from_durations()
        else:
            self._ends = self._candidate_ends()

    def next_delay(self, at: float, *, busy: float = 0.0) -> float:
        """Seconds from `at` until the next status check, never past the deadline.

        `busy` (0 to 1) says how short of room the request budget is. The busier, the later the check:
        at the end, only once the job has most likely ended (BUSY_QUANTILE of its possible ends), so a
        job costs about one check and the room goes to results and submits.
        """
        # The least gap is between two checks of this job; the first one goes when the estimate says.
        least = self.min_interval if self.state is not None else min(self.min_interval, MIN_POLL_INTERVAL)
        delay = poll_delay(
            self._ends, at, lateness=self.lateness, min_interval=least, max_interval=self.max_interval
        )
        if self._probe_start and self.processing_seen_at is None and busy <= 0:
            # Seeing the start soon after it happened narrows the end to the run's own spread, which saves
            # more checks near the end than this one costs.
            probe = poll_delay(
                self._starts,
                at,
                lateness=self.lateness * START_LATENESS_FACTOR,
                min_interval=least,
                max_interval=self.max_interval,
            )
            delay = min(delay, probe)
        if busy > 0:
            first = bisect.bisect_right(self._ends, at)
            if first < len(self._ends):
                likely = self._ends[
                    first + int(min(1.0, busy) * BUSY_QUANTILE * (len(self._ends) - first - 1))
                ]
                delay = max(delay, min(self.max_interval, likely - at))
        return max(0.0, min(delay, self.time_left(at)))

    def likely_ended(self, at: float) -> bool:
        """Whether the job has more likely than not ended by `at`, given it had not at the last check."""
        before = bisect.bisect_right(self._ends, self._checked_at)
        left = len(self._ends) - before
        return left == 0 or (bisect.bisect_right(self._ends, at) - before) * 2 >= left

    def expected_end(self, at: float) -> float | None:
        """The median of the ends still possible after `at`, or None once the job is past them all."""
        left = self._ends[bisect.bisect_right(self._ends, at) :]
        return left[len(left) // 2] if left else None

    def time_left(self, at: float) -> float:
        return self.deadline_at - at

    def expired(self, at: float) -> bool:
        return at >= self.deadline_at

    def _candidate_ends(self) -> list[float]:
        queued_for = self._queued_seen_at - self.submitted_at
        if self.processing_seen_at is None:
            # Not seen running: it starts after the last QUEUED answer. Past every queue time learnt, what
            # is left of the queue is taken to look like a queue time again.
            starts = [q for q in self._queue if q > queued_for]
            if len(starts) < 3:
                starts = [queued_for + q for q in self._queue]
            self._starts = sorted(self.submitted_at + start for start in starts)
        else:
            # It started between the last QUEUED answer and the first PROCESSING one.
            running_by = self.processing_seen_at - self.submitted_at
            starts = [q for q in self._queue if queued_for < q <= running_by]
            if len(starts) < 3:
                starts = [queued_for + (running_by - queued_for) * (i + 0.5) / 8 for i in range(8)]
        return sorted(self.submitted_at + start + run for start in starts for run in self._run)


class FixedPollSchedule:
    """A status check every `interval` seconds whatever is known, the way Segmind's own SDK polls."""

    def __init__(self, interval: float, *, submitted_at: float, deadline_at: float) -> None:
        self.interval = interval
        self.submitted_at = submitted_at
        self.deadline_at = deadline_at
        self.state: SegmindState | None = None

    def observe(self, state: SegmindState, at: float) -> None:
        self.state = state

    def next_delay(self, at: float, *, busy: float = 0.0) -> float:
        return max(0.0, min(self.interval, self.time_left(at)))

    def likely_ended(self, at: float) -> bool:
        return False  # nothing is estimated: every check is a status check

    def expected_end(self, at: float) -> float | None:
        return None

    def time_left(self, at: float) -> float:
        return self.deadline_at - at

    def expired(self, at: float) -> bool:
        return at >= self.deadline_at


def poll_delay(
    ends: Sequence[float], at: float, *, lateness: float, min_interval: float, max_interval: float
) -> float:
    """The wait from `at` until the next check, given the job's possible ends (sorted, equally likely).

    The smallest wait `g` for which P(end <= at + g | end > at) * g reaches `lateness`; past every end, a
    quarter of how overdue the job is. Always within [min_interval, max_interval].
    """
    first = bisect.bisect_right(ends, at)
    remaining = len(ends) - first
    if remaining == 0:
        overdue = at - ends[-1] if ends else 0.0
        delay = min_interval + overdue / 4
    else:
        delay = ends[-1] - at
        for caught in range(1, remaining + 1):
            # Waiting until just after the `caught`-th possible end catches that share of them.
            gap = ends[first + caught - 1] - at
            wanted = max(gap, lateness * remaining / caught)
            if caught == remaining or wanted < ends[first + caught] - at:
                delay = wanted
                break
    return min(max_interval, max(min_interval, delay))


def positive_number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    return None


def _with_prior(samples: Iterable[float], prior: list[float]) -> list[float]:
    """The samples, and while they are few the prior too, moved to the samples' mean: where the times lie
    shows from the first job, how widely they spread takes several."""
    learnt = list(samples)
    if len(learnt) >= SAMPLES_TRUSTED:
        return learnt
    if learnt and statistics.fmean(prior) > 0:
        # Never to nothing: a first job that did not queue at all must not make every queue look empty.
        scale = max(MIN_PRIOR_SCALE, statistics.fmean(learnt) / statistics.fmean(prior))
        prior = [value * scale for value in prior]
    return learnt + prior


def _quantiles(values: Iterable[float], count: int) -> list[float]:
    ordered = sorted(values)
    if len(ordered) <= count:
        return ordered
    return [ordered[int((i + 0.5) * len(ordered) / count)] for i in range(count)]


def _spread_width(values: Sequence[float]) -> float:
    """The middle half's width (interquartile range) of sorted values."""
    if len(values) < 2:
        return 0.0
    return values[(3 * len(values)) // 4] - values[len(values) // 4]


def _spread(values: Sequence[float]) -> float:
    """The coefficient of variation: how tightly the values fit one figure, whatever their scale."""
    if len(values) < 2:
        return math.inf
    # Floats, not `statistics.pstdev`: its exact fractions cost a millisecond per call over 64 samples.
    mean = math.fsum(values) / len(values)
    if not mean > 0:
        return math.inf
    return math.sqrt(math.fsum((value - mean) ** 2 for value in values) / len(values)) / mean
