"""pipeline/backbones/layers.py: `--layer` is the named module's pooled output, from a network cut
after it; `--tta flip` is the mean of the image's and its mirror image's embedding."""

from __future__ import annotations

import pytest
import torch

from pipeline.backbones import Embedder, list_layers, load_backbone
from pipeline.backbones.base import LayerHints
from pipeline.backbones.layers import POOL_CLASS_TOKEN, POOL_NCHW, POOL_NHWC, POOL_TOKEN_MEAN, pooling_for
from tests.test_backbones import reference_features, reference_model

# (backbone, layer, how its activation is pooled, a module after it that the cut must drop)
CUTS = [
    ("resnet18", "layer3", lambda y: y.mean((2, 3)), "layer4"),
    ("vit_b_32", "encoder.layers.encoder_layer_5", lambda y: y[:, 0], "encoder.layers.encoder_layer_6"),
    ("timm:test_efficientnet", "blocks.2", lambda y: y.mean((2, 3)), "conv_head"),
    ("timm:test_vit", "blocks.1", lambda y: y[:, 0], "blocks.2"),  # global_pool="token": the class token
    ("timm:test_vit2", "blocks.0", lambda y: y[:, 1:].mean(1), "blocks.1"),  # global_pool="avg", 1 class token
]


def crops(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("name,layer,pool,later", CUTS, ids=[c[0] for c in CUTS])
def test_layer_features_equal_a_pooled_forward_hook_and_later_layers_are_cut_off(name, layer, pool, later):
    b = load_backbone(name, "random", layer=layer)
    images = crops(b.preprocessing.crop)
    got = Embedder(b, torch.device("cpu"), "fp32")(images)

    model = reference_model(name)
    seen = []
    hook = model.get_submodule(layer).register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(b.preprocessing.normalize(images))
    hook.remove()
    expected = pool(seen[0])
    assert got.shape == expected.shape == (2, b.dim) and expected.abs().max() > 0.01
    assert (got - expected).abs().max() <= 1e-4
    kept = {path for path, _ in b.network.named_modules()}
    assert not any(path.endswith(later) or f"{later}." in path for path in kept), later
    assert b.layer == b.layer_module == layer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "timm:test_vit"])
def test_flip_tta_is_the_mean_of_two_reference_forwards(name):
    b = load_backbone(name, "random", tta="flip")
    images = crops(b.preprocessing.crop, n=3, seed=1)
    got = Embedder(b, torch.device("cpu"), "fp32")(images)
    model = reference_model(name)
    x = b.preprocessing.normalize(images)
    with torch.no_grad():
        plain, mirrored = reference_features(name, model, x), reference_features(name, model, x.flip(3))
    assert (plain - mirrored).abs().max() > 0.01  # the mirror image really is another view
    assert (got - (plain + mirrored) / 2).abs().max() <= 1e-4
    assert b.provenance()["tta"] == "flip"


def test_layer_and_flip_together_and_the_network_stays_scriptable():
    b = load_backbone("timm:test_efficientnet", "random", layer="blocks.3", tta="flip")
    x = torch.randn(2, 3, 160, 160)
    scripted = torch.jit.script(b.network)
    with torch.no_grad():
        assert torch.allclose(scripted(x), b.network(x), atol=1e-6)
        assert torch.allclose(b.network(x.flip(3)), b.network(x), atol=1e-5)  # flip-averaged: mirror invariant


def test_listed_layers_give_the_dims_their_cut_networks_give():
    infos = {i.path: i for i in list_layers("timm:test_convnext") if not i.problem}
    assert {"stem", "stages.0", "stages.3", "norm_pre"} <= set(infos)
    for path in ("stages.1", "head.global_pool"):
        b = load_backbone("timm:test_convnext", "random", layer=path)
        with torch.no_grad():
            assert b.network(torch.zeros(1, 3, 160, 160)).shape == (1, infos[path].dim) == (1, b.dim)


def test_pooling_rule_by_shape():
    plain, nhwc, token = LayerHints(), LayerHints(nhwc=True), LayerHints(class_token=True, prefix_tokens=1)
    assert pooling_for((1, 256, 14, 14), plain) == (POOL_NCHW, 256)
    assert pooling_for((1, 14, 14, 256), plain) == (POOL_NHWC, 256)
    assert pooling_for((1, 7, 7, 7), nhwc) == (POOL_NHWC, 7) and pooling_for((1, 7, 7, 7), plain) == (POOL_NCHW, 7)
    assert pooling_for((1, 197, 768), token) == (POOL_CLASS_TOKEN, 768)
    assert pooling_for((1, 196, 768), plain) == (POOL_TOKEN_MEAN, 768)
    assert pooling_for((1, 3, 4, 5), plain) is None and pooling_for((1, 2, 3, 4, 5), plain) is None


def test_meta_device_probe_costs_no_weights():
    """Listing the layers of a 632M-parameter network allocates none of them."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    infos = list_layers("vit_h_14")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    usable = {i.path: i.dim for i in infos if not i.problem}
    assert usable["encoder.layers.encoder_layer_31"] == 1280 and grown_mb < 500, grown_mb
