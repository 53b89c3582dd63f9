"""An experiment's folder: results.csv, summary.md, accuracy_vs_C.png and learning_curve.png,
written all or nothing."""

from __future__ import annotations

import csv
import os

from ..files import csv_cell, display_path, markdown_code, markdown_text, new_folder
from ..fitting.experiment import ExperimentResult, learning_curve
from .plots import cache_labels, plot_accuracy_vs_C, plot_learning_curve, setting_label

RESULT_COLUMNS = ["run", "cache", "C", "chosen_C", "class_weight", "normalize", "pca", "train_fraction", "repeat",
                  "seed", "n_train", "n_val", "n_test", "evaluated_on", "top1", "balanced_accuracy", "log_loss",
                  "val_top1", "val_log_loss", "converged", "fit_seconds", "command"]


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
    where = "test" if evaluated == {"test"} else "test (val where a cache has no test split)"
    lines = [
        "# Experiments",
        "",
        f"{len(rows)} runs on {len(best)} cache(s), cached features only. Command: {markdown_code(command)}",
        "",
        "Settings are ranked on validation top-1 (ties: lower validation log-loss) at the largest train "
        f"fraction, never on test; the scores shown are on {where}. A C=auto row's validation score is the "
        "best of its own sweep over the same split, so it is slightly optimistic next to fixed-C rows.",
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
    lines += ["", "![validation accuracy against C](accuracy_vs_C.png)", "", "## Learning curve", "",
              "| cache | setting | C | fraction | labelled images (train + val) | top-1 mean ± std | repeats |",
              "|---|---|---|---|---|---|---|"]
    for c in sorted(curve, key=lambda c: (c["cache"], c["normalize"], str(c["pca"]), c["class_weight"], str(c["C"]),
                                           c["train_fraction"])):
        lines.append(f"| {markdown_text(names[c['cache']])} | {setting_label(c)} | {c['C']} | "
                     f"{c['train_fraction']:g} | {c['n_labelled']} | {c['top1_mean']:.4f} ± {c['top1_std']:.4f} | "
                     f"{c['repeats']} |")
    lines += ["", "![learning curve](learning_curve.png)", ""]
    return "\n".join(lines)
