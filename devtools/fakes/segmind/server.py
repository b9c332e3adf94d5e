"""A local HTTP server that speaks Segmind's Dreamshaper SDXL API, for tests and offline demos.

Run it with `python -m devtools.fakes.segmind --host 127.0.0.1 --port 8700 [options]` or start a
`SegmindServer` inside a test. It follows Segmind's API page:

* `POST /v2/{model}` validates the page's parameters and queues a job:
  200 `{"request_id", "status": "QUEUED", "status_url", "response_url"}` with absolute URLs.
* `GET /v2/requests/{id}/status`: 200 `{"request_id", "status"}` while QUEUED, PROCESSING or
  COMPLETED; 422 `{"request_id", "status": "FAILED", "error"}`; 404 when unknown or expired.
* `GET /v2/requests/{id}`: when COMPLETED, 200 `{"request_id", "status", "output", "metrics"}`
  where `output` is one string for one sample and a list for more, each an absolute URL under
  `/outputs/` (or plain base64 JPEG data when `base64` was true); before that the status body.
* `GET /outputs/{id}/{n}.jpeg` (n from 1) serves the JPEG without a key and never expires.
* `POST /v1/{model}` is synchronous: the first image's bytes, or with `base64` true
  `{"image", "status": "Success", "infer_time"}`.

Where the page is silent, this server chooses:

* Checks run in this order: API key (401), per-key rate limit (429), model (404), content type
  (406 `Unsupported content type ...`), JSON (400), parameters (400, message naming the field).
  Unknown keys in the body are ignored; `null` is not accepted for a typed parameter.
* A prompt holding a blocked word is accepted by v2 and the job goes from QUEUED straight to FAILED
  when a worker picks it up (an RAI error). v1 answers 400 with the same RAI error at once: the
  request itself is at fault and retrying it cannot help.
* Every JSON error body is `{"error": "..."}`. The rate-limit reset header is
  `x-rate-limit-reset-at-utc: 2025-01-31T12:00:02.500+00:00` (ISO 8601, UTC).
* Injected faults are served before any check; `slow` handles the request normally and delays the
  answer; `drop` closes the connection without an answer, after handling the request when
  `after_accept` is true (a submit then creates a job whose answer is lost).
* Hostile faults play a Segmind that breaks its own API: foreign URLs, redirects, absurd reset headers,
  huge or malformed bodies, the key echoed in error texts, odd output images, many outputs. Each kind and
  its parameters are described in `devtools.fakes.segmind.faults`; `foreign_urls`, `many_outputs` and
  `odd_image` handle the request normally (checks included) and change only the answer.
* Jobs do not depend on the key that submitted them: any valid key may poll any job.
* The plan limit (`requests_per_minute`) counts every keyed API request: submit, status, result and
  the v1 call, whatever their answer, but not the 429s it gives (see `_spend_rate_budget`) nor output
  downloads, which Segmind serves from a CDN host without a key. `stats.rate_limited` counts its 429s.

Timing: a job waits `queue_seconds` in the queue (or a draw from an exponential distribution with that
mean) and then for a free worker, then runs for a time from its parameters (steps x megapixels x samples,
optionally jittered) or drawn from `inference_range`. Every draw comes from one `random.Random(seed)`,
so a run with a `seed` setting is reproducible; setting `seed` through the control API reseeds it.
Each job's outputs are rendered in the background before it ends (see `ImageStore`).

`/_control/...` lets another process drive a server started from the command line: faults
(POST, GET, DELETE), stats (GET, DELETE) and settings (GET, POST). It is not recorded in the stats.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import re
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from devtools.fakes.segmind.faults import Fault, FaultBook, FaultKind, FaultTarget, build_fault
from devtools.fakes.segmind.images import reencode_sample
from devtools.fakes.segmind.jobs import (
    RAI_ERROR,
    ImageStore,
    Job,
    WorkerSchedule,
    draw_processing_seconds,
    draw_queue_seconds,
    find_blocked_word,
)
from devtools.fakes.segmind.params import GenerationParams, InvalidParameter, parse_generation_params
from devtools.fakes.segmind.settings import SegmindServerSettings, apply_settings_json, settings_to_json
from devtools.fakes.segmind.stats import RequestRecord, SegmindStats, SubmitRecord

__all__ = ["SegmindServer", "SegmindServerSettings"]

log = logging.getLogger(__name__)

RATE_LIMIT_RESET_HEADER = "x-rate-limit-reset-at-utc"
RATE_WINDOW_SECONDS = 60.0
SHUTDOWN_GRACE_SECONDS = 0.5
MAX_RANDOM_SEED = 2**32  # what a seed of -1 is replaced with: a value below this
_OUTPUT_NAME = re.compile(r"(\d+)\.jpeg")
MIB = 1024 * 1024
_STREAM_CHUNK = 64 * 1024
# Faults that let the request be handled and change only its answer; the handler reads them from here.
_FAULT_KEY = web.RequestKey("fault", Fault)
_ANSWER_CHANGING_FAULTS = frozenset({"foreign_urls", "many_outputs", "odd_image"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error answer: HTTP status and the message for the body's `error` key."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def reset_header(seconds_ahead: float) -> dict[str, str]:
    reset_at = datetime.now(UTC) + timedelta(seconds=max(0.0, seconds_ahead))
    return {RATE_LIMIT_RESET_HEADER: reset_at.isoformat(timespec="milliseconds")}


def fault_response(fault: Fault) -> web.Response:
    if fault.kind == "insufficient_credits":
        return error_response(406, "Insufficient credits")
    if fault.kind == "rate_limit":
        return error_response(429, "Rate limit exceeded", reset_header(fault.params["reset_after"]))
    if fault.kind == "odd_reset":
        return error_response(429, "Rate limit exceeded", {RATE_LIMIT_RESET_HEADER: fault.params["value"]})
    if fault.kind == "redirect":
        return error_response(307, "Temporary redirect", {"Location": fault.params["location"]})
    if fault.kind == "malformed":
        return web.Response(text=fault.params["body"], content_type="application/json")
    status = fault.next_server_status()
    return error_response(status, _SERVER_ERROR_MESSAGES.get(status, "Server error"))


_SERVER_ERROR_MESSAGES = {
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}


def echo_key_response(request: web.Request, target: str) -> web.Response:
    """An error text that repeats the received key, as a careless gateway might."""
    key = request.headers.get("x-api-key", "")
    if target in ("status", "result"):  # a FAILED job, as either URL serves it
        return web.json_response(
            {
                "request_id": request.match_info.get("request_id", ""),
                "status": "FAILED",
                "error": f"Worker crashed: upstream refused credentials {key}",
            },
            status=422,
        )
    return error_response(500, f"Internal server error while serving key {key}")


async def stream_huge_body(request: web.Request, fault: Fault) -> web.StreamResponse:
    """About `mib` MiB of JSON written chunk by chunk, so neither side needs to hold it whole."""
    prefix = json.dumps({"request_id": request.match_info.get("request_id", ""), "status": "PROCESSING"})
    head = (prefix[:-1] + ', "padding": "').encode()
    tail = b'"}'
    padding = max(0, int(fault.params["mib"] * MIB) - len(head) - len(tail))
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    if fault.params["content_length"]:
        response.content_length = len(head) + padding + len(tail)
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    chunk = b"x" * _STREAM_CHUNK
    try:
        await response.write(head)
        while padding > 0:
            piece = chunk[:padding]
            await response.write(piece)
            padding -= len(piece)
        await response.write(tail)
        await response.write_eof()
    except ConnectionError:
        pass  # the client stopped reading, which is what a careful client does
    return response


def _route_target(request: web.Request) -> str:
    name = request.match_info.route.name or "other"
    return "control" if name.startswith("control") else name


def _reject_json_constant(constant: str) -> None:
    # Python's json accepts NaN and Infinity, which are not JSON.
    raise ValueError(f"{constant} is not valid JSON")


class SegmindServer:
    """The server: build it, `await start()`, point a client at `base_url`, `await stop()`."""

    def __init__(
        self, settings: SegmindServerSettings | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings or SegmindServerSettings()
        self.stats = SegmindStats()
        self.clock = clock
        self.base_url = ""
        self._faults = FaultBook()
        self._jobs: dict[str, Job] = {}
        self._schedule = WorkerSchedule()
        self._images = ImageStore(clock=clock)
        self.rng = random.Random(self.settings.seed)
        self._extra_outputs: dict[str, int] = {}  # request id -> outputs listed by many_outputs
        self._key_windows: defaultdict[str, deque[float]] = defaultdict(deque)
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on a real TCP socket; port 0 picks a free one (see `base_url`)."""
        runner = web.AppRunner(self.app, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{url_host}:{bound_port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._images.close()

    def reseed(self) -> None:
        """Restart the random draws from `settings.seed` (a fresh random seed when it is None)."""
        self.rng.seed(self.settings.seed)

    # ---- faults ----------------------------------------------------------------------------------

    def inject(self, kind: FaultKind, *, count: int = 1, target: FaultTarget = "any", **params: Any) -> None:
        """The next `count` requests aimed at `target` get this fault (ValueError if ill-formed)."""
        self._faults.add(build_fault(kind, count=count, target=target, params=params))

    def clear_faults(self) -> None:
        self._faults.clear()

    # ---- application -----------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._traffic_middleware])
        app.router.add_post("/v2/{model}", self._submit, name="submit")
        app.router.add_get("/v2/requests/{request_id}/status", self._status, name="status")
        app.router.add_get("/v2/requests/{request_id}", self._result, name="result")
        app.router.add_get("/outputs/{request_id}/{name}", self._output, name="output")
        app.router.add_post("/v1/{model}", self._sync, name="v1")
        app.router.add_post("/_control/faults", self._control_add_fault, name="control-faults-add")
        app.router.add_get("/_control/faults", self._control_faults, name="control-faults")
        app.router.add_delete("/_control/faults", self._control_clear_faults, name="control-faults-clear")
        app.router.add_get("/_control/stats", self._control_stats, name="control-stats")
        app.router.add_delete("/_control/stats", self._control_reset_stats, name="control-stats-reset")
        app.router.add_get("/_control/settings", self._control_settings, name="control-settings")
        app.router.add_post("/_control/settings", self._control_update_settings, name="control-settings-set")
        return app

    @web.middleware
    async def _traffic_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        target = _route_target(request)
        if target == "control":
            return await self._answer_errors_as_json(request, handler)
        record = RequestRecord(request.method, request.path, target, self.clock())
        self.stats.requests.append(record)
        if target == "status":
            self.stats.status_polls += 1
            self.stats.status_polls_by_id[request.match_info["request_id"]] += 1
        fault = self._faults.take(target) if target != "other" else None
        response, answered = await self._answer_with_fault(request, handler, fault)
        record.status = response.status if answered else None
        return response

    async def _answer_with_fault(
        self, request: web.Request, handler: Handler, fault: Fault | None
    ) -> tuple[web.StreamResponse, bool]:
        if fault is None:
            return await self._answer_errors_as_json(request, handler), True
        if fault.kind == "slow":
            response = await self._answer_errors_as_json(request, handler)
            await asyncio.sleep(fault.params["seconds"])
            return response, True
        if fault.kind == "drop":
            if fault.params["after_accept"]:
                await self._answer_errors_as_json(request, handler)
            self._drop_connection(request)
            # aiohttp fails to write this to the closed transport and drops it quietly.
            return web.Response(), False
        if fault.kind in _ANSWER_CHANGING_FAULTS:
            request[_FAULT_KEY] = fault
            return await self._answer_errors_as_json(request, handler), True
        if fault.kind == "malformed" and fault.params["after_accept"]:
            await self._answer_errors_as_json(request, handler)
        if fault.kind == "huge_body":
            return await stream_huge_body(request, fault), True
        if fault.kind == "echo_key":
            return echo_key_response(request, _route_target(request)), True
        return fault_response(fault), True

    @staticmethod
    def _drop_connection(request: web.Request) -> None:
        if request.transport is not None:
            request.transport.close()

    @staticmethod
    async def _answer_errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except web.HTTPException as exc:
            # Router answers (unknown path, wrong method, body too large) in the same JSON shape.
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return error_response(exc.status, exc.reason, allow)
        except Exception:
            log.exception("Unexpected error answering %s %s", request.method, request.path)
            return error_response(500, "Internal server error")

    # ---- shared checks ---------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> str:
        key = request.headers.get("x-api-key", "").strip()
        if not key:
            raise ApiError(401, "Missing API key: send it in the x-api-key header")
        if self.settings.api_keys is not None and key not in self.settings.api_keys:
            raise ApiError(401, "Invalid API key")
        return key

    def _spend_rate_budget(self, key: str) -> None:
        limit = self.settings.requests_per_minute
        if limit is None:
            return
        now = self.clock()
        window = self._key_windows[key]
        while window and now - window[0] >= RATE_WINDOW_SECONDS:
            window.popleft()
        if len(window) >= limit:
            self.stats.rate_limited += 1
            # A refused request is not added to the window: Segmind neither runs nor bills it, so the
            # reset time announced here (when the oldest counted request ages out) stays true however
            # often a client asks meanwhile, and a client that waits for it is served then.
            raise ApiError(429, "Rate limit exceeded", reset_header(window[0] + RATE_WINDOW_SECONDS - now))
        window.append(now)

    def _admit(self, request: web.Request) -> None:
        """The key and rate checks that every keyed endpoint makes first."""
        self._spend_rate_budget(self._authenticate(request))

    def _check_model(self, request: web.Request) -> None:
        model = request.match_info["model"]
        if model != self.settings.model:
            raise ApiError(404, f"Model not found: {model}")

    @staticmethod
    async def _read_params(request: web.Request) -> tuple[dict[str, Any], GenerationParams]:
        if request.content_type != "application/json":
            raise ApiError(406, f"Unsupported content type: {request.content_type}; send application/json")
        try:
            body = json.loads(await request.text(), parse_constant=_reject_json_constant)
        except ValueError as exc:
            raise ApiError(400, "Request body is not valid JSON") from exc
        try:
            return body, parse_generation_params(body)
        except InvalidParameter as exc:
            raise ApiError(400, str(exc)) from exc

    def _base_url(self, request: web.Request) -> str:
        if self.settings.public_base_url:
            return self.settings.public_base_url.rstrip("/")
        return f"{request.scheme}://{request.host}"

    def _schedule_job(self, params: GenerationParams, *, queue_seconds: float) -> Job:
        """Give a new job its timeline: a free worker, after `queue_seconds` (the mean, if exponential)."""
        settings = self.settings
        now = self.clock()
        self._schedule.forget_before(now)
        blocked = find_blocked_word(params.prompt, settings.blocked_words)
        queued = draw_queue_seconds(self.rng, queue_seconds, settings.queue_distribution)
        duration = 0.0
        if not blocked:
            duration = draw_processing_seconds(
                self.rng,
                params,
                seconds_per_step=settings.seconds_per_step,
                jitter=settings.inference_jitter,
                fixed_range=settings.inference_range,
            )
        starts_at = self._schedule.reserve(settings.workers, now + queued, duration)
        return Job(
            request_id=str(uuid.uuid4()),
            params=params,
            seed=params.seed if params.seed != -1 else self.rng.randrange(MAX_RANDOM_SEED),
            submitted_at=now,
            starts_at=starts_at,
            ends_at=starts_at + duration,
            failure=RAI_ERROR if blocked else None,
        )

    def _known_job(self, request: web.Request) -> Job:
        request_id = request.match_info["request_id"]
        job = self._jobs.get(request_id)
        if job is None or self._expired(job):
            raise ApiError(404, f"Request not found or expired: {request_id}")
        return job

    def _expired(self, job: Job) -> bool:
        now = self.clock()
        finished = job.state_at(now) in ("COMPLETED", "FAILED")
        return finished and now - job.finished_at >= self.settings.retention_seconds

    # ---- v2 --------------------------------------------------------------------------------------

    async def _submit(self, request: web.Request) -> web.Response:
        self._admit(request)
        self._check_model(request)
        body, params = await self._read_params(request)
        job = self._schedule_job(params, queue_seconds=self.settings.queue_seconds)
        self._jobs[job.request_id] = job
        self._images.render_ahead(job)
        self.stats.submits.append(SubmitRecord(job.request_id, body, job.submitted_at))
        base = self._faulty_origin(request) or self._base_url(request)
        return web.json_response(
            {
                "request_id": job.request_id,
                "status": "QUEUED",
                "status_url": f"{base}/v2/requests/{job.request_id}/status",
                "response_url": f"{base}/v2/requests/{job.request_id}",
            }
        )

    async def _status(self, request: web.Request) -> web.Response:
        self._admit(request)
        job = self._known_job(request)
        return self._status_response(job, job.state_at(self.clock()))

    @staticmethod
    def _status_response(job: Job, state: str) -> web.Response:
        if state == "FAILED":
            return web.json_response(
                {"request_id": job.request_id, "status": "FAILED", "error": job.failure}, status=422
            )
        return web.json_response({"request_id": job.request_id, "status": state})

    async def _result(self, request: web.Request) -> web.Response:
        self._admit(request)
        job = self._known_job(request)
        state = job.state_at(self.clock())
        if state in ("QUEUED", "PROCESSING") and self.settings.early_result == "not_found":
            return error_response(404, "the request has not completed yet")
        if state != "COMPLETED":
            return self._status_response(job, state)
        outputs = await self._outputs(job, request)
        return web.json_response(
            {
                "request_id": job.request_id,
                "status": "COMPLETED",
                "output": outputs[0] if len(outputs) == 1 else outputs,
                "metrics": job.metrics(),
            }
        )

    async def _outputs(self, job: Job, request: web.Request) -> list[str]:
        fault = request.get(_FAULT_KEY)
        count = job.params.samples
        if fault is not None and fault.kind == "many_outputs":
            count = fault.params["outputs"]
            self._extra_outputs[job.request_id] = max(count, self._extra_outputs.get(job.request_id, 0))
        foreign = self._faulty_origin(request)
        if fault is not None and foreign is not None and "path" in fault.params:
            return [foreign + fault.params["path"]] * count
        if job.params.base64 and foreign is None:
            images = await asyncio.gather(*(self._images.sample(job, index) for index in range(count)))
            return [base64.b64encode(image).decode("ascii") for image in images]
        base = foreign or self._base_url(request)
        return [f"{base}/outputs/{job.request_id}/{n}.jpeg" for n in range(1, count + 1)]

    async def _output(self, request: web.Request) -> web.Response:
        job = self._jobs.get(request.match_info["request_id"])
        name = _OUTPUT_NAME.fullmatch(request.match_info["name"])
        number = int(name.group(1)) if name else 0
        outputs = 0 if job is None else max(job.params.samples, self._extra_outputs.get(job.request_id, 0))
        if job is None or job.state_at(self.clock()) != "COMPLETED" or not 1 <= number <= outputs:
            raise ApiError(404, "Output not found")
        image = await self._images.sample(job, number - 1)
        fault = request.get(_FAULT_KEY)
        if fault is not None and fault.kind == "odd_image":
            body, content_type = await asyncio.to_thread(reencode_sample, image, fault.params["format"])
            return web.Response(body=body, content_type=content_type)
        return web.Response(body=image, content_type="image/jpeg")

    @staticmethod
    def _faulty_origin(request: web.Request) -> str | None:
        """The origin a foreign_urls fault points this answer's URLs at, if one hit this request."""
        fault = request.get(_FAULT_KEY)
        if fault is None or fault.kind != "foreign_urls":
            return None
        return str(fault.params["origin"]).rstrip("/")

    # ---- v1 --------------------------------------------------------------------------------------

    async def _sync(self, request: web.Request) -> web.Response:
        self._admit(request)
        self._check_model(request)
        body, params = await self._read_params(request)
        if find_blocked_word(params.prompt, self.settings.blocked_words):
            raise ApiError(400, RAI_ERROR)
        job = self._schedule_job(params, queue_seconds=0.0)
        self._images.render_ahead(job)
        self.stats.sync_calls.append(SubmitRecord(job.request_id, body, job.submitted_at))
        await asyncio.sleep(max(0.0, job.ends_at - self.clock()))
        image = await self._images.sample(job, 0)
        if not params.base64:
            return web.Response(body=image, content_type="image/jpeg")
        return web.json_response(
            {
                "image": base64.b64encode(image).decode("ascii"),
                "status": "Success",
                "infer_time": job.metrics()["inference_time"],
            }
        )

    # ---- control API -----------------------------------------------------------------------------

    async def _control_add_fault(self, request: web.Request) -> web.Response:
        spec = await _control_json(request)
        if not isinstance(spec, dict) or "kind" not in spec:
            raise ApiError(400, "Send a JSON object with at least a kind")
        params = {name: value for name, value in spec.items() if name not in ("kind", "count", "target")}
        try:
            self.inject(spec["kind"], count=spec.get("count", 1), target=spec.get("target", "any"), **params)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        return await self._control_faults(request)

    async def _control_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"faults": self._faults.describe()})

    async def _control_clear_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return await self._control_faults(request)

    async def _control_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.to_json())

    async def _control_reset_stats(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return await self._control_stats(request)

    async def _control_settings(self, request: web.Request) -> web.Response:
        return web.json_response(settings_to_json(self.settings))

    async def _control_update_settings(self, request: web.Request) -> web.Response:
        changes = await _control_json(request)
        try:
            apply_settings_json(self.settings, changes)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        if isinstance(changes, dict) and "seed" in changes:
            # Even the same seed again restarts the draws, so a benchmark can replay a run.
            self.reseed()
        return await self._control_settings(request)


async def _control_json(request: web.Request) -> object:
    try:
        return json.loads(await request.text(), parse_constant=_reject_json_constant)
    except ValueError as exc:
        raise ApiError(400, "Request body is not valid JSON") from exc
