"""The rows each phase of a fit uses: train, val and test, and a learning curve's subsample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from ..cache import Cache
from ..errors import SettingError, TransferError
from .settings import FitSettings


@dataclass
class Splits:
    """Row numbers into the cache: train (n_tr,), val (n_val,), test (n_te,) int64: the rows each
    phase of a fit uses. held_out_val (hold_out="val"): `test` holds the whole validation split,
    held out to score the head, and `val` is empty."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    source: str  # how they were made, for the report
    held_out_val: bool = False

    def sizes(self) -> dict:
        """Images per split of the cache as this fit used them."""
        if self.held_out_val:
            return {"train": len(self.train), "val": len(self.test), "test": 0}
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def make_splits(cache: Cache, seed: int) -> Splits:
    """The cache's own train/val/test when it has them; stratified, seeded splits otherwise."""
    labels, n_classes = cache.labels, len(cache.classes)
    _check_classes(labels, cache.classes, np.arange(len(labels)), "the cache")
    rows = np.arange(len(labels))
    if cache.split is None:
        _need_per_class(labels, cache.classes, 3, "a stratified train/val/test split")
        rest, test = _stratified(rows, labels, seed, "a stratified train/val/test split")
        train, val = _stratified(rest, labels, seed, "a stratified train/val/test split")
        source = f"no split folders: stratified 64/16/20 train/val/test split of {len(rows)} images (seed {seed})"
        return Splits(np.sort(train), np.sort(val), np.sort(test), source)
    names = set(np.unique(cache.split))
    unknown = names - {"train", "val", "test"}
    if unknown:
        raise TransferError(f"the cache has unknown split names {sorted(unknown)}; expected train, val, test")
    if "train" not in names:
        raise TransferError("the cache has split folders but no 'train' split to fit on")
    train = rows[cache.split == "train"]
    test = rows[cache.split == "test"]
    if "val" in names:
        val = rows[cache.split == "val"]
        source = "the cache's own " + "/".join(s for s in ("train", "val", "test") if s in names) + " split"
    else:
        _need_per_class(labels[train], cache.classes, 2, "carving a validation split out of train")
        train, val = _stratified(train, labels, seed, "carving a validation split out of train")
        train, val = np.sort(train), np.sort(val)
        source = f"the cache's train{'/test' if len(test) else ''} split; validation: stratified 20% of train (seed {seed})"
    _check_classes(labels, cache.classes, train, "the train split")
    if n_classes > len(np.unique(labels[val])):
        missing = sorted(set(range(n_classes)) - set(labels[val].tolist()))
        raise TransferError(f"class {cache.classes[missing[0]]!r} has no validation images; "
                            "C cannot be chosen fairly without them")
    return Splits(train, val, test, source)


def _stratified(rows: np.ndarray, labels: np.ndarray, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """80/20 stratified split of rows; every class must fit in both parts."""
    try:
        return train_test_split(rows, test_size=0.2, stratify=labels[rows], random_state=seed)
    except ValueError:
        n_classes = len(np.unique(labels[rows]))
        raise TransferError(f"too few images for {what}: {len(rows)} images in {n_classes} classes, but 20% of "
                            f"them must still hold every class (at least {5 * n_classes} images)") from None


def run_splits(cache: Cache, settings: FitSettings) -> Splits:
    """The rows one run uses: the splits, then (for a learning-curve point) the same stratified
    fraction of train and of val; test stays whole. hold_out="val": the whole validation split
    takes the test split's place (a fixed yardstick) and only train is subsampled."""
    splits = make_splits(cache, settings.seed)
    seed = settings.seed + settings.repeat
    if settings.hold_out == "val":
        if len(splits.test):
            raise SettingError(f"hold_out (--hold-out) val is for caches without a test split; this one has "
                               f"{len(splits.test)} test images, which already score the head")
        splits = Splits(splits.train, splits.val[:0], splits.val, splits.source + "; the validation split is held "
                        "out: it scores the head, fitted on train alone", held_out_val=True)
    splits.train = subsample(splits.train, cache.labels, settings.train_fraction, seed)
    splits.val = subsample(splits.val, cache.labels, settings.train_fraction, seed)
    if settings.pca is not None and settings.pca > len(splits.train):
        raise TransferError(f"PCA dimension {settings.pca} needs at least that many training images; "
                            f"train fraction {settings.train_fraction:g} leaves {len(splits.train)}")
    return splits


def _check_classes(labels: np.ndarray, classes: list[str], rows: np.ndarray, where: str) -> None:
    if len(classes) < 2:
        raise TransferError(f"the cache has only one class ({classes[0] if classes else 'none'}); "
                            "a classifier needs at least two")
    present = np.bincount(labels[rows], minlength=len(classes))
    if (present == 0).any():
        name = classes[int(np.flatnonzero(present == 0)[0])]
        raise TransferError(f"class {name!r} has no images in {where}; every class needs training images")


def _need_per_class(labels: np.ndarray, classes: list[str], k: int, what: str) -> None:
    counts = np.bincount(labels, minlength=len(classes))
    if (counts < k).any():
        i = int(np.argmin(counts))
        raise TransferError(f"class {classes[i]!r} has {counts[i]} image{'s' if counts[i] != 1 else ''}; "
                            f"{what} needs at least {k} per class")


def subsample(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """round(fraction * n) of each class's rows (at least one per class), drawn with `seed`, sorted.

    Per class rather than sklearn's train_test_split, which refuses classes with one member."""
    if fraction >= 1 or len(rows) == 0:
        return rows
    rng = np.random.default_rng(seed)
    kept = []
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        kept.append(rng.choice(members, size=max(1, int(round(fraction * len(members)))), replace=False))
    return np.sort(np.concatenate(kept))
