"""Using a shipped model.pt: load it, run it over image files and folders, report the top-k.

Only torch and the image decoder are needed; the model carries its own preprocessing and classes.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import TransferError
from .export import MODEL_FORMAT
from .images import DecodeError, decode_image, image_tensor, is_image_name


@dataclass
class Prediction:
    path: str
    labels: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None


def load_model(path: str, device: torch.device):
    """torch.jit.load a model.pt written by `transfer export`; returns (module, metadata)."""
    if not os.path.isfile(path):
        raise TransferError(f"model file {path} does not exist")
    extra = {"transfer.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            model = torch.jit.load(path, map_location=device, _extra_files=extra)
    except Exception as e:  # noqa: BLE001 - torch raises several types for "not TorchScript"
        raise TransferError(f"{path} is not a TorchScript model written by `transfer export` "
                            f"({type(e).__name__})") from None
    try:
        meta = json.loads(extra["transfer.json"] or "{}")
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != MODEL_FORMAT:
        raise TransferError(f"{path} is a TorchScript model but not one written by `transfer export` "
                            "(no transfer.json inside)")
    return model.eval(), meta


def list_inputs(paths: list[str]) -> list[str]:
    """Files as given, folders expanded to their image files (recursively, sorted)."""
    found = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
                dirnames.sort()
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_name(f)]
        elif os.path.lexists(p):
            found.append(p)
        else:
            raise TransferError(f"{p} does not exist")
    if not found:
        raise TransferError(f"no image files found in {', '.join(paths)}")
    return found


def predict(model, classes: list[str], paths: list[str], top_k: int, batch_size: int, device: torch.device,
            on_progress=None) -> list[Prediction]:
    """Decode each file, crop it with the model's own preprocess, classify in batches."""
    if not 1 <= top_k <= len(classes):
        raise TransferError(f"--top-k {top_k} is outside 1..{len(classes)} (the model has {len(classes)} classes)")
    if batch_size < 1:
        raise TransferError(f"--batch-size must be at least 1, got {batch_size}")
    results = [Prediction(p) for p in paths]
    waiting: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not waiting:
            return
        with torch.inference_mode():
            probs = model.classify(torch.stack([crop for _, crop in waiting])).float().cpu().numpy()
        for (i, _), p in zip(waiting, probs):
            top = np.argsort(-p, kind="stable")[:top_k]
            results[i].labels = [classes[j] for j in top]
            results[i].probabilities = [float(p[j]) for j in top]
        if on_progress:
            on_progress(len(waiting))
        waiting.clear()

    for i, path in enumerate(paths):
        try:
            image = decode_image(path)
        except DecodeError as e:
            results[i].error = e.reason
            if on_progress:
                on_progress(1)
            continue
        tensor = image_tensor(image).to(device)
        with torch.inference_mode():
            waiting.append((i, model.preprocess(tensor)))
        if len(waiting) == batch_size:
            flush()
    flush()
    return results


def check_output_name(out: str) -> None:
    if not out.lower().endswith((".csv", ".json")):
        raise TransferError(f"--out {out}: expected a .csv or .json file name")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise TransferError(f"output folder {folder} does not exist")


def write_predictions(results: list[Prediction], out: str, top_k: int) -> None:
    """CSV (path, label_1, prob_1, ..., error) or JSON, by the file's extension."""
    check_output_name(out)
    if out.lower().endswith(".json"):
        doc = [{"path": r.path, "predictions": [{"label": l, "probability": p}
                                                for l, p in zip(r.labels, r.probabilities)],
                "error": r.error} for r in results]
        with open(out, "w") as f:
            json.dump(doc, f, indent=2)
        return
    import csv

    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"] + [h for k in range(1, top_k + 1) for h in (f"label_{k}", f"prob_{k}")] + ["error"])
        for r in results:
            cells = [v for l, p in zip(r.labels, r.probabilities) for v in (l, f"{p:.6f}")]
            cells += [""] * (2 * top_k - len(cells))
            writer.writerow([r.path] + cells + [r.error or ""])
