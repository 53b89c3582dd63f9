"""Using a shipped model.pt: load it, run it over image files and folders, report the top-k.

The model carries its own preprocessing and classes; here we only decode files (with the same
decoder as extraction) and batch them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from numbers import Integral

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import InputFileError, SettingError
from ..files import csv_row, display_path, make_folder_for, not_a_file, write_atomically
from ..images import DecodeError, decode_image, is_image_name, walk_files
from ..progress import resolve
from ..settings import Interval, validate
from . import formats
from .formats import MODEL_FORMAT, Runner, image_tensor

TOP_K = [None, Interval(Integral, 1, None)]
BATCH_SIZE = [Interval(Integral, 1, None)]


@dataclass
class Prediction:
    path: str
    labels: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Model:
    """A loaded model.pt, model.pt2 or model.onnx: `runner` (formats.Runner) on `device`, its
    `classes` (K names, the order of its outputs) and `metadata` (backbone, weights, preprocessing, ...)."""

    path: str
    runner: Runner
    classes: list[str]
    metadata: dict
    device: torch.device

    @property
    def format(self) -> str:
        return self.runner.format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB images (N, 3, H, W) -> probabilities (N, K) float32, on the CPU."""
        return torch.from_numpy(self.runner.images(images))


def load_model(path: str | os.PathLike, device: str | torch.device = "auto") -> Model:
    """Load a model written by `export`, after checking it is one: the format by the suffix
    (.onnx: onnxruntime, .pt2: torch.export, anything else: TorchScript)."""
    path = os.fspath(path)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    why = not_a_file(path)
    if why:  # "is a FIFO, not a regular file" as well as "does not exist"
        raise InputFileError(f"model file {display_path(path)} {why}")
    runner, meta = formats.load(path, device)
    if meta.get("format") != MODEL_FORMAT:
        raise InputFileError(f"{path} is {formats.DESCRIPTIONS[runner.format]} but not one written by `transfer export` "
                             "(no transfer.json inside)")
    return Model(path, runner, list(meta["classes"]), meta, device)


def list_inputs(paths: list[str]) -> list[str]:
    """Files as given, folders expanded to their image files (the extraction's walker and order)."""
    found = []
    for p in paths:
        if os.path.isdir(p):
            found += [os.path.join(p, f) for f in walk_files(p) if is_image_name(f)]
        elif os.path.lexists(p):
            found.append(p)
        else:
            raise InputFileError(f"{p} does not exist")
    if not found:
        raise InputFileError(f"no image files found in {', '.join(paths)}")
    return found


def predict(model, paths, *, top_k: int | None = None, batch_size: int = 16, out: str | os.PathLike | None = None,
            device: str = "auto", progress="auto") -> list[Prediction]:
    """Classify image files (folders: every image inside) with a model, in batches.

    model: a loaded Model, or a model file (model.pt, model.onnx, model.pt2) loaded on `device`.
    Returns one Prediction per file, in order: its top_k labels (default min(3, K)) and their
    probabilities, or the reason it could not be read. out: also write them to this .csv or .json
    file (its name is checked before any image is read). progress: True, False, "auto" (bars when
    interactive) or a progress.Progress (see pipeline.progress).

    >>> predict("models/photos/model.pt", ["new_photos/"])[0].labels
    """
    validate("top_k", top_k, TOP_K, "--top-k")
    validate("batch_size", batch_size, BATCH_SIZE, "--batch-size")
    if out is not None:
        out = os.fspath(out)
        check_output_name(out)
    if not isinstance(model, Model):
        model = load_model(model, device)
    classes = model.classes
    if top_k is None:
        top_k = min(3, len(classes))
    if top_k > len(classes):
        raise SettingError(f"top_k (--top-k) {top_k} is more than the model's {len(classes)} classes")
    files = list_inputs([os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths])
    progress = resolve(progress)
    progress.phase("predict", len(files), "img")
    results = [Prediction(p) for p in files]
    waiting: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not waiting:
            return
        probs = model.runner.run([prepared for _, prepared in waiting])
        for (i, _), p in zip(waiting, probs):
            top = np.argsort(-p, kind="stable")[:top_k]
            results[i].labels = [classes[j] for j in top]
            results[i].probabilities = [float(p[j]) for j in top]
        progress.advance(len(waiting))
        waiting.clear()

    try:
        for i, path in enumerate(files):
            try:
                image = decode_image(path)
            except DecodeError as e:
                results[i].error = e.reason
                progress.advance(1)
                continue
            waiting.append((i, model.runner.prepare(image_tensor(image))))
            if len(waiting) == batch_size:
                flush()
        flush()
    finally:
        progress.close()
    if out is not None:
        write_predictions(results, out)
    return results


def check_output_name(out: str) -> None:
    """A .csv or .json name in a folder that exists (created if need be) and can be written:
    checked before any image is read, so no work is lost to a bad destination."""
    if not out.lower().endswith((".csv", ".json")):
        raise SettingError(f"--out {out}: expected a .csv or .json file name")
    make_folder_for(out)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.access(folder, os.W_OK):
        raise InputFileError(f"cannot write {display_path(out)}: the folder {display_path(folder)} is not writable; "
                             "choose another --out")


def write_predictions(results: list[Prediction], out: str) -> None:
    """CSV (path, label_1, prob_1, ..., error) or JSON, by the file's extension. CSV text cells that
    a spreadsheet would take for a formula get a leading ' (files.csv_cell)."""
    check_output_name(out)
    top_k = max((len(r.labels) for r in results), default=0)
    if out.lower().endswith(".json"):
        doc = [{"path": display_path(r.path), "predictions": [{"label": display_path(l), "probability": p}
                                                                for l, p in zip(r.labels, r.probabilities)],
                "error": r.error} for r in results]
        write_atomically(lambda p: _write_text(p, json.dumps(doc, indent=2)), out)
        return
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path"] + [h for k in range(1, top_k + 1) for h in (f"label_{k}", f"prob_{k}")] + ["error"])
    for r in results:  # text cells through csv_row: a name such as =cmd|' -C calc'!A0 is not a formula
        cells = [v for l, p in zip(r.labels, r.probabilities) for v in (l, f"{p:.6f}")]
        cells += [""] * (2 * top_k - len(cells))
        writer.writerow(csv_row([r.path] + cells + [r.error or ""]))
    write_atomically(lambda p: _write_text(p, text.getvalue()), out)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", newline="") as f:
        f.write(text)
