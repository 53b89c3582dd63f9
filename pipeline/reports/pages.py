"""report.html and inspect.html: one self-contained page each, to look at the data rather than read it.

Rendered from templates/page.html with Jinja2; images are inlined as small JPEG thumbnails and
plots as PNG, CSS is inline, nothing is fetched, no script runs: the file opens from disk in any
browser. Image files are opened only to make thumbnails; a missing one gets a placeholder. Pages
only render: what they show is computed by `inspection` (and the fit).
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass

import jinja2
import numpy as np

from ..cache import Cache
from ..files import display_path
from ..images import DecodeError, decode_image
from .inspection import Inspection, image_path
from .plots import plot_map
from .tables import write_label_issues as write_label_issues_csv

THUMB = 150  # px, the longer side of a thumbnail
WORST = 24  # most confident errors shown
PER_CELL = 24  # images listed per confusion-matrix cell


@dataclass
class Tile:
    """One image on the page: its thumbnail (a data: URI, or None when unreadable) and caption."""

    row: int
    path: str
    src: str | None
    lines: list[str]


class _Thumbnails:
    """Thumbnails of a cache's rows, or (files) of a list of image files by position."""

    def __init__(self, cache: Cache | None = None, files: list[str] | None = None):
        self.cache, self.files, self.done, self.missing = cache, files, {}, 0
        # a write_cache of features made elsewhere has no image folder (files: always images)
        self.images = files is not None or bool(cache.image_dir)

    def tile(self, row: int, *lines: str) -> Tile:
        if row not in self.done:
            self.done[row] = self._thumbnail(row)
        name = self.files[row] if self.files is not None else self.cache.path_bytes[row]
        return Tile(row, display_path(name), self.done[row], list(lines))

    def _thumbnail(self, row: int) -> str | None:
        if not self.images:
            return ""  # the page names the file; there is nothing to open
        try:
            image = decode_image(self.files[row] if self.files is not None else image_path(self.cache, row))
        except DecodeError:
            self.missing += 1
            return None
        image.thumbnail((THUMB, THUMB))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _png(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
                              autoescape=True, undefined=jinja2.StrictUndefined)


def _names(cache: Cache) -> list[str]:
    return [display_path(c) for c in cache.classes]


def _data_sections(inspection: Inspection, thumbs: _Thumbnails) -> dict:
    cache = inspection.cache
    names = _names(cache)
    leaks = [{"train": thumbs.tile(p.a, f"{names[cache.labels[p.a]]}"),
              "held_out": thumbs.tile(p.b, f"{names[cache.labels[p.b]]}, {_split(cache, p.b)}"),
              "similarity": p.similarity, "same_bytes": p.same_bytes} for p in inspection.leaks]
    duplicates = [{"a": thumbs.tile(p.a, _split(cache, p.a)), "b": thumbs.tile(p.b, _split(cache, p.b))}
                  for p in inspection.duplicates]
    suspects = [thumbs.tile(s.row, f"labelled {names[s.given]} (p = {s.given_probability:.2f}; "
                                   f"class threshold {s.threshold:.2f})",
                            f"looks like {names[s.preferred]} (p = {s.preferred_probability:.2f})",
                            f"{_split(cache, s.row)}, margin {s.margin:+.2f}")
                for s in inspection.suspects[:inspection.top]]
    balance = [{"split": split, "counts": counts, "total": sum(counts)} for split, counts in inspection.balance.items()]
    return {"leaks": leaks, "duplicates": duplicates, "suspects": suspects, "suspect_count": len(inspection.suspects),
            "suspect_method": inspection.suspect_method, "balance": balance, "classes": names,
            "threshold": inspection.threshold, "notes": inspection.notes, "show_data": True}


def _split(cache: Cache, row: int) -> str:
    return str(cache.split[row]) if cache.split is not None else "no split"


def _render(out_path: str, **context) -> None:
    html = _environment().get_template("page.html").render(**context)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(html)


def write_label_issues(inspection: Inspection, folder: str) -> None:
    """label_issues.csv: every suspect label of `inspection`, in rank order."""
    cache = inspection.cache
    write_label_issues_csv(os.path.join(folder, "label_issues.csv"), inspection.suspects, cache.path_bytes,
                           cache.classes, None if cache.split is None else list(cache.split))


def write_inspection(inspection: Inspection, folder: str) -> list[str]:
    """inspect.html, label_issues.csv and map.png for `transfer inspect`; returns warnings for the
    caller to show."""
    write_label_issues(inspection, folder)
    thumbs = _Thumbnails(inspection.cache)
    map_path = os.path.join(folder, "map.png")
    plot_map(inspection.cache, inspection.map_rows, inspection.map_xy, map_path,
             suspects={s.row for s in inspection.suspects})
    data = _data_sections(inspection, thumbs)
    cache = inspection.cache
    _render(os.path.join(folder, "inspect.html"), title=f"Inspection of {display_path(os.path.basename(cache.path))}",
            subtitle=_describe(cache), fit=None, map_src=_png(map_path), **data)
    return _warnings(thumbs)


def _errors(thumbs: _Thumbnails, ids: np.ndarray, y: np.ndarray, proba: np.ndarray, names: list[str]) -> dict:
    """The worst errors and the images of each off-diagonal confusion cell, as tiles: ids (n,) the
    thumbnail keys (cache rows or file positions), y (n,) true classes, proba (n, K)."""
    predicted = proba.argmax(1)
    wrong = np.flatnonzero(predicted != y)
    worst = wrong[np.argsort(-proba[wrong, predicted[wrong]], kind="stable")][:WORST]
    errors = [thumbs.tile(int(ids[i]), f"true {names[y[i]]}", f"predicted {names[predicted[i]]} "
                                                              f"(p = {proba[i, predicted[i]]:.2f})") for i in worst]
    cells = []
    for t in range(len(names)):
        for p in range(len(names)):
            members = np.flatnonzero((y == t) & (predicted == p))
            if t != p and len(members):
                cells.append({"id": f"cell-{t}-{p}", "true": names[t], "predicted": names[p], "count": len(members),
                              "tiles": [thumbs.tile(int(ids[i]), f"p = {proba[i, p]:.2f}")
                                        for i in members[np.argsort(-proba[members, p])][:PER_CELL]]})
    return {"errors": errors, "wrong": len(wrong), "cells": {c["id"]: c for c in cells}, "cell_list": cells,
            "wrong_ids": {int(ids[i]) for i in wrong}}


def write_fit_page(result, inspection: Inspection, folder: str, calibration: str = "") -> list[str]:
    """report.html in a fit run folder (beside report.md and the plots already written there), for a
    FitResult and what `inspection.inspect_fit` found in its data. calibration: the calibration in words."""
    cache = result.cache
    thumbs = _Thumbnails(cache)
    names = _names(cache)
    rows, proba = result.predictions
    shown = _errors(thumbs, rows, cache.labels[rows], proba, names)
    map_path = os.path.join(folder, "map.png")
    plot_map(cache, inspection.map_rows, inspection.map_xy, map_path, errors=shown["wrong_ids"],
             suspects={s.row for s in inspection.suspects})
    data = _data_sections(inspection, thumbs)
    fit = {"scores": result.scores, "evaluated_on": result.evaluated_on, "where": result.describe_evaluation(),
           "C": result.C, "notes": result.notes, "matrix": result.scores["confusion_matrix"], **shown,
           "sweep_src": _png(os.path.join(folder, "c_sweep.png")), "without_leaks": inspection.without_leaks,
           "calibration": calibration, "reliability_src": _png(os.path.join(folder, "reliability.png"))}
    _render(os.path.join(folder, "report.html"), title=f"Fit report: {display_path(os.path.basename(cache.path or 'arrays'))}",
            subtitle=_describe(cache), fit=fit, map_src=_png(map_path), **data)
    return _warnings(thumbs)


def write_evaluation_page(evaluation, folder: str) -> list[str]:
    """report.html of `transfer evaluate` (a shipping.evaluate.Evaluation): the scores, the confusion
    matrix and the worst errors as a fit's page shows them, and the reliability diagram."""
    thumbs = _Thumbnails(files=evaluation.paths)
    names = [display_path(c) for c in evaluation.classes]
    ids = np.arange(len(evaluation.paths))
    fit = {"scores": evaluation.scores, "evaluated_on": "evaluated", "where": evaluation.describe(), "C": None,
           "notes": evaluation.notes, "matrix": evaluation.scores["confusion_matrix"],
           **_errors(thumbs, ids, evaluation.y, evaluation.proba, names), "sweep_src": None, "without_leaks": None,
           "calibration": "", "reliability_src": _png(os.path.join(folder, "reliability.png"))}
    _render(os.path.join(folder, "report.html"), title=f"Evaluation of {display_path(os.path.basename(evaluation.model_path))}",
            subtitle=f"{len(evaluation.paths)} labelled images from {display_path(evaluation.data)}; "
                     f"{len(names)} classes; model {display_path(evaluation.model_path)}",
            fit=fit, map_src=None, classes=names, show_data=False, leaks=[], duplicates=[], suspects=[],
            suspect_count=0, suspect_method="", balance=[], threshold=0, notes=[])
    return _warnings(thumbs)


def _describe(cache: Cache) -> str:
    p = cache.provenance
    return (f"{cache.n} images, {len(cache.classes)} classes; backbone {p.get('backbone')} "
            f"({p.get('weights')}), {cache.dim}-d features; " +
            (f"images in {display_path(cache.image_dir)}" if cache.image_dir else
             "no image folder recorded (features written with write_cache), so no thumbnails"))


def _warnings(thumbs: _Thumbnails) -> list[str]:
    if not thumbs.missing:
        return []
    return [f"{thumbs.missing} images could not be opened for thumbnails (moved or deleted since extraction?); "
            f"the page shows placeholders for them"]
