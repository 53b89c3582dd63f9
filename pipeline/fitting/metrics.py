"""The scores of a head's probabilities against true labels, and what they were scored on."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support,
                             top_k_accuracy_score)

from .calibration import ece

EVALUATIONS = ("test", "val", "cv")  # what `scores` of a fit are on: see describe_evaluation


def scores(proba: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    """Top-1, top-5 (5+ classes), balanced accuracy, log-loss, ECE (15 bins), per-class P/R/F1,
    confusion matrix, and how many classes are predicted at all (1: the head collapsed)."""
    labels = np.arange(len(classes))
    predicted = proba.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(y, predicted, labels=labels, zero_division=0)
    out = {
        "n": int(len(y)),
        "top1": float((predicted == y).mean()),
        "top5": float(top_k_accuracy_score(y, proba, k=5, labels=labels)) if len(classes) >= 5 else None,
        "balanced_accuracy": _balanced_accuracy(y, predicted),
        "log_loss": float(log_loss(y, proba, labels=labels)),
        "ece": ece(proba, y),
        "classes_predicted": int(len(np.unique(predicted))),
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


def describe_evaluation(evaluated_on: str, selection: str, held_out: bool = False) -> str:
    """What a fit's scores are on, in words: the test split, or (without one) the predictions that
    also chose C (optimistic), or the validation split of a model fitted on train at a given C.
    selection: how C was chosen ("validation", "cv", or "given"). held_out: the validation split
    was held out from everything (hold_out="val")."""
    if held_out:
        return "held-out validation split (the head saw only train)"
    if evaluated_on == "test":
        return "test split"
    if evaluated_on == "cv":
        return "cross-validated train+val predictions (they also chose C: optimistic)"
    if selection == "given":
        return "validation split (C was given, the model fitted on train)"
    return "validation split (it also chose C: optimistic)"
