"""Stand-in Dreamshaper outputs: real JPEGs, deterministic per (seed, sample), different for each.

Each picture is a smooth colour field drawn from the seed, a few shapes, and a caption with the seed,
the sample number, the size and the start of the prompt, so a person looking at a result can tell which
request produced it.
"""

from __future__ import annotations

import io
import random
import textwrap
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

JPEG_QUALITY = 88
_GRID = 4  # the colour field is a 4x4 grid of random colours, smoothly upscaled
_SHAPES = (6, 12)

Color = tuple[int, int, int]


def render_sample(*, seed: int, index: int, samples: int, width: int, height: int, prompt: str) -> bytes:
    """Return the JPEG bytes of sample `index` (0-based) of a job."""
    rng = random.Random(f"{seed}/{index}")
    image = _colour_field(rng, width, height)
    draw = ImageDraw.Draw(image)
    _draw_shapes(draw, rng, width, height)
    _draw_caption(
        draw,
        width,
        height,
        _caption_lines(seed=seed, index=index, samples=samples, width=width, height=height, prompt=prompt),
    )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _random_colour(rng: random.Random) -> Color:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _colour_field(rng: random.Random, width: int, height: int) -> Image.Image:
    # Upscaling a tiny random grid is far cheaper than computing a gradient per pixel.
    grid = Image.new("RGB", (_GRID, _GRID))
    grid.putdata([_random_colour(rng) for _ in range(_GRID * _GRID)])
    return grid.resize((width, height), Image.Resampling.BICUBIC)


def _draw_shapes(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int) -> None:
    for _ in range(rng.randint(*_SHAPES)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        size = rng.randint(min(width, height) // 12, min(width, height) // 3)
        box = (x0, y0, x0 + size, y0 + int(size * rng.uniform(0.5, 1.5)))
        outline_width = max(2, size // 20)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=_random_colour(rng), outline=_random_colour(rng), width=outline_width)
        else:
            draw.rectangle(box, fill=_random_colour(rng), outline=_random_colour(rng), width=outline_width)


def _caption_lines(*, seed: int, index: int, samples: int, width: int, height: int, prompt: str) -> list[str]:
    prompt_lines = textwrap.wrap(" ".join(prompt.split()), width=36, max_lines=3, placeholder=" …")
    return [f"seed {seed}", f"sample {index + 1}/{samples}  {width}x{height}", *prompt_lines]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_caption(draw: ImageDraw.ImageDraw, width: int, height: int, lines: list[str]) -> None:
    font_size = max(14, width // 24)
    font = _font(font_size)
    line_height = int(font_size * 1.3)
    margin = font_size // 2
    top = height - margin * 2 - line_height * len(lines)
    draw.rectangle((0, top, width, height), fill=(0, 0, 0))
    for number, line in enumerate(lines):
        draw.text((margin, top + margin + number * line_height), line, fill=(255, 255, 255), font=font)


# Pillow's format name and the Content-Type a server would send for each odd output format.
_ODD_FORMATS: dict[str, tuple[str, str]] = {
    "mpo": ("MPO", "image/jpeg"),
    "gif": ("GIF", "image/gif"),
    "bmp": ("BMP", "image/bmp"),
    "tiff": ("TIFF", "image/tiff"),
    "png": ("PNG", "image/png"),
    "webp": ("WEBP", "image/webp"),
}
GARBAGE = b"this is not an image, whatever the Content-Type says\n" * 16


def reencode_sample(jpeg: bytes, image_format: str) -> tuple[bytes, str]:
    """A rendered JPEG served as another format (see the odd_image fault): the bytes and their Content-Type."""
    if image_format == "truncated":
        return jpeg[: len(jpeg) // 2], "image/jpeg"
    if image_format == "garbage":
        return GARBAGE, "image/jpeg"
    pillow_format, content_type = _ODD_FORMATS[image_format]
    with Image.open(io.BytesIO(jpeg)) as decoded:
        image = decoded.convert("RGB")
    buffer = io.BytesIO()
    if image_format == "mpo":
        # A primary picture and a smaller second one (as Ultra HDR gain maps and 3D cameras store them).
        second = image.resize((max(1, image.width // 4), max(1, image.height // 4)))
        image.save(buffer, format=pillow_format, save_all=True, append_images=[second], quality=JPEG_QUALITY)
    else:
        image.save(buffer, format=pillow_format)
    return buffer.getvalue(), content_type
