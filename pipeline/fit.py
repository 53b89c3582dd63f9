"""Stage 2: the replacement last layer, a multinomial logistic regression on cached features.

The regularisation is chosen by the linear-probe protocol of Kornblith et al. (2019) and CLIP
(Radford et al. 2021, App. A.3): a pass over decades of C on the validation split, then halving
the step around the best until 8 steps per decade; refit on train+val; score on test. Test
labels never reach the choice of C: the sweep only ever sees train and val rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from typing import ClassVar, Literal, Protocol

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
CSelection = Literal["auto", "validation", "cv"]
C_SELECTIONS: tuple[CSelection, ...] = ("auto", "validation", "cv")
# Below this many validation images in some class, C is chosen by cross-validation on train+val
# (C_selection="auto"): measured in benchmarks/small_validation.py, see the README.
MIN_VALIDATION_PER_CLASS = 20
CV_FOLDS = 5
CLASS_WEIGHTS: tuple[ClassWeight, ...] = ("none", "balanced")
Solver = Literal["auto", "sklearn", "streamed"]
SOLVERS: tuple[Solver, ...] = ("auto", "sklearn", "streamed")
DEVICES = ("auto", "cpu", "cuda")
TOL = 1e-4  # LogisticRegression's default gradient tolerance, for both solvers
# solver="auto" picks scikit-learn when its estimated peak (sklearn_bytes) is under this share of
# the memory available now; benchmarks/fit_scale.py measures the estimate.
MEMORY_SHARE = 0.5
SCALER_ROWS = 4096  # rows per block when computing the scaler, to avoid a full-size temporary
# What a head records of the cache it was fitted on (head.json, metrics.json, model metadata).
PROVENANCE_KEYS = ("backbone", "weights", "weights_source", "weights_sha256", "pretrained", "seed", "layer", "dim",
                   "preprocessing", "precision", "torch_version", "torchvision_version", "created", "image_dir",
                   "listing_sha256", "source", "model", "versions", "layer_module", "pooling", "tta", "timm_version")


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
    C_selection: CSelection = "auto"  # how C=None is chosen: see choose_selection
    solver: Solver = "auto"  # auto: sklearn where its float64 features fit comfortably in memory, else streamed
    device: str = "auto"  # where the streamed solver computes: auto (a GPU when there is one), cpu, cuda

    CONSTRAINTS: ClassVar[dict[str, list]] = {
        "C": [NoneMeans("auto (None)"), Interval(Real, 0, None, closed="neither")],
        "class_weight": [Options(CLASS_WEIGHTS)],
        "max_iter": [Interval(Integral, 1, None)],
        "seed": SEED,
        "normalize": [Options(NORMALIZATIONS)],
        "pca": [NoneMeans("none (None)"), Interval(Integral, 1, None)],
        "train_fraction": [Interval(Real, 0, 1, closed="right")],
        "repeat": [Interval(Integral, 0, None)],
        "C_selection": [Options(C_SELECTIONS)],
        "solver": [Options(SOLVERS)],
        "device": [Options(DEVICES)],
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
        if self.pca is not None and self.solver == "streamed":
            raise SettingError("pca (--pca) is fitted in memory: use solver (--solver) sklearn or auto with it")


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
    evaluated_on: Literal["test", "val", "cv"]  # cv: no test split, out-of-fold scores of the C choice
    scores: dict
    convergence: dict
    timings: dict
    classes: list[str]
    settings: FitSettings
    validation: dict  # top1, log_loss on val of the train-only model at the chosen C
    cache: Cache  # what it was fitted on
    notes: list[str] = field(default_factory=list)
    run_dir: str | None = None  # the run folder, once written
    predictions: tuple | None = None  # (rows (n,), probabilities (n, K)) behind `scores`, rows of the cache
    warnings: list[str] = field(default_factory=list)  # from writing the run folder (e.g. images not found)
    solver: dict = field(default_factory=dict)  # name, reason, device, world_size


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


def _fit_lr(settings: FitSettings, C: float, X: np.ndarray, y: np.ndarray,
            start: LogisticRegression | None = None) -> tuple[LogisticRegression, dict]:
    """LogisticRegression at C, warm-started from `start`'s coef_/intercept_ when given."""
    model = _logistic(settings, C)
    if start is not None:  # scikit-learn's own warm start: lbfgs begins at these coefficients
        model.warm_start = True
        model.coef_, model.intercept_ = start.coef_.copy(), start.intercept_.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported once, as data, by the caller
        model.fit(X, y)
    iterations = int(np.max(model.n_iter_))
    return model, {"iterations": iterations, "converged": iterations < settings.max_iter,
                   "warm_start": start is not None}


class FitProgress(Protocol):
    """Receives a fit's progress, one bar per phase; the library never prints."""

    def phase(self, name: str, total: int | None, unit: str) -> None: ...  # a new bar; ends the previous one

    def advance(self, n: int, status: str = "") -> None: ...  # status: e.g. the current C and val top-1

    def note(self, text: str) -> None: ...  # one line for the user (the solver `auto` chose)


class _Silent:
    def phase(self, name, total, unit): pass

    def advance(self, n, status=""): pass

    def note(self, text): pass


FitAt = Callable[[float, object], tuple[object, np.ndarray, dict]]


def sweep_C(fit_at: FitAt, yval: np.ndarray, n_classes: int,
            progress: FitProgress | None = None) -> tuple[float, list[dict], np.ndarray, object]:
    """Coarse decades walked upward, each fit warm-started from the one before (scikit-learn's
    `_logistic_regression_path` and liblinear's C search do the same); then halve the step around
    the best, each neighbour warm-started from the best. Ranked by val top-1, ties broken by lower
    val log-loss (accuracy alone ties often on small validation sets).

    fit_at(C, start) -> (state, val probabilities (n_val, K), record): start is an earlier state or None.
    Returns the chosen C, one record per C tried, the chosen fit's val probabilities and its state.
    Holds two states and one (n_val, K) array besides the current fit's, whatever the number of C."""
    progress = progress or _Silent()
    progress.phase("C sweep", len(COARSE_C) + 2 * REFINE_HALVINGS, "C")
    tried: dict[float, dict] = {}
    best: tuple | None = None  # (rank key, C, state, val probabilities)

    def evaluate(C: float, start):
        nonlocal best
        state, proba, record = fit_at(C, start)
        top1 = float((proba.argmax(1) == yval).mean())
        loss = float(log_loss(yval, proba, labels=np.arange(n_classes)))
        tried[C] = {**record, "C": C, "val_top1": top1, "val_log_loss": loss}
        if best is None or (top1, -loss, -C) > best[0]:
            best = ((top1, -loss, -C), C, state, proba)
        progress.advance(1, f"C={C:.3g} val top-1 {top1:.3f} (best: C={best[1]:.3g}, {best[0][0]:.3f})")
        return state

    previous = None
    for C in COARSE_C:
        previous = evaluate(float(C), previous)
    step = 1.0
    for _ in range(REFINE_HALVINGS):
        step /= 2
        centre, centre_state = best[1], best[2]
        for C in (centre * 10 ** -step, centre * 10 ** step):
            if COARSE_C[0] <= C <= COARSE_C[-1] and C not in tried:  # stay inside the published range
                evaluate(float(C), centre_state)
            else:
                progress.advance(1)
    return best[1], sorted(tried.values(), key=lambda r: r["C"]), best[3], best[2]


def cv_fit_at(settings: FitSettings, X: np.ndarray, y: np.ndarray, n_classes: int, folds: int) -> FitAt:
    """fit_at for choosing C by stratified k-fold cross-validation on X (n, D): its state is the k
    fold models (each warm-started from its fold's model at the previous C), its "val
    probabilities" the pooled out-of-fold predictions (n, K)."""
    from sklearn.model_selection import StratifiedKFold

    parts = list(StratifiedKFold(folds, shuffle=True, random_state=settings.seed).split(X, y))

    def fit_at(C: float, start):
        models, oof, iterations, converged = [], np.zeros((len(y), n_classes)), 0, True
        for k, (train, held) in enumerate(parts):
            model, record = _fit_lr(settings, C, X[train], y[train], None if start is None else start[k])
            oof[np.ix_(held, model.classes_)] = model.predict_proba(X[held])
            models.append(model)
            iterations, converged = max(iterations, record["iterations"]), converged and record["converged"]
        # A class missing from a fold's training rows has probability 0 there: log-loss needs > 0.
        return models, np.clip(oof, 1e-15, 1), {"iterations": iterations, "converged": converged,
                                                "warm_start": start is not None}

    return fit_at


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


def choose_selection(settings: FitSettings, y_val: np.ndarray, classes: list[str]) -> tuple[str, str]:
    """"validation" or "cv" for choosing C, and why. auto: cross-validation when some class has
    fewer than MIN_VALIDATION_PER_CLASS validation images (a handful of images ranks Cs at random).
    Every class has at least one train and one val image here (make_splits), so k-fold has k >= 2."""
    if settings.C is not None or settings.C_selection == "validation":
        return "validation", ""
    per_class = np.bincount(y_val, minlength=len(classes))
    small = int(per_class.min())
    if settings.C_selection == "auto" and small >= MIN_VALIDATION_PER_CLASS:
        return "validation", ""
    if settings.C_selection == "cv":
        return "cv", "asked for with --C-selection cv"
    return "cv", (f"the validation split has only {small} image{'s' if small != 1 else ''} of class "
                  f"{classes[int(np.argmin(per_class))]!r}, fewer than {MIN_VALIDATION_PER_CLASS}")


def fit(data, out: str | os.PathLike | None = None, *, command: str | None = None,
        progress: FitProgress | None = None, **settings) -> FitResult:
    """Fit the new last layer on cached features by the linear-probe protocol; no network is run.

    data: a cache path, a `Cache`, or arrays `(X, y, classes, split)`: X (N, D), y (N,) int,
    classes (K,) names, split (N,) of "train"/"val"/"test" or None (then a seeded stratified split).
    settings: FitSettings fields (C=None chooses C on validation, class_weight, normalize, pca,
    solver="auto"|"sklearn"|"streamed", device, ...).
    out: a run folder to write (head, metrics, report, plots); None writes nothing.
    progress: a FitProgress (one bar per phase). Under torchrun every rank fits its slice of the
    rows with the streamed solver and rank 0 alone writes `out` and reports progress.

    >>> result = fit("cache/photos.h5")                       # C chosen on the validation split
    >>> result.scores["top1"], result.head.weight.shape       # (K, D) folded Linear weights
    """
    cache = as_cache(data)
    rank0 = os.environ.get("RANK", "0") == "0"
    with _torchrun_session():
        result = fit_head(cache, FitSettings.from_kwargs(**settings), progress if rank0 else None)
    if out is not None and rank0:
        from .report import write_fit_run

        write_fit_run(result, os.fspath(out), command or python_command(cache, result.settings))
    return result


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _torchrun_session():
    """distributed.session() under torchrun; nothing (and no torch import) otherwise."""
    if _world_size() <= 1:
        return contextlib.nullcontext()
    from .distributed import session

    return session()


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


def sklearn_bytes(n_rows: int, dim: int, n_classes: int) -> int:
    """Estimated peak memory of the scikit-learn path beyond the interpreter: its float64 features
    (1.14x their size, measured by benchmarks/fit_memory.py) and lbfgs' (n, K) float64 work arrays."""
    return int(8 * n_rows * (1.14 * dim + 4 * n_classes))


def choose_solver(settings: FitSettings, n_rows: int, dim: int, n_classes: int) -> tuple[str, str]:
    """(solver, reason): `auto` keeps scikit-learn, the reference, wherever it fits comfortably."""
    world = _world_size()
    if world > 1 and settings.solver == "sklearn":
        raise SettingError(f"solver (--solver) sklearn runs in one process; under torchrun ({world} processes) "
                           "use streamed or auto")
    if settings.solver != "auto":
        return settings.solver, "asked for"
    if world > 1:
        return "streamed", f"{world} torchrun processes share the rows"
    if settings.pca is not None:
        return "sklearn", "PCA is fitted in memory"
    import psutil

    need, available = sklearn_bytes(n_rows, dim, n_classes), psutil.virtual_memory().available
    needed = f"{need / 2**30:.1f} GiB" if need >= 2**30 else f"{need / 2**20:.0f} MiB"
    gib = f"{needed} of the {available / 2**30:.1f} GiB available"
    if need <= MEMORY_SHARE * available:
        return "sklearn", f"scikit-learn's float64 features need about {gib}"
    return "streamed", f"scikit-learn would need about {gib}"


@dataclass
class _Fitted:
    """What one solver hands back to fit_head: the pipeline's steps, the final model, the choice of C."""

    steps: list
    final: LogisticRegression
    C: float
    sweep: list[dict]
    val_proba: np.ndarray  # (n_val, K): the train-only model at C (cv: out-of-fold, rows val_rows)
    val_rows: np.ndarray  # (n_val,) cache rows of val_proba: the val split, or train+val for cv
    test_proba: np.ndarray | None  # (n_test, K): the final model
    convergence: dict
    device: str
    selection: str = "validation"  # how C was chosen: "validation" or "cv"
    notes: list[str] = field(default_factory=list)


def fit_head(cache: Cache, settings: FitSettings, progress: FitProgress | None = None) -> FitResult:
    """The whole protocol on one cache, with the solver settings.solver names (or auto picks)."""
    timings, started = {}, time.perf_counter()
    progress = progress or _Silent()
    settings.check(cache.dim)
    splits = run_splits(cache, settings)
    classes, labels = cache.classes, cache.labels
    name, reason = choose_solver(settings, len(splits.train) + len(splits.val) + len(splits.test), cache.dim,
                                 len(classes))
    if settings.solver == "auto" and name == "streamed":
        progress.note(f"solver: streamed ({reason})")
    if name == "streamed" and settings.C is None and settings.C_selection == "cv":
        raise SettingError("C_selection (--C-selection) cv fits in memory: use solver (--solver) sklearn with it")
    fitted = (_fit_streamed if name == "streamed" else _fit_in_memory)(cache, settings, splits, timings, progress)
    # The train-only model at the chosen C on val (or the out-of-fold predictions of cv): what
    # settings are compared on (experiments), and the honest figure left when there is no test split.
    val_scores = scores(fitted.val_proba, labels[fitted.val_rows], classes)
    validation = {"top1": val_scores["top1"], "log_loss": val_scores["log_loss"]}
    notes = [f"splits: {splits.source}", *fitted.notes]
    evaluated_on = "test" if len(splits.test) else "cv" if fitted.selection == "cv" else "val"
    if evaluated_on == "val" and settings.C is not None:
        notes.append("no test split: scores are on the validation split of the model fitted on train; "
                     "the saved model is refit on train+val")
    elif evaluated_on == "val":
        notes.append("no test split: scores are on the validation split that also chose C "
                     "(optimistic); the saved model is refit on train+val")
    elif evaluated_on == "cv":
        notes.append("no test split: scores are the cross-validated predictions that also chose C "
                     "(optimistic); the saved model is refit on train+val")
    if len(splits.test):
        predictions = (splits.test, fitted.test_proba)
        final_scores = scores(fitted.test_proba, labels[splits.test], classes)
    else:
        predictions, final_scores = (fitted.val_rows, fitted.val_proba), val_scores
    C, sweep, steps = fitted.C, fitted.sweep, fitted.steps
    pipeline = Pipeline([(type(s).__name__.lower(), s) for s in steps] + [("logisticregression", fitted.final)])
    head = head_mod.fold(steps + [fitted.final], classes, {"provenance": head_provenance(cache), "C": C,
                                                           "settings": vars(settings)})
    timings["total_s"] = time.perf_counter() - started
    if settings.C is None:
        unconverged = sum(not r["converged"] for r in sweep)
        if unconverged:
            notes.append(f"{unconverged} of {len(sweep)} sweep fits stopped at --max-iter {settings.max_iter}")
    solver_info = {"name": name, "reason": reason, "device": fitted.device, "world_size": _world_size()}
    return FitResult(pipeline, head, C, sweep, splits, evaluated_on, final_scores, fitted.convergence, timings,
                     classes, settings, validation, cache, notes, predictions=predictions, solver=solver_info)


def _fit_in_memory(cache: Cache, settings: FitSettings, splits: Splits, timings: dict,
                   progress: FitProgress) -> _Fitted:
    """scikit-learn's LogisticRegression on one float64 matrix, read once per phase."""
    y_all = cache.labels
    order = np.concatenate([splits.train, splits.val, splits.test])
    n_tr, n_val = len(splits.train), len(splits.val)
    y = y_all[order]
    y_tr, y_val = y[:n_tr], y[n_tr:n_tr + n_val]

    X = np.empty((len(order), cache.dim), dtype=np.float64)  # the one full-size array
    t = time.perf_counter()
    cache.features(order, out=X)
    timings["read_s"] = time.perf_counter() - t

    # 1. Choose C on validation (fitted on train rows only), or by cross-validation on train+val
    #    when the validation split is too small to rank Cs; test rows are never seen here.
    t = time.perf_counter()
    selection, why = choose_selection(settings, y_val, cache.classes)
    if selection == "cv":
        n = n_tr + n_val
        folds = min(CV_FOLDS, int(np.bincount(y[:n], minlength=len(cache.classes)).min()))
        steps = _preprocessing(settings, X[:n], n)  # label-free: fitted on train+val
        Z = _project(steps, X[:n])
        C, sweep, val_proba, chosen = sweep_C(cv_fit_at(settings, Z, y[:n], len(cache.classes), folds), y[:n],
                                              len(cache.classes), progress)
        val_rows = order[:n]
        # Any fold model whose training rows held every class is as good a start for the refit.
        chosen = next((m for m in chosen if len(m.classes_) == len(cache.classes)), None)
        notes = [f"C chosen by stratified {folds}-fold cross-validation on the {n} train+val "
                 f"images ({why}); the test split was not used"]
    else:
        steps = _preprocessing(settings, X[:n_tr + n_val], n_tr)
        Z = _project(steps, X[:n_tr + n_val])

        def fit_at(C: float, start):
            model, record = _fit_lr(settings, C, Z[:n_tr], y_tr, start)
            return model, model.predict_proba(Z[n_tr:]), record

        C, sweep, val_proba, chosen = _choose_C(settings, fit_at, y_val, len(cache.classes), progress)
        val_rows, notes = splits.val, []
    timings["sweep_s"] = time.perf_counter() - t
    sweep_scaler = steps[0] if steps and isinstance(steps[0], StandardScaler) else None
    del Z

    # 2. Refit on train+val with the chosen C, from freshly read features, warm-started from the
    # chosen train-only model (carried over to the new standardization; PCA's axes differ: cold).
    t = time.perf_counter()
    progress.phase("refit on train+val", 1, "fit")
    cache.features(order, out=X)
    steps = _preprocessing(settings, X, n_tr + n_val)
    Z = _project(steps, X)
    start = None if settings.pca is not None or chosen is None else _carry_over(chosen, sweep_scaler, steps)
    final, convergence = _fit_lr(settings, C, Z[:n_tr + n_val], y[:n_tr + n_val], start)
    progress.advance(1)
    timings["refit_s"] = time.perf_counter() - t
    test_proba = final.predict_proba(Z[n_tr + n_val:]) if len(splits.test) else None
    return _Fitted(steps, final, C, sweep, val_proba, val_rows, test_proba, convergence, "cpu", selection, notes)


def _choose_C(settings: FitSettings, fit_at: FitAt, y_val: np.ndarray, n_classes: int, progress: FitProgress):
    """The sweep, or the one fit on train at a given C: (C, sweep, val probabilities, state)."""
    if settings.C is None:
        return sweep_C(fit_at, y_val, n_classes, progress)
    progress.phase("fit on train", 1, "fit")
    state, val_proba, _ = fit_at(settings.C, None)
    progress.advance(1)
    return settings.C, [], val_proba, state


def _carry_over(model: LogisticRegression, old: StandardScaler | None, steps: list) -> LogisticRegression:
    """`model`'s logits expressed for the refit's standardization: its starting point."""
    start = LogisticRegression()
    start.coef_, start.intercept_ = model.coef_, model.intercept_
    new = steps[0] if steps and isinstance(steps[0], StandardScaler) else None
    if old is not None and new is not None:
        start.coef_, start.intercept_ = rescale(model.coef_, model.intercept_, old, new)
    return start


def rescale(coef: np.ndarray, intercept: np.ndarray, old: StandardScaler, new: StandardScaler):
    """The same logits under another standardization: coef (R, D), intercept (R,) fitted on
    (x - m0) / s0, expressed for (x - m1) / s1."""
    return coef * (new.scale_ / old.scale_), intercept + coef @ ((new.mean_ - old.mean_) / old.scale_)


def _fit_streamed(cache: Cache, settings: FitSettings, splits: Splits, timings: dict,
                  progress: FitProgress) -> _Fitted:
    """pipeline.solver's L-BFGS over blocks read from the cache: memory independent of the rows.
    Under torchrun every rank sums its slice of the rows; all ranks get the same result."""
    from . import solver as streamed  # torch: imported only when this solver runs

    device = streamed.resolve_device(settings.device)
    n_classes, dim = len(cache.classes), cache.dim
    class_weight = None if settings.class_weight == "none" else settings.class_weight
    l2 = settings.normalize == "l2"

    def prepare(rows: np.ndarray):
        source = streamed.my_shard(streamed.CacheBlocks(cache, rows))
        scaler = streamed.fit_scaler(source) if settings.normalize == "standard" else None
        moments = (scaler.mean_, scaler.scale_) if scaler is not None else (None, None)
        return scaler, moments, streamed.Objective(source, n_classes, *moments, class_weight, device, l2=l2)

    def rows_as_seen(rows: np.ndarray, moments) -> streamed.Prepared:  # val/test, kept when small
        return streamed.Prepared(streamed.CacheBlocks(cache, rows), *moments, l2, device)

    t = time.perf_counter()
    scaler, moments, objective = prepare(splits.train)
    val = rows_as_seen(splits.val, moments)

    def fit_at(C: float, start):
        s = objective.solve(C, start, TOL, settings.max_iter)
        return s, streamed.predict_proba(val, s.coef, s.intercept), s.record()

    C, sweep, val_proba, chosen = _choose_C(settings, fit_at, cache.labels[splits.val], n_classes, progress)
    timings["sweep_s"] = time.perf_counter() - t
    objective = val = None  # released before the refit reads train+val

    t = time.perf_counter()
    rows = np.concatenate([splits.train, splits.val])
    new_scaler, new_moments, objective = prepare(rows)
    if scaler is not None:
        coef, intercept = rescale(chosen.coef, chosen.intercept, scaler, new_scaler)
        chosen = dataclasses.replace(chosen, coef=coef, intercept=intercept)
    progress.phase("refit on train+val", None, "iteration")
    final = objective.solve(C, chosen, TOL, settings.max_iter, callback=lambda: progress.advance(1))
    timings["refit_s"] = time.perf_counter() - t
    test_proba = (streamed.predict_proba(rows_as_seen(splits.test, new_moments), final.coef, final.intercept)
                  if len(splits.test) else None)
    steps = ([new_scaler] if new_scaler is not None else
             [Normalizer().fit(np.zeros((1, dim)))] if l2 else [])
    model = streamed.as_logistic_regression(final.coef, final.intercept, n_classes, final.iterations, C=C,
                                            max_iter=settings.max_iter, random_state=settings.seed,
                                            class_weight=class_weight)
    convergence = {k: v for k, v in final.record().items() if k != "C"}
    notes = []
    if settings.C is None and settings.C_selection == "auto" and choose_selection(
            settings, cache.labels[splits.val], cache.classes)[0] == "cv":
        notes.append("C chosen on the validation split although it is small: the streamed solver does not "
                     "cross-validate (--solver sklearn does)")
    return _Fitted(steps, model, C, sweep, val_proba, splits.val, test_proba, convergence, device, notes=notes)
