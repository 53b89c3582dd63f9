"""Stage 3: ship it. The fitted head as a torch Linear (head.pt) and one TorchScript model.pt:
uint8 images -> the extraction's resize, crop and normalization -> frozen backbone -> Linear -> softmax.

Export checks its own work before anything is left on disk: the Linear against scikit-learn on the
cached features, and model.pt end to end on a sample of the original images.
"""


import json
import os
import shutil
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch
from torch import nn

from . import formats as formats_mod
from . import head as head_mod
from .backbones import Backbone, Preprocessing, load_arguments, load_backbone
from .backbones.weights import looks_like_path
from .cache import Cache, read_cache
from .errors import InputFileError, SettingError, TransferError
from .files import display_path, make_folder_for, remove_quietly, write_atomically
from .images import DecodeError, decode_image, image_tensor
from .resize import VERTICAL_FIRST_IF_TALLER_CUT, pil_resize

MODEL_FORMAT = "transfer.model"
FEATURE_TOLERANCE = 1e-5  # max |p_torch - p_sklearn| on cached features
# End to end, model.pt crops exactly as extraction did and runs the backbone in fp32: what remains is
# the backbone's float rounding (channels_last vs. the batch it was extracted in), or the reduced
# precision of a bf16/fp16 extraction.
END_TO_END_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 2e-2}
# A bf16/fp16 cache: the head's probabilities can move by more than any fixed tolerance when the
# features move by their rounding (1.3e-1 on 18 smooth synthetic images, whose lite0 features are at
# cosine 0.97 to fp32; real photos >= 0.998; issue #16), so model.pt is compared strictly with the
# extraction repeated in fp32, and the cached rows' cosine to those fp32 features is reported.
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
        self.squash = prep.resize_mode == "squash"
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
        if self.squash:  # timm's crop_mode "squash": both sides to resize_to
            nh, nw = self.resize_to, self.resize_to
        elif h <= w:
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
    model_path: str  # model.pt (or the one other format written): uint8 images in, probabilities out
    head_path: str  # head.pt: the torch.nn.Linear(D, K) state_dict
    parity: dict  # what was checked against scikit-learn (also in parity.json beside the model)
    paths: dict = field(default_factory=dict)  # format -> file written ("torchscript", "onnx", "pt2")


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


def export(source, out: str | os.PathLike | None = None, formats="torchscript",
           weights: str | os.PathLike | None = None, skip_image_parity: bool = False) -> ExportResult:
    """Write head.pt and the model in each of `formats`, after checking each against scikit-learn.

    source: a fit run folder, or the FitResult of `fit` (written or not). out: the folder to
    write into (default: the run folder), or the model file's path (*.pt, *.onnx or *.pt2, one
    format). formats: "torchscript" (model.pt), "onnx" (model.onnx), "pt2" (model.pt2), a list
    of them, or "all". A FitResult that was never written needs `out`; its head files (head.npz,
    head.json) are written there too. weights: the backbone's weights file, when the one recorded
    at extraction has moved (it must have the recorded sha256). skip_image_parity: skip only the
    check on original images (for photos edited since extraction); the cached-feature checks run.

    >>> exported = export(fit("cache/photos.h5"), "models/photos", formats="all")
    >>> exported.paths                    # {'torchscript': 'models/photos/model.pt', 'onnx': ..., 'pt2': ...}
    """
    from .fit import FitResult

    chosen = formats_mod.parse_formats(formats)
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
    paths = _model_paths(out, chosen)
    folder = os.path.dirname(os.path.abspath(next(iter(paths.values()))))
    make_folder_for(os.path.join(folder, "head.pt"))
    if isinstance(source, FitResult) and os.path.abspath(folder) != os.path.abspath(run_dir or ""):
        head_mod.save(head, folder)  # so the folder describes its model on its own
    return _export(head, reference, cache, paths, folder, weights, skip_image_parity)


def _model_paths(out: str, chosen: list[str]) -> dict[str, str]:
    """format -> the file to write: out/model.pt etc., or `out` itself when it names one file."""
    named = [f for f, suffix in formats_mod.FORMATS.items() if out.lower().endswith(suffix)]
    if not named:
        return {f: os.path.join(out, "model" + formats_mod.FORMATS[f]) for f in chosen}
    if chosen != named:
        raise SettingError(f"--out {out} names one {named[0]} file but the format asked for is {', '.join(chosen)}; "
                           "give a folder, or --format " + named[0])
    return {named[0]: out}


def build_model(head: head_mod.LinearHead, weights: str | None = None) -> TransferModel:
    """The model every format ships, in eval mode: the extraction's backbone and preprocessing + this
    head. weights: see rebuild_backbone."""
    return _build(head, weights)[0]


def _build(head: head_mod.LinearHead, weights: str | None = None) -> tuple[TransferModel, Backbone]:
    provenance = head.meta["provenance"]
    backbone = rebuild_backbone(provenance, weights)
    # The preprocessing recorded at extraction, not today's: Pillow's resize order may have changed since.
    prep = Preprocessing.from_dict(provenance["preprocessing"])
    model = TransferModel(backbone.network, torch.from_numpy(head.weight).float(), torch.from_numpy(head.bias).float(),
                          head.l2_normalize, prep, head.classes, model_metadata(head))
    return model.eval(), backbone


def _export(head: head_mod.LinearHead, reference, cache: Cache, paths: dict[str, str], folder: str,
            weights: str | None = None, skip_image_parity: bool = False) -> ExportResult:
    parity = {"cached_features": _feature_parity(head, reference, cache)}
    model, backbone = _build(head, weights)
    _check_free_space(model, paths, folder)
    # Every file is written under a temporary name and checked as loaded back from it; only when all
    # agree with scikit-learn are they renamed into place.
    for fmt, path in paths.items():  # model.pt's head is the torch Linear checked above
        if fmt != "torchscript":
            parity[fmt] = {"file": os.path.basename(path),
                           "cached_features": _format_feature_parity(fmt, model, reference, cache)}
    program = formats_mod.image_program(model) if {"onnx", "pt2"} & set(paths) else None  # both start from it
    written, memo = {}, {}
    try:
        for fmt, path in paths.items():
            name = os.path.basename(path)
            written[fmt] = tmp = f"{path}.writing-{os.getpid()}"
            try:
                formats_mod.write(fmt, model, tmp, program)
            except (OSError, RuntimeError) as e:  # a full disk, a vanished folder, the writer's own failure
                reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).strip().splitlines()
                raise TransferError(f"writing {name} into {display_path(folder)} failed: "
                                    f"{(reason or [type(e).__name__])[0][:200]}; no model file was written") from None
            runner, _ = formats_mod.load(tmp, torch.device("cpu"), fmt)
            e2e = ({"skipped": "asked for (--skip-image-parity)"} if skip_image_parity else
                   _end_to_end_parity(runner.images, reference, cache, name, backbone, memo))
            (parity if fmt == "torchscript" else parity[fmt])["end_to_end"] = e2e  # model.pt's: top level, as before
        head_path = os.path.join(folder, "head.pt")
        write_atomically(lambda p: torch.save(linear_state(head), p), head_path)
        for fmt, path in paths.items():
            os.replace(written.pop(fmt), path)
    finally:
        for tmp in written.values():
            remove_quietly(tmp)
    parity_path = os.path.join(folder, "parity.json")
    try:  # keep what an earlier export checked for the formats not rewritten now
        with open(parity_path) as f:
            parity = {**json.load(f), **parity}
    except (OSError, ValueError):
        pass
    write_atomically(lambda p: _write_json(parity, p), parity_path)
    model_path = paths.get("torchscript") or next(iter(paths.values()))
    return ExportResult(model_path, head_path, parity, dict(paths))


# Beyond the weights, a model file holds its code, graph and metadata: measured under 5% of
# EfficientNet-Lite0's model.pt; 10% and 16 MiB leave room for a few more.
SPACE_MARGIN, SPACE_EXTRA = 1.10, 16 * 2**20


def _check_free_space(model: nn.Module, paths: dict[str, str], folder: str) -> None:
    """Refuse before writing when the folder cannot hold every model file at once (they are all
    written under temporary names before any is renamed into place)."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    need = int(len(paths) * (weights * SPACE_MARGIN + SPACE_EXTRA))
    free = shutil.disk_usage(folder).free
    if free < need:
        names = ", ".join(os.path.basename(p) for p in paths.values())
        raise TransferError(f"not enough free space in {display_path(folder)} for {names}: about "
                            f"{need / 2**20:,.0f} MiB needed, {free / 2**20:,.0f} MiB free; no model file was written")


def _write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


def model_metadata(head: head_mod.LinearHead) -> dict:
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
        "l2_normalize": head.l2_normalize,
        "C": head.meta.get("C"),
        "input": "uint8 RGB tensor (N, 3, H, W), any size",
        "output": "probabilities (N, K) in the order of classes",
    }


def _feature_parity(head, reference, cache: Cache, probabilities=None, name: str = "the torch Linear") -> dict:
    """probabilities: (N, D) features -> (N, K), the head under test (default: the torch Linear)."""
    with_rows = _sample_rows(cache.n, PARITY_ROWS)
    features = cache.features(with_rows, dtype=np.float64)
    p_sklearn = reference.predict_proba(features)
    p_torch = probabilities(features) if probabilities else torch_proba(head, features)
    worst = float(np.abs(p_torch - p_sklearn).max())
    same = _same_decisions(p_torch, p_sklearn, FEATURE_TOLERANCE)
    result = {"rows": len(with_rows), "max_abs_diff": worst, "tolerance": FEATURE_TOLERANCE, "argmax_identical": same,
              "argmax_rule": "compared where the top two differ by more than 2 x tolerance"}
    if worst > FEATURE_TOLERANCE or not same:
        raise TransferError(f"export stopped: {name} disagrees with scikit-learn on {len(with_rows)} cached "
                            f"rows (max |p diff| {worst:.2e}, tolerance {FEATURE_TOLERANCE:.0e}, argmax identical: {same})")
    return result


def _format_feature_parity(fmt: str, model: TransferModel, reference, cache: Cache) -> dict:
    """The head as format `fmt` runs it (onnxruntime, torch.export) vs scikit-learn on cached features."""
    return _feature_parity(None, reference, cache, lambda x: formats_mod.head_probabilities(fmt, model, x),
                           f"the head in {fmt}")


def _same_decisions(p: np.ndarray, reference: np.ndarray, tolerance: float) -> bool:
    """Same argmax wherever the reference's top two are further apart than the tolerance allows
    to swap (a near-tie may legitimately go either way)."""
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tolerance
    return bool((p.argmax(1) == reference.argmax(1))[clear].all())


def _sample_rows(n: int, k: int) -> np.ndarray:
    """Up to k row numbers spread evenly over 0..n-1."""
    return np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(np.int64))


def _end_to_end_parity(model, reference, cache: Cache, label: str = "model.pt", backbone: Backbone | None = None,
                       memo: dict | None = None) -> dict:
    """model: uint8 images (1, 3, H, W) -> probabilities (1, K), run on a sample of the original images.
    A bf16/fp16 cache is compared with the extraction repeated in fp32 by `backbone` with its own
    (Pillow) preprocessing (memo: row -> those features, shared by the formats checked in one export)."""
    precision = cache.provenance.get("precision")
    # bf16/fp16 features, or crops decoded by nvJPEG (--decode torch on a GPU), are not what model.pt
    # computes on the CPU: the reference is then the extraction repeated in fp32 with Pillow.
    reduced = (precision in ("bf16", "fp16") or cache.provenance.get("decode") == "torch") and backbone is not None
    tolerance = END_TO_END_TOLERANCE["fp32"] if reduced else END_TO_END_TOLERANCE.get(precision, 1e-1)
    memo = {} if memo is None else memo
    rows = _sample_rows(cache.n, PARITY_IMAGES)
    names = [cache.path_bytes[i] for i in rows]
    image_dir = os.fsencode(cache.image_dir or "")
    checked, worst, same, cosines = [], 0.0, True, []
    features = cache.features(rows, dtype=np.float64)
    expected = reference.predict_proba(features)
    for i, name in enumerate(names):
        try:
            image = decode_image(os.fsdecode(os.path.join(image_dir, name)))
        except DecodeError:
            continue  # moved or deleted since extraction
        tensor = image_tensor(image).unsqueeze(0)
        with torch.inference_mode():
            got = np.asarray(model(tensor), dtype=np.float64)[0]
            if reduced:  # the extraction once more, in fp32, with its own (Pillow) preprocessing
                if int(rows[i]) not in memo:
                    prep = Preprocessing.from_dict(cache.provenance["preprocessing"])  # as recorded, like model.pt
                    memo[int(rows[i])] = backbone.network(
                        prep.normalize(prep.pil_transform()(image).unsqueeze(0))).double().numpy()
                again = memo[int(rows[i])]
                cosines.append(float(again[0] @ features[i] / (np.linalg.norm(again) * np.linalg.norm(features[i]))))
                expected[i] = reference.predict_proba(again)[0]
        worst = max(worst, float(np.abs(got - expected[i]).max()))
        same &= _same_decisions(got[None], expected[i][None], tolerance)
        checked.append(os.fsdecode(name))
    result = {"images": len(checked), "max_abs_diff": worst, "tolerance": tolerance, "argmax_identical": same,
              "argmax_rule": "compared where the top two differ by more than 2 x tolerance",
              "precision": precision}
    if reduced:
        torch_decoded = ", decoded by --decode torch" if cache.provenance.get("decode") == "torch" else ""
        result["reference"] = f"the extraction repeated in fp32 (the cache is {precision}{torch_decoded})"
        result["cached_feature_cosine_min"] = min(cosines, default=1.0)
    if not checked:
        result["skipped"] = f"none of the sampled images could be read under {os.fsdecode(image_dir)}"
        return result
    if worst > tolerance or not same:
        raise TransferError(f"export stopped: {label} on {len(checked)} original images disagrees with scikit-learn "
                            f"on their {'features extracted again in fp32' if reduced else 'cached features'} "
                            f"(max |p diff| {worst:.2e}, tolerance {tolerance:.0e}, "
                            f"argmax identical: {same}){_changed_images_hint(cache, names)}")
    return result


def _changed_images_hint(cache: Cache, names: list[bytes]) -> str:
    """"; N of the M images checked changed since extraction ..." when the cache's per-file size
    and mtime say so (caches that record none: say that it cannot tell), else ""."""
    from .cache import cache_entries

    entries = cache_entries(cache.path)
    if not entries.has_stats:
        return ("; this cache records no file sizes and mtimes, so whether the images changed since extraction "
                "cannot be told (--skip-image-parity skips this check)")
    recorded = {k: (int(size), int(mtime)) for k, size, mtime in zip(entries.keys, entries.sizes, entries.mtime_ns)}
    changed = []
    for name in names:
        try:
            st = os.stat(os.path.join(os.fsencode(cache.image_dir or ""), name))
        except OSError:
            continue
        if recorded.get(bytes(name)) not in (None, (st.st_size, st.st_mtime_ns)):
            changed.append(name)
    if not changed:
        return ""
    return (f"; {len(changed)} of the {len(names)} images checked changed since extraction (size or mtime), e.g. "
            f"{display_path(changed[0])}: extract again (`transfer extract` updates the cache) and refit, "
            "or pass --skip-image-parity")
