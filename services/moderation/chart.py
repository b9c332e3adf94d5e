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
    # A middle line only where it has a whole number of its own to show.
    for fraction in (0.0, 0.5, 1.0) if top >= 2 else (0.0, 1.0):
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
            last = index == len(shown) - 1
            # The last day is always named; the regular label before it gives way when they would touch.
            crowded = not last and len(shown) - 1 - index < label_every / 2
            if (index % label_every == 0 and not crowded) or last:
                label = day.strftime("%d %b")
                x = min(left, WIDTH - MARGIN_RIGHT - draw.textlength(label, font=font))
                draw.text((x, base + 8), label, fill=TEXT, font=font)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
