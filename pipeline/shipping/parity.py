"""What export checks before any model file is left on disk, against scikit-learn's own
probabilities: the torch Linear (and each format's head) on cached features, and each model file
end to end on a sample of the original images.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..backbones import Backbone, recorded_preprocessing
from ..cache import Cache, cache_entries
from ..errors import TransferError
from ..files import display_path
from ..images import DecodeError, decode_image
from . import formats
from .formats import image_tensor
from .model import TransferModel, torch_proba

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


def on_features(head, reference, cache: Cache, probabilities=None, name: str = "the torch Linear") -> dict:
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


def format_on_features(fmt: str, model: TransferModel, reference, cache: Cache) -> dict:
    """The head as format `fmt` runs it (onnxruntime, torch.export) vs scikit-learn on cached features."""
    return on_features(None, reference, cache, lambda x: formats.head_probabilities(fmt, model, x), f"the head in {fmt}")


def _same_decisions(p: np.ndarray, reference: np.ndarray, tolerance: float) -> bool:
    """Same argmax wherever the reference's top two are further apart than the tolerance allows
    to swap (a near-tie may legitimately go either way)."""
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tolerance
    return bool((p.argmax(1) == reference.argmax(1))[clear].all())


def _sample_rows(n: int, k: int) -> np.ndarray:
    """Up to k row numbers spread evenly over 0..n-1."""
    return np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(np.int64))


def end_to_end(model, reference, cache: Cache, label: str = "model.pt", backbone: Backbone | None = None,
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
                    prep = recorded_preprocessing(cache.provenance)  # as recorded, like model.pt
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
