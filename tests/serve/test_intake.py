"""Request intake: every bad request becomes a RequestError with the right 4xx, before decoding."""

from __future__ import annotations

import asyncio
import struct
import zlib

import cv2
import numpy as np
import pytest

from raykd.serve.intake import (
    Limits,
    RequestError,
    check_content_type,
    decode_checked,
    extract_image_bytes,
    image_format,
    read_body,
)
from tests.export.helpers import encoded_image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (the classic decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def status(fn, *args) -> int:
    with pytest.raises(RequestError) as err:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    return err.value.status


async def chunks(*parts: bytes):
    for p in parts:
        yield p


def test_content_types():
    assert check_content_type("image/jpeg") == "image/jpeg"
    assert check_content_type("multipart/form-data; boundary=x") == "multipart/form-data"
    assert status(check_content_type, "text/plain") == 415
    assert status(check_content_type, None) == 415


def test_body_limits_use_the_header_and_the_stream():
    limits = Limits(max_body_bytes=10, max_image_pixels=100)
    assert asyncio.run(read_body("4", chunks(b"ab", b"cd"), limits)) == b"abcd"
    assert status(read_body, "11", chunks(b"x"), limits) == 413  # refused before reading
    assert status(read_body, None, chunks(b"123456", b"789012"), limits) == 413  # chunked, no length
    assert status(read_body, "0", chunks(), limits) == 400
    assert status(read_body, "ten", chunks(b"x"), limits) == 400


def test_multipart_upload_yields_the_file_bytes():
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\nPNGDATA\r\n--XyZ--\r\n")
    ctype = "multipart/form-data; boundary=XyZ"
    assert asyncio.run(extract_image_bytes(ctype, body, Limits())) == b"PNGDATA"
    assert asyncio.run(extract_image_bytes("image/png", b"raw", Limits())) == b"raw"
    no_file = b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--XyZ--\r\n"
    assert status(extract_image_bytes, ctype, no_file, Limits()) == 400
    assert status(extract_image_bytes, "multipart/form-data", body, Limits()) == 400  # no boundary


def test_signatures_bombs_and_truncation():
    limits = Limits(max_body_bytes=1 << 20, max_image_pixels=10_000)
    png = encoded_image(0, ".png")
    assert image_format(png) == "png" and image_format(encoded_image(0, ".jpg")) == "jpeg"
    assert status(image_format, b"GIF89a....") == 400
    # 100_000 x 100_000 declared in 100 bytes: refused from the header alone.
    assert status(decode_checked, png_header_only(100_000, 100_000), limits) == 413
    assert status(decode_checked, png_header_only(101, 100), limits) == 413  # 10_100 > 10_000 pixels
    assert status(decode_checked, png[: len(png) // 2], limits) == 400
    jpg = encoded_image(1, ".jpg")
    assert status(decode_checked, jpg[: len(jpg) - 40], limits) == 400
    assert status(decode_checked, b"\xff\xd8\xff" + b"\x00" * 50, limits) == 400
    img = decode_checked(png, limits)
    assert img.dtype == np.uint8 and img.shape == (48, 40, 3)
    reference = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(img, reference)


def jpeg_header_only(width: int, height: int) -> bytes:
    """A JPEG whose SOF0 frame header declares ``width`` x ``height`` (no scan data follows)."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3))
    sos = struct.pack(">B", 3) + b"".join(bytes([i, 0]) for i in (1, 2, 3)) + b"\x00\x3f\x00"
    return (b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof
            + b"\xff\xda" + struct.pack(">H", len(sos) + 2) + sos + b"\x00" * 16 + b"\xff\xd9")


def test_the_default_limit_is_25_megapixels_checked_from_the_header():
    from raykd.serve.intake import check_dimensions

    limits = Limits()
    assert limits.max_image_pixels == 25_000_000
    assert check_dimensions(png_header_only(5000, 5000), limits) == (5000, 5000)  # exactly 25 MP
    assert check_dimensions(jpeg_header_only(6000, 4000), limits) == (6000, 4000)  # a 24 MP photo
    for data in (png_header_only(5001, 5000), jpeg_header_only(5000, 5001)):
        with pytest.raises(RequestError) as err:
            decode_checked(data, limits)  # refused before any pixel is decoded
        assert err.value.status == 413
        assert "25000000 pixels (25 megapixels)" in err.value.message and "25005000" in err.value.message


def test_unreadable_headers_and_corrupt_data_are_described_without_library_internals():
    limits = Limits()
    for data in (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff" + b"\x01" * 40):
        with pytest.raises(RequestError) as err:
            decode_checked(data, limits)
        assert err.value.status == 400
        assert "BytesIO" not in err.value.message and "Error" not in err.value.message
