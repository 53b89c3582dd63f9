"""pipeline/backbones: the right layer of the right network from any source, weights loaded safely."""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline import read_cache
from pipeline.backbones import Embedder, load_backbone
from pipeline.errors import SettingError, TransferError
from tests.conftest import assert_one_line_error, make_folder, needs_hymenoptera, run_cli, write_image


@pytest.fixture(scope="module")
def vgg16_state_file(tmp_path_factory):
    """A VGG16 state_dict (seeded random init: real ImageNet weights cannot be downloaded here)."""
    torch.manual_seed(1234)
    model = torchvision.models.vgg16(weights=None)
    path = tmp_path_factory.mktemp("weights") / "vgg16-test.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_vgg16_features_equal_torchvision_reference(tmp_path, vgg16_state_file):
    images = tmp_path / "images"
    paths = [write_image(images / "a" / "x.jpg", 1, size=(320, 200)),
             write_image(images / "a" / "y.png", 2, size=(150, 260)),
             write_image(images / "b" / "z.jpg", 3, size=(224, 224))]
    out = tmp_path / "c.h5"
    result = run_cli("extract", images, "--out", out, "--weights", vgg16_state_file, "--batch-size", "2",
                     "--precision", "fp32")
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_file_whose_dropped_classifier_has_other_classes_loads_and_gives_the_same_features(tmp_path):
    """A VGG fine-tuned to 10 classes: its last layer is the one cut off, so only it may differ."""
    torch.manual_seed(5)
    tuned = torchvision.models.vgg11(weights=None).eval()
    tuned.classifier[6] = torch.nn.Linear(4096, 10)
    torch.save(tuned.state_dict(), tmp_path / "ten.pth")
    b = load_backbone("vgg11", str(tmp_path / "ten.pth"))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():  # the 1000-class vgg11 with the same other weights: classifier[:-1]
        expected = tuned.classifier[:-1](torch.flatten(tuned.avgpool(tuned.features(x)), 1))
        assert torch.equal(b.network(x), expected) and expected.shape == (2, 4096)
    assert b.provenance()["weights_dropped_head"] == {"classifier.6.weight": [10, 4096], "classifier.6.bias": [10]}
    assert torch.equal(b.last_layer.weight, tuned.classifier[6].weight)  # the file's own head, dropped


def test_weights_with_the_right_keys_but_wrong_shapes_elsewhere_are_refused(tmp_path):
    torch.manual_seed(5)
    state = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).state_dict()
    torch.save(state, tmp_path / "ten.pth")
    with pytest.raises(TransferError, match="--layer classifier.3 is the classifier the cut drops"):
        load_backbone("mobilenet_v3_small", str(tmp_path / "ten.pth"), layer="classifier.3")  # its 10 outputs
    state["classifier.0.weight"] = torch.zeros(1024, 500)  # a layer the features go through
    torch.save(state, tmp_path / "bad.pth")
    images = make_folder(tmp_path / "images", {"a": 1, "b": 1})
    result = run_cli("extract", images, "--out", tmp_path / "c.h5", "--backbone", "mobilenet_v3_small", "--weights",
                     tmp_path / "bad.pth")
    assert_one_line_error(result, "does not fit mobilenet_v3_small", "1 shape mismatches",
                          "classifier.0.weight: expected (1024, 576), found (1024, 500)")
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "good.pth")
    assert "weights_dropped_head" not in load_backbone("mobilenet_v3_small", str(tmp_path / "good.pth")).provenance()


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


@pytest.mark.slow
def test_torchvision_weights_found_in_the_hub_cache_are_used(tmp_path, monkeypatch, vgg16_state_file):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vgg16-397923af.pth").symlink_to(vgg16_state_file)
    b = load_backbone("vgg16", "IMAGENET1K_V1")
    assert b.pretrained and b.weights == "VGG16_Weights.IMAGENET1K_V1" and len(b.weights_sha256) == 64


def test_unknown_weights_name_lists_the_known_ones():
    with pytest.raises(TransferError, match="unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        load_backbone("vgg16", "IMAGENET9K")


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- any torchvision or timm model ------------------------------------------------------------

# One of each kind, small enough to build in a second: a torchvision CNN and ViT, a timm CNN and ViT.
ZOO = ["resnet18", "vit_b_32", "timm:test_efficientnet", "timm:test_vit"]


@functools.lru_cache(maxsize=None)
def reference_model(name: str) -> torch.nn.Module:
    """The model as its own library builds it, seeded like load_backbone(name, "random", seed=0)
    (built once per session: the tests only run it)."""
    import timm

    torch.manual_seed(0)
    if name.startswith("timm:"):
        return timm.create_model(name[5:], num_classes=0).eval()  # timm's penultimate convention
    return torchvision.models.get_model(name, weights=None).eval()


def reference_features(name: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The penultimate features, written out by hand from each library's forward."""
    if name == "resnet18":
        m = model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return torch.flatten(m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(x))))), 1)
    if name.startswith("vit_"):
        tokens = model._process_input(x)
        tokens = torch.cat([model.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return model.encoder(tokens)[:, 0]
    return model.forward_head(model.forward_features(x), pre_logits=True)


def source_transform(name: str, model: torch.nn.Module):
    """PIL image -> normalized tensor, by the source's own published preprocessing."""
    if name.startswith("timm:"):
        from timm.data import create_transform, resolve_data_config

        return create_transform(**resolve_data_config(model=model))
    return torchvision.models.get_model_weights(name).DEFAULT.transforms()


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Three small images of different shapes, in two class folders."""
    root = tmp_path_factory.mktemp("zoo") / "images"
    paths = [write_image(root / "a" / "wide.jpg", 11, size=(320, 200)),
             write_image(root / "a" / "tall.png", 12, size=(150, 261)),
             write_image(root / "b" / "square.png", 13, size=(97, 97))]
    return root, paths


@pytest.mark.parametrize("name", ZOO)
def test_features_equal_the_sources_reference_forward_and_preprocessing(tmp_path, odd_images, name):
    root, _ = odd_images
    out = tmp_path / "c.h5"
    result = run_cli("extract", root, "--out", out, "--backbone", name, "--weights", "random", "--batch-size", "2",
                     "--precision", "fp32")  # compared with the source's fp32 forward at 1e-4
    assert result.code == 0, result.err
    info = read_cache(out)
    features = info.features()
    assert info.paths == ["a/tall.png", "a/wide.jpg", "b/square.png"]
    model = reference_model(name)
    transform = source_transform(name, model)
    with torch.no_grad():
        expected = reference_features(name, model, torch.stack([transform(Image.open(root / p).convert("RGB"))
                                                                for p in info.paths])).numpy()
    assert features.shape == expected.shape and np.abs(expected).max() > 0.01
    assert np.abs(features - expected).max() <= 1e-4

    meta, prep = info.provenance, info.provenance["preprocessing"]
    if name.startswith("timm:"):
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        assert (prep["crop"], prep["interpolation"]) == (cfg["input_size"][-1], cfg["interpolation"])
        assert prep["resize"] == math.floor(cfg["input_size"][-1] / cfg["crop_pct"]) and prep["resize_mode"] == "shorter"
        assert tuple(prep["mean"]) == tuple(cfg["mean"]) and tuple(prep["std"]) == tuple(cfg["std"])
        assert meta["source"] == "timm" and meta["model"] == name[5:] + ".r160_in1k"
        assert meta["backbone"] == name + ".r160_in1k" and set(meta["versions"]) == {"torch", "timm"}
    else:
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        assert (prep["resize"], prep["crop"]) == (t.resize_size[0], t.crop_size[0])
        assert prep["interpolation"] == t.interpolation.value
        assert prep["mean"] == list(t.mean) and prep["std"] == list(t.std)
        assert meta["source"] == "torchvision" and meta["model"] == name == meta["backbone"]
        assert meta["versions"] == {"torch": torch.__version__, "torchvision": torchvision.__version__}
    assert meta["tta"] == "none" and meta["layer_module"] == "" and meta["dim"] == expected.shape[1]


def test_the_cache_identity_covers_source_model_versions_and_tta(tmp_path, tiny_folder):
    from pipeline import cache

    out = tmp_path / "c.h5"
    assert run_cli("extract", tiny_folder, "--out", out, "--backbone", "timm:test_efficientnet",
                   "--weights", "random").code == 0
    meta = read_cache(out).provenance
    for key, other in [("source", "torchvision"), ("model", "test_efficientnet.other"),
                       ("versions", {**meta["versions"], "timm": "0.0.1"}), ("tta", "flip")]:
        assert cache.identity({**meta, key: other}) != cache.identity(meta), key
    flipped = run_cli("extract", tiny_folder, "--out", out, "--backbone", "timm:test_efficientnet",
                      "--weights", "random", "--tta", "flip")
    assert_one_line_error(flipped, "holds a different extraction", "tta none vs flip")


def test_timm_weights_file_is_loaded_by_timm_with_its_penultimate_convention(tmp_path):
    import timm

    torch.manual_seed(7)
    trained = timm.create_model("test_efficientnet").eval()  # with its 1000-class head, as saved checkpoints are
    torch.save(trained.state_dict(), tmp_path / "eff.pth")
    b = load_backbone("timm:test_efficientnet", str(tmp_path / "eff.pth"))
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        expected = trained.forward_head(trained.forward_features(x), pre_logits=True)
        assert torch.equal(b.network(x), expected)
    assert b.pretrained and b.weights == "eff.pth" and len(b.weights_sha256) == 64
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv_stem.weight": Payload()}, f)
    with pytest.raises(TransferError, match="not a state_dict torch can load safely"):
        load_backbone("timm:test_efficientnet", str(tmp_path / "evil.pth"))


def _fake_hf_cache(root, repo: str, filename: str, state: dict):
    """The layout huggingface_hub leaves after a download: refs/main -> snapshots/<commit>/<file>."""
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(state, folder / "snapshots" / ("0" * 40) / filename)


def test_timm_pretrained_weights_come_from_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(3)
    trained = timm.create_model("test_vit").eval()
    _fake_hf_cache(tmp_path, "timm/test_vit.r160_in1k", "model.safetensors", trained.state_dict())
    b = load_backbone("timm:test_vit")
    x = torch.randn(1, 3, 160, 160)
    with torch.inference_mode():
        assert torch.equal(b.network(x), trained.forward_head(trained.forward_features(x), pre_logits=True))
    assert b.pretrained and b.weights == "timm/test_vit.r160_in1k/model.safetensors" and b.weights_source == "pretrained"
    from pipeline.backbones import list_backbones

    assert [e.weights for e in list_backbones("timm", "test_vit.r160")] == ["cached"]


def test_timm_weights_offline_name_the_file_to_fetch_and_the_flag(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 20 s of retries against no network
    images = make_folder(tmp_path / "images", {"a": 1, "b": 1})
    result = run_cli("extract", images, "--out", tmp_path / "c.h5", "--backbone", "timm:test_vit")
    assert_one_line_error(result, "timm:test_vit.r160_in1k",
                          "https://huggingface.co/timm/test_vit.r160_in1k/resolve/main/model.safetensors",
                          "--weights /path/to/model.safetensors")


def test_timm_unreachable_hub_fails_within_5_s_with_the_whole_reason(tmp_path, monkeypatch):
    """No network: the hub client alone retries for ~25 s and its message was cut mid-word. A port
    that refuses (the real client against 127.0.0.1:9), then a hub that never answers."""
    import time

    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    url = "https://huggingface.co/timm/test_vit.r160_in1k/resolve/main/model.safetensors"
    started = time.perf_counter()
    with pytest.raises(TransferError) as refused:
        load_backbone("timm:test_vit")
    assert time.perf_counter() - started < 5
    message = str(refused.value)
    assert "ConnectError: [Errno 111] Connection refused)" in message and message.endswith(f"{tmp_path})"), message
    assert url in message and "--weights /path/to/model.safetensors" in message

    def never_answers(*args, **kwargs):
        time.sleep(30)

    from pipeline.backbones import timm_zoo

    assert timm_zoo.HUB_TIMEOUT <= 3  # the bound below, shortened here to save test time
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", never_answers)
    monkeypatch.setattr(timm_zoo, "HUB_TIMEOUT", 0.5)
    started = time.perf_counter()
    with pytest.raises(TransferError, match="did not answer within 0.5 s"):
        load_backbone("timm:test_vit")
    assert time.perf_counter() - started < 2


def test_unknown_models_tags_and_layers_get_one_line_naming_what_exists(tmp_path):
    images = make_folder(tmp_path / "images", {"a": 1, "b": 1})

    def extract(*args):
        return run_cli("extract", images, "--out", tmp_path / "c.h5", "--weights", "random", *args)

    assert_one_line_error(extract("--backbone", "resnet19"), "unknown backbone 'resnet19'", "resnet18",
                          "transfer backbones")
    assert_one_line_error(extract("--backbone", "timm:test_vitt"), "unknown timm model 'test_vitt'", "timm:test_vit",
                          "transfer backbones --source timm")
    assert_one_line_error(extract("--backbone", "timm:test_vit.in22k"), "no pretrained tag 'in22k'", "r160_in1k")
    assert_one_line_error(extract("--backbone", "resnet18", "--layer", "layer5"), "unknown layer 'layer5'",
                          "layer4", "transfer backbones --layers resnet18")
    assert_one_line_error(extract("--backbone", "resnet18", "--layer", "layer1.0.relu"),
                          "runs 2 times in one forward pass")
    assert not (tmp_path / "c.h5").exists()


def test_backbones_lists_names_dims_costs_accuracy_and_weights_and_the_layers_of_one():
    result = run_cli("backbones", "--source", "torchvision", "--filter", "resnet1")
    assert result.code == 0, result.err
    assert result.out.splitlines()[0].split() == ["name", "dim", "params", "GFLOPs", "top-1", "weights"]
    rows = [line.split() for line in result.out.splitlines()[1:]]
    # params and GFLOPs without the ImageNet classifier: torchvision's 11.69M and 1.814 less fc's 0.51M and 0.0005
    assert ["resnet18", "512", "11.2M", "1.81", "69.76", "download"] in rows
    assert ["resnet101", "2048", "42.5M", "7.80", "81.89", "download"] in rows
    assert all("resnet1" in r[0] for r in rows)
    timm_rows = [line.split() for line in run_cli("backbones", "--source", "timm", "--filter", "test_vit").out.splitlines()]
    assert ["timm:test_vit.r160_in1k", "64", "0.3M", "0.04", "download"] in timm_rows  # timm publishes no top-1
    assert ["timm:test_vit4", "96", "0.9M", "0.11", "none"] in [r[:2] + r[2:] for r in timm_rows]
    best = [line.split()[0] for line in run_cli("backbones", "--filter", "resnet", "--sort", "top1",
                                                "--source", "torchvision").out.splitlines()[1:]]
    assert best[:3] == ["wide_resnet101_2", "resnet152", "resnet101"] and best.index("resnet18") == len(best) - 1
    layers = run_cli("backbones", "--layers", "resnet18")
    assert layers.code == 0, layers.err
    lines = [line.split("\t") for line in layers.out.splitlines()]
    assert ["layer3", "256", "mean over H, W"] in lines and ["layer4", "512", "mean over H, W"] in lines
    assert ["avgpool", "512", "mean over H, W", "default"] in lines and sum(len(line) == 4 for line in lines) == 1
    assert "'default' gives the features used without --layer" in layers.err
    assert "layer1.0.relu" not in [line[0] for line in lines]  # runs twice per forward: no single output
    assert_one_line_error(run_cli("backbones", "--layers", "resnet19"), "unknown backbone 'resnet19'")


@pytest.mark.parametrize("name", ["vgg16", "vit_b_16", "mobilenet_v3_small", "timm:test_vit", "efficientnet_lite0"])
def test_the_layer_marked_default_gives_the_default_features(name):
    from pipeline.backbones import list_layers

    marked = [i.path for i in list_layers(name) if i.default]
    assert len(marked) == 1, marked
    default, cut = load_backbone(name, "random"), load_backbone(name, "random", layer=marked[0])
    x = torch.randn(2, 3, default.preprocessing.crop, default.preprocessing.crop)
    with torch.inference_mode():
        assert torch.allclose(default.network(x), cut.network(x), atol=1e-5)


def test_listed_parameters_and_gflops_are_torchvisions_own_without_the_classifier():
    """Counted on the meta device; torchvision's weights meta gives the whole ImageNet model's.
    vit_b_16 also checks the weights a module uses without calling its child (attention's out_proj)."""
    from pipeline.backbones import list_backbones

    for name in ("resnet50", "vgg16", "vit_b_16", "convnext_tiny"):
        meta = torchvision.models.get_model_weights(name).DEFAULT.meta
        entry, = [e for e in list_backbones("torchvision", name) if e.name == name]
        classifier = entry.dim * len(meta["categories"])
        assert entry.params == meta["num_params"] - classifier - len(meta["categories"])
        assert abs(entry.gflops + classifier / 1e9 - meta["_ops"]) < 0.01, (name, entry.gflops, meta["_ops"])
        assert entry.top1 == meta["_metrics"]["ImageNet-1K"]["acc@1"]
    from pipeline.backbones import list_backbones as listing

    with pytest.raises(SettingError, match="unknown sort 'speed'"):
        listing("torchvision", "resnet", sort="speed")


def test_listed_dims_are_the_dims_the_backbones_give(monkeypatch, tmp_path):
    """The shipped table, and the meta-device computation used when the table does not fit the
    installed versions, both equal the width of the really built network."""
    from pipeline.backbones import list_backbones, registry

    names = ["resnet18", "squeezenet1_1", "timm:test_vit.r160_in1k", "timm:test_convnext.r160_in1k"]

    def listed():
        return {e.name: (e.dim, e.params, e.gflops) for n in names
                for e in list_backbones("timm" if n.startswith("timm:") else "torchvision", n) if e.name == n}

    from_table = listed()
    monkeypatch.setattr(registry, "DIMS_TABLE", tmp_path / "absent.json")
    computed = {n: d for n, d in listed().items()}
    built = {}
    for name in names:
        b = load_backbone(name, "random")
        with torch.inference_mode():
            built[name] = b.network(torch.zeros(1, 3, b.preprocessing.crop, b.preprocessing.crop)).shape[1]
    assert from_table == computed and {n: v[0] for n, v in computed.items()} == built and len(built) == 4


def test_timm_preprocessing_modes_model_pt_cannot_reproduce_are_refused():
    from pipeline.backbones.timm_zoo import preprocessing

    base = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
            "crop_pct": 0.9}
    assert preprocessing({**base, "crop_mode": "squash"}, "m").resize_mode == "squash"
    with pytest.raises(TransferError, match="crop_mode 'border'"):
        preprocessing({**base, "crop_mode": "border"}, "m")
    with pytest.raises(TransferError, match="'lanczos' interpolation"):
        preprocessing({**base, "interpolation": "lanczos"}, "m")
    with pytest.raises(TransferError, match="square RGB crops only"):
        preprocessing({**base, "input_size": (3, 256, 192)}, "m")
    # A real one, refused before its 412M parameters are built:
    with pytest.raises(TransferError, match="crop_mode 'border'"):
        load_backbone("timm:deepseek_vit_412m.deepseek_v4_1_flash", "random")


def test_squash_preprocessing_is_reproduced_by_model_pt_bit_for_bit():
    from pipeline.backbones import Preprocessing
    from pipeline.shipping.model import TransferModel
    from pipeline.shipping.formats import image_tensor

    prep = Preprocessing(resize=70, crop=64, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3,
                         resize_mode="squash")
    model = torch.jit.script(TransferModel(torch.nn.Flatten(), torch.zeros(2, 3 * 64 * 64), torch.zeros(2), False,
                                           prep, ["a", "b"], {}))
    for seed, size in [(1, (200, 90)), (2, (64, 300)), (3, (70, 70))]:
        image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        expected = prep.pil_transform()(image)
        assert expected.shape == (3, 64, 64)
        assert torch.equal(model.preprocess(image_tensor(image)), expected)


# --- model.pt for other backbones ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("args", [("--backbone", "timm:test_vit"),
                                  ("--backbone", "mobilenet_v3_small", "--layer", "features.9", "--tta", "flip")],
                         ids=["timm-vit", "mobilenet-layer-flip"])
def test_model_pt_and_predict_agree_with_sklearn_for_other_backbones(tmp_path, args):
    from pipeline import head as head_mod

    images = make_folder(tmp_path / "images", {"ants": 2, "bees": 2}, splits=("train", "val", "test"))
    cache_file = tmp_path / "c.h5"
    # fp32: predict is compared with scikit-learn on the cached features at 1e-5
    assert run_cli("extract", images, "--out", cache_file, "--weights", "random", "--precision", "fp32", *args).code == 0
    run = tmp_path / "run"
    result = run_cli("fit", cache_file, "--out", run, "--C", "0.1")
    assert result.code == 0, result.err
    parity = json.loads((run / "parity.json").read_text())
    assert parity["cached_features"]["max_abs_diff"] <= 1e-5
    assert parity["torchscript"]["end_to_end"]["images"] == 12 and parity["torchscript"]["end_to_end"]["max_abs_diff"] <= 1e-5

    info = read_cache(cache_file)
    expected = head_mod.sklearn_from_arrays(head_mod.load(str(run))).predict_proba(info.features(dtype=np.float64))
    predicted = run_cli("predict", run / "model.pt", images / "test", "--out", tmp_path / "p.json", "--top-k", "2")
    assert predicted.code == 0, predicted.err
    by_path = {str(images / p): i for i, p in enumerate(info.paths)}
    doc = json.loads((tmp_path / "p.json").read_text())
    assert len(doc) == 4 and info.n == 12
    for row in doc:
        p = {x["label"]: x["probability"] for x in row["predictions"]}
        want = expected[by_path[row["path"]]]
        assert max(abs(p[c] - want[k]) for k, c in enumerate(info.classes)) <= 1e-5


# --- which preprocessing a weights file gets --------------------------------------------------------

V1 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1  # resize 256; the DEFAULT (V2) resizes to 232


@pytest.fixture(scope="module")
def mobilenet_state(tmp_path_factory):
    """A mobilenet_v2 state_dict (random init) and two images."""
    root = tmp_path_factory.mktemp("mnv2")
    torch.manual_seed(9)
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), root / "state.pth")
    return root / "state.pth", make_folder(root / "images", {"a": 1, "b": 1})


def _extract_with(tmp_path, weights, *args):
    """The cache of mobilenet_v2 with `weights` (a file in the fixture's folder) on the fixture's two images."""
    out = tmp_path / f"c{len(list(tmp_path.glob('*.h5')))}.h5"
    result = run_cli("extract", weights.parent / "images", "--out", out,
                     "--backbone", "mobilenet_v2", "--weights", weights, "--precision", "fp32", "--batch-size", "2",
                     *args)
    assert result.code == 0, result.err
    return read_cache(out)


def test_a_file_named_like_a_published_checkpoint_gets_that_checkpoints_preprocessing(tmp_path, mobilenet_state):
    state, _ = mobilenet_state
    published = os.path.basename(V1.url)  # mobilenet_v2-b0353104.pth
    named = state.parent / published
    if not named.exists():
        os.link(state, named)
    meta = _extract_with(tmp_path, named).provenance
    assert meta["preprocessing"]["resize"] == 256 == V1.transforms().resize_size[0]
    assert meta["preprocessing_rule"] == "weights enum MobileNet_V2_Weights.IMAGENET1K_V1 matched by file name"
    unknown = _extract_with(tmp_path, state).provenance
    default = torchvision.models.MobileNet_V2_Weights.DEFAULT.transforms()
    assert unknown["preprocessing"]["resize"] == 232 == default.resize_size[0]
    assert unknown["preprocessing_rule"] == "default weights' MobileNet_V2_Weights.IMAGENET1K_V2 (unknown file)"


def test_the_sha256_prefix_of_a_published_file_name_wins_over_its_name(tmp_path, monkeypatch, mobilenet_state):
    """torchvision names its files <arch>-<sha256 prefix>.pth: a file whose hash matches one entry is
    that checkpoint, whatever it is called (here: called like the other entry's file)."""
    from torchvision.models._api import Weights, WeightsEnum

    from pipeline.backbones import weights as wfile

    state, _ = mobilenet_state
    digest = wfile.sha256(str(state))
    called = tmp_path / "mobilenet_v2-7ebf99e0.pth"  # the V2 file name
    called.write_bytes(state.read_bytes())
    V2 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2

    class MobileNet_V2_Weights(WeightsEnum):  # the real entries, with the test file's hash in V1's URL
        IMAGENET1K_V1 = Weights(url=f"https://example.org/mobilenet_v2-{digest[:8]}.pth", transforms=V1.transforms,
                                meta=V1.meta)
        IMAGENET1K_V2 = Weights(url=V2.url, transforms=V2.transforms, meta=V2.meta)
        DEFAULT = IMAGENET1K_V2

    real = torchvision.models.get_model_weights
    monkeypatch.setattr(torchvision.models, "get_model_weights",
                        lambda name: MobileNet_V2_Weights if name == "mobilenet_v2" else real(name))
    b = load_backbone("mobilenet_v2", str(called))
    assert b.preprocessing.resize == 256
    assert b.preprocessing_rule == "weights enum MobileNet_V2_Weights.IMAGENET1K_V1 matched by sha256"
    other = state.parent / "other" / called.name  # the same name, other bytes: by its name, V2
    other.parent.mkdir(exist_ok=True)
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in torch.load(state, weights_only=True).items()}
    torch.save(changed, other)
    b = load_backbone("mobilenet_v2", str(other))
    assert b.preprocessing.resize == 232
    assert b.preprocessing_rule == "weights enum MobileNet_V2_Weights.IMAGENET1K_V2 matched by file name"


def test_preprocessing_given_on_the_command_line_is_used_and_recorded(tmp_path, mobilenet_state):
    state, images = mobilenet_state
    spec = "resize=200,crop=160,interpolation=bicubic,mean=0.5/0.5/0.5,std=0.25/0.25/0.25"
    cached = _extract_with(tmp_path, state, "--preprocessing", spec)
    meta = cached.provenance
    prep = meta["preprocessing"]
    assert (prep["resize"], prep["crop"], prep["interpolation"]) == (200, 160, "bicubic")
    assert prep["mean"] == [0.5] * 3 and prep["std"] == [0.25] * 3
    assert meta["preprocessing_rule"].startswith(f"--preprocessing {spec} over default weights'")
    # The features are the network's on exactly that preprocessing.
    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(torch.load(state, weights_only=True))
    reference.classifier = reference.classifier[:-1]
    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize(200, interpolation=torchvision.transforms.InterpolationMode.BICUBIC),
        torchvision.transforms.CenterCrop(160), torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.5] * 3, [0.25] * 3)])
    with torch.no_grad():
        expected = reference.eval()(torch.stack([transform(Image.open(images / p).convert("RGB"))
                                                 for p in cached.paths])).numpy()
    np.testing.assert_allclose(cached.features(), expected, rtol=1e-4, atol=1e-5)
    partial = _extract_with(tmp_path, state, "--preprocessing", "resize=256").provenance  # only what is given changes
    assert (partial["preprocessing"]["resize"], partial["preprocessing"]["crop"]) == (256, 224)


@pytest.mark.parametrize("spec, fragment", [
    ("resize=256,crop", "expected KEY=VALUE pairs"),
    ("size=256", "unknown key 'size'"),
    ("resize=-3", "resize must be a positive whole number"),
    ("crop=22.5", "crop must be a positive whole number"),
    ("interpolation=nearest", "interpolation must be one of bilinear, bicubic"),
    ("mean=0.5/0.5", "mean must be three numbers"),
    ("std=0.2/0/0.2", "std must be three positive numbers"),
    ("resize=200,crop=224", "crop 224 is larger than resize 200"),
    ("resize=100000", "resize 100000 is over the limit of 2048 pixels"),  # was: killed for memory at ~24 GB
    ("resize=256,resize=300", "resize is given twice"),
    ("resize=1000,crop=900", "crop 900 is more than 2 times the backbone's own 224"),
])
def test_a_bad_preprocessing_gets_one_line(tmp_path, spec, fragment):
    images = make_folder(tmp_path / "images", {"a": 1, "b": 1})
    result = run_cli("extract", images, "--out", tmp_path / "c.h5", "--backbone", "mobilenet_v2", "--weights",
                     "random", "--preprocessing", spec)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "c.h5").exists()


def test_a_crop_the_network_cannot_take_is_one_line_before_any_file_is_written(tmp_path):
    """A ViT's position embeddings fix its input size: 64x64 crops fail in one line, no .partial left."""
    images = make_folder(tmp_path / "images", {"a": 1, "b": 1})
    result = run_cli("extract", images, "--out", tmp_path / "c.h5", "--backbone", "vit_b_16", "--weights", "random",
                     "--preprocessing", "resize=64,crop=64")
    assert_one_line_error(result, "vit_b_16 cannot take 64x64 crops")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
