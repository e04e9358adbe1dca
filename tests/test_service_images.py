"""Upload decoding and conversion to model input (aegan_core/images.py), and the output codecs."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pytest
from PIL import Image
from service_helpers import gradient, image_bytes, png_header

from aegan_core.errors import LimitExceeded, RequestError, UnsupportedImage
from aegan_core.images import (
    PSNR_CAP_DB,
    decode_upload,
    encode_gif,
    load_uploads,
    make_grid,
    psnr,
    save_grid,
    to_model_input,
    to_uint8,
    to_unit,
)

GREY = (1, 28, 28)
RGB = (3, 28, 28)
LIMITS = {"max_bytes": 1 << 20, "max_pixels": 4096 * 4096}


def load(data: bytes, shape: tuple[int, int, int] = GREY) -> np.ndarray:
    return load_uploads([data], shape, **LIMITS)[0]


def expected(image: Image.Image) -> np.ndarray:
    """What a grey 28x28 image should become: its pixels scaled to [-1, 1]."""
    return np.asarray(image.convert("L"), np.float32)[None] / 127.5 - 1.0


@pytest.mark.parametrize(
    ("fmt", "mode", "exact"),
    [
        ("PNG", "L", True),
        ("PNG", "RGB", True),
        ("PNG", "P", True),
        ("BMP", "L", True),
        ("BMP", "RGB", True),
        ("GIF", "L", True),
        ("WEBP", "RGB", False),
        ("JPEG", "L", False),
        ("JPEG", "RGB", False),
        ("JPEG", "CMYK", False),
    ],
)
def test_every_accepted_format_and_mode_becomes_the_same_model_input(fmt, mode, exact):
    picture = gradient()
    data = image_bytes(picture.convert(mode), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    x = load(data)
    assert x.shape == GREY and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    tolerance = 1e-6 if exact else 0.1  # lossy codecs and colour round trips
    assert np.abs(x - expected(picture)).mean() <= tolerance


def test_colour_models_get_rgb_in_channel_first_order():
    rgb = np.zeros((28, 28, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    x = load(image_bytes(Image.fromarray(rgb)), RGB)
    assert x.shape == RGB
    np.testing.assert_allclose(x[0], 1.0)
    np.testing.assert_allclose(x[1:], -1.0)


def test_grey_models_get_luma_of_colour_uploads():
    rgb = np.zeros((28, 28, 3), np.uint8)
    rgb[..., 1] = 255  # pure green: ITU-R 601 luma 0.587
    x = load(image_bytes(Image.fromarray(rgb)))
    assert abs(float(x.mean()) - (round(255 * 0.587) / 127.5 - 1)) < 0.01


@pytest.mark.parametrize(("mode", "fmt"), [("RGBA", "PNG"), ("LA", "PNG"), ("RGBA", "WEBP")])
def test_transparent_pixels_are_composited_on_white(mode, fmt):
    def upload(alpha: int) -> bytes:
        image = Image.new("RGBA", (28, 28), (0, 0, 0, alpha)).convert(mode)
        return image_bytes(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))

    assert np.allclose(load(upload(0)), 1.0)  # fully transparent: white
    assert np.allclose(load(upload(255)), -1.0)  # opaque black
    assert abs(float(load(upload(128)).mean())) < 0.02  # half-transparent black: mid grey


def test_palette_transparency_is_composited_on_white():
    image = Image.new("P", (28, 28), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    data = image_bytes(image, "PNG", transparency=0)
    assert np.allclose(load(data), 1.0)


def test_16_bit_grey_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 28 * 28).reshape(28, 28).astype(np.uint16)
    data = image_bytes(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    x = load(data)
    np.testing.assert_allclose(x[0], values / 257.0 / 127.5 - 1.0, atol=1 / 127.5)


def _pixels(image: Image.Image, channels: int) -> np.ndarray:
    """The 8-bit values that ``to_model_input`` gave for a one-row ``image``."""
    x = to_model_input(image, (channels, 1, image.width))
    return np.rint((x + 1.0) * 127.5).astype(int)


def test_every_pillow_mode_becomes_grey_or_colour_pixels():
    """``to_model_input`` takes any decoded image (its callers pass what ``decode_upload``
    gives, and any Pillow image of their own)."""
    floats = Image.fromarray(np.array([[-5.0, 0.0, 100.4, 255.0, 1000.0]], np.float32))
    sixteen = np.array([[0, 25700, 65535]], np.uint16)
    palette_alpha = Image.new("PA", (2, 1))
    palette_alpha.putpalette([0, 0, 0] * 256)
    palette_alpha.putpixel((1, 0), (0, 255))  # pixel 0 transparent black, pixel 1 opaque black
    premultiplied = Image.new("RGBa", (2, 1), (0, 0, 0, 0))
    premultiplied.putpixel((1, 0), (0, 0, 0, 255))
    cases = [
        (floats, [0, 0, 100, 255, 255]),  # float depth: rounded and clipped, not scaled
        (Image.fromarray(sixteen), [0, 100, 255]),  # 16-bit: scaled by 1/257
        (Image.fromarray(sixteen.astype(np.int32)), [0, 100, 255]),  # 32-bit integers: the same
        (palette_alpha, [255, 0]),  # transparent onto white
        (premultiplied, [255, 0]),
    ]
    one_bit = Image.new("1", (2, 1))
    one_bit.putpixel((1, 0), 1)
    cases.append((one_bit, [0, 255]))
    for image, grey in cases:
        assert _pixels(image, 1)[0, 0].tolist() == grey, image.mode
        assert _pixels(image, 3)[:, 0].T.tolist() == [[v] * 3 for v in grey], image.mode
    cmyk_red = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert _pixels(cmyk_red, 3)[:, 0].T.tolist() == [[255, 0, 0]]  # colour kept
    assert _pixels(cmyk_red, 1)[0, 0].tolist() == [76]  # ITU-R 601 luma of red
    # other colour spaces go through RGB (YCbCr's own Y channel is not the same luma)
    colours = np.random.default_rng(0).integers(0, 256, (1, 64, 3)).astype(np.uint8)
    ycbcr = Image.fromarray(colours).convert("YCbCr")
    for channels in (1, 3):
        np.testing.assert_array_equal(
            _pixels(ycbcr, channels), _pixels(ycbcr.convert("RGB"), channels)
        )


def test_exif_orientation_is_applied():
    picture = gradient((28, 28))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = image_bytes(picture, "JPEG", exif=exif, quality=100)
    image = decode_upload(data, label="images[0]", **{k: v for k, v in LIMITS.items()})
    upright = picture.transpose(Image.Transpose.ROTATE_270)
    assert np.abs(expected(image) - expected(upright)).mean() < 0.05
    assert np.abs(expected(image) - expected(picture)).mean() > 0.2


def test_animated_gif_uses_the_first_frame():
    first, second = Image.new("L", (28, 28), 0), Image.new("L", (28, 28), 255)
    data = image_bytes(first, "GIF", save_all=True, append_images=[second], duration=50)
    assert np.allclose(load(data), -1.0)


def test_other_sizes_are_centre_cropped_and_resized():
    wide = Image.new("L", (300, 100), 255)
    wide.paste(0, (100, 0, 200, 100))  # black centre square, white sides
    x = load(image_bytes(wide))
    assert x.shape == GREY
    assert x.mean() < -0.9  # the white sides were cropped away
    small = load(image_bytes(Image.new("L", (7, 7), 255)))
    assert np.allclose(small, 1.0)
    # resized with a Lanczos filter (sharper than Pillow's default bicubic)
    picture = gradient((90, 60))
    lanczos = picture.resize((28, 28), Image.Resampling.LANCZOS, box=(15, 0, 75, 60))
    np.testing.assert_array_equal(load(image_bytes(picture)), expected(lanczos))


def test_large_jpegs_decode_at_reduced_size():
    photo = gradient((2000, 1500), "RGB")
    blob = image_bytes(photo, "JPEG", quality=90)
    # the decoder scales by 1/2, 1/4 or 1/8 while both sides stay >= the requested size
    drafted = decode_upload(blob, label="x", max_bytes=1 << 22, max_pixels=10**7, draft_size=28)
    assert drafted.size == (250, 188)  # 2000 / 8, 1500 / 8 rounded up
    x = load(blob)
    assert x.shape == GREY
    assert np.abs(x - expected(photo.resize((28, 28), box=(250, 0, 1750, 1500)))).mean() < 0.05


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 40, 20), (3, 16, 12)])
def test_uploads_are_drafted_for_the_larger_side_of_the_model(shape):
    """``load_uploads`` asks the JPEG decoder for the model's larger side: 200x160 decodes at
    1/4 (50x40) for a side of 21 to 40 pixels, at 1/8 (25x20) for up to 20, and the model input
    is made from that decode, not from the full picture."""
    blob = image_bytes(gradient((200, 160), "RGB"), "JPEG", quality=90)
    side = max(shape[1:])
    drafted = decode_upload(blob, label="x", draft_size=side, **LIMITS)
    assert drafted.size == ((50, 40) if side > 20 else (25, 20))
    x = load_uploads([blob], shape, **LIMITS)
    np.testing.assert_array_equal(x, to_model_input(drafted, shape)[None])
    whole = decode_upload(blob, label="x", **LIMITS)
    assert not np.array_equal(x, to_model_input(whole, shape)[None])


def test_upload_over_the_byte_limit_is_refused_before_reading():
    with pytest.raises(LimitExceeded) as refused:
        decode_upload(b"\0" * 101, label="images[3]", max_bytes=100, max_pixels=10**6)
    assert str(refused.value) == (
        "images[3] is 101 bytes; the limit is 100 bytes per upload (AEGAN_MAX_UPLOAD_BYTES)"
    )
    png = image_bytes(gradient())
    decode_upload(png, label="images[3]", max_bytes=len(png), max_pixels=10**6)  # at the limit


@pytest.mark.parametrize(("side", "pillow_bomb"), [(5000, False), (20000, True)])
def test_too_many_pixels_is_refused_before_decoding(side, pillow_bomb):
    # Only a header: decoding would fail, so a 413 proves the size was checked first. 20000^2 is
    # also past Pillow's own decompression-bomb error, which must become the same 413.
    data = png_header(side, side)
    assert (side * side > 2 * Image.MAX_IMAGE_PIXELS) == pillow_bomb
    with pytest.raises(LimitExceeded) as refused:
        decode_upload(data, label="images[1]", max_bytes=1 << 20, max_pixels=4000 * 6000)
    if pillow_bomb:  # Pillow's own words inside
        assert re.fullmatch(
            r"images\[1\] has too many pixels \(.+\) \(AEGAN_MAX_PIXELS\)", str(refused.value)
        )
        return
    assert str(refused.value) == (
        f"images[1] is {side}x{side} = {side * side} pixels; the limit is 24000000 pixels per "
        "image (AEGAN_MAX_PIXELS)"
    )


def test_an_image_of_exactly_the_pixel_limit_is_decoded():
    data = image_bytes(gradient((28, 20)))
    assert decode_upload(data, label="x", max_bytes=1 << 20, max_pixels=28 * 20).size == (28, 20)


def test_corrupt_truncated_unsupported_and_empty_uploads_are_refused():
    png = image_bytes(gradient())
    with pytest.raises(RequestError, match="not a readable image"):
        load(b"this is not an image")
    with pytest.raises(RequestError, match="corrupt or truncated PNG"):
        load(png[: len(png) // 2])
    tiff = image_bytes(gradient(), "TIFF")
    with pytest.raises(UnsupportedImage, match="TIFF file; accepted image formats: PNG, JPEG"):
        load(tiff)
    with pytest.raises(RequestError, match="empty"):
        load(b"")


def test_gif_and_grid_codecs():
    frames = np.linspace(-1, 1, 5)[:, None, None, None] * np.ones((5, 1, 28, 28), np.float32)
    gif = Image.open(io.BytesIO(encode_gif(frames, frame_ms=40)))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (28, 28)
    assert gif.info["duration"] == 40 and gif.info["loop"] == 0  # loops for ever
    assert Image.open(io.BytesIO(encode_gif(frames))).info["duration"] == 100  # the default
    for i in range(5):
        gif.seek(i)
        assert np.all(np.asarray(gif.convert("L")) == to_uint8(frames[i : i + 1])[0, ..., 0])
    grid = make_grid(frames, nrow=5)
    assert grid.shape == (28 + 4, 5 * 30 + 2, 1)


def test_unit_pixels_and_psnr():
    np.testing.assert_array_equal(
        to_unit(np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0])), [0, 0, 0.5, 0.75, 1, 1]
    )
    clean = np.zeros((2, 1, 4, 4))
    noisy = clean + np.array([0.1, 0.01])[:, None, None, None]
    np.testing.assert_allclose(psnr(clean, noisy), [20.0, 40.0], atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact copy: capped, without a division warning
        assert psnr(clean, clean).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]


def test_to_uint8_scales_rounds_and_clips_to_0_255_channels_last():
    values = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], np.float32)
    pixels = to_uint8(values[None, None, None, :])  # (1, 1, 1, 7) -> (1, 1, 7, 1)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 1, 7, 1)
    np.testing.assert_array_equal(pixels[0, 0, :, 0], [0, 0, 64, 128, 191, 255, 255])
    rgb = np.array([-1.0, 0.0, 1.0], np.float32)[None, :, None, None]  # one pixel, 3 channels
    np.testing.assert_array_equal(to_uint8(rgb), [[[[0, 128, 255]]]])


def test_make_grid_places_the_tiles_row_by_row_between_padding():
    tiles = np.linspace(-0.5, 1, 5)[:, None, None, None] * np.ones((5, 1, 4, 3), np.float32)
    grid = make_grid(tiles, nrow=2)  # three rows of two 4x3 tiles, the last row half empty
    assert grid.shape == (2 + 3 * (4 + 2), 2 + 2 * (3 + 2), 1)
    want = np.zeros_like(grid)  # black padding around and between the tiles
    for i, tile in enumerate(to_uint8(tiles)):
        top, left = 2 + (i // 2) * (4 + 2), 2 + (i % 2) * (3 + 2)
        want[top : top + 4, left : left + 3] = tile
    np.testing.assert_array_equal(grid, want)
    assert make_grid(tiles).shape == (2 + 2 * 6, 2 + 3 * 5, 1)  # by default a square-ish grid
    assert make_grid(tiles[:1]).shape == (2 + 4 + 2, 2 + 3 + 2, 1)  # one image, one tile


def test_save_grid_writes_the_grid_as_png(tmp_path):
    frames = np.linspace(-1, 1, 5)[:, None, None, None] * np.ones((5, 1, 28, 28), np.float32)
    path = tmp_path / "grid"  # no suffix: a PNG whatever the name
    save_grid(frames, str(path), nrow=5)
    saved = Image.open(path)
    assert saved.format == "PNG" and saved.mode == "L"
    np.testing.assert_array_equal(np.asarray(saved)[..., None], make_grid(frames, nrow=5))
    colour = np.stack([frames[:, 0], -frames[:, 0], frames[:, 0] * 0], axis=1)  # (5, 3, 28, 28)
    save_grid(colour, str(path))
    saved = Image.open(path)
    assert saved.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(saved), make_grid(colour))


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
        (b"\x00\x00\x01\x00", "ICO"),
        (b"8BPS\x00\x01", "PSD"),
        (b"%PDF-1.7", "PDF"),
        (b"\x89HDF\r\n\x1a\n", "HDF5"),
        (b"\x93NUMPY\x01\x00", "NPY"),
        (b"\x00\x00\x00\x1cftypavif", "avif"),  # ISO media: the brand names it
        (b"\x00\x00\x00\x18ftypheic", "heic"),
        (b"\x00\x00\x00\x18ftyp    ", "ISO media"),  # a blank brand
        (b"\x00\x00\x00\x18ftyp\xe9vif", "\ufffdvif"),  # a brand byte not ASCII: replaced
    ],
)
def test_other_formats_are_named_by_their_signature(head, name):
    message = rf"images\[0\] is a {name} file; accepted image formats: PNG, JPEG, WEBP, GIF, BMP$"
    with pytest.raises(UnsupportedImage, match=message):
        load(head + bytes(range(64)))


def test_unknown_bytes_are_not_a_readable_image():
    message = (
        r"images\[0\] is not a readable image \(corrupt data or an unknown format\); "
        r"accepted image formats: PNG, JPEG, WEBP, GIF, BMP$"
    )
    for blob in (b"\x00\x00\x00\x18ftyq" + bytes(64), b"xxxxxftyp" + bytes(64)):
        with pytest.raises(RequestError, match=message):
            load(blob)
