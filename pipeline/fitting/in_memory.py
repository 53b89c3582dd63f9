"""The in-memory solver: scikit-learn's LogisticRegression (lbfgs) on one float64 matrix.

The features are read once per phase straight into that matrix and normalized in place (no
full-size copy); every fit of a sweep is warm-started from the previous one (scikit-learn's own
`warm_start`), cross-validation folds each from their own fold's model at the previous C.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import Normalizer, StandardScaler

from ..cache import Cache
from ..errors import TransferError
from ..progress import Progress
from .selection import CV_FOLDS, FitAt, Fitted, choose_C, choose_selection
from .settings import FitSettings
from .splits import Splits

SCALER_ROWS = 4096  # rows per block when computing the scaler, to avoid a full-size temporary


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


def cv_fit_at(settings: FitSettings, X: np.ndarray, y: np.ndarray, n_classes: int, folds: int) -> FitAt:
    """fit_at for choosing C by stratified k-fold cross-validation on X (n, D): its state is the k
    fold models (each warm-started from its fold's model at the previous C), its "val
    probabilities" the pooled out-of-fold predictions (n, K)."""
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


def fit_in_memory(cache: Cache, settings: FitSettings, splits: Splits, timings: dict, progress: Progress) -> Fitted:
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
        if folds < 2:  # only with hold_out="val": make_splits gives every class a train and a val image
            small = int(np.argmin(np.bincount(y[:n], minlength=len(cache.classes))))
            raise TransferError(f"class {cache.classes[small]!r} has one training image: cross-validation on the "
                                "train rows (hold_out val) needs at least 2 per class; use a larger train fraction")
        steps = _preprocessing(settings, X[:n], n)  # label-free: fitted on train+val
        Z = _project(steps, X[:n])
        C, sweep, val_proba, chosen = choose_C(settings, cv_fit_at(settings, Z, y[:n], len(cache.classes), folds),
                                               y[:n], len(cache.classes), progress)
        val_rows = order[:n]
        # Any fold model whose training rows held every class is as good a start for the refit.
        chosen = next((m for m in chosen if len(m.classes_) == len(cache.classes)), None)
        rows = "train" if settings.hold_out == "val" else "train+val"
        notes = [(f"C chosen by stratified {folds}-fold cross-validation on the {n} {rows} images ({why})"
                  if settings.C is None else f"the held-out predictions (for the temperature and the validation "
                                             f"score) are stratified {folds}-fold cross-validation on the {n} {rows} "
                                             f"images ({why})") +
                 ("; the held-out validation split was not used" if settings.hold_out == "val" else
                  "; the test split was not used")]
    else:
        steps = _preprocessing(settings, X[:n_tr + n_val], n_tr)
        Z = _project(steps, X[:n_tr + n_val])

        def fit_at(C: float, start):
            model, record = _fit_lr(settings, C, Z[:n_tr], y_tr, start)
            return model, model.predict_proba(Z[n_tr:]), record

        C, sweep, val_proba, chosen = choose_C(settings, fit_at, y_val, len(cache.classes), progress)
        val_rows, notes = splits.val, []
    timings["sweep_s"] = time.perf_counter() - t
    sweep_scaler = steps[0] if steps and isinstance(steps[0], StandardScaler) else None
    del Z

    # 2. Refit on train+val with the chosen C, from freshly read features, warm-started from the
    # chosen train-only model (carried over to the new standardization; PCA's axes differ: cold).
    t = time.perf_counter()
    progress.phase(f"refit on {'train+val' if n_val else 'train'}", 1, "fit")  # train alone: --hold-out val
    cache.features(order, out=X)
    steps = _preprocessing(settings, X, n_tr + n_val)
    Z = _project(steps, X)
    start = None if settings.pca is not None or chosen is None else _carry_over(chosen, sweep_scaler, steps)
    final, convergence = _fit_lr(settings, C, Z[:n_tr + n_val], y[:n_tr + n_val], start)
    progress.advance(1)
    timings["refit_s"] = time.perf_counter() - t
    test_proba = final.predict_proba(Z[n_tr + n_val:]) if len(splits.test) else None
    return Fitted(steps, final, C, sweep, val_proba, val_rows, test_proba, convergence, "cpu", selection, notes)


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
