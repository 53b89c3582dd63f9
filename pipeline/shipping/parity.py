"""What export checks before any model file is left on disk, against scikit-learn's own
probabilities: the torch Linear (and each file's own head) on cached features, and each model file
end to end on a sample of the original images (`sample_images`, read once per export).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backbones import Backbone, recorded_preprocessing
from ..cache import Cache, cache_entries
from ..errors import TransferError
from ..files import display_path
from ..images import DecodeError, decode_image
from ..progress import Silent
from .formats import Runner, image_tensor
from .model import torch_proba

FEATURE_TOLERANCE = 1e-5  # max |p_torch - p_sklearn| on cached features
# End to end, an fp32 model crops exactly as extraction did and runs the backbone in fp32: what remains
# is the backbone's float rounding (channels_last vs. the batch it was extracted in). A bf16 model is
# held to the bf16 extraction's bound (same argmax outside near-ties, max |dp| stated).
END_TO_END_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 2e-2}
# A bf16/fp16 cache (or crops decoded by nvJPEG): an fp32 model is compared with the extraction repeated
# in fp32 (the head's probabilities can move by more than any fixed tolerance when the features move by
# their rounding: 1.3e-1 on 18 smooth synthetic images; issue #16), and each cached row must still be
# the features of its photo: at cosine >= COSINE_FLOOR to the photo's fp32 features. Measured: bf16 rows
# of real photos >= 0.998, of smooth synthetic images under random weights >= 0.97; fp32 rows >= 0.99999;
# a photo replaced after extraction 0.36 (issue #22).
COSINE_FLOOR = {"fp32": 0.999, "reduced": 0.9}
PARITY_ROWS = 4096  # cached rows compared (evenly spaced) on large caches
PARITY_IMAGES = 12  # original images run end to end
MAX_TRIES = 1000  # images tried when sampled ones cannot be read (moved, deleted)
ARGMAX_RULE = "compared where the top two differ by more than 2 x tolerance"


def on_features(head, reference, cache: Cache, probabilities=None, name: str = "the torch Linear") -> dict:
    """probabilities: (N, D) features -> (N, K), the head under test (default: the torch Linear)."""
    with_rows = _sample_rows(cache.n, PARITY_ROWS)
    features = cache.features(with_rows, dtype=np.float64)
    p_sklearn = reference.predict_proba(features)
    p_torch = probabilities(features) if probabilities else torch_proba(head, features)
    worst = float(np.abs(p_torch - p_sklearn).max())
    same = _same_decisions(p_torch, p_sklearn, FEATURE_TOLERANCE)
    result = {"rows": len(with_rows), "max_abs_diff": worst, "tolerance": FEATURE_TOLERANCE, "argmax_identical": same,
              "argmax_rule": ARGMAX_RULE}
    if worst > FEATURE_TOLERANCE or not same:
        raise TransferError(f"export stopped: {name} disagrees with scikit-learn on {len(with_rows)} cached "
                            f"rows (max |p diff| {worst:.2e}, tolerance {FEATURE_TOLERANCE:.0e}, argmax identical: {same})")
    return result


def format_on_features(runner: Runner, reference, cache: Cache, name: str) -> dict:
    """The head inside a loaded model file (cut from its own graph, run by its own runtime) vs
    scikit-learn on cached features; {"skipped": why} where the file's head cannot be cut out."""
    probe = runner.probabilities(np.zeros((1, cache.dim), dtype=np.float32))
    if probe is None:
        return {"skipped": f"the head could not be cut out of {name}'s graph"}
    return on_features(None, reference, cache, runner.probabilities, f"the head in {name}")


def _same_decisions(p: np.ndarray, reference: np.ndarray, tolerance: float) -> bool:
    """Same argmax wherever the reference's top two are further apart than the tolerance allows
    to swap (a near-tie may legitimately go either way)."""
    return bool(_decisions(p, reference, tolerance).all())


def _decisions(p: np.ndarray, reference: np.ndarray, tolerance: float) -> np.ndarray:
    """(N,) bool: row i takes the reference's decision, or is a near-tie."""
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tolerance
    return (p.argmax(1) == reference.argmax(1)) | ~clear


def _sample_rows(n: int, k: int) -> np.ndarray:
    """Up to k row numbers spread evenly over 0..n-1."""
    return np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(np.int64))


@dataclass
class Sample:
    """The original images the end-to-end checks run: `rows` of the cache whose files could be read
    (in the order tried), and the `unreadable` ones tried before them. `fresh`: (len(rows), D) float64,
    the extraction repeated in fp32 on those files, where a check needs it (else None)."""

    image_dir: bytes
    rows: np.ndarray
    names: list[bytes]
    unreadable: list[bytes] = field(default_factory=list)
    fresh: np.ndarray | None = None

    def path(self, i: int) -> str:
        return os.fsdecode(os.path.join(self.image_dir, self.names[i]))

    def lines(self) -> list[str]:
        """What the sample says beyond its figures: images that could not be read, and what replaced them."""
        if not self.unreadable:
            return []
        shown = display_path(os.fsdecode(self.unreadable[0]))
        return [f"  ({len(self.unreadable)} of the images sampled could not be read (moved or deleted?), e.g. "
                f"{shown}: {len(self.rows)} readable ones checked instead)"]


def needs_fresh(cache: Cache, precision: str) -> bool:
    """Whether the checks need the extraction repeated in fp32: reduced-precision (or nvJPEG-decoded)
    cached features, or a model that is not fp32."""
    p = cache.provenance
    return p.get("precision") in ("bf16", "fp16") or p.get("decode") == "torch" or precision != "fp32"


def sample_images(cache: Cache, backbone: Backbone | None, fresh: bool, k: int | None = None,
                  progress=None) -> Sample:
    """Up to k (default PARITY_IMAGES) images of the cache that can still be read: the k evenly spaced rows
    first, then, for each one that cannot be read, others spread over the cache (at most MAX_TRIES tried). fresh: also
    run `backbone` in fp32 on each, with its own (Pillow) preprocessing as recorded in the cache."""
    progress, k = progress or Silent(), k or PARITY_IMAGES
    image_dir = os.fsencode(cache.image_dir or "")
    first = _sample_rows(cache.n, k)
    rest = np.setdiff1d(np.random.default_rng(0).permutation(cache.n), first, assume_unique=True)
    order = np.concatenate([first, rest[:MAX_TRIES]])
    prep = recorded_preprocessing(cache.provenance) if fresh else None
    transform = prep.pil_transform() if prep else None
    rows, names, unreadable, crops = [], [], [], []
    progress.phase("reading the images to check", k, "img")
    for r in order:
        if len(rows) == k:
            break
        name = bytes(cache.path_bytes[int(r)])
        try:
            image = decode_image(os.fsdecode(os.path.join(image_dir, name)))
        except DecodeError:
            unreadable.append(name)
            continue
        rows.append(int(r))
        names.append(name)
        if transform is not None:
            crops.append(transform(image))
        progress.advance(1)
    sample = Sample(image_dir, np.asarray(rows, dtype=np.int64), names, unreadable)
    if crops and backbone is not None:
        with torch.inference_mode():
            sample.fresh = backbone.network(prep.normalize(torch.stack(crops))).double().numpy()
    return sample


def end_to_end(runner: Runner, reference, cache: Cache, sample: Sample, label: str = "model.pt",
               precision: str = "fp32", progress=None) -> dict:
    """The loaded model file on the sample's original images (each read again, cropped by the file's own
    preprocessing, then one batch) and once whole on the first image, vs scikit-learn: on the cached
    features, or on the fp32 features extracted again (fp32 model, reduced-precision cache). Rows whose
    cached features are not their photo's (cosine to the fresh fp32 features below the floor) fail too."""
    progress = progress or Silent()
    cache_precision = cache.provenance.get("precision")
    reduced = cache_precision in ("bf16", "fp16") or cache.provenance.get("decode") == "torch"
    tolerance = END_TO_END_TOLERANCE["fp32"] if precision == "fp32" else END_TO_END_TOLERANCE[precision]
    result = {"images": len(sample.rows), "max_abs_diff": None, "tolerance": tolerance, "argmax_identical": None,
              "argmax_rule": ARGMAX_RULE, "precision": cache_precision, "model_precision": precision}
    if sample.unreadable:
        result["unreadable"] = len(sample.unreadable)
        result["unreadable_examples"] = [display_path(os.fsdecode(n)) for n in sample.unreadable[:5]]
    if not len(sample.rows):
        result["skipped"] = (f"none of the {len(sample.unreadable)} images tried could be read under "
                             f"{display_path(os.fsdecode(sample.image_dir))} (moved?)")
        return result
    got = _run(runner, sample, label, progress, FEATURE_TOLERANCE if precision == "fp32" else tolerance)
    features = cache.features(sample.rows, dtype=np.float64)
    against_fresh = precision == "fp32" and reduced and sample.fresh is not None
    expected = reference.predict_proba(sample.fresh if against_fresh else features)
    diffs = np.abs(got - expected).max(axis=1)
    clear = _decisions(got, expected, tolerance)
    worst, same = float(diffs.max()), bool(clear.all())
    result.update(max_abs_diff=worst, argmax_identical=same)
    if against_fresh:
        torch_decoded = ", decoded by --decode torch" if cache.provenance.get("decode") == "torch" else ""
        result["reference"] = f"the extraction repeated in fp32 (the cache is {cache_precision}{torch_decoded})"
    cosines, floor = None, COSINE_FLOOR["reduced" if reduced else "fp32"]
    if sample.fresh is not None:
        cosines = np.sum(sample.fresh * features, 1) / (np.linalg.norm(sample.fresh, axis=1) *
                                                       np.linalg.norm(features, axis=1)).clip(1e-30)
        result.update(cached_feature_cosine_min=float(cosines.min()), cosine_floor=floor)
    bad = (diffs > tolerance) | ~clear | (cosines < floor if cosines is not None else False)
    if bad.any():
        raise TransferError(_failure(label, sample, cache, bad, diffs, cosines, floor, tolerance, worst, same,
                                     against_fresh))
    return result


def _run(runner: Runner, sample: Sample, label: str, progress, agree: float) -> np.ndarray:
    """(n, K) probabilities of the sample's images: prepared one at a time (each decoded again, kept only
    as its crop where the file crops), batched by the runner's key; and the whole file, as users call
    it, on the first image (it must give what the parts give, to `agree`)."""
    progress.phase(f"checking {label} on {len(sample.rows)} original images", len(sample.rows), "img")
    got, waiting = [None] * len(sample.rows), []
    whole = None
    threads = torch.get_num_threads()
    for i in range(len(sample.rows)):
        image = image_tensor(decode_image(sample.path(i)))
        # One image at a time on one thread: the resize's small ops ran 10-35x faster so on 2 busy cores
        # (0.3-1 s -> 0.03-0.15 s per photo, measured 2026-12-06); the batch below gets every thread.
        torch.set_num_threads(1)
        try:
            if i == 0:
                whole = runner.images(image.unsqueeze(0))[0]
            item = runner.prepare(image)
        finally:
            torch.set_num_threads(threads)
        if runner.key(item) is None:
            waiting.append((i, item))
            continue
        got[i] = runner.run([item])[0]
        progress.advance(1)
    if waiting:
        for (i, _), p in zip(waiting, runner.run([item for _, item in waiting])):
            got[i] = p
        progress.advance(len(waiting))
    got = np.asarray(got, dtype=np.float64)
    gap = float(np.abs(whole - got[0]).max())
    if gap > agree:
        raise TransferError(f"export stopped: {label} run whole on {display_path(sample.path(0))} differs from its "
                            f"preprocess and classify parts by {gap:.2e} (tolerance {agree:.0e})")
    return got


def _failure(label, sample, cache, bad, diffs, cosines, floor, tolerance, worst, same, against_fresh) -> str:
    named = []
    for i in np.flatnonzero(bad)[np.argsort(-diffs[bad], kind="stable")][:3]:
        why = f"|p diff| {diffs[i]:.2e}"
        if cosines is not None and cosines[i] < floor:
            why += f", cached features at cosine {cosines[i]:.4f} to the photo's (floor {floor})"
        named.append(f"{display_path(os.fsdecode(sample.names[i]))} ({why})")
    stale = int((cosines < floor).sum()) if cosines is not None else 0
    what = "features extracted again in fp32" if against_fresh else "cached features"
    text = (f"export stopped: {label} on {len(sample.rows)} original images disagrees with scikit-learn on their "
            f"{what} (max |p diff| {worst:.2e}, tolerance {tolerance:.0e}, argmax identical: {same})")
    if stale:
        text += f"; the cached features of {stale} of them are not their photo's now"
    text += f"; {int(bad.sum())} failing: {', '.join(named)}"
    return text + _changed_images_hint(cache, sample.names)


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
        return ("; their files' sizes and mtimes did not change since extraction: if they were replaced, extract "
                "again with --check-content and refit, or pass --skip-image-parity")
    return (f"; {len(changed)} of the {len(names)} images checked changed since extraction (size or mtime), e.g. "
            f"{display_path(changed[0])}: extract again (`transfer extract` updates the cache) and refit, "
            "or pass --skip-image-parity")
