"""Uploads: a multipart body streamed straight to disk under size and count limits, and
photos validated by decoding them (Pillow), never by their name or declared type (videos are
checked by demuxing them with PyAV: media.video.check_video, from the reenactments route).

Starlette's form parser spools whole files before the endpoint runs and has no per-file
limit; parsing here stops reading at the first photo over the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

from media.faces import FaceDetector
from service.errors import ApiError

PHOTO_FIELD: Final = "photos"
MAX_FIELDS: Final = 16
MAX_FIELD_BYTES: Final = 1024
PART_OVERHEAD: Final = 4096  # boundary and part headers
# Pillow decoders we try (no exotic ones), and the extension a stored photo gets from its
# decoded format (phones' multi-picture JPEGs decode as MPO through the JPEG opener).
DECODERS: Final = ["JPEG", "PNG", "WEBP"]
FORMATS: Final = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
MIN_PERSON_AREA: Final = 0.25  # of the largest face: smaller faces are the background
FACE_CHECK_SIDE: Final = 1280  # px: enough to find a photo's subject, cheap to decode


@dataclass(frozen=True)
class FileField:
    """A multipart field that carries files, and its limits."""

    name: str
    max_count: int
    max_bytes: int
    code: str  # the 413 code when one file is over `max_bytes`, e.g. `photo_too_large`
    noun: str  # "photo", for messages


@dataclass
class ReceivedForm:
    files: dict[str, list[Path]] = field(default_factory=dict)  # staged files, upload order
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def photos(self) -> list[Path]:
        return self.files.get(PHOTO_FIELD, [])

    def file(self, name: str) -> Path | None:
        """The single file sent as `name`, if any."""
        found = self.files.get(name, [])
        return found[0] if found else None


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


class _FormParser:
    """python-multipart callbacks writing file parts to `staging/[<field>-]<index>.upload`
    (photos without the prefix: the avatar route publishes the staging folder as is)."""

    def __init__(self, staging: Path, files: Sequence[FileField]) -> None:
        self.staging = staging
        self.limits = {f.name: f for f in files}
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
        limit = self.limits.get(self._name)
        if is_file != (limit is not None):
            allowed = ", ".join(f"`{name}`" for name in self.limits)
            raise ApiError(
                422,
                "invalid_request",
                f"only {allowed} parts may be files, and they must be",
                {"field": self._name},
            )
        if limit is not None:
            staged = self.form.files.setdefault(limit.name, [])
            if len(staged) >= limit.max_count:
                raise ApiError(
                    413,
                    f"too_many_{limit.noun}s",
                    f"at most {limit.max_count} {limit.noun}(s) as `{limit.name}`",
                    {f"max_{limit.noun}s": limit.max_count},
                )
            prefix = "" if limit.name == PHOTO_FIELD else f"{limit.name}-"
            path = self.staging / f"{prefix}{len(staged):02d}.upload"
            staged.append(path)
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
        limit = self.limits[self._name]
        if self._size > limit.max_bytes:
            index = len(self.form.files[limit.name]) - 1
            raise ApiError(
                413,
                limit.code,
                f"a {limit.noun} may be at most {limit.max_bytes} bytes",
                {limit.noun: index, "max_bytes": limit.max_bytes},
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


async def receive_form(request: Request, staging: Path, files: Sequence[FileField]) -> ReceivedForm:
    """Stream a multipart/form-data body into `staging`: parts named in `files` become files,
    other parts short text fields. Raises ApiError (413/415/422) as soon as a limit is crossed."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(415, "unsupported_media_type", "send the request as multipart/form-data")
    # A declared length beyond what the limits allow is refused before reading a byte.
    limit = sum(f.max_count * (f.max_bytes + PART_OVERHEAD) for f in files) + MAX_FIELDS * (
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
    state = _FormParser(staging, files)
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


async def receive_photos(
    request: Request, staging: Path, *, max_photos: int, max_photo_bytes: int
) -> ReceivedForm:
    """`receive_form` for an avatar: up to `max_photos` files as `photos`."""
    photos = FileField(PHOTO_FIELD, max_photos, max_photo_bytes, "photo_too_large", "photo")
    return await receive_form(request, staging, [photos])


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


def load_photo(path: Path, max_pixels: int, max_side: int | None = None) -> np.ndarray:
    """A stored photo as (H, W, 3) uint8 RGB, upright per its EXIF orientation; with
    `max_side`, at most that many pixels a side (JPEGs decode straight at a reduced scale)."""
    with Image.open(path, formats=DECODERS) as image:
        if image.size[0] * image.size[1] > max_pixels:
            raise ValueError(f"{path.name}: {image.size} exceeds {max_pixels} pixels")
        if max_side is not None:
            image.draft("RGB", (max_side, max_side))  # a no-op for PNG and WebP
        upright = ImageOps.exif_transpose(image).convert("RGB")
        if max_side is not None:
            upright.thumbnail((max_side, max_side))
        return np.asarray(upright)


def check_one_face(rgb: np.ndarray, index: int, detector: FaceDetector) -> None:
    """422 `no_face` / `multiple_faces` unless the photo shows exactly one person.

    Faces under a quarter of the largest one's area (people in the background) don't count:
    the avatar is the photo's subject, and the worker crops its largest face.
    """
    faces = detector.detect(rgb)
    if not faces:
        raise ApiError(422, "no_face", "no face was found in a photo", {"photo": index})
    people = [f for f in faces if f.box.area >= MIN_PERSON_AREA * faces[0].box.area]
    if len(people) > 1:
        raise ApiError(
            422,
            "multiple_faces",
            f"a photo shows {len(people)} people; send photos of one person",
            {"photo": index, "faces": len(people)},
        )
