"""The usage chart: a picture whose bars follow the counts."""

from __future__ import annotations

import io
from datetime import date, timedelta

from PIL import Image

from services.moderation.chart import (
    BAR,
    HEIGHT,
    MARGIN_BOTTOM,
    MARGIN_LEFT,
    MARGIN_RIGHT,
    WIDTH,
    images_per_day_chart,
)


def bar_heights(png: bytes, columns: int) -> list[int]:
    """How tall the bar is at the middle of each of `columns` equal slots of the plot."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    slot = (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) / columns
    heights = []
    for index in range(columns):
        x = round(MARGIN_LEFT + index * slot + slot / 2)
        heights.append(sum(1 for y in range(HEIGHT - MARGIN_BOTTOM, 0, -1) if image.getpixel((x, y)) == BAR))
    return heights


def test_bars_follow_the_counts() -> None:
    start = date(2026, 11, 1)
    counts = [0, 5, 10, 20, 10]
    png = images_per_day_chart([(start + timedelta(days=n), c) for n, c in enumerate(counts)], title="Images")
    heights = bar_heights(png, len(counts))
    assert heights[0] == 0 and heights[3] == max(heights) > 0
    assert heights[1] < heights[2] < heights[3] and abs(heights[2] - heights[4]) <= 1
    assert abs(heights[3] - 2 * heights[2]) <= 2


def test_no_days_still_draws_a_chart() -> None:
    png = images_per_day_chart([], title="Nothing yet")
    assert Image.open(io.BytesIO(png)).size == (WIDTH, HEIGHT)
