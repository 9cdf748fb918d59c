"""Baselines and ablations: model variants, landmarks in the data, recipes and the runner."""

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.checkpoint import Checkpoint, load_checkpoint, read_header, save_checkpoint
from model.config import ModelConfig
from model.inference import InferenceModel
from model.reenactor import Reenactor
from training import ablations
from training.augment import PoseAugmentConfig, PoseAugmenter
from training.clipstore import read_clip, scan, write_clip
from training.config import load_config, model_config, to_dict
from training.data import DataConfig, Sample, VideoDataset
from training.distributed import DistInfo
from training.finetune import FinetuneConfig, finetune
from training.loop import Trainer, driver_input, real_images
from training.losses import LossWeights
from training.synthetic import SynthConfig, generate, identity_for, poses_for, render

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "keypoints": {"pose_source": "keypoints"},
    "no-mask": {"predict_mask": False},
    "pose-1024": {"pose_dim": 1024},
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out=root, identities=3, clips=1, frames=5, size=64, seed=1))
    return root


def _driver(cfg: ModelConfig, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if cfg.pose_source == "keypoints":
        return torch.rand(n, cfg.num_keypoints, 2, generator=g)
    return torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=g)


# --- model variants ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_builds_forwards_and_round_trips(name: str, tmp_path: Path) -> None:
    cfg = ModelConfig.preset("tiny-64", **VARIANTS[name])
    torch.manual_seed(0)
    net = Reenactor(cfg)
    out = net(torch.rand(1, 2, 3, 64, 64), _driver(cfg, 1))
    assert out.rgb.shape == (1, 3, 64, 64) and out.mask.shape == (1, 1, 64, 64)
    state = net.state_dict()
    path = save_checkpoint(tmp_path / "v.safetensors", Checkpoint(cfg, reenactor=state))
    assert read_header(path)[0] == cfg  # the checkpoint records the variant
    loaded = InferenceModel.from_checkpoint(path)
    fresh = InferenceModel(net)
    assert loaded.config == cfg
    identity = loaded.embed_identity(torch.rand(1, 3, 64, 64))
    driver = _driver(cfg, 2, seed=1)
    if name == "keypoints":
        poses = loaded.encode_pose_keypoints(driver)
        torch.testing.assert_close(poses, fresh.encode_pose_keypoints(driver), rtol=0, atol=0)
        assert not any(k.startswith("pose_encoder.") for k in state)
        with pytest.raises(ValueError, match="encode_pose_keypoints"):
            loaded.encode_pose(torch.rand(1, 3, 64, 64))
    else:
        poses = loaded.encode_pose(driver)
        assert not any(k.startswith("keypoint_encoder.") for k in state)
        with pytest.raises(ValueError, match="use encode_pose"):
            loaded.encode_pose_keypoints(torch.rand(1, 68, 2))
    assert poses.shape == (2, cfg.pose_dim)
    rendered = loaded.render(identity, poses)
    torch.testing.assert_close(rendered.rgb, fresh.render(identity, poses).rgb, rtol=0, atol=0)
    if name == "no-mask":
        assert state["generator.head.parametrizations.weight.original"].shape[0] == 3
        assert torch.equal(rendered.mask, torch.ones_like(rendered.mask))


def test_official_architecture_is_unchanged_by_the_variant_options() -> None:
    """Default options add no tensors: the official state dict keys and shapes stay as they were."""
    default, explicit = (
        ModelConfig.preset("tiny-64"),
        ModelConfig.preset("tiny-64", pose_source="latent", predict_mask=True),
    )
    a, b = Reenactor(default).state_dict(), Reenactor(explicit).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert not any(k.startswith("keypoint_encoder") for k in a)
    with pytest.raises(ValueError, match="pose_source"):
        ModelConfig.preset("tiny-64", pose_source="mesh")


def test_keypoint_pose_depends_on_landmarks_not_on_the_driver_image() -> None:
    cfg = ModelConfig.preset("tiny-64", pose_source="keypoints")
    torch.manual_seed(0)
    net = Reenactor(cfg).eval()
    g = torch.Generator().manual_seed(0)
    keypoints = torch.rand(2, 68, 2, generator=g)
    batch = Sample(
        identity_images=torch.rand(2, 2, 3, 64, 64, generator=g),
        pose_image=torch.rand(2, 3, 64, 64, generator=g),
        target=torch.rand(2, 3, 64, 64, generator=g),
        mask=torch.rand(2, 1, 64, 64, generator=g),
        label=torch.zeros(2, dtype=torch.long),  # type: ignore[arg-type]
        keypoints=keypoints,
    )
    with torch.no_grad():
        ref = net(batch.identity_images, driver_input(batch, cfg)).rgb
        other_image = batch._replace(pose_image=torch.rand(2, 3, 64, 64, generator=g))
        same = net(batch.identity_images, driver_input(other_image, cfg)).rgb
        moved = batch._replace(keypoints=keypoints + 0.05)
        changed = net(batch.identity_images, driver_input(moved, cfg)).rgb
    assert torch.equal(ref, same)
    assert (ref - changed).abs().max() > 1e-4
    with pytest.raises(ValueError, match="68 driver landmarks"):
        driver_input(batch._replace(keypoints=torch.zeros(2, 0, 2)), cfg)
    latent = ModelConfig.preset("tiny-64")
    assert driver_input(batch, latent) is batch.pose_image
    assert torch.equal(real_images(batch, latent), batch.target * batch.mask)
    no_mask = ModelConfig.preset("tiny-64", predict_mask=False)
    assert real_images(batch, no_mask) is batch.target  # whole frames, background included


def test_inference_validates_keypoints() -> None:
    model = InferenceModel(Reenactor(ModelConfig.preset("tiny-64", pose_source="keypoints")))
    for bad in (torch.rand(2, 67, 2), torch.rand(68, 2), torch.rand(0, 68, 2)):
        with pytest.raises(ValueError, match="keypoints must be"):
            model.encode_pose_keypoints(bad)
    with pytest.raises(ValueError, match="finite"):
        model.encode_pose_keypoints(torch.full((1, 68, 2), float("nan")))


def test_trainer_rejects_dice_without_a_mask(synthetic: Path) -> None:
    cfg = load_config(None, [f"data.root={synthetic}", "losses.vgg19=0", "losses.vggface=0"])
    model_cfg = ModelConfig.preset("tiny-64", predict_mask=False)
    with pytest.raises(ValueError, match=r"losses\.dice=0"):
        Trainer(cfg, model_cfg, DistInfo(), torch.device("cpu"))


# --- data ---------------------------------------------------------------------------------------
def test_dataset_yields_the_driver_landmarks(synthetic: Path) -> None:
    off = DataConfig(root=str(synthetic), k=2, augment=PoseAugmentConfig(enabled=False))
    ds = VideoDataset(off, keypoints=True)
    clip = read_clip(scan(synthetic)[0].path)
    assert clip.landmarks is not None
    sample = ds[0]
    assert sample.keypoints is not None and sample.keypoints.shape == (68, 2)
    # The landmarks are those of the frame that is the target, in [0, 1] crop coordinates.
    target = (sample.target.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    driver = next(i for i in range(len(clip)) if np.array_equal(clip.image(i), target))
    np.testing.assert_allclose(sample.keypoints.numpy(), clip.landmarks[driver] / 64, rtol=1e-6)
    # Resolution-independent: a resized crop gets the same normalised landmarks.
    small = VideoDataset(dataclasses.replace(off, image_size=32), keypoints=True)[0]
    assert small.target.shape == (3, 32, 32)
    torch.testing.assert_close(small.keypoints, sample.keypoints)
    assert VideoDataset(off)[0].keypoints.shape == (0, 2)  # type: ignore[union-attr]


def test_dataset_skips_frames_without_landmarks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = np.stack([np.full((32, 32, 3), 40 + 80 * i, np.uint8) for i in range(3)])
    landmarks = rng.uniform(0, 32, (3, 68, 2)).astype(np.float32)
    landmarks[1] = np.nan  # no face found in frame 1
    common: dict[str, Any] = {
        "images": images,
        "masks": np.full((3, 32, 32), 255, np.uint8),
        "boxes": np.zeros((3, 4), np.float32),
        "timestamps": np.arange(3, dtype=np.float64),
    }
    write_clip(tmp_path / "with" / "a" / "v" / "00000.npz", landmarks=landmarks, **common)
    cfg = DataConfig(root=str(tmp_path / "with"), k=2, augment=PoseAugmentConfig(enabled=False))
    ds = VideoDataset(cfg, keypoints=True)
    for epoch in range(6):
        ds.set_epoch(epoch)
        sample = ds[0]
        assert sample.keypoints is not None and torch.isfinite(sample.keypoints).all()
        target = (sample.target.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        frame = int(np.abs(images.astype(int) - target).mean(axis=(1, 2, 3)).argmin())
        assert frame != 1
        np.testing.assert_allclose(sample.keypoints.numpy(), landmarks[frame] / 32, rtol=1e-6)
    write_clip(tmp_path / "bare" / "a" / "v" / "00000.npz", **common)  # without landmarks
    bare = VideoDataset(DataConfig(root=str(tmp_path / "bare"), k=2), keypoints=True)
    with pytest.raises(ValueError, match="no landmarks stored"):
        bare[0]
    plain = VideoDataset(DataConfig(root=str(tmp_path / "bare"), k=2))[0]  # fine for the others
    assert plain.keypoints is not None and plain.keypoints.shape == (0, 2)


def test_augmentation_shifts_landmarks_with_the_target() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[30:34, 20:24] = 255  # a bright square centred on (21.5, 31.5)
    points = np.array([[21.5, 31.5]], np.float32)
    cfg = PoseAugmentConfig(max_appearance_ops=0, scale_p=0, shift_p=1, shift_fraction=0.1)
    aug = PoseAugmenter(cfg)
    moved = 0
    for seed in range(5):
        _, target, _, shifted = aug.augment(
            image, image, image[..., 0], np.random.default_rng(seed), points
        )
        assert shifted is not None
        ys, xs = np.nonzero(target[..., 0].astype(float) > 0)
        weights = target[ys, xs, 0].astype(float)
        centre = np.array([np.average(xs, weights=weights), np.average(ys, weights=weights)])
        np.testing.assert_allclose(shifted[0], centre, atol=0.5)
        moved += not np.allclose(shifted, points)
        # The official call draws the same randomness: same images with or without landmarks.
        plain = aug(image, image, image[..., 0], np.random.default_rng(seed))
        np.testing.assert_array_equal(plain[1], target)
    assert moved == 5


# --- recipes and runner -----------------------------------------------------------------------
def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_recipes_differ_from_the_base_only_in_their_variant_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    variants = ablations.list_variants()
    assert [v.name for v in variants] == ["full", "keypoints", "no-augment", "no-mask", "pose-1024"]
    base_path = ablations.CONFIG_DIR / "base.yaml"
    base = _flat(to_dict(load_config(base_path)))
    demo = _flat(to_dict(load_config(ablations.CONFIG_DIR.parent / "demo-tiny.yaml")))
    assert {k for k in base if base[k] != demo[k]} == {"run_dir", "steps"}
    for v in variants:
        cfg = load_config(v.path)
        flat = _flat(to_dict(cfg))
        differs = {k for k in flat.keys() | base.keys() if flat.get(k) != base.get(k)}
        assert differs == {*v.changes, "run_dir"}, v.name
        assert v.description
        model_config(cfg)  # every variant builds a valid ModelConfig
    assert next(v for v in variants if v.name == "full").changes == {}
    assert ablations.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [v.name for v in variants]
    assert "model.pose_source" in listed[1] and "68 landmarks" in listed[1]


def test_step_seconds_reads_whole_logging_windows(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    rows = [(5, 2.0), (10, 4.0), (15, 2.5), (17, 25.0)]  # step 17 closes a partial window
    metrics.write_text(
        "".join(json.dumps({"step": s, "speed/it_per_s": v}) + "\n" for s, v in rows)
    )
    assert ablations.step_seconds(metrics, after=0, log_every=5) == pytest.approx(0.4)
    assert ablations.step_seconds(metrics, after=10, log_every=5) == pytest.approx(0.4)
    assert ablations.step_seconds(metrics, after=15, log_every=5) == pytest.approx(0.04)
    assert ablations.step_seconds(tmp_path / "none.jsonl", after=0, log_every=5) is None


@pytest.mark.slow
def test_runner_trains_releases_and_lists_every_variant(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two steps of every variant on one tiny store: checkpoints rebuild the right models."""
    out = tmp_path / "abl"
    overrides = [
        f"data.root={synthetic}",
        "data.k=2",
        "data.val_fraction=0",
        "batch_size=2",
        "log_every=1",
        "image_every=1000",
        "checkpoint_every=1000",
    ]
    assert ablations.main(["--steps", "2", "--out", str(out), *overrides]) == 0
    printed = capsys.readouterr().out
    manifest = ablations.read_manifest(out / "manifest.json")
    assert str(manifest.path) in printed
    assert manifest.shared["steps"] == 2 and manifest.shared["batch_size"] == 2
    assert list(manifest.variants) == ["full", "keypoints", "no-augment", "no-mask", "pose-1024"]
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["variants"]["keypoints"]["checkpoint"] == "keypoints.safetensors"  # relative
    expect = {**VARIANTS, "no-augment": {}}
    for name, run in manifest.variants.items():
        ckpt = load_checkpoint(run.checkpoint)
        assert ckpt.info["step"] == 2 and ckpt.info["ablation"]["variant"] == name
        assert ckpt.discriminator is None and ckpt.ema is None  # released: EMA weights only
        for field, value in expect[name].items():
            assert getattr(ckpt.config, field) == value, (name, field)
        assert run.s_per_step is not None and 0 < 2 * run.s_per_step < run.wall_s
        rows = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert all(np.isfinite(v) for r in rows for v in r.values())
        assert ("g/dice" in rows[0]) == (name != "no-mask")
        model = InferenceModel.from_checkpoint(run.checkpoint)
        identity = model.embed_identity(torch.rand(2, 3, 64, 64))
        if name == "keypoints":
            poses = model.encode_pose_keypoints(torch.rand(2, 68, 2))
        else:
            poses = model.encode_pose(torch.rand(2, 3, 64, 64))
        assert torch.isfinite(model.render(identity, poses).rgb).all()
    info = load_checkpoint(manifest.variants["no-augment"].training_checkpoint).info
    assert info["train_config"]["data"]["augment"]["enabled"] is False
    # Fine-tuning takes the mask-less model (whole frames) and refuses the keypoint one.
    person = identity_for(7, 0)
    frames = [render(person, pose, 64) for pose in poses_for(7, 0, 0, 2)]
    photos = np.stack([f.image for f in frames]), np.stack([f.mask for f in frames])
    tune = FinetuneConfig(steps=2, batch_size=2, losses=LossWeights(vgg19=0, vggface=0, l1=10))
    tuned = finetune(
        manifest.variants["no-mask"].training_checkpoint, *photos, tmp_path / "a.safetensors", tune
    )
    assert np.isfinite(tuned.final_l1)
    with pytest.raises(ValueError, match="keypoint-driven"):
        finetune(manifest.variants["keypoints"].checkpoint, *photos, tmp_path / "b.safetensors")
    # Another budget in the same folder would mix budgets in one manifest: refused up front.
    assert ablations.main(["--steps", "3", "--out", str(out), *overrides]) == 2
    assert "use another --out" in capsys.readouterr().err
    assert ablations.main(["--steps", "2", "--out", str(out), "--variants", "nope"]) == 2
    assert "unknown variants" in capsys.readouterr().err
