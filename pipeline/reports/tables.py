"""The CSV files people open in a spreadsheet: predictions.csv (per image: true class, predicted
class, a probability per class) and label_issues.csv (suspect labels, ranked).

File and class names come from strangers, so every text cell goes through `csv_cell` (a formula
is written as text) and names are shown as `display_path` shows them; numbers are written as
numbers. Written atomically: a file is whole or absent.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from .. import files
from ..files import display_path, write_atomically


def csv_cell(text) -> str:
    """A text cell (str, bytes or anything else as str) that a spreadsheet shows as text: shown as
    display_path shows names (undecodable bytes as \\xNN), then `files.csv_cell` (a leading ' before
    what would start a formula)."""
    return files.csv_cell(display_path(text if isinstance(text, (str, bytes)) else str(text)))


def _write(path: str, header: list[str], rows) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([csv_cell(h) for h in header])
    writer.writerows(rows)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(buffer.getvalue())

    write_atomically(write, path)


def write_predictions(path: str, names: list, true: np.ndarray, proba: np.ndarray, classes: list[str],
                      splits: list[str] | None = None) -> None:
    """predictions.csv: one row per image: path, [split,] true, predicted, its probability, then
    p_<class> for every class. names (n,) paths (str or bytes), true (n,) class indices, proba (n, K)."""
    shown = [display_path(c) for c in classes]
    header = ["path"] + (["split"] if splits is not None else []) + ["true", "predicted", "probability"] + \
        [f"p_{c}" for c in shown]
    predicted = proba.argmax(1)
    rows = ([csv_cell(names[i])] + ([csv_cell(splits[i])] if splits is not None else []) +
            [csv_cell(shown[true[i]]), csv_cell(shown[predicted[i]]), f"{proba[i, predicted[i]]:.6f}"] +
            [f"{p:.6f}" for p in proba[i]] for i in range(len(names)))
    _write(path, header, rows)


def write_label_issues(path: str, issues: list, names: list, classes: list[str], splits: list[str] | None) -> None:
    """label_issues.csv: the suspects in rank order (most negative margin first): rank, path,
    split, the given label, its out-of-fold probability and its class's threshold, the suggested
    label and its probability, the margin. issues: inspection.Suspect objects (rows index names)."""
    shown = [display_path(c) for c in classes]
    header = ["rank", "path", "split", "given", "p_given", "threshold_given", "suggested", "p_suggested", "margin"]
    rows = ([str(k + 1), csv_cell(names[s.row]), csv_cell(splits[s.row] if splits is not None else ""),
             csv_cell(shown[s.given]), f"{s.given_probability:.6f}", f"{s.threshold:.6f}",
             csv_cell(shown[s.preferred]), f"{s.preferred_probability:.6f}", f"{s.margin:.6f}"]
            for k, s in enumerate(issues))
    _write(path, header, rows)
