"""Typed media errors; each carries a stable `code` the service returns to clients."""

from __future__ import annotations


class MediaError(ValueError):
    """Base class: the input media cannot be used."""

    code = "invalid_media"


class UnreadableMediaError(MediaError):
    """Missing file, not a media container, or not a video."""

    code = "unreadable_media"


class TruncatedMediaError(MediaError):
    """The file starts fine but breaks off (or is corrupt) part-way through."""

    code = "truncated_media"


class NoVideoStreamError(MediaError):
    """The container has no video stream (e.g. an audio-only file)."""

    code = "no_video_stream"


class NoFaceError(MediaError):
    code = "no_face"


class MultipleFacesError(MediaError):
    code = "multiple_faces"
