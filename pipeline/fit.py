"""Stage 2: the replacement last layer, a multinomial logistic regression on cached features.

The regularisation is chosen by the linear-probe protocol of Kornblith et al. (2019) and CLIP
(Radford et al. 2021, App. A.3): a pass over decades of C on the validation split, then halving
the step around the best until 8 steps per decade; refit on train+val; score on test. Test
labels never reach the choice of C: the sweep only ever sees train and val rows.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from typing import ClassVar, Literal

import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, log_loss,
                             precision_recall_fscore_support, top_k_accuracy_score)
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from . import head as head_mod
from .cache import ArrayCache, Cache, read_cache
from .errors import SettingError, TransferError
from .settings import SEED, Interval, NoneMeans, Options, validate_all

COARSE_C = 10.0 ** np.arange(-6, 6)  # 1e-6 .. 1e5, Kornblith et al.'s range, one per decade
REFINE_HALVINGS = 3  # 1 -> 1/2 -> 1/4 -> 1/8 decade, CLIP's resolution
Normalization = Literal["standard", "l2", "none"]
ClassWeight = Literal["none", "balanced"]
NORMALIZATIONS: tuple[Normalization, ...] = ("standard", "l2", "none")
CLASS_WEIGHTS: tuple[ClassWeight, ...] = ("none", "balanced")
SCALER_ROWS = 4096  # rows per block when computing the scaler, to avoid a full-size temporary
# What a head records of the cache it was fitted on (head.json, metrics.json, model metadata).
PROVENANCE_KEYS = ("backbone", "weights", "weights_source", "weights_sha256", "pretrained", "seed", "layer", "dim",
                   "preprocessing", "precision", "torch_version", "torchvision_version", "created", "image_dir",
                   "listing_sha256")


@dataclass
class FitSettings:
    """How the head is fitted; `CONSTRAINTS` is the one declaration of what each setting allows."""

    C: float | None = None  # None: choose on the validation split
    class_weight: ClassWeight = "none"
    max_iter: int = 1000
    seed: int = 0
    normalize: Normalization = "standard"
    pca: int | None = None
    train_fraction: float = 1.0  # stratified subsample of train and val (learning curves)
    repeat: int = 0  # which subsample: seeds it with seed + repeat

    CONSTRAINTS: ClassVar[dict[str, list]] = {
        "C": [NoneMeans("auto (None)"), Interval(Real, 0, None, closed="neither")],
        "class_weight": [Options(CLASS_WEIGHTS)],
        "max_iter": [Interval(Integral, 1, None)],
        "seed": SEED,
        "normalize": [Options(NORMALIZATIONS)],
        "pca": [NoneMeans("none (None)"), Interval(Integral, 1, None)],
        "train_fraction": [Interval(Real, 0, 1, closed="right")],
        "repeat": [Interval(Integral, 0, None)],
    }

    @classmethod
    def from_kwargs(cls, **settings) -> "FitSettings":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise SettingError(f"unknown fit setting {unknown[0]!r}; expected any of {', '.join(names)}")
        return cls(**settings)

    def check(self, dim: int) -> None:
        validate_all(vars(self), self.CONSTRAINTS)
        if self.pca is not None and self.pca > dim:
            raise SettingError(f"PCA dimension {self.pca} is larger than the feature dimension {dim}")


@dataclass
class Splits:
    """Row numbers into the cache: train (n_tr,), val (n_val,), test (n_te,) int64."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    source: str  # how they were made, for the report

    def sizes(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


@dataclass
class FitResult:
    """Everything a fit produced. `head` is the fitted pipeline folded into one affine map (what
    export ships); `pipeline` the scikit-learn pipeline it came from (the parity reference)."""

    pipeline: Pipeline
    head: head_mod.LinearHead
    C: float
    sweep: list[dict]  # one entry per C tried: C, val top-1, val log-loss, iterations, converged
    splits: Splits
    evaluated_on: Literal["test", "val"]
    scores: dict
    convergence: dict
    timings: dict
    classes: list[str]
    settings: FitSettings
    validation: dict  # top1, log_loss on val of the train-only model at the chosen C
    cache: Cache  # what it was fitted on
    notes: list[str] = field(default_factory=list)
    run_dir: str | None = None  # the run folder, once written


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
    fraction of train and of val; test stays whole."""
    splits = make_splits(cache, settings.seed)
    seed = settings.seed + settings.repeat
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
    if fraction >= 1:
        return rows
    rng = np.random.default_rng(seed)
    kept = []
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        kept.append(rng.choice(members, size=max(1, int(round(fraction * len(members)))), replace=False))
    return np.sort(np.concatenate(kept))


# --- the model ------------------------------------------------------------------------------------

def _preprocessing(settings: FitSettings, X: np.ndarray, n_fit: int) -> list:
    """Fit the normalization (and PCA) on the first n_fit rows of X and apply them to all of X.

    The standard scaler is computed block by block and applied in place: no full-size copy.
    Returns the fitted steps; X holds transformed rows afterwards (or see the PCA note).
    """
    steps = []
    if settings.normalize == "standard":
        scaler = StandardScaler()
        for lo in range(0, n_fit, SCALER_ROWS):
            scaler.partial_fit(X[lo:min(lo + SCALER_ROWS, n_fit)])
        scaler.transform(X, copy=False)
        steps.append(scaler)
    elif settings.normalize == "l2":
        normalizer = Normalizer().fit(X[:n_fit])
        normalizer.transform(X, copy=False)
        steps.append(normalizer)
    if settings.pca:
        steps.append(PCA(n_components=settings.pca, random_state=settings.seed).fit(X[:n_fit]))
    return steps


def _project(steps: list, X: np.ndarray) -> np.ndarray:
    """PCA, when present, makes a new (N, pca) array; the other steps were applied in place."""
    return steps[-1].transform(X) if steps and isinstance(steps[-1], PCA) else X


def _logistic(settings: FitSettings, C: float) -> LogisticRegression:
    return LogisticRegression(C=C, solver="lbfgs", max_iter=settings.max_iter, random_state=settings.seed,
                              class_weight=None if settings.class_weight == "none" else settings.class_weight)


def _fit_lr(settings: FitSettings, C: float, X: np.ndarray, y: np.ndarray) -> tuple[LogisticRegression, dict]:
    model = _logistic(settings, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported once, as data, by the caller
        model.fit(X, y)
    iterations = int(np.max(model.n_iter_))
    return model, {"iterations": iterations, "converged": iterations < settings.max_iter}


def sweep_C(settings: FitSettings, Xtr: np.ndarray, ytr: np.ndarray, Xval: np.ndarray, yval: np.ndarray,
            n_classes: int) -> tuple[float, list[dict], np.ndarray]:
    """Coarse decades, then halve the step around the best. Ranked by val top-1, ties broken by
    lower val log-loss (accuracy alone ties often on small validation sets).

    Returns the chosen C, one row per C tried, and the chosen model's val probabilities (n_val, K)."""
    tried: dict[float, dict] = {}
    probas: dict[float, np.ndarray] = {}

    def evaluate(C: float) -> None:
        C = float(C)
        if C in tried:
            return
        model, conv = _fit_lr(settings, C, Xtr, ytr)
        probas[C] = model.predict_proba(Xval)
        tried[C] = {"C": C, "val_top1": float((probas[C].argmax(1) == yval).mean()),
                    "val_log_loss": float(log_loss(yval, probas[C], labels=np.arange(n_classes))), **conv}

    def best() -> float:
        return max(tried.values(), key=lambda r: (r["val_top1"], -r["val_log_loss"], -r["C"]))["C"]

    for C in COARSE_C:
        evaluate(C)
    step = 1.0
    for _ in range(REFINE_HALVINGS):
        step /= 2
        centre = best()
        for C in (centre * 10 ** -step, centre * 10 ** step):
            if COARSE_C[0] <= C <= COARSE_C[-1]:  # stay inside the published range
                evaluate(C)
    chosen = best()
    return chosen, sorted(tried.values(), key=lambda r: r["C"]), probas[chosen]


def scores(proba: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    """Top-1, top-5 (5+ classes), balanced accuracy, log-loss, per-class P/R/F1, confusion matrix."""
    labels = np.arange(len(classes))
    predicted = proba.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(y, predicted, labels=labels, zero_division=0)
    out = {
        "n": int(len(y)),
        "top1": float((predicted == y).mean()),
        "top5": float(top_k_accuracy_score(y, proba, k=5, labels=labels)) if len(classes) >= 5 else None,
        "balanced_accuracy": _balanced_accuracy(y, predicted),
        "log_loss": float(log_loss(y, proba, labels=labels)),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y, predicted, labels=labels).tolist(),
    }
    return out


def _balanced_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in y (scikit-learn warns when a prediction is a class
    y does not hold; that is expected on small splits, and the metric is still defined)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, predicted))


def fit(data, out: str | os.PathLike | None = None, *, command: str | None = None, **settings) -> FitResult:
    """Fit the new last layer on cached features by the linear-probe protocol; no network is run.

    data: a cache path, a `Cache`, or arrays `(X, y, classes, split)`: X (N, D), y (N,) int,
    classes (K,) names, split (N,) of "train"/"val"/"test" or None (then a seeded stratified split).
    settings: FitSettings fields (C=None chooses C on validation, class_weight, normalize, pca, ...).
    out: a run folder to write (head, metrics, report, plots); None writes nothing.

    >>> result = fit("cache/photos.h5")                       # C chosen on the validation split
    >>> result.scores["top1"], result.head.weight.shape       # (K, D) folded Linear weights
    """
    cache = as_cache(data)
    result = fit_head(cache, FitSettings.from_kwargs(**settings))
    if out is not None:
        from .report import write_fit_run

        write_fit_run(result, os.fspath(out), command or python_command(cache, result.settings))
    return result


def as_cache(data) -> Cache:
    """A Cache from a path, a Cache, or (X, y, classes[, split]) arrays."""
    if isinstance(data, Cache):
        return data
    if isinstance(data, (str, os.PathLike)):
        return read_cache(data)
    if isinstance(data, (tuple, list)) and len(data) in (3, 4):
        return ArrayCache(*data)
    raise SettingError(f"expected a cache path, a Cache or (X, y, classes, split) arrays; got {type(data).__name__}")


def python_command(cache: Cache, settings: FitSettings) -> str:
    """The Python call that reproduces a fit (recorded in its run folder)."""
    changed = {f.name: getattr(settings, f.name) for f in fields(settings)
               if getattr(settings, f.name) != f.default}
    args = [repr(cache.path) if cache.path else "(X, y, classes, split)"] + [f"{k}={v!r}" for k, v in changed.items()]
    return f"pipeline.fit({', '.join(args)})"


def head_provenance(cache: Cache) -> dict:
    """What a head records of the cache it was fitted on."""
    return {"cache": os.path.abspath(cache.path) if cache.path else None,
            **{k: cache.provenance.get(k) for k in PROVENANCE_KEYS}}


def fit_head(cache: Cache, settings: FitSettings) -> FitResult:
    """The whole protocol on one cache; reads the features once per phase, straight into float64."""
    timings, started = {}, time.perf_counter()
    settings.check(cache.dim)
    splits = run_splits(cache, settings)
    classes, y_all = cache.classes, cache.labels
    order = np.concatenate([splits.train, splits.val, splits.test])
    n_tr, n_val = len(splits.train), len(splits.val)
    y = y_all[order]
    y_tr, y_val, y_te = y[:n_tr], y[n_tr:n_tr + n_val], y[n_tr + n_val:]

    X = np.empty((len(order), cache.dim), dtype=np.float64)  # the one full-size array
    t = time.perf_counter()
    cache.features(order, out=X)
    timings["read_s"] = time.perf_counter() - t

    # 1. Choose C on validation: everything fitted on train rows only.
    t = time.perf_counter()
    steps = _preprocessing(settings, X[:n_tr + n_val], n_tr)
    Z = _project(steps, X[:n_tr + n_val])
    if settings.C is None:
        C, sweep, val_proba = sweep_C(settings, Z[:n_tr], y_tr, Z[n_tr:], y_val, len(classes))
    else:
        C, sweep = settings.C, []
        val_proba = _fit_lr(settings, C, Z[:n_tr], y_tr)[0].predict_proba(Z[n_tr:])
    timings["sweep_s"] = time.perf_counter() - t
    # The train-only model at the chosen C on val: what settings are compared on (experiments), and
    # the honest figure left when there is no test split.
    val_scores = scores(val_proba, y_val, classes)
    validation = {"top1": val_scores["top1"], "log_loss": val_scores["log_loss"]}
    notes = [f"splits: {splits.source}"]
    evaluated_on = "test" if len(splits.test) else "val"
    if evaluated_on == "val":
        notes.append("no test split: scores are on the validation split that also chose C "
                     "(optimistic); the saved model is refit on train+val")
    del Z

    # 2. Refit on train+val with the chosen C, from freshly read features.
    t = time.perf_counter()
    cache.features(order, out=X)
    steps = _preprocessing(settings, X, n_tr + n_val)
    Z = _project(steps, X)
    final, convergence = _fit_lr(settings, C, Z[:n_tr + n_val], y[:n_tr + n_val])
    timings["refit_s"] = time.perf_counter() - t
    final_scores = scores(final.predict_proba(Z[n_tr + n_val:]), y_te, classes) if len(y_te) else val_scores
    pipeline = Pipeline([(type(s).__name__.lower(), s) for s in steps] + [("logisticregression", final)])
    head = head_mod.fold(steps + [final], classes, {"provenance": head_provenance(cache), "C": C,
                                                    "settings": vars(settings)})
    timings["total_s"] = time.perf_counter() - started
    if settings.C is None:
        unconverged = sum(not r["converged"] for r in sweep)
        if unconverged:
            notes.append(f"{unconverged} of {len(sweep)} sweep fits stopped at --max-iter {settings.max_iter}")
    return FitResult(pipeline, head, C, sweep, splits, evaluated_on, final_scores, convergence, timings, classes,
                     settings, validation, cache, notes)
