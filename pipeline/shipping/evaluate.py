"""Scoring a shipped model on new labelled photos: any model file (model.pt, model.onnx, model.pt2)
over a class-folder tree or a manifest, with the scores `fit` reports.

The images are listed as extraction lists them (`images.scan_image_folder`,
`extraction.manifest.read_manifest`), run through the model by `predict.predict` (the same
decoding and batching as `transfer predict`), and scored by `fitting.metrics.scores`. Nothing is
written here (`pipeline.runs.evaluate` writes the folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputFileError, SettingError
from ..extraction.manifest import MANIFEST_SUFFIXES, read_manifest
from ..files import display_path
from ..fitting.calibration import summary
from ..fitting.metrics import scores as score
from ..images import SPLIT_NAMES, scan_image_folder
from .predict import Model, failures, load_model, model_failed, predict


@dataclass
class Evaluation:
    """A model scored on labelled images. paths (n,) the image files scored, y (n,) their true
    classes (indices into `classes`, the model's), proba (n, K) float64 the model's probabilities;
    scores: fitting.metrics.scores (+ ECE); reliability: its 15-bin table; failed: (path, reason)
    of the images that could not be read (not scored)."""

    model_path: str
    model_format: str
    data: str
    split: str | None
    classes: list[str]
    paths: list[str]
    y: np.ndarray
    proba: np.ndarray
    scores: dict
    reliability: dict
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    out: str | None = None  # the folder written, if any
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """What the scores are on, in words."""
        which = f" (split {self.split})" if self.split else ""
        return f"{len(self.paths)} labelled images of {display_path(self.data)}{which}"

    def lines(self) -> list[str]:
        s = self.scores
        top5 = f"  top-5 {s['top5']:.4f}" if s["top5"] is not None else ""
        rows = [("model", f"{display_path(self.model_path)} ({self.model_format})"),
                ("scored on", self.describe()),
                ("scores", f"top-1 {s['top1']:.4f}{top5}  balanced {s['balanced_accuracy']:.4f}  "
                           f"log-loss {s['log_loss']:.4f}  ECE {s['ece']:.4f}")]
        worst = sorted(s["per_class"].items(), key=lambda item: item[1]["recall"])[:3]
        rows.append(("lowest recall", ", ".join(f"{display_path(c)} {v['recall']:.3f} (of {v['support']})"
                                                for c, v in worst if v["support"])))
        if self.failed:
            rows.append(("unreadable", f"{len(self.failed)} images not scored (e.g. {display_path(self.failed[0][0])}: "
                                       f"{self.failed[0][1]})"))
        if self.out:
            rows.append(("written", f"{display_path(self.out)}/ (metrics.json, predictions.csv, report.html, "
                                    "confusion_matrix.png, reliability.png)"))
        width = max(len(k) for k, _ in rows)
        return [f"{key:<{width}}  {value}" for key, value in rows] + [f"note: {n}" for n in self.notes]


def list_labelled(data: str, split: str | None = None):
    """The labelled images of a class-folder tree (optionally with split folders) or a .csv/.jsonl
    manifest: (absolute paths, class names per image, failures known from the listing, notes)."""
    data = os.fspath(data)
    if os.path.isfile(data) and data.lower().endswith(MANIFEST_SUFFIXES):
        listing = read_manifest(data)
    elif os.path.isdir(data):
        listing = scan_image_folder(data)
    else:
        raise InputFileError(f"{display_path(data)} is neither a folder of class folders nor a .csv/.jsonl manifest"
                             if os.path.exists(data) else f"{display_path(data)} does not exist")
    keep = np.ones(len(listing.paths), dtype=bool)
    if split is not None:
        if split not in SPLIT_NAMES:
            raise SettingError(f"split (--split) must be one of {', '.join(SPLIT_NAMES)}; got {split!r}")
        if listing.splits is None:
            raise InputFileError(f"{display_path(data)} has no split folders (or split column); drop --split")
        keep = np.array([s == split for s in listing.splits])
        if not keep.any():
            raise InputFileError(f"{display_path(data)} has no {split} images")
    paths = [os.path.join(listing.root, p) for p, k in zip(listing.paths, keep) if k]
    names = [listing.classes[c] for c, k in zip(listing.labels, keep) if k]
    where = {i: j for j, i in enumerate(np.flatnonzero(keep))}
    failed = [(paths[where[i]], why) for i, why in listing.failures.items() if i in where]
    return paths, names, failed, list(listing.notes)


def evaluate(model, data, *, split: str | None = None, batch_size: int | None = None, device: str = "auto",
             progress="auto") -> Evaluation:
    """Run a model over labelled images and score it: top-1, top-5, balanced accuracy, log-loss,
    ECE (15 bins), per-class precision/recall/F1, the confusion matrix.

    model: a loaded Model or a model file (model.pt, model.onnx, model.pt2). data: a folder with one
    subfolder per class (or train/val/test folders of them: `split` picks one), or a .csv/.jsonl
    manifest (path,label[,split]). Classes in data that the model does not know are an error
    naming them; images that cannot be read are left out and listed. progress: see pipeline.progress.

    >>> evaluate("models/photos/model.pt", "new_photos/").scores["top1"]
    """
    paths, names, failed, notes = list_labelled(data, split)
    if not isinstance(model, Model):
        model = load_model(model, device)
    index = {c: i for i, c in enumerate(model.classes)}
    unknown = sorted({n for n in names if n not in index}, key=os.fsencode)
    if unknown:
        counts = ", ".join(f"{display_path(c)!r} ({names.count(c)} images)" for c in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InputFileError(f"{display_path(data)} has classes the model does not know: {counts}{more}; the model "
                             f"knows {', '.join(display_path(c) for c in model.classes)}")
    missing = [c for c in model.classes if c not in set(names)]
    if missing:
        notes.append(f"{len(missing)} of the model's classes have no images here: "
                     f"{', '.join(display_path(c) for c in missing[:5])}{' ...' if len(missing) > 5 else ''}")
    failed_paths = {p for p, _ in failed}
    todo = [i for i, p in enumerate(paths) if p not in failed_paths]
    if not todo:
        raise InputFileError(f"none of the {len(paths)} images listed in {display_path(data)} can be read")
    results = predict(model, [paths[i] for i in todo], top_k=len(model.classes), batch_size=batch_size,
                      progress=progress)
    kept, rows = [], []
    for i, r in zip(todo, results):
        if r.error is not None:
            failed.append((paths[i], r.error))
            continue
        p = np.zeros(len(model.classes))
        p[[index[label] for label in r.labels]] = r.probabilities
        kept.append(i)
        rows.append(p)
    if not kept:
        path, error = ([(p, e) for p, e in failed if model_failed(e)] or failed)[0]
        raise InputFileError(f"none of the {len(paths)} images in {display_path(data)} could be scored "
                             f"({failures([e for _, e in failed])}); e.g. {display_path(path)}: {error}")
    proba = np.array(rows)
    proba /= proba.sum(axis=1, keepdims=True)  # float32 softmax sums to 1 +- 1e-7; log-loss wants exactly 1
    y = np.array([index[names[i]] for i in kept])
    scores = score(proba, y, model.classes)
    return Evaluation(model.path, model.format, os.fspath(data), split, list(model.classes), [paths[i] for i in kept],
                      y, proba, scores, summary(proba, y, len(model.classes))["reliability"], failed, notes)
