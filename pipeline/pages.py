"""report.html and inspect.html: one self-contained page each, to look at the data rather than read it.

Rendered from pipeline/templates/page.html with Jinja2; images are inlined as small JPEG thumbnails
and plots as PNG, CSS is inline, nothing is fetched, no script runs: the file opens from disk in
any browser. Image files are opened only to make thumbnails; a missing one gets a placeholder.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass

import jinja2
import numpy as np

from . import inspection as look
from .cache import Cache
from .files import display_path
from .images import DecodeError, decode_image

THUMB = 150  # px, the longer side of a thumbnail
WORST = 24  # most confident errors shown
PER_CELL = 24  # images listed per confusion-matrix cell
LEAK_SEARCH_LIMIT = 1e12  # query x reference x dim beyond which a fit's page skips the leak search
SUSPECT_ROWS = 20_000  # at most this many labelled rows cross-validated for a fit's suspect labels


@dataclass
class Tile:
    """One image on the page: its thumbnail (a data: URI, or None when unreadable) and caption."""

    row: int
    path: str
    src: str | None
    lines: list[str]


class _Thumbnails:
    def __init__(self, cache: Cache):
        self.cache, self.done, self.missing = cache, {}, 0

    def tile(self, row: int, *lines: str) -> Tile:
        if row not in self.done:
            self.done[row] = self._thumbnail(row)
        return Tile(row, display_path(self.cache.path_bytes[row]), self.done[row], list(lines))

    def _thumbnail(self, row: int) -> str | None:
        try:
            image = decode_image(look.image_path(self.cache, row))
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


def plot_map(inspection: look.Inspection, path: str, errors: set[int] = frozenset(), suspects: set[int] = frozenset(),
             ) -> None:
    """The 2-D map: first two principal components coloured by class, errors and suspects marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cache, rows, xy = inspection.cache, inspection.map_rows, inspection.map_xy
    names = _names(cache)
    fig, ax = plt.subplots(figsize=(7.5, 6))
    palette = plt.cm.tab20 if len(names) > 10 else plt.cm.tab10
    for k, name in enumerate(names):
        mine = cache.labels[rows] == k
        ax.scatter(xy[mine, 0], xy[mine, 1], s=9, color=palette(k % palette.N), alpha=0.7,
                   label=name if len(names) <= 20 else None)
    for marked, style, label in ((errors, dict(marker="x", color="black", s=36, linewidths=1.2), "wrong prediction"),
                                 (suspects, dict(facecolors="none", edgecolors="red", s=70, linewidths=1.3),
                                  "suspect label")):
        hit = np.isin(rows, list(marked))
        if hit.any():
            ax.scatter(xy[hit, 0], xy[hit, 1], label=label, **style)
    ax.set_xlabel("first principal component")
    ax.set_ylabel("second principal component")
    ax.set_title(f"The features of {len(rows)} images, projected on 2 dimensions (PCA)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(True, alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _data_sections(inspection: look.Inspection, thumbs: _Thumbnails) -> dict:
    cache = inspection.cache
    names = _names(cache)
    leaks = [{"train": thumbs.tile(p.a, f"{names[cache.labels[p.a]]}"),
              "held_out": thumbs.tile(p.b, f"{names[cache.labels[p.b]]}, {_split(cache, p.b)}"),
              "similarity": p.similarity, "same_bytes": p.same_bytes} for p in inspection.leaks]
    duplicates = [{"a": thumbs.tile(p.a, _split(cache, p.a)), "b": thumbs.tile(p.b, _split(cache, p.b))}
                  for p in inspection.duplicates]
    suspects = [thumbs.tile(s.row, f"labelled {names[s.given]} (p = {s.given_probability:.2f})",
                            f"looks like {names[s.preferred]} (p = {s.preferred_probability:.2f})")
                for s in inspection.suspects]
    balance = [{"split": split, "counts": counts, "total": sum(counts)} for split, counts in inspection.balance.items()]
    return {"leaks": leaks, "duplicates": duplicates, "suspects": suspects, "balance": balance, "classes": names,
            "threshold": inspection.threshold, "notes": inspection.notes}


def _split(cache: Cache, row: int) -> str:
    return str(cache.split[row]) if cache.split is not None else "no split"


def _render(out_path: str, **context) -> None:
    html = _environment().get_template("page.html").render(**context)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(html)


def write_inspection(inspection: look.Inspection, folder: str) -> list[str]:
    """inspect.html (and map.png) for `transfer inspect`; returns warnings for the caller to show."""
    thumbs = _Thumbnails(inspection.cache)
    map_path = os.path.join(folder, "map.png")
    plot_map(inspection, map_path, suspects={s.row for s in inspection.suspects})
    data = _data_sections(inspection, thumbs)
    cache = inspection.cache
    _render(os.path.join(folder, "inspect.html"), title=f"Inspection of {display_path(os.path.basename(cache.path))}",
            subtitle=_describe(cache), fit=None, map_src=_png(map_path), **data)
    return _warnings(thumbs)


def write_fit_page(result, folder: str) -> list[str]:
    """report.html in a fit run folder (beside report.md and the plots already written there)."""
    cache = result.cache
    thumbs = _Thumbnails(cache)
    names = _names(cache)
    rows, proba = result.predictions
    y = cache.labels[rows]
    predicted = proba.argmax(1)
    wrong = np.flatnonzero(predicted != y)
    worst = wrong[np.argsort(-proba[wrong, predicted[wrong]], kind="stable")][:WORST]
    errors = [thumbs.tile(int(rows[i]), f"true {names[y[i]]}", f"predicted {names[predicted[i]]} "
                                                               f"(p = {proba[i, predicted[i]]:.2f})") for i in worst]
    matrix = np.asarray(result.scores["confusion_matrix"])
    cells = []
    for t in range(len(names)):
        for p in range(len(names)):
            members = np.flatnonzero((y == t) & (predicted == p))
            if t != p and len(members):
                cells.append({"id": f"cell-{t}-{p}", "true": names[t], "predicted": names[p], "count": len(members),
                              "tiles": [thumbs.tile(int(rows[i]), f"p = {proba[i, p]:.2f}")
                                        for i in members[np.argsort(-proba[members, p])][:PER_CELL]]})
    labelled = np.sort(np.concatenate([result.splits.train, result.splits.val]))
    inspection, skipped = _fit_inspection(result, labelled)
    map_path = os.path.join(folder, "map.png")
    plot_map(inspection, map_path, errors={int(rows[i]) for i in wrong},
             suspects={s.row for s in inspection.suspects})
    data = _data_sections(inspection, thumbs)
    data["notes"] += skipped
    leaked = inspection.leaked_rows()
    clean = np.array([r not in leaked for r in rows])
    without = None
    if leaked and result.evaluated_on == "test" and clean.any():
        without = {"n": int(clean.sum()), "removed": int((~clean).sum()),
                   "top1": float((predicted[clean] == y[clean]).mean())}
    fit = {"scores": result.scores, "evaluated_on": result.evaluated_on, "C": result.C, "notes": result.notes,
           "matrix": matrix.tolist(), "cells": {c["id"]: c for c in cells}, "cell_list": cells, "errors": errors,
           "wrong": len(wrong), "sweep_src": _png(os.path.join(folder, "c_sweep.png")), "without_leaks": without}
    _render(os.path.join(folder, "report.html"), title=f"Fit report: {display_path(os.path.basename(cache.path or 'arrays'))}",
            subtitle=_describe(cache), fit=fit, map_src=_png(map_path), **data)
    return _warnings(thumbs)


def _fit_inspection(result, labelled: np.ndarray) -> tuple[look.Inspection, list[str]]:
    """The data sections for a fit: leaks between its own train+val and evaluated rows, suspect
    labels under cross-validation of its own head (same C and normalization), bounded in cost."""
    cache, notes = result.cache, []
    mean = look.cache_mean(cache)
    # The held-out rows the scores are on, against the rows the scoring model learned from.
    held, seen = {"test": (result.splits.test, labelled), "val": (result.splits.val, result.splits.train),
                  "cv": (result.splits.test, labelled)}[result.evaluated_on]
    leaks = []
    if len(held) * len(seen) * cache.dim <= LEAK_SEARCH_LIMIT:
        leaks = look.similar_pairs(cache, held, seen, look.LEAK_THRESHOLD, mean)
        look.mark_same_bytes(cache, leaks)
    else:
        notes.append("leak search skipped: too large for a fit report; run `transfer inspect` on the cache")
    sample = labelled
    if len(labelled) > SUSPECT_ROWS:
        sample = labelled[np.linspace(0, len(labelled) - 1, SUSPECT_ROWS).round().astype(np.int64)]
        notes.append(f"suspect labels: {SUSPECT_ROWS} of the {len(labelled)} train+val images were cross-validated")
    suspects, _ = look.suspect_labels(cache, sample, result.C, result.settings.normalize, seed=result.settings.seed)
    rows, xy = look.data_map(cache, seed=result.settings.seed)
    against = {"test": "train+val vs test", "val": "train vs val (the split scored)",
               "cv": "nothing held out (scores are cross-validated)"}[result.evaluated_on]
    notes.insert(0, f"leaks: {against}, cosine of mean-centred features >= {look.LEAK_THRESHOLD:g}")
    return look.Inspection(cache, look.LEAK_THRESHOLD, leaks, [], suspects, look.class_balance(cache), rows, xy,
                           []), notes


def _describe(cache: Cache) -> str:
    p = cache.provenance
    return (f"{cache.n} images, {len(cache.classes)} classes; backbone {p.get('backbone')} "
            f"({p.get('weights')}), {cache.dim}-d features; images in {display_path(cache.image_dir or '?')}")


def _warnings(thumbs: _Thumbnails) -> list[str]:
    if not thumbs.missing:
        return []
    return [f"{thumbs.missing} images could not be opened for thumbnails (moved or deleted since extraction?); "
            f"the page shows placeholders for them"]
