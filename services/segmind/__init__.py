"""The Segmind client: errors, request budget, polling schedule, transport, and the client on top.

`client` holds `SegmindClient`, whose docstring says what it guarantees; `errors` draws the error tree.
"""

from __future__ import annotations

from services.segmind.budget import PLAN_WINDOW_SECONDS, Priority, RequestBudget, SharedWindow, parse_reset_at
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
from services.segmind.schedule import DurationModel, FixedPollSchedule, PollSchedule, SegmindState, poll_delay
from services.segmind.transport import RetryPolicy, same_origin

__all__ = [
    "PLAN_WINDOW_SECONDS",
    "BadRequest",
    "BudgetExhausted",
    "DurationModel",
    "FixedPollSchedule",
    "Forbidden",
    "InsufficientCredits",
    "JobEvent",
    "JobFailed",
    "JobResult",
    "JobTimeout",
    "NotAcceptable",
    "NotFound",
    "PollSchedule",
    "Priority",
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
    "parse_reset_at",
    "poll_delay",
    "same_origin",
]
