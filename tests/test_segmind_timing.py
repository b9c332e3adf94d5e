"""Timing models, the plan's rate limit and ahead-of-time rendering of the local Segmind server.

Timelines are checked through the scheduling functions or a server on a hand-moved clock, so nothing here
waits for a job's real duration.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import random
import statistics
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from devtools.fakes.segmind.__main__ import parse_args, settings_from_args
from devtools.fakes.segmind.images import render_sample
from devtools.fakes.segmind.jobs import (
    ImageStore,
    Job,
    WorkerSchedule,
    draw_processing_seconds,
    draw_queue_seconds,
    inference_seconds,
)
from devtools.fakes.segmind.params import GenerationParams, parse_generation_params
from devtools.fakes.segmind.server import SegmindServer, SegmindServerSettings
from devtools.fakes.segmind.settings import apply_settings_json, settings_to_json

KEY = "timing-key"
MODEL = "sdxl1.0-dreamshaper"
REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"img_width": 512, "img_height": 512, "num_inference_steps": 20}


class ManualClock:
    """A clock that only moves when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def params(**overrides: Any) -> GenerationParams:
    return parse_generation_params({"prompt": "a lighthouse", "seed": 7, **overrides})


def schedule_many(server: SegmindServer, count: int, **overrides: Any) -> list[Job]:
    return [
        server._schedule_job(params(**overrides), queue_seconds=server.settings.queue_seconds)
        for _ in range(count)
    ]


def timeline(jobs: list[Job]) -> list[tuple[float, float, int]]:
    # Rounded: the same durations at another time of the clock differ in their last bits.
    return [
        (round(job.starts_at - job.submitted_at, 9), round(job.ends_at - job.starts_at, 9), job.seed)
        for job in jobs
    ]


# ---- queue time ----------------------------------------------------------------------------------


def test_fixed_queue_time_is_exact() -> None:
    rng = random.Random(1)
    assert [draw_queue_seconds(rng, 2.5, "fixed") for _ in range(3)] == [2.5, 2.5, 2.5]


def test_exponential_queue_time_has_the_configured_mean() -> None:
    rng = random.Random(11)
    draws = [draw_queue_seconds(rng, 2.0, "exponential") for _ in range(20_000)]
    assert min(draws) >= 0
    assert statistics.fmean(draws) == pytest.approx(2.0, rel=0.05)
    # An exponential's standard deviation equals its mean, unlike a fixed wait or a narrow jitter.
    assert statistics.pstdev(draws) == pytest.approx(2.0, rel=0.08)
    assert draw_queue_seconds(rng, 0.0, "exponential") == 0.0


def test_server_draws_exponential_queue_times_per_job() -> None:
    settings = SegmindServerSettings(
        queue_seconds=3.0, queue_distribution="exponential", workers=5_000, seed=5, seconds_per_step=0.01
    )
    jobs = schedule_many(SegmindServer(settings, clock=ManualClock()), 2_000)
    waits = [job.starts_at - job.submitted_at for job in jobs]
    assert statistics.fmean(waits) == pytest.approx(3.0, rel=0.1)
    assert len(set(waits)) == len(waits)

    fixed = SegmindServer(SegmindServerSettings(queue_seconds=3.0, workers=50), clock=ManualClock())
    assert {job.starts_at - job.submitted_at for job in schedule_many(fixed, 20)} == {3.0}


def test_workers_still_limit_random_queue_times() -> None:
    settings = SegmindServerSettings(
        queue_seconds=1.0, queue_distribution="exponential", workers=1, seed=3, seconds_per_step=0.05
    )
    clock = ManualClock(0.0)
    jobs = schedule_many(SegmindServer(settings, clock=clock), 200)
    # The same draws in the same order: each job's own queue time (no other draw happens here).
    rng = random.Random(3)
    drawn = [draw_queue_seconds(rng, 1.0, "exponential") for _ in jobs]
    for job, wait in zip(jobs, drawn, strict=True):
        assert job.starts_at >= job.submitted_at + wait - 1e-9
    intervals = sorted((job.starts_at, job.ends_at) for job in jobs)
    assert all(end <= next_start + 1e-9 for (_, end), (next_start, _) in itertools.pairwise(intervals))
    # One worker, 1 s a job: the backlog, not the queue draws, sets when the last one ends.
    assert max(job.ends_at for job in jobs) >= 200 * 1.0


def test_a_job_ready_sooner_uses_a_worker_idle_until_a_later_start() -> None:
    schedule = WorkerSchedule()
    assert schedule.reserve(1, earliest=10.0, duration=1.0) == 10.0
    assert schedule.reserve(1, earliest=0.0, duration=1.0) == 0.0  # the worker is idle until 10
    assert schedule.reserve(1, earliest=9.5, duration=1.0) == 11.0  # does not fit before 10
    assert schedule.reserve(1, earliest=1.0, duration=8.0) == 1.0  # exactly fills 1..9
    assert schedule.reserve(1, earliest=50.0, duration=100.0) == 50.0
    schedule.forget_before(100.0)  # the job running from 50 to 150 is still booked
    assert schedule.reserve(1, earliest=100.0, duration=1.0) == 150.0


def test_random_bookings_never_run_more_jobs_than_workers() -> None:
    rng = random.Random(13)
    for _ in range(300):
        workers = rng.randint(1, 5)
        schedule = WorkerSchedule()
        booked = []
        for _ in range(rng.randint(1, 40)):
            earliest, duration = rng.uniform(0, 20), rng.choice([0.0, rng.uniform(0.1, 5)])
            start = schedule.reserve(workers, earliest, duration)
            assert start >= earliest
            if duration:
                booked.append((start, start + duration))
        # Ends sort before starts at the same instant: a worker may take a job the moment it frees up.
        events = sorted([(start, 1) for start, _ in booked] + [(end, -1) for _, end in booked])
        assert max(itertools.accumulate(step for _, step in events), default=0) <= workers


def test_many_workers_take_jobs_at_once() -> None:
    schedule = WorkerSchedule()
    assert [schedule.reserve(3, earliest=0.0, duration=5.0) for _ in range(4)] == [0.0, 0.0, 0.0, 5.0]


# ---- processing time -----------------------------------------------------------------------------


def test_jitter_stays_within_its_bounds_and_centres_on_the_parameters() -> None:
    job = params(img_width=1024, img_height=1024, num_inference_steps=30)
    base = inference_seconds(job, 0.1)
    rng = random.Random(2)
    draws = [draw_processing_seconds(rng, job, seconds_per_step=0.1, jitter=0.3) for _ in range(5_000)]
    assert all(0.7 * base <= seconds <= 1.3 * base for seconds in draws)
    assert min(draws) < 0.72 * base and max(draws) > 1.28 * base
    assert statistics.fmean(draws) == pytest.approx(base, rel=0.02)
    assert draw_processing_seconds(rng, job, seconds_per_step=0.1) == base


def test_inference_range_ignores_the_parameters() -> None:
    rng = random.Random(4)
    small = params(**SMALL)
    big = params(img_width=2048, img_height=2048, num_inference_steps=100, samples=4)
    draws = [
        draw_processing_seconds(rng, job, seconds_per_step=1.0, jitter=0.5, fixed_range=(20.0, 40.0))
        for job in (small, big) * 1_000
    ]
    assert all(20.0 <= seconds <= 40.0 for seconds in draws)
    assert min(draws) < 21.0 and max(draws) > 39.0
    assert statistics.fmean(draws[0::2]) == pytest.approx(statistics.fmean(draws[1::2]), rel=0.05)


def test_server_jobs_follow_jitter_and_range() -> None:
    jittered = SegmindServer(
        SegmindServerSettings(seconds_per_step=0.1, inference_jitter=0.25, workers=100, seed=9),
        clock=ManualClock(),
    )
    base = inference_seconds(params(**SMALL), 0.1)
    durations = [duration for _, duration, _ in timeline(schedule_many(jittered, 50, **SMALL))]
    assert all(0.75 * base <= duration <= 1.25 * base for duration in durations)
    assert len(set(durations)) == 50

    ranged = SegmindServer(
        SegmindServerSettings(inference_range=(20.0, 40.0), workers=100, seed=9), clock=ManualClock()
    )
    durations = [duration for _, duration, _ in timeline(schedule_many(ranged, 50, **SMALL))]
    assert all(20.0 <= duration <= 40.0 for duration in durations)


# ---- seed ----------------------------------------------------------------------------------------


def random_setup(seed: int | None) -> SegmindServerSettings:
    return SegmindServerSettings(
        queue_seconds=1.0, queue_distribution="exponential", inference_jitter=0.5, workers=3, seed=seed
    )


def test_a_seed_makes_a_run_reproducible() -> None:
    def run(seed: int | None) -> list[tuple[float, float, int]]:
        return timeline(schedule_many(SegmindServer(random_setup(seed), clock=ManualClock()), 30, seed=-1))

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert run(None) != run(None)


async def test_setting_the_seed_through_the_control_api_reseeds() -> None:
    clock = ManualClock()
    server = SegmindServer(random_setup(None), clock=clock)
    await server.start()
    try:
        async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as http:

            async def submit_three() -> list[tuple[float, float, int]]:
                ids = []
                for _ in range(3):
                    body = {"prompt": "a lighthouse", "seed": -1, **SMALL}
                    async with http.post(f"{server.base_url}/v2/{MODEL}", json=body) as response:
                        ids.append((await response.json())["request_id"])
                return timeline([server._jobs[request_id] for request_id in ids])

            async def reseed() -> None:
                async with http.post(f"{server.base_url}/_control/settings", json={"seed": 8}) as response:
                    assert response.status == 200
                    assert (await response.json())["seed"] == 8

            await reseed()
            first = await submit_three()
            clock.now += 100.0  # past every booking, so the workers do not shape the second run
            await reseed()  # the same seed again restarts the draws
            second = await submit_three()
    finally:
        await server.stop()
    fresh = SegmindServer(random_setup(8), clock=ManualClock())
    assert first == second == timeline(schedule_many(fresh, 3, seed=-1, **SMALL))


# ---- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"queue_distribution": "normal"}, 'queue_distribution must be "fixed" or "exponential"'),
        ({"inference_jitter": 1}, "inference_jitter must be a number >= 0 and < 1"),
        ({"inference_jitter": -0.1}, "inference_jitter must be a number >= 0 and < 1"),
        ({"inference_jitter": True}, "inference_jitter must be a number"),
        ({"inference_range": [40, 20]}, "inference_range must be finite with 0 <= low <= high"),
        ({"inference_range": [-1, 2]}, "inference_range must be finite with 0 <= low <= high"),
        ({"inference_range": [1, 1e999]}, "inference_range must be finite"),
        ({"inference_range": [1, 2, 3]}, "inference_range must be null or a list of two numbers"),
        ({"inference_range": 5}, "inference_range must be null or a list of two numbers"),
        ({"seed": 1.5}, "seed must be null or an integer"),
        ({"seed": "7"}, "seed must be null or an integer"),
        ({"queue_seconds": 1e999}, "queue_seconds must be a finite number >= 0"),
    ],
)
def test_bad_timing_settings_are_refused_with_the_reason(changes: dict[str, Any], message: str) -> None:
    settings = SegmindServerSettings()
    before = settings_to_json(settings)
    with pytest.raises(ValueError, match=message):
        apply_settings_json(settings, {"workers": 5, **changes})
    assert settings_to_json(settings) == before


def test_timing_settings_round_trip_through_json() -> None:
    settings = SegmindServerSettings()
    assert {
        name: settings_to_json(settings)[name]
        for name in ("queue_distribution", "inference_jitter", "inference_range", "seed")
    } == {"queue_distribution": "fixed", "inference_jitter": 0.0, "inference_range": None, "seed": None}
    changes = {"queue_distribution": "exponential", "inference_jitter": 0.2, "inference_range": [20, 40]}
    apply_settings_json(settings, {**changes, "seed": 3})
    assert settings.inference_range == (20.0, 40.0)
    assert settings_to_json(settings) | changes == settings_to_json(settings)
    assert settings_to_json(settings)["inference_range"] == [20.0, 40.0]
    apply_settings_json(settings, {"inference_range": None, "seed": None})
    assert (settings.inference_range, settings.seed) == (None, None)


def test_the_constructor_checks_timing_settings_too() -> None:
    with pytest.raises(ValueError, match="inference_jitter"):
        SegmindServerSettings(inference_jitter=1.5)
    with pytest.raises(ValueError, match="inference_range"):
        SegmindServerSettings(inference_range=(3.0, 1.0))
    assert SegmindServerSettings(inference_range=(1, 2)).inference_range == (1.0, 2.0)


async def test_control_api_refuses_a_bad_range() -> None:
    server = SegmindServer()
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"{server.base_url}/_control/settings"
            async with http.post(url, json={"inference_range": [5, 1]}) as response:
                assert response.status == 400
                assert "inference_range" in (await response.json())["error"]
    finally:
        await server.stop()
    assert server.settings.inference_range is None


# ---- command line --------------------------------------------------------------------------------


async def test_help_lists_the_timing_flags_with_their_defaults() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtools.fakes.segmind",
        "--help",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    text = " ".join(out.decode().split())
    for flag in ("--queue-distribution {fixed,exponential}", "--inference-jitter J", "--seed SEED"):
        assert flag in text
    assert "--inference-range LOW HIGH" in text
    assert "(default: fixed)" in text and "(default: 0.0)" in text
    assert "(default: off" in text and "(default: a random seed)" in text


def test_timing_flags_reach_the_settings() -> None:
    args = parse_args(
        [
            *("--queue-distribution", "exponential"),
            *("--inference-jitter", "0.2"),
            *("--inference-range", "20", "40"),
            *("--seed", "12"),
        ]
    )
    settings = settings_from_args(args)
    assert (settings.queue_distribution, settings.inference_jitter) == ("exponential", 0.2)
    assert (settings.inference_range, settings.seed) == ((20.0, 40.0), 12)
    defaults = settings_from_args(parse_args([]))
    assert (defaults.queue_distribution, defaults.inference_range, defaults.seed) == ("fixed", None, None)


def test_bad_timing_flags_stop_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--inference-jitter", "1"])
    assert "inference_jitter must be a number >= 0 and < 1" in capsys.readouterr().err


# ---- the plan's rate limit -----------------------------------------------------------------------


@pytest.fixture
async def limited() -> AsyncIterator[tuple[SegmindServer, ManualClock]]:
    clock = ManualClock()
    server = SegmindServer(
        SegmindServerSettings(requests_per_minute=3, queue_seconds=0.0, seconds_per_step=0.001), clock=clock
    )
    await server.start()
    yield server, clock
    await server.stop()


async def test_keyed_calls_count_downloads_do_not_and_429s_are_not_counted(
    limited: tuple[SegmindServer, ManualClock],
) -> None:
    server, clock = limited
    base = server.base_url
    async with (
        aiohttp.ClientSession(headers={"x-api-key": KEY}) as http,
        aiohttp.ClientSession() as anonymous,
    ):
        async with http.post(f"{base}/v2/{MODEL}", json={"prompt": "a lighthouse", **SMALL}) as response:
            job = await response.json()  # 1, at t=0
        clock.now += 1.0
        async with http.get(job["response_url"]) as response:  # 2, at t=1
            output = (await response.json())["output"]
        for _ in range(5):
            async with anonymous.get(output) as response:
                assert response.status == 200  # downloads come from Segmind's CDN, no key, not counted
        clock.now += 1.0
        async with http.get(job["status_url"]) as response:  # 3, at t=2
            assert response.status == 200

        clock.now += 8.0  # t=10: the window holds t=0, 1, 2
        before = datetime.now(UTC)
        for target in (job["status_url"], job["response_url"]):
            async with http.get(target) as response:
                assert response.status == 429
                assert await response.json() == {"error": "Rate limit exceeded"}
                reset_at = datetime.fromisoformat(response.headers["x-rate-limit-reset-at-utc"])
            # When the oldest request (t=0) ages out: 50 s after t=10.
            assert reset_at.utcoffset() is not None
            assert 49.5 < (reset_at - before).total_seconds() < 51
        async with http.post(f"{base}/v1/{MODEL}", json={"prompt": "a lighthouse", **SMALL}) as response:
            assert response.status == 429
        clock.now += 49.9  # t=59.9, still within the minute
        async with http.get(job["status_url"]) as response:
            assert response.status == 429

        # t=60: the first request ages out. Had the four 429s counted, the window would still be full.
        clock.now = 1060.0
        async with http.get(job["status_url"]) as response:
            assert response.status == 200
        async with http.get(job["status_url"]) as response:
            assert response.status == 429
            reset_at = datetime.fromisoformat(response.headers["x-rate-limit-reset-at-utc"])
        assert 0 < (reset_at - datetime.now(UTC)).total_seconds() < 1.5  # t=1 ages out at t=61

    assert server.stats.rate_limited == 5
    assert [record.status for record in server.stats.requests_to("status")] == [200, 429, 429, 200, 429]
    assert server.stats.to_json()["rate_limited"] == 5
    server.stats.reset()
    assert server.stats.rate_limited == 0


async def test_the_v1_call_counts_against_the_limit(limited: tuple[SegmindServer, ManualClock]) -> None:
    server, _ = limited
    async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as http:
        for _ in range(3):
            async with http.post(
                f"{server.base_url}/v1/{MODEL}", json={"prompt": "a lighthouse", **SMALL}
            ) as response:
                assert response.status == 200
        async with http.post(
            f"{server.base_url}/v2/{MODEL}", json={"prompt": "a lighthouse", **SMALL}
        ) as response:
            assert response.status == 429
    assert server.stats.rate_limited == 1
    assert server.stats.submits == []


async def test_an_injected_429_is_not_counted_as_the_plan_limit(
    limited: tuple[SegmindServer, ManualClock],
) -> None:
    server, _ = limited
    server.inject("rate_limit", target="submit", reset_after=1.0)
    async with (
        aiohttp.ClientSession(headers={"x-api-key": KEY}) as http,
        http.post(f"{server.base_url}/v2/{MODEL}", json={"prompt": "x"}) as response,
    ):
        assert response.status == 429
    assert server.stats.rate_limited == 0
    assert [record.status for record in server.stats.requests] == [429]


# ---- rendering ahead -----------------------------------------------------------------------------


async def test_outputs_are_rendered_before_the_job_completes() -> None:
    # 20 steps at 512x512 and 0.2 s a step: 1 s of processing, far longer than a 512x512 render (the
    # test ends as soon as the outputs are there).
    server = SegmindServer(SegmindServerSettings(queue_seconds=0.05, seconds_per_step=0.2))
    await server.start()
    try:
        async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as http:
            body = {"prompt": "a lighthouse", "samples": 2, **SMALL}
            async with http.post(f"{server.base_url}/v2/{MODEL}", json=body) as response:
                request_id = (await response.json())["request_id"]
            job = server._jobs[request_id]
            for _ in range(500):
                if server.clock() >= job.ends_at or len(server._images._unserved) == 2:
                    break
                await asyncio.sleep(0.01)
            assert server.clock() < job.ends_at, "the job ended before its outputs were rendered"
            assert len(server._images._unserved) == 2
    finally:
        await server.stop()
    assert not any(record.target == "output" for record in server.stats.requests)


def image_job(number: int) -> Job:
    # One seed for all: the outputs have the same size, so the byte limit below is exact.
    return Job(
        request_id=f"job-{number}",
        params=params(**SMALL),
        seed=7,
        submitted_at=0.0,
        starts_at=0.0,
        ends_at=0.0,
    )


async def test_the_cache_evicts_served_outputs_first() -> None:
    probe = ImageStore()
    size = len(await probe.prepare(image_job(0), 0))
    store = ImageStore(max_bytes=int(size * 3.5))
    jobs = [image_job(number) for number in range(1, 6)]
    for job in jobs[:3]:
        await store.prepare(job, 0)
    await store.sample(jobs[0], 0)
    await store.prepare(jobs[3], 0)  # over the limit: the served output goes, the unserved stay
    assert set(store._unserved) == {(job.request_id, 0) for job in jobs[1:4]}
    assert store._served == {}
    await store.prepare(jobs[4], 0)  # nothing served left: the oldest unserved goes
    assert set(store._unserved) == {(job.request_id, 0) for job in jobs[2:5]}
    assert store.cached_bytes <= size * 3.5
    assert await store.sample(jobs[1], 0) == await ImageStore().sample(jobs[1], 0)


@pytest.mark.parametrize(
    ("width", "height"), [(512, 512), (520, 776), (1024, 1024), (1024, 1536), (2048, 512)]
)
def test_rendered_outputs_are_whole_jpegs_fixed_by_seed_and_sample(width: int, height: int) -> None:
    def render(seed: int, index: int) -> bytes:
        return render_sample(
            seed=seed, index=index, samples=4, width=width, height=height, prompt="a lighthouse"
        )

    def pixels(data: bytes) -> bytes:
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.size) == ("JPEG", (width, height))
            image.load()  # decodes every row: a badly spliced file fails here
            return image.convert("RGB").resize((16, 16)).tobytes()

    assert render(42, 0) == render(42, 0)
    assert len({pixels(render(seed, index)) for seed in (42, 43) for index in range(4)}) == 8


def test_a_picture_too_small_for_its_caption_is_still_a_jpeg() -> None:
    data = render_sample(seed=1, index=0, samples=1, width=64, height=64, prompt="x " * 100)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.size == (64, 64)
