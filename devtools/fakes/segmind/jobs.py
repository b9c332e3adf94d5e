"""Jobs of the stand-in Segmind server, whose state is computed from the clock on every read.

A job is given its whole timeline when it is submitted (when it starts on a worker and when it ends),
so its state needs no background task: QUEUED before the start, PROCESSING until the end, then
COMPLETED, or FAILED at the start for a prompt the content policy blocks. The one background task
renders outputs ahead of their jobs' ends (`ImageStore`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import heapq
import logging
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from devtools.fakes.segmind.images import render_sample
from devtools.fakes.segmind.params import GenerationParams
from devtools.fakes.segmind.settings import QueueDistribution

log = logging.getLogger(__name__)

JobState = Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]
REFERENCE_PIXELS = 1024 * 1024
# Outputs of 1024x1024 JPEGs run 50-100 KB: this holds thousands of jobs' outputs not yet fetched.
IMAGE_CACHE_BYTES = 256 * 1024 * 1024
# Rendering starts at least this long before a job ends, so that a backlog of renders is absorbed.
RENDER_LEAD_SECONDS = 5.0
MAX_RENDERER_NAP_SECONDS = 1.0
RAI_ERROR = "Request blocked by the content moderation (RAI) policy: the prompt contains a blocked term"


@dataclass(frozen=True)
class Job:
    request_id: str
    params: GenerationParams
    seed: int  # the concrete seed (a requested -1 is replaced at submit)
    submitted_at: float
    starts_at: float
    ends_at: float
    failure: str | None = None

    @property
    def finished_at(self) -> float:
        # A blocked job fails the moment a worker picks it up.
        return self.starts_at if self.failure else self.ends_at

    def state_at(self, now: float) -> JobState:
        if now < self.starts_at:
            return "QUEUED"
        if self.failure:
            return "FAILED"
        return "PROCESSING" if now < self.ends_at else "COMPLETED"

    def metrics(self) -> dict[str, float]:
        return {
            "inference_time": round(self.ends_at - self.starts_at, 4),
            "queue_time": round(self.starts_at - self.submitted_at, 4),
            "total_time": round(self.ends_at - self.submitted_at, 4),
        }


def inference_seconds(params: GenerationParams, seconds_per_step: float) -> float:
    """Step time scales with the pixel count and with the number of samples, as on a real GPU."""
    pixels = params.img_width * params.img_height / REFERENCE_PIXELS
    return seconds_per_step * params.num_inference_steps * pixels * params.samples


def draw_queue_seconds(rng: random.Random, queue_seconds: float, distribution: QueueDistribution) -> float:
    """How long a job waits before it may start: `queue_seconds` itself, or a draw with that mean."""
    if distribution == "exponential" and queue_seconds > 0:
        return rng.expovariate(1.0 / queue_seconds)
    return queue_seconds


def draw_processing_seconds(
    rng: random.Random,
    params: GenerationParams,
    *,
    seconds_per_step: float,
    jitter: float = 0.0,
    fixed_range: tuple[float, float] | None = None,
) -> float:
    """How long a job runs once started: from its parameters (± jitter), or anywhere in `fixed_range`."""
    if fixed_range is not None:
        low, high = fixed_range
        return rng.uniform(low, high)
    seconds = inference_seconds(params, seconds_per_step)
    # No draw without jitter, so that turning it on does not shift the other draws of existing setups.
    return seconds * rng.uniform(1.0 - jitter, 1.0 + jitter) if jitter else seconds


def find_blocked_word(prompt: str, blocked_words: Iterable[str]) -> str | None:
    """The first blocked word or phrase present as a whole word, ignoring case ("kid" spares "skid")."""
    for word in sorted(blocked_words):
        if word.strip() and re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", prompt, re.IGNORECASE):
            return word
    return None


class WorkerSchedule:
    """When each worker is next free, and the idle gaps it has before then.

    Timelines are fixed at submit, and with random queue times a job submitted later may be ready
    sooner than one already booked, so it may take a worker that stays idle until that job's start.
    A job takes the earliest start on any worker; among workers free by then, the one that frees up
    last, so that the others stay free longer. Both lookups are bisections: a burst of a thousand
    submits to a thousand workers stays in milliseconds.
    """

    def __init__(self) -> None:
        self._tails: list[tuple[float, int]] = []  # (free from, worker), sorted
        self._gaps: list[tuple[float, float, int]] = []  # (idle from, idle until, worker), sorted
        self._workers_made = 0
        self._forgotten_at = -math.inf

    def reserve(self, workers: int, earliest: float, duration: float) -> float:
        """Book `duration` seconds on a worker no sooner than `earliest`; return the start time."""
        self._resize(max(1, workers))
        fitting = bisect.bisect_right(self._tails, (earliest, math.inf)) - 1
        tail = self._tails[max(0, fitting)]
        start = max(earliest, tail[0])
        gap = self._fitting_gap(earliest, duration, start) if start > earliest else None
        if gap is None:
            self._tails.remove(tail)
            if start > tail[0]:
                bisect.insort(self._gaps, (tail[0], start, tail[1]))
            bisect.insort(self._tails, (start + duration, tail[1]))
            return start
        idle_from, idle_until, worker = gap
        start = max(earliest, idle_from)
        self._gaps.remove(gap)
        if start > idle_from:
            bisect.insort(self._gaps, (idle_from, start, worker))
        if idle_until > start + duration:
            bisect.insort(self._gaps, (start + duration, idle_until, worker))
        return start

    def forget_before(self, now: float) -> None:
        """Drop the gaps over by `now`: no job submitted from now on can start before `now`."""
        # Only memory and search time are at stake, so this runs once a second of the clock.
        if now - self._forgotten_at < 1.0:
            return
        self._forgotten_at = now
        self._gaps = [gap for gap in self._gaps if gap[1] > now]

    def _fitting_gap(
        self, earliest: float, duration: float, before: float
    ) -> tuple[float, float, int] | None:
        """The gap giving the earliest start sooner than `before`, if any."""
        best: tuple[float, float, int] | None = None
        for gap in self._gaps:
            if gap[0] >= before:
                break  # sorted by start: no later gap starts sooner
            start = max(earliest, gap[0])
            if start + duration <= gap[1] and start < before:
                best, before = gap, start
                if start == earliest:
                    break
        return best

    def _resize(self, workers: int) -> None:
        while len(self._tails) < workers:
            # A new worker has been idle forever: its first gap reaches back to the start of time.
            bisect.insort(self._tails, (-math.inf, self._workers_made))
            self._workers_made += 1
        if len(self._tails) > workers:
            # Keep the busiest workers so that jobs already booked stay accounted for.
            dropped = {worker for _, worker in self._tails[: len(self._tails) - workers]}
            del self._tails[: len(self._tails) - workers]
            self._gaps = [gap for gap in self._gaps if gap[2] not in dropped]


class ImageStore:
    """Rendered outputs per (job, sample), rendered ahead of each job's end so a download does not wait.

    A job's outputs are queued for rendering at submit and rendered one at a time in a thread, in the
    order they are needed: when the job starts, or `RENDER_LEAD_SECONDS` before it ends if that is
    sooner. The output's first download or base64 result then finds it ready, so a client's measured
    delivery time is its own and not this server's drawing. One render thread keeps this server to
    about one core however many jobs arrive at once; an output asked for before its turn is rendered
    on demand. The cache is bounded by bytes and evicts outputs already served first; an output evicted
    before being served is rendered again, identically, when asked for.
    """

    def __init__(
        self, max_bytes: int = IMAGE_CACHE_BYTES, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_bytes = max_bytes
        self._clock = clock
        self._unserved: OrderedDict[tuple[str, int], bytes] = OrderedDict()  # in render order
        self._served: OrderedDict[tuple[str, int], bytes] = OrderedDict()  # least recently served first
        self._unserved_bytes = 0
        self._served_bytes = 0
        self._rendering: dict[tuple[str, int], asyncio.Future[bytes]] = {}
        self._ahead: list[tuple[float, float, int, Job]] = []  # heap of (due, ends_at, order, job)
        self._queued = 0
        self._wake = asyncio.Event()
        self._renderer: asyncio.Task[None] | None = None

    @property
    def cached_bytes(self) -> int:
        return self._unserved_bytes + self._served_bytes

    def render_ahead(self, job: Job) -> None:
        """Queue a job's outputs for rendering before it ends (call from the event loop)."""
        if job.failure:
            return
        due = min(job.starts_at, job.ends_at - RENDER_LEAD_SECONDS)
        self._queued += 1
        heapq.heappush(self._ahead, (due, job.ends_at, self._queued, job))
        self._wake.set()
        if self._renderer is None or self._renderer.done():
            self._renderer = asyncio.get_running_loop().create_task(self._render_ahead_loop())

    async def close(self) -> None:
        self._ahead.clear()
        if self._renderer is not None:
            self._renderer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renderer
            self._renderer = None

    async def sample(self, job: Job, index: int) -> bytes:
        """The output's bytes, now served (which makes it the first to go when the cache is full)."""
        key = (job.request_id, index)
        image = self._cached(key)
        if image is None:
            image = await self.prepare(job, index)
        if key in self._unserved:
            self._unserved_bytes -= len(self._unserved.pop(key))
        elif key in self._served:
            self._served_bytes -= len(self._served.pop(key))
        self._served[key] = image
        self._served_bytes += len(image)
        self._evict()
        return image

    async def all_samples(self, job: Job) -> list[bytes]:
        return list(await asyncio.gather(*(self.sample(job, i) for i in range(job.params.samples))))

    def _cached(self, key: tuple[str, int]) -> bytes | None:
        return self._unserved.get(key) or self._served.get(key)

    async def prepare(self, job: Job, index: int) -> bytes:
        """Render an output (or join its rendering) without serving it."""
        key = (job.request_id, index)
        pending = self._rendering.get(key)
        if pending is None:
            # Concurrent readers of the same output (and the renderer) share one rendering.
            pending = asyncio.ensure_future(self._render(job, index))
            self._rendering[key] = pending
        return await asyncio.shield(pending)

    async def _render(self, job: Job, index: int) -> bytes:
        key = (job.request_id, index)
        call = functools.partial(
            render_sample,
            seed=job.seed,
            index=index,
            samples=job.params.samples,
            width=job.params.img_width,
            height=job.params.img_height,
            prompt=job.params.prompt,
        )
        try:
            image = await asyncio.to_thread(call)
        finally:
            self._rendering.pop(key, None)
        if self._cached(key) is None:
            self._unserved[key] = image
            self._unserved_bytes += len(image)
            self._evict()
        return image

    def _evict(self) -> None:
        while self.cached_bytes > self._max_bytes and self._served:
            self._served_bytes -= len(self._served.popitem(last=False)[1])
        while self.cached_bytes > self._max_bytes and len(self._unserved) > 1:
            self._unserved_bytes -= len(self._unserved.popitem(last=False)[1])

    async def _render_ahead_loop(self) -> None:
        while self._ahead:
            due, _, _, job = self._ahead[0]
            wait = due - self._clock()
            if wait > 0:
                # Woken early by a new job, which may be due sooner; the nap is capped so that a clock
                # that is not time.monotonic (a test's) cannot stall the renderer.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=min(wait, MAX_RENDERER_NAP_SECONDS))
                continue
            heapq.heappop(self._ahead)
            for index in range(job.params.samples):
                if self._unserved_bytes >= self._max_bytes:
                    # Full of outputs nobody fetched yet: render the rest on demand rather than evict them.
                    break
                if self._cached((job.request_id, index)) is None:
                    try:
                        await self.prepare(job, index)
                    except Exception:
                        log.exception("Rendering output %d of %s failed", index + 1, job.request_id)
