"""Stage 3: ship it. The fitted head as a torch Linear (head.pt) and one TorchScript model.pt:
uint8 images -> the extraction's resize, crop and normalization -> frozen backbone -> Linear -> softmax.

Export checks its own work before anything is left on disk: the Linear against scikit-learn on the
cached features, and model.pt end to end on a sample of the original images.
"""


import json
import os
import warnings
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from torch import nn

from . import head as head_mod
from .backbones import Backbone, Preprocessing, load_backbone
from .cache import Cache, read_cache
from .errors import SettingError, TransferError
from .files import make_folder_for, write_atomically
from .images import DecodeError, decode_image, image_tensor
from .resize import VERTICAL_FIRST_IF_TALLER_CUT, pil_resize

MODEL_FORMAT = "transfer.model"
FEATURE_TOLERANCE = 1e-5  # max |p_torch - p_sklearn| on cached features
# End to end, model.pt crops exactly as extraction did and runs the backbone in fp32: what remains is
# the backbone's float rounding (channels_last vs. the batch it was extracted in), or the reduced
# precision of a bf16/fp16 extraction.
END_TO_END_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 2e-2}
PARITY_ROWS = 4096  # cached rows compared (evenly spaced) on large caches
PARITY_IMAGES = 12  # original images run end to end


class TransferModel(nn.Module):
    """uint8 RGB images (N, 3, H, W), any H and W -> class probabilities (N, K) in `classes` order.

    Also `preprocess(image)` for one (3, H, W) image -> (3, S, S) uint8 crop, and
    `classify(crops)` for (N, 3, S, S) uint8 crops: so images of different sizes can be batched.
    """

    classes: List[str]
    metadata: str

    def __init__(self, backbone: nn.Module, weight: torch.Tensor, bias: torch.Tensor, l2_normalize: bool,
                 prep: Preprocessing, classes: list[str], metadata: dict):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.l2_normalize = l2_normalize
        self.resize_to = prep.resize
        self.crop = prep.crop
        self.mode = prep.interpolation
        self.vertical_first_rule = prep.pass_order == VERTICAL_FIRST_IF_TALLER_CUT
        self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.classes = list(classes)
        self.metadata = json.dumps(metadata)
        for p in self.parameters():
            p.requires_grad_(False)

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, S, S) uint8: short side to `resize_to` (Pillow's resize,
        bit for bit), then the centre crop, with torchvision's size and offset rules."""
        h, w = x.shape[-2], x.shape[-1]
        if h <= w:
            nh, nw = self.resize_to, int(self.resize_to * w / h)
        else:
            nh, nw = int(self.resize_to * h / w), self.resize_to
        if nh != h or nw != w:
            x = pil_resize(x, nh, nw, self.mode == "bicubic", self.vertical_first_rule)
        top = int(round((nh - self.crop) / 2.0))
        left = int(round((nw - self.crop) / 2.0))
        return x[:, :, top:top + self.crop, left:left + self.crop]

    @torch.jit.export
    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, S, S) uint8."""
        return self._resize_crop(image.unsqueeze(0))[0]

    @torch.jit.export
    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 -> (N, D) backbone features, as cached at extraction."""
        x = (crops.float() / 255.0 - self.mean) / self.std
        return self.backbone(x.contiguous(memory_format=torch.channels_last))

    @torch.jit.export
    def classify(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 -> (N, K) probabilities."""
        features = self.embed(crops)
        if self.l2_normalize:
            features = features / torch.linalg.vector_norm(features, 2.0, dim=[1], keepdim=True).clamp_min(1e-12)
        return torch.softmax(self.head(features), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 RGB -> (N, K) probabilities."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("expected a uint8 tensor of RGB images shaped (N, 3, H, W)")
        return self.classify(self._resize_crop(images))


@dataclass
class ExportResult:
    model_path: str  # model.pt: uint8 images in, probabilities out
    head_path: str  # head.pt: the torch.nn.Linear(D, K) state_dict
    parity: dict  # what was checked against scikit-learn (also in parity.json beside the model)


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


def rebuild_backbone(provenance: dict) -> Backbone:
    """The extraction's backbone, from the cache's provenance; the weights must be the same file."""
    source = provenance.get("weights_source") or provenance.get("weights")
    backbone = load_backbone(provenance["backbone"], source, int(provenance.get("seed") or 0))
    if backbone.weights_sha256 != (provenance.get("weights_sha256") or ""):
        raise TransferError(f"the weights at {source} are not the ones the features were extracted with "
                            f"(sha256 {backbone.weights_sha256[:12]} vs {str(provenance.get('weights_sha256'))[:12]})")
    return backbone


def export(source, out: str | os.PathLike | None = None) -> ExportResult:
    """Write head.pt and model.pt for a fitted head, after checking both against scikit-learn.

    source: a fit run folder, or the FitResult of `fit` (written or not). out: the folder to
    write into (default: the run folder), or the model file's path (*.pt). A FitResult that was
    never written needs `out`; its head files (head.npz, head.json) are written there too.

    >>> exported = export(fit("cache/photos.h5"), "models/photos")
    >>> exported.model_path                                   # 'models/photos/model.pt'
    """
    from .fit import FitResult

    if isinstance(source, FitResult):
        head, reference, cache, run_dir = source.head, source.pipeline, source.cache, source.run_dir
    else:
        run_dir = os.fspath(source)
        head = head_mod.load(run_dir)
        reference = head_mod.sklearn_from_arrays(head)
        cache = read_cache(head.meta["provenance"]["cache"])
    if cache.path is None:
        raise SettingError("export: this head was fitted on arrays in memory, with no backbone to ship; "
                           "`pipeline.export.linear_state(result.head)` is its torch.nn.Linear state_dict")
    if out is None and run_dir is None:
        raise SettingError("export: this fit was not written to a run folder; pass out= (a folder) to write to")
    out = os.fspath(out) if out is not None else run_dir
    model_path = out if out.endswith(".pt") else os.path.join(out, "model.pt")
    folder = os.path.dirname(os.path.abspath(model_path))
    make_folder_for(model_path)
    if isinstance(source, FitResult) and os.path.abspath(folder) != os.path.abspath(run_dir or ""):
        head_mod.save(head, folder)  # so the folder describes its model on its own
    return _export(head, reference, cache, model_path, folder)


def _export(head: head_mod.LinearHead, reference, cache: Cache, model_path: str, folder: str) -> ExportResult:
    provenance = head.meta["provenance"]
    parity = {"cached_features": _feature_parity(head, reference, cache)}
    backbone = rebuild_backbone(provenance)
    # The preprocessing recorded at extraction, not today's: Pillow's resize order may have changed since.
    prep = Preprocessing.from_dict(provenance["preprocessing"])
    model = TransferModel(backbone.network, torch.from_numpy(head.weight).float(), torch.from_numpy(head.bias).float(),
                          head.l2_normalize, prep, head.classes, model_metadata(head))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(model)
    parity["end_to_end"] = _end_to_end_parity(scripted, reference, cache)
    head_path = os.path.join(folder, "head.pt")
    write_atomically(lambda p: torch.save(linear_state(head), p), head_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save's deprecation notice
        write_atomically(lambda p: _save_scripted(scripted, p, model.metadata), model_path)
    with open(os.path.join(folder, "parity.json"), "w") as f:
        json.dump(parity, f, indent=2)
    return ExportResult(model_path, head_path, parity)


def _save_scripted(scripted, path: str, metadata: str) -> None:
    # Through a file object: torch's own path argument cannot hold names that are not UTF-8.
    with open(path, "wb") as f:
        torch.jit.save(scripted, f, _extra_files={"transfer.json": metadata})


def model_metadata(head: head_mod.LinearHead) -> dict:
    p = head.meta["provenance"]
    return {
        "format": MODEL_FORMAT,
        "classes": head.classes,
        "backbone": p["backbone"],
        "weights": p["weights"],
        "weights_sha256": p["weights_sha256"],
        "layer": p["layer"],
        "preprocessing": p["preprocessing"],
        "extraction_precision": p["precision"],
        "l2_normalize": head.l2_normalize,
        "C": head.meta.get("C"),
        "input": "uint8 RGB tensor (N, 3, H, W), any size",
        "output": "probabilities (N, K) in the order of classes",
    }


def _feature_parity(head, reference, cache: Cache) -> dict:
    with_rows = _sample_rows(cache.n, PARITY_ROWS)
    features = cache.features(with_rows, dtype=np.float64)
    p_sklearn = reference.predict_proba(features)
    p_torch = torch_proba(head, features)
    worst = float(np.abs(p_torch - p_sklearn).max())
    same = _same_decisions(p_torch, p_sklearn, FEATURE_TOLERANCE)
    result = {"rows": len(with_rows), "max_abs_diff": worst, "tolerance": FEATURE_TOLERANCE, "argmax_identical": same,
              "argmax_rule": "compared where the top two differ by more than 2 x tolerance"}
    if worst > FEATURE_TOLERANCE or not same:
        raise TransferError(f"export stopped: the torch Linear disagrees with scikit-learn on {len(with_rows)} cached "
                            f"rows (max |p diff| {worst:.2e}, tolerance {FEATURE_TOLERANCE:.0e}, argmax identical: {same})")
    return result


def _same_decisions(p: np.ndarray, reference: np.ndarray, tolerance: float) -> bool:
    """Same argmax wherever the reference's top two are further apart than the tolerance allows
    to swap (a near-tie may legitimately go either way)."""
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tolerance
    return bool((p.argmax(1) == reference.argmax(1))[clear].all())


def _sample_rows(n: int, k: int) -> np.ndarray:
    """Up to k row numbers spread evenly over 0..n-1."""
    return np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(np.int64))


def _end_to_end_parity(model, reference, cache: Cache) -> dict:
    tolerance = END_TO_END_TOLERANCE.get(cache.provenance.get("precision"), 1e-1)
    rows = _sample_rows(cache.n, PARITY_IMAGES)
    names = [cache.path_bytes[i] for i in rows]
    image_dir = os.fsencode(cache.image_dir or "")
    checked, worst, same = [], 0.0, True
    features = cache.features(rows, dtype=np.float64)
    expected = reference.predict_proba(features)
    for i, name in enumerate(names):
        try:
            image = decode_image(os.fsdecode(os.path.join(image_dir, name)))
        except DecodeError:
            continue  # moved or deleted since extraction
        tensor = image_tensor(image).unsqueeze(0)
        with torch.inference_mode():
            got = model(tensor).double().numpy()[0]
        worst = max(worst, float(np.abs(got - expected[i]).max()))
        same &= _same_decisions(got[None], expected[i][None], tolerance)
        checked.append(os.fsdecode(name))
    result = {"images": len(checked), "max_abs_diff": worst, "tolerance": tolerance, "argmax_identical": same,
              "argmax_rule": "compared where the top two differ by more than 2 x tolerance",
              "precision": cache.provenance.get("precision")}
    if not checked:
        result["skipped"] = f"none of the sampled images could be read under {os.fsdecode(image_dir)}"
        return result
    if worst > tolerance or not same:
        raise TransferError(f"export stopped: model.pt on {len(checked)} original images disagrees with scikit-learn "
                            f"on their cached features (max |p diff| {worst:.2e}, tolerance {tolerance:.0e}, "
                            f"argmax identical: {same})")
    return result
