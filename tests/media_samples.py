"""Real media for tests: encoded with PyAV on the fly (video + AAC audio), real photos."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from skimage import data

SAMPLE_RATE = 48_000


def astronaut() -> np.ndarray:
    """A real photo with exactly one face (512x512 RGB uint8)."""
    return data.astronaut()


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_clip(
    path: Path,
    frames: list[np.ndarray],
    fps: int = 25,
    audio: np.ndarray | None = None,
    video: bool = True,
) -> Path:
    """H.264 MP4 (plus mono AAC when `audio` is given); `video=False` makes an audio-only .m4a."""
    with av.open(str(path), "w") as out:
        if video:
            stream = out.add_stream("libx264", rate=fps)
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "yuv420p"
        if audio is not None:
            a_stream = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        if video:
            for i, image in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = i
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        if audio is not None:
            for start in range(0, len(audio), 1024):
                chunk = audio[None, start : start + 1024]
                a_frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                a_frame.sample_rate, a_frame.pts = SAMPLE_RATE, start
                out.mux(a_stream.encode(a_frame))
            out.mux(a_stream.encode())
    return path


def panning_frames(n: int, size: int = 256, noise: float = 0.0, seed: int = 0) -> list[np.ndarray]:
    """A camera slowly panning over the astronaut photo (a real face moving smoothly)."""
    rng = np.random.default_rng(seed)
    photo = astronaut()
    frames = []
    for i in range(n):
        x = 40 + round(60 * i / max(n - 1, 1))
        crop = photo[20 : 20 + size, x : x + size].astype(np.float32)
        crop += rng.normal(0, noise, crop.shape)
        frames.append(np.clip(crop, 0, 255).astype(np.uint8))
    return frames
