"""Photo uploads: a multipart body streamed straight to disk under size and count limits, and
photos validated by decoding them (Pillow), never by their name or declared type.

Starlette's form parser spools whole files before the endpoint runs and has no per-file
limit; parsing here stops reading at the first photo over the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import numpy as np
from fastapi import Request
from PIL import Image, ImageOps, UnidentifiedImageError
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool

from service.errors import ApiError

PHOTO_FIELD: Final = "photos"
MAX_FIELDS: Final = 16
MAX_FIELD_BYTES: Final = 1024
PART_OVERHEAD: Final = 4096  # boundary and part headers
# Pillow decoders we try (no exotic ones), and the extension a stored photo gets from its
# decoded format (phones' multi-picture JPEGs decode as MPO through the JPEG opener).
DECODERS: Final = ["JPEG", "PNG", "WEBP"]
FORMATS: Final = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class ReceivedForm:
    photos: list[Path] = field(default_factory=list)  # staged files, in upload order
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PhotoInfo:
    format: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        return FORMATS[self.format]


def photo_too_large(index: int, message: str) -> ApiError:
    return ApiError(413, "photo_too_large", message, {"photo": index})


class _PhotoParser:
    """python-multipart callbacks writing each photo part to `staging/<index>.upload`."""

    def __init__(self, staging: Path, max_photos: int, max_photo_bytes: int) -> None:
        self.staging = staging
        self.max_photos = max_photos
        self.max_photo_bytes = max_photo_bytes
        self.form = ReceivedForm()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._file: IO[bytes] | None = None
        self._size = 0
        self._data = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self._disposition, self._size, self._data = b"", 0, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        is_file = b"filename" in options  # the filename itself is ignored
        if is_file != (self._name == PHOTO_FIELD):
            raise ApiError(
                422,
                "invalid_request",
                f"only `{PHOTO_FIELD}` parts may be files, and they must be",
                {"field": self._name},
            )
        if is_file:
            index = len(self.form.photos)
            if index >= self.max_photos:
                raise ApiError(
                    413,
                    "too_many_photos",
                    f"at most {self.max_photos} photos per avatar",
                    {"max_photos": self.max_photos},
                )
            path = self.staging / f"{index:02d}.upload"
            self.form.photos.append(path)
            self._file = path.open("wb")
        elif len(self.form.fields) >= MAX_FIELDS:
            raise ApiError(422, "invalid_request", "too many form fields")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._file is None:
            if self._size > MAX_FIELD_BYTES:
                raise ApiError(422, "invalid_request", f"form field {self._name!r} is too long")
            self._data += data[start:end]
            return
        if self._size > self.max_photo_bytes:
            raise photo_too_large(
                len(self.form.photos) - 1, f"a photo may be at most {self.max_photo_bytes} bytes"
            )
        self._file.write(data[start:end])

    def on_part_end(self) -> None:
        if self._file is not None:
            self.close()
        elif self._name in self.form.fields:
            raise ApiError(422, "invalid_request", f"form field {self._name!r} given twice")
        else:
            self.form.fields[self._name] = self._data.decode("utf-8", "replace")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def receive_photos(
    request: Request, staging: Path, *, max_photos: int, max_photo_bytes: int
) -> ReceivedForm:
    """Stream a multipart/form-data body into `staging`: `photos` parts become files, other
    parts short text fields. Raises ApiError (413/415/422) as soon as a limit is crossed."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(415, "unsupported_media_type", "send the photos as multipart/form-data")
    # A declared length beyond what the limits allow is refused before reading a byte.
    limit = max_photos * (max_photo_bytes + PART_OVERHEAD) + MAX_FIELDS * (
        MAX_FIELD_BYTES + PART_OVERHEAD
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            "payload_too_large",
            f"the request may be at most {limit} bytes",
            {"max_bytes": limit},
        )
    staging.mkdir(parents=True, exist_ok=True)
    state = _PhotoParser(staging, max_photos, max_photo_bytes)
    parser = MultipartParser(boundary, state.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            if chunk:
                # File writes happen in the callbacks: keep them off the event loop.
                await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(
            400, "malformed_multipart", f"the multipart body is malformed: {exc}"
        ) from None
    finally:
        state.close()
    return state.form


def inspect_photo(path: Path, index: int, max_pixels: int) -> PhotoInfo:
    """Decode the photo fully (catches truncated files) after checking its declared size
    against `max_pixels` (decompression bombs). Raises typed ApiErrors."""
    try:
        with Image.open(path, formats=DECODERS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise photo_too_large(
                    index, f"a photo may have at most {max_pixels} pixels, got {width}x{height}"
                )
            image.load()
            assert image.format is not None
            return PhotoInfo(image.format, width, height)
    except Image.DecompressionBombError:
        raise photo_too_large(index, "the photo's declared size is too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ApiError(
            422,
            "not_an_image",
            "a photo is not a JPEG, PNG or WebP image, or it is damaged",
            {"photo": index},
        ) from None


def load_photo(path: Path, max_pixels: int) -> np.ndarray:
    """A stored photo as (H, W, 3) uint8 RGB, upright per its EXIF orientation."""
    with Image.open(path, formats=DECODERS) as image:
        if image.size[0] * image.size[1] > max_pixels:
            raise ValueError(f"{path.name}: {image.size} exceeds {max_pixels} pixels")
        upright = ImageOps.exif_transpose(image)
        return np.asarray(upright.convert("RGB"))
