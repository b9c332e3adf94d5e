"""The polling schedule alone: observations and made-up times in, delays out; no sleeping, no sockets."""

from __future__ import annotations

import random

import pytest

from services.request import GenerationRequest
from services.segmind import DurationModel, SegmindState, next_poll_delay
from services.segmind.schedule import FIRST_POLL_DELAY, PollSchedule

QUEUED = SegmindState.QUEUED
PROCESSING = SegmindState.PROCESSING
COMPLETED = SegmindState.COMPLETED

SUBMITTED_AT = 100.0
# 20 steps x 1 megapixel x 1 sample = 20 work units; at 0.5 s each the job is expected to run 10 s.
REQUEST = GenerationRequest(prompt="x", num_inference_steps=20, img_width=1000, img_height=1000)


def durations() -> DurationModel:
    return DurationModel(seconds_per_unit=0.5, queue_seconds=2.0)


def schedule(
    *,
    model: DurationModel | None = None,
    deadline: float = 600.0,
    min_interval: float = 1.0,
    max_interval: float = 10.0,
) -> PollSchedule:
    return PollSchedule(
        model or durations(),
        REQUEST,
        submitted_at=SUBMITTED_AT,
        deadline_at=SUBMITTED_AT + deadline,
        min_interval=min_interval,
        max_interval=max_interval,
    )


def test_the_first_check_comes_soon_after_the_submit_whatever_the_estimate() -> None:
    slow = DurationModel(seconds_per_unit=50.0, queue_seconds=300.0)
    for polls in (schedule(), schedule(model=slow)):
        assert polls.state is None
        assert polls.next_delay(SUBMITTED_AT) == FIRST_POLL_DELAY
        # Until a check has answered, there is nothing to estimate from.
        assert polls.next_delay(SUBMITTED_AT + 0.3) == FIRST_POLL_DELAY


def test_while_queued_the_delay_is_half_the_expected_queue_and_run_left() -> None:
    polls = schedule()
    polls.observe(QUEUED, SUBMITTED_AT + 0.75)
    # 1.25 s of expected queue left + 10 s of inference, halved.
    assert polls.next_delay(SUBMITTED_AT + 0.75) == pytest.approx(5.625)
    assert polls.state is QUEUED
    assert polls.processing_since is None


def test_a_long_queue_spreads_the_checks_out_up_to_the_longest_interval() -> None:
    polls = schedule()
    polls.observe(QUEUED, SUBMITTED_AT + 12.0)
    # Past the expected queue only the inference is left (5 s), but half the time waited (6 s) wins.
    assert polls.next_delay(SUBMITTED_AT + 12.0) == pytest.approx(6.0)
    polls.observe(QUEUED, SUBMITTED_AT + 30.0)
    assert polls.next_delay(SUBMITTED_AT + 30.0) == 10.0


def test_queued_to_processing_dates_the_start_from_the_expected_queue_time() -> None:
    polls = schedule()
    polls.observe(QUEUED, SUBMITTED_AT + 0.75)
    polls.observe(PROCESSING, SUBMITTED_AT + 6.4)
    # It started between the last QUEUED answer (0.75 s) and now (6.4 s): at the expected 2 s.
    assert polls.processing_since == pytest.approx(SUBMITTED_AT + 2.0)
    # 10 s expected, 4.4 s of it done: half of the 5.6 s left.
    assert polls.next_delay(SUBMITTED_AT + 6.4) == pytest.approx(2.8)


def test_a_late_queued_answer_moves_the_start_after_it() -> None:
    polls = schedule()
    polls.observe(QUEUED, SUBMITTED_AT + 0.75)
    polls.observe(QUEUED, SUBMITTED_AT + 4.0)
    polls.observe(PROCESSING, SUBMITTED_AT + 10.0)
    assert polls.processing_since == pytest.approx(SUBMITTED_AT + 4.0)
    assert polls.next_delay(SUBMITTED_AT + 10.0) == pytest.approx(2.0)


def test_processing_at_the_first_check_started_no_later_than_it_was_seen() -> None:
    polls = schedule()
    polls.observe(PROCESSING, SUBMITTED_AT + 0.75)
    assert polls.processing_since == pytest.approx(SUBMITTED_AT + 0.75)
    polls = schedule()
    polls.observe(PROCESSING, SUBMITTED_AT + 5.0)
    assert polls.processing_since == pytest.approx(SUBMITTED_AT + 2.0)


def test_further_processing_answers_keep_the_start() -> None:
    polls = schedule()
    polls.observe(PROCESSING, SUBMITTED_AT + 5.0)
    polls.observe(PROCESSING, SUBMITTED_AT + 8.0)
    assert polls.processing_since == pytest.approx(SUBMITTED_AT + 2.0)
    assert polls.next_delay(SUBMITTED_AT + 8.0) == pytest.approx(2.0)


def test_near_the_expected_finish_the_checks_tighten_to_the_shortest_interval() -> None:
    polls = schedule()
    polls.observe(PROCESSING, SUBMITTED_AT + 5.0)
    assert polls.next_delay(SUBMITTED_AT + 11.0) == 1.0  # 1 s left, halved, is below the floor
    assert polls.next_delay(SUBMITTED_AT + 12.0) == 1.0  # due now


def test_a_job_running_past_its_estimate_is_checked_ever_less_often() -> None:
    polls = schedule()
    polls.observe(PROCESSING, SUBMITTED_AT + 5.0)
    # Started at 2 s, expected to finish at 12 s: a quarter of the overrun is added to the floor.
    assert polls.next_delay(SUBMITTED_AT + 16.0) == pytest.approx(2.0)
    assert polls.next_delay(SUBMITTED_AT + 32.0) == pytest.approx(6.0)
    assert polls.next_delay(SUBMITTED_AT + 60.0) == 10.0


def test_no_delay_reaches_past_the_deadline() -> None:
    polls = schedule(deadline=5.0)
    polls.observe(QUEUED, SUBMITTED_AT + 0.75)
    assert polls.next_delay(SUBMITTED_AT + 0.75) == pytest.approx(4.25)  # not the 5.625 s estimate
    assert polls.time_left(SUBMITTED_AT + 0.75) == pytest.approx(4.25)
    assert not polls.expired(SUBMITTED_AT + 4.9)
    assert polls.expired(SUBMITTED_AT + 5.0)
    assert polls.next_delay(SUBMITTED_AT + 6.0) == 0.0


def test_the_first_delay_is_capped_by_a_short_deadline_too() -> None:
    polls = schedule(deadline=0.5)
    assert polls.next_delay(SUBMITTED_AT) == pytest.approx(0.5)


def test_the_queue_estimate_is_read_live_and_the_inference_estimate_once() -> None:
    model = durations()
    polls = schedule(model=model)
    polls.observe(QUEUED, SUBMITTED_AT + 0.75)
    # Other jobs finishing while this one waits teach the shared model.
    model.queue_seconds = 6.0
    model.seconds_per_unit = 5.0
    # 5.25 s of queue left + the 10 s of inference estimated when the wait began, halved.
    assert polls.next_delay(SUBMITTED_AT + 0.75) == pytest.approx(7.625)
    polls.observe(PROCESSING, SUBMITTED_AT + 10.0)
    assert polls.processing_since == pytest.approx(SUBMITTED_AT + 6.0)


def test_the_interval_bounds_are_the_callers() -> None:
    polls = schedule(min_interval=3.0, max_interval=4.0)
    polls.observe(PROCESSING, SUBMITTED_AT + 11.0)
    assert polls.next_delay(SUBMITTED_AT + 11.0) == 3.0
    polls = schedule(min_interval=3.0, max_interval=4.0)
    polls.observe(QUEUED, SUBMITTED_AT + 0.75)
    assert polls.next_delay(SUBMITTED_AT + 0.75) == 4.0


def test_a_final_state_is_recorded() -> None:
    polls = schedule()
    polls.observe(PROCESSING, SUBMITTED_AT + 5.0)
    polls.observe(COMPLETED, SUBMITTED_AT + 12.0)
    assert polls.state is COMPLETED
    assert polls.processing_since == pytest.approx(SUBMITTED_AT + 2.0)


def _inline_loop_delays(
    model: DurationModel,
    observations: list[tuple[float, SegmindState, float, float | None]],
    *,
    deadline_at: float,
    min_interval: float,
    max_interval: float,
) -> list[float]:
    """The bookkeeping `SegmindClient.wait` did inline before `PollSchedule`, kept as the reference.

    Each observation is (asked_at, state, seen_at, queue_seconds learnt meanwhile or None).
    """
    expected_inference = model.expected_inference(REQUEST)
    state: SegmindState | None = None
    processing_since: float | None = None
    last_seen_queued = SUBMITTED_AT
    delays = []
    for asked_at, new_state, seen_at, learnt in observations:
        now = asked_at
        delay = next_poll_delay(
            state=state,
            since_submit=now - SUBMITTED_AT,
            processing_for=None if processing_since is None else now - processing_since,
            expected_queue=model.queue_seconds,
            expected_inference=expected_inference,
            min_interval=min_interval,
            max_interval=max_interval,
        )
        delays.append(min(delay, deadline_at - now))
        if learnt is not None:
            model.queue_seconds = learnt
        if new_state is SegmindState.QUEUED:
            last_seen_queued = seen_at
        if new_state is not state:
            if new_state is SegmindState.PROCESSING:
                expected_start = SUBMITTED_AT + model.queue_seconds
                processing_since = min(seen_at, max(last_seen_queued, expected_start))
            state = new_state
    return delays


@pytest.mark.parametrize("seed", range(40))
def test_the_schedule_gives_the_delays_the_inline_loop_gave(seed: int) -> None:
    rng = random.Random(seed)
    deadline_at = SUBMITTED_AT + rng.uniform(5.0, 120.0)
    min_interval, max_interval = rng.choice([(0.5, 10.0), (1.2, 10.0), (6.0, 8.0)])
    observations = []
    at = SUBMITTED_AT
    state = QUEUED
    while True:
        asked_at = at + rng.uniform(0.0, 3.0)
        if asked_at >= deadline_at:
            break
        seen_at = asked_at + rng.uniform(0.0, 12.0)
        # Any order of states, odd ones included, and now and then a queue time learnt from another job.
        state = rng.choices([QUEUED, PROCESSING, state], weights=[1, 2, 4])[0]
        learnt = rng.uniform(0.0, 8.0) if rng.random() < 0.2 else None
        observations.append((asked_at, state, seen_at, learnt))
        at = seen_at
    reference_model = DurationModel(seconds_per_unit=rng.uniform(0.01, 1.0), queue_seconds=rng.uniform(0, 5))
    model = DurationModel(reference_model.seconds_per_unit, reference_model.queue_seconds)
    expected = _inline_loop_delays(
        reference_model,
        observations,
        deadline_at=deadline_at,
        min_interval=min_interval,
        max_interval=max_interval,
    )
    polls = PollSchedule(
        model,
        REQUEST,
        submitted_at=SUBMITTED_AT,
        deadline_at=deadline_at,
        min_interval=min_interval,
        max_interval=max_interval,
    )
    delays = []
    for asked_at, observed, seen_at, learnt in observations:
        delays.append(polls.next_delay(asked_at))
        if learnt is not None:
            model.queue_seconds = learnt
        polls.observe(observed, seen_at)
    assert delays == expected
