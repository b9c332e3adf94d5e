"""The HTTP layer under the client: every keyed request to Segmind goes through `Transport.send`.

`send` is built in layers, each calling the next and doing one thing:

    send                retries of 5xx, dropped connections and malformed answers, with backoff and jitter
    _follow_redirects   same-origin redirects, each hop a request of its own
    _paced              one budget slot per request; 429 pauses the budget, and a GET waits it out
    exchange            one request and its answer: origin check, the key, body caps, key scrubbing
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from services.segmind.budget import RESET_HEADER, Priority, RequestBudget, parse_reset_at
from services.segmind.errors import (
    _CREDITS,
    ERRORS_BY_STATUS,
    BudgetExhausted,
    InsufficientCredits,
    NotAcceptable,
    RateLimited,
    SegmindConnectionError,
    SegmindError,
    ServerError,
    UnexpectedResponse,
)
from services.segmind.inflight import InFlightGate

# A request that waited longer than this at the in-flight gate after its budget slot was granted is
# counted once more when it leaves: the plan's window is counted over 61 s for one second of such slack.
GATE_GRACE_SECONDS = 0.5
# When a submit that could not get through the gate in time is worth another try.
GATE_RETRY_SECONDS = 10.0

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_RATE_LIMITED_WAITS = 10
MAX_REDIRECT_HOPS = 3
ERROR_SNIPPET = 300
_READ_CHUNK = 64 * 1024
# A key this short is not a Segmind key; replacing it would mangle ordinary text and base64 images.
_MIN_SCRUBBED_KEY = 8
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CACHED_URL_LENGTH = 2048


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how far apart a safe request is tried again: exponential backoff, full jitter."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        # Full jitter: spreads retries from many jobs so they do not hit Segmind in lockstep.
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


@dataclass(frozen=True)
class Reply:
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

    def raise_for_status(
        self, *, request_id: str | None = None, failed_is_ok: bool = False
    ) -> dict[str, Any]:
        """The JSON object of a 2xx answer (or of a FAILED job's 422 when `failed_is_ok`); else the error."""
        body = self.data
        if 200 <= self.status < 300 or (self.status == 422 and failed_is_ok and isinstance(body, dict)):
            if not isinstance(body, dict):
                raise UnexpectedResponse(
                    f"Segmind answered {self.status} without a JSON object", request_id=request_id
                )
            return body
        if 300 <= self.status < 400:
            raise UnexpectedResponse(
                f"Segmind answered {self.status}, a redirect that is not followed",
                status=self.status,
                request_id=request_id,
            )
        message = (error_text(body) if isinstance(body, dict) else self.text()) or f"HTTP {self.status}"
        if self.status == 429:
            raise RateLimited(
                message, reset_at=parse_reset_at(self.headers.get(RESET_HEADER)), request_id=request_id
            )
        if self.status == 406:
            kind = InsufficientCredits if _CREDITS.search(message) else NotAcceptable
            raise kind(message, status=406, request_id=request_id)
        if self.status >= 500:
            raise ServerError(message, status=self.status, request_id=request_id)
        raise ERRORS_BY_STATUS.get(self.status, SegmindError)(
            message, status=self.status, request_id=request_id
        )


class NoAnswer(Exception):
    """An exchange that broke off before its answer was read in full; `cause` is aiohttp's error.

    `sent` is False only when the connection never opened, so that nothing reached Segmind.
    """

    def __init__(self, cause: Exception, *, sent: bool) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause
        self.sent = sent


@dataclass
class _Call:
    """One call of `Transport.send`, as the layers under it need it."""

    method: str
    url: str
    payload: dict[str, Any] | None
    idempotent: bool
    limit: int
    timeout: aiohttp.ClientTimeout
    on_budget_wait: Callable[[int, float], None] | None
    before_send: Callable[[], Awaitable[None]] | None
    on_granted: Callable[[], None] | None
    give_up_at: float | None
    priority: Priority
    asker: Hashable | None
    rate_limited: int = 0  # 429s across every retry of the call, so waiting them out ends somewhere


# --- origins ------------------------------------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int | None] | None:
    # Every check of a job asks about the same few URLs: parsed once each, not at every request. A URL
    # from an answer may be long, and only ordinary ones are kept.
    if isinstance(url, str) and len(url) <= CACHED_URL_LENGTH:
        return _known_origin(url)
    return _parsed_origin(url)


@functools.lru_cache(maxsize=4096)
def _known_origin(url: str) -> tuple[str, str, int | None] | None:
    return _parsed_origin(url)


def _parsed_origin(url: str) -> tuple[str, str, int | None] | None:
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


# --- transport ----------------------------------------------------------------------------------------


class Transport:
    """Keyed requests to one Segmind origin, within one request budget.

    * The key goes only to the origin (scheme, host, port) of `base_url`: `exchange` refuses any other URL,
      aiohttp never follows a redirect, and the client follows one itself only on the same origin.
    * Every text that comes out of an answer (JSON strings, raw text, headers) has the key scrubbed from it
      where the answer is read, so no error, log line or stored result can carry it further.
    * Bodies are read with a size cap, every request has a timeout, and a malformed or oversized answer to
      a GET is retried like a 5xx.
    * Every request, redirect hops and retries included, takes a slot of `budget`; a 429 pauses the whole
      budget, for at most its `max_pause`. Then it waits for a slot of `in_flight`, by the same priority.
    * GETs are retried (`retry`); a request that is not idempotent is sent again only when the connection
      never opened, since Segmind has no idempotency key and a second submit is billed twice.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_key: str,
        base_url: str,
        budget: RequestBudget,
        retry: RetryPolicy,
        timeout: aiohttp.ClientTimeout,
        in_flight: InFlightGate | None = None,
    ) -> None:
        if _origin(base_url) is None:
            raise ValueError("base_url must be an absolute http(s) URL")
        self._session = session
        self.__api_key = api_key
        self.base_url = base_url
        self.budget = budget
        self.retry = retry
        self.timeout = timeout
        self.in_flight = in_flight or InFlightGate()

    def __repr__(self) -> str:
        return f"Transport(base_url={self.base_url!r})"

    async def send(
        self,
        method: str,
        url: str,
        *,
        payload: dict[str, Any] | None = None,
        idempotent: bool,
        limit: int,
        accept: Callable[[Reply], T],
        on_budget_wait: Callable[[int, float], None] | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
        on_granted: Callable[[], None] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        max_wait: float | None = None,
        priority: Priority = Priority.STATUS,
        asker: Hashable | None = None,
    ) -> T:
        """The layer of retries: the layers below, tried again after a 5xx, a drop or a malformed answer.

        `accept` turns the answer into the caller's value or raises; an UnexpectedResponse from it (a
        malformed or odd answer) is retried like a 5xx when the request is idempotent.
        """
        call = _Call(
            method,
            url,
            payload,
            idempotent,
            limit,
            timeout or self.timeout,
            on_budget_wait,
            before_send,
            on_granted,
            None if max_wait is None else time.monotonic() + max_wait,
            priority,
            asker,
        )
        attempts = 0
        while True:
            failure: Exception
            try:
                reply = await self._follow_redirects(call)
                if not (idempotent and reply.status >= 500):
                    return accept(reply)
                failure = ServerError(f"Segmind answered {reply.status}", status=reply.status)
            except NoAnswer as lost:
                if lost.sent and not idempotent:
                    raise SegmindConnectionError(
                        f"the submit's answer was lost ({type(lost.cause).__name__})"
                    ) from None
                failure = lost.cause
            except UnexpectedResponse as exc:
                if not idempotent:
                    raise
                failure = exc
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

    async def _follow_redirects(self, call: _Call) -> Reply:
        """The layer of redirects: follows same-origin ones, each hop a paced request of its own."""
        # Every attempt starts again from the URL asked for, not from where a redirect led.
        target, hops = call.url, 0
        while True:
            reply = await self._paced(call, target)
            hop = self._redirect_to_follow(call.method, reply, target)
            if hop is None or hops >= MAX_REDIRECT_HOPS:
                return reply
            hops += 1
            target = hop

    async def _paced(self, call: _Call, url: str) -> Reply:
        """The layer of the budget: a slot before every request, and a 429 pauses the budget for all."""
        while True:
            await self.budget.acquire(
                call.on_budget_wait,
                max_wait=None if call.give_up_at is None else call.give_up_at - time.monotonic(),
                priority=call.priority,
                asker=call.asker,
            )
            if call.on_granted is not None:
                call.on_granted()  # at once: the grant counts from here, whatever waits at the gate
            granted_at = time.monotonic()
            async with self._in_flight_slot(call):
                if time.monotonic() - granted_at > GATE_GRACE_SECONDS:
                    # Segmind counts the request when it arrives: one that waited at the gate is counted
                    # again now, so the window can never hold more than it shows.
                    self.budget.count_late_send()
                # Inside the slot: a submit recorded as on its way is on the wire a moment later.
                if call.before_send is not None:
                    await call.before_send()
                reply = await self.exchange(call.method, url, call.payload, call.timeout, call.limit)
            if reply.status != 429:
                return reply
            self.pause_budget(reply)
            call.rate_limited += 1
            # A rate-limited GET waits in the paused budget rather than spending a retry.
            if not (call.idempotent and call.rate_limited < MAX_RATE_LIMITED_WAITS):
                return reply

    @contextlib.asynccontextmanager
    async def _in_flight_slot(self, call: _Call) -> AsyncIterator[None]:
        """A gate slot, waited for no longer than the call may wait (BudgetExhausted, as for the budget)."""
        bound = None if call.give_up_at is None else max(0.0, call.give_up_at - time.monotonic())
        try:
            async with asyncio.timeout(bound):
                await self.in_flight.enter(call.priority)
        except TimeoutError:
            raise BudgetExhausted(
                "too many requests to Segmind are under way",
                reset_at=datetime.now(UTC) + timedelta(seconds=GATE_RETRY_SECONDS),
            ) from None
        try:
            yield
        finally:
            self.in_flight.leave()

    async def exchange(
        self,
        method: str,
        url: str,
        payload: dict[str, Any] | None,
        timeout: aiohttp.ClientTimeout,
        limit: int,
    ) -> Reply:
        """One request and its answer, read up to `limit` bytes: the only place the key is put on the wire.

        Raises `NoAnswer` when the connection fails or times out before the answer is read in full.
        """
        if not same_origin(url, self.base_url):
            raise SegmindError("refusing to send the API key outside the configured base URL")
        headers = {"x-api-key": self.__api_key, "Accept": "application/json"}
        try:
            async with self._session.request(
                method,
                url,
                json=payload,
                headers=headers,
                timeout=timeout,
                # aiohttp would carry x-api-key along a redirect to any host; _follow_redirects judges them.
                allow_redirects=False,
                raise_for_status=False,
            ) as response:
                body = await _read_capped(response, limit)
                content_type = response.content_type or ""
                headers_seen = {name.lower(): self._scrub(value) for name, value in response.headers.items()}
                status = response.status
        except aiohttp.ClientConnectorError as exc:
            # The connection never opened, so nothing reached Segmind: safe to retry, even a submit.
            raise NoAnswer(exc, sent=False) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise NoAnswer(exc, sent=True) from exc
        # Parsed on the loop: json holds the GIL, so a thread would not help. The caps bound the cost (about
        # 0.1 s for a result at its 64 MiB cap, the price of base64 images).
        data = None if content_type.startswith("image/") else _parse_json(body, self._scrub)
        return Reply(status, body, headers_seen, content_type, data, self._scrub)

    def _redirect_to_follow(self, method: str, reply: Reply, url: str) -> str | None:
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

    def pause_budget(self, reply: Reply) -> None:
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


def error_text(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    for key in ("error", "message", "detail"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value[:500]
    return ""


def _path(url: str) -> str:
    return url.split("://", 1)[-1].partition("/")[2].split("?")[0]


def _describe(failure: Exception) -> str:
    if isinstance(failure, SegmindError):
        return failure.message
    return type(failure).__name__
