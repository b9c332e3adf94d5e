"""The picture `/admin usage` attaches: images per day as a bar chart, drawn with Pillow."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import date

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 800, 320
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 36, 44
BACKGROUND = (49, 51, 56)  # Discord's dark theme, so the chart sits in the message
BAR = (88, 101, 242)
TEXT = (219, 222, 225)
GRID = (78, 80, 88)
MAX_DAYS = 90


def images_per_day_chart(days: Sequence[tuple[date, int]], *, title: str) -> bytes:
    """A PNG of `days` (oldest first, at most MAX_DAYS) as bars, with the busiest day's count on the axis."""
    shown = list(days)[-MAX_DAYS:]
    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((MARGIN_LEFT, 10), title, fill=TEXT, font=font)
    top = max((count for _day, count in shown), default=0)
    plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_height = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    base = HEIGHT - MARGIN_BOTTOM
    for fraction in (0.0, 0.5, 1.0):
        y = base - round(plot_height * fraction)
        draw.line((MARGIN_LEFT, y, WIDTH - MARGIN_RIGHT, y), fill=GRID)
        draw.text((8, y - 6), f"{round(top * fraction)}", fill=TEXT, font=font)
    if shown:
        slot = plot_width / len(shown)
        bar = max(1.0, slot * 0.7)
        label_every = max(1, len(shown) // 8)
        for index, (day, count) in enumerate(shown):
            left = MARGIN_LEFT + index * slot + (slot - bar) / 2
            height = 0 if top == 0 else round(plot_height * count / top)
            if height:
                draw.rectangle((left, base - height, left + bar, base), fill=BAR)
            if index % label_every == 0 or index == len(shown) - 1:
                draw.text((left, base + 8), day.strftime("%d %b"), fill=TEXT, font=font)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
