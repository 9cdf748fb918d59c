"""Loss terms: values, the fixed official bugs, and perceptual networks from local files."""

from pathlib import Path

import pytest
import torch

from training import losses as L


def test_dice_is_zero_for_a_perfect_mask() -> None:
    """The official 3-vs-1-channel bug gave -log 1.5 here; fixed, a perfect mask scores 0."""
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert L.dice(mask, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert L.dice(mask, 1 - mask).item() > 5
    with pytest.raises(ValueError, match="equal shapes"):
        L.dice(mask, mask.expand(-1, 3, -1, -1))


def test_hinge_losses() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert L.hinge_d(real, fake).item() == pytest.approx(0.25 + 0.5)
    assert L.hinge_g(fake).item() == pytest.approx(1.0)


def test_feature_matching_does_not_train_the_real_branch() -> None:
    fake = [torch.ones(1, 2, requires_grad=True)]
    real = [torch.zeros(1, 2, requires_grad=True)]
    L.feature_matching(fake, real).backward()
    assert fake[0].grad is not None and real[0].grad is None


def test_embedding_match_detaches_the_embedding() -> None:
    identity = torch.zeros(2, 4, requires_grad=True)
    rows = torch.ones(2, 4, requires_grad=True)
    loss = L.embedding_match(identity, rows)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert rows.grad is None


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Randomly initialised VGG state dicts stand in for the pretrained files (none here)."""
    root = tmp_path_factory.mktemp("vgg")
    torch.manual_seed(0)
    files = {"vgg19": root / "vgg19.pth", "vggface": root / "vgg_face.pth"}
    full = {f"features.{k}": v for k, v in L.vgg_features("vgg19").state_dict().items()}
    full["classifier.0.weight"] = torch.zeros(2, 2)  # classifier keys are ignored
    torch.save(full, files["vgg19"])
    torch.save(L.vgg_features("vgg16").state_dict(), files["vggface"])  # bare keys work too
    return files


@pytest.mark.parametrize("kind", ["vgg19", "vggface"])
def test_perceptual_loss(kind: str, vgg_files: dict[str, Path]) -> None:
    loss = L.PerceptualLoss(kind, vgg_files[kind])
    target = torch.rand(2, 3, 64, 64)
    output = torch.rand(2, 3, 64, 64, requires_grad=True)
    assert loss(target, target).item() == pytest.approx(0.0, abs=1e-6)
    value = loss(output, target)
    value.backward()
    assert value.item() > 0 and output.grad is not None
    assert not any(p.requires_grad for p in loss.parameters())
    assert len(loss._activations(torch.rand(1, 3, 64, 64))) == 13


def test_vgg19_uses_average_pooling(vgg_files: dict[str, Path]) -> None:
    loss = L.PerceptualLoss("vgg19", vgg_files["vgg19"])
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in loss.features)


def test_official_input_range_quirk_is_an_option(vgg_files: dict[str, Path]) -> None:
    fixed = L.PerceptualLoss("vgg19", vgg_files["vgg19"])
    quirk = L.PerceptualLoss("vgg19", vgg_files["vgg19"], official_input_range=True)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(quirk._prepare(x), fixed._prepare((x + 1) / 2))


def test_perceptual_weights_must_exist_and_fit(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        L.PerceptualLoss("vgg19", tmp_path / "missing.pth")
    partial = tmp_path / "partial.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, partial)
    with pytest.raises(ValueError, match="missing VGG feature weights"):
        L.PerceptualLoss("vgg19", partial)


def test_center_crop_resample() -> None:
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(L.center_crop_resample(x, 1.0), x, atol=1e-5, rtol=0)
    small = L.center_crop_resample(x, 0.5)
    assert small.shape == x.shape
