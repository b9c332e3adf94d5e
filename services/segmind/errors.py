"""What can go wrong talking to Segmind, one class per answer the bot gives.

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

import re
from datetime import UTC, datetime

# Segmind reports content blocks only as FAILED with an error text; these are the words such texts use.
CONTENT_BLOCK = re.compile(
    r"\b(rai|nsfw|unsafe|safety|moderation|inappropriate|prohibited)\b"
    r"|\bcontent (filter|policy|moderation|violation)|\bblocked by",
    re.IGNORECASE,
)
_CREDITS = re.compile(r"credit|balance|insufficient", re.IGNORECASE)


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
        self.is_content_block = bool(CONTENT_BLOCK.search(error or ""))


class JobTimeout(SegmindError):
    """The wait passed its deadline; the job may still finish on Segmind's side."""

    def __init__(self, *, request_id: str, waited: float) -> None:
        super().__init__(f"no result after {waited:.0f} s", request_id=request_id)
        self.waited = waited


ERRORS_BY_STATUS: dict[int, type[SegmindError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
}
