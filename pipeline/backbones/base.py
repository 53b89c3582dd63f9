"""What every backbone source provides and produces: the `Source` protocol, the preprocessing, the
loaded network, the cut network.

A source (torchvision, timm, builtin) turns a model name and weights into a `Loaded` model: the
full network with its weights and its published preprocessing. The registry then cuts it (the
penultimate layer, or `--layer`), wraps it for test-time augmentation and freezes it: a `Backbone`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..errors import SettingError, TransferError
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


PREPROCESSING_KEYS = ("resize", "crop", "interpolation", "mean", "std", "resize_mode")
# Bounds of --preprocessing, checked before anything is built. Every image is resized to `resize`
# (a 2048-pixel short side is already 12 MB per decoded photo, held by each decoding worker) and
# the network runs on `crop` x `crop`: its memory and time grow with the square of the crop, so a
# crop may be at most CROP_FACTOR times the backbone's own (4x the memory of a normal run).
MAX_SIDE = 2048
CROP_FACTOR = 2


def recorded_preprocessing(provenance: dict) -> Preprocessing:
    """The preprocessing a cache (or a head, a model) recorded at extraction. Not today's defaults:
    Pillow's resize order, for one, may have changed since."""
    return Preprocessing.from_dict(provenance["preprocessing"])


def override_preprocessing(spec, base: Preprocessing) -> Preprocessing:
    """`base` with the values of `spec` (see preprocessing_values) put in."""
    values = {**base.to_dict(), **preprocessing_values(spec)}
    if values["crop"] > CROP_FACTOR * base.crop:
        raise SettingError(f"--preprocessing: crop {values['crop']} is more than {CROP_FACTOR} times the backbone's own "
                           f"{base.crop} (memory and time grow with the square of the crop); at most "
                           f"{CROP_FACTOR * base.crop}")
    if values["crop"] > values["resize"]:
        raise SettingError(f"--preprocessing: crop {values['crop']} is larger than resize {values['resize']}; "
                           "the centre crop must fit in the resized image")
    return Preprocessing.from_dict(values)


def preprocessing_values(spec) -> dict:
    """{key: checked value} from a Preprocessing, a dict, or text such as
    "resize=256,crop=224,interpolation=bilinear,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"
    (any subset of PREPROCESSING_KEYS; mean, std: three numbers separated by '/'). One-line
    SettingError naming the key on a bad one."""
    if isinstance(spec, Preprocessing):
        return spec.to_dict()
    if isinstance(spec, str):
        pairs = [item.partition("=") for item in spec.split(",")]
        for key, eq, value in pairs:
            if not (eq and key.strip() and value.strip()):
                raise SettingError(f"--preprocessing {spec!r}: expected KEY=VALUE pairs separated by commas (keys: "
                                   f"{', '.join(PREPROCESSING_KEYS)}), found {key + eq + value!r}")
        keys = [key.strip() for key, _, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise SettingError(f"--preprocessing {spec!r}: {repeated[0]} is given twice; give each key once")
        spec = {key.strip(): value.strip() for key, _, value in pairs}
    values = {}
    for key, value in dict(spec).items():
        if key not in PREPROCESSING_KEYS:
            raise SettingError(f"--preprocessing: unknown key {key!r}; expected any of {', '.join(PREPROCESSING_KEYS)}")
        values[key] = _preprocessing_value(key, value)
    return values


def _preprocessing_value(key: str, value):
    """One --preprocessing value, checked: positive int, a known mode, or three numbers."""
    if key in ("resize", "crop"):
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1 or str(number) != str(value).strip():
            raise SettingError(f"--preprocessing: {key} must be a positive whole number of pixels, found {value!r}")
        if number > MAX_SIDE:
            raise SettingError(f"--preprocessing: {key} {number} is over the limit of {MAX_SIDE} pixels (memory grows "
                               "with its square: images that large would exhaust it)")
        return number
    if key in ("interpolation", "resize_mode"):
        allowed = INTERPOLATIONS if key == "interpolation" else RESIZE_MODES
        if value not in allowed:
            raise SettingError(f"--preprocessing: {key} must be one of {', '.join(allowed)}, found {value!r}")
        return value
    parts = value.split("/") if isinstance(value, str) else list(value)
    try:
        numbers = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers) or (key == "std" and min(numbers) <= 0):
        kind = "three positive numbers" if key == "std" else "three numbers"
        raise SettingError(f"--preprocessing: {key} must be {kind} (R/G/B), e.g. {key}=0.485/0.456/0.406; "
                           f"found {value!r}")
    return numbers


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


class Source(Protocol):
    """What a backbone source module provides (builtin, torchvision_zoo, timm_zoo); the registry
    uses nothing else. A new source is a module with these functions, added to registry.SOURCES."""

    SOURCE: str  # its name: "torchvision"

    def listing(self) -> list[tuple[str, str]]:
        """(the name --backbone takes, the model's name in its library) for every model it offers."""

    def load(self, model_name: str, weights: str | None, seed: int) -> "Loaded":
        """The full network in eval mode with `weights` (a name, a state_dict file, or "random")."""

    def penultimate(self, model_name: str, model: nn.Module) -> tuple[nn.Module, nn.Module | None, int, str]:
        """The network cut before its classifier: (network, dropped classifier, dim, description)."""

    def default_layer(self, model_name: str) -> str | None:
        """A module to pool at by default when the model has no last Linear to cut (else None)."""

    def skeleton(self, model_name: str, weights: str | None = None) -> tuple[nn.Module, int, LayerHints]:
        """The architecture with random (or no) weights, its input size and layer hints: for shapes only."""

    def weights_status(self, model_name: str) -> str:
        """Whether its default weights are here: cached, packaged, download, none."""


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
    preprocessing_rule: str = ""  # how `preprocessing` was chosen (recorded in the cache)
    dropped_head: dict = field(default_factory=dict)  # {parameter: file shape} of a removed classifier of another shape


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
    preprocessing_rule: str = ""
    weights_dropped_head: dict = field(default_factory=dict)

    def provenance(self) -> dict:
        dropped = {"weights_dropped_head": dict(self.weights_dropped_head)} if self.weights_dropped_head else {}
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
            "preprocessing_rule": self.preprocessing_rule,
            **dropped,
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
