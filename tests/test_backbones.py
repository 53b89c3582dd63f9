"""pipeline/backbones.py: the right layer of the right network, with weights loaded safely."""

from __future__ import annotations

import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline import backbones, read_cache
from pipeline.backbones import Embedder, load_backbone
from pipeline.errors import TransferError
from tests.conftest import needs_hymenoptera, run_cli, write_image


@pytest.fixture(scope="module")
def vgg16_state_file(tmp_path_factory):
    """A VGG16 state_dict (seeded random init: real ImageNet weights cannot be downloaded here)."""
    torch.manual_seed(1234)
    model = torchvision.models.vgg16(weights=None)
    path = tmp_path_factory.mktemp("weights") / "vgg16-test.pth"
    torch.save(model.state_dict(), path)
    return path


def test_vgg16_features_equal_torchvision_reference(tmp_path, vgg16_state_file):
    images = tmp_path / "images"
    paths = [write_image(images / "a" / "x.jpg", 1, size=(320, 200)),
             write_image(images / "a" / "y.png", 2, size=(150, 260)),
             write_image(images / "b" / "z.jpg", 3, size=(224, 224))]
    out = tmp_path / "c.h5"
    result = run_cli("extract", images, "--out", out, "--weights", vgg16_state_file, "--batch-size", "2")
    assert result.code == 0, result.err

    # The reference: torchvision's own vgg16, same state_dict, classifier[:-1], weights.transforms().
    reference = torchvision.models.vgg16(weights=None)
    reference.load_state_dict(torch.load(vgg16_state_file, weights_only=True))
    reference.classifier = reference.classifier[:-1]
    reference.eval()
    transform = torchvision.models.VGG16_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        expected = reference(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])).numpy()
    cached = read_cache(out)
    assert cached.paths == ["a/x.jpg", "a/y.png", "b/z.jpg"]
    features = cached.features()
    p = cached.provenance
    assert p["backbone"] == "vgg16" and p["layer"].startswith("classifier[:-1]")
    assert p["weights"] == "vgg16-test.pth" and len(p["weights_sha256"]) == 64
    assert features.shape == (3, 4096)
    assert np.abs(expected).max() > 0.01  # the comparison is not between two zero vectors
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_every_backbone_is_frozen_in_eval_mode_with_the_right_width():
    for name, dim in [("vgg11_bn", 4096), ("resnet50", 2048), ("efficientnet_lite0", 1280)]:
        b = load_backbone(name, "random")
        assert b.dim == dim and not b.pretrained
        assert not any(p.requires_grad for p in b.network.parameters())
        assert not b.network.training
        with torch.inference_mode():
            out = b.network(torch.zeros(2, 3, 224, 224))
        assert out.shape == (2, dim)


def test_preprocessing_is_the_backbones_published_one():
    t = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    p = load_backbone("resnet50", "random").preprocessing
    assert (p.resize, p.crop, p.interpolation) == (t.resize_size[0], t.crop_size[0], "bilinear")
    assert p.mean == tuple(t.mean) and p.std == tuple(t.std)
    lite = load_backbone("efficientnet_lite0", "random").preprocessing
    assert (lite.resize, lite.crop, lite.interpolation, lite.mean) == (256, 224, "bicubic", (0.5, 0.5, 0.5))


def test_random_weights_are_reproducible_from_their_seed():
    a = load_backbone("efficientnet_lite0", "random", seed=3).network.state_dict()
    b = load_backbone("efficientnet_lite0", "random", seed=3).network.state_dict()
    c = load_backbone("efficientnet_lite0", "random", seed=4).network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_stem.weight"], c["conv_stem.weight"])


def test_unknown_backbone_is_refused():
    with pytest.raises(TransferError, match="unknown backbone 'vgg17'.*vgg16"):
        load_backbone("vgg17")


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "lite.pth"
    torch.save(load_backbone("efficientnet_lite0", "random").network.state_dict(), path)
    with pytest.raises(TransferError, match="does not fit vgg11: .*missing keys.*unexpected keys"):
        load_backbone("vgg11", str(path))


def test_weights_with_the_right_keys_but_wrong_shapes_are_refused(tmp_path):
    state = torchvision.models.vgg11(weights=None, num_classes=10).state_dict()
    torch.save(state, tmp_path / "ten.pth")
    with pytest.raises(TransferError, match=r"shape mismatches \(e.g. classifier.6.weight"):
        load_backbone("vgg11", str(tmp_path / "ten.pth"))


class Payload:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_weights_are_loaded_without_unpickling_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"features.0.weight": Payload()}, f)
    with pytest.raises(TransferError, match="not a state_dict torch can load safely"):
        load_backbone("vgg11", str(path))


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(TransferError, match="weights file .*nope.pth does not exist"):
        load_backbone("vgg11", str(tmp_path / "nope.pth"))


def test_offline_without_cached_weights_names_the_file_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(TransferError) as info:
        load_backbone("vgg16")
    message = str(info.value)
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert str(tmp_path / "checkpoints" / "vgg16-397923af.pth") in message
    assert "--weights /path/to/vgg16-397923af.pth" in message


def test_torchvision_weights_found_in_the_hub_cache_are_used(tmp_path, monkeypatch, vgg16_state_file):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vgg16-397923af.pth").symlink_to(vgg16_state_file)
    b = load_backbone("vgg16", "IMAGENET1K_V1")
    assert b.pretrained and b.weights == "VGG16_Weights.IMAGENET1K_V1" and len(b.weights_sha256) == 64


def test_unknown_weights_name_lists_the_known_ones():
    with pytest.raises(TransferError, match="unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        load_backbone("vgg16", "IMAGENET9K")


def test_lite0_weights_load_from_either_key_layout(tmp_path):
    packaged = load_backbone("efficientnet_lite0")  # lukemelas-style keys, remapped
    assert packaged.pretrained
    state = {**packaged.network.state_dict(),
             **{f"classifier.{k}": v for k, v in packaged.last_layer.state_dict().items()}}
    torch.save(state, tmp_path / "timm-layout.pth")
    again = load_backbone("efficientnet_lite0", str(tmp_path / "timm-layout.pth"))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(packaged.network(x), again.network(x))


@needs_hymenoptera
def test_lite0_weights_are_really_imagenet_pretrained(hymenoptera_lite0):
    """The full network (cached pooled features -> the dropped ImageNet classifier) calls most
    real val photos 'ant' (310) or 'bee' (309)."""
    b = load_backbone("efficientnet_lite0")
    cached = read_cache(hymenoptera_lite0)
    val = np.flatnonzero(cached.split == "val")
    features = torch.from_numpy(cached.features(val))
    labels = cached.labels[val]
    with torch.inference_mode():
        predicted = b.last_layer(features).argmax(1).numpy()
    insect = np.isin(predicted, [309, 310]).mean()
    right = (predicted == np.where(labels == 0, 310, 309)).mean()  # classes: ants=0, bees=1
    assert insect >= 0.7, insect
    assert right >= 0.6, right


def test_bf16_embeddings_stay_close_to_fp32():
    b = load_backbone("efficientnet_lite0")
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    fp32 = Embedder(b, torch.device("cpu"), "fp32")(images)
    bf16 = Embedder(b, torch.device("cpu"), "bf16")(images)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).norm() / fp32.norm() < 0.05


def test_cuda_requested_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TransferError, match="no CUDA GPU"):
        backbones.resolve_device("cuda")
    assert backbones.resolve_device("auto").type == "cpu"
