"""Crafted uploads an attacker would send: each is answered 400 with a message naming the problem,
without a server error and without the CPU cost the file was built to cause."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image
from service_helpers import error_of, files, image_bytes

from aegan_core.images import MAX_JPEG_SCANS, decode_upload


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_inflating_icc_profile() -> bytes:
    """A valid 8x8 PNG whose iCCP chunk inflates from 2 kB to 2 MiB."""
    raw = image_bytes(Image.new("L", (8, 8), 128))
    profile = _chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * (2 << 20), 9))
    return raw[:33] + profile + raw[33:]  # right after the IHDR chunk


def bmp_with_header_size(size: int) -> bytes:
    raw = bytearray(image_bytes(Image.new("L", (8, 8), 128), "BMP"))
    raw[14:18] = struct.pack("<I", size)
    return bytes(raw)


def garbage_webp() -> bytes:
    body = b"WEBPVP8 " + struct.pack("<I", 100) + b"\0" * 100
    return b"RIFF" + struct.pack("<I", len(body)) + body


def progressive_jpeg_with_repeated_scans(repeats: int, side: int = 2048) -> bytes:
    """A flat grey progressive JPEG (a few kB) whose last scan is repeated ``repeats`` times."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=90)
    raw = buffer.getvalue()
    last_scan, end = raw.rfind(b"\xff\xda"), raw.rfind(b"\xff\xd9")
    return raw[:end] + raw[last_scan:end] * repeats + raw[end:]


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (png_with_inflating_icc_profile(), "malformed image header: Decompressed data too large"),
        (bmp_with_header_size(99), "malformed image header: Unsupported BMP header type (99)"),
        (garbage_webp(), "malformed image header"),
        (progressive_jpeg_with_repeated_scans(1000), "is a JPEG with 1006 scans; at most 32"),
    ],
    ids=["png-icc-bomb", "bmp-header-99", "webp-garbage", "jpeg-1000-scans"],
)
def test_crafted_uploads_are_400_naming_the_problem(client, blob, message):
    answer = client.post("/encode", files=files(image_bytes(Image.new("L", (28, 28))), blob))
    assert error_of(answer, 400).startswith("images[1] "), answer.text
    assert message in answer.json()["error"]


def test_jpeg_scan_limit_is_a_real_bound():
    ordinary = progressive_jpeg_with_repeated_scans(0, side=64)  # what Pillow writes: 6 scans
    decode_upload(ordinary, label="x", max_bytes=1 << 20, max_pixels=1 << 24)
    at_limit = progressive_jpeg_with_repeated_scans(MAX_JPEG_SCANS - 6, side=64)
    decode_upload(at_limit, label="x", max_bytes=1 << 20, max_pixels=1 << 24)
    with pytest.raises(Exception, match=f"{MAX_JPEG_SCANS + 1} scans"):
        decode_upload(
            progressive_jpeg_with_repeated_scans(MAX_JPEG_SCANS - 5, side=64),
            label="x",
            max_bytes=1 << 20,
            max_pixels=1 << 24,
        )


def test_a_long_filename_is_not_a_problem(client):
    upload = image_bytes(Image.new("L", (28, 28)))
    answer = client.post("/encode", files=[("images", ("x" * 300 + ".png", upload, "image/png"))])
    assert answer.status_code == 200, answer.text


FORM = {"content-type": "application/x-www-form-urlencoded"}
MULTIPART = {"content-type": "multipart/form-data; boundary=b"}


def text_part(name: str, value: bytes) -> bytes:
    return (
        f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value
        + (b"\r\n--b--\r\n")
    )


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"steps=" + b"1" * 5000 + b"&seeds=[1,2]", FORM, "'steps' has a value that cannot be"),
        (text_part("steps", b"1" * 5000), MULTIPART, "'steps' has a value that cannot be read"),
        (b"latents=" + b"%5B" * 100_000, FORM, "'latents' has a value that cannot be read"),
        (text_part("latents", b"[" * 100_000), MULTIPART, "nested too deeply"),
        (b"&".join(b"f%d=1" % i for i in range(1001)), FORM, "more than 1000 fields"),
    ],
    ids=["form-digits", "multipart-digits", "form-nesting", "multipart-nesting", "1001-fields"],
)
def test_hostile_form_values_are_400(client, body, headers, message):
    answer = client.post("/interpolate", content=body, headers=headers)
    assert message in error_of(answer, 400)


def test_a_form_of_exactly_1000_fields_is_served(client):
    fields = [b"steps=3", b"seeds=[1,2]", *(b"f%d=1" % i for i in range(998))]
    answer = client.post("/interpolate", content=b"&".join(fields), headers=FORM)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_json_bodies_have_their_own_small_limit(client, chunked):
    latent = b'{"latents": [[' + b",".join([b"0.5"] * 400_000) + b"]]}"  # 1.6 MB of JSON
    content = (
        iter([latent[i : i + 65536] for i in range(0, len(latent), 65536)]) if chunked else latent
    )
    answer = client.post("/decode", content=content, headers={"content-type": "application/json"})
    assert "larger than 1048576 bytes (AEGAN_MAX_JSON_BYTES)" in error_of(answer, 413)
    ok = client.post("/decode", json={"latents": [[0.5] * 32] * 64})  # the largest real request
    assert ok.status_code == 200, ok.text
