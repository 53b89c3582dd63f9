"""Calibrated probabilities: temperature scaling (Guo et al. 2017) and how calibrated a head is.

One scalar T is fitted on held-out predictions (the validation split's, or out-of-fold ones when C
was chosen by cross-validation; never the test split) by minimizing their log-loss; the head's
logits are then divided by T. Dividing the Linear's weight and bias by T keeps it one
`torch.nn.Linear` and leaves every argmax as it was.

ECE (expected calibration error) is Guo et al.'s: the top probability of each prediction in 15
equal-width bins, the gap between each bin's mean top probability and its accuracy, weighted by
the bin's share of the predictions.
"""

from __future__ import annotations

import copy

import numpy as np
from scipy import optimize
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

ECE_BINS = 15
# 1/T is searched in [1/20, 20]: the log-loss is convex in 1/T, so a bounded scalar search finds
# its minimum. When every held-out prediction is right, the log-loss falls without end as T -> 0:
# those predictions cannot say how sharp the probabilities should be, so T stays 1 (and the fit
# says so) rather than shipping probabilities sharpened to the bound.
INVERSE_T_BOUNDS = (0.05, 20.0)


def log_probabilities(proba: np.ndarray) -> np.ndarray:
    """(n, K) probabilities -> logits with the same softmax (log p; 0 clipped to 1e-300)."""
    return np.log(np.clip(proba, 1e-300, None))


def scale(proba: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) of the logits behind `proba` (n, K): the calibrated probabilities."""
    if temperature == 1.0:
        return proba
    z = log_probabilities(proba) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """The T that minimizes the log-loss of scale(proba, T) on labels y (n,), and how it went:
    "fitted"; "bound" (the minimum lies at a bound of the search); or "all right" (every
    prediction is right, T is not determined: 1 is returned)."""
    if (proba.argmax(axis=1) == y).all():
        return 1.0, "all right"
    z = log_probabilities(proba)
    z_true = z[np.arange(len(y)), y]

    def loss(beta: float) -> float:  # mean(logsumexp(beta z) - beta z_y): convex in beta = 1/T
        bz = beta * z
        top = bz.max(axis=1)
        return float(np.mean(top + np.log(np.exp(bz - top[:, None]).sum(axis=1)) - beta * z_true))

    low, high = INVERSE_T_BOUNDS
    found = optimize.minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    beta = float(found.x)
    return 1.0 / beta, "bound" if min(beta - low, high - beta) < 1e-3 * beta else "fitted"


def ece(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top probability, `bins` equal-width bins (Guo et al.)."""
    table = reliability(proba, y, bins)
    n = max(sum(table["count"]), 1)
    return float(sum(c * abs(a - p) for c, a, p in zip(table["count"], table["accuracy"], table["confidence"])) / n)


def reliability(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per non-empty bin of the top probability: its edges, count, mean top probability and accuracy
    (what a reliability diagram draws)."""
    confidence = proba.max(axis=1)
    right = proba.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)  # (lo, hi] per bin, 0 in the first
    table = {"low": [], "high": [], "count": [], "confidence": [], "accuracy": []}
    for b in range(bins):
        members = which == b
        if members.any():
            table["low"].append(float(edges[b]))
            table["high"].append(float(edges[b + 1]))
            table["count"].append(int(members.sum()))
            table["confidence"].append(float(confidence[members].mean()))
            table["accuracy"].append(float(right[members].mean()))
    return table


def summary(proba: np.ndarray, y: np.ndarray, n_classes: int) -> dict:
    """ECE, log-loss and top-1 of predictions (n, K), and their reliability table."""
    return {"ece": ece(proba, y), "log_loss": float(log_loss(y, proba, labels=np.arange(n_classes))),
            "top1": float((proba.argmax(axis=1) == y).mean()), "reliability": reliability(proba, y)}


def scaled_model(model: LogisticRegression, temperature: float) -> LogisticRegression:
    """A copy of a fitted LogisticRegression whose probabilities are the calibrated ones (coef_ and
    intercept_ divided by T): what model.joblib holds and export's parity checks compare against."""
    if temperature == 1.0:
        return model
    scaled = copy.deepcopy(model)
    scaled.coef_, scaled.intercept_ = model.coef_ / temperature, model.intercept_ / temperature
    return scaled
