"""Async client for Segmind's serverless API: v2 queue (submit, status, result, wait) and v1 sync.

Segmind has no idempotency key, so a submit that got a 2xx is never sent again; status and result GETs
are safe to retry. Every call, polls included, spends from one shared request budget.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp

from services.request import GenerationRequest
from services.segmind.budget import Priority, RequestBudget
from services.segmind.errors import (
    CONTENT_BLOCK,
    ERRORS_BY_STATUS,
    BadRequest,
    BudgetExhausted,
    JobFailed,
    JobTimeout,
    NotFound,
    SegmindError,
    UnexpectedResponse,
)
from services.segmind.inflight import InFlightGate
from services.segmind.schedule import (
    MIN_POLL_INTERVAL,
    DurationModel,
    FixedPollSchedule,
    PollSchedule,
    SegmindState,
    positive_number,
)
from services.segmind.transport import (
    NoAnswer,
    Reply,
    RetryPolicy,
    Transport,
    error_text,
    same_origin,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1024 * 1024
SMALL_BODY_LIMIT = 1 * MiB  # submit and status answers are a few hundred bytes
RESULT_BODY_LIMIT = 64 * MiB  # result answers carry every image in base64 when base64=true
V1_BODY_LIMIT = 32 * MiB  # v1 answers are one image (bytes, or JSON with base64)
VERIFY_TIMEOUT = 5.0
# Odd answers in a row from result URLs of unfinished jobs before they are no longer used as checks.
EARLY_RESULT_MISSES = 3
# A job at Segmind will still need about this many requests: a status check and its result (one request
# when the check is made at the result URL).
FOLLOW_UPS_PER_JOB = 2
# Once the budget's window is this full, status checks give way, more the fuller it gets, so results and
# new submits still get through.
BUSY_BUDGET = 0.5
# While busy, how often a waiting job's next check is planned again (see SegmindClient._until_due).
REPLAN_SECONDS = 1.0
REPLAN_CHANGE = 0.25


@dataclass(frozen=True)
class SubmittedJob:
    """A job Segmind has accepted: where to ask for its status and result, and when it was sent.

    `submitted_at` is on the `time.monotonic` clock; the job's deadline counts from it.
    """

    request_id: str
    status_url: str
    response_url: str
    request: GenerationRequest
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class JobResult:
    """A COMPLETED job's outputs, and the `metrics` Segmind measured (they teach the `DurationModel`)."""

    request_id: str
    outputs: tuple[str, ...]  # URLs, or base64 image data when the request asked for base64
    is_base64: bool
    metrics: Mapping[str, Any]

    @property
    def inference_time(self) -> float | None:
        return positive_number(self.metrics.get("inference_time"))


@dataclass(frozen=True)
class JobEvent:
    """What one status check saw; the last event of a wait is COMPLETED and carries the result."""

    request_id: str
    state: SegmindState
    elapsed: float
    result: JobResult | None = None
    expected_in: float | None = None  # seconds from this check to the job's likely end, when known


class SegmindClient:
    """Dreamshaper on Segmind: the v2 queue (`submit`, `status`, `result`, `wait`) and the v1 sync call.

    What it guarantees, whatever Segmind answers:

    * The API key goes only to the origin (scheme, host, port) of `base_url`. A status or response URL on
      another origin is replaced by the documented one on the base; redirects are never followed by
      aiohttp, only by the client itself and only on the same origin. Every text read from an answer has
      the key scrubbed from it, so no error, log line or stored result can carry it further.
    * Bounded: every body is read with a size cap, every request has a timeout, and `wait` never outlasts
      the job's deadline (`deadline` seconds from the submit), retries and rate-limit waits included.
    * Budgeted: every request, polls and retries included, spends a slot of the shared `budget`; a 429
      pauses the whole budget, and a reset that is absurd counts as unknown.
    * Retried where it is safe: status and result GETs after timeouts, drops, 5xx and malformed answers,
      with backoff and jitter. A submit is sent once (no idempotency key: a second one is billed twice);
      only a connection that never opened is tried again.
    * Polling adapts (`PollSchedule`): checks go where the job is likely to end, learnt in `durations`
      from the `metrics` of finished jobs, and give way when the budget is busy. With `poll_interval`,
      every job is checked at that fixed interval instead, as Segmind's own SDK does.
    * Work already at Segmind goes first: when requests wait for the budget, result fetches go before
      status checks, and those before submits; submits take turns by `asker`.
    * A job that has likely ended is checked at its result URL, so the check that finds it done brings
      the result too. While the budget is busy, that is its only check, so a job costs about two requests.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_key: str,
        base_url: str = "https://api.segmind.com",
        model: str = "sdxl1.0-dreamshaper",
        budget: RequestBudget,
        deadline: float = 600.0,
        retry: RetryPolicy | None = None,
        durations: DurationModel | None = None,
        request_timeout: float = 30.0,
        max_poll_interval: float = 10.0,
        poll_interval: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._transport = Transport(
            session,
            api_key=api_key,
            base_url=self.base_url,
            budget=budget,
            retry=retry or RetryPolicy(),
            timeout=aiohttp.ClientTimeout(total=request_timeout),
        )
        self.model = model
        self.deadline = deadline
        self.durations = durations or DurationModel()
        self.max_poll_interval = max_poll_interval
        self.poll_interval = poll_interval
        # A job that has likely ended is checked at its result URL: once it has, the one answer brings the
        # result too, saving a request (room in the budget, CPU, a round trip). Off for good once Segmind
        # is seen not to answer that way for unfinished jobs.
        self.early_results = True
        self.loop_load: Callable[[], float] = lambda: 0.0
        self._early_misses = 0
        # Jobs whose submit was granted and which are not waited on yet, and jobs being waited on: what
        # the budget keeps room for before it grants another submit.
        self._sending = 0
        self._sent: dict[str, float] = {}
        self._waiting = 0
        self._transport.budget.follow_ups = self._follow_ups

    def __repr__(self) -> str:
        return f"SegmindClient(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def in_flight(self) -> InFlightGate:
        """Requests on their way to Segmind at once; output downloads take a slot too, as results."""
        return self._transport.in_flight

    @property
    def budget(self) -> RequestBudget:
        return self._transport.budget

    @property
    def retry(self) -> RetryPolicy:
        return self._transport.retry

    # -- start-up --

    async def verify_key(self) -> bool:
        """One cheap keyed request: True when Segmind accepted the key, False when it could not be told.

        Asks for the status of a random request id (404 means the key passed), once, without retries, within
        a few seconds, spending one slot of the budget. Raises Unauthorized (401) or Forbidden (403) when the
        key is refused, and nothing else: anything odd is logged as a warning and answers False.
        """
        url = f"{self.base_url}/v2/requests/{uuid.uuid4()}/status"
        try:
            await self.budget.acquire(max_wait=VERIFY_TIMEOUT)
            reply = await self._transport.exchange(
                "GET", url, None, aiohttp.ClientTimeout(total=VERIFY_TIMEOUT), SMALL_BODY_LIMIT
            )
        except BudgetExhausted:
            reason = "the request budget has no free slot"
        except SegmindError as error:
            reason = error.message
        except NoAnswer as lost:
            reason = f"Segmind could not be reached ({type(lost.cause).__name__})"
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            reason = f"Segmind could not be reached ({type(error).__name__})"
        except Exception as error:
            # Start-up must go on whatever happened here; only a refused key may stop it.
            reason = f"unexpected {type(error).__name__}"
        else:
            if reply.status in (401, 403):
                message = error_text(reply.data) or reply.text() or f"HTTP {reply.status}"
                raise ERRORS_BY_STATUS[reply.status](message, status=reply.status)
            if 200 <= reply.status < 300 or reply.status in (404, 422):
                return True
            if reply.status == 429:
                self._transport.pause_budget(reply)
            reason = f"Segmind answered HTTP {reply.status}"
        log.warning("could not verify the Segmind key: %s", reason)
        return False

    # -- v2 queue --

    async def submit(
        self,
        request: GenerationRequest,
        *,
        on_budget_wait: Callable[[int, float], None] | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
        max_wait: float | None = None,
        asker: Hashable | None = None,
    ) -> SubmittedJob:
        """Queues one job. Sent at most once: only a connection that never opened is tried again.

        `before_send` is awaited just before the request leaves, once a budget slot is granted, so the caller
        can record that from now on the job may exist at Segmind. With `max_wait`, a budget that cannot grant
        a slot within that many seconds raises BudgetExhausted and nothing is sent. Waiting submits take
        turns by `asker` (e.g. the member).
        """
        request = request.with_concrete_seed()
        url = f"{self.base_url}/v2/{self.model}"
        sending = False

        def granted() -> None:
            # Counted from the grant on, so the next submit sees the room this one's checks will take.
            nonlocal sending
            if not sending:
                sending = True
                self._sending += 1

        try:
            body = await self._transport.send(
                "POST",
                url,
                payload=request.to_payload(),
                idempotent=False,
                limit=SMALL_BODY_LIMIT,
                accept=_json_object,
                on_budget_wait=on_budget_wait,
                before_send=before_send,
                on_granted=granted,
                max_wait=max_wait,
                priority=Priority.SUBMIT,
                asker=asker,
            )
        finally:
            if sending:
                self._sending -= 1
        request_id = body.get("request_id")
        if isinstance(request_id, int) and not isinstance(request_id, bool):
            request_id = str(request_id)
        if not isinstance(request_id, str) or not request_id:
            raise UnexpectedResponse("the submit answer lacks a request_id")
        self._sent[request_id] = time.monotonic()
        documented = self.handle_for(request_id, request)
        job = SubmittedJob(
            request_id=request_id,
            status_url=self._job_url(request_id, body.get("status_url"), documented.status_url),
            response_url=self._job_url(request_id, body.get("response_url"), documented.response_url),
            request=request,
        )
        # The job's own line says so at INFO, with its job id.
        log.debug(
            "segmind %s: submitted (%d image(s), seed %d)", job.request_id, request.samples, request.seed
        )
        return job

    def handle_for(
        self, request_id: str, request: GenerationRequest, *, submitted_at: float | None = None
    ) -> SubmittedJob:
        """The handle of a job submitted earlier (e.g. before a restart), at its documented URLs.

        Sends nothing: it only builds the `SubmittedJob` that `status`, `result` and `wait` take.
        """
        base = f"{self.base_url}/v2/requests/{quote(request_id, safe='')}"
        return SubmittedJob(
            request_id=request_id,
            status_url=f"{base}/status",
            response_url=base,
            request=request,
            submitted_at=time.monotonic() if submitted_at is None else submitted_at,
        )

    async def status(self, job: SubmittedJob) -> SegmindState:
        url = self._job_url(
            job.request_id, job.status_url, self.handle_for(job.request_id, job.request).status_url
        )
        state, _ = await self._ask_job(
            job, url, limit=SMALL_BODY_LIMIT, with_outputs=False, priority=Priority.STATUS
        )
        return state

    async def result(self, job: SubmittedJob) -> JobResult:
        url = self._job_url(
            job.request_id, job.response_url, self.handle_for(job.request_id, job.request).response_url
        )
        state, body = await self._ask_job(
            job, url, limit=RESULT_BODY_LIMIT, with_outputs=True, priority=Priority.RESULT
        )
        if state is not SegmindState.COMPLETED:
            raise UnexpectedResponse(f"result asked while the job is {state}", request_id=job.request_id)
        metrics = body.get("metrics") if isinstance(body.get("metrics"), dict) else {}
        return JobResult(job.request_id, _outputs(body, job.request_id), job.request.base64, metrics)

    async def wait(self, job: SubmittedJob, *, deadline: float | None = None) -> AsyncIterator[JobEvent]:
        """Yields an event after every status check; the last one is COMPLETED and carries the result.

        FAILED raises JobFailed; passing the deadline raises JobTimeout with the request id.
        """
        schedule = self._schedule_for(job, deadline)
        self._sent.pop(job.request_id, None)
        self._waiting += 1
        counted = True
        try:
            async with contextlib.aclosing(self._checks(job, schedule)) as checks:
                async for event in checks:
                    if event.result is not None:
                        # Done with Segmind: its room is free before the caller even looks at the result.
                        self._waiting -= 1
                        counted = False
                    yield event
        finally:
            if counted:
                self._waiting -= 1

    async def _checks(
        self, job: SubmittedJob, schedule: PollSchedule | FixedPollSchedule
    ) -> AsyncIterator[JobEvent]:
        while True:
            now = time.monotonic()
            if schedule.expired(now):
                raise JobTimeout(request_id=job.request_id, waited=now - job.submitted_at)
            await self._until_due(schedule, now)
            result: JobResult | None = None
            if self.early_results and schedule.likely_ended(time.monotonic()):
                state, result = await self._check_result(job, schedule)
            else:
                state = await self._check(job, schedule)
            seen_at = time.monotonic()
            elapsed = seen_at - job.submitted_at
            # One line per change a job's own lines do not tell: the submit said QUEUED already, and the
            # job logs its completion once its images are in.
            told = schedule.state is not None or state is not SegmindState.QUEUED
            if state is not schedule.state and state is not SegmindState.COMPLETED and told:
                log.info("segmind %s: %s after %.1f s", job.request_id, state, elapsed)
            schedule.observe(state, seen_at)
            if state is SegmindState.COMPLETED:
                result = result or await self.result(job)
                self.durations.learn(job.request, result.metrics)
                yield JobEvent(job.request_id, state, elapsed, result)
                return
            end = schedule.expected_end(seen_at)
            yield JobEvent(job.request_id, state, elapsed, expected_in=None if end is None else end - seen_at)

    async def _until_due(self, schedule: PollSchedule | FixedPollSchedule, checked_at: float) -> None:
        """Sleeps until the next check is due. While busy, the check is planned again every
        REPLAN_SECONDS: pressure on the loop passes within seconds, and a check put late for it would
        otherwise stay late when it has gone."""
        planned_for = self._budget_busy()
        due = checked_at + schedule.next_delay(checked_at, busy=planned_for)
        while (wait := due - time.monotonic()) > 0:
            if planned_for <= 0:
                await asyncio.sleep(wait)
                return
            # Jittered, so that jobs waiting together do not all wake together.
            await asyncio.sleep(min(wait, REPLAN_SECONDS * random.uniform(0.5, 1.5)))
            busy = self._budget_busy()
            # Planned again only for a real change (or none left): a thousand waiting jobs wake meanwhile.
            if abs(busy - planned_for) >= REPLAN_CHANGE or busy <= 0:
                planned_for = busy
                due = checked_at + schedule.next_delay(checked_at, busy=busy)

    def expected_duration(self, request: GenerationRequest) -> float:
        """Seconds from submit to the images for a request like this one, from the jobs seen so far."""
        return self.durations.expected_total(request)

    def _schedule_for(self, job: SubmittedJob, deadline: float | None) -> PollSchedule | FixedPollSchedule:
        deadline_at = job.submitted_at + (self.deadline if deadline is None else deadline)
        if self.poll_interval is not None:
            return FixedPollSchedule(
                self.poll_interval, submitted_at=job.submitted_at, deadline_at=deadline_at
            )
        return PollSchedule(
            self.durations,
            job.request,
            submitted_at=job.submitted_at,
            deadline_at=deadline_at,
            # No job checks more often than the plan could serve every job at once.
            min_interval=max(MIN_POLL_INTERVAL, self.budget.min_spacing),
            max_interval=self.max_poll_interval,
        )

    def _follow_ups(self) -> int:
        now = time.monotonic()
        # A job sent but never waited on (its caller failed in between) stops counting after a window.
        for request_id, sent_at in list(self._sent.items()):
            if now - sent_at > self.budget.window:
                del self._sent[request_id]
        per_job = (
            FOLLOW_UPS_PER_JOB - 1
            if self.early_results and self.poll_interval is None
            else FOLLOW_UPS_PER_JOB
        )
        return per_job * (self._sending + len(self._sent) + self._waiting)

    def _budget_busy(self) -> float:
        """0 while the budget has room, rising to 1 as its window fills past BUSY_BUDGET."""
        budget = (self.budget.utilisation() - BUSY_BUDGET) / (1 - BUSY_BUDGET)
        return min(1.0, max(0.0, budget, self.loop_load()))

    async def _check(self, job: SubmittedJob, schedule: PollSchedule | FixedPollSchedule) -> SegmindState:
        """One status check."""
        return await self._within_deadline(job, schedule, self.status(job))

    async def _check_result(
        self, job: SubmittedJob, schedule: PollSchedule | FixedPollSchedule
    ) -> tuple[SegmindState, JobResult | None]:
        """A check at the result URL: when the job has ended, the one request brings its result too.

        For a job still running, the result URL answers with its state like the status URL does. If it
        answers otherwise, a status check tells whether that was the job or the URL; for the URL, this
        client goes back to status checks only.
        """
        url = self._job_url(
            job.request_id, job.response_url, self.handle_for(job.request_id, job.request).response_url
        )
        ask = self._ask_job(job, url, limit=RESULT_BODY_LIMIT, with_outputs=True, priority=Priority.RESULT)
        try:
            state, body = await self._within_deadline(job, schedule, ask)
        except (BadRequest, NotFound, UnexpectedResponse) as error:
            state = await self._check(job, schedule)
            if state is not SegmindState.COMPLETED:
                # One odd answer (a proxy's error page) is not Segmind's way: a few in a row are.
                self._early_misses += 1
                self.early_results = self._early_misses < EARLY_RESULT_MISSES
            if not self.early_results:
                log.warning(
                    "segmind %s: the result URL answered %s for a job that is %s; checking status only",
                    job.request_id,
                    error.status or type(error).__name__,
                    state,
                )
            return state, None
        self._early_misses = 0
        if state is not SegmindState.COMPLETED:
            return state, None
        metrics = body.get("metrics") if isinstance(body.get("metrics"), dict) else {}
        return state, JobResult(job.request_id, _outputs(body, job.request_id), job.request.base64, metrics)

    async def _within_deadline(
        self, job: SubmittedJob, schedule: PollSchedule | FixedPollSchedule, check: Awaitable[T]
    ) -> T:
        """A check bounded by what is left of the deadline (its retries and rate-limit waits too)."""
        try:
            async with asyncio.timeout(max(0.1, schedule.time_left(time.monotonic()))) as limit:
                return await check
        except TimeoutError:
            if not limit.expired():
                raise
            raise JobTimeout(request_id=job.request_id, waited=time.monotonic() - job.submitted_at) from None
        except JobFailed as failed:
            log.info(
                "segmind %s: FAILED (%s)",
                job.request_id,
                "content block" if failed.is_content_block else failed.error,
            )
            raise

    # -- v1 sync --

    async def generate_sync(self, request: GenerationRequest) -> bytes:
        """The v1 endpoint: blocks until the image is ready and returns its bytes (v1 returns one image)."""
        request = request.with_concrete_seed()
        url = f"{self.base_url}/v1/{self.model}"
        timeout = aiohttp.ClientTimeout(total=self.deadline)
        return await self._transport.send(
            "POST",
            url,
            payload=request.to_payload(),
            idempotent=False,
            limit=V1_BODY_LIMIT,
            accept=_v1_image,
            timeout=timeout,
        )

    # -- the job's URLs --

    async def _ask_job(
        self, job: SubmittedJob, url: str, *, limit: int, with_outputs: bool, priority: Priority
    ) -> tuple[SegmindState, dict[str, Any]]:
        """The job's state and answer from its status or result URL; FAILED raises `JobFailed`."""
        state, body = await self._transport.send(
            "GET",
            url,
            idempotent=True,
            limit=limit,
            accept=lambda reply: _job_answer(reply, job.request_id, with_outputs=with_outputs),
            priority=priority,
        )
        if state is SegmindState.FAILED:
            raise JobFailed(error_text(body), request_id=job.request_id)
        return state, body

    def _job_url(self, request_id: str, url: object, documented: str) -> str:
        """Segmind's own URL for a job when it is on the base origin, else the documented one."""
        if isinstance(url, str) and same_origin(url, self.base_url):
            return url
        if url is not None:
            log.warning(
                "segmind %s: ignoring a job URL outside %s; using the documented one",
                request_id,
                self.base_url,
            )
        return documented


# --- reading answers ----------------------------------------------------------------------------------


def _json_object(reply: Reply) -> dict[str, Any]:
    return reply.raise_for_status()


def _job_answer(reply: Reply, request_id: str, *, with_outputs: bool) -> tuple[SegmindState, dict[str, Any]]:
    """A status or result answer: its state and body; any answer outside the API is UnexpectedResponse."""
    body = reply.raise_for_status(request_id=request_id, failed_is_ok=True)
    state = _job_state(body, request_id)
    if with_outputs and state is SegmindState.COMPLETED:
        _outputs(body, request_id)
    return state, body


def _v1_image(reply: Reply) -> bytes:
    if reply.status == 200 and reply.content_type.startswith("image/"):
        return reply.body
    if reply.status in (400, 422):
        text = error_text(reply.data)
        if CONTENT_BLOCK.search(text):
            raise JobFailed(text, request_id="v1")
    body = reply.raise_for_status()
    image = body.get("image")
    if not isinstance(image, str):
        raise UnexpectedResponse("the v1 answer holds no image")
    try:
        return base64.b64decode(image, validate=True)
    except ValueError:
        raise UnexpectedResponse("the v1 answer's image is not valid base64") from None


def _job_state(body: Mapping[str, Any], request_id: str) -> SegmindState:
    status = body.get("status")
    try:
        return SegmindState(status.upper() if isinstance(status, str) else "")
    except ValueError:
        shown = status[:100] if isinstance(status, str) else status
        raise UnexpectedResponse(f"unknown job status {shown!r}", request_id=request_id) from None


def _outputs(body: Mapping[str, Any], request_id: str) -> tuple[str, ...]:
    outputs = body.get("output")
    if isinstance(outputs, str):
        outputs = [outputs]
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o for o in outputs):
        raise UnexpectedResponse("the result has no output", request_id=request_id)
    return tuple(outputs)
