"""The polling schedule alone: observations and made-up times in, delays out; no sleeping, no sockets.

The simulations at the end run thousands of made-up jobs through the schedule and a fixed 1 s poller on
the same draws, so the policy's claims (fewer checks, ends noticed sooner) are checked without a clock.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from services.request import GenerationRequest
from services.segmind import DurationModel, FixedPollSchedule, PollSchedule, SegmindState, poll_delay
from services.segmind.schedule import SAMPLES_TRUSTED

QUEUED = SegmindState.QUEUED
PROCESSING = SegmindState.PROCESSING
COMPLETED = SegmindState.COMPLETED

SUBMITTED_AT = 100.0
# 20 steps x 1 megapixel x 1 sample = 20 work units.
REQUEST = GenerationRequest(prompt="x", num_inference_steps=20, img_width=1000, img_height=1000)


def taught(queue: list[float], runs: list[float], request: GenerationRequest = REQUEST) -> DurationModel:
    model = DurationModel()
    for queued, ran in zip(queue, runs, strict=True):
        model.learn(request, {"queue_time": queued, "inference_time": ran})
    return model


def steady(queue: float = 2.0, run: float = 10.0, jobs: int = 20) -> DurationModel:
    """A model that has seen jobs queue for exactly `queue` s and run exactly `run` s."""
    return taught([queue] * jobs, [run] * jobs)


def schedule(
    model: DurationModel | None = None,
    *,
    deadline: float = 600.0,
    min_interval: float = 0.25,
    max_interval: float = 10.0,
    request: GenerationRequest = REQUEST,
) -> PollSchedule:
    return PollSchedule(
        model or DurationModel(),
        request,
        submitted_at=SUBMITTED_AT,
        deadline_at=SUBMITTED_AT + deadline,
        min_interval=min_interval,
        max_interval=max_interval,
    )


# --- the rule ---------------------------------------------------------------------------------------


def test_one_finished_job_moves_the_estimate_to_where_it_ended_before_its_spread_is_known() -> None:
    model = DurationModel()
    prior = model.run_candidates(REQUEST)
    model.learn(REQUEST, {"inference_time": 40.0, "queue_time": 1.0})
    runs = model.run_candidates(REQUEST)
    # The prior says a few seconds; one job of 40 s says where runs lie, the prior's shape how they spread.
    assert max(prior) < 10.0
    assert min(runs) >= 40.0 * 0.65 and max(runs) <= 40.0 * 1.35


def test_a_first_job_that_did_not_queue_does_not_make_every_queue_look_empty() -> None:
    model = DurationModel()
    model.learn(REQUEST, {"inference_time": 10.0, "queue_time": 0.0})
    queues = model.queue_candidates()
    assert max(queues) > 0.2 and len(set(queues)) > 3


def test_jobs_sent_while_little_was_known_follow_what_is_learnt_while_they_wait() -> None:
    model = DurationModel()
    polls = schedule(model, max_interval=60.0)
    polls.observe(QUEUED, SUBMITTED_AT + 1.0)
    before = polls.expected_end(SUBMITTED_AT + 1.0)
    # Meanwhile, other jobs finish: they queued 1 s and ran 30 s.
    for _ in range(SAMPLES_TRUSTED):
        model.learn(REQUEST, {"inference_time": 30.0, "queue_time": 1.0})
    polls.observe(PROCESSING, SUBMITTED_AT + 2.0)
    after = polls.expected_end(SUBMITTED_AT + 2.0)
    assert before is not None and after is not None
    assert before < SUBMITTED_AT + 15.0
    assert SUBMITTED_AT + 30.0 < after <= SUBMITTED_AT + 32.0
    # Nothing is checked before the learnt end can have come.
    assert polls.next_delay(SUBMITTED_AT + 2.0) >= 28.0


def test_a_job_that_cannot_have_ended_is_not_checked_before_it_can() -> None:
    polls = schedule(steady(queue=2.0, run=10.0), max_interval=30.0)
    assert polls.next_delay(SUBMITTED_AT) == pytest.approx(12.0)


def test_where_ends_crowd_the_checks_crowd_and_where_they_thin_out_so_do_the_checks() -> None:
    # Ends spread evenly over 20 s: the chance of ending in the next second rises as the time runs out.
    ends = [20.0 + 20.0 * i / 200 for i in range(200)]
    early = poll_delay(ends, 20.0, lateness=0.06, min_interval=0.1, max_interval=10.0)
    late = poll_delay(ends, 38.0, lateness=0.06, min_interval=0.1, max_interval=10.0)
    # The ideal gap is sqrt(lateness x time left): about 1.1 s with 20 s left, 0.35 s with 2 s left.
    assert early == pytest.approx(math.sqrt(0.06 * 20), rel=0.1)
    assert late == pytest.approx(math.sqrt(0.06 * 2), rel=0.15)


def test_past_every_possible_end_the_gap_grows_with_the_delay_up_to_the_longest() -> None:
    ends = [10.0, 11.0, 12.0]
    assert poll_delay(ends, 13.0, lateness=0.06, min_interval=0.5, max_interval=5.0) == pytest.approx(0.75)
    assert poll_delay(ends, 20.0, lateness=0.06, min_interval=0.5, max_interval=5.0) == pytest.approx(2.5)
    assert poll_delay(ends, 200.0, lateness=0.06, min_interval=0.5, max_interval=5.0) == 5.0


def test_an_overdue_job_is_never_noticed_later_than_the_longest_interval() -> None:
    polls = schedule(steady(), max_interval=3.0)
    at = SUBMITTED_AT + 12.0
    for _ in range(50):
        polls.observe(PROCESSING, at)
        delay = polls.next_delay(at)
        assert 0 < delay <= 3.0
        at += delay


# --- what the checks saw ----------------------------------------------------------------------------


def test_still_queued_moves_every_possible_end_past_the_last_answer() -> None:
    # Queue times learnt between 0 and 4 s; runs of exactly 10 s.
    model = taught([4.0 * i / 19 for i in range(20)], [10.0] * 20)
    polls = schedule(model)
    polls.observe(QUEUED, SUBMITTED_AT + 3.0)
    assert polls.expected_end(SUBMITTED_AT + 3.0) == pytest.approx(SUBMITTED_AT + 13.5, abs=0.3)


def test_a_queued_job_whose_run_is_predictable_is_checked_for_its_start() -> None:
    # Runs of exactly 10 s after 0-4 s of queue: the start is what decides the end.
    polls = schedule(taught([4.0 * i / 19 for i in range(20)], [10.0] * 20))
    polls.observe(QUEUED, SUBMITTED_AT + 1.0)
    assert polls.next_delay(SUBMITTED_AT + 1.0) < 2.0
    # Once it is seen running, the next check waits for the end.
    polls.observe(PROCESSING, SUBMITTED_AT + 2.0)
    assert polls.next_delay(SUBMITTED_AT + 2.0) >= 9.0


def test_a_queued_job_whose_run_varies_more_than_its_queue_is_left_alone_until_it_may_end() -> None:
    rng = random.Random(5)
    polls = schedule(taught([1.0] * 20, [rng.uniform(20, 40) for _ in range(20)]), max_interval=30.0)
    polls.observe(QUEUED, SUBMITTED_AT + 0.5)
    assert polls.next_delay(SUBMITTED_AT + 0.5) >= 19.0


def test_a_queue_longer_than_any_learnt_still_has_an_estimate() -> None:
    polls = schedule(steady(queue=2.0, run=10.0))
    polls.observe(QUEUED, SUBMITTED_AT + 30.0)
    end = polls.expected_end(SUBMITTED_AT + 30.0)
    assert end is not None and end > SUBMITTED_AT + 40.0


def test_seen_running_dates_the_start_between_the_last_queued_and_the_first_processing_answer() -> None:
    model = taught([4.0 * i / 19 for i in range(20)], [10.0] * 20)
    polls = schedule(model)
    polls.observe(QUEUED, SUBMITTED_AT + 1.0)
    polls.observe(PROCESSING, SUBMITTED_AT + 2.0)
    end = polls.expected_end(SUBMITTED_AT + 2.0)
    assert end is not None and SUBMITTED_AT + 11.0 < end <= SUBMITTED_AT + 12.0
    # A later PROCESSING answer does not move the start.
    polls.observe(PROCESSING, SUBMITTED_AT + 8.0)
    assert polls.expected_end(SUBMITTED_AT + 8.0) == end


def test_a_final_state_is_recorded() -> None:
    polls = schedule()
    polls.observe(COMPLETED, SUBMITTED_AT + 5.0)
    assert polls.state is COMPLETED


# --- what the model learns --------------------------------------------------------------------------


def test_the_priors_answer_before_any_job_has_finished() -> None:
    polls = schedule()
    first = polls.next_delay(SUBMITTED_AT)
    end = polls.expected_end(SUBMITTED_AT)
    # 20 units at the prior 0.15 s, plus about the prior 2 s of queue.
    assert end is not None and end == pytest.approx(SUBMITTED_AT + 3.0 + 1.5, abs=1.5)
    assert 0.25 <= first < 5.0


def test_run_times_scale_with_the_work_when_they_do() -> None:
    small = GenerationRequest(prompt="x", num_inference_steps=20, img_width=512, img_height=1000)
    model = DurationModel()
    for steps in (20, 40, 80) * 4:
        request = GenerationRequest(prompt="x", num_inference_steps=steps, img_width=1000, img_height=1000)
        model.learn(request, {"queue_time": 1.0, "inference_time": 0.5 * steps})
    assert statistics.median(model.run_candidates(small)) == pytest.approx(5.12)  # about half the pixels
    assert statistics.median(model.run_candidates(REQUEST)) == pytest.approx(10.0)


def test_run_times_that_ignore_the_work_are_learnt_as_durations() -> None:
    model = DurationModel()
    rng = random.Random(3)
    for _ in range(40):
        steps = rng.choice((20, 40, 80))
        request = GenerationRequest(prompt="x", num_inference_steps=steps, img_width=1000, img_height=1000)
        model.learn(request, {"queue_time": 1.0, "inference_time": rng.uniform(20, 40)})
    tiny = GenerationRequest(prompt="x", num_inference_steps=20, img_width=512, img_height=512)
    runs = model.run_candidates(tiny)
    assert min(runs) >= 20 and max(runs) <= 40


def test_the_priors_give_way_once_enough_jobs_have_finished() -> None:
    few = taught([0.5] * (SAMPLES_TRUSTED - 1), [30.0] * (SAMPLES_TRUSTED - 1))
    enough = taught([0.5] * SAMPLES_TRUSTED, [30.0] * SAMPLES_TRUSTED)
    assert min(few.run_candidates(REQUEST)) < 30.0
    assert set(enough.run_candidates(REQUEST)) == {30.0}
    assert set(enough.queue_candidates()) == {0.5}


def test_odd_metrics_teach_nothing() -> None:
    model = DurationModel()
    for metrics in ({}, {"inference_time": "soon"}, {"inference_time": -1}, {"queue_time": math.inf}):
        model.learn(REQUEST, metrics)
    assert not model.run_samples and not model.queue_samples


# --- bounds -----------------------------------------------------------------------------------------


def test_no_delay_reaches_past_the_deadline() -> None:
    polls = schedule(steady(run=100.0), deadline=30.0, max_interval=60.0)
    assert polls.next_delay(SUBMITTED_AT) == pytest.approx(30.0)
    assert polls.next_delay(SUBMITTED_AT + 29.0) == pytest.approx(1.0)
    assert polls.next_delay(SUBMITTED_AT + 31.0) == 0.0
    assert polls.expired(SUBMITTED_AT + 30.0)


def test_a_busy_budget_checks_once_the_job_has_most_likely_ended() -> None:
    # Queue times learnt between 0 and 4 s; runs of exactly 10 s: ends between 10 and 14 s.
    model = taught([4.0 * i / 19 for i in range(20)], [10.0] * 20)
    relaxed, busy = schedule(model, max_interval=30.0), schedule(model, max_interval=30.0)
    assert relaxed.next_delay(SUBMITTED_AT) < 2.0  # looks for the start
    late = busy.next_delay(SUBMITTED_AT, busy=1.0)
    assert 13.0 <= late <= 14.0  # the 90th percentile of the ends
    assert schedule(model, max_interval=6.0).next_delay(SUBMITTED_AT, busy=1.0) == 6.0


def test_a_fixed_schedule_checks_at_its_interval_whatever_is_known() -> None:
    polls = FixedPollSchedule(1.0, submitted_at=SUBMITTED_AT, deadline_at=SUBMITTED_AT + 10.0)
    assert polls.next_delay(SUBMITTED_AT) == 1.0
    polls.observe(PROCESSING, SUBMITTED_AT + 1.0)
    assert polls.next_delay(SUBMITTED_AT + 1.0) == 1.0
    assert polls.next_delay(SUBMITTED_AT + 9.5) == pytest.approx(0.5)
    assert polls.expected_end(SUBMITTED_AT) is None


# --- the claims, simulated --------------------------------------------------------------------------


@dataclass
class Outcome:
    checks: int
    late: float  # from the end to the check that saw it


def simulate(
    new_schedule: Callable[[], PollSchedule | FixedPollSchedule], queue: float, run: float
) -> Outcome:
    """One job that queues for `queue` s and runs `run` s, checked as the schedule says."""
    polls = new_schedule()
    at, checks = SUBMITTED_AT, 0
    while True:
        at += polls.next_delay(at)
        checks += 1
        elapsed = at - SUBMITTED_AT
        state = QUEUED if elapsed < queue else PROCESSING if elapsed < queue + run else COMPLETED
        polls.observe(state, at)
        if state is COMPLETED:
            return Outcome(checks, elapsed - queue - run)


def compare(
    draw: Callable[[random.Random], tuple[float, float]],
    request: GenerationRequest,
    *,
    model: DurationModel | None = None,
    seed: int = 11,
) -> tuple[list[Outcome], list[Outcome]]:
    """The learnt schedule and a fixed 1 s poller on the same 400 draws, after 64 jobs to learn from (or
    with `model` as it is)."""
    rng = random.Random(seed)
    if model is None:
        model = DurationModel()
        for _ in range(64):
            queue, run = draw(rng)
            model.learn(request, {"queue_time": queue, "inference_time": run})
    adaptive, fixed = [], []
    for _ in range(400):
        queue, run = draw(rng)
        adaptive.append(simulate(lambda: schedule(model, request=request), queue, run))
        fixed.append(
            simulate(
                lambda: FixedPollSchedule(1.0, submitted_at=SUBMITTED_AT, deadline_at=SUBMITTED_AT + 600),
                queue,
                run,
            )
        )
    return adaptive, fixed


def test_predictable_jobs_are_noticed_sooner_with_well_under_two_thirds_of_the_checks() -> None:
    # 30 steps at 1024² x 2 images: 12 s at 0.2 s a step, ±5 %, after an exponential queue of mean 2 s.
    request = GenerationRequest(prompt="x", num_inference_steps=30, samples=2)

    def draw(rng: random.Random) -> tuple[float, float]:
        return rng.expovariate(1 / 2.0), 12.0 * rng.uniform(0.95, 1.05)

    adaptive, fixed = compare(draw, request)
    late = statistics.fmean(o.late for o in adaptive)
    assert late <= 0.15 and statistics.fmean(o.late for o in fixed) > 0.4
    assert statistics.fmean(o.checks for o in adaptive) <= 0.6 * statistics.fmean(o.checks for o in fixed)


def test_a_burst_sent_after_one_finished_job_costs_fewer_checks_than_a_fixed_poller() -> None:
    # A burst at start-up: one job has finished (queued 1.4 s, ran 5 s) when every schedule is made, and
    # none of the burst's own jobs finishes before they are all under way. Runs vary little, queues a lot.
    request = GenerationRequest(prompt="x", num_inference_steps=25)

    def draw(rng: random.Random) -> tuple[float, float]:
        return rng.expovariate(1 / 2.0), 5.0 * rng.uniform(0.95, 1.05)

    adaptive, fixed = compare(draw, request, model=taught([1.4], [5.0], request), seed=3)
    assert statistics.fmean(o.late for o in adaptive) <= 0.2
    assert statistics.fmean(o.checks for o in adaptive) <= 0.9 * statistics.fmean(o.checks for o in fixed)


def test_unpredictable_jobs_are_noticed_as_soon_with_far_fewer_checks() -> None:
    def draw(rng: random.Random) -> tuple[float, float]:
        return rng.expovariate(1 / 2.0), rng.uniform(20.0, 40.0)

    adaptive, fixed = compare(draw, REQUEST)
    assert statistics.fmean(o.late for o in adaptive) <= statistics.fmean(o.late for o in fixed)
    assert statistics.fmean(o.checks for o in adaptive) <= 0.8 * statistics.fmean(o.checks for o in fixed)


def test_a_job_put_back_in_the_queue_is_not_checked_ever_faster() -> None:
    polls = schedule(taught([4.0 * i / 19 for i in range(20)], [10.0] * 20))
    polls.observe(QUEUED, SUBMITTED_AT + 1.0)
    polls.observe(PROCESSING, SUBMITTED_AT + 3.0)
    polls.observe(QUEUED, SUBMITTED_AT + 5.0)  # requeued: it starts again, no sooner than now
    end = polls.expected_end(SUBMITTED_AT + 5.0)
    assert end is not None and end > SUBMITTED_AT + 15.0
    at, gaps = SUBMITTED_AT + 5.0, []
    for _ in range(20):
        polls.observe(QUEUED, at)
        gap = polls.next_delay(at)
        gaps.append(gap)
        at += gap
    assert min(gaps[5:]) >= 0.5 and gaps[-1] >= gaps[5]


def test_a_fixed_schedule_never_guesses_that_a_job_has_ended() -> None:
    polls = FixedPollSchedule(1.0, submitted_at=SUBMITTED_AT, deadline_at=SUBMITTED_AT + 10.0)
    assert not polls.likely_ended(SUBMITTED_AT + 9.0)


def test_a_schedule_without_a_least_gap_is_refused() -> None:
    with pytest.raises(ValueError):
        schedule(min_interval=0.0)
