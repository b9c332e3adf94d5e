"""The local Segmind server, checked over real sockets against Segmind's Dreamshaper SDXL API page."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from devtools.fakes.segmind.params import SCHEDULERS
from devtools.fakes.segmind.server import SegmindServer, SegmindServerSettings
from tests.conftest import PAGE_EXAMPLE

KEY = "test-key"
MODEL = "sdxl1.0-dreamshaper"
REPO_ROOT = Path(__file__).resolve().parents[1]

# The example payload from the API page.
EXAMPLE_PAYLOAD: dict[str, Any] = PAGE_EXAMPLE
SMALL = {"img_width": 512, "img_height": 512, "num_inference_steps": 20}
FAST = {"queue_seconds": 0.02, "seconds_per_step": 0.0005}

MakeServer = Callable[..., Awaitable[SegmindServer]]


@pytest.fixture
async def make_server() -> AsyncIterator[MakeServer]:
    servers: list[SegmindServer] = []

    async def make(**overrides: Any) -> SegmindServer:
        server = SegmindServer(SegmindServerSettings(**{**FAST, **overrides}))
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def server(make_server: MakeServer) -> SegmindServer:
    return await make_server()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as session:
        yield session


def submit_url(server: SegmindServer, model: str = MODEL, version: str = "v2") -> str:
    return f"{server.base_url}/{version}/{model}"


async def submit(http: aiohttp.ClientSession, server: SegmindServer, **payload: Any) -> dict[str, Any]:
    async with http.post(submit_url(server), json={"prompt": "a lighthouse", **SMALL, **payload}) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def poll_until_final(
    http: aiohttp.ClientSession, status_url: str, timeout: float = 5.0
) -> tuple[int, dict[str, Any], list[str]]:
    """Poll quickly; return the final HTTP status, the final body and every state seen in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(status_url) as response:
            body = await response.json()
        if not seen or seen[-1] != body["status"]:
            seen.append(body["status"])
        if body["status"] in ("COMPLETED", "FAILED"):
            return response.status, body, seen
        await asyncio.sleep(0.01)
    raise AssertionError(f"job did not finish; states seen: {seen}")


async def fetch_result(http: aiohttp.ClientSession, job: dict[str, Any]) -> dict[str, Any]:
    status, _, _ = await poll_until_final(http, job["status_url"])
    assert status == 200
    async with http.get(job["response_url"]) as response:
        assert response.status == 200
        return await response.json()


async def download_image(url: str) -> bytes:
    # Output URLs are public: no key is sent.
    async with aiohttp.ClientSession() as anonymous, anonymous.get(url) as response:
        assert response.status == 200
        assert response.content_type == "image/jpeg"
        return await response.read()


def open_jpeg(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image


# ---- the happy path ------------------------------------------------------------------------------


async def test_page_example_goes_queued_processing_completed_and_yields_its_size(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(queue_seconds=0.1, seconds_per_step=0.01)
    async with http.post(submit_url(server), json=EXAMPLE_PAYLOAD) as response:
        assert response.status == 200
        job = await response.json()
    assert set(job) == {"request_id", "status", "status_url", "response_url"}
    assert job["status"] == "QUEUED"
    assert job["status_url"] == f"{server.base_url}/v2/requests/{job['request_id']}/status"
    assert job["response_url"] == f"{server.base_url}/v2/requests/{job['request_id']}"

    status, body, seen = await poll_until_final(http, job["status_url"])
    assert (status, seen) == (200, ["QUEUED", "PROCESSING", "COMPLETED"])
    assert body == {"request_id": job["request_id"], "status": "COMPLETED"}

    async with http.get(job["response_url"]) as response:
        result = await response.json()
    assert result["status"] == "COMPLETED"
    assert result["request_id"] == job["request_id"]
    assert isinstance(result["output"], str)
    metrics = result["metrics"]
    assert metrics["queue_time"] >= 0.1
    assert metrics["inference_time"] == pytest.approx(0.01 * 35 * 896 * 1152 / 1024**2, abs=0.001)
    assert metrics["total_time"] == pytest.approx(
        metrics["queue_time"] + metrics["inference_time"], abs=0.001
    )
    assert open_jpeg(await download_image(result["output"])).size == (896, 1152)


async def test_result_before_completion_is_the_status_body(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(queue_seconds=5.0)
    job = await submit(http, server)
    async with http.get(job["response_url"]) as response:
        assert response.status == 200
        assert await response.json() == {"request_id": job["request_id"], "status": "QUEUED"}


async def test_four_samples_give_four_distinct_images(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    result = await fetch_result(http, await submit(http, server, samples=4, img_width=640, img_height=768))
    assert isinstance(result["output"], list)
    assert len(result["output"]) == 4
    images = [await download_image(url) for url in result["output"]]
    assert len(set(images)) == 4
    pixels = {open_jpeg(data).convert("RGB").resize((16, 16)).tobytes() for data in images}
    assert len(pixels) == 4
    assert {open_jpeg(data).size for data in images} == {(640, 768)}


async def test_base64_output_decodes_to_jpegs(server: SegmindServer, http: aiohttp.ClientSession) -> None:
    single = await fetch_result(http, await submit(http, server, base64=True))
    assert isinstance(single["output"], str)
    assert not single["output"].startswith("data:")
    assert open_jpeg(base64.b64decode(single["output"], validate=True)).size == (512, 512)

    several = await fetch_result(http, await submit(http, server, base64=True, samples=2))
    decoded = [base64.b64decode(item, validate=True) for item in several["output"]]
    assert len(decoded) == 2
    assert decoded[0] != decoded[1]
    assert all(open_jpeg(data).size == (512, 512) for data in decoded)


async def test_same_seed_gives_same_image_and_random_seeds_differ(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    async def image_for(seed: int) -> bytes:
        result = await fetch_result(http, await submit(http, server, seed=seed, base64=True))
        return base64.b64decode(result["output"])

    assert await image_for(42) == await image_for(42)
    assert await image_for(42) != await image_for(43)
    assert await image_for(-1) != await image_for(-1)


async def test_public_base_url_is_used_for_absolute_urls(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(public_base_url="https://segmind.example/")
    job = await submit(http, server)
    assert job["status_url"] == f"https://segmind.example/v2/requests/{job['request_id']}/status"


# ---- validation ----------------------------------------------------------------------------------

INVALID_PARAMETERS = [
    ("img_width", 511),
    ("img_width", 2056),
    ("img_width", 515),
    ("img_height", 511),
    ("img_height", 2056),
    ("img_height", 1020),
    ("img_width", 512.0),
    ("img_width", True),
    ("num_inference_steps", 19),
    ("num_inference_steps", 101),
    ("num_inference_steps", 30.5),
    ("num_inference_steps", True),
    ("samples", 0),
    ("samples", 5),
    ("samples", True),
    ("samples", "2"),
    ("guidance_scale", 0.9),
    ("guidance_scale", 25.1),
    ("guidance_scale", True),
    ("guidance_scale", "7"),
    ("seed", -2),
    ("seed", 10**15),
    ("seed", False),
    ("seed", 1.5),
    ("scheduler", "Bogus"),
    ("scheduler", "unipc"),
    ("prompt", ""),
    ("prompt", "   \n"),
    ("prompt", 123),
    ("prompt", None),
    ("negative_prompt", 5),
    ("negative_prompt", None),
    ("base64", "true"),
    ("base64", 1),
]


@pytest.mark.parametrize(("field", "value"), INVALID_PARAMETERS)
async def test_invalid_parameter_is_400_naming_the_field(
    server: SegmindServer, http: aiohttp.ClientSession, field: str, value: object
) -> None:
    payload = {"prompt": "a lighthouse", field: value}
    for version in ("v2", "v1"):
        async with http.post(submit_url(server, version=version), json=payload) as response:
            assert response.status == 400
            body = await response.json()
        assert field in body["error"]
    assert server.stats.submits == []


async def test_missing_prompt_is_400(server: SegmindServer, http: aiohttp.ClientSession) -> None:
    async with http.post(submit_url(server), json={"samples": 1}) as response:
        assert response.status == 400
        assert "prompt" in (await response.json())["error"]


VALID_BOUNDARIES = [
    {"img_width": 512, "img_height": 2048},
    {"img_width": 2048, "img_height": 512},
    {"num_inference_steps": 20},
    {"num_inference_steps": 100},
    {"samples": 1},
    {"samples": 4},
    {"guidance_scale": 1},
    {"guidance_scale": 25.0},
    {"seed": -1},
    {"seed": 0},
    {"seed": 999_999_999_999_999},
    {"negative_prompt": ""},
    {"some_unknown_key": "is ignored"},
]


async def test_boundary_values_are_accepted(server: SegmindServer, http: aiohttp.ClientSession) -> None:
    for extra in VALID_BOUNDARIES:
        async with http.post(submit_url(server), json={"prompt": "a lighthouse", **extra}) as response:
            assert response.status == 200, (extra, await response.text())
    assert len(server.stats.submits) == len(VALID_BOUNDARIES)


async def test_all_twelve_schedulers_are_accepted(server: SegmindServer, http: aiohttp.ClientSession) -> None:
    assert len(SCHEDULERS) == 12
    for scheduler in SCHEDULERS:
        await submit(http, server, scheduler=scheduler)


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", '{"prompt": "x", "guidance_scale": NaN}'])
async def test_malformed_json_body_is_400(
    server: SegmindServer, http: aiohttp.ClientSession, body: str
) -> None:
    headers = {"Content-Type": "application/json"}
    async with http.post(submit_url(server), data=body, headers=headers) as response:
        assert response.status == 400
        assert "error" in await response.json()


async def test_non_json_content_type_is_406_that_is_not_about_credits(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    for version in ("v2", "v1"):
        async with http.post(submit_url(server, version=version), data={"prompt": "a form"}) as response:
            assert response.status == 406
            error = (await response.json())["error"]
        assert error.startswith("Unsupported content type")
        assert "credit" not in error.lower()


# ---- keys, models, ids ---------------------------------------------------------------------------


async def test_missing_empty_or_unknown_key_is_401(make_server: MakeServer) -> None:
    server = await make_server(api_keys=frozenset({KEY}))
    payload = {"prompt": "a lighthouse"}
    async with aiohttp.ClientSession() as anonymous:
        for headers in ({}, {"x-api-key": ""}, {"x-api-key": "wrong"}):
            for url in (submit_url(server), submit_url(server, version="v1")):
                async with anonymous.post(url, json=payload, headers=headers) as response:
                    assert response.status == 401
                    assert "error" in await response.json()
            async with anonymous.get(f"{server.base_url}/v2/requests/x/status", headers=headers) as response:
                assert response.status == 401
        async with anonymous.post(submit_url(server), json=payload, headers={"x-api-key": KEY}) as response:
            assert response.status == 200


async def test_unknown_model_is_404(server: SegmindServer, http: aiohttp.ClientSession) -> None:
    for version in ("v2", "v1"):
        url = submit_url(server, model="sdxl1.0-nope", version=version)
        async with http.post(url, json={"prompt": "a lighthouse"}) as response:
            assert response.status == 404
            assert "error" in await response.json()


async def test_unknown_request_id_is_404(server: SegmindServer, http: aiohttp.ClientSession) -> None:
    for path in ("/v2/requests/no-such-id/status", "/v2/requests/no-such-id"):
        async with http.get(server.base_url + path) as response:
            assert response.status == 404
            assert "error" in await response.json()


async def test_unknown_path_and_wrong_method_answer_json_errors(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(server.base_url + "/nowhere") as response:
        assert (response.status, "error" in await response.json()) == (404, True)
    async with http.get(submit_url(server)) as response:
        assert (response.status, "error" in await response.json()) == (405, True)


async def test_expired_results_are_404_but_outputs_stay_downloadable(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(retention_seconds=0.3)
    job = await submit(http, server)
    result = await fetch_result(http, job)
    await asyncio.sleep(0.35)
    for url in (job["status_url"], job["response_url"]):
        async with http.get(url) as response:
            assert response.status == 404
            assert "error" in await response.json()
    assert open_jpeg(await download_image(result["output"])).size == (512, 512)


async def test_outputs_of_unfinished_or_unknown_jobs_are_404(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(queue_seconds=5.0)
    job = await submit(http, server)
    for name in (f"{job['request_id']}/1.jpeg", "no-such-id/1.jpeg"):
        async with http.get(f"{server.base_url}/outputs/{name}") as response:
            assert response.status == 404


# ---- content blocks ------------------------------------------------------------------------------


async def test_blocked_word_fails_the_job_with_422_but_only_as_a_whole_word(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(blocked_words=frozenset({"kid"}))
    blocked = await submit(http, server, prompt="A KID on a skateboard")
    assert blocked["status"] == "QUEUED"
    status, body, _ = await poll_until_final(http, blocked["status_url"])
    assert status == 422
    assert body["status"] == "FAILED"
    assert body["request_id"] == blocked["request_id"]
    assert "RAI" in body["error"]
    async with http.get(blocked["response_url"]) as response:
        assert response.status == 422
        assert (await response.json())["status"] == "FAILED"

    fine = await submit(http, server, prompt="skid marks on a kidney-shaped pool")
    status, body, _ = await poll_until_final(http, fine["status_url"])
    assert (status, body["status"]) == (200, "COMPLETED")


async def test_blocked_words_can_change_at_run_time(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    server.settings.blocked_words = frozenset({"dragon"})
    job = await submit(http, server, prompt="a red Dragon")
    status, _, _ = await poll_until_final(http, job["status_url"])
    assert status == 422


async def test_v1_blocked_prompt_is_400_with_an_rai_error(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(blocked_words=frozenset({"kid"}))
    async with http.post(submit_url(server, version="v1"), json={"prompt": "a kid", **SMALL}) as response:
        assert response.status == 400
        assert "RAI" in (await response.json())["error"]


# ---- v1 ------------------------------------------------------------------------------------------


async def test_v1_returns_image_bytes_or_base64_json(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    url = submit_url(server, version="v1")
    async with http.post(url, json={"prompt": "a lighthouse", **SMALL, "img_height": 768}) as response:
        assert response.status == 200
        assert response.content_type == "image/jpeg"
        assert open_jpeg(await response.read()).size == (512, 768)

    async with http.post(url, json={"prompt": "a lighthouse", **SMALL, "base64": True}) as response:
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "Success"
    assert isinstance(body["infer_time"], float)
    assert open_jpeg(base64.b64decode(body["image"], validate=True)).size == (512, 512)
    assert len(server.stats.sync_calls) == 2
    assert server.stats.submits == []


async def test_v1_waits_for_the_inference_time(make_server: MakeServer, http: aiohttp.ClientSession) -> None:
    server = await make_server(seconds_per_step=0.01)  # 20 steps at 512x512: 0.05 s
    started = time.monotonic()
    async with http.post(
        submit_url(server, version="v1"), json={"prompt": "a lighthouse", **SMALL}
    ) as response:
        assert response.status == 200
    assert time.monotonic() - started >= 0.05


# ---- workers and rate limits ---------------------------------------------------------------------


async def test_jobs_beyond_the_worker_count_stay_queued(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    # 20 steps at 512x512 and 0.08 s a step: 0.4 s of inference each.
    server = await make_server(workers=2, queue_seconds=0.02, seconds_per_step=0.08)
    jobs = [await submit(http, server) for _ in range(3)]
    await asyncio.sleep(0.15)
    states = []
    for job in jobs:
        async with http.get(job["status_url"]) as response:
            states.append((await response.json())["status"])
    assert states == ["PROCESSING", "PROCESSING", "QUEUED"]

    last = await fetch_result(http, jobs[2])
    assert last["metrics"]["queue_time"] >= 0.35


async def test_requests_per_minute_answers_429_with_the_reset_header(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_server(requests_per_minute=3)
    job = await submit(http, server)
    for _ in range(2):
        async with http.get(job["status_url"]) as response:
            assert response.status == 200
    before = datetime.now(UTC)
    async with http.get(job["status_url"]) as response:
        assert response.status == 429
        assert await response.json() == {"error": "Rate limit exceeded"}
        reset_at = datetime.fromisoformat(response.headers["x-rate-limit-reset-at-utc"])
    assert reset_at.utcoffset() is not None
    assert 55 < (reset_at - before).total_seconds() <= 60.5

    # The budget is per key.
    async with http.get(job["status_url"], headers={"x-api-key": "another-key"}) as response:
        assert response.status == 200
    assert server.stats.max_requests_in_window(60.0, targets=["status", "submit"]) == 5


# ---- injected faults -----------------------------------------------------------------------------


async def test_insufficient_credits_fault(server: SegmindServer, http: aiohttp.ClientSession) -> None:
    server.inject("insufficient_credits", count=2, target="submit")
    for _ in range(2):
        async with http.post(submit_url(server), json={"prompt": "a lighthouse"}) as response:
            assert response.status == 406
            assert await response.json() == {"error": "Insufficient credits"}
    assert server.stats.submits == []
    await submit(http, server)
    assert len(server.stats.submits) == 1


async def test_rate_limit_fault_carries_the_reset_header(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    server.inject("rate_limit", target="submit", reset_after=5.0)
    before = datetime.now(UTC)
    async with http.post(submit_url(server), json={"prompt": "a lighthouse"}) as response:
        assert response.status == 429
        assert (await response.json())["error"] == "Rate limit exceeded"
        reset_at = datetime.fromisoformat(response.headers["x-rate-limit-reset-at-utc"])
    assert 4.5 < (reset_at - before).total_seconds() < 6.0


async def test_server_error_fault_cycles_or_uses_the_given_status(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    job = await submit(http, server)
    server.inject("server_error", count=4, target="status")
    server.inject("server_error", target="result", status=503)
    statuses = []
    for _ in range(4):
        async with http.get(job["status_url"]) as response:
            statuses.append(response.status)
            assert "error" in await response.json()
    assert statuses == [500, 502, 504, 500]
    async with http.get(job["response_url"]) as response:
        assert response.status == 503


async def test_drop_before_accept_creates_no_job(server: SegmindServer, http: aiohttp.ClientSession) -> None:
    server.inject("drop", target="submit")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await http.post(submit_url(server), json={"prompt": "a lighthouse"})
    assert server.stats.submits == []
    assert server.stats.requests[-1].status is None


async def test_drop_after_accept_creates_a_job_whose_answer_is_lost(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    server.inject("drop", target="submit", after_accept=True)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await http.post(submit_url(server), json={"prompt": "a lighthouse", **SMALL})
    assert len(server.stats.submits) == 1
    request_id = server.stats.submits[0].request_id
    status, body, _ = await poll_until_final(http, f"{server.base_url}/v2/requests/{request_id}/status")
    assert (status, body["status"]) == (200, "COMPLETED")


async def test_drop_on_a_get_is_retried_once_by_aiohttp(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    # aiohttp itself resends an idempotent request once when the connection drops, so one drop on a
    # GET is invisible to an aiohttp client: it takes two in a row to reach it.
    server.inject("drop", target="status", count=2)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await http.get(f"{server.base_url}/v2/requests/some-id/status")
    assert [(record.target, record.status) for record in server.stats.requests] == [("status", None)] * 2


async def test_slow_fault_delays_the_answer_after_handling_it(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    server.inject("slow", target="submit", seconds=0.3)
    started = time.monotonic()
    await submit(http, server)
    assert time.monotonic() - started >= 0.3

    server.inject("slow", target="submit", seconds=0.5)
    with pytest.raises(asyncio.TimeoutError):
        await http.post(
            submit_url(server), json={"prompt": "a lighthouse"}, timeout=aiohttp.ClientTimeout(total=0.1)
        )
    assert len(server.stats.submits) == 2  # the job was created although its answer never arrived


async def test_faults_only_hit_their_target(server: SegmindServer, http: aiohttp.ClientSession) -> None:
    server.inject("server_error", target="output")
    server.inject("insufficient_credits", target="v1")
    result = await fetch_result(http, await submit(http, server))
    async with aiohttp.ClientSession() as anonymous, anonymous.get(result["output"]) as response:
        assert response.status == 500
    await download_image(result["output"])
    async with http.post(submit_url(server, version="v1"), json={"prompt": "a lighthouse"}) as response:
        assert response.status == 406


async def test_ill_formed_faults_are_refused(server: SegmindServer) -> None:
    with pytest.raises(ValueError, match="kind"):
        server.inject("meteor")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target"):
        server.inject("drop", target="everything")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown parameter"):
        server.inject("slow", delay=1)
    with pytest.raises(ValueError, match="5xx"):
        server.inject("server_error", status=404)


async def test_clear_faults(server: SegmindServer, http: aiohttp.ClientSession) -> None:
    server.inject("insufficient_credits", count=1000)
    server.clear_faults()
    await submit(http, server)


# ---- stats ---------------------------------------------------------------------------------------


async def test_stats_record_submits_requests_and_polls(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    job = await submit(http, server, seed=7)
    await poll_until_final(http, job["status_url"])
    stats = server.stats
    assert [record.request_id for record in stats.submits] == [job["request_id"]]
    assert stats.submits[0].payload["seed"] == 7
    assert stats.status_polls == stats.status_polls_by_id[job["request_id"]] >= 1
    assert stats.requests[0].target == "submit"
    assert stats.requests[0].status == 200
    assert all(record.target == "status" for record in stats.requests[1:])
    assert stats.max_requests_in_window(60.0) == len(stats.requests)
    assert stats.max_requests_in_window(0.0) == 0


# ---- control API ---------------------------------------------------------------------------------


async def test_control_api_drives_faults_settings_and_stats(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    control = f"{server.base_url}/_control"
    fault = {"kind": "server_error", "target": "submit", "count": 2, "status": 503}
    async with http.post(f"{control}/faults", json=fault) as response:
        assert response.status == 200
        assert (await response.json())["faults"][0]["remaining"] == 2
    async with http.post(submit_url(server), json={"prompt": "a lighthouse"}) as response:
        assert response.status == 503
    async with http.delete(f"{control}/faults") as response:
        assert await response.json() == {"faults": []}

    async with http.post(f"{control}/settings", json={"blocked_words": ["dragon"], "workers": 3}) as response:
        assert response.status == 200
        assert (await response.json())["blocked_words"] == ["dragon"]
    assert server.settings.workers == 3
    job = await submit(http, server, prompt="a dragon")
    status, _, _ = await poll_until_final(http, job["status_url"])
    assert status == 422

    async with http.get(f"{control}/stats") as response:
        stats = await response.json()
    assert [record["request_id"] for record in stats["submits"]] == [job["request_id"]]
    assert stats["status_polls"] >= 1
    assert not any(record["path"].startswith("/_control") for record in stats["requests"])

    async with http.delete(f"{control}/stats") as response:
        assert (await response.json())["requests"] == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("faults", {"kind": "meteor"}),
        ("faults", {"kind": "drop", "count": 0}),
        ("faults", [1]),
        ("settings", {"workers": 0}),
        ("settings", {"colour": "blue"}),
        ("settings", {"blocked_words": "dragon"}),
    ],
)
async def test_control_api_refuses_bad_input(
    server: SegmindServer, http: aiohttp.ClientSession, path: str, body: object
) -> None:
    async with http.post(f"{server.base_url}/_control/{path}", json=body) as response:
        assert response.status == 400
        assert "error" in await response.json()
    assert server.settings.workers == 2


# ---- command line --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_command_line_server_serves_and_stops_on_sigterm() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtools.fakes.segmind",
        "--port",
        str(port),
        "--queue-seconds",
        "0",
        "--seconds-per-step",
        "0.0005",
        "--api-key",
        KEY,
        "--block-word",
        "kid",
        "--log-level",
        "WARNING",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=15)
        assert line.decode().strip().endswith(f"http://127.0.0.1:{port}")
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as http:
            async with http.post(f"{base}/v2/{MODEL}", json={"prompt": "a kid", **SMALL}) as response:
                job = await response.json()
            status, _, _ = await poll_until_final(http, job["status_url"])
            assert status == 422
            async with http.post(
                f"{base}/v2/{MODEL}", json={"prompt": "x"}, headers={"x-api-key": "no"}
            ) as r:
                assert r.status == 401
    finally:
        process.terminate()
        return_code = await asyncio.wait_for(process.wait(), timeout=10)
    assert return_code == 0
