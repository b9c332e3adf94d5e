"""The job lifecycle: submit -> poll -> fetch images, with the quota settled by whether Segmind billed.

Every state change is written to the store, so a job can be found (for its buttons) and resumed later.
Progress goes back up through a plain callback; nothing here knows about Discord.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import aiohttp

from services.images import ImageDecodeError, check_image, decode_base64_image
from services.outputs import OutputPolicy, OutputRefused, RetryableOutput, fetch_output
from services.quota import QuotaGuard
from services.request import GenerationRequest
from services.segmind import (
    InsufficientCredits,
    JobFailed,
    JobResult,
    RateLimited,
    SegmindClient,
    SegmindError,
    SegmindState,
    SubmittedJob,
)
from services.store.base import JobRecord, JobState, Store, UsageCounts, usage_day
from services.store.guarded import StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

CREDITS_FLAG = "segmind_out_of_credits"
DEFAULT_RATE_LIMIT_WAIT = 5.0
SEGMIND_RETENTION_SECONDS = 3600.0
DOWNLOAD_ATTEMPTS = 3
# Downloads get what is left of the job's deadline, but never less than this: a job Segmind finished just
# before its deadline has been paid for and deserves a moment to arrive.
MIN_DOWNLOAD_SECONDS = 5.0
# A completed job whose delivery keeps failing is tried this many times across sweeps, then given to /jobs.
MAX_DELIVERY_ATTEMPTS = 3
# A reservation no saved job owns after this long was left by a process that died (or a store that failed)
# between reserving and saving; it is refunded.
ORPHAN_RESERVATION_SECONDS = 300.0
RECORD_ATTEMPTS = 5


class ProgressKind(StrEnum):
    WAITING_FOR_SLOT = "waiting_for_slot"  # our own request budget is making the job wait its turn
    RATE_LIMITED = "rate_limited"  # Segmind answered 429; waiting for its reset time
    QUEUED = "queued"
    GENERATING = "generating"


@dataclass(frozen=True)
class Progress:
    kind: ProgressKind
    elapsed: float = 0.0
    position: int | None = None
    retry_at: float | None = None  # epoch seconds
    request_id: str | None = None
    ready_at: float | None = None  # epoch seconds when the images are likely ready, when there is an estimate


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class GeneratedImages:
    job: JobRecord
    request: GenerationRequest  # with the concrete seed that was used
    images: list[bytes]
    inference_time: float | None


class SubmitInterrupted(Exception):
    """The process stopped while a submit was on its way, so whether Segmind accepted it is unknown."""


class DownloadFailed(Exception):
    """An output could not be fetched or decoded."""


class LeaseLost(Exception):
    """Another process took this job over; whatever this one was about to post must not be posted."""


@dataclass
class Lease:
    """The right to drive one job. `confirm()` renews it and says whether it is still ours (fencing)."""

    job_id: str
    owner: str
    held: bool
    _service: JobService

    def __bool__(self) -> bool:
        return self.held

    async def confirm(self) -> None:
        """Raises LeaseLost unless this holder still owns the job; called right before anything is posted."""
        if not self.held or not await self._service.renew_lease(self.job_id, self.owner):
            self.held = False
            raise LeaseLost(self.job_id)


class JobError(Exception):
    """Why a job ended without images. `billed` says whether the quota was charged."""

    def __init__(self, cause: BaseException, *, job: JobRecord, billed: bool, retry_at: float | None = None):
        super().__init__(str(cause))
        self.cause = cause
        self.job = job
        self.billed = billed
        self.retry_at = retry_at

    @property
    def request_id(self) -> str | None:
        return self.job.segmind_request_id


async def uninterruptible(step: Awaitable[T]) -> T:
    """Lets a step finish even if its caller is cancelled, then passes the cancellation on.

    For steps whose effect outside (a submit, a posted message) must be recorded before the process stops.
    """
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


class JobService:
    """A job's life from its saved record to its images, in whichever process holds the job's lease.

    It owns the job's state in the store (every change written before the next step, so any process can
    resume it), the lease that lets one holder at a time drive it, and the quota settlement: committed
    when Segmind billed the job, refunded when it did not. It guarantees that a job Segmind may have
    accepted is never submitted again, that waiting for the result and the downloads is bounded by the
    job's deadline, and that a fact known nowhere else (Segmind's request id) is written with retries
    through a store outage. It knows nothing of Discord: progress goes up through a callback, results
    come back as `GeneratedImages`.
    """

    def __init__(
        self,
        client: SegmindClient,
        store: Store,
        quota: QuotaGuard,
        session: aiohttp.ClientSession,
        *,
        credits_cooloff: float,
        rate_limit_max_wait: float,
        max_download_bytes: int = 40 * 1024 * 1024,
        download_timeout: float = 60.0,
        lease_seconds: float = 30.0,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.outputs = OutputPolicy(client.base_url)
        self.lease_seconds = lease_seconds
        # Unique per process run, so a restarted process waits for its dead predecessor's leases to lapse.
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.store = store
        self.quota = quota
        self._session = session
        self.credits_cooloff = credits_cooloff
        self.rate_limit_max_wait = rate_limit_max_wait
        self.max_download_bytes = max_download_bytes
        self.download_timeout = download_timeout
        self._clock = clock

    async def credits_exhausted_until(self) -> float | None:
        return await self.store.get_flag(CREDITS_FLAG, self._clock())

    async def record(self, job: JobRecord, **changes: Any) -> JobRecord:
        job = self._evolve(job, **changes)
        await self.store.save_job(job)
        return job

    async def _settle(
        self, job: JobRecord, *, billed: bool, counts: UsageCounts, **changes: Any
    ) -> JobRecord:
        """Records the job's end at Segmind, commits (billed) or refunds its reservation and counts its
        server's usage, in one step of the store."""
        job = self._evolve(job, **changes)
        await self.store.settle_job(job, billed=billed, day=usage_day(self._clock()), counts=counts)
        return job

    def _evolve(self, job: JobRecord, **changes: Any) -> JobRecord:
        job = job.evolve(self._clock(), **changes)
        if job.finished and job.interaction_token is not None:
            # Nothing more is sent through the interaction, so its token is not kept a moment longer.
            job = job.evolve(job.updated_at, interaction_token=None)
        return job

    async def record_durably(self, job: JobRecord, **changes: Any) -> JobRecord:
        """Like `record`, retried while the store is unavailable; for facts that exist nowhere else.

        Gives up after a few tries and returns the record in memory, so the caller keeps following the job
        (its next state change writes everything again) instead of dropping a job Segmind is billing.
        """
        for attempt in range(RECORD_ATTEMPTS):
            try:
                return await self.record(job, **changes)
            except StoreUnavailable as error:
                log.warning("job %s: could not record its state (%s); retrying", job.id, error)
                await asyncio.sleep(min(4.0, 0.25 * 2**attempt))
        log.error("job %s: its state could not be recorded; carrying on from memory", job.id)
        return job.evolve(self._clock(), **changes)

    # -- leases: which process drives a job --

    @contextlib.asynccontextmanager
    async def lease(self, job_id: str) -> AsyncIterator[Lease]:
        """Holds the job's lease (renewed in the background) for the block; a false Lease if another owns it.

        Each holder gets an owner name of its own, so two tasks of one process exclude each other too.
        """
        owner = f"{self.owner}:{secrets.token_hex(3)}"
        if not await self.renew_lease(job_id, owner):
            yield Lease(job_id, owner, held=False, _service=self)
            return
        renewer = asyncio.create_task(self._renew_lease(job_id, owner, asyncio.current_task()))
        try:
            yield Lease(job_id, owner, held=True, _service=self)
        finally:
            renewer.cancel()
            # Released even when the block is cancelled at shutdown, so the next process resumes at once.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release_lease(job_id, owner))

    async def renew_lease(self, job_id: str, owner: str) -> bool:
        return await self.store.acquire_lease(job_id, owner, self.lease_seconds, self._clock())

    async def _renew_lease(self, job_id: str, owner: str, holder: asyncio.Task[Any] | None) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                renewed = await self.renew_lease(job_id, owner)
            except StoreUnavailable as error:
                log.warning("job %s: could not renew its lease: %s", job_id, error)
                continue
            except Exception:
                log.warning("job %s: could not renew its lease", job_id, exc_info=True)
                continue
            if not renewed:
                # Another process took the job over (our renewals failed for too long): it drives it now.
                log.error("job %s: lost its lease to another process; stopping here", job_id)
                if holder is not None:
                    holder.cancel()
                return

    # -- running --

    async def unfinished(self) -> tuple[list[JobRecord], list[JobRecord]]:
        """Unfinished jobs split into those Segmind still holds results for, and those past its retention."""
        now = self._clock()
        jobs = await self.store.unfinished_jobs(created_after=0.0)
        fresh = [job for job in jobs if job.created_at > now - SEGMIND_RETENTION_SECONDS]
        stale = [job for job in jobs if job.created_at <= now - SEGMIND_RETENTION_SECONDS]
        return fresh, stale

    async def resume(self, job: JobRecord, on_progress: ProgressCallback) -> GeneratedImages:
        """Carries a recorded job on from its last state; a job Segmind accepted is never submitted again."""
        if job.state is JobState.PENDING:
            return await self.run(job, on_progress)
        if job.state is JobState.SUBMITTING:
            # Segmind has no idempotency key: sending it again could bill twice, so it is closed instead.
            job = await self.abandon(job, "interrupted while being submitted")
            raise JobError(SubmitInterrupted(), job=job, billed=False)
        request = GenerationRequest.from_payload(job.request)
        if job.state is JobState.SUBMITTED and job.segmind_request_id:
            log.info("job %s: resumed, following %s", job.id, job.segmind_request_id)
            # The deadline counts from the first submit, so restarts cannot stretch a job's wait forever.
            sent_at = job.submitted_at or job.created_at
            submitted = self.client.handle_for(
                job.segmind_request_id, request, submitted_at=time.monotonic() - (self._clock() - sent_at)
            )
            return await self.follow(job, submitted, on_progress)
        if job.state is JobState.COMPLETED:
            return await self.recover_images(job, request)
        raise ValueError(f"job {job.id} in state {job.state} cannot be resumed")

    async def abandon(self, job: JobRecord, reason: str) -> JobRecord:
        """A job that can no longer be delivered: its images are given back and it is closed."""
        await self.quota.refund(job.reservation_id or "")
        job = await self.record(job, state=JobState.FAILED, error=reason)
        log.info("job %s: abandoned (%s); quota refunded", job.id, reason)
        return job

    async def run(self, job: JobRecord, on_progress: ProgressCallback) -> GeneratedImages:
        """Submits, waits and fetches. The quota is committed once Segmind has billed, refunded otherwise."""
        request = GenerationRequest.from_payload(job.request).with_concrete_seed()
        if request.to_payload() != job.request:
            # Recorded before the submit, so a resumed job is sent with the seed it was shown with.
            job = await self.record(job, request=request.to_payload())
        log.info("job %s: pending (user %d, %d image(s))", job.id, job.user_id, request.samples)
        job, submitted = await self._submit(job, request, on_progress)
        return await self.follow(job, submitted, on_progress)

    async def follow(
        self, job: JobRecord, submitted: SubmittedJob, on_progress: ProgressCallback
    ) -> GeneratedImages:
        """Waits for a submitted job and fetches its images; never submits again."""
        try:
            result = await self._wait(submitted, on_progress)
        except JobFailed as failed:
            await self._fail(job, failed, billed=False)
            raise JobError(failed, job=job, billed=False) from failed
        except (SegmindError, aiohttp.ClientError, TimeoutError) as error:
            # Segmind accepted the job, so it may well have run and been billed.
            await self._fail(job, error, billed=True)
            raise JobError(error, job=job, billed=True) from error
        deadline_at = submitted.submitted_at + self.client.deadline
        try:
            images = await self.fetch_images(result, submitted.request.samples, deadline_at=deadline_at)
        except DownloadFailed as error:
            await self._fail(job, error, billed=True)
            raise JobError(error, job=job, billed=True) from error
        job = await self._settle(
            job,
            billed=True,
            counts=UsageCounts(jobs=1, images=len(images), gpu_seconds=result.inference_time or 0.0),
            state=JobState.COMPLETED,
            result={
                "outputs": list(result.outputs) if not result.is_base64 else [],
                "metrics": dict(result.metrics),
            },
        )
        log.info(
            "job %s: completed (%s, %d image(s)) after %.1f s",
            job.id,
            submitted.request_id,
            len(images),
            time.monotonic() - submitted.submitted_at,
        )
        return GeneratedImages(job, submitted.request, images, result.inference_time)

    async def recover_images(self, job: JobRecord, request: GenerationRequest) -> GeneratedImages:
        """Images of a job that finished before a restart: the output URLs stay downloadable for days.
        A job whose images cannot be had again is recorded as failed."""
        try:
            generated = await self.fetch_again(job, request)
        except JobError as error:
            failed = await self.record(
                job, state=JobState.FAILED, error=f"{type(error.cause).__name__}: {error.cause}"[:500]
            )
            raise JobError(error.cause, job=failed, billed=True) from error.cause
        log.info("job %s: images recovered after a restart", job.id)
        return generated

    async def fetch_again(self, job: JobRecord, request: GenerationRequest) -> GeneratedImages:
        """A finished job's images, downloaded again from its outputs (or its result at Segmind); the
        record is left as it is. JobError (billed) when they cannot be had."""
        stored = job.result or {}
        metrics = stored.get("metrics") or {}
        try:
            if stored.get("outputs"):
                result = JobResult(job.segmind_request_id or "", tuple(stored["outputs"]), False, metrics)
            else:
                submitted = self.client.handle_for(job.segmind_request_id or "", request)
                result = await self.client.result(submitted)
            images = await self.fetch_images(
                result, request.samples, deadline_at=time.monotonic() + self.download_timeout
            )
        except (SegmindError, DownloadFailed) as error:
            raise JobError(error, job=job, billed=True) from error
        return GeneratedImages(job, request, images, result.inference_time)

    async def mark_delivered(self, job: JobRecord, *, message_id: int | None) -> JobRecord:
        job = await self.record(job, state=JobState.DELIVERED, message_id=message_id)
        log.info("job %s: delivered (%s)", job.id, job.segmind_request_id)
        return job

    async def mark_undeliverable(self, job: JobRecord, reason: str) -> JobRecord:
        job = await self.record(job, state=JobState.UNDELIVERED, error=reason[:500])
        log.error(
            "job %s: images generated (%s) but not delivered: %s", job.id, job.segmind_request_id, reason
        )
        return job

    async def delivery_failed(self, job: JobRecord, reason: str) -> JobRecord:
        """Counts a failed delivery; the job stays completed for the next sweep until the attempts run out."""
        attempts = job.delivery_attempts + 1
        if attempts >= MAX_DELIVERY_ATTEMPTS:
            return await self.mark_undeliverable(
                job.evolve(job.updated_at, delivery_attempts=attempts), reason
            )
        job = await self.record(job, delivery_attempts=attempts, error=reason[:500])
        log.warning(
            "job %s: delivery attempt %d of %d failed (%s); the next sweep tries again",
            job.id,
            attempts,
            MAX_DELIVERY_ATTEMPTS,
            reason,
        )
        return job

    async def reclaim_orphaned_reservations(self) -> int:
        """Refunds reservations that no unfinished job owns, left by a crash or a store error before the save.

        Listed before the jobs are read, and only when older than any save can take, so a reservation whose
        job is being saved right now is never mistaken for an orphan.
        """
        stale = await self.store.reserved_before(self._clock() - ORPHAN_RESERVATION_SECONDS)
        if not stale:
            return 0
        owned = {job.reservation_id for job in await self.store.unfinished_jobs(created_after=0.0)}
        orphans = [reservation for reservation in stale if reservation not in owned]
        for reservation in orphans:
            await self.quota.refund(reservation)
            log.warning("reservation %s: no saved job owns it; refunded", reservation)
        return len(orphans)

    async def _submit(
        self, job: JobRecord, request: GenerationRequest, on_progress: ProgressCallback
    ) -> tuple[JobRecord, SubmittedJob]:
        waited = 0.0
        while True:
            try:
                return await self._submit_once(
                    job, request, on_progress, max_wait=max(0.0, self.rate_limit_max_wait - waited)
                )
            except RateLimited as limited:
                # A 429 means the job was not accepted, so submitting again later cannot double-bill.
                await self.record(job, state=JobState.PENDING)
                wait = limited.seconds_until_reset() or DEFAULT_RATE_LIMIT_WAIT
                retry_at = self._clock() + wait
                if waited + wait > self.rate_limit_max_wait:
                    await self._fail(job, limited, billed=False)
                    raise JobError(limited, job=job, billed=False, retry_at=retry_at) from limited
                log.info("job %s: rate limited by Segmind; retrying in %.1f s", job.id, wait)
                on_progress(Progress(ProgressKind.RATE_LIMITED, retry_at=retry_at))
                await asyncio.sleep(wait)
                waited += wait
            except SegmindError as error:
                if isinstance(error, InsufficientCredits):
                    await self.store.set_flag(CREDITS_FLAG, self._clock() + self.credits_cooloff)
                await self._fail(job, error, billed=False)
                raise JobError(error, job=job, billed=False) from error

    async def _submit_once(
        self, job: JobRecord, request: GenerationRequest, on_progress: ProgressCallback, *, max_wait: float
    ) -> tuple[JobRecord, SubmittedJob]:
        """One submit. Once it is on its way, a cancellation (shutdown) waits for Segmind's answer and its
        record; before that, it simply stops."""
        on_its_way = False

        async def record_submitting() -> None:
            nonlocal on_its_way, job
            job = await self.record(
                job, state=JobState.SUBMITTING, submitted_at=job.submitted_at or self._clock()
            )
            on_its_way = True

        # Worked out once: a long line tells every waiter of each change, so this must stay cheap.
        expected_duration = self.client.expected_duration(request)

        def waiting_for_slot(position: int, seconds: float) -> None:
            ready_at = self._clock() + seconds + expected_duration
            on_progress(Progress(ProgressKind.WAITING_FOR_SLOT, position=position, ready_at=ready_at))

        async def submit_and_record() -> tuple[JobRecord, SubmittedJob]:
            submitted = await self.client.submit(
                request,
                on_budget_wait=waiting_for_slot,
                before_send=record_submitting,
                max_wait=max_wait,
                asker=job.user_id,
            )
            # Segmind accepted it and bills it: the request id must not be lost to a store hiccup.
            recorded = await self.record_durably(
                job, segmind_request_id=submitted.request_id, state=JobState.SUBMITTED
            )
            log.info("job %s: submitted as %s (seed %d)", job.id, submitted.request_id, request.seed)
            return recorded, submitted

        attempt = asyncio.ensure_future(submit_and_record())
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            if not on_its_way:
                attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
            raise

    async def _wait(self, submitted: SubmittedJob, on_progress: ProgressCallback) -> JobResult:
        started_at: float | None = None  # seconds after submit when the job was first seen running
        # Closed on return, not left to the collector: that costs a task and a wake-up of its own per job.
        async with contextlib.aclosing(self.client.wait(submitted)) as events:
            async for event in events:
                if event.result is not None:
                    return event.result
                ready_at = None if event.expected_in is None else self._clock() + event.expected_in
                if event.state is SegmindState.QUEUED:
                    on_progress(
                        Progress(
                            ProgressKind.QUEUED,
                            elapsed=event.elapsed,
                            request_id=event.request_id,
                            ready_at=ready_at,
                        )
                    )
                    continue
                started_at = event.elapsed if started_at is None else started_at
                on_progress(
                    Progress(
                        ProgressKind.GENERATING,
                        elapsed=event.elapsed - started_at,
                        request_id=event.request_id,
                        ready_at=ready_at,
                    )
                )
        raise SegmindError("the wait ended without a result", request_id=submitted.request_id)

    async def _fail(self, job: JobRecord, error: BaseException, *, billed: bool) -> None:
        blocked = isinstance(error, JobFailed) and error.is_content_block
        counts = UsageCounts(
            jobs=int(job.segmind_request_id is not None), blocked=int(blocked), failed=int(not blocked)
        )
        await self._settle(
            job,
            billed=billed,
            counts=counts,
            state=JobState.FAILED,
            error=f"{type(error).__name__}: {error}"[:500],
        )
        log.info(
            "job %s: failed (%s) %s; quota %s",
            job.id,
            job.segmind_request_id or "not submitted",
            type(error).__name__,
            "charged" if billed else "refunded",
        )

    async def count_usage(self, guild_id: int | None, user_id: int, counts: UsageCounts) -> None:
        """Adds to the server's usage for `/admin usage` (none is kept for direct messages); a store that
        fails costs the figure, not the job."""
        if guild_id is None:
            return
        try:
            await self.store.add_usage(guild_id, usage_day(self._clock()), user_id, counts)
        except StoreUnavailable as error:
            log.warning("usage of %d in server %d was not counted: %s", user_id, guild_id, error)

    async def fetch_images(self, result: JobResult, samples: int, *, deadline_at: float) -> list[bytes]:
        """The job's images, downloaded (or decoded) and checked, all of them by `deadline_at` (monotonic)."""
        outputs = result.outputs
        if len(outputs) > samples:
            # Only what was asked for is delivered (and paid for); the rest is not fetched at all.
            log.warning(
                "segmind %s: %d outputs for %d sample(s); using the first %d",
                result.request_id,
                len(outputs),
                samples,
                samples,
            )
            outputs = outputs[:samples]
        bound = max(MIN_DOWNLOAD_SECONDS, deadline_at - time.monotonic())
        try:
            async with asyncio.timeout(bound):
                return [await self._one_image(result, output, index) for index, output in enumerate(outputs)]
        except TimeoutError:
            raise DownloadFailed(f"the images were not downloaded within {bound:.0f} s") from None

    async def _one_image(self, result: JobResult, output: str, index: int) -> bytes:
        try:
            if result.is_base64:
                data = decode_base64_image(output, index)
            else:
                data = await self._download(output, index)
            await asyncio.to_thread(check_image, data, index)
        except ImageDecodeError as error:
            raise DownloadFailed(str(error)) from error
        return data

    async def _download(self, url: str, index: int) -> bytes:
        """Output files are plain GETs, so a dropped connection or a 5xx is simply tried again."""
        for attempt in range(DOWNLOAD_ATTEMPTS):
            try:
                return await fetch_output(
                    self._session,
                    self.outputs,
                    url,
                    max_bytes=self.max_download_bytes,
                    timeout=self.download_timeout,
                    # A finished job's images go before checks of running ones (see InFlightGate).
                    in_flight=self.client.in_flight,
                )
            except OutputRefused as error:
                log.warning("output %d: not fetched: %s", index + 1, error)
                raise DownloadFailed(f"image {index + 1}: {error}") from error
            except RetryableOutput as error:
                if attempt + 1 == DOWNLOAD_ATTEMPTS:
                    raise DownloadFailed(f"image {index + 1}: {error}") from error
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")
