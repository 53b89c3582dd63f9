"""The streamed solver on a cache: `solver`'s full-batch L-BFGS over row blocks, with the same
protocol as the in-memory one (the same sweep, the same warm starts, the same refit).

Memory does not grow with the rows; under torchrun each rank reads its slice; on a GPU the
blocks are kept on the device when they fit.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from sklearn.preprocessing import Normalizer

from ..cache import Cache
from ..devices import resolve_device
from ..progress import Progress
from . import solver as streamed
from .in_memory import rescale
from .selection import Fitted, choose_C, choose_selection
from .settings import FitSettings
from .splits import Splits

TOL = 1e-4  # LogisticRegression's default gradient tolerance, as the in-memory solver uses it
# The final refit (the model that ships) stops at a gradient this much smaller than TOL: float32
# sums take other L-BFGS steps than scikit-learn's float64 ones, so at the same tolerance either can
# stop further from the optimum; a tenth of it keeps the streamed head at least as close as
# scikit-learn's (tests/test_fitting_solver.py), for a few more iterations of one warm-started fit.
FINAL_TOL = TOL / 10


def fit_streamed(cache: Cache, settings: FitSettings, splits: Splits, timings: dict, progress: Progress) -> Fitted:
    """solver's L-BFGS over blocks read from the cache: memory independent of the rows.
    Under torchrun every rank sums its slice of the rows; all ranks get the same result."""
    device = str(resolve_device(settings.device))
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

    C, sweep, val_proba, chosen = choose_C(settings, fit_at, cache.labels[splits.val], n_classes, progress)
    timings["sweep_s"] = time.perf_counter() - t
    objective = val = None  # released before the refit reads train+val

    t = time.perf_counter()
    rows = np.concatenate([splits.train, splits.val])
    new_scaler, new_moments, objective = prepare(rows)
    if scaler is not None:
        coef, intercept = rescale(chosen.coef, chosen.intercept, scaler, new_scaler)
        chosen = dataclasses.replace(chosen, coef=coef, intercept=intercept)
    progress.phase("refit on train+val", None, "iteration")
    final = objective.solve(C, chosen, FINAL_TOL, settings.max_iter, callback=lambda: progress.advance(1))
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
    return Fitted(steps, model, C, sweep, val_proba, splits.val, test_proba, convergence, device, notes=notes)
