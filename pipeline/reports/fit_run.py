"""A fit's run folder: model.joblib, head.npz + head.json, metrics.json, predictions.csv, report.md,
the plots, report.html and label_issues.csv, written under a temporary name and renamed when
complete (files.new_folder), so a folder named like a run is always a whole run.
"""

from __future__ import annotations

import json
import os

import joblib

from .. import head as head_mod
from ..files import display_path, markdown_code, markdown_text, new_folder
from ..fitting.probe import FitResult, calibration_line
from ..progress import resolve
from . import pages, plots, tables
from .inspection import inspect_fit


def write_fit_run(result: FitResult, run_dir: str, command: str, progress=None) -> str:
    """Write the whole run folder (sets result.run_dir); returns its path. progress: one phase for
    the files and plots, one for report.html (leaks, suspect labels, thumbnails)."""
    progress = resolve(progress)
    progress.phase("run folder: metrics, report.md, plots", 1, "step")
    with new_folder(run_dir) as tmp:
        joblib.dump(result.pipeline, os.path.join(tmp, "model.joblib"))
        result.head.meta["command"] = command
        head_mod.save(result.head, tmp)
        metrics = metrics_doc(result, command)
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        write_predictions(result, os.path.join(tmp, "predictions.csv"))
        plots.plot_confusion(result.scores, result.classes, result.evaluated_on,
                             os.path.join(tmp, "confusion_matrix.png"))
        plots.plot_reliability(result.calibration, result.describe_evaluation(), os.path.join(tmp, "reliability.png"))
        if result.sweep:
            plots.plot_sweep(result.sweep, result.C, os.path.join(tmp, "c_sweep.png"), result.settings.select)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(display_path(report_markdown(metrics, result.describe_evaluation(), bool(result.sweep),
                                                 result.cache.path is not None)))
        progress.advance(1)
        if result.cache.path is not None:  # the page: leaks and suspect labels need the cache's rows
            progress.phase("run folder: report.html (leaks, suspect labels, thumbnails)", 1, "step")
            found = inspect_fit(result)
            pages.write_label_issues(found, tmp)
            result.warnings += pages.write_fit_page(result, found, tmp, calibration_line(result.calibration))
            progress.advance(1)
    progress.close()
    result.run_dir = run_dir
    return run_dir


def write_predictions(result: FitResult, path: str) -> None:
    """predictions.csv: the evaluated rows (what `scores` are on) with their calibrated probabilities."""
    rows, proba = result.predictions
    cache = result.cache
    names = [cache.path_bytes[r] for r in rows] if cache.path is not None else [f"row {r}" for r in rows]
    splits = None if cache.split is None else [str(cache.split[r]) for r in rows]
    tables.write_predictions(path, names, cache.labels[rows], proba, result.classes, splits)


def metrics_doc(result: FitResult, command: str) -> dict:
    return {
        "cache": result.head.meta["provenance"]["cache"],
        "command": command,
        "classes": result.classes,
        "evaluated_on": result.evaluated_on,
        "scores": result.scores,
        "calibration": result.calibration,
        "C": result.C,
        "C_selection": {
            "selection": result.selection,
            "select": result.settings.select,
            "method": (("pooled out-of-fold " if result.selection == "cv" else "validation ") +
                       ("top-1 (ties: lower log-loss)" if result.settings.select == "top1" else
                        "log-loss (ties: higher top-1)") +
                       (" of stratified k-fold cross-validation on " +
                        ("train" if result.splits.held_out_val else "train+val") if result.selection == "cv" else "") +
                       " over decades 1e-6..1e5, then 3 halvings of the "
                       "log10 step around the best (CLIP's coarse-to-fine, 8 steps per decade)")
            if result.sweep else "given by --C",
            "other_rule": result.alternative,
            "sweep": result.sweep,
        },
        "convergence": {**result.convergence, "max_iter": result.settings.max_iter},
        "solver": result.solver,
        "splits": result.splits.sizes(),
        "split_source": result.splits.source,
        "settings": vars(result.settings),
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "notes": result.notes,
        "failed_images": {"count": len(result.cache.failed),
                          "first": [{"path": p, "reason": r} for p, r in result.cache.failed[:20]]},
        "provenance": result.head.meta["provenance"],
    }


def report_markdown(m: dict, where: str, has_sweep: bool, has_page: bool = True) -> str:
    """report.md from metrics.json's document `m`; where: what the scores are on (describe_evaluation)."""
    s = m["scores"]
    top5 = f"{s['top5']:.4f}" if s["top5"] is not None else "n/a (fewer than 5 classes)"
    lines = [
        f"# Fit report: {markdown_text(_cache_name(m['cache']))}",
        "",
        f"Backbone {markdown_code(m['provenance']['backbone'])} ({markdown_text(m['provenance']['weights'])}), layer "
        f"{markdown_code(m['provenance']['layer'])}, {m['provenance']['dim']}-d features, {len(m['classes'])} classes.",
        "",
        *(["The images behind these numbers - worst errors, leaks across splits, suspect labels, a map of the "
            "data - are in [report.html](report.html).", ""] if has_page else []),
        "| | |",
        "|---|---|",
        f"| scored on | {_cell(where)}, n = {s['n']} |",
        f"| top-1 | {s['top1']:.4f} |",
        f"| top-5 | {top5} |",
        f"| balanced accuracy | {s['balanced_accuracy']:.4f} |",
        f"| log-loss | {s['log_loss']:.4f} |",
        f"| ECE (15 bins) | {s['ece']:.4f} |",
        f"| calibration | {_cell(calibration_line(m['calibration']))} |",
        f"| chosen C | {m['C']:.4g} ({m['C_selection']['method']}) |",
        f"| splits | train {m['splits']['train']}, val {m['splits']['val']}, test {m['splits']['test']} |",
        f"| final fit | {m['convergence']['iterations']} lbfgs iterations, "
        f"{'converged' if m['convergence']['converged'] else 'NOT converged: raise --max-iter'} |",
        "",
        "Notes:",
        *[f"- {markdown_text(n)}" for n in m["notes"]],
        *_failed_lines(m["failed_images"]),
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "![reliability diagram](reliability.png)",
        "",
        "Per image: `predictions.csv` (the evaluated images: true class, predicted class, a probability per class)"
        + ("; suspect labels: `label_issues.csv`." if has_page else "."),
        "",
    ]
    if has_sweep:
        lines += ["![validation accuracy vs C](c_sweep.png)", ""]
    lines += ["## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, c in s["per_class"].items():
        lines.append(f"| {_cell(name)} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
    lines += ["", f"Reproduce: {markdown_code(m['command'])}", ""]
    return "\n".join(lines)


def _failed_lines(failed: dict) -> list[str]:
    if not failed["count"]:
        return []
    shown = "; ".join(f"{markdown_code(f['path'])} ({markdown_text(f['reason'])})" for f in failed["first"][:5])
    more = f"; ... {failed['count'] - 5} more in metrics.json and the cache" if failed["count"] > 5 else ""
    return [f"- {failed['count']} images could not be used and are not in these scores: {shown}{more}"]


def _cell(text: str) -> str:
    """Any text as one markdown table cell: inert (no HTML, no markup), pipes escaped."""
    return markdown_text(text)


def _cache_name(cache) -> str:
    """The cache's file name; parts read as one (a list) are named by the first and their count."""
    if isinstance(cache, list):
        return f"{os.path.basename(cache[0])} and {len(cache) - 1} more parts"
    return os.path.basename(cache or "arrays in memory")
