"""What every backbone source produces: the preprocessing, the loaded network, the cut network.

A source (torchvision, timm, builtin) turns a model name and weights into a `Loaded` model: the
full network with its weights and its published preprocessing. The registry then cuts it (the
penultimate layer, or `--layer`), wraps it for test-time augmentation and freezes it: a `Backbone`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..errors import TransferError
from ..resize import pillow_pass_order

INTERPOLATIONS = ("bilinear", "bicubic")  # what resize.pil_resize reproduces bit for bit
RESIZE_MODES = ("shorter", "squash")
TTA_MODES = ("none", "flip")


@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre-crop `crop` x `crop`, normalize by mean/std.

    resize_mode "shorter": the short side to `resize`, aspect kept (torchvision's
    `weights.transforms()`, timm's crop_mode "center"); "squash": both sides to `resize` (timm's
    crop_mode "squash"). pass_order: the order of Pillow's two resampling passes, which changed
    across Pillow releases (see resize.py); recorded so that model.pt reproduces the resize exactly."""

    resize: int
    crop: int
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pass_order: str = field(default_factory=pillow_pass_order)
    resize_mode: str = "shorter"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise TransferError(f"interpolation {self.interpolation!r} cannot be reproduced exactly in model.pt; "
                                f"supported: {', '.join(INTERPOLATIONS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise TransferError(f"resize mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["resize"]), int(d["crop"]), str(d["interpolation"]), tuple(d["mean"]), tuple(d["std"]),
                   d.get("pass_order") or pillow_pass_order(), d.get("resize_mode") or "shorter")

    def pil_transform(self) -> T.Compose:
        """RGB PIL image -> (3, crop, crop) uint8: the resize and crop of the source's own transform."""
        size = self.resize if self.resize_mode == "shorter" else [self.resize, self.resize]
        return T.Compose([
            T.Resize(size, interpolation=InterpolationMode(self.interpolation), antialias=True),
            T.CenterCrop(self.crop),
            T.PILToTensor(),
        ])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 -> float32, in the order `weights.transforms()` uses (so results match bit for bit)."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return images.float().div_(255).sub_(mean).div_(std)


@dataclass(frozen=True)
class LayerHints:
    """How the model lays out and pools its activations, for `--layer` (see layers.pooling_for).

    class_token: the model's head reads token 0 (torchvision ViT; timm global_pool "token").
    prefix_tokens: tokens before the patch tokens (class, distillation, register tokens).
    nhwc: 4-d activations may be (N, H, W, C) (torchvision Swin; timm output_fmt NHWC).
    tracer: whose torch.fx tracer cuts the model ("torchvision" or "timm", which knows timm's
    untraceable leaf modules)."""

    class_token: bool = False
    prefix_tokens: int = 0
    nhwc: bool = False
    tracer: str = "torchvision"


@dataclass
class Loaded:
    """A source's full network (eval mode, weights loaded) and everything recorded about it."""

    name: str  # canonical backbone name: "resnet18", "timm:test_vit.r160_in1k", "efficientnet_lite0"
    source: str  # "torchvision" | "timm" | "builtin"
    model_name: str  # the exact name in its library: "resnet18", "test_vit.r160_in1k", "tf_efficientnet_lite0"
    model: nn.Module
    preprocessing: Preprocessing
    weights: str
    weights_sha256: str
    pretrained: bool
    seed: int
    weights_source: str  # what to pass as `weights` to load this backbone again
    versions: dict
    hints: LayerHints


@dataclass
class Backbone:
    """A frozen network cut at its penultimate layer (or `layer_module`), maybe flip-averaged.

    network: (N, 3, crop, crop) normalized float -> (N, dim). last_layer: the dropped ImageNet
    classifier when the cut removed one (None for timm, whose num_classes=0 never builds it), kept
    so tests can check the weights are really pretrained.
    """

    name: str
    network: nn.Module
    last_layer: nn.Module | None
    dim: int
    layer: str  # the module path given with --layer, or a description of the default cut
    preprocessing: Preprocessing
    weights: str
    weights_sha256: str
    pretrained: bool
    seed: int
    weights_source: str
    source: str = "torchvision"
    model_name: str = ""
    layer_module: str = ""  # the --layer module path; "" for the default penultimate layer
    pooling: str = ""  # how the layer's activations become one vector
    tta: str = "none"
    versions: dict = field(default_factory=dict)

    def provenance(self) -> dict:
        return {
            "backbone": self.name,
            "source": self.source,
            "model": self.model_name,
            "versions": dict(self.versions),
            "weights": self.weights,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "pretrained": self.pretrained,
            "seed": self.seed,
            "layer": self.layer,
            "layer_module": self.layer_module,
            "pooling": self.pooling,
            "tta": self.tta,
            "dim": self.dim,
            "preprocessing": self.preprocessing.to_dict(),
        }


class FlipAveraged(nn.Module):
    """(N, 3, S, S) -> (N, D): the mean of the network on the crop and on its horizontal mirror,
    in one batch of 2N (the VGG paper's multi-view features; naver/deep-image-retrieval#23)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        both = self.network(torch.cat([x, x.flip(3)], dim=0))
        return (both[:n] + both[n:]) * 0.5


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
