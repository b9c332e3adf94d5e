from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from services.images import (
    MAX_PIXELS,
    MULTIPART_MARGIN_BYTES,
    ImageBytes,
    ImageDecodeError,
    PreparedImage,
    check_image,
    decode_base64_image,
    fit_for_upload,
    prepare_for_upload,
)

MIB = 1024 * 1024
DISCORD_DEFAULT_LIMIT = 10 * MIB


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    # Seeded noise: reproducible, and JPEG cannot compress it trivially.
    bands = len(Image.new(mode, (1, 1)).getbands())
    raw = random.Random(seed).randbytes(size[0] * size[1] * bands)
    return Image.frombytes(mode, size, raw)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    if fmt == "PNG":
        # Stored, not deflated: noise doesn't compress and this keeps fixtures fast.
        params.setdefault("compress_level", 0)
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def total_size(prepared: list[PreparedImage]) -> int:
    return sum(len(p.data) for p in prepared)


def assert_decodes_as_declared(prepared: list[PreparedImage]) -> None:
    for item in prepared:
        width, height, fmt = check_image(item.data)
        assert (width, height) == (item.width, item.height)
        assert item.content_type == f"image/{fmt.lower()}"
        assert item.filename.endswith("." + fmt.lower())


@pytest.fixture(scope="module")
def big_pngs() -> list[bytes]:
    return [encode(noise((2048, 2048), seed=seed)) for seed in range(4)]


def test_small_images_are_kept_byte_identical() -> None:
    originals = [
        encode(noise((64, 48), seed=1)),
        encode(noise((32, 32), seed=2), "JPEG", quality=85),
        encode(noise((40, 20), "RGBA", seed=3), "WEBP"),
    ]
    prepared = fit_for_upload(originals, limit_bytes=DISCORD_DEFAULT_LIMIT, stem="dreamshaper_42")

    assert [p.data for p in prepared] == originals
    assert [p.filename for p in prepared] == [
        "dreamshaper_42_1.png",
        "dreamshaper_42_2.jpeg",
        "dreamshaper_42_3.webp",
    ]
    assert [p.content_type for p in prepared] == ["image/png", "image/jpeg", "image/webp"]
    assert [(p.width, p.height) for p in prepared] == [(64, 48), (32, 32), (40, 20)]


def test_big_noisy_pngs_fit_the_default_limit_at_full_size(big_pngs: list[bytes]) -> None:
    assert sum(map(len, big_pngs)) > DISCORD_DEFAULT_LIMIT

    prepared = fit_for_upload(big_pngs, limit_bytes=DISCORD_DEFAULT_LIMIT, stem="dreamshaper_7")

    assert len(prepared) == 4
    assert total_size(prepared) <= DISCORD_DEFAULT_LIMIT - MULTIPART_MARGIN_BYTES
    assert [p.filename for p in prepared] == [f"dreamshaper_7_{i}.jpeg" for i in range(1, 5)]
    assert {p.content_type for p in prepared} == {"image/jpeg"}
    # Lowering JPEG quality is enough here, so resolution must be untouched.
    assert {(p.width, p.height) for p in prepared} == {(2048, 2048)}
    assert_decodes_as_declared(prepared)


def test_tiny_limit_downscales_and_keeps_aspect_ratio() -> None:
    originals = [encode(noise((640, 384), seed=seed)) for seed in range(4)]
    limit = MULTIPART_MARGIN_BYTES + 60 * 1024

    prepared = fit_for_upload(originals, limit_bytes=limit, stem="s")

    assert total_size(prepared) <= limit - MULTIPART_MARGIN_BYTES
    for item in prepared:
        assert item.width < 640
        assert item.width / item.height == pytest.approx(640 / 384, rel=0.02)
    assert_decodes_as_declared(prepared)


def test_reencoding_is_deterministic() -> None:
    originals = [encode(noise((300, 200), seed=seed)) for seed in range(3)]
    limit = MULTIPART_MARGIN_BYTES + 80 * 1024

    first = fit_for_upload(originals, limit_bytes=limit, stem="s")
    second = fit_for_upload(originals, limit_bytes=limit, stem="s")

    assert first == second


def test_absurd_limits_raise_clear_value_errors() -> None:
    originals = [encode(noise((512, 512), seed=seed)) for seed in range(2)]
    with pytest.raises(ValueError, match="cannot fit"):
        fit_for_upload(originals, limit_bytes=MULTIPART_MARGIN_BYTES + 200, stem="s")
    with pytest.raises(ValueError, match="margin"):
        fit_for_upload(originals, limit_bytes=MULTIPART_MARGIN_BYTES, stem="s")


def test_png_with_alpha_is_flattened_onto_a_background() -> None:
    image = noise((256, 256), "RGBA", seed=5)
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (0, 0, 128, 256))  # left half fully transparent
    image.putalpha(alpha)
    original = encode(image)
    # Just under the original size, so it has to be re-encoded.
    limit = MULTIPART_MARGIN_BYTES + len(original) - 1

    (prepared,) = fit_for_upload([original], limit_bytes=limit, stem="alpha")

    assert prepared.content_type == "image/jpeg"
    result = Image.open(io.BytesIO(prepared.data))
    assert result.mode == "RGB"
    # Hidden RGB noise under alpha=0 must not leak into the JPEG.
    left = result.crop((8, 8, 120, 248)).getextrema()
    assert all(low >= 240 for low, _ in left)
    right = result.crop((136, 8, 248, 248)).getextrema()
    assert any(low < 100 for low, _ in right)


def test_palette_png_with_transparency_converts() -> None:
    image = noise((256, 256), "P", seed=6)
    palette = bytearray(random.Random(6).randbytes(768))
    palette[0:3] = b"\x00\x00\x00"  # the transparent entry is black underneath
    image.putpalette(palette)
    image.paste(0, (0, 0, 128, 256))
    original = encode(image, transparency=0)
    limit = MULTIPART_MARGIN_BYTES + len(original) - 1

    (prepared,) = fit_for_upload([original], limit_bytes=limit, stem="p")

    assert prepared.content_type == "image/jpeg"
    assert_decodes_as_declared([prepared])
    result = Image.open(io.BytesIO(prepared.data))
    assert all(low >= 240 for low, _ in result.crop((8, 8, 120, 248)).getextrema())


def test_decode_base64_plain_data_uri_and_lenient_forms() -> None:
    png = encode(noise((8, 8), seed=7))
    plain = base64.b64encode(png).decode()

    assert decode_base64_image(plain) == png
    assert decode_base64_image(f"data:image/png;base64,{plain}") == png
    assert decode_base64_image(f"DATA:image/png;charset=x;BASE64,{plain}") == png
    assert decode_base64_image(plain.rstrip("=")) == png
    assert decode_base64_image("\n".join(plain[i : i + 76] for i in range(0, len(plain), 76))) == png
    assert decode_base64_image(base64.urlsafe_b64encode(png).decode()) == png


@pytest.mark.parametrize(
    "value",
    ["not base64 at all!", "QUJD$", "A", "", "data:image/png;base64,", "data:image/png,rawbytes", "ÄÖÜ"],
)
def test_decode_base64_rejects_invalid_input(value: str) -> None:
    with pytest.raises(ImageDecodeError):
        decode_base64_image(value, 3)


def test_check_image_reports_size_and_format() -> None:
    assert check_image(encode(noise((30, 20), seed=8))) == (30, 20, "PNG")
    assert check_image(encode(noise((30, 20), seed=8), "JPEG")) == (30, 20, "JPEG")
    assert check_image(encode(noise((30, 20), seed=8), "WEBP")) == (30, 20, "WEBP")


def test_truncated_image_names_its_index() -> None:
    good = encode(noise((64, 64), seed=9))
    truncated = encode(noise((256, 256), seed=10), "JPEG")[:2000]

    with pytest.raises(ImageDecodeError) as caught:
        fit_for_upload([good, good, truncated], limit_bytes=DISCORD_DEFAULT_LIMIT, stem="s")

    assert caught.value.index == 2
    assert "output 2" in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage" * 200_000, b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, encode(noise((16, 16), seed=11), "GIF")],
)
def test_garbage_raises_short_decode_error(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as caught:
        check_image(data, index=5)
    assert caught.value.index == 5
    assert len(str(caught.value)) < 300


def test_oversized_dimensions_are_rejected_as_a_bomb() -> None:
    # Zeros deflate to almost nothing: a small file claiming a big canvas.
    data = encode(Image.new("L", (2049, 2048)), compress_level=9)
    assert MAX_PIXELS < 2049 * 2048
    assert len(data) < 100_000
    with pytest.raises(ImageDecodeError, match="exceeds"):
        check_image(data)


def test_batch_size_is_validated() -> None:
    tiny = encode(noise((4, 4), seed=12))
    with pytest.raises(ValueError, match="11 images"):
        fit_for_upload([tiny] * 11, limit_bytes=DISCORD_DEFAULT_LIMIT, stem="s")
    with pytest.raises(ValueError, match="no images"):
        fit_for_upload([], limit_bytes=DISCORD_DEFAULT_LIMIT, stem="s")
    with pytest.raises(TypeError):
        fit_for_upload(tiny, limit_bytes=DISCORD_DEFAULT_LIMIT, stem="s")
    assert len(fit_for_upload([tiny] * 10, limit_bytes=DISCORD_DEFAULT_LIMIT, stem="s")) == 10


def test_unsafe_stem_is_sanitised() -> None:
    tiny = encode(noise((4, 4), seed=13))
    (prepared,) = fit_for_upload([tiny], limit_bytes=DISCORD_DEFAULT_LIMIT, stem="../dream shaper/é")
    assert prepared.filename == "dream_shaper_1.png"
    (prepared,) = fit_for_upload([tiny], limit_bytes=DISCORD_DEFAULT_LIMIT, stem="///")
    assert prepared.filename == "image_1.png"


async def test_prepare_for_upload_keeps_the_event_loop_responsive(big_pngs: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = loop.time()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    started = time.perf_counter()
    # 4 MiB forces several quality and downscale rounds: seconds of Pillow work.
    prepared = await prepare_for_upload(big_pngs, limit_bytes=4 * MIB, stem="a")
    elapsed = time.perf_counter() - started
    done.set()
    await ticking

    assert len(prepared) == 4
    assert elapsed > 0.3, "the workload must be heavy for this test to mean anything"
    assert len(gaps) >= 10
    # Ticks normally arrive every few ms; a step holding the GIL for a whole
    # 2048px encode shows up as a ~0.1 s gap.
    assert max(gaps) < 0.08


@st.composite
def image_sets(draw: st.DrawFn) -> list[bytes]:
    images = []
    for _ in range(draw(st.integers(1, 4))):
        size = (draw(st.integers(1, 160)), draw(st.integers(1, 160)))
        fmt = draw(st.sampled_from(["PNG", "JPEG", "WEBP"]))
        modes = {"PNG": ["RGB", "RGBA", "L", "LA", "P"], "JPEG": ["RGB", "L"], "WEBP": ["RGB", "RGBA"]}[fmt]
        image = noise(size, draw(st.sampled_from(modes)), seed=draw(st.integers(0, 2**32)))
        images.append(encode(image, fmt))
    return images


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=image_sets(), headroom=st.integers(16 * 1024, 400 * 1024))
def test_property_output_always_fits_and_decodes(images: list[bytes], headroom: int) -> None:
    limit = MULTIPART_MARGIN_BYTES + headroom

    prepared = fit_for_upload(images, limit_bytes=limit, stem="prop")

    assert len(prepared) == len(images)
    assert total_size(prepared) <= limit - MULTIPART_MARGIN_BYTES
    assert_decodes_as_declared(prepared)
    for item, original in zip(prepared, images, strict=True):
        width, height, _ = check_image(original)
        assert item.width <= width
        assert item.height <= height


@settings(max_examples=150, deadline=None)
@given(
    base=st.sampled_from(
        [
            encode(noise((24, 24), seed=14)),
            encode(noise((24, 24), seed=15), "JPEG"),
            encode(noise((24, 24), seed=16), "WEBP"),
        ]
    ),
    data=st.data(),
)
def test_property_corrupted_bytes_decode_or_raise_decode_error(base: bytes, data: st.DataObject) -> None:
    corrupted = bytearray(base[: data.draw(st.integers(1, len(base)))])
    for _ in range(data.draw(st.integers(0, 4))):
        corrupted[data.draw(st.integers(0, len(corrupted) - 1))] = data.draw(st.integers(0, 255))
    # Anything but ImageDecodeError escaping would crash the bot on a bad output.
    with contextlib.suppress(ImageDecodeError):
        check_image(bytes(corrupted))


# --- decoded once: checked at download, trusted at upload ---


class CountedDecodes:
    """Counts full decodes (Pillow's load) while it is installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = ImageFile.ImageFile.load

        def load(image: ImageFile.ImageFile) -> object:
            self.count += 1
            return original(image)

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_a_checked_image_is_not_decoded_again_for_its_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    data = ImageBytes(encode(noise((256, 192), seed=20), "JPEG"))
    decodes = CountedDecodes(monkeypatch)
    assert check_image(data) == (256, 192, "JPEG")
    (prepared,) = fit_for_upload([data], limit_bytes=DISCORD_DEFAULT_LIMIT, stem="once")
    assert decodes.count == 1
    assert prepared.data == data and (prepared.width, prepared.height) == (256, 192)


async def test_prepare_for_upload_of_checked_images_needs_no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    images = [ImageBytes(encode(noise((64, 64), seed=seed), "PNG")) for seed in (21, 22)]
    for index, data in enumerate(images):
        check_image(data, index)
    decodes = CountedDecodes(monkeypatch)
    prepared = await prepare_for_upload(images, limit_bytes=DISCORD_DEFAULT_LIMIT, stem="p")
    assert decodes.count == 0
    assert [p.data for p in prepared] == images


def test_an_unchecked_or_refused_image_is_still_decoded_and_refused_at_upload() -> None:
    whole = encode(noise((256, 256), seed=23), "JPEG")
    truncated = ImageBytes(whole[: len(whole) // 2])
    with pytest.raises(ImageDecodeError):
        check_image(truncated, 1)
    assert truncated.checked is None  # a refusal is not remembered as a pass
    with pytest.raises(ImageDecodeError) as caught:
        fit_for_upload([ImageBytes(whole), truncated], limit_bytes=DISCORD_DEFAULT_LIMIT, stem="s")
    assert caught.value.index == 1


@pytest.mark.parametrize("cut", [2, 100, 5_000, 20_000])
def test_check_image_finds_a_truncated_jpeg_however_little_is_missing(cut: int) -> None:
    # check_image decodes a JPEG at 1/8 scale; it must still read to the end of the stream.
    whole = encode(noise((1024, 768), seed=24), "JPEG", quality=90)
    assert check_image(whole) == (1024, 768, "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        check_image(whole[:-cut], 3)


def test_a_re_encode_decodes_checked_images_at_full_size(big_pngs: list[bytes]) -> None:
    images = [ImageBytes(data) for data in big_pngs[:2]]
    for index, data in enumerate(images):
        check_image(data, index)
    prepared = fit_for_upload(images, limit_bytes=2 * MIB, stem="big")
    assert total_size(prepared) <= 2 * MIB - MULTIPART_MARGIN_BYTES
    assert all(p.content_type == "image/jpeg" for p in prepared)
    assert_decodes_as_declared(prepared)
