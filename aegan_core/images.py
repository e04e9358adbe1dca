"""Pixels and image codecs shared by the service, training and evaluation (numpy + Pillow only:
no BentoML, no torch).

Model pixels are float32 in [-1, 1], laid out (N, C, H, W) with C = 1 (grey) or 3 (RGB).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import LimitExceeded, RequestError, UnsupportedImage


@dataclass(frozen=True)
class UploadLimits:
    """What one uploaded image may be before it is decoded (the service's AEGAN_MAX_UPLOAD_BYTES and
    AEGAN_MAX_PIXELS; ``aegan encode`` reads files with the same defaults)."""

    max_upload_bytes: int = 8 << 20  # bytes of one file
    max_pixels: int = 4096 * 4096  # width x height, read from the header before decoding


PSNR_CAP_DB = 100.0  # reported for an exact reconstruction (MSE 0) instead of infinity


def to_unit(images: np.ndarray) -> np.ndarray:
    """Pixels in [-1, 1] -> [0, 1] (clipped)."""
    return np.asarray((np.clip(images, -1.0, 1.0) + 1.0) / 2.0)


def per_sample_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean squared error of each sample (first axis), in float64."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.asarray((diff * diff).reshape(len(diff), -1).mean(axis=1))


def psnr(reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Per-sample PSNR in dB of pixels in [0, 1], ``10 log10(1 / MSE)``, capped at
    :data:`PSNR_CAP_DB`."""
    mse = per_sample_mse(reference, estimate)
    with np.errstate(divide="ignore"):
        value = 10.0 * np.log10(1.0 / mse)
    return np.minimum(value, PSNR_CAP_DB)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8, rounding to nearest."""
    pixels = (np.clip(images, -1.0, 1.0) + 1.0) * 127.5
    return np.asarray(np.rint(pixels).astype(np.uint8).transpose(0, 2, 3, 1))


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (H', W', C) uint8 array, ``nrow`` per row."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    tiles = to_uint8(images)
    grid = np.zeros((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = tiles[i]
    return grid


def to_pil(array: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> a Pillow image (mode L for one channel, RGB for three)."""
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    to_pil(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(images: np.ndarray, path: str, nrow: int | None = None) -> None:
    """Write a PNG grid of (N, C, H, W) images in [-1, 1]."""
    to_pil(make_grid(images, nrow)).save(path, format="PNG")


def png_base64(array: np.ndarray) -> str:
    """(H, W, C) uint8 -> base64 text of its PNG."""
    return base64.b64encode(encode_png(array)).decode("ascii")


def encode_gif(images: np.ndarray, frame_ms: int = 100) -> bytes:
    """(N, C, H, W) images in [-1, 1] -> a looping animated GIF (colour frames get a palette)."""
    frames = [to_pil(tile) for tile in to_uint8(images)]
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=frame_ms,
        loop=0,
    )
    return buffer.getvalue()


# --- Uploads -------------------------------------------------------------------------------------
# Every uploaded image reaches the model through decode_upload -> to_model_input, the one place
# where formats, modes, orientation, alpha, size and normalisation are handled.

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
# Signatures of common formats that are not accepted, to name them in the error message.
_OTHER_FORMATS = {
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO",
    b"8BPS": "PSD",
    b"%PDF": "PDF",
    b"\x89HDF": "HDF5",
    b"\x93NUMPY": "NPY",
}
MAX_JPEG_SCANS = 32  # libjpeg's standard progression writes 6 scans (grey) or 10 (colour)
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _sniff_other_format(head: bytes) -> str | None:
    for magic, name in _OTHER_FORMATS.items():
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":  # ISO media: AVIF, HEIC, MP4, ...
        return head[8:12].decode("ascii", "replace").strip() or "ISO media"
    return None


def decode_upload(
    data: bytes | Path,
    *,
    label: str,
    max_bytes: int,
    max_pixels: int,
    draft_size: int | None = None,
) -> Image.Image:
    """Read one upload into a fully decoded Pillow image, upright (EXIF orientation applied).

    ``label`` names the upload in error messages (e.g. ``images[2]``). The byte size is checked
    before reading and the pixel count from the header before decoding (decompression bombs).
    Only the first frame of an animation is used. ``draft_size`` lets the JPEG decoder scale a
    large photo down (by up to 8x) while keeping both sides at least that long.
    """
    size = data.stat().st_size if isinstance(data, Path) else len(data)
    if size > max_bytes:
        raise LimitExceeded(
            f"{label} is {size} bytes; the limit is {max_bytes} bytes per upload "
            "(AEGAN_MAX_UPLOAD_BYTES)"
        )
    if size == 0:
        raise RequestError(f"{label} is empty")
    raw = data.read_bytes() if isinstance(data, Path) else data
    try:
        image = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise LimitExceeded(f"{label} has too many pixels ({exc}) (AEGAN_MAX_PIXELS)") from None
    except UnidentifiedImageError:
        other = _sniff_other_format(raw[:16])
        accepted = ", ".join(ACCEPTED_FORMATS)
        if other:
            raise UnsupportedImage(
                f"{label} is a {other} file; accepted image formats: {accepted}"
            ) from None
        raise RequestError(
            f"{label} is not a readable image (corrupt data or an unknown format); "
            f"accepted image formats: {accepted}"
        ) from None
    # Pillow's format plugins raise many exception types on malformed headers (OSError for a BMP
    # header size it does not know, ValueError for a PNG text or ICC chunk that inflates too far,
    # SyntaxError, struct.error, ...): all of them mean the upload is corrupt.
    except Exception as exc:
        raise RequestError(f"{label} has a malformed image header: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise LimitExceeded(
            f"{label} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
            "pixels per image (AEGAN_MAX_PIXELS)"
        )
    if image.format == "JPEG":
        # Each scan of a progressive JPEG is decoded over the whole image, so a small file that
        # repeats its scans hundreds of times costs seconds of CPU. Inside entropy-coded data
        # 0xFF is always followed by 0x00 or a restart marker: FF DA is a start-of-scan marker.
        scans = raw.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise RequestError(
                f"{label} is a JPEG with {scans} scans; at most {MAX_JPEG_SCANS} are accepted"
            )
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft(None, (draft_size, draft_size))
        image.load()
        return ImageOps.exif_transpose(image)
    # Pillow's decoders raise many exception types on malformed data (OSError, SyntaxError,
    # ValueError, EOFError, struct.error, ...): all of them mean the upload is corrupt.
    except Exception as exc:
        raise RequestError(
            f"{label} is a corrupt or truncated {image.format} image: {exc}"
        ) from None


def _to_l_or_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> "L" or "RGB": alpha onto white, 16-bit and float depths to 8 bits."""
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float32)
        if image.mode != "F":  # 16-bit integer samples: full range 0..65535
            values = values / 257.0
        return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8))  # mode L
    if image.mode in ("LA", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("L" if image.mode == "1" else "RGB")


def to_model_input(image: Image.Image, shape: tuple[int, int, int]) -> np.ndarray:
    """A decoded image -> (C, H, W) float32 in [-1, 1] for a model taking ``shape`` = (C, H, W).

    Grey models get ITU-R 601 luma, colour models RGB. An image of another size is centre-cropped
    to the model's aspect ratio and resized with a Lanczos filter.
    """
    channels, height, width = shape
    image = _to_l_or_rgb(image).convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def load_uploads(
    uploads: Sequence[bytes | Path],
    shape: tuple[int, int, int],
    *,
    max_bytes: int,
    max_pixels: int,
    field: str = "images",
    first_index: int = 0,
) -> np.ndarray:
    """Decode and convert uploads into one (N, C, H, W) float32 batch in [-1, 1]. Error messages
    name each upload ``field[first_index + i]``."""
    draft_size = max(shape[1:])
    batch = []
    for i, upload in enumerate(uploads, start=first_index):
        image = decode_upload(
            upload,
            label=f"{field}[{i}]",
            max_bytes=max_bytes,
            max_pixels=max_pixels,
            draft_size=draft_size,
        )
        batch.append(to_model_input(image, shape))
    return np.stack(batch).astype(np.float32)
