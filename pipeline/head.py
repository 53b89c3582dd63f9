"""The new last layer as plain arrays: what fit produces and export turns into a torch Linear.

A fitted scikit-learn pipeline (normalization, optional PCA, LogisticRegression) is folded into
one affine map, `logits = W @ f(x) + b`, where f is the identity or, for `--normalize l2`, the
division of x by its L2 norm. A calibration temperature T is folded in too (W/T, b/T: the same
argmax, calibrated probabilities). Stored as head.npz (arrays) + head.json (names and provenance),
so later stages load it without unpickling anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from .errors import InputFileError, TransferError

HEAD_FORMAT = "transfer.head"


@dataclass
class LinearHead:
    """weight: (K, D) float64, bias: (K,) float64; classes: K names in output order.

    arrays: the unfolded scikit-learn arrays it came from (coef, intercept, scaler_mean/scale,
    pca_components/mean), saved beside it so the pipeline can be rebuilt without unpickling."""

    weight: np.ndarray
    bias: np.ndarray
    l2_normalize: bool
    classes: list[str]
    meta: dict  # settings, the cache's provenance, and the raw sklearn arrays' description
    arrays: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, K), in float64."""
        x = np.asarray(features, dtype=np.float64)
        if self.l2_normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # sklearn's Normalizer rule
        return x @ self.weight.T + self.bias

    def proba(self, features: np.ndarray) -> np.ndarray:
        z = self.logits(features)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def fold(steps: list, classes: list[str], meta: dict, temperature: float = 1.0) -> LinearHead:
    """Fold fitted (normalizer?, pca?, LogisticRegression) steps, and the temperature T that divides
    the logits, into one LinearHead. head.npz keeps the unscaled coef/intercept and T beside them."""
    *prep, lr = steps
    if any(isinstance(step, Normalizer) for step in prep[1:]):
        raise TransferError("an L2 Normalizer can only be the first step of a head")
    if not isinstance(lr, LogisticRegression):
        raise TransferError(f"expected the pipeline to end in LogisticRegression, found {type(lr).__name__}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise TransferError(f"a calibration temperature must be a positive number, got {temperature}")
    coef, intercept = lr.coef_.astype(np.float64), lr.intercept_.astype(np.float64)
    raw = {"coef": coef, "intercept": intercept, "temperature": np.array(float(temperature))}
    coef, intercept = coef / temperature, intercept / temperature
    if len(classes) == 2 and coef.shape[0] == 1:
        # sklearn keeps one row for two classes; logits [0, d] give softmax = [1 - sigmoid(d), sigmoid(d)].
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    # Compose the affine steps backwards: logits = coef @ (A x + c) + intercept.
    weight, bias, l2 = coef, intercept, False
    for step in reversed(prep):
        if isinstance(step, PCA):
            raw.update(pca_components=step.components_, pca_mean=step.mean_)
            bias = bias - weight @ step.components_ @ step.mean_
            weight = weight @ step.components_
        elif isinstance(step, StandardScaler):
            raw.update(scaler_mean=step.mean_, scaler_scale=step.scale_)
            weight = weight / step.scale_
            bias = bias - weight @ step.mean_
        elif isinstance(step, Normalizer):
            l2 = True
        else:
            raise TransferError(f"cannot fold a {type(step).__name__} step into a linear head")
    return LinearHead(weight, bias, l2, list(classes), meta, raw)


def save(head: LinearHead, run_dir: str) -> None:
    """head.npz (weight, bias and the unfolded arrays) + head.json (classes, settings, provenance)."""
    np.savez(os.path.join(run_dir, "head.npz"), weight=head.weight, bias=head.bias, **head.arrays)
    doc = {
        **head.meta,
        "format": HEAD_FORMAT,
        "classes": head.classes,
        "l2_normalize": head.l2_normalize,
        "dim": head.dim,
        "arrays": {k: list(np.shape(v)) for k, v in {"weight": head.weight, "bias": head.bias,
                                                       **head.arrays}.items()},
    }
    with open(os.path.join(run_dir, "head.json"), "w") as f:
        json.dump(doc, f, indent=2)


def load(run_dir: str) -> LinearHead:
    """Read head.npz + head.json of a fit run (no pickle is involved), checking that they agree."""
    npz, doc_path = os.path.join(run_dir, "head.npz"), os.path.join(run_dir, "head.json")
    if not os.path.isdir(run_dir):
        raise InputFileError(f"{run_dir} is not a folder; expected a fit run folder written by `transfer fit`")
    if not (os.path.exists(npz) and os.path.exists(doc_path)):
        raise InputFileError(f"{run_dir} is not a fit run: head.npz and head.json are missing "
                             "(expected a folder written by `transfer fit`)")
    try:
        with open(doc_path) as f:
            doc = json.load(f)
        with np.load(npz, allow_pickle=False) as npz_file:
            arrays = {k: npz_file[k] for k in npz_file.files}
    except (OSError, ValueError) as e:
        raise InputFileError(f"cannot read the head in {run_dir}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != HEAD_FORMAT:
        raise InputFileError(f"{doc_path} is not a transfer head (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    weight, bias = arrays.pop("weight", None), arrays.pop("bias", None)
    classes = doc.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise InputFileError(f"{doc_path}: 'classes' must be a list of at least two names; found {str(classes)[:60]!r}")
    k, dim = len(classes), doc.get("dim")
    if weight is None or bias is None or weight.shape != (k, dim) or bias.shape != (k,):
        found = "missing" if weight is None or bias is None else f"weight {weight.shape}, bias {bias.shape}"
        raise InputFileError(f"{run_dir}: head.npz does not match head.json ({k} classes, dim {dim}): "
                             f"expected weight ({k}, {dim}) and bias ({k},), found {found}")
    coef = arrays.get("coef")
    if coef is None or coef.shape[0] not in ((1, k) if k == 2 else (k,)):
        raise InputFileError(f"{run_dir}: head.npz's coef {None if coef is None else coef.shape} does not fit "
                             f"{k} classes")
    temperature = arrays.get("temperature", np.array(1.0))  # heads written before calibration: none
    if temperature.shape != () or temperature.dtype.kind != "f" or not (np.isfinite(temperature) and temperature > 0):
        raise InputFileError(f"{run_dir}: head.npz's temperature must be one positive number; found "
                             f"{str(temperature.tolist())[:40]}")
    return LinearHead(weight, bias, bool(doc.get("l2_normalize")), list(classes), doc, arrays)


def sklearn_from_arrays(head: LinearHead):
    """The fitted scikit-learn pipeline rebuilt from the head's unfolded arrays (head.npz), without
    unpickling model.joblib; scikit-learn's own predict_proba then checks the folded head independently."""
    raw = head.arrays
    dim = head.dim
    steps = []
    if head.l2_normalize:
        normalizer = Normalizer()
        normalizer.n_features_in_ = dim
        steps.append(normalizer)
    if "scaler_mean" in raw:
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_, scaler.var_ = raw["scaler_mean"], raw["scaler_scale"], raw["scaler_scale"] ** 2
        scaler.n_features_in_ = dim
        steps.append(scaler)
    width = dim
    if "pca_components" in raw:
        pca = PCA(n_components=raw["pca_components"].shape[0])
        pca.components_, pca.mean_ = raw["pca_components"], raw["pca_mean"]
        pca.n_components_, pca.n_features_in_ = pca.components_.shape[0], dim
        steps.append(pca)
        width = pca.n_components_
    lr = LogisticRegression()
    temperature = float(raw.get("temperature", 1.0))  # calibration: the logits divided by T
    lr.coef_, lr.intercept_ = raw["coef"] / temperature, raw["intercept"] / temperature
    lr.classes_, lr.n_features_in_ = np.arange(len(head.classes)), width
    steps.append(lr)
    return Pipeline([(type(s).__name__.lower(), s) for s in steps])
