"""Turning an HTTP request into one decoded image, or a 4xx with a reason.

Every check runs before the expensive or dangerous step it guards, so a bad request costs the
replica almost nothing and can never take it down:

1. content type (415) - JPEG, PNG, ``application/octet-stream`` or a ``multipart/form-data``
   upload;
2. body size (413) - the ``Content-Length`` header is checked before reading, and the stream is
   counted while reading (a chunked body has no length);
3. empty body or upload (400);
4. image signature (400) - the bytes must start like a JPEG or PNG;
5. declared dimensions (413) - read from the header without decoding, so a decompression bomb
   (a few KB that expand to gigabytes of pixels) is refused before any pixel is allocated; the
   default limit is 25 megapixels (a 6000 x 4000 dermoscopy photo is 24);
6. decoding (400) - ``raykd.data.transforms.decode_image``, the decoder used in training, which
   raises ``ValueError`` on corrupt or truncated bytes. The Serve app decodes in a worker thread
   after checks 1-5 passed and after the image's pixels (the dimensions of check 5, times its
   copies) were reserved from the replica's pixel budget (:class:`raykd.serve.guard.PixelBudget`),
   so a burst of large images is refused with a 503 instead of growing the replica's memory.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from raykd.serve.options import ServeArgs, default

log = logging.getLogger(__name__)

__all__ = ["Limits", "RequestError", "check_content_type", "read_body", "extract_image_bytes",
           "precheck", "decode", "decode_checked", "image_format"]

ACCEPTED_TYPES = ("image/jpeg", "image/png", "application/octet-stream", "multipart/form-data")
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class RequestError(Exception):
    """A client error: ``status`` (4xx) and a message that says what to send instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Request limits: :class:`~raykd.serve.options.ServeArgs`' ``max_body_bytes`` and
    ``max_image_pixels``, whose defaults and descriptions are theirs too.

    Attributes:
        max_body_bytes: Largest accepted request body (the multipart envelope included).
        max_image_pixels: Largest accepted width x height declared by the image header.
    """

    max_body_bytes: int = default(ServeArgs, "max_body_bytes")
    max_image_pixels: int = default(ServeArgs, "max_image_pixels")

    def __post_init__(self) -> None:
        if self.max_body_bytes <= 0 or self.max_image_pixels <= 0:
            raise ValueError("max_body_bytes and max_image_pixels must be positive")


def check_content_type(content_type: str | None) -> str:
    """The media type of a request, or a 415 naming the accepted ones."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in ACCEPTED_TYPES:
        raise RequestError(
            415,
            f"unsupported Content-Type {content_type or '(none)'!r}: send the image as raw bytes with "
            "Content-Type image/jpeg, image/png or application/octet-stream, or as a multipart/form-data "
            "upload (field 'file')",
        )
    return media


async def read_body(content_length: str | None, chunks: AsyncIterator[bytes], limits: Limits) -> bytes:
    """Read a body of at most ``limits.max_body_bytes`` (413 beyond, 400 when empty)."""
    too_big = RequestError(413, f"request body larger than the limit of {limits.max_body_bytes} bytes")
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header {content_length!r}") from None
        if declared > limits.max_body_bytes:
            raise too_big
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_big
        parts.append(chunk)
    if size == 0:
        raise RequestError(400, "empty request body: send a JPEG or PNG image")
    return b"".join(parts)


async def extract_image_bytes(content_type: str, body: bytes, limits: Limits) -> bytes:
    """The image bytes of a request: the body itself, or the first file of a multipart upload."""
    if check_content_type(content_type) != "multipart/form-data":
        return body
    from starlette.datastructures import Headers, UploadFile  # lazy: starlette is heavy
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once() -> AsyncIterator[bytes]:
        yield body

    try:
        parser = MultiPartParser(Headers({"content-type": content_type}), once(), max_files=1,
                                 max_fields=16, max_part_size=limits.max_body_bytes)
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestError(400, f"malformed multipart body: {exc.message}") from None
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise RequestError(400, "multipart body has no file part: upload the image as field 'file'")
        data = await files[0].read()
    finally:
        await form.close()
    if not data:
        raise RequestError(400, "uploaded file is empty: send a JPEG or PNG image")
    return data


def image_format(data: bytes) -> str:
    """``"jpeg"`` or ``"png"`` from the file signature, else a 400."""
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    raise RequestError(400, "the body is not a JPEG or PNG image (unknown file signature)")


def check_dimensions(data: bytes, limits: Limits) -> tuple[int, int]:
    """Width and height from the image header (no pixel decoding); 413 above the pixel limit."""
    from PIL import Image  # lazy: PIL is heavy

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # parses the header only
                width, height = im.size
    except Image.DecompressionBombError:
        width = height = None
    except Exception as exc:  # noqa: BLE001 - any header parse failure is a bad image
        log.info("unreadable image header: %r", exc)  # the parser's words stay in the log
        raise RequestError(400, "cannot read the image header: the file is corrupt, truncated or not "
                                "a JPEG/PNG image") from None
    if width is None or width * height > limits.max_image_pixels:
        dims = "" if width is None else f" ({width}x{height} = {width * height} pixels)"
        raise RequestError(413, f"image too large{dims}: the limit is {limits.max_image_pixels} pixels "
                                f"({limits.max_image_pixels / 1e6:g} megapixels); send a smaller image")
    return width, height


def precheck(data: bytes, limits: Limits) -> tuple[int, int]:
    """The cheap checks (signature, header dimensions) that run before a request may queue; the
    image's width and height (what decoding it will allocate, known before a pixel is decoded)."""
    image_format(data)
    return check_dimensions(data, limits)


def decode(data: bytes) -> np.ndarray:
    """The training decoder (``raykd.data.transforms.decode_image``); a 400 on corrupt bytes."""
    from raykd.data.transforms import decode_image  # lazy: imports torch

    try:
        return decode_image(data)
    except ValueError as exc:
        reason = str(exc)
        if "OpenCV" in reason:  # the library's own message (source paths, C++ names) stays in the log
            log.info("image decoding failed: %s", reason)
            reason = "the decoder cannot read it"
        raise RequestError(400, f"cannot decode the image (corrupt or truncated?): {reason}") from None


def decode_checked(data: bytes, limits: Limits) -> np.ndarray:
    """Signature, header dimensions, then the training decoder; RGB uint8 HWC or a 4xx."""
    precheck(data, limits)
    return decode(data)
