"""Jobs of the stand-in Segmind server, whose state is computed from the clock on every read.

A job is given its whole timeline when it is submitted (when it starts on a worker and when it ends),
so no background task is needed: QUEUED before the start, PROCESSING until the end, then COMPLETED,
or FAILED at the start for a prompt the content policy blocks.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from devtools.fakes.segmind.images import render_sample
from devtools.fakes.segmind.params import GenerationParams

JobState = Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]
REFERENCE_PIXELS = 1024 * 1024
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


def find_blocked_word(prompt: str, blocked_words: Iterable[str]) -> str | None:
    """The first blocked word or phrase present as a whole word, ignoring case ("kid" spares "skid")."""
    for word in sorted(blocked_words):
        if word.strip() and re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", prompt, re.IGNORECASE):
            return word
    return None


class WorkerSchedule:
    """When each worker is next free; a job takes the worker that frees up first."""

    def __init__(self) -> None:
        self._free_at: list[float] = []

    def reserve(self, workers: int, earliest: float, duration: float) -> float:
        """Book `duration` seconds on a worker no sooner than `earliest`; return the start time."""
        self._resize(max(1, workers))
        slot = min(range(len(self._free_at)), key=self._free_at.__getitem__)
        start = max(earliest, self._free_at[slot])
        self._free_at[slot] = start + duration
        return start

    def _resize(self, workers: int) -> None:
        if workers > len(self._free_at):
            self._free_at.extend([0.0] * (workers - len(self._free_at)))
        elif workers < len(self._free_at):
            # Keep the busiest workers so that jobs already booked stay accounted for.
            self._free_at = sorted(self._free_at)[-workers:]


class ImageStore:
    """Rendered outputs, cached per (job, sample); evicted ones are rendered again identically."""

    def __init__(self, max_images: int = 64) -> None:
        self._max_images = max_images
        self._images: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._rendering: dict[tuple[str, int], asyncio.Future[bytes]] = {}

    async def sample(self, job: Job, index: int) -> bytes:
        key = (job.request_id, index)
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        pending = self._rendering.get(key)
        if pending is None:
            # Concurrent readers of the same output share one rendering.
            pending = asyncio.ensure_future(self._render(job, index))
            self._rendering[key] = pending
        return await asyncio.shield(pending)

    async def all_samples(self, job: Job) -> list[bytes]:
        return list(await asyncio.gather(*(self.sample(job, i) for i in range(job.params.samples))))

    async def _render(self, job: Job, index: int) -> bytes:
        key = (job.request_id, index)
        try:
            image = await asyncio.to_thread(
                render_sample,
                seed=job.seed,
                index=index,
                samples=job.params.samples,
                width=job.params.img_width,
                height=job.params.img_height,
                prompt=job.params.prompt,
            )
        finally:
            self._rendering.pop(key, None)
        self._images[key] = image
        while len(self._images) > self._max_images:
            self._images.popitem(last=False)
        return image
