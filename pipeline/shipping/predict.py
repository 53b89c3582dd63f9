"""Using a shipped model: load it, run it over image files and folders, report the top-k.

The model carries its own preprocessing and classes; here we only decode files (with the same
decoder as extraction) and batch them, as extraction does: a thread decodes each file and crops it
with the file's own preprocessing (model.pt, model.pt2) while the network runs the previous batch,
so images of any sizes share a batch; model.onnx takes whole images of one size per batch (images
wait, grouped by size, within a memory budget). One image that cannot be decoded, preprocessed or
run is that image's error, never the run's.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from numbers import Integral

import numpy as np
import torch

from ..devices import machine_key, remembered_batch, resolve_device
from ..errors import InputFileError, SettingError
from ..files import csv_row, display_path, make_folder_for, not_a_file, write_atomically
from ..images import DecodeError, decode_image, is_image_name, short_reason, walk_files
from ..progress import resolve
from ..settings import Interval, validate
from . import formats
from .formats import MODEL_FORMAT, Runner, image_tensor

TOP_K = [None, Interval(Integral, 1, None)]
BATCH_SIZE = [None, Interval(Integral, 1, None)]
DEFAULT_BATCH = 16  # where extraction has not probed this backbone on this machine
# Decoded images held at once (waiting for a batch, or in it): a batch of whole images of one size stays
# within this whatever --batch-size says, so eight 12 MP photos do not all enter model.onnx together.
BATCH_BYTES = 256 * 2**20
PREPARE_THREADS = 1  # intra-op threads of the cropping thread (extraction's Pillow resize is single-threaded too)

MODEL_FAILED = "the model failed on this image"  # how a Prediction.error the model (not the file) caused begins


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


def predict(model, paths, *, top_k: int | None = None, batch_size: int | None = None,
            out: str | os.PathLike | None = None, device: str = "auto", progress="auto",
            batch_bytes: int = BATCH_BYTES) -> list[Prediction]:
    """Classify image files (folders: every image inside) with a model, in batches.

    model: a loaded Model, or a model file (model.pt, model.onnx, model.pt2) loaded on `device`.
    Returns one Prediction per file, in order: its top_k labels (default min(3, K)) and their
    probabilities, or the reason it could not be read or run. out: also write them to this .csv or
    .json file (its name is checked before any image is read). batch_size: default the one extraction
    probed for this backbone and precision on this machine (else 16). batch_bytes: the decoded images
    held at once (see BATCH_BYTES). progress: True, False, "auto" (bars when interactive) or a
    progress.Progress (see pipeline.progress).

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
    batch_size = batch_size or default_batch_size(model)
    progress = resolve(progress)
    progress.phase("predict", len(files), "img")
    results = [Prediction(p) for p in files]
    runner = model.runner
    stream = _Prepared(files, runner, batch_bytes, 2 * batch_size)
    waiting: dict = {}  # key -> [(file index, prepared item, bytes held)]

    def done(i: int, p: np.ndarray) -> None:
        top = np.argsort(-p, kind="stable")[:top_k]
        results[i].labels = [classes[j] for j in top]
        results[i].probabilities = [float(p[j]) for j in top]

    def flush(key) -> None:
        batch = waiting.pop(key)
        try:
            for (i, _, _), p in zip(batch, _run(runner, [item for _, item, _ in batch], [i for i, _, _ in batch],
                                                results)):
                if p is not None:
                    done(i, p)
        finally:
            stream.release(sum(n for _, _, n in batch))
        progress.advance(len(batch))

    try:
        for entry in stream:
            if entry is None:  # the thread waits for memory held by waiting images: run the largest group
                if waiting:
                    flush(max(waiting, key=lambda k: sum(n for _, _, n in waiting[k])))
                continue
            i, item, error, held = entry
            if error is not None:
                results[i].error = error
                progress.advance(1)
                continue
            key = runner.key(item)
            waiting.setdefault(key, []).append((i, item, held))
            if len(waiting[key]) >= batch_size:
                flush(key)
        for key in sorted(waiting, key=lambda k: waiting[k][0][0]):
            flush(key)
    finally:
        stream.close()
        progress.close()
    if out is not None:
        write_predictions(results, out)
    return results


def default_batch_size(model: Model) -> int:
    """The batch size extraction probed for this model's backbone, layer and precision on this machine
    (devices.choose_batch_size remembers it), else DEFAULT_BATCH."""
    meta = model.metadata
    if model.device.type != "cpu":
        return DEFAULT_BATCH
    crop = (meta.get("preprocessing") or {}).get("crop")
    what = f"{meta.get('backbone')}; {meta.get('layer')}; {meta.get('precision', 'fp32')}; {crop}px"
    known = remembered_batch(f"{machine_key()} | {what}")
    return known["batch_size"] if known else DEFAULT_BATCH


def model_failed(error: str | None) -> bool:
    """Whether a Prediction.error is the model's failure on its image (not the file's)."""
    return error is not None and error.startswith(MODEL_FAILED)


def failures(errors: list[str | None]) -> str:
    """What went wrong, counted: "2 could not be read, the model failed on 1" ('' when nothing did)."""
    failed = sum(map(model_failed, errors))
    unreadable = sum(e is not None for e in errors) - failed
    said = [unreadable and f"{unreadable} could not be read", failed and f"the model failed on {failed}"]
    return ", ".join(text for text in said if text)


def _run(runner: Runner, items: list, indices: list[int], results: list[Prediction]) -> list:
    """Probabilities per item (None where it failed: its error set). A failing batch (an allocation
    refused by onnxruntime, say) is run again one image at a time, so that only the image that fails
    alone is an error."""
    try:
        return list(runner.run(items))
    except Exception as e:  # noqa: BLE001 - whatever the runtime raises, it is about these images
        if len(items) > 1:
            return [p for k in range(len(items)) for p in _run(runner, items[k:k + 1], indices[k:k + 1], results)]
        results[indices[0]].error = short_reason(f"{MODEL_FAILED}: {type(e).__name__}: {e}")
        return [None]


class _Prepared:
    """(file index, prepared item, bytes held, None) or (file index, None, None, reason) per file, in
    order: decoded and prepared (cropped, for model.pt and model.pt2) in a thread, at most `ahead`
    items ahead. Whole images are held within `budget` bytes in all (waiting here or in the consumer's
    groups, until `release`d): when the thread waits for memory and nothing is queued, iteration yields
    None, and the consumer runs a group to release some."""

    def __init__(self, files: list[str], runner: Runner, budget: int, ahead: int):
        self.files, self.runner, self.budget, self.ahead = files, runner, budget, ahead
        self.items: deque = deque()
        self.held, self.starved, self.stopped, self.finished = 0, False, False, False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._produce, name="transfer-predict", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(PREPARE_THREADS)  # this thread's own; restored below for threads made later
        try:
            for i, path in enumerate(self.files):
                if not self._offer(self._prepare(i, path)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._offer(("raise", e))
        finally:
            torch.set_num_threads(threads)
            with self.cond:
                self.finished = True
                self.cond.notify_all()

    def _prepare(self, i: int, path: str):
        try:
            image = image_tensor(decode_image(path))
        except DecodeError as e:
            return i, None, None, e.reason
        try:
            item = self.runner.prepare(image)
        except Exception as e:  # noqa: BLE001 - a preprocessing failure is this image's
            return i, None, None, short_reason(f"preprocessing failed: {type(e).__name__}: {e}")
        return i, item, item.numel() * item.element_size(), None

    def _offer(self, entry) -> bool:
        """Queue `entry` once there is room for it; False when the consumer stopped."""
        held = entry[2] if len(entry) == 4 and isinstance(entry[2], int) else 0
        with self.cond:
            while not self.stopped and (len(self.items) >= self.ahead or (self.held and self.held + held > self.budget)):
                self.starved = not self.items and self.held > 0
                self.cond.notify_all()
                self.cond.wait()
            self.starved = False
            if self.stopped:
                return False
            self.held += held
            self.items.append(entry)
            self.cond.notify_all()
            return True

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.held -= nbytes
            self.cond.notify_all()

    def __iter__(self):
        return self

    def __next__(self):
        with self.cond:
            while not self.items:
                if self.starved:
                    self.starved = False
                    return None
                if self.finished:
                    raise StopIteration
                self.cond.wait()
            entry = self.items.popleft()
            self.cond.notify_all()
        if entry[0] == "raise":
            raise entry[1]
        i, item, held, error = entry
        return i, item, error, held

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


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
