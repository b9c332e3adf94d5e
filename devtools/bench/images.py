"""Fitting four large, noisy images under Discord's upload limit, and what that does to the event loop.

Uniform RGB noise is the worst case for JPEG, so these figures bound what real Dreamshaper outputs cost.
Two inputs: JPEGs at quality 95 (the format Segmind's outputs come in) and lossless PNGs, which are far
over either limit and must always be re-encoded.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from dataclasses import dataclass, field

from PIL import Image

from devtools.bench.report import FIT_HEADERS, Table, mebibytes, median_and_max
from services.images import fit_for_upload, prepare_for_upload

IMAGES = 4
EDGE = 2048
LIMITS_MIB = (10, 25)
INPUT_JPEG_QUALITY = 95
TICK = 0.002  # the ticker's sleep; a stall is how much longer than this a tick took


@dataclass
class FitFigures:
    input_label: str
    input_bytes: int
    limit_mib: int
    wall: list[float] = field(default_factory=list)
    stalls: list[float] = field(default_factory=list)
    output_bytes: int = 0
    output_sizes: str = ""
    output_format: str = ""
    kept_originals: bool = False


def noisy_inputs() -> dict[str, list[bytes]]:
    """The same four noise images, as JPEG and as PNG; seeded so every run fits the same bytes."""
    frames = []
    for index in range(IMAGES):
        rng = random.Random(index)
        frames.append(Image.frombytes("RGB", (EDGE, EDGE), rng.randbytes(EDGE * EDGE * 3)))
    return {
        f"JPEG q{INPUT_JPEG_QUALITY}": [
            _encode(frame, "JPEG", quality=INPUT_JPEG_QUALITY) for frame in frames
        ],
        # Level 1: noise does not compress anyway, and higher levels only slow the setup down.
        "PNG": [_encode(frame, "PNG", compress_level=1) for frame in frames],
    }


async def measure_fit(runs: int) -> tuple[list[FitFigures], float]:
    """Figures per (input, limit), and the longest tick gap of an idle loop for reference."""
    inputs = await asyncio.to_thread(noisy_inputs)
    idle = await _idle_stall(0.5)
    figures = []
    for label, images in inputs.items():
        for limit_mib in LIMITS_MIB:
            limit = limit_mib * 2**20
            entry = FitFigures(label, sum(len(data) for data in images), limit_mib)
            for _ in range(runs):
                started = time.perf_counter()
                prepared = fit_for_upload(images, limit_bytes=limit, stem="bench")
                entry.wall.append(time.perf_counter() - started)
                entry.stalls.append(await _stall_during(images, limit))
            entry.output_bytes = sum(len(image.data) for image in prepared)
            entry.output_sizes = ", ".join(sorted({f"{image.width}×{image.height}" for image in prepared}))
            entry.output_format = "/".join(sorted({image.content_type.split("/")[1] for image in prepared}))
            entry.kept_originals = [image.data for image in prepared] == images
            figures.append(entry)
    return figures, idle


def fit_table(figures: list[FitFigures], idle_stall: float, runs: int) -> Table:
    table = Table("Fitting images under Discord's upload limit", FIT_HEADERS)
    for entry in figures:
        table.rows.append(
            [
                f"{entry.input_label}, {mebibytes(entry.input_bytes)}",
                f"{entry.limit_mib} MiB",
                median_and_max(entry.wall),
                mebibytes(entry.output_bytes),
                f"{IMAGES} × {entry.output_sizes} {entry.output_format.upper()}"
                + (", the originals" if entry.kept_originals else ", re-encoded"),
                median_and_max(entry.stalls, "ms"),
            ]
        )
    table.notes.append(
        f"{IMAGES} images of uniform RGB noise (the worst case for JPEG), {runs} run(s) each. Wall time is "
        "`fit_for_upload` called directly; the stall is the longest gap beyond its "
        f"{TICK * 1000:g} ms sleep seen by a ticker coroutine while `prepare_for_upload` ran on its worker "
        f"thread (an idle loop's longest gap here: {idle_stall * 1000:.1f} ms)."
    )
    return table


def _encode(frame: Image.Image, fmt: str, **options: int) -> bytes:
    buffer = io.BytesIO()
    frame.save(buffer, format=fmt, **options)
    return buffer.getvalue()


async def _ticker(stop: asyncio.Event, gaps: list[float]) -> None:
    loop = asyncio.get_running_loop()
    last = loop.time()
    while not stop.is_set():
        await asyncio.sleep(TICK)
        now = loop.time()
        gaps.append(now - last - TICK)
        last = now


async def _stall_during(images: list[bytes], limit: int) -> float:
    stop = asyncio.Event()
    gaps: list[float] = []
    ticker = asyncio.create_task(_ticker(stop, gaps))
    try:
        await prepare_for_upload(images, limit_bytes=limit, stem="bench")
    finally:
        stop.set()
        await ticker
    return max(gaps, default=0.0)


async def _idle_stall(duration: float) -> float:
    stop = asyncio.Event()
    gaps: list[float] = []
    ticker = asyncio.create_task(_ticker(stop, gaps))
    await asyncio.sleep(duration)
    stop.set()
    await ticker
    return max(gaps, default=0.0)
