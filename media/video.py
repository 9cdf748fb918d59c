"""Streaming video I/O with PyAV: decode any common container frame by frame; encode H.264
MP4 with the source audio passed through, VP9 WebM with alpha, and mask-only videos.

Writers go to a temporary file that is renamed into place on success, so a failed or
interrupted encode never leaves a half-written artifact.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import av
import numpy as np

from media.errors import NoVideoStreamError, TruncatedMediaError, UnreadableMediaError

# Demuxers that open but are not videos (a .txt file opens as `tty`, images as 1-frame pipes).
NOT_VIDEO_FORMATS = {"tty", "image2", "image2pipe"}
# Audio codecs each output container can take as-is; anything else is re-encoded.
REMUX_AUDIO = {"mp4": {"aac", "mp3", "alac", "opus", "ac3", "eac3"}, "webm": {"opus", "vorbis"}}


@dataclass(frozen=True)
class VideoInfo:
    container: str
    codec: str
    width: int
    height: int
    fps: float
    num_frames: int
    duration: float | None  # seconds
    audio_codec: str | None
    audio_sample_rate: int | None

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None


@dataclass
class Frame:
    index: int
    time: float  # presentation time in seconds
    image: np.ndarray  # (H, W, 3) uint8 RGB, or (H, W, 4) RGBA from read_frames(alpha=True)


@contextlib.contextmanager
def open_video(path: str | os.PathLike[str]) -> Iterator[Any]:
    """Open a media file that must hold a video stream; typed errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableMediaError(f"file not found: {path}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise UnreadableMediaError(f"{path.name}: not a readable media file ({exc})") from exc
    try:
        names = set(container.format.name.split(","))
        if names & NOT_VIDEO_FORMATS or any(n.endswith("_pipe") for n in names):
            raise UnreadableMediaError(f"{path.name}: not a video (format {container.format.name})")
        if not container.streams.video:
            kind = "audio-only file" if container.streams.audio else "no video stream"
            raise NoVideoStreamError(f"{path.name}: {kind}")
        yield container
    finally:
        container.close()


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Container, codec, size, fps, frame count and audio of a video, without decoding it."""
    with open_video(path) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        fps = float(video.average_rate or video.guessed_rate or 0)
        num_frames = video.frames
        if not num_frames:  # webm/mkv headers carry no count: count packets instead
            try:
                num_frames = sum(1 for p in container.demux(video) if p.size)
            except av.FFmpegError as exc:
                raise TruncatedMediaError(f"{Path(path).name}: corrupt ({exc})") from exc
        duration = container.duration / av.time_base if container.duration else None
        return VideoInfo(
            container=container.format.name,
            codec=video.codec_context.name,
            width=video.codec_context.width,
            height=video.codec_context.height,
            fps=fps,
            num_frames=num_frames,
            duration=duration,
            audio_codec=audio.codec_context.name if audio else None,
            audio_sample_rate=audio.codec_context.sample_rate if audio else None,
        )


def check_video(path: str | os.PathLike[str]) -> VideoInfo:
    """`probe`, then demux every video packet and decode the first frame: catches a file cut
    short or corrupt part-way in milliseconds per minute of video, without decoding it all
    (an upload is checked with this before any work is queued)."""
    info = probe(path)
    name = Path(path).name
    with open_video(path) as container:
        stream = container.streams.video[0]
        last, decoded = 0.0, False
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.time_base is not None:
                    last = max(last, float(packet.pts * packet.time_base))
                if not decoded and packet.size:
                    decoded = bool(stream.codec_context.decode(packet))
        except av.FFmpegError as exc:
            raise TruncatedMediaError(f"{name}: corrupt ({exc})") from exc
        if not decoded:
            with contextlib.suppress(av.FFmpegError):
                decoded = bool(stream.codec_context.decode(None))
        if not decoded:
            raise TruncatedMediaError(f"{name}: no decodable video frames")
        start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        expected = _declared_video_seconds(stream)
        fps = info.fps or 25.0
        end = last - start + 1 / fps
        if expected is not None and end < expected - max(3 / fps, 0.02 * expected):
            raise TruncatedMediaError(
                f"{name}: stream ends at {end:.2f}s, header says {expected:.2f}s"
            )
    # The header's duration is the uploader's claim; limits apply to what the packets span.
    return replace(info, duration=max(info.duration or 0.0, end))


def read_frames(
    path: str | os.PathLike[str], max_frames: int | None = None, alpha: bool = False
) -> Iterator[Frame]:
    """Decode frames one at a time (never the whole video in memory).

    `alpha=True` returns RGBA and decodes VP9 with libvpx, since FFmpeg's native VP9
    decoder silently drops the alpha plane.
    """
    with open_video(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 25)
        frames: Iterator[Any]
        if alpha and stream.codec_context.name == "vp9":
            decoder = av.CodecContext.create("libvpx-vp9", "r")
            frames = (f for p in container.demux(stream) for f in decoder.decode(p))
        else:
            stream.thread_type = "AUTO"
            frames = container.decode(stream)
        index, time = 0, 0.0
        try:
            for frame in frames:
                time = frame.time if frame.time is not None else index / fps
                image = frame.to_ndarray(format="rgba" if alpha else "rgb24")
                yield Frame(index=index, time=float(time), image=image)
                index += 1
                if max_frames is not None and index >= max_frames:
                    return
        except av.FFmpegError as exc:
            raise TruncatedMediaError(
                f"{Path(path).name}: decoding failed after {index} frames ({exc})"
            ) from exc
        if index == 0:
            raise TruncatedMediaError(f"{Path(path).name}: no decodable video frames")
        expected = _declared_video_seconds(stream)
        if expected is not None and time + 1 / fps < expected - max(3 / fps, 0.02 * expected):
            raise TruncatedMediaError(
                f"{Path(path).name}: stream ends at {time:.2f}s, header says {expected:.2f}s"
            )


def _declared_video_seconds(stream: Any) -> float | None:
    """The video stream's own duration from its header (mp4) or DURATION tag (mkv/webm)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")
    if not tag:
        return None
    try:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


# --- writing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoFormat:
    """One output flavour: codec, pixel formats and container."""

    codec: str
    pix_fmt: str  # encoded pixel format
    input_format: str  # ndarray layout accepted by write(): rgb24, rgba or gray
    container: str  # muxer name
    options: tuple[tuple[str, str], ...] = ()


MP4_H264 = VideoFormat(
    "libx264", "yuv420p", "rgb24", "mp4", (("crf", "18"), ("preset", "veryfast"))
)
WEBM_VP9_ALPHA = VideoFormat(
    "libvpx-vp9", "yuva420p", "rgba", "webm", (("crf", "30"), ("b", "0"), ("deadline", "realtime"))
)
# Masks: a playable grey H.264 MP4 for clients, and an exact FFV1 file for training data.
MASK_MP4 = VideoFormat("libx264", "yuv420p", "gray", "mp4", (("crf", "12"), ("preset", "veryfast")))
MASK_LOSSLESS = VideoFormat("ffv1", "gray", "gray", "matroska")


class VideoWriter:
    """Encode frames to `path`; optionally copy (or, if the container can't take it,
    re-encode) the audio track of `audio_from`, interleaved as frames are written.

    Frames are written at a constant `fps`; odd sizes are padded by one edge pixel
    because 4:2:0 chroma needs even dimensions.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float,
        width: int,
        height: int,
        fmt: VideoFormat = MP4_H264,
        audio_from: str | os.PathLike[str] | None = None,
    ):
        self.path = Path(path)
        self.fmt = fmt
        self.size = (width, height)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = av.open(str(self._tmp), mode="w", format=fmt.container)
        rate = Fraction(fps).limit_denominator(1001)
        self._stream = cast(av.VideoStream, self._out.add_stream(fmt.codec, rate=rate))
        self._stream.width = width + width % 2 if fmt.pix_fmt.startswith("yuv") else width
        self._stream.height = height + height % 2 if fmt.pix_fmt.startswith("yuv") else height
        self._stream.pix_fmt = fmt.pix_fmt
        self._stream.options = dict(fmt.options)
        self._frame_time = 1 / float(rate)
        self._count = 0
        self._audio = _AudioCopy(audio_from, self._out, fmt.container) if audio_from else None

    def write(self, image: np.ndarray) -> None:
        """One frame: (H, W, 3) uint8 RGB, (H, W, 4) RGBA or (H, W) gray per the format."""
        w, h = self.size
        expected = {"rgb24": (h, w, 3), "rgba": (h, w, 4), "gray": (h, w)}[self.fmt.input_format]
        if image.shape != expected or image.dtype != np.uint8:
            raise ValueError(f"frame must be uint8 {expected}, got {image.dtype} {image.shape}")
        pad_h, pad_w = self._stream.height - h, self._stream.width - w
        if pad_h or pad_w:
            pad = ((0, pad_h), (0, pad_w)) + (((0, 0),) if image.ndim == 3 else ())
            image = np.pad(image, pad, mode="edge")
        frame = av.VideoFrame.from_ndarray(
            np.ascontiguousarray(image), format=self.fmt.input_format
        )
        frame.pts = self._count
        self._out.mux(self._stream.encode(frame))
        self._count += 1
        if self._audio:
            self._audio.copy_until(self._count * self._frame_time)

    def close(self) -> Path:
        """Flush, finish the audio up to the video's end, and move the file into place."""
        self._out.mux(self._stream.encode())
        if self._audio:
            self._audio.finish(self._count * self._frame_time)
        self._out.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._out.close()
        if self._audio:
            self._audio.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _AudioCopy:
    """Streams the first audio track of a source file into an output container."""

    def __init__(self, source: str | os.PathLike[str], out: Any, container: str):
        self._src = av.open(str(source))
        self._in = self._src.streams.audio[0] if self._src.streams.audio else None
        self._pending: Any = None
        if self._in is None:
            self._src.close()
            return
        self._remux = self._in.codec_context.name in REMUX_AUDIO.get(container, set())
        if self._remux:
            self._out_stream = out.add_stream_from_template(self._in)
        else:
            codec = "libopus" if container == "webm" else "aac"
            rate = 48000 if codec == "libopus" else self._in.codec_context.sample_rate
            self._out_stream = out.add_stream(codec, rate=rate)
            self._out_stream.layout = self._in.codec_context.layout.name
        self._out = out
        self._packets = self._src.demux(self._in)

    def copy_until(self, seconds: float) -> None:
        """Mux source audio up to `seconds`, keeping the file interleaved."""
        if self._in is None:
            return
        for packet in self._next_packets(seconds):
            if self._remux:
                packet.stream = self._out_stream
                self._out.mux(packet)
            else:
                for frame in packet.decode():
                    frame.pts = None  # let the encoder re-time resampled audio
                    self._out.mux(self._out_stream.encode(frame))

    def finish(self, seconds: float) -> None:
        self.copy_until(seconds)
        if self._in is not None and not self._remux:
            self._out.mux(self._out_stream.encode())
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._src.close()

    def _next_packets(self, seconds: float) -> Iterator[Any]:
        while True:
            packet = self._pending
            if packet is None:
                packet = next(self._packets, None)
                if packet is None:
                    return
            self._pending = None
            if packet.dts is None:  # the demuxer's final flush packet
                continue
            if packet.pts is not None and packet.pts * packet.time_base >= seconds:
                self._pending = packet
                return
            yield packet


def write_video(
    path: str | os.PathLike[str],
    frames: Iterator[np.ndarray] | list[np.ndarray],
    fps: float,
    fmt: VideoFormat = MP4_H264,
    audio_from: str | os.PathLike[str] | None = None,
) -> Path:
    """Convenience: encode an iterable of frames (size taken from the first one)."""
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError("no frames to write")
    height, width = first.shape[:2]
    with VideoWriter(path, fps, width, height, fmt, audio_from) as writer:
        writer.write(first)
        for image in iterator:
            writer.write(image)
    return Path(path)
