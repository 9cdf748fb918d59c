"""Evaluation parts on cases whose answer is known: retrieval, keypoint regression, LPIPS
loading, expression classes, face recognition on real photos, the comparison table."""

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper

from evaluation import expressions
from evaluation.compare import comparison
from evaluation.lpips import LPIPS, SLICES, LPIPSError, load_lpips
from evaluation.models import ScoredModel, encode_drivers
from evaluation.probes import (
    KeypointResult,
    keypoint_mlp_probe,
    landmark_errors,
    mean_shape_keypoints,
    retrieval_precision,
)
from evaluation.recognition import ArcFace, DlibFaces, RecognitionError, identity_errors
from evaluation.synthetic import SyntheticSuiteConfig, run_synthetic
from model.config import ModelConfig
from model.inference import InferenceModel
from model.reenactor import Reenactor
from tests.evaluation_media import face_crops


@pytest.fixture(autouse=True)
def one_thread():
    """The suite runs torch on one thread (reproducible; 2 cores shared with other work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- retrieval ---------------------------------------------------------------------------------


def _layout(people: int, classes: int, views: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grid = np.stack(
        np.meshgrid(np.arange(people), np.arange(views), np.arange(classes), indexing="ij"), -1
    ).reshape(-1, 3)
    return grid[:, 2], grid[:, 0], grid[:, 1]  # labels, people, views


def test_retrieval_of_a_descriptor_that_is_the_class_is_perfect() -> None:
    labels, people, views = _layout(people=30, classes=6, views=2)
    rng = np.random.default_rng(0)
    x = np.eye(6)[labels] + 0.01 * rng.normal(size=(len(labels), 6))
    results = retrieval_precision(x, labels, people, views, ks=(10, 20, 50, 100))
    # gallery: 29 other people x 6 classes; 29 of them share the query's class
    assert [r.precision for r in results] == pytest.approx([1.0, 1.0, 29 / 50, 29 / 100])
    assert all(r.chance == pytest.approx(1 / 6) and r.queries == len(labels) for r in results)


def test_retrieval_of_an_identity_descriptor_is_at_chance() -> None:
    labels, people, views = _layout(people=40, classes=6, views=1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 16))[people]  # the same vector for all of a person's faces
    (top10,) = retrieval_precision(x, labels, people, views, ks=(10,))
    # the own person is outside the gallery, so who-you-are cannot find the class
    assert abs(top10.precision - 1 / 6) < 0.03


def test_retrieval_reports_none_where_the_gallery_is_too_small() -> None:
    labels, people, views = _layout(people=3, classes=4, views=1)
    x = np.random.default_rng(2).normal(size=(len(labels), 5))
    top10, top20 = retrieval_precision(x, labels, people, views, ks=(10, 20))
    assert top10.precision is None and top20.precision is None  # 8 items in each gallery
    (top5,) = retrieval_precision(x, labels, people, views, ks=(5,))
    assert top5.precision is not None


# --- keypoint regression ----------------------------------------------------------------------


def _faces(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = rng.uniform(0.3, 0.7, (68, 2))
    points[36], points[45] = (0.3, 0.4), (0.7, 0.4)  # inter-ocular distance 0.4
    return points + rng.normal(0, 0.01, (n, 68, 2))


def test_landmark_error_of_a_shift_is_exact() -> None:
    truth = _faces(3, 0)
    truth[:, 45] = truth[:, 36] + [0.4, 0.0]
    shifted = truth + np.array([0.03, 0.04])  # every point moves 0.05: 12.5 % of 0.4
    assert landmark_errors(shifted, truth) == pytest.approx([0.125] * 3)
    assert mean_shape_keypoints(truth[:1].repeat(4, 0), truth[:1]).error_pct == 0.0


def test_keypoint_mlp_reads_landmarks_that_are_in_the_features() -> None:
    rng = np.random.default_rng(3)
    y = _faces(600, 1)
    offsets = rng.normal(0, 0.05, (600, 2))
    y = y + offsets[:, None, :]  # each face moved as a whole
    informative = np.concatenate([offsets, rng.normal(size=(600, 6))], 1)
    noise = rng.normal(size=(600, 8))
    baseline = mean_shape_keypoints(y[:400], y[400:])

    def probe(x: np.ndarray) -> KeypointResult:  # a narrower MLP than the paper's keeps it quick
        return keypoint_mlp_probe(x[:400], y[:400], x[400:], y[400:], seed=0, steps=200, hidden=128)

    fitted, blind = probe(informative), probe(noise)
    assert fitted.error_pct < 0.5 * baseline.error_pct
    assert blind.error_pct > 0.9 * baseline.error_pct  # random features: no better than the mean
    assert probe(informative) == fitted  # reproducible for a seed


# --- LPIPS ------------------------------------------------------------------------------------


def _random_lpips(seed: int) -> LPIPS:
    torch.manual_seed(seed)
    net = LPIPS("alex")
    for k in range(5):
        getattr(net, f"lin{k}").model[1].weight.data.uniform_(0, 1)
    return net


def test_lpips_loads_a_full_state_dict_and_scores_identical_images_zero(tmp_path: Path) -> None:
    torch.save(_random_lpips(0).state_dict(), tmp_path / "full.pth")
    net = load_lpips(tmp_path / "full.pth")
    a = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert net(a, a).tolist() == [0.0, 0.0]
    assert (net(a, a.flip(-1)) > 0).all()


def test_lpips_heads_load_with_a_torchvision_backbone(tmp_path: Path) -> None:
    heads = {k: v for k, v in _random_lpips(1).state_dict().items() if k.startswith("lin")}
    torch.save(heads, tmp_path / "alex.pth")  # the lpips package's release format
    with pytest.raises(LPIPSError, match="--lpips-backbone"):
        load_lpips(tmp_path / "alex.pth")
    torch.manual_seed(2)
    alexnet = torchvision.models.alexnet(weights=None)
    # torchvision's key names; the classifier (240 MB) is left out but for one tensor to ignore
    backbone = {f"features.{k}": v for k, v in alexnet.features.state_dict().items()}
    torch.save({**backbone, "classifier.6.bias": alexnet.classifier[6].bias}, tmp_path / "tv.pth")
    net = load_lpips(tmp_path / "alex.pth", tmp_path / "tv.pth")
    state = net.state_dict()
    for k, (start, stop) in enumerate(SLICES["alex"], 1):
        for i in range(start, stop):
            if isinstance(alexnet.features[i], torch.nn.Conv2d):
                assert torch.equal(state[f"net.slice{k}.{i}.weight"], alexnet.features[i].weight)
    a, b = torch.rand(2, 1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert net(a, a).item() == 0.0 and net(a, b).item() > 0
    with pytest.raises(LPIPSError, match="not found"):
        load_lpips(tmp_path / "missing.pth")


# --- expression classes -----------------------------------------------------------------------


def _inside(value: float, box: tuple[float, float]) -> bool:
    return box[0] <= value <= box[1]


def test_expression_classes_are_disjoint_and_views_keep_their_yaw() -> None:
    rng = np.random.default_rng(0)
    for c, cls in enumerate(expressions.EXPRESSION_CLASSES):
        for view, yaw in enumerate(expressions.VIEW_YAWS):
            pose = expressions.expression_pose(cls, view, rng)
            assert abs(pose.yaw - yaw) <= expressions.VIEW_JITTER["yaw"]
            members = [
                other.name
                for other in expressions.EXPRESSION_CLASSES
                if _inside(pose.mouth_open, other.mouth_open)
                and _inside(pose.smile, other.smile)
                and _inside(pose.blink_left, other.blink)
                and _inside(pose.blink_right, other.blink)
                and _inside(pose.brow_raise, other.brow_raise)
            ]
            assert members == [expressions.EXPRESSION_CLASSES[c].name]


# --- face recognition on real photos ----------------------------------------------------------


@pytest.fixture(scope="module")
def dlib_faces() -> DlibFaces:
    return DlibFaces()


def test_dlib_descriptor_tells_two_real_people_apart(dlib_faces: DlibFaces) -> None:
    crops = face_crops(64)  # astronaut (2 poses), Grace Hopper
    d = dlib_faces.embed([crops["astronaut"], crops["astronaut_moved"], crops["hopper"]])
    assert np.linalg.norm(d, axis=1) == pytest.approx([1, 1, 1])
    errors = identity_errors(d, d[0])
    assert errors[0] == pytest.approx(0, abs=1e-9)
    assert errors[1] < errors[2]  # the same person moved is closer than another person


def test_dlib_landmarks_land_on_the_face(dlib_faces: DlibFaces) -> None:
    crop = face_crops(64)["astronaut"]
    points = dlib_faces.landmarks(crop)
    assert points.shape == (68, 2)
    assert ((points > 0) & (points < 64)).all()
    assert points[36:48, 1].mean() < points[48:68, 1].mean()  # eyes above the mouth


def _tiny_arcface(path: Path) -> Path:
    """A real ONNX graph with ArcFace's interface (N, 3, 112, 112) -> (N, 32)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(8, 3, 16, 16)).astype(np.float32), "w")
    proj = numpy_helper.from_array(rng.normal(size=(8 * 49, 32)).astype(np.float32), "p")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input.1", "w"], ["c"], strides=[16, 16]),
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("MatMul", ["f", "p"], ["embedding"]),
        ],
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 32])],
        [weight, proj],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_arcface_runs_an_onnx_model_on_aligned_crops(tmp_path: Path, dlib_faces: DlibFaces) -> None:
    arcface = ArcFace(_tiny_arcface(tmp_path / "arcface.onnx"), dlib_faces)
    crops = face_crops(64)
    aligned = arcface.align(crops["astronaut"])
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    d = arcface.embed([crops["astronaut"], crops["astronaut"], crops["hopper"]])
    assert d.shape == (3, 32)
    assert identity_errors(d, d[0])[:2] == pytest.approx([0, 0], abs=1e-9)
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(RecognitionError, match="cannot load"):
        ArcFace(tmp_path / "broken.onnx", dlib_faces)
    with pytest.raises(RecognitionError, match="not found"):
        ArcFace(tmp_path / "missing.onnx", dlib_faces)


# --- model variants -------------------------------------------------------------------------
HAS_VARIANTS = {"pose_source", "predict_mask"} <= {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.mark.skipif(not HAS_VARIANTS, reason="model/config.py has no baseline/ablation fields")
def test_synthetic_suite_scores_a_keypoint_driven_model_without_a_mask() -> None:
    cfg = ModelConfig.preset("tiny-64", pose_source="keypoints", predict_mask=False)
    torch.manual_seed(0)
    model = InferenceModel(Reenactor(cfg))  # the FSTH+ baseline's interface, untrained
    points = np.random.default_rng(0).uniform(16, 48, (2, 68, 2))
    frames = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    a, b = encode_drivers(model, frames, points), encode_drivers(model, frames + 200, points)
    assert a.shape == (2, cfg.pose_dim) and torch.equal(a, b)  # landmarks drive, not pixels
    with pytest.raises(ValueError, match="landmarks"):
        encode_drivers(model, frames, None)
    suite = SyntheticSuiteConfig(
        identities=2, frames_per_driver=1, leakage_probe_identities=10, pose_probe_identities=4,
        pose_probe_frames=4, retrieval_identities=2, keypoint_steps=5, finetune_steps=3,
        pose_error=False,
    )  # fmt: skip
    result = run_synthetic(ScoredModel("fsth-plus", Path("unused"), model), suite)
    assert result.metrics["cross_person"]["frames"] == 2
    assert result.metrics["cross_person_finetuned"] is None
    assert any("fine-tuned avatars skipped" in note for note in result.metrics["notes"])
    # without a mask the output is scored on the ground truth's foreground: black elsewhere
    corners = [s.output[:2, :2] for s in result.samples]
    assert all((c == 0).all() for c in corners)


# --- comparison table -------------------------------------------------------------------------


def test_comparison_marks_the_best_and_drops_unmeasured_columns() -> None:
    def model(l1: float, ssim: float) -> dict:
        return {
            "cross_person": {"l1": {"mean": l1}, "ssim": {"mean": ssim}, "lpips": None},
            "cross_person_finetuned": None,
        }

    table = comparison("synthetic", {"a": model(0.1, 0.5), "b": model(0.2, 0.7)})
    assert [c["label"] for c in table["columns"]] == ["L1", "SSIM"]
    assert table["best"] == {"L1": "a", "SSIM": "b"}
    assert table["rows"] == [
        {"model": "a", "L1": 0.1, "SSIM": 0.5},
        {"model": "b", "L1": 0.2, "SSIM": 0.7},
    ]
