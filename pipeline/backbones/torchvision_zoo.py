"""torchvision's classification models, by their own names (`resnet18`, `vit_b_16`, `convnext_tiny`).

Weights: a torchvision weights name (`IMAGENET1K_V2`, default: the model's DEFAULT), a state_dict
file, or `random`. Preprocessing: the weights' own `transforms()`; for a file, those of the published
checkpoint it is (by sha256 prefix or file name), else the DEFAULT weights' (also for `random`).
Features: the input of the model's last Linear (its ImageNet classifier).
"""

from __future__ import annotations

import functools
import os

import torch
import torchvision
from torch import nn

from ..errors import TransferError
from . import weights as wfile
from .base import LayerHints, Loaded, Preprocessing

SOURCE = "torchvision"


@functools.lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def listing() -> list[tuple[str, str]]:
    return [(n, n) for n in names()]


def versions() -> dict:
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


def preset_for(name: str, weights: str | None):
    """The weights enum member `weights` names (DEFAULT for None or `random`; for a file, the
    published checkpoint it is, see match_file)."""
    return preset_and_rule(name, weights)[0]


def preset_and_rule(name: str, weights: str | None, digest: str | None = None) -> tuple:
    """(weights enum member, how it was chosen): the one `weights` names, or for a file the one
    it matches, else DEFAULT. digest: the file's sha256 when already known."""
    enum = torchvision.models.get_model_weights(name)
    default = f"{enum.__name__}.{enum.DEFAULT.name}"
    if weights is None:
        return enum.DEFAULT, f"weights enum {default} (the default weights)"
    if weights == "random":
        return enum.DEFAULT, f"default weights' {default} (random weights)"
    if wfile.looks_like_path(weights):
        return match_file(enum, weights, digest)
    try:
        preset = enum[weights.split(".")[-1]]
    except KeyError:
        names_ = ", ".join(w.name for w in enum)
        raise TransferError(
            f"unknown weights {weights!r} for {name}; expected one of {names_}, "
            "a path to a state_dict file, or 'random'"
        ) from None
    return preset, f"weights enum {enum.__name__}.{preset.name}"


def match_file(enum, path: str, digest: str | None = None) -> tuple:
    """The published checkpoint of `enum` that the file at `path` is: torchvision names its files
    <arch>-<first hex digits of their sha256>.pth (torch.hub.HASH_REGEX; what download_url_to_file
    checks), so first by that hash prefix, then by the file name itself; else DEFAULT."""
    unknown = enum.DEFAULT, f"default weights' {enum.__name__}.{enum.DEFAULT.name} (unknown file)"
    if not os.path.isfile(path):
        return unknown  # loading it then says that it does not exist
    digest = digest or wfile.sha256(path)
    for rule in ("sha256", "file name"):
        for preset in enum:
            published = os.path.basename(preset.url)
            if rule == "sha256":
                prefix = torch.hub.HASH_REGEX.search(published)
                hit = bool(prefix and prefix.group(1)) and digest.startswith(prefix.group(1))
            else:
                hit = published == os.path.basename(path)
            if hit:
                return preset, f"weights enum {enum.__name__}.{preset.name} matched by {rule}"
    return unknown


def preprocessing(preset) -> Preprocessing:
    """The resize, crop and normalization of `preset.transforms()` (torchvision's ImageClassification)."""
    t = preset.transforms()
    if not all(hasattr(t, a) for a in ("resize_size", "crop_size", "mean", "std", "interpolation")):
        raise TransferError(f"{preset} has a preprocessing transfer cannot reproduce exactly: {type(t).__name__}")
    return Preprocessing(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
    )


def architecture_args(name: str, preset, loading: bool) -> dict:
    """The constructor arguments torchvision's builder sets when given `preset`, so that a random
    or file-loaded model has the architecture the preset's weights and transforms() expect
    (torchvision/models: `_ovewrite_named_param` in vision_transformer.py, maxvit.py, inception.py,
    googlenet.py)."""
    args = {"num_classes": len(preset.meta["categories"])}
    if name.startswith("vit_"):
        args["image_size"] = preset.meta["min_size"][0]
    elif name == "maxvit_t":
        args["input_size"] = preset.meta["min_size"]
    elif name in ("inception_v3", "googlenet"):
        args.update(transform_input=True, aux_logits=True, init_weights=not loading)
    return args


def build(name: str, preset, loading: bool) -> nn.Module:
    """torchvision's model `name` with the architecture of `preset`, its own initial weights."""
    return torchvision.models.get_model(name, weights=None, **architecture_args(name, preset, loading))


def drop_auxiliary_heads(model: nn.Module) -> None:
    """What torchvision's builder does after loading inception_v3 / googlenet weights."""
    if hasattr(model, "AuxLogits"):
        model.aux_logits, model.AuxLogits = False, None
    if hasattr(model, "aux1"):
        model.aux_logits, model.aux1, model.aux2 = False, None, None


def hints(model: nn.Module) -> LayerHints:
    vit = isinstance(model, torchvision.models.VisionTransformer)
    swin = isinstance(model, torchvision.models.SwinTransformer)
    return LayerHints(class_token=vit, prefix_tokens=1 if vit else 0, nhwc=swin, tracer="torchvision")


def load(name: str, weights: str | None, seed: int) -> Loaded:
    is_file = weights is not None and weights != "random" and wfile.looks_like_path(weights)
    digest = wfile.sha256(weights) if is_file and os.path.isfile(weights) else None
    preset, rule = preset_and_rule(name, weights, digest)
    loading = weights != "random"
    torch.manual_seed(seed)  # makes `random` weights reproducible; harmless otherwise
    model = build(name, preset, loading)
    drop = tuple(p for p in (classifier_path(model),) if p)  # the Linear the penultimate cut removes
    dropped = {}
    if weights == "random":
        weights_id, sha, source = "random", "", "random"
    elif is_file:
        dropped = wfile.load_strict(model, wfile.load_state_file(weights), name, weights, drop)
        weights_id, sha, source = os.path.basename(weights), digest, os.path.abspath(weights)
    else:
        path = wfile.fetch_url(preset.url)
        wfile.load_strict(model, wfile.load_state_file(path), name, path)
        weights_id, sha = f"{type(preset).__name__}.{preset.name}", wfile.sha256(path)
        source = weights_id
    drop_auxiliary_heads(model)
    return Loaded(name=name, source=SOURCE, model_name=name, model=model.eval(), preprocessing=preprocessing(preset),
                  weights=weights_id, weights_sha256=sha, pretrained=loading, seed=seed, weights_source=source,
                  versions=versions(), hints=hints(model), preprocessing_rule=rule, dropped_head=dropped)


def classifier_path(model: nn.Module) -> str | None:
    """The model's ImageNet classifier: its last registered nn.Linear (`fc`, `classifier.6`,
    `heads.head`, `head`, ...); None when it has none (SqueezeNet ends in a 1x1 convolution)."""
    found = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = path
    return found


def penultimate(name: str, model: nn.Module) -> tuple[nn.Module, nn.Module, int, str] | None:
    """(network, dropped classifier, dim, description): the model with its last Linear replaced by
    Identity, so it returns that Linear's input. None when there is no Linear to drop."""
    path = classifier_path(model)
    if path is None:
        return None
    last = model.get_submodule(path)
    model.set_submodule(path, nn.Identity())
    if name.startswith("vgg"):
        return model, last, last.in_features, "classifier[:-1]: fc7 after ReLU"
    return model, last, last.in_features, f"penultimate: the input of {path}"


def default_layer(name: str) -> str | None:
    """The module whose pooled output is the penultimate feature, for models without a last Linear."""
    return "features" if name.startswith("squeezenet") else None


def skeleton(name: str, weights: str | None = None) -> tuple[nn.Module, int, LayerHints]:
    """The model with the architecture of `weights` (see preset_for), built with its own random
    initial weights (under layers.empty_weights: none at all)."""
    preset = preset_for(name, weights)
    model = build(name, preset, loading=False)
    drop_auxiliary_heads(model)
    return model.eval(), preprocessing(preset).crop, hints(model)


def weights_status(name: str) -> str:
    """'cached' when the DEFAULT weights file is on this machine, else 'download'."""
    preset = preset_for(name, None)
    return "cached" if os.path.exists(wfile.hub_checkpoint_path(preset.url)) else "download"


def imagenet_top1(name: str) -> float | None:
    """ImageNet-1k top-1 (%) of the model's DEFAULT weights, as torchvision's weights meta gives it."""
    metrics = preset_for(name, None).meta.get("_metrics", {}).get("ImageNet-1K", {})
    return metrics.get("acc@1")


def weight_names(name: str) -> list[str]:
    return [w.name for w in torchvision.models.get_model_weights(name)]
