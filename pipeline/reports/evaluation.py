"""`transfer evaluate`'s folder: metrics.json, predictions.csv, confusion_matrix.png,
reliability.png and report.html (the worst errors), written all or nothing, for a
`shipping.evaluate.Evaluation` (not imported here: it imports torch, which writing needs not)."""

from __future__ import annotations

import json
import os

from ..files import display_path, new_folder
from . import pages, plots, tables


def write_evaluation(evaluation, out_dir: str) -> list[str]:
    """Write the whole folder (sets evaluation.out); returns warnings (e.g. thumbnails not made)."""
    with new_folder(out_dir) as tmp:
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics_doc(evaluation), f, indent=2)
        tables.write_predictions(os.path.join(tmp, "predictions.csv"), evaluation.paths, evaluation.y,
                                 evaluation.proba, evaluation.classes)
        plots.plot_confusion(evaluation.scores, evaluation.classes, "labelled images given",
                             os.path.join(tmp, "confusion_matrix.png"))
        plots.plot_reliability({"method": "none", "before_label": "the model's probabilities",
                                "before": {"ece": evaluation.scores["ece"], "log_loss": evaluation.scores["log_loss"],
                                           "reliability": evaluation.reliability}},
                               evaluation.describe(), os.path.join(tmp, "reliability.png"))
        warnings = pages.write_evaluation_page(evaluation, tmp)
    evaluation.out = out_dir
    return warnings


def metrics_doc(evaluation) -> dict:
    return {"model": display_path(os.path.abspath(evaluation.model_path)), "format": evaluation.model_format,
            "data": display_path(os.path.abspath(evaluation.data)), "split": evaluation.split,
            "classes": evaluation.classes,
            "scores": evaluation.scores, "reliability": evaluation.reliability,
            "failed_images": {"count": len(evaluation.failed),
                              "first": [{"path": display_path(p), "reason": r} for p, r in evaluation.failed[:20]]},
            "notes": evaluation.notes}
