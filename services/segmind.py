"""Async client for Segmind's serverless API: v2 queue (submit, status, result, wait) and v1 sync.

Segmind has no idempotency key, so a submit that got a 2xx is never sent again; status and result GETs
are safe to retry. Every call, polls included, spends from one shared request budget.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import aiohttp

from services.request import GenerationRequest

log = logging.getLogger(__name__)

RESET_HEADER = "x-rate-limit-reset-at-utc"
FIRST_POLL_DELAY = 0.75
MAX_RATE_LIMITED_WAITS = 10
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
    when Segmind answers 429.
    """

    def __init__(self, per_minute: int, *, window: float = 60.0, clock: Callable[[], float] = time.monotonic):
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self.window = window
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
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    async def acquire(self, on_wait: Callable[[int, float], None] | None = None) -> None:
        """Waits for a slot. `on_wait(position, seconds)` is told where this caller stands while it waits."""
        ticket = object()
        self._line.append(ticket)
        try:
            async with self._changed:
                while True:
                    position = self._line.index(ticket) + 1
                    delay = self._delay_for_first() if position == 1 else None
                    if delay is not None and delay <= 0:
                        self._sent.append(self._clock())
                        return
                    if on_wait is not None:
                        on_wait(position, delay if delay is not None else self._delay_for_first())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=delay)
        finally:
            self._line.remove(ticket)
            async with self._changed:
                self._changed.notify_all()

    def _delay_for_first(self) -> float:
        now = self._clock()
        while self._sent and self._sent[0] <= now - self.window:
            self._sent.popleft()
        delay = self._paused_until - now
        if len(self._sent) >= self.per_minute:
            delay = max(delay, self._sent[0] + self.window - now)
        return delay


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
        if isinstance(queued, int | float) and queued >= 0:
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
    status: int
    body: bytes
    headers: Mapping[str, str]
    content_type: str

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None


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
        self.model = model
        self.budget = budget
        self.deadline = deadline
        self.retry = retry or RetryPolicy()
        self.durations = durations or DurationModel()
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.max_poll_interval = max_poll_interval

    def __repr__(self) -> str:
        return f"SegmindClient(base_url={self.base_url!r}, model={self.model!r})"

    # -- v2 queue --

    async def submit(
        self,
        request: GenerationRequest,
        *,
        on_budget_wait: Callable[[int, float], None] | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> SubmittedJob:
        """Queues one job. Sent at most once: only a connection that never opened is tried again.

        `before_send` is awaited just before the request leaves, once a budget slot is granted, so the caller
        can record that from now on the job may exist at Segmind.
        """
        request = request.with_concrete_seed()
        url = f"{self.base_url}/v2/{self.model}"
        reply = await self._send(
            "POST",
            url,
            payload=request.to_payload(),
            idempotent=False,
            on_budget_wait=on_budget_wait,
            before_send=before_send,
        )
        body = self._raise_for_status(reply)
        try:
            job = SubmittedJob(
                request_id=str(body["request_id"]),
                status_url=str(body["status_url"]),
                response_url=str(body["response_url"]),
                request=request,
            )
        except (KeyError, TypeError):
            raise UnexpectedResponse(
                "the submit answer lacks request_id, status_url or response_url"
            ) from None
        log.info(
            "segmind %s: submitted (%d image(s), seed %d)", job.request_id, request.samples, request.seed
        )
        return job

    def resume(
        self, request_id: str, request: GenerationRequest, *, submitted_at: float | None = None
    ) -> SubmittedJob:
        """A handle on a job submitted earlier (e.g. before a restart), without submitting again."""
        return SubmittedJob(
            request_id=request_id,
            status_url=f"{self.base_url}/v2/requests/{request_id}/status",
            response_url=f"{self.base_url}/v2/requests/{request_id}",
            request=request,
            submitted_at=time.monotonic() if submitted_at is None else submitted_at,
        )

    async def status(self, job: SubmittedJob) -> SegmindState:
        reply = await self._send("GET", job.status_url, idempotent=True)
        body = self._raise_for_status(reply, request_id=job.request_id, failed_is_ok=True)
        state = _job_state(body, job.request_id)
        if state is SegmindState.FAILED:
            raise JobFailed(_error_text(body), request_id=job.request_id)
        return state

    async def result(self, job: SubmittedJob) -> JobResult:
        reply = await self._send("GET", job.response_url, idempotent=True)
        body = self._raise_for_status(reply, request_id=job.request_id, failed_is_ok=True)
        state = _job_state(body, job.request_id)
        if state is SegmindState.FAILED:
            raise JobFailed(_error_text(body), request_id=job.request_id)
        if state is not SegmindState.COMPLETED:
            raise UnexpectedResponse(f"result asked while the job is {state}", request_id=job.request_id)
        outputs = body.get("output")
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise UnexpectedResponse("the result has no output", request_id=job.request_id)
        metrics = body.get("metrics") if isinstance(body.get("metrics"), dict) else {}
        return JobResult(job.request_id, tuple(outputs), job.request.base64, metrics)

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
        reply = await self._send("POST", url, payload=request.to_payload(), idempotent=False, timeout=timeout)
        if reply.status == 200 and reply.content_type.startswith("image/"):
            return reply.body
        if reply.status in (400, 422):
            text = _error_text(reply.json())
            if _CONTENT_BLOCK.search(text):
                raise JobFailed(text, request_id="v1")
        body = self._raise_for_status(reply)
        image = body.get("image")
        if not isinstance(image, str):
            raise UnexpectedResponse("the v1 answer holds no image")
        try:
            return base64.b64decode(image, validate=True)
        except ValueError:
            raise UnexpectedResponse("the v1 answer's image is not valid base64") from None

    # -- transport --

    async def _send(
        self,
        method: str,
        url: str,
        *,
        payload: dict[str, Any] | None = None,
        idempotent: bool,
        on_budget_wait: Callable[[int, float], None] | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> _Reply:
        attempts = rate_limited = 0
        while True:
            await self.budget.acquire(on_budget_wait)
            if before_send is not None:
                await before_send()
            failure: Exception
            try:
                reply = await self._exchange(method, url, payload, timeout or self._timeout)
            except aiohttp.ClientConnectorError as exc:
                # The connection never opened, so nothing reached Segmind: safe to retry, even a submit.
                failure = exc
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                if not idempotent:
                    raise SegmindConnectionError(
                        f"the submit's answer was lost ({type(exc).__name__})"
                    ) from None
                failure = exc
            else:
                if reply.status == 429:
                    self._pause_budget(reply)
                    rate_limited += 1
                    # A rate-limited GET waits in the paused budget rather than spending a retry.
                    if idempotent and rate_limited < MAX_RATE_LIMITED_WAITS:
                        continue
                    return reply
                if reply.status < 500 or not idempotent:
                    return reply
                failure = ServerError(f"Segmind answered {reply.status}", status=reply.status)
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

    async def _exchange(
        self, method: str, url: str, payload: dict[str, Any] | None, timeout: aiohttp.ClientTimeout
    ) -> _Reply:
        headers = {"x-api-key": self.__api_key, "Accept": "application/json"}
        async with self._session.request(
            method, url, json=payload, headers=headers, timeout=timeout
        ) as response:
            body = await response.read()
            return _Reply(response.status, body, dict(response.headers), response.content_type or "")

    def _pause_budget(self, reply: _Reply) -> None:
        reset_at = _parse_reset(reply.headers.get(RESET_HEADER))
        seconds = (reset_at - datetime.now(UTC)).total_seconds() if reset_at else self.budget.min_spacing
        log.warning("segmind: rate limited; pausing every request for %.1f s", seconds)
        self.budget.pause_for(max(0.0, seconds))

    def _raise_for_status(
        self, reply: _Reply, *, request_id: str | None = None, failed_is_ok: bool = False
    ) -> dict[str, Any]:
        body = reply.json()
        if 200 <= reply.status < 300 or (reply.status == 422 and failed_is_ok and isinstance(body, dict)):
            if not isinstance(body, dict):
                raise UnexpectedResponse(
                    f"Segmind answered {reply.status} without a JSON object", request_id=request_id
                )
            return body
        message = self._scrub(
            _error_text(body) if isinstance(body, dict) else reply.body[:300].decode(errors="replace")
        )
        message = message or f"HTTP {reply.status}"
        if reply.status == 429:
            raise RateLimited(
                message, reset_at=_parse_reset(reply.headers.get(RESET_HEADER)), request_id=request_id
            )
        if reply.status == 406:
            kind = InsufficientCredits if _CREDITS.search(message) else NotAcceptable
            raise kind(message, status=406, request_id=request_id)
        if reply.status >= 500:
            raise ServerError(message, status=reply.status, request_id=request_id)
        raise _ERRORS_BY_STATUS.get(reply.status, SegmindError)(
            message, status=reply.status, request_id=request_id
        )

    def _scrub(self, text: str) -> str:
        # Some gateways echo request headers in error bodies; the key must never travel further.
        return text.replace(self.__api_key, "***") if self.__api_key else text


def _job_state(body: Mapping[str, Any], request_id: str) -> SegmindState:
    try:
        return SegmindState(str(body.get("status", "")).upper())
    except ValueError:
        raise UnexpectedResponse(
            f"unknown job status {body.get('status')!r}", request_id=request_id
        ) from None


def _error_text(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    for key in ("error", "message", "detail"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value[:500]
    return ""


def _parse_reset(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _positive_number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def _path(url: str) -> str:
    return url.split("://", 1)[-1].partition("/")[2].split("?")[0]


def _describe(failure: Exception) -> str:
    if isinstance(failure, SegmindError):
        return failure.message
    return type(failure).__name__
