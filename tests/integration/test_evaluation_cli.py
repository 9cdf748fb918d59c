"""`python -m evaluation` end to end on the demo checkpoint at a tiny size: the synthetic suite
(zero-shot and fine-tuned avatars, probes, retrieval, keypoints), several checkpoints side by
side, and the real-face suite on H.264 clips made from real photos."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from evaluation.__main__ import main
from evaluation.lpips import LPIPS
from model.checkpoint import Checkpoint, load_checkpoint, read_header, save_checkpoint
from model.discriminator import Discriminator
from model.reenactor import Reenactor
from tests.evaluation_media import write_people
from tests.media_samples import astronaut, encode_clip
from training.ablations import Manifest, VariantRun, write_manifest
from training.loop import LAST_CHECKPOINT

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
DEMO = ROOT / "checkpoints" / "demo-tiny-64.safetensors"
TINY = [
    "--identities", "3", "--frames-per-driver", "2", "--probe-identities", "20",
    "--pose-probe-identities", "4", "--retrieval-identities", "4", "--keypoint-steps", "20",
    "--threads", "1", "--seed", "3",
]  # fmt: skip
REAL_TINY = ["--finetune-frames", "4", "--holdout-frames", "4", "--cross-frames", "2"]


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evaluation", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _images(page: str) -> list[bytes]:
    chunks = page.split('src="data:image/png;base64,')[1:]
    return [base64.b64decode(c.split('"')[0]) for c in chunks]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different checkpoint of the demo's preset: the same network, untrained."""
    cfg, _ = read_header(DEMO)
    torch.manual_seed(0)
    state = Reenactor(cfg).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "untrained.safetensors"
    return save_checkpoint(path, Checkpoint(cfg, reenactor=state, info={"step": 0}))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("synthetic")
    result = _run("--checkpoint", DEMO, "--suite", "synthetic", *TINY, "--finetune-steps", "2",
                  "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads((out / "metrics.json").read_text()), (out / "report.html").read_text()


def test_synthetic_suite_scores_zero_shot_and_finetuned_avatars(
    synthetic: tuple[dict[str, Any], str],
) -> None:
    metrics, page = synthetic
    assert metrics["seed"] == 3 and len(metrics["checkpoint"]["sha256"]) == 64
    assert metrics["checkpoint"]["pose_source"] == "latent"
    cross, tuned = metrics["cross_person"], metrics["cross_person_finetuned"]
    assert cross["avatars"] == "zero-shot" and tuned["avatars"] == "fine-tuned"
    assert cross["frames"] == tuned["frames"] == 3 * 2 * 2
    assert tuned["finetune"]["steps"] == 2 and tuned["finetune"]["mode"] == "full"
    for part in (cross, tuned):
        assert set(part["l1"]) == {"mean", "std", "median"}
        assert 0 < part["l1"]["mean"] < 0.5 and 0 < part["ssim"]["mean"] <= 1
        assert 0 <= part["pose_error"]["detected_fraction"] <= 1
        assert part["lpips"] is None
    assert tuned["l1"] != cross["l1"]  # a fine-tuned generator renders differently
    leak = metrics["identity_leakage"]
    for part in ("output", "output_finetuned", "ground_truth", "driver_frames"):
        assert set(leak[part] or {"avatar_corr", "driver_corr"}) == {"avatar_corr", "driver_corr"}
    pose = metrics["pose_descriptor"]
    assert pose["identity_from_pose"]["chance"] == pytest.approx(1 / 4)
    assert pose["pose_params_from_pose"]["metric"] == "r2"
    assert any("LPIPS off" in note for note in metrics["notes"])

    retrieval = metrics["expression_retrieval"]
    assert retrieval["faces"] == 4 * 6 * 3 and len(retrieval["definition"]["classes"]) == 6
    top = retrieval["pose_descriptor"]
    assert 0 <= top["10"]["precision"] <= 1 and top["10"]["chance"] == pytest.approx(1 / 6)
    assert top["20"]["precision"] is None  # galleries hold 3 people x 6 classes = 18 faces
    keypoints = metrics["keypoint_regression"]
    for name in ("mean_shape", "identity_only", "pose_only", "pose_and_identity", "pixels"):
        assert keypoints[name]["error_pct"] > 0 and keypoints[name]["test_size"] == 2 * 10

    images = _images(page)
    # sample grid, zero-shot vs fine-tuned bars, probe plot, retrieval curve, keypoint bars
    assert len(images) == 5 and all(i.startswith(b"\x89PNG") for i in images)
    assert "Zero-shot vs fine-tuned avatars" in page


def test_checkpoints_side_by_side_reproduce_the_single_run(
    synthetic: tuple[dict[str, Any], str], untrained: Path, tmp_path: Path
) -> None:
    single, _ = synthetic
    torch.manual_seed(0)
    lpips = LPIPS("alex")  # an untrained network: the plumbing, not a perceptual judgement
    for k in range(5):
        getattr(lpips, f"lin{k}").model[1].weight.data.uniform_(0, 1)
    torch.save(lpips.state_dict(), tmp_path / "lpips.pth")
    result = _run("--checkpoint", DEMO, "--compare", f"untrained={untrained}", "--suite",
                  "synthetic", *TINY, "--lpips-weights", tmp_path / "lpips.pth",
                  "--out", tmp_path / "out")  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics["models"]) == ["demo-tiny-64", "untrained"]
    table = metrics["comparison"]
    labels = [c["label"] for c in table["columns"]]
    assert {"L1", "SSIM", "pose error", "retrieval top-10", "keypoint error %"} <= set(labels)
    assert "fine-tuned L1" not in labels  # not measured: no column
    assert all(r["LPIPS"] > 0 for r in table["rows"])
    assert [r["model"] for r in table["rows"]] == ["demo-tiny-64", "untrained"]
    assert table["rows"][0]["L1"] != table["rows"][1]["L1"]
    assert set(table["best"].values()) <= {"demo-tiny-64", "untrained"}

    # same seed, same numbers: the demo's scores equal the single run's
    demo = metrics["models"]["demo-tiny-64"]
    for key in (
        "identity_leakage",
        "pose_descriptor",
        "expression_retrieval",
        "keypoint_regression",
    ):
        if key == "identity_leakage":
            assert demo[key]["output"] == single[key]["output"]
        else:
            assert demo[key] == single[key]
    assert demo["cross_person"]["l1"] == single["cross_person"]["l1"]
    assert demo["cross_person"]["pose_error"] == single["cross_person"]["pose_error"]

    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("class='best'") >= len(labels)
    assert "<h2>untrained</h2>" in page and "Identity leakage vs pose" in page


def _manifest(root: Path, untrained: Path) -> Path:
    """What `python -m training.ablations` writes: the demo as the paper model, and the
    untrained network whose training checkpoint carries a discriminator for fine-tuning."""
    cfg, _ = read_header(untrained)
    run_dir = root / "untrained"
    state = load_checkpoint(untrained).reenactor
    disc = Discriminator(cfg).state_dict()
    save_checkpoint(
        run_dir / LAST_CHECKPOINT, Checkpoint(cfg, state, ema=state, discriminator=disc)
    )

    def run(name: str, checkpoint: Path) -> VariantRun:
        return VariantRun(name, checkpoint, root / name, name, {}, {}, 0, 0.0, None)

    shared = {"steps": 0, "batch_size": 1, "seed": 0, "preset": cfg.name, "data_root": "none"}
    variants = {"full": run("full", DEMO), "untrained": run("untrained", untrained)}
    return write_manifest(Manifest(root / "manifest.json", shared, variants))


def test_real_suite_on_clips_of_real_people(untrained: Path, tmp_path: Path) -> None:
    data = write_people(tmp_path / "vox", frames=8)
    short = data / "id_short" / "video1" / "00001.mp4"  # too few frames for 4 + 4: skipped
    short.parent.mkdir(parents=True)
    encode_clip(short, [astronaut()[:256, 100:356]] * 3)
    manifest = _manifest(tmp_path / "ablations", untrained)
    out = tmp_path / "out"
    result = _run("--manifest", manifest, "--suite", "real", "--data", data, *REAL_TINY,
                  "--finetune-steps", "1", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    described = metrics["data"]
    assert [p["identity"] for p in described["identities"]] == ["id_astronaut", "id_hopper"]
    assert all(p["photos"] == 4 and p["holdout"] == 4 for p in described["identities"])
    assert described["skipped"] == [{"identity": "id_short", "reason": "no video with 8 frames"}]
    assert described["identity_model"] == "dlib_resnet_v1"
    # the real recognition model: the same person's other frames are nearer than the other's
    ref = metrics["reference_identity_errors"]
    assert ref["same_person_holdout"]["mean"] < ref["other_people_holdout"]["mean"]

    assert list(metrics["models"]) == ["full", "untrained"]  # the manifest's order
    tuned_from = metrics["models"]["untrained"]["checkpoint"]["finetune_base"]
    assert tuned_from.endswith(f"untrained/{LAST_CHECKPOINT}")  # the one with a discriminator
    for name in ("full", "untrained"):
        model = metrics["models"][name]
        for kind in ("zero_shot", "finetuned"):
            self_, cross = model[kind]["self_reenactment"], model[kind]["cross_driving"]
            assert self_["frames"] == 2 * 4 and cross["frames"] == 2 * 1 * 2
            assert 0 < self_["l1"]["mean"] < 1 and 0 < self_["ssim"]["mean"] <= 1
            assert 0 <= cross["identity_error"]["mean"] <= 2
            assert 0 <= self_["pose_error"]["detected_fraction"] <= 1
        assert model["finetune"] == {"steps": 1, "mode": "full", "photos_max": 32}
    labels = [c["label"] for c in metrics["comparison"]["columns"]]
    assert "Ir (cross identity error)" in labels and "fine-tuned Pr (self pose error)" in labels

    page = (out / "report.html").read_text()
    # Ir/Pr plot, then per model: self-reenactment and cross-driving grids
    assert len(_images(page)) == 1 + 2 * 2
    assert "Identity vs pose" in page


def test_real_suite_in_process_one_model_and_bad_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--checkpoint", str(DEMO), "--suite", "real", "--out", str(tmp_path)])
    assert exited.value.code == 2 and "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--checkpoint", str(tmp_path / "nope.safetensors"), "--suite", "real",
              "--data", str(tmp_path), "--out", str(tmp_path)])  # fmt: skip
    assert exited.value.code == 2 and "checkpoint not found" in capsys.readouterr().err

    def real(data: Path, out: Path) -> int:
        threads = torch.get_num_threads()
        try:
            return main(["--checkpoint", str(DEMO), "--suite", "real", "--data", str(data),
                         "--finetune-frames", "2", "--holdout-frames", "2", "--cross-frames", "1",
                         "--no-pose-error", "--out", str(out)])  # fmt: skip
        finally:
            torch.set_num_threads(threads)

    one = tmp_path / "one"  # a single identity: nobody to cross-drive with
    clip = one / "id_a" / "v" / "00001.mp4"
    clip.parent.mkdir(parents=True)
    encode_clip(clip, [astronaut()[:256, 100:356]] * 4)
    assert real(one, tmp_path / "bad") == 2
    assert "cross-driving needs 2 identities" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "metrics.json").exists()

    assert real(write_people(tmp_path / "two", frames=4), tmp_path / "good") == 0
    metrics = json.loads((tmp_path / "good" / "metrics.json").read_text())
    assert metrics["suite"] == "real" and metrics["finetuned"] is None
    assert metrics["zero_shot"]["self_reenactment"]["frames"] == 2 * 2
    assert metrics["zero_shot"]["cross_driving"]["frames"] == 2 * 1
    assert metrics["zero_shot"]["self_reenactment"]["pose_error"] is None
    assert any("fine-tuned avatars off" in note for note in metrics["notes"])
    page = (tmp_path / "good" / "report.html").read_text()
    assert len(_images(page)) == 3  # self-reenactment and cross-driving grids, Ir/Pr plot
