"""The stand-in Segmind server's hostile faults, checked over real sockets."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from PIL import Image

from devtools.fakes.segmind.server import SegmindServer, SegmindServerSettings

KEY = "sg_hostile_server_key_51c"
MODEL = "sdxl1.0-dreamshaper"
SMALL = {"img_width": 512, "img_height": 512, "num_inference_steps": 20}


@pytest.fixture
async def server() -> AsyncIterator[SegmindServer]:
    server = SegmindServer(SegmindServerSettings(queue_seconds=0.02, seconds_per_step=0.0005))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as session:
        yield session


async def submit(http: aiohttp.ClientSession, server: SegmindServer, **payload: Any) -> dict[str, Any]:
    async with http.post(
        f"{server.base_url}/v2/{MODEL}", json={"prompt": "a lighthouse", **SMALL, **payload}
    ) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def completed(http: aiohttp.ClientSession, server: SegmindServer, **payload: Any) -> dict[str, Any]:
    job = await submit(http, server, **payload)
    status_url = f"{server.base_url}/v2/requests/{job['request_id']}/status"
    for _ in range(500):
        async with http.get(status_url) as response:
            if (await response.json())["status"] == "COMPLETED":
                return job
        await asyncio.sleep(0.01)
    raise AssertionError("the job did not complete")


def result_url(server: SegmindServer, job: dict[str, Any]) -> str:
    return f"{server.base_url}/v2/requests/{job['request_id']}"


async def test_foreign_urls_on_submit_point_elsewhere_but_the_job_exists(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    server.inject("foreign_urls", target="submit", origin="http://evil.example:8080")
    job = await submit(http, server)
    assert job["status_url"] == f"http://evil.example:8080/v2/requests/{job['request_id']}/status"
    assert job["response_url"] == f"http://evil.example:8080/v2/requests/{job['request_id']}"
    assert [record.request_id for record in server.stats.submits] == [job["request_id"]]
    # The job is real: the documented URL on the server itself answers for it.
    async with http.get(f"{server.base_url}/v2/requests/{job['request_id']}/status") as response:
        assert response.status == 200
    # Only one answer was changed.
    assert (await submit(http, server))["status_url"].startswith(server.base_url)


async def test_foreign_urls_on_result_point_the_outputs_elsewhere(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    job = await completed(http, server, samples=2)
    server.inject("foreign_urls", target="result", origin="http://169.254.169.254", path="/latest/meta-data/")
    server.inject("foreign_urls", target="result", origin="http://127.0.0.2:9999")
    async with http.get(result_url(server, job)) as response:
        assert (await response.json())["output"] == ["http://169.254.169.254/latest/meta-data/"] * 2
    async with http.get(result_url(server, job)) as response:
        outputs = (await response.json())["output"]
    assert outputs == [f"http://127.0.0.2:9999/outputs/{job['request_id']}/{n}.jpeg" for n in (1, 2)]


async def test_redirect_answers_307_with_the_location_and_handles_nothing(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    server.inject("redirect", target="submit", location="http://127.0.0.2:9999/v2/steal")
    async with http.post(
        f"{server.base_url}/v2/{MODEL}", json={"prompt": "x"}, allow_redirects=False
    ) as response:
        assert response.status == 307
        assert response.headers["Location"] == "http://127.0.0.2:9999/v2/steal"
    assert server.stats.submits == []
    assert server.stats.requests[-1].status == 307


@pytest.mark.parametrize("value", ["inf", "-1", "garbage", "99999999999", "nan"])
async def test_odd_reset_sends_the_value_verbatim(
    server: SegmindServer, http: aiohttp.ClientSession, value: str
) -> None:
    server.inject("odd_reset", target="status", value=value)
    async with http.get(f"{server.base_url}/v2/requests/some-id/status") as response:
        assert response.status == 429
        assert response.headers["x-rate-limit-reset-at-utc"] == value
        assert await response.json() == {"error": "Rate limit exceeded"}


@pytest.mark.parametrize("content_length", [False, True])
async def test_huge_body_streams_about_the_asked_size_as_json(
    server: SegmindServer, http: aiohttp.ClientSession, content_length: bool
) -> None:
    server.inject("huge_body", target="status", mib=3, content_length=content_length)
    async with http.get(f"{server.base_url}/v2/requests/abc/status") as response:
        assert response.status == 200
        assert (response.content_length is not None) == content_length
        body = await response.read()
    assert abs(len(body) - 3 * 1024 * 1024) < 100
    decoded = json.loads(body)
    assert (decoded["request_id"], decoded["status"]) == ("abc", "PROCESSING")


async def test_huge_body_is_cheap_for_the_server_when_the_client_stops_reading(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    server.inject("huge_body", target="result", mib=200)
    response = await http.get(f"{server.base_url}/v2/requests/abc")
    assert response.status == 200
    await response.content.readexactly(1024 * 1024)
    response.close()
    # The server is not stuck writing the other 199 MiB.
    async with http.get(f"{server.base_url}/v2/requests/abc/status") as again:
        assert again.status == 404


@pytest.mark.parametrize("body", ["not json", "[]", '{"status": "WEIRD"}'])
async def test_malformed_answers_the_raw_body(
    server: SegmindServer, http: aiohttp.ClientSession, body: str
) -> None:
    server.inject("malformed", target="status", body=body)
    async with http.get(f"{server.base_url}/v2/requests/abc/status") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.text() == body


async def test_malformed_submit_creates_the_job_only_after_accept(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    server.inject("malformed", target="submit", body="oops")
    server.inject("malformed", target="submit", body="oops", after_accept=True)
    for _ in range(2):
        async with http.post(f"{server.base_url}/v2/{MODEL}", json={"prompt": "x", **SMALL}) as response:
            assert (response.status, await response.text()) == (200, "oops")
    assert len(server.stats.submits) == 1


async def test_echo_key_repeats_the_received_key_in_the_error(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    server.inject("echo_key", target="status")
    async with http.get(f"{server.base_url}/v2/requests/abc/status") as response:
        assert response.status == 422
        body = await response.json()
    assert (body["request_id"], body["status"]) == ("abc", "FAILED")
    assert KEY in body["error"]
    server.inject("echo_key", target="result")
    async with http.get(f"{server.base_url}/v2/requests/abc") as response:
        assert response.status == 422
        body = await response.json()
    assert body["status"] == "FAILED" and KEY in body["error"]
    server.inject("echo_key", target="submit")
    async with http.post(f"{server.base_url}/v2/{MODEL}") as response:
        assert response.status == 500
        assert KEY in (await response.json())["error"]


@pytest.mark.parametrize(
    ("image_format", "pillow_format", "content_type"),
    [
        ("mpo", "MPO", "image/jpeg"),
        ("gif", "GIF", "image/gif"),
        ("bmp", "BMP", "image/bmp"),
        ("tiff", "TIFF", "image/tiff"),
        ("png", "PNG", "image/png"),
        ("webp", "WEBP", "image/webp"),
    ],
)
async def test_odd_image_serves_the_output_in_another_format(
    server: SegmindServer,
    http: aiohttp.ClientSession,
    image_format: str,
    pillow_format: str,
    content_type: str,
) -> None:
    job = await completed(http, server)
    async with http.get(result_url(server, job)) as response:
        output = (await response.json())["output"]
    server.inject("odd_image", target="output", format=image_format)
    async with http.get(output) as response:
        assert response.content_type == content_type
        data = await response.read()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == pillow_format
        assert image.size == (512, 512)
        if image_format == "mpo":
            assert getattr(image, "n_frames", 1) == 2
        image.load()
    async with http.get(output) as response:
        assert Image.open(io.BytesIO(await response.read())).format == "JPEG"


@pytest.mark.parametrize("image_format", ["truncated", "garbage"])
async def test_odd_image_serves_broken_files(
    server: SegmindServer, http: aiohttp.ClientSession, image_format: str
) -> None:
    job = await completed(http, server)
    async with http.get(result_url(server, job)) as response:
        output = (await response.json())["output"]
    server.inject("odd_image", target="output", format=image_format)
    async with http.get(output) as response:
        assert response.content_type == "image/jpeg"
        data = await response.read()
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError and truncation errors are OSErrors
        Image.open(io.BytesIO(data)).load()


async def test_many_outputs_lists_that_many_downloadable_jpegs(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    job = await completed(http, server)
    server.inject("many_outputs", target="result", outputs=12)
    async with http.get(result_url(server, job)) as response:
        outputs = (await response.json())["output"]
    assert len(outputs) == 12
    images = []
    async with aiohttp.ClientSession() as anonymous:
        for url in outputs:
            async with anonymous.get(url) as response:
                assert (response.status, response.content_type) == (200, "image/jpeg")
                images.append(await response.read())
    assert len(set(images)) == 12
    assert all(Image.open(io.BytesIO(data)).format == "JPEG" for data in images)


async def test_many_outputs_in_base64(server: SegmindServer, http: aiohttp.ClientSession) -> None:
    job = await completed(http, server, base64=True)
    server.inject("many_outputs", target="result", outputs=5)
    async with http.get(result_url(server, job)) as response:
        outputs = (await response.json())["output"]
    assert len(outputs) == 5
    assert all(Image.open(io.BytesIO(base64.b64decode(item))).format == "JPEG" for item in outputs)


@pytest.mark.parametrize(
    ("kind", "target", "params", "message"),
    [
        ("foreign_urls", "submit", {}, "needs the parameter origin"),
        ("foreign_urls", "status", {"origin": "http://x.example"}, "target of foreign_urls"),
        ("foreign_urls", "submit", {"origin": "x.example"}, "absolute"),
        ("foreign_urls", "submit", {"origin": "http://x.example/a"}, "without a path"),
        ("foreign_urls", "result", {"origin": "http://x.example", "path": "a"}, "start with /"),
        ("redirect", "any", {}, "needs the parameter location"),
        ("redirect", "any", {"location": "/relative"}, "absolute"),
        ("odd_reset", "any", {"value": 5}, "wrong type"),
        ("huge_body", "submit", {}, "target of huge_body"),
        ("huge_body", "status", {"mib": 0}, "mib"),
        ("huge_body", "status", {"mib": float("nan")}, "mib"),
        ("malformed", "output", {"body": "x"}, "target of malformed"),
        ("malformed", "status", {}, "needs the parameter body"),
        ("echo_key", "any", {}, "target of echo_key"),
        ("odd_image", "output", {"format": "jpeg2000"}, "format must be one of"),
        ("odd_image", "result", {"format": "gif"}, "target of odd_image"),
        ("many_outputs", "result", {"outputs": 0}, "outputs must be between"),
        ("many_outputs", "result", {"outputs": True}, "wrong type"),
    ],
)
def test_ill_formed_hostile_faults_are_refused(
    kind: str, target: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SegmindServer().inject(kind, target=target, **params)  # type: ignore[arg-type]


async def test_the_control_api_injects_hostile_faults(
    server: SegmindServer, http: aiohttp.ClientSession
) -> None:
    control = f"{server.base_url}/_control/faults"
    fault = {"kind": "odd_reset", "target": "status", "count": 2, "value": "inf"}
    async with http.post(control, json=fault) as response:
        assert response.status == 200
        assert (await response.json())["faults"] == [
            {"kind": "odd_reset", "target": "status", "remaining": 2, "value": "inf"}
        ]
    for _ in range(2):
        async with http.get(f"{server.base_url}/v2/requests/abc/status") as response:
            assert response.headers["x-rate-limit-reset-at-utc"] == "inf"
    async with http.post(control, json={"kind": "huge_body", "target": "submit"}) as response:
        assert response.status == 400
        assert "target" in (await response.json())["error"]
