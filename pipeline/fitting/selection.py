"""Choosing C, the same way for every solver: a coarse-to-fine sweep ranked on held-out
predictions (the validation split, or out-of-fold predictions of k-fold cross-validation), and
what a solver hands back (Fitted).

The protocol is Kornblith et al. (2019) and CLIP's (Radford et al. 2021, App. A.3): decades of C
from 1e-6 to 1e5, then halving the step around the best until 8 steps per decade, ranked on
validation top-1 (`select="logloss"` ranks on validation log-loss instead). Test labels never
reach the choice: a sweep only ever sees train and val rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from ..files import quoted
from ..progress import Progress, resolve
from .settings import FitSettings

COARSE_C = 10.0 ** np.arange(-6, 6)  # 1e-6 .. 1e5, Kornblith et al.'s range, one per decade
REFINE_HALVINGS = 3  # 1 -> 1/2 -> 1/4 -> 1/8 decade, CLIP's resolution
# Below this many validation images in some class, C is chosen by cross-validation on train+val
# (C_selection="auto"): measured in benchmarks/small_validation.py, see docs/benchmarks.md.
MIN_VALIDATION_PER_CLASS = 20
CV_FOLDS = 5
SELECTIONS = ("validation", "cv", "given")  # how a fit's C was chosen (FitResult.selection)


FitAt = Callable[[float, object], tuple[object, np.ndarray, dict]]


def rank_key(select: str, top1: float, loss: float, C: float) -> tuple:
    """What a sweep maximizes: top1: val top-1, ties broken by lower log-loss (the published
    protocol); logloss: lower val log-loss, ties broken by top-1. Then the smaller C."""
    return (top1, -loss, -C) if select == "top1" else (-loss, top1, -C)


def sweep_C(fit_at: FitAt, yval: np.ndarray, n_classes: int, progress: Progress | None = None,
            select: str = "top1") -> tuple[float, list[dict], np.ndarray, object]:
    """Coarse decades walked upward, each fit warm-started from the one before (scikit-learn's
    `_logistic_regression_path` and liblinear's C search do the same); then halve the step around
    the best, each neighbour warm-started from the best. Ranked by `rank_key(select, ...)`: val
    top-1 with ties broken by lower val log-loss (accuracy alone ties often on small validation
    sets), or val log-loss.

    fit_at(C, start) -> (state, val probabilities (n_val, K), record): start is an earlier state or None.
    Returns the chosen C, one record per C tried, the chosen fit's val probabilities and its state.
    Holds two states and one (n_val, K) array besides the current fit's, whatever the number of C."""
    progress = resolve(progress)
    progress.phase("C sweep", len(COARSE_C) + 2 * REFINE_HALVINGS, "C")
    tried: dict[float, dict] = {}
    best: tuple | None = None  # (rank key, C, state, val probabilities)
    shown = "val top-1" if select == "top1" else "val log-loss"

    def evaluate(C: float, start):
        nonlocal best
        state, proba, record = fit_at(C, start)
        predicted = proba.argmax(1)
        top1 = float((predicted == yval).mean())
        loss = float(log_loss(yval, proba, labels=np.arange(n_classes)))
        tried[C] = {**record, "C": C, "val_top1": top1, "val_log_loss": loss,
                    "classes_predicted": int(len(np.unique(predicted)))}
        key = rank_key(select, top1, loss, C)
        if best is None or key > best[0]:
            best = (key, C, state, proba)
        value = tried[best[1]]["val_top1" if select == "top1" else "val_log_loss"]
        progress.advance(1, f"C={C:.3g} {shown} {top1 if select == 'top1' else loss:.3f} "
                            f"(best: C={best[1]:.3g}, {value:.3f})")
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


def other_choice(sweep: list[dict], select: str) -> dict | None:
    """The C the other ranking rule would choose among the Cs this sweep tried (the refinement
    halvings were made around the rule in use, so this is the other rule's best of those Cs).
    Returns {"select", "C", "val_top1", "val_log_loss"}, or None without a sweep."""
    if not sweep:
        return None
    other = "logloss" if select == "top1" else "top1"
    r = max(sweep, key=lambda r: rank_key(other, r["val_top1"], r["val_log_loss"], r["C"]))
    return {"select": other, "C": r["C"], "val_top1": r["val_top1"], "val_log_loss": r["val_log_loss"]}


def choose_selection(settings: FitSettings, y_val: np.ndarray, classes: list[str]) -> tuple[str, str]:
    """"validation" or "cv" for choosing C, and why. auto: cross-validation when some class has
    fewer than MIN_VALIDATION_PER_CLASS validation images (a handful of images ranks Cs at random).
    Every class has at least one train and one val image here (make_splits), so k-fold has k >= 2.
    hold_out="val": always cross-validation on the train rows (the validation split scores the head),
    also at a given C, whose out-of-fold predictions then fit the temperature."""
    if settings.hold_out == "val":
        return "cv", "the validation split is held out: it scores the head"
    if settings.C is not None or settings.C_selection == "validation":
        return "validation", ""
    per_class = np.bincount(y_val, minlength=len(classes))
    small = int(per_class.min())
    if settings.C_selection == "auto" and small >= MIN_VALIDATION_PER_CLASS:
        return "validation", ""
    if settings.C_selection == "cv":
        return "cv", "asked for with --C-selection cv"
    return "cv", (f"the validation split has only {small} image{'s' if small != 1 else ''} of class "
                  f"{quoted(classes[int(np.argmin(per_class))])}, fewer than {MIN_VALIDATION_PER_CLASS}")


def choose_C(settings: FitSettings, fit_at: FitAt, y_val: np.ndarray, n_classes: int, progress: Progress):
    """The sweep, or the one fit on train at a given C: (C, sweep, val probabilities, state)."""
    if settings.C is None:
        return sweep_C(fit_at, y_val, n_classes, progress, settings.select)
    progress.phase("fit on train", 1, "fit")
    state, val_proba, _ = fit_at(settings.C, None)
    progress.advance(1)
    return settings.C, [], val_proba, state


@dataclass
class Fitted:
    """What one solver hands back to `probe.fit_head`: the pipeline's steps, the final model, the choice of C."""

    steps: list
    final: LogisticRegression
    C: float
    sweep: list[dict]
    val_proba: np.ndarray  # (n_val, K): the train-only model at C (cv: out-of-fold, rows val_rows)
    val_rows: np.ndarray  # (n_val,) cache rows of val_proba: the val split, or train+val for cv
    test_proba: np.ndarray | None  # (n_test, K): the final model
    convergence: dict
    device: str
    selection: str = "validation"  # how C was chosen when not given: "validation" or "cv"
    notes: list[str] = field(default_factory=list)
