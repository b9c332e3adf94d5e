"""Stand-in Dreamshaper outputs: real JPEGs, deterministic per (seed, sample), different for each.

Each picture is a stack of horizontal bands, each taken from one of a few pictures drawn for the image
size (a smooth colour field and a few shapes), which picture for which band chosen by the seed and the
sample, above a caption with the seed, the sample number, the size and the start of the prompt, so a
person looking at a result can tell which request produced it.

Drawing and encoding a whole 1024x1024 picture took 13 ms of CPU, so a burst of a thousand jobs cost the
server seconds of CPU just when their clients came to download. Instead, the pictures of each size are
encoded once with a restart marker after every row of 16x16 blocks, which makes each row's coded data
independent of the others, and so are the caption's lines; an output is such rows spliced together, and
only the line with its seed is encoded for it: under 1 ms at 1024x1024, 1.5 ms at 1536x1536.
"""

from __future__ import annotations

import io
import random
import re
import textwrap
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

JPEG_QUALITY = 88
_GRID = 4  # the colour field is a 4x4 grid of random colours, smoothly upscaled
_FIELD_BLOCK = 8  # pixels per side of the field's flat blocks
_SHAPES = (6, 12)
_ROW_PIXELS = 16  # with 4:2:0 chroma subsampling a JPEG codes the image in 16x16 blocks
_BAND_ROWS = 8  # block rows per band taken whole from one picture: 128 px
_PICTURES_PER_SIZE = 12
_RESTART_MARKER = re.compile(rb"\xff[\xd0-\xd7]")  # RST0-7; a literal 0xff byte in the data is 0xff00
_SOF0, _SOS = 0xC0, 0xDA
_EOI = b"\xff\xd9"

Color = tuple[int, int, int]


def render_sample(*, seed: int, index: int, samples: int, width: int, height: int, prompt: str) -> bytes:
    """Return the JPEG bytes of sample `index` (0-based) of a job."""
    rng = random.Random(f"{seed}/{index}")
    lines = _caption_lines(seed=seed, index=index, samples=samples, width=width, height=height, prompt=prompt)
    try:
        return _spliced_sample(rng, width, height, lines)
    except _UnexpectedJpeg:
        # A picture too small for its caption's rows, or a Pillow that lays its JPEGs out otherwise.
        return _drawn_sample(rng, width, height, lines)


class _UnexpectedJpeg(ValueError):
    """Pillow's JPEG is not laid out as the splicing needs (one scan, a restart marker per block row)."""


@dataclass(frozen=True)
class _Rows:
    """A JPEG cut into its header and the coded data of each block row (restart interval)."""

    header: bytes  # everything up to the scan data, with the picture height zeroed
    height_at: int  # where the height's two bytes sit in the header
    rows: tuple[bytes, ...]


def _spliced_sample(rng: random.Random, width: int, height: int, lines: list[str]) -> bytes:
    layout = _CaptionLayout.of(width, height, len(lines))
    pictures = None if layout.top < 0 else _pictures(width, height)
    if pictures is None:
        raise _UnexpectedJpeg("this size cannot be spliced")
    header = pictures[0].header
    rows: list[bytes] = []
    for row in range(layout.top // _ROW_PIXELS):
        if row % _BAND_ROWS == 0:
            picture = pictures[rng.randrange(len(pictures))]
        rows.append(picture.rows[row])
    for band in (*(_line_band(layout, line) for line in lines), _black_band(width, layout.bottom_height)):
        if band.header != header:
            raise _UnexpectedJpeg("the caption was coded with other tables than the pictures")
        rows.extend(band.rows)
    coded = [rows[0]]
    for number, row in enumerate(rows[1:]):
        coded.append(bytes((0xFF, 0xD0 + number % 8)))
        coded.append(row)
    at = pictures[0].height_at
    return b"".join((header[:at], height.to_bytes(2, "big"), header[at + 2 :], *coded, _EOI))


@lru_cache(maxsize=8)
def _pictures(width: int, height: int) -> tuple[_Rows, ...] | None:
    """The pictures every output of this size is cut from (a few ms each, once per size); None if
    they cannot be cut, remembered so that the fallback does not pay for trying again."""
    pictures = []
    try:
        for number in range(_PICTURES_PER_SIZE):
            rng = random.Random(f"pictures/{width}x{height}/{number}")
            image = _colour_field(rng, width, height)
            _draw_shapes(ImageDraw.Draw(image), rng, width, height)
            pictures.append(_encode_rows(image))
    except _UnexpectedJpeg:
        return None
    if any(picture.header != pictures[0].header for picture in pictures):
        return None
    return tuple(pictures)


@dataclass(frozen=True)
class _CaptionLayout:
    """The caption in whole block rows: a band per line, then a black band down to the bottom edge."""

    width: int
    font_size: int
    line_band_height: int
    top: int  # where the caption starts; < 0 when it does not fit (a tiny picture)
    bottom_height: int

    @classmethod
    def of(cls, width: int, height: int, lines: int) -> _CaptionLayout:
        font_size = max(14, width // 24)
        line_band_height = -(-int(font_size * 1.3) // _ROW_PIXELS) * _ROW_PIXELS
        lines_end = (height - font_size // 2) // _ROW_PIXELS * _ROW_PIXELS
        top = lines_end - lines * line_band_height
        return cls(width, font_size, line_band_height, top, height - lines_end)


@lru_cache(maxsize=1024)
def _line_band(layout: _CaptionLayout, line: str) -> _Rows:
    # Coded once per line and size: only the seed's line is new for each output, the rest (its sample
    # and size, the prompt) repeat from job to job.
    band = Image.new("RGB", (layout.width, layout.line_band_height))
    mask = _line_mask(layout.font_size, line)
    left, upper = layout.font_size // 2, max(0, (layout.line_band_height - mask.height) // 2)
    band.paste((255, 255, 255), (left, upper, left + mask.width, upper + mask.height), mask)
    return _encode_rows(band)


@lru_cache(maxsize=64)
def _black_band(width: int, height: int) -> _Rows:
    return _encode_rows(Image.new("RGB", (width, height)))


def _encode_rows(image: Image.Image) -> _Rows:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", restart_marker_rows=1)
    data = buffer.getvalue()
    position, height_at = 2, None
    while True:  # the segments before the scan: each is 0xff, its kind, and a two-byte length
        if position + 4 > len(data) or data[position] != 0xFF:
            raise _UnexpectedJpeg("no scan found")
        kind = data[position + 1]
        if kind == _SOF0:
            height_at = position + 5
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if kind == _SOS:
            break
    if height_at is None or not data.endswith(_EOI):
        raise _UnexpectedJpeg("not a baseline JPEG with one scan")
    rows = tuple(_RESTART_MARKER.split(data[position : -len(_EOI)]))
    if len(rows) != -(-image.height // _ROW_PIXELS):
        raise _UnexpectedJpeg("no restart marker after every block row")
    header = data[:height_at] + b"\0\0" + data[height_at + 2 : position]
    return _Rows(header, height_at, rows)


def _drawn_sample(rng: random.Random, width: int, height: int, lines: list[str]) -> bytes:
    image = _colour_field(rng, width, height)
    draw = ImageDraw.Draw(image)
    _draw_shapes(draw, rng, width, height)
    _draw_caption(image, draw, width, lines)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _random_colour(rng: random.Random) -> Color:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _colour_field(rng: random.Random, width: int, height: int) -> Image.Image:
    # A tiny random grid made smooth at 1/8 scale, then enlarged in flat 8x8 blocks: a bicubic resize
    # to full size costs 7 ms at 1024x1024, the blocks 1 ms, and they match JPEG's own 8x8 blocks, so
    # they look smooth and compress well.
    grid = Image.new("RGB", (_GRID, _GRID))
    grid.putdata([_random_colour(rng) for _ in range(_GRID * _GRID)])
    smooth_size = (max(1, -(-width // _FIELD_BLOCK)), max(1, -(-height // _FIELD_BLOCK)))
    smooth = grid.resize(smooth_size, Image.Resampling.BICUBIC)
    return smooth.resize(
        (width, height), Image.Resampling.NEAREST, box=(0, 0, width / _FIELD_BLOCK, height / _FIELD_BLOCK)
    )


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


def _draw_caption(image: Image.Image, draw: ImageDraw.ImageDraw, width: int, lines: list[str]) -> None:
    font_size = max(14, width // 24)
    line_height = int(font_size * 1.3)
    margin = font_size // 2
    top = image.height - margin * 2 - line_height * len(lines)
    draw.rectangle((0, top, width, image.height), fill=(0, 0, 0))
    for number, line in enumerate(lines):
        mask = _line_mask(font_size, line)
        left, upper = margin, top + margin + number * line_height
        image.paste((255, 255, 255), (left, upper, left + mask.width, upper + mask.height), mask)


@lru_cache(maxsize=512)
def _line_mask(font_size: int, line: str) -> Image.Image:
    # Drawing text costs more than the rest of the picture; the size and prompt lines repeat from
    # job to job, so each is drawn once and pasted after (a mask is only read, so threads may share it).
    font = _font(font_size)
    _, _, right, bottom = font.getbbox(line)
    mask = Image.new("L", (max(1, int(right)), max(1, int(bottom))))
    ImageDraw.Draw(mask).text((0, 0), line, fill=255, font=font)
    return mask


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
