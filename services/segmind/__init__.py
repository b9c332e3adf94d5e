"""The Segmind client: errors, request budget, polling schedule, transport, and the client on top.

`client` holds `SegmindClient`, whose docstring says what it guarantees; `errors` draws the error tree.
"""

from __future__ import annotations

from services.segmind.budget import RequestBudget, SharedWindow, parse_reset_at
from services.segmind.client import JobEvent, JobResult, SegmindClient, SubmittedJob
from services.segmind.errors import (
    BadRequest,
    BudgetExhausted,
    Forbidden,
    InsufficientCredits,
    JobFailed,
    JobTimeout,
    NotAcceptable,
    NotFound,
    RateLimited,
    SegmindConnectionError,
    SegmindError,
    ServerError,
    Unauthorized,
    UnexpectedResponse,
)
from services.segmind.schedule import DurationModel, SegmindState, next_poll_delay
from services.segmind.transport import RetryPolicy, same_origin

__all__ = [
    "BadRequest",
    "BudgetExhausted",
    "DurationModel",
    "Forbidden",
    "InsufficientCredits",
    "JobEvent",
    "JobFailed",
    "JobResult",
    "JobTimeout",
    "NotAcceptable",
    "NotFound",
    "RateLimited",
    "RequestBudget",
    "RetryPolicy",
    "SegmindClient",
    "SegmindConnectionError",
    "SegmindError",
    "SegmindState",
    "ServerError",
    "SharedWindow",
    "SubmittedJob",
    "Unauthorized",
    "UnexpectedResponse",
    "next_poll_delay",
    "parse_reset_at",
    "same_origin",
]
