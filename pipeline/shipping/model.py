"""The model every format ships: uint8 images of any size -> the extraction's resize, crop and
normalization -> frozen backbone -> Linear -> softmax (TransferModel), rebuilt from a head's
provenance, and the metadata each model file carries.

Precision: fp32, or bf16 (the backbone's weights and activations in bfloat16; the resize,
normalization, head and softmax stay exact / fp32). TorchScript cannot script `torch.autocast` on
a backbone (measured with torch 2.14: "Input type (c10::BFloat16) and bias type (float) should be
the same"), so the backbone is converted instead, which scripts, exports and halves the file.
"""

# No `from __future__ import annotations` here: TorchScript reads TransferModel's annotations as types.
import copy
import json
import os
from typing import List

import numpy as np
import torch
from torch import nn

from .. import head as head_mod
from ..backbones import Backbone, Preprocessing, load_arguments, load_backbone, recorded_preprocessing
from ..backbones.weights import looks_like_path
from ..errors import InputFileError, TransferError
from ..files import display_path
from ..resize import VERTICAL_FIRST_IF_TALLER_CUT, resize_crop
from .formats import MODEL_FORMAT


PRECISIONS = ("fp32", "bf16")


class Head(nn.Linear):
    """The new last layer: (N, D) float32 features -> (N, K) probabilities (L2 normalization when the head
    was fitted on normalized features, then the Linear, then softmax). A module of its own, so that each
    format's head can be run alone on cached features, cut from the file's own graph (`parts`)."""

    l2_normalize: bool

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, l2_normalize: bool):
        super().__init__(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)
        self.l2_normalize = l2_normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.l2_normalize:
            features = features / torch.linalg.vector_norm(features, 2.0, dim=[1], keepdim=True).clamp_min(1e-12)
        return torch.softmax(torch.nn.functional.linear(features, self.weight, self.bias), dim=1)


class TransferModel(nn.Module):
    """uint8 RGB images (N, 3, H, W), any H and W -> class probabilities (N, K) in `classes` order.

    Also `preprocess(image)` for one (3, H, W) image -> (3, S, S) uint8 crop, and
    `classify(crops)` for (N, 3, S, S) uint8 crops: so images of different sizes can be batched;
    `probabilities(features)` for (N, D) backbone features (the head alone).
    precision "bf16": the backbone runs on a bfloat16 copy of itself (`backbone` is left as it is).
    """

    classes: List[str]
    metadata: str
    bf16: bool

    def __init__(self, backbone: nn.Module, weight: torch.Tensor, bias: torch.Tensor, l2_normalize: bool,
                 prep: Preprocessing, classes: list[str], metadata: dict, precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise TransferError(f"model precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.bf16 = precision == "bf16"
        self.backbone = copy.deepcopy(backbone).to(torch.bfloat16) if self.bf16 else backbone
        self.head = Head(weight, bias, l2_normalize)
        self.l2_normalize = l2_normalize
        self.resize_to = prep.resize
        self.squash = prep.resize_mode == "squash"
        self.crop = prep.crop
        self.mode = prep.interpolation
        self.vertical_first_rule = prep.pass_order == VERTICAL_FIRST_IF_TALLER_CUT
        self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).view(1, 3, 1, 1))
        # TorchScript strings are UTF-8: a class folder whose name is not keeps its exact bytes in the
        # metadata (JSON escapes) and is shown here as `display_path` shows it (\xNN).
        self.classes = [display_path(c) for c in classes]
        self.metadata = json.dumps(metadata)
        for p in self.parameters():
            p.requires_grad_(False)

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, S, S) uint8: short side to `resize_to` (Pillow's resize,
        bit for bit), then the centre crop, with torchvision's size and offset rules."""
        return resize_crop(x, self.resize_to, self.crop, self.mode == "bicubic", self.vertical_first_rule, self.squash)

    @torch.jit.export
    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, S, S) uint8."""
        return self._resize_crop(image.unsqueeze(0))[0]

    @torch.jit.export
    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 -> (N, D) backbone features, as cached at extraction."""
        x = (crops.float() / 255.0 - self.mean) / self.std
        x = x.contiguous(memory_format=torch.channels_last)
        if self.bf16:
            return self.backbone(x.to(torch.bfloat16)).float()
        return self.backbone(x)

    @torch.jit.export
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) float32 features -> (N, K) probabilities: the head alone."""
        return self.head(features)

    @torch.jit.export
    def classify(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 -> (N, K) probabilities."""
        return self.probabilities(self.embed(crops))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 RGB -> (N, K) probabilities."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("expected a uint8 tensor of RGB images shaped (N, 3, H, W)")
        return self.classify(self._resize_crop(images))


def linear_state(head: head_mod.LinearHead) -> dict:
    """The head as a torch.nn.Linear(D, K) state_dict (float32)."""
    return {"weight": torch.from_numpy(head.weight).float(), "bias": torch.from_numpy(head.bias).float()}


def torch_proba(head: head_mod.LinearHead, features: np.ndarray) -> np.ndarray:
    """Probabilities from the float32 torch Linear, as model.pt computes them after the backbone."""
    linear = nn.Linear(head.dim, len(head.classes))
    linear.load_state_dict(linear_state(head))
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    with torch.inference_mode():
        if head.l2_normalize:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.softmax(linear(x), dim=1).double().numpy()


def rebuild_backbone(provenance: dict, weights: str | None = None) -> Backbone:
    """The extraction's backbone, from the cache's provenance; the weights must be the same file.
    weights: the weights file where it is now, if it moved (checked against the recorded sha256)."""
    arguments = load_arguments(provenance)  # the same weights, layer and flip averaging
    if weights is not None:
        arguments["weights"] = os.fspath(weights)
    elif looks_like_path(arguments["weights"] or "") and not os.path.isfile(arguments["weights"]):
        raise InputFileError(f"the weights file {arguments['weights']} the features were extracted with is gone; "
                             "`transfer export RUN_DIR --weights FILE` (export(..., weights=FILE)) takes it from "
                             f"where it is now (sha256 {provenance.get('weights_sha256')})")
    source = arguments["weights"]
    backbone = load_backbone(**arguments)
    if backbone.weights_sha256 != (provenance.get("weights_sha256") or ""):
        raise TransferError(f"the weights at {source} are not the ones the features were extracted with "
                            f"(sha256 {backbone.weights_sha256[:12]} vs {str(provenance.get('weights_sha256'))[:12]})")
    if backbone.dim != int(provenance.get("dim") or 0):
        raise TransferError(f"{arguments['name']} now gives {backbone.dim}-d features, the cache holds "
                            f"{provenance.get('dim')}-d ones (layer {provenance.get('layer')!r})")
    return backbone


def build_model(head: head_mod.LinearHead, weights: str | None = None, precision: str = "fp32") -> TransferModel:
    """The model every format ships, in eval mode: the extraction's backbone and preprocessing + this
    head. weights: see rebuild_backbone."""
    return build(head, weights, precision)[0]


def build(head: head_mod.LinearHead, weights: str | None = None,
          precision: str = "fp32") -> tuple[TransferModel, Backbone]:
    """(the model, the extraction's backbone in fp32: parity's reference)."""
    provenance = head.meta["provenance"]
    backbone = rebuild_backbone(provenance, weights)
    backbone.network.eval()
    prep = recorded_preprocessing(provenance)
    model = TransferModel(backbone.network, torch.from_numpy(head.weight).float(), torch.from_numpy(head.bias).float(),
                          head.l2_normalize, prep, head.classes, model_metadata(head, precision), precision)
    return model.eval(), backbone


def model_metadata(head: head_mod.LinearHead, precision: str = "fp32") -> dict:
    p = head.meta["provenance"]
    return {
        "format": MODEL_FORMAT,
        "classes": head.classes,
        "backbone": p["backbone"],
        "weights": p["weights"],
        "weights_sha256": p["weights_sha256"],
        "layer": p["layer"],
        "tta": p.get("tta", "none"),
        "preprocessing": p["preprocessing"],
        "extraction_precision": p["precision"],
        "precision": precision,  # the backbone's, inside this model
        "l2_normalize": head.l2_normalize,
        "C": head.meta.get("C"),
        "input": "uint8 RGB tensor (N, 3, H, W), any size",
        "output": "probabilities (N, K) in the order of classes",
    }
