"""Turn Segmind outputs into files Discord accepts.

Discord takes at most 10 files per message and answers HTTP 413 when an upload
exceeds the interaction's `attachment_size_limit`. The bot must never see a
413, so images that don't fit are re-encoded (and if needed downscaled) until
the whole batch does. The caller downloads the bytes; this module only uses
Pillow, and `prepare_for_upload` keeps that CPU work off the event loop.

Each output is decoded once. `check_image` reads every byte of the picture
(a JPEG at libjpeg's 1/8 scale, which still decodes the whole entropy-coded
stream, so a truncated one fails there as it would at full size, for a third
of the CPU) and marks the `ImageBytes` it accepted; `fit_for_upload` trusts
that mark and decodes only what it must re-encode, or what was never checked,
so a truncated image never reaches Discord either way.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image, ImageOps

MAX_FILES_PER_MESSAGE = 10

# The limit is checked against the whole multipart request, not just the image
# bytes. Per file Discord's multipart framing is a few hundred bytes (boundary,
# Content-Disposition, Content-Type), and the payload_json part is bounded by
# Discord's own caps (2000 chars of content + 6000 chars of embed text, at most
# 4 bytes each in UTF-8, plus JSON escaping). 64 KiB covers all of that with
# room to spare, and is well under 1% of the smallest real limit (10 MiB).
MULTIPART_MARGIN_BYTES = 64 * 1024

# Segmind's width/height top out at 2048, so anything larger is not an output
# we asked for; rejecting it before load() also bounds memory far below
# Pillow's global MAX_IMAGE_PIXELS (~89 Mpx), which we leave untouched.
MAX_PIXELS = 2048 * 2048

JPEG_QUALITY_STEPS = (90, 80, 70, 60, 50)
DOWNSCALE_FACTOR = 0.75
# Below this the result is no longer a useful picture; an upload limit that
# needs smaller images is treated as a configuration error.
MIN_EDGE_PX = 32
# JPEG has no alpha; flatten transparent areas onto a fixed colour instead of
# exposing whatever RGB values happen to sit under alpha=0.
FLATTEN_BACKGROUND = (255, 255, 255)
# >= 3.0 is visually indistinguishable from a full Lanczos pass (Pillow docs)
# while being much cheaper for large reductions.
RESIZE_REDUCING_GAP = 3.0

_FORMATS = ("JPEG", "PNG", "WEBP")
# A multi-picture JPEG (MPO: stereo pairs, Ultra HDR gain maps) is a JPEG whose first picture every viewer
# shows, so Pillow's "MPO" is uploaded as the JPEG it is.
_CONTENT_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_EXTENSIONS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# Pillow's plugins report malformed input through several exception types.
_PILLOW_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

_DATA_URI = re.compile(r"data:(?P<params>[^,]*),(?P<payload>.*)", re.IGNORECASE | re.DOTALL)
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
# Discord rewrites unusual filenames server-side, which breaks attachment://
# references from embeds; keep stems to a conservative character set.
_UNSAFE_STEM_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_MAX_STEM_LEN = 80
_MAX_REASON_LEN = 200


class ImageDecodeError(Exception):
    """An output that is not a usable image; `index` is its 0-based position."""

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        # Pillow messages are short, but never let a reason drag payload data into logs.
        self.reason = reason if len(reason) <= _MAX_REASON_LEN else reason[: _MAX_REASON_LEN - 3] + "..."
        super().__init__(f"image output {index} could not be decoded: {self.reason}")


class ImageInfo(NamedTuple):
    width: int
    height: int
    format: str


class ImageBytes(bytes):
    """The bytes of one output, as downloaded or decoded from base64, remembering `check_image`'s verdict.

    `check_image` sets `checked` once it has decoded the picture; bytes cannot change, so the verdict stays
    true for this object, and `fit_for_upload` skips a second decode of it. Plain `bytes` work everywhere
    too; they are simply decoded wherever they are checked.
    """

    checked: ImageInfo | None = None


@dataclass(frozen=True)
class PreparedImage:
    filename: str
    data: bytes
    content_type: str
    width: int
    height: int


def decode_base64_image(value: str, index: int = 0) -> bytes:
    """Decode plain, unpadded, URL-safe or `data:...;base64,` image payloads."""
    payload = value
    match = _DATA_URI.fullmatch(value.strip())
    if match is not None:
        params = [p.strip().lower() for p in match["params"].split(";")]
        if "base64" not in params:
            raise ImageDecodeError(index, "data URI is not base64-encoded")
        payload = match["payload"]
    # JSON APIs sometimes wrap long base64 lines or drop the padding.
    payload = "".join(payload.split()).translate(_URLSAFE_TO_STANDARD)
    payload += "=" * (-len(payload) % 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII input
        raise ImageDecodeError(index, f"invalid base64 ({exc})") from None
    if not data:
        raise ImageDecodeError(index, "empty base64 payload")
    return ImageBytes(data)


def check_image(data: bytes, index: int = 0) -> ImageInfo:
    """Decode every byte of `data` and return `(width, height, format)` (the picture's full size).

    The pixels are not kept, so a JPEG is decoded at 1/8 scale and in grey: every coefficient is still
    read, which is what finds a truncated file. `ImageBytes` remember the verdict (see `fit_for_upload`).
    """
    if isinstance(data, ImageBytes) and data.checked is not None:
        return data.checked
    info = _verify(data, index)
    if isinstance(data, ImageBytes):
        data.checked = info
    return info


def fit_for_upload(
    images: Sequence[bytes], *, limit_bytes: int, stem: str, max_files: int = MAX_FILES_PER_MESSAGE
) -> list[PreparedImage]:
    """Return files whose total size fits one Discord upload of `limit_bytes`.

    Originals are kept byte-for-byte when they already fit; otherwise every
    image becomes a JPEG, lowering quality first and resolution second. Every
    image is decoded here (an `ImageDecodeError` naming the first bad one)
    unless `check_image` already accepted that very `ImageBytes`, in which case
    only re-encoding decodes it again, at full size for its pixels.
    """
    batch = _as_batch(images, max_files)
    budget = _budget(limit_bytes)
    safe_stem = _safe_stem(stem)
    if sum(len(data) for data in batch) <= budget:
        infos = [check_image(data, index) for index, data in enumerate(batch)]
        return [
            _prepared(safe_stem, index, data, info.format, (info.width, info.height))
            for index, (data, info) in enumerate(zip(batch, infos, strict=True))
        ]
    decoded = [_load_image(data, index) for index, data in enumerate(batch)]
    return _reencode_to_fit(decoded, budget, limit_bytes, safe_stem)


async def prepare_for_upload(
    images: Sequence[bytes], *, limit_bytes: int, stem: str, max_files: int = MAX_FILES_PER_MESSAGE
) -> list[PreparedImage]:
    """`fit_for_upload` on a worker thread: decoding and encoding take seconds.

    Images `check_image` accepted that fit as they are need neither, so they are prepared at once, without
    the thread (whose hand-over costs a loaded event loop more than the work itself).
    """
    # Snapshot the batch so a caller mutating its list can't race the worker.
    batch = _as_batch(images, max_files)
    if _all_checked(batch) and sum(len(data) for data in batch) <= _budget(limit_bytes):
        return fit_for_upload(batch, limit_bytes=limit_bytes, stem=stem, max_files=max_files)
    return await asyncio.to_thread(
        fit_for_upload, batch, limit_bytes=limit_bytes, stem=stem, max_files=max_files
    )


def _all_checked(batch: Sequence[bytes]) -> bool:
    return all(isinstance(data, ImageBytes) and data.checked is not None for data in batch)


def _as_batch(images: Sequence[bytes], max_files: int) -> tuple[bytes, ...]:
    # A lone bytes object is itself a Sequence (of ints); catch that mistake early.
    if isinstance(images, bytes | bytearray | memoryview | str):
        raise TypeError("images must be a sequence of byte strings, not a single one")
    if max_files < 1:
        raise ValueError(f"max_files must be at least 1, got {max_files}")
    # Bytes cannot change under us; anything else is copied, and an `ImageBytes` keeps its verdict.
    batch = tuple(data if isinstance(data, bytes) else bytes(data) for data in images)
    if not batch:
        raise ValueError("no images to upload")
    if len(batch) > max_files:
        raise ValueError(f"{len(batch)} images exceed the limit of {max_files} files per message")
    return batch


def _budget(limit_bytes: int) -> int:
    budget = limit_bytes - MULTIPART_MARGIN_BYTES
    if budget <= 0:
        raise ValueError(
            f"upload limit of {limit_bytes} bytes leaves no room after the "
            f"{MULTIPART_MARGIN_BYTES}-byte multipart margin"
        )
    return budget


def _verify(data: bytes, index: int) -> ImageInfo:
    image = _open(data, index)
    info = ImageInfo(image.width, image.height, _format_of(image))
    # Only a JPEG can be decoded at a reduced scale, and to grey (every component's data is still read, as
    # they are interleaved, but one is turned into pixels); draft() leaves other formats as they are.
    image.draft("L", (1, 1))
    _decode(image, index)
    return info


def _load_image(data: bytes, index: int) -> Image.Image:
    image = _open(data, index)
    _decode(image, index)
    return image


def _open(data: bytes, index: int) -> Image.Image:
    if not data:
        raise ImageDecodeError(index, "empty data")
    try:
        image = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(index, "not a JPEG, PNG or WebP image") from None
    except _PILLOW_DECODE_ERRORS as exc:
        raise ImageDecodeError(index, _describe(exc)) from exc
    # open() has only parsed the header: refuse bombs before load() allocates pixels.
    if image.width * image.height > MAX_PIXELS:
        raise ImageDecodeError(index, f"{image.width}x{image.height} exceeds {MAX_PIXELS} pixels")
    return image


def _decode(image: Image.Image, index: int) -> None:
    try:
        # load(), unlike verify(), decodes every pixel, so truncation shows up here.
        image.load()
    except _PILLOW_DECODE_ERRORS as exc:
        raise ImageDecodeError(index, _describe(exc)) from exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _format_of(image: Image.Image) -> str:
    # open() was restricted to _FORMATS, so format is always one of them.
    return image.format or "JPEG"


def _safe_stem(stem: str) -> str:
    cleaned = _UNSAFE_STEM_CHARS.sub("_", stem).strip("._-")[:_MAX_STEM_LEN]
    return cleaned or "image"


def _prepared(stem: str, index: int, data: bytes, fmt: str, size: tuple[int, int]) -> PreparedImage:
    # Filenames count from 1, as users see them in the message.
    return PreparedImage(
        filename=f"{stem}_{index + 1}.{_EXTENSIONS[fmt]}",
        data=data,
        content_type=_CONTENT_TYPES[fmt],
        width=size[0],
        height=size[1],
    )


def _reencode_to_fit(
    decoded: Sequence[Image.Image], budget: int, limit_bytes: int, stem: str
) -> list[PreparedImage]:
    sources = [_flatten_to_rgb(image) for image in decoded]
    longest = max(max(source.size) for source in sources)
    for scale in _scales(longest):
        frames = _LazyFrames(sources, scale)
        for quality in JPEG_QUALITY_STEPS:
            encoded = _encode_within(frames, quality, budget)
            if encoded is not None:
                return [
                    _prepared(stem, index, data, "JPEG", frames[index].size)
                    for index, data in enumerate(encoded)
                ]
    raise ValueError(
        f"{len(sources)} image(s) cannot fit an upload limit of {limit_bytes} bytes even as "
        f"~{MIN_EDGE_PX}px JPEGs at quality {JPEG_QUALITY_STEPS[-1]}"
    )


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    # Re-encoding drops EXIF, so bake the orientation into the pixels first.
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, FLATTEN_BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _scales(longest: int) -> Iterator[float]:
    # Geometric steps guarantee termination; full size is always tried first.
    scale = 1.0
    while True:
        yield scale
        scale *= DOWNSCALE_FACTOR
        if longest * scale < MIN_EDGE_PX:
            return


class _LazyFrames:
    """Resized copies for one scale, made only when an encode needs them.

    Encoding stops at the first image that breaks the budget, so hopeless
    scales usually cost a single resize instead of one per image.
    """

    def __init__(self, sources: Sequence[Image.Image], scale: float) -> None:
        self._sources = sources
        self._scale = scale
        self._frames: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, index: int) -> Image.Image:
        frame = self._frames.get(index)
        if frame is None:
            frame = _resized(self._sources[index], self._scale)
            self._frames[index] = frame
        return frame


def _resized(source: Image.Image, scale: float) -> Image.Image:
    # Always resize from the full-size source so blur doesn't accumulate across steps.
    width, height = source.size
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == source.size:
        return source
    return source.resize(size, Image.Resampling.LANCZOS, reducing_gap=RESIZE_REDUCING_GAP)


def _encode_within(frames: _LazyFrames, quality: int, budget: int) -> list[bytes] | None:
    """JPEG-encode every frame, or return None as soon as the total exceeds `budget`."""
    encoded: list[bytes] = []
    total = 0
    for index in range(len(frames)):
        data = _encode_jpeg(frames[index], quality)
        total += len(data)
        if total > budget:
            return None
        encoded.append(data)
    return encoded


def _encode_jpeg(frame: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    # No optimize=True: it saves ~5% but makes Pillow encode the whole image in
    # one call that holds the GIL (~0.1 s at 2048px), stalling the event loop
    # even from a worker thread. The quality ladder absorbs the difference.
    frame.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
