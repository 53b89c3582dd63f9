"""An experiment's folder: results.csv, summary.md, accuracy_vs_C.png and learning_curve.png,
written all or nothing."""

from __future__ import annotations

import csv
import os

from ..files import csv_cell, display_path, markdown_code, markdown_text, new_folder
from ..fitting.experiment import ExperimentResult, learning_curve
from .plots import cache_labels, plot_accuracy_vs_C, plot_learning_curve, setting_label

RESULT_COLUMNS = ["run", "cache", "C", "chosen_C", "class_weight", "normalize", "pca", "train_fraction", "repeat",
                  "seed", "n_train", "n_val", "n_test", "n_fitted", "evaluated_on", "scored_on", "n_scored",
                  "scored_images", "top1", "balanced_accuracy", "log_loss", "ece", "ece_uncalibrated", "temperature",
                  "classes_predicted", "collapsed", "val_top1", "val_log_loss", "converged", "fit_seconds", "command"]


def write_experiment(result: ExperimentResult, out_dir: str, command: str) -> str:
    """results.csv, summary.md, accuracy_vs_C.png and learning_curve.png, written all or nothing."""
    rows = result.rows
    with new_folder(out_dir) as tmp:
        with open(os.path.join(tmp, "results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: repr(v) if isinstance(v, float) else csv_cell(v) for k, v in r.items()})
        curve = learning_curve(rows)
        plot_accuracy_vs_C(rows, os.path.join(tmp, "accuracy_vs_C.png"))
        plot_learning_curve(curve, os.path.join(tmp, "learning_curve.png"))
        with open(os.path.join(tmp, "summary.md"), "w") as f:
            f.write(display_path(experiment_markdown(rows, result.best, curve, command, result.backbones)))
    return out_dir


def experiment_markdown(rows, best, curve, command, backbones) -> str:
    names = cache_labels(dict.fromkeys(r["cache"] for r in rows))
    evaluated = {r["evaluated_on"] for r in rows}
    held_out = any("held-out" in str(r.get("scored_on", "")) for r in rows)
    where = ("test" if evaluated == {"test"} else "the held-out validation split" if held_out else
             "test (val where a cache has no test split)")
    lines = [
        "# Experiments",
        "",
        f"{len(rows)} runs on {len(best)} cache(s), cached features only. Command: {markdown_code(command)}",
        "",
        "Settings are ranked on validation top-1 (ties: lower validation log-loss) at the largest train "
        f"fraction, never on test; the scores shown are on {where}. A C=auto row's validation score is the "
        "best of its own sweep over the same split, so it is slightly optimistic next to fixed-C rows."
        + (" The validation split is held out as the yardstick of the learning curve (no test split): "
           "validation scores are then cross-validated on each run's train images." if held_out else ""),
        "",
        "## Best setting per cache",
        "",
        "| cache | backbone | C | class weight | normalize | PCA | val top-1 | top-1 | balanced acc. | log-loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cache, r in best.items():
        c = f"{r['chosen_C']:.4g}" + (" (auto)" if r["C"] == "auto" else "")
        lines.append(f"| {markdown_text(names[cache])} | {markdown_text(backbones.get(cache, '?'))} | {c} | {r['class_weight']} | "
                     f"{r['normalize']} | {r['pca']} | {r['val_top1']:.4f} | {r['top1']:.4f} | "
                     f"{r['balanced_accuracy']:.4f} | {r['log_loss']:.4f} |")
    lines += ["", "Reproduce each as a full run (with its report and exported model):", ""]
    for cache, r in best.items():
        lines.append(f"- {markdown_code(r['command'])}")
    lines += _collapsed_lines(rows, names)
    lines += ["", "![validation accuracy against C](accuracy_vs_C.png)", "", "## Learning curve", ""]
    lines += _yardstick_lines(curve, names)
    lines += ["| cache | setting | C | fraction | images learned from | top-1 mean ± std | min - max | repeats |",
              "|---|---|---|---|---|---|---|---|"]
    for c in sorted(curve, key=lambda c: (c["cache"], c["normalize"], str(c["pca"]), c["class_weight"], str(c["C"]),
                                           c["train_fraction"])):
        flag = " (collapsed)" if c["collapsed"] else ""
        lines.append(f"| {markdown_text(names[c['cache']])} | {setting_label(c)} | {c['C']} | "
                     f"{c['train_fraction']:g} | {c['n_labelled']} | {c['top1_mean']:.4f} ± {c['top1_std']:.4f}{flag} | "
                     f"{c['top1_min']:.4f} - {c['top1_max']:.4f} | {c['repeats']} |")
    lines += ["", "![learning curve](learning_curve.png)", ""]
    return "\n".join(lines)


def _collapsed_lines(rows: list[dict], names: dict) -> list[str]:
    """summary.md's list of runs that predict one class for every scored image."""
    collapsed = [r for r in rows if r.get("collapsed")]
    if not collapsed:
        return []
    lines = ["", "## Collapsed settings", "",
             f"{len(collapsed)} of {len(rows)} runs predict one class for every scored image: their top-1 is that "
             "class's share of the scored images, not something the head learned (typically a tiny C, or "
             "`normalize=l2` with a small C). The plots draw them (rings, or triangles on the bottom edge) but "
             "their axes follow the other runs.", "",
             "| cache | setting | C | fraction | repeat | predicts only | top-1 |", "|---|---|---|---|---|---|---|"]
    for r in collapsed:
        c = f"{r['chosen_C']:.4g}" + (" (auto)" if r["C"] == "auto" else "")
        lines.append(f"| {markdown_text(names[r['cache']])} | {setting_label(r)} | {c} | {r['train_fraction']:g} | {r['repeat']} | "
                     f"{markdown_text(str(r.get('collapsed_to', '')))} | {r['top1']:.4f} |")
    return lines


def _yardstick_lines(curve: list[dict], names: dict) -> list[str]:
    """What every point of the curves was scored on, or a warning where points differ."""
    by_cache: dict[str, set] = {}
    for c in curve:
        by_cache.setdefault(c["cache"], set()).update(c["scored_images"])
    lines = []
    for cache, digests in by_cache.items():
        n = next(c["n_scored"] for c in curve if c["cache"] == cache)
        if len(digests) == 1:
            lines.append(f"- {markdown_text(names[cache])}: every point is scored on the same {n} images (scored_images "
                         f"{next(iter(digests))} in results.csv); only the images the head learns from are "
                         "subsampled.")
        else:
            lines.append(f"- {markdown_text(names[cache])}: **warning**: the points are scored on {len(digests)} different sets of "
                         "images (scored_images in results.csv), so they are not comparable along the curve.")
    return lines + [""]
