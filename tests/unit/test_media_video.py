"""PyAV video I/O on real encoded files: decode, audio passthrough, alpha, masks, errors."""

from pathlib import Path

import av
import numpy as np
import pytest

from media.errors import NoVideoStreamError, TruncatedMediaError, UnreadableMediaError
from media.video import (
    MASK_LOSSLESS,
    MASK_MP4,
    WEBM_VP9_ALPHA,
    VideoFormat,
    probe,
    read_frames,
    write_video,
)
from tests.media_samples import encode_clip, tone

FPS, N = 25, 50


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = [np.full((96, 128, 3), 4 * i, np.uint8) for i in range(N)]
    path = tmp_path_factory.mktemp("video") / "driver.mp4"
    return encode_clip(path, frames, FPS, audio=tone(N / FPS))


def audio_packets(path: Path) -> list[tuple[bytes, int | None]]:
    with av.open(str(path)) as c:
        return [(bytes(p), p.pts) for p in c.demux(audio=0) if p.size]


def audio_samples(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(f.samples for f in c.decode(audio=0))


def test_probe_and_streaming_decode(clip: Path) -> None:
    info = probe(clip)
    assert (info.width, info.height, info.fps, info.num_frames) == (128, 96, 25.0, N)
    assert info.has_audio and info.audio_codec == "aac"
    assert info.duration == pytest.approx(N / FPS, abs=0.05)
    frames = list(read_frames(clip))
    assert [f.index for f in frames] == list(range(N))
    assert [f.time for f in frames] == pytest.approx([i / FPS for i in range(N)])
    assert frames[10].image.shape == (96, 128, 3)
    assert abs(float(frames[10].image.mean()) - 40) < 3
    assert len(list(read_frames(clip, max_frames=7))) == 7


def test_mp4_keeps_the_driver_audio_untouched(clip: Path, tmp_path: Path) -> None:
    out = write_video(
        tmp_path / "out.mp4", (f.image for f in read_frames(clip)), FPS, audio_from=clip
    )
    info = probe(out)
    assert info.num_frames == N and info.audio_codec == "aac"
    assert audio_packets(out) == audio_packets(clip)  # remuxed, not re-encoded
    assert audio_samples(out) == audio_samples(clip)
    assert audio_samples(clip) == pytest.approx(N / FPS * 48_000, abs=1024)
    assert info.duration == pytest.approx(probe(clip).duration, abs=0.03)


def test_webm_alpha_round_trip_with_reencoded_audio(clip: Path, tmp_path: Path) -> None:
    rgba = []
    for f in read_frames(clip, max_frames=10):
        alpha = np.zeros(f.image.shape[:2], np.uint8)
        alpha[:, 64:] = 255
        rgba.append(np.dstack([f.image, alpha]))
    out = write_video(tmp_path / "matte.webm", rgba, FPS, WEBM_VP9_ALPHA, audio_from=clip)
    info = probe(out)
    assert info.codec == "vp9" and info.audio_codec == "opus" and info.num_frames == 10
    decoded = [f.image for f in read_frames(out, alpha=True)]
    assert len(decoded) == 10 and decoded[0].shape == (96, 128, 4)
    assert np.abs(decoded[3][..., 3].astype(int) - rgba[3][..., 3]).max() <= 16


def test_mask_videos(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    masks = [(rng.random((64, 80)) > 0.5).astype(np.uint8) * 255 for _ in range(5)]
    exact = write_video(tmp_path / "mask.mkv", masks, FPS, MASK_LOSSLESS)
    back = [f.image[..., 0] for f in read_frames(exact)]
    assert all(np.array_equal(a, b) for a, b in zip(back, masks, strict=True))
    blocks = [np.kron(m[::8, ::8] // 255, np.ones((8, 8), np.uint8)) * 255 for m in masks]
    playable = write_video(tmp_path / "mask.mp4", blocks, FPS, MASK_MP4)
    back = [(f.image[..., 0] > 127) * 255 for f in read_frames(playable)]
    assert all(np.array_equal(a, b) for a, b in zip(back, blocks, strict=True))


def test_odd_sizes_are_padded_to_even(tmp_path: Path) -> None:
    out = write_video(tmp_path / "odd.mp4", [np.zeros((95, 127, 3), np.uint8)] * 3, 30)
    assert (probe(out).width, probe(out).height) == (128, 96)


def test_failed_encode_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "broken.mp4"
    frames = [np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)]
    with pytest.raises(ValueError, match="frame must be"):
        write_video(target, frames, 25)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_inputs_raise_typed_errors(clip: Path, tmp_path: Path) -> None:
    with pytest.raises(UnreadableMediaError, match="not found"):
        probe(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UnreadableMediaError):
        probe(junk)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableMediaError):
        list(read_frames(empty))
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 100)
    with pytest.raises(UnreadableMediaError, match="not a video"):
        probe(text)
    half = tmp_path / "half.mp4"  # moov atom at the end is lost
    half.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with pytest.raises((UnreadableMediaError, TruncatedMediaError)):
        list(read_frames(half))


def test_audio_only_file(tmp_path: Path) -> None:
    path = encode_clip(tmp_path / "voice.m4a", [], audio=tone(0.5), video=False)
    with pytest.raises(NoVideoStreamError, match="audio-only"):
        probe(path)


def test_corrupt_middle_is_reported_as_truncated(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(30)]
    h264_mkv = VideoFormat("libx264", "yuv420p", "rgb24", "matroska")
    path = write_video(tmp_path / "full.mkv", frames, 25, h264_mkv)
    data = path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(TruncatedMediaError, match="header says"):
        list(read_frames(cut))
