"""Async client for Segmind's serverless API: v2 queue (submit, status, result, wait) and v1 sync.

Segmind has no idempotency key, so a submit that got a 2xx is never sent again; status and result GETs
are safe to retry. Every call, polls included, spends from one shared request budget.

Segmind's answers are not trusted:

* The key goes only to the origin (scheme, host, port) of the configured base URL. A status or response
  URL on another origin is replaced by the documented one on the base; redirects are never followed by
  aiohttp, only by the client itself and only on the same origin.
* Every text that comes out of an answer (JSON strings, raw text, headers) has the key scrubbed from it
  where the answer is read, so no error, log line or stored result can carry it further.
* Bodies are read with a size cap; a malformed or oversized answer to a GET is retried like a 5xx.
* A rate-limit reset that is absurd counts as unknown, and no single 429 pauses the budget for longer
  than its `max_pause`.

Errors, all raised with the request id when there is one::

    SegmindError
    ├── BadRequest                400
    ├── Unauthorized              401
    ├── Forbidden                 403
    ├── NotFound                  404
    ├── InsufficientCredits       406 about credits
    ├── NotAcceptable             406 for another reason
    ├── RateLimited               429, with reset_at
    │   └── BudgetExhausted       our own budget had no slot within max_wait; nothing was sent
    ├── ServerError               5xx
    ├── SegmindConnectionError    connection failed or timed out
    ├── UnexpectedResponse        an answer outside the API: bad JSON, unknown status, too large, redirect
    ├── JobFailed                 the job ended FAILED (content blocks too)
    └── JobTimeout                the wait passed its deadline
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import random
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

from services.request import GenerationRequest

log = logging.getLogger(__name__)

T = TypeVar("T")

RESET_HEADER = "x-rate-limit-reset-at-utc"
FIRST_POLL_DELAY = 0.75
MAX_RATE_LIMITED_WAITS = 10
MiB = 1024 * 1024
SMALL_BODY_LIMIT = 1 * MiB  # submit and status answers are a few hundred bytes
RESULT_BODY_LIMIT = 64 * MiB  # result answers carry every image in base64 when base64=true
V1_BODY_LIMIT = 32 * MiB  # v1 answers are one image (bytes, or JSON with base64)
MAX_REDIRECT_HOPS = 3
MAX_RESET_AHEAD = 3600.0  # Segmind's limits are per minute: a reset further ahead than this is not real
DEFAULT_MAX_PAUSE = 120.0
VERIFY_TIMEOUT = 5.0
ERROR_SNIPPET = 300
_READ_CHUNK = 64 * 1024
# A key this short is not a Segmind key; replacing it would mangle ordinary text and base64 images.
_MIN_SCRUBBED_KEY = 8
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Segmind reports content blocks only as FAILED with an error text; these are the words such texts use.
_CONTENT_BLOCK = re.compile(
    r"\b(rai|nsfw|unsafe|safety|moderation|inappropriate|prohibited)\b"
    r"|\bcontent (filter|policy|moderation|violation)|\bblocked by",
    re.IGNORECASE,
)
_CREDITS = re.compile(r"credit|balance|insufficient", re.IGNORECASE)


class SegmindState(StrEnum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


# --- errors -------------------------------------------------------------------------------------------


class SegmindError(Exception):
    """Base of every client error; the subclasses say what went wrong so the bot can answer each."""

    def __init__(self, message: str, *, status: int | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.request_id = request_id


class BadRequest(SegmindError):
    """400: Segmind rejected the parameters."""


class Unauthorized(SegmindError):
    """401: missing or invalid API key."""


class Forbidden(SegmindError):
    """403: the key lacks permission for this model."""


class NotFound(SegmindError):
    """404: unknown model, or a request id that is unknown or past Segmind's 1-hour retention."""


class InsufficientCredits(SegmindError):
    """406 whose body says the account is out of credits."""


class NotAcceptable(SegmindError):
    """406 for any other reason (e.g. content type)."""


class RateLimited(SegmindError):
    """429: carries when Segmind says the limit resets."""

    def __init__(self, message: str, *, reset_at: datetime | None, request_id: str | None = None) -> None:
        super().__init__(message, status=429, request_id=request_id)
        self.reset_at = reset_at

    def seconds_until_reset(self, now: datetime | None = None) -> float | None:
        if self.reset_at is None:
            return None
        return max(0.0, (self.reset_at - (now or datetime.now(UTC))).total_seconds())


class BudgetExhausted(RateLimited):
    """Our own request budget could not grant a slot within the caller's `max_wait`; nothing was sent.

    `reset_at` is when a slot is expected, so the member can be told when to try again.
    """

    def __init__(self, message: str, *, reset_at: datetime, request_id: str | None = None) -> None:
        super().__init__(message, reset_at=reset_at, request_id=request_id)
        self.status = None  # no answer from Segmind: the request never left


class ServerError(SegmindError):
    """5xx after retries (GETs) or on a submit."""


class SegmindConnectionError(SegmindError):
    """The connection failed or timed out after retries (GETs) or while submitting."""


class UnexpectedResponse(SegmindError):
    """An answer that does not follow the API (bad JSON, missing fields, unknown status)."""


class JobFailed(SegmindError):
    """The job ended FAILED. Content/RAI blocks are FAILED too; `is_content_block` tells them apart."""

    def __init__(self, error: str, *, request_id: str) -> None:
        super().__init__(error or "the job failed without detail", status=422, request_id=request_id)
        self.error = error
        self.is_content_block = bool(_CONTENT_BLOCK.search(error or ""))


class JobTimeout(SegmindError):
    """The wait passed its deadline; the job may still finish on Segmind's side."""

    def __init__(self, *, request_id: str, waited: float) -> None:
        super().__init__(f"no result after {waited:.0f} s", request_id=request_id)
        self.waited = waited


_ERRORS_BY_STATUS: dict[int, type[SegmindError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
}


# --- request budget -----------------------------------------------------------------------------------


class RequestBudget:
    """At most `per_minute` requests in any sliding 60 s window, granted first come, first served.

    Shared by every call so that polling many jobs can never exceed the plan's limit, and paused as a whole
    when Segmind answers 429, for at most `max_pause` seconds per 429.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        window: float = 60.0,
        max_pause: float = DEFAULT_MAX_PAUSE,
        clock: Callable[[], float] = time.monotonic,
    ):
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        if not 0 <= max_pause < math.inf:
            raise ValueError("max_pause must be a finite number of seconds >= 0")
        self.per_minute = per_minute
        self.window = window
        self.max_pause = max_pause
        self._clock = clock
        self._sent: deque[float] = deque()
        self._line: deque[object] = deque()
        self._changed = asyncio.Condition()
        self._paused_until = 0.0

    @property
    def waiting(self) -> int:
        return len(self._line)

    @property
    def min_spacing(self) -> float:
        return self.window / self.per_minute

    def pause_for(self, seconds: float) -> None:
        # `not > 0` also rejects NaN; the cap keeps one 429 with a far reset from stalling every job.
        if not seconds > 0:
            return
        self._paused_until = max(self._paused_until, self._clock() + min(seconds, self.max_pause))

    async def acquire(
        self, on_wait: Callable[[int, float], None] | None = None, *, max_wait: float | None = None
    ) -> None:
        """Waits for a slot. `on_wait(position, seconds)` is told where this caller stands while it waits.

        With `max_wait`, gives up (BudgetExhausted, carrying when a slot is expected) as soon as it is clear
        that no slot can be granted within that many seconds, and at the latest when they have passed.
        """
        give_up_at = None if max_wait is None else self._clock() + max(0.0, max_wait)
        ticket = object()
        self._line.append(ticket)
        try:
            async with self._changed:
                while True:
                    position = self._line.index(ticket) + 1
                    expected = self._expected_delay(position)
                    if position == 1 and expected <= 0:
                        self._sent.append(self._clock())
                        return
                    timeout = expected if position == 1 else None
                    if give_up_at is not None:
                        remaining = give_up_at - self._clock()
                        if expected > remaining:
                            raise BudgetExhausted(
                                f"no request slot free for {expected:.0f} s",
                                reset_at=datetime.now(UTC) + timedelta(seconds=expected),
                            )
                        timeout = remaining if timeout is None else min(timeout, remaining)
                    if on_wait is not None:
                        on_wait(position, expected)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=timeout)
        finally:
            self._line.remove(ticket)
            async with self._changed:
                self._changed.notify_all()

    def _expected_delay(self, position: int) -> float:
        """Seconds until the caller at `position` in line gets its slot, if nothing else changes.

        Each caller ahead takes the next slot, and its request then fills the window in turn.
        """
        now = self._clock()
        while self._sent and self._sent[0] <= now - self.window:
            self._sent.popleft()
        sends = list(self._sent)
        grant = now
        for _ in range(position):
            grant = max(now, self._paused_until)
            if len(sends) >= self.per_minute:
                grant = max(grant, sends[-self.per_minute] + self.window)
            sends.append(grant)
        return grant - now


# --- polling ------------------------------------------------------------------------------------------


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
        inference = _positive_number(metrics.get("inference_time"))
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


# --- results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmittedJob:
    request_id: str
    status_url: str
    response_url: str
    request: GenerationRequest
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class JobResult:
    request_id: str
    outputs: tuple[str, ...]  # URLs, or base64 image data when the request asked for base64
    is_base64: bool
    metrics: Mapping[str, Any]

    @property
    def inference_time(self) -> float | None:
        return _positive_number(self.metrics.get("inference_time"))


@dataclass(frozen=True)
class JobEvent:
    request_id: str
    state: SegmindState
    elapsed: float
    result: JobResult | None = None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        # Full jitter: spreads retries from many jobs so they do not hit Segmind in lockstep.
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


@dataclass(frozen=True)
class _Reply:
    """One answer as read off the wire; every text taken from it has already been scrubbed of the key."""

    status: int
    body: bytes  # raw, for image bytes; never shown
    headers: Mapping[str, str]  # lower-case names
    content_type: str
    data: Any  # the parsed JSON, or None when the body is not JSON
    _scrub: Callable[[str], str] = field(repr=False)

    def text(self, limit: int = ERROR_SNIPPET) -> str:
        # Scrubbed before it is cut, so a key straddling the cut cannot leave half of itself behind.
        return self._scrub(self.body.decode(errors="replace"))[:limit]


# --- origins ------------------------------------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int | None] | None:
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return None
    if not parsed.is_absolute() or not parsed.host or parsed.scheme not in ("http", "https"):
        return None
    # yarl lower-cases scheme and host and fills in the scheme's default port.
    return parsed.scheme, parsed.host, parsed.port


def same_origin(url: str, other: str) -> bool:
    """Whether two absolute http(s) URLs share scheme, host (any case) and port (default ports filled in)."""
    origin = _origin(url)
    return origin is not None and origin == _origin(other)


# --- client -------------------------------------------------------------------------------------------


class SegmindClient:
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
    ) -> None:
        self._session = session
        self.__api_key = api_key
        self.base_url = base_url.rstrip("/")
        if _origin(self.base_url) is None:
            raise ValueError("base_url must be an absolute http(s) URL")
        self.model = model
        self.budget = budget
        self.deadline = deadline
        self.retry = retry or RetryPolicy()
        self.durations = durations or DurationModel()
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.max_poll_interval = max_poll_interval

    def __repr__(self) -> str:
        return f"SegmindClient(base_url={self.base_url!r}, model={self.model!r})"

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
            reply = await self._exchange(
                "GET", url, None, aiohttp.ClientTimeout(total=VERIFY_TIMEOUT), SMALL_BODY_LIMIT
            )
        except BudgetExhausted:
            reason = "the request budget has no free slot"
        except SegmindError as error:
            reason = error.message
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            reason = f"Segmind could not be reached ({type(error).__name__})"
        except Exception as error:
            # Start-up must go on whatever happened here; only a refused key may stop it.
            reason = f"unexpected {type(error).__name__}"
        else:
            if reply.status in (401, 403):
                message = _error_text(reply.data) or reply.text() or f"HTTP {reply.status}"
                raise _ERRORS_BY_STATUS[reply.status](message, status=reply.status)
            if 200 <= reply.status < 300 or reply.status in (404, 422):
                return True
            if reply.status == 429:
                self._pause_budget(reply)
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
    ) -> SubmittedJob:
        """Queues one job. Sent at most once: only a connection that never opened is tried again.

        `before_send` is awaited just before the request leaves, once a budget slot is granted, so the caller
        can record that from now on the job may exist at Segmind. With `max_wait`, a budget that cannot grant
        a slot within that many seconds raises BudgetExhausted and nothing is sent.
        """
        request = request.with_concrete_seed()
        url = f"{self.base_url}/v2/{self.model}"
        body = await self._send(
            "POST",
            url,
            payload=request.to_payload(),
            idempotent=False,
            limit=SMALL_BODY_LIMIT,
            accept=_json_object,
            on_budget_wait=on_budget_wait,
            before_send=before_send,
            max_wait=max_wait,
        )
        request_id = body.get("request_id")
        if isinstance(request_id, int) and not isinstance(request_id, bool):
            request_id = str(request_id)
        if not isinstance(request_id, str) or not request_id:
            raise UnexpectedResponse("the submit answer lacks a request_id")
        documented = self.resume(request_id, request)
        job = SubmittedJob(
            request_id=request_id,
            status_url=self._job_url(request_id, body.get("status_url"), documented.status_url),
            response_url=self._job_url(request_id, body.get("response_url"), documented.response_url),
            request=request,
        )
        log.info(
            "segmind %s: submitted (%d image(s), seed %d)", job.request_id, request.samples, request.seed
        )
        return job

    def resume(
        self, request_id: str, request: GenerationRequest, *, submitted_at: float | None = None
    ) -> SubmittedJob:
        """A handle on a job submitted earlier (e.g. before a restart), without submitting again."""
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
            job.request_id, job.status_url, self.resume(job.request_id, job.request).status_url
        )
        state, body = await self._send(
            "GET",
            url,
            idempotent=True,
            limit=SMALL_BODY_LIMIT,
            accept=lambda reply: _job_answer(reply, job.request_id, with_outputs=False),
        )
        if state is SegmindState.FAILED:
            raise JobFailed(_error_text(body), request_id=job.request_id)
        return state

    async def result(self, job: SubmittedJob) -> JobResult:
        url = self._job_url(
            job.request_id, job.response_url, self.resume(job.request_id, job.request).response_url
        )
        state, body = await self._send(
            "GET",
            url,
            idempotent=True,
            limit=RESULT_BODY_LIMIT,
            accept=lambda reply: _job_answer(reply, job.request_id, with_outputs=True),
        )
        if state is SegmindState.FAILED:
            raise JobFailed(_error_text(body), request_id=job.request_id)
        if state is not SegmindState.COMPLETED:
            raise UnexpectedResponse(f"result asked while the job is {state}", request_id=job.request_id)
        metrics = body.get("metrics") if isinstance(body.get("metrics"), dict) else {}
        return JobResult(job.request_id, _outputs(body, job.request_id), job.request.base64, metrics)

    async def wait(self, job: SubmittedJob, *, deadline: float | None = None) -> AsyncIterator[JobEvent]:
        """Yields an event after every status check; the last one is COMPLETED and carries the result.

        FAILED raises JobFailed; passing the deadline raises JobTimeout with the request id.
        """
        deadline_at = job.submitted_at + (self.deadline if deadline is None else deadline)
        expected_inference = self.durations.expected_inference(job.request)
        state: SegmindState | None = None
        processing_since: float | None = None
        last_seen_queued = job.submitted_at
        while True:
            now = time.monotonic()
            delay = next_poll_delay(
                state=state,
                since_submit=now - job.submitted_at,
                processing_for=None if processing_since is None else now - processing_since,
                expected_queue=self.durations.queue_seconds,
                expected_inference=expected_inference,
                min_interval=max(0.5, self.budget.min_spacing),
                max_interval=self.max_poll_interval,
            )
            if now >= deadline_at:
                raise JobTimeout(request_id=job.request_id, waited=now - job.submitted_at)
            await asyncio.sleep(min(delay, deadline_at - now))
            try:
                # Retries and rate-limit waits inside one status check must not outlast the deadline either.
                async with asyncio.timeout(max(0.1, deadline_at - time.monotonic())) as limit:
                    new_state = await self.status(job)
            except TimeoutError:
                if not limit.expired():
                    raise
                raise JobTimeout(
                    request_id=job.request_id, waited=time.monotonic() - job.submitted_at
                ) from None
            except JobFailed as failed:
                log.info(
                    "segmind %s: FAILED (%s)",
                    job.request_id,
                    "content block" if failed.is_content_block else failed.error,
                )
                raise
            seen_at = time.monotonic()
            elapsed = seen_at - job.submitted_at
            if new_state is SegmindState.QUEUED:
                last_seen_queued = seen_at
            if new_state is not state:
                log.info("segmind %s: %s after %.1f s", job.request_id, new_state, elapsed)
                if new_state is SegmindState.PROCESSING:
                    # The job started somewhere between the last QUEUED answer and now; sparse polls
                    # while queued would otherwise make every later estimate of its finish late.
                    expected_start = job.submitted_at + self.durations.queue_seconds
                    processing_since = min(seen_at, max(last_seen_queued, expected_start))
                state = new_state
            if state is SegmindState.COMPLETED:
                result = await self.result(job)
                self.durations.learn(job.request, result.metrics)
                yield JobEvent(job.request_id, state, elapsed, result)
                return
            yield JobEvent(job.request_id, state, elapsed)

    # -- v1 sync --

    async def generate_sync(self, request: GenerationRequest) -> bytes:
        """The v1 endpoint: blocks until the image is ready and returns its bytes (v1 returns one image)."""
        request = request.with_concrete_seed()
        url = f"{self.base_url}/v1/{self.model}"
        timeout = aiohttp.ClientTimeout(total=self.deadline)
        return await self._send(
            "POST",
            url,
            payload=request.to_payload(),
            idempotent=False,
            limit=V1_BODY_LIMIT,
            accept=_v1_image,
            timeout=timeout,
        )

    # -- the job's URLs --

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

    # -- transport --

    async def _send(
        self,
        method: str,
        url: str,
        *,
        payload: dict[str, Any] | None = None,
        idempotent: bool,
        limit: int,
        accept: Callable[[_Reply], T],
        on_budget_wait: Callable[[int, float], None] | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        max_wait: float | None = None,
    ) -> T:
        """Budget, 429 waits, same-origin redirects and retries around single exchanges.

        `accept` turns the answer into the caller's value or raises; an UnexpectedResponse from it (a
        malformed or odd answer) is retried like a 5xx when the request is idempotent.
        """
        give_up_at = None if max_wait is None else time.monotonic() + max_wait
        attempts = rate_limited = hops = 0
        target = url
        while True:
            await self.budget.acquire(
                on_budget_wait, max_wait=None if give_up_at is None else give_up_at - time.monotonic()
            )
            if before_send is not None:
                await before_send()
            failure: Exception
            try:
                reply = await self._exchange(method, target, payload, timeout or self._timeout, limit)
            except aiohttp.ClientConnectorError as exc:
                # The connection never opened, so nothing reached Segmind: safe to retry, even a submit.
                failure = exc
            except UnexpectedResponse as exc:
                if not idempotent:
                    raise
                failure = exc
            except (TimeoutError, aiohttp.ClientError) as exc:
                if not idempotent:
                    raise SegmindConnectionError(
                        f"the submit's answer was lost ({type(exc).__name__})"
                    ) from None
                failure = exc
            else:
                hop = self._redirect_to_follow(method, reply, target)
                if hop is not None and hops < MAX_REDIRECT_HOPS:
                    hops += 1
                    target = hop
                    continue
                if reply.status == 429:
                    self._pause_budget(reply)
                    rate_limited += 1
                    # A rate-limited GET waits in the paused budget rather than spending a retry.
                    if idempotent and rate_limited < MAX_RATE_LIMITED_WAITS:
                        continue
                    return accept(reply)
                if reply.status >= 500 and idempotent:
                    failure = ServerError(f"Segmind answered {reply.status}", status=reply.status)
                else:
                    try:
                        return accept(reply)
                    except UnexpectedResponse as exc:
                        if not idempotent:
                            raise
                        failure = exc
            # A retry starts again from the URL asked for, not from where a redirect led.
            target, hops = url, 0
            attempts += 1
            if attempts >= self.retry.attempts:
                if isinstance(failure, SegmindError):
                    raise failure
                raise SegmindConnectionError(
                    f"Segmind could not be reached ({type(failure).__name__})"
                ) from None
            delay = self.retry.delay(attempts)
            log.warning(
                "segmind %s %s: retry %d in %.1f s after %s",
                method,
                _path(url),
                attempts,
                delay,
                _describe(failure),
            )
            await asyncio.sleep(delay)

    def _redirect_to_follow(self, method: str, reply: _Reply, url: str) -> str | None:
        """Where a redirect leads, when the client may follow it itself: same origin, same meaning."""
        if reply.status not in _REDIRECT_STATUSES or "location" not in reply.headers:
            return None
        # 301-303 would turn a POST into a GET, which means nothing to Segmind's submit.
        if method != "GET" and reply.status not in (307, 308):
            return None
        try:
            location = str(URL(url).join(URL(reply.headers["location"])))
        except (TypeError, ValueError):
            return None
        if not same_origin(location, self.base_url):
            log.warning("segmind %s %s: not following a redirect to another origin", method, _path(url))
            return None
        return location

    async def _exchange(
        self,
        method: str,
        url: str,
        payload: dict[str, Any] | None,
        timeout: aiohttp.ClientTimeout,
        limit: int,
    ) -> _Reply:
        """One request and its answer, read up to `limit` bytes: the only place the key is put on the wire."""
        if not same_origin(url, self.base_url):
            raise SegmindError("refusing to send the API key outside the configured base URL")
        headers = {"x-api-key": self.__api_key, "Accept": "application/json"}
        async with self._session.request(
            method,
            url,
            json=payload,
            headers=headers,
            timeout=timeout,
            # aiohttp would carry x-api-key along a redirect to any host; redirects are _send's to judge.
            allow_redirects=False,
            raise_for_status=False,
        ) as response:
            body = await _read_capped(response, limit)
            content_type = response.content_type or ""
            headers_seen = {name.lower(): self._scrub(value) for name, value in response.headers.items()}
            status = response.status
        # Parsed on the loop: json holds the GIL, so a thread would not help. The caps bound the cost (about
        # 0.1 s for a result at its 64 MiB cap, the price of base64 images).
        data = None if content_type.startswith("image/") else _parse_json(body, self._scrub)
        return _Reply(status, body, headers_seen, content_type, data, self._scrub)

    def _pause_budget(self, reply: _Reply) -> None:
        reset_at = parse_reset_at(reply.headers.get(RESET_HEADER))
        seconds = (reset_at - datetime.now(UTC)).total_seconds() if reset_at else self.budget.min_spacing
        seconds = min(max(0.0, seconds), self.budget.max_pause)
        log.warning("segmind: rate limited; pausing every request for %.1f s", seconds)
        self.budget.pause_for(seconds)

    def _scrub(self, text: str) -> str:
        # Some gateways echo request headers in error bodies; the key must never travel further.
        key = self.__api_key
        return text.replace(key, "***") if len(key) >= _MIN_SCRUBBED_KEY else text


# --- reading answers ----------------------------------------------------------------------------------


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    declared = response.content_length
    if declared is not None and declared > limit:
        response.close()
        raise UnexpectedResponse(
            f"Segmind's answer is too large ({declared} bytes, the limit is {limit})", status=response.status
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            # Closing drops the connection, so the rest of the body is never read.
            response.close()
            raise UnexpectedResponse(
                f"Segmind's answer is larger than the limit of {limit} bytes", status=response.status
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(body: bytes, scrub: Callable[[str], str]) -> Any:
    try:
        return _scrub_strings(json.loads(body), scrub)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _scrub_strings(value: Any, scrub: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [_scrub_strings(item, scrub) for item in value]
    if isinstance(value, dict):
        return {scrub(name): _scrub_strings(item, scrub) for name, item in value.items()}
    return value


def _json_object(reply: _Reply) -> dict[str, Any]:
    return _raise_for_status(reply)


def _job_answer(reply: _Reply, request_id: str, *, with_outputs: bool) -> tuple[SegmindState, dict[str, Any]]:
    """A status or result answer: its state and body; any answer outside the API is UnexpectedResponse."""
    body = _raise_for_status(reply, request_id=request_id, failed_is_ok=True)
    state = _job_state(body, request_id)
    if with_outputs and state is SegmindState.COMPLETED:
        _outputs(body, request_id)
    return state, body


def _v1_image(reply: _Reply) -> bytes:
    if reply.status == 200 and reply.content_type.startswith("image/"):
        return reply.body
    if reply.status in (400, 422):
        text = _error_text(reply.data)
        if _CONTENT_BLOCK.search(text):
            raise JobFailed(text, request_id="v1")
    body = _raise_for_status(reply)
    image = body.get("image")
    if not isinstance(image, str):
        raise UnexpectedResponse("the v1 answer holds no image")
    try:
        return base64.b64decode(image, validate=True)
    except ValueError:
        raise UnexpectedResponse("the v1 answer's image is not valid base64") from None


def _raise_for_status(
    reply: _Reply, *, request_id: str | None = None, failed_is_ok: bool = False
) -> dict[str, Any]:
    body = reply.data
    if 200 <= reply.status < 300 or (reply.status == 422 and failed_is_ok and isinstance(body, dict)):
        if not isinstance(body, dict):
            raise UnexpectedResponse(
                f"Segmind answered {reply.status} without a JSON object", request_id=request_id
            )
        return body
    if 300 <= reply.status < 400:
        raise UnexpectedResponse(
            f"Segmind answered {reply.status}, a redirect that is not followed",
            status=reply.status,
            request_id=request_id,
        )
    message = (_error_text(body) if isinstance(body, dict) else reply.text()) or f"HTTP {reply.status}"
    if reply.status == 429:
        raise RateLimited(
            message, reset_at=parse_reset_at(reply.headers.get(RESET_HEADER)), request_id=request_id
        )
    if reply.status == 406:
        kind = InsufficientCredits if _CREDITS.search(message) else NotAcceptable
        raise kind(message, status=406, request_id=request_id)
    if reply.status >= 500:
        raise ServerError(message, status=reply.status, request_id=request_id)
    raise _ERRORS_BY_STATUS.get(reply.status, SegmindError)(
        message, status=reply.status, request_id=request_id
    )


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


def _error_text(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    for key in ("error", "message", "detail"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value[:500]
    return ""


def parse_reset_at(value: str | None, now: datetime | None = None) -> datetime | None:
    """When `x-rate-limit-reset-at-utc` (ISO 8601 or epoch seconds) says the limit resets.

    None when the header is missing or absurd: unparseable, not finite, negative, in the past, or more than
    an hour ahead. A hostile or broken header must neither crash the client nor stall every job.
    """
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        reset_at = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    else:
        if not math.isfinite(seconds) or seconds < 0:
            return None
        try:
            reset_at = datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    ahead = (reset_at - (now or datetime.now(UTC))).total_seconds()
    return reset_at if 0 < ahead <= MAX_RESET_AHEAD else None


def _positive_number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    return None


def _path(url: str) -> str:
    return url.split("://", 1)[-1].partition("/")[2].split("?")[0]


def _describe(failure: Exception) -> str:
    if isinstance(failure, SegmindError):
        return failure.message
    return type(failure).__name__
