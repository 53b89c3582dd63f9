"""Run folders and the things people read: metrics.json, report.md and plots.

A fit run folder is written under a temporary name and renamed when complete, so a folder named
like a run is always a whole run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil

import joblib
import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import head as head_mod  # noqa: E402
from .cache import CacheInfo  # noqa: E402
from .errors import TransferError  # noqa: E402
from .fit import FitResult  # noqa: E402

PROVENANCE_KEYS = ("backbone", "weights", "weights_source", "weights_sha256", "pretrained", "seed", "layer", "dim", "preprocessing",
                   "precision", "torch_version", "torchvision_version", "created", "image_dir", "listing_sha256",
                   "source", "model", "versions", "layer_module", "pooling", "tta", "timm_version")


def default_run_dir(cache_path: str, root: str = "reports") -> str:
    stem = os.path.splitext(os.path.basename(cache_path))[0]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(root, f"{stem}-{stamp}")


def provenance(info: CacheInfo) -> dict:
    return {"cache": os.path.abspath(info.path), **{k: info.meta.get(k) for k in PROVENANCE_KEYS}}


@contextlib.contextmanager
def _new_folder(out_dir: str):
    """Yields a temporary folder that becomes `out_dir` only if the block completes: a folder named
    like a run is always a whole run. Refuses to replace a non-empty folder."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise TransferError(f"{out_dir} already exists and is not empty; choose another --out")
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    tmp = f"{out_dir.rstrip(os.sep)}.writing-{os.getpid()}"
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_fit_run(result: FitResult, info: CacheInfo, run_dir: str, command: str) -> str:
    """Write the whole run folder; returns its path."""
    with _new_folder(run_dir) as tmp:
        joblib.dump(result.pipeline, os.path.join(tmp, "model.joblib"))
        meta = {"provenance": provenance(info), "C": result.C, "settings": vars(result.settings), "command": command}
        head, raw = head_mod.fold([s for _, s in result.pipeline.steps], result.classes, meta)
        head_mod.save(head, raw, tmp)
        metrics = metrics_doc(result, info, command)
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        plot_confusion(result, os.path.join(tmp, "confusion_matrix.png"))
        if result.sweep:
            plot_sweep(result, os.path.join(tmp, "c_sweep.png"))
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(report_markdown(metrics, bool(result.sweep)))
    return run_dir


def metrics_doc(result: FitResult, info: CacheInfo, command: str) -> dict:
    return {
        "cache": os.path.abspath(info.path),
        "command": command,
        "classes": result.classes,
        "evaluated_on": result.evaluated_on,
        "scores": result.scores,
        "C": result.C,
        "C_selection": {
            "method": ("validation top-1 (ties: lower log-loss) over decades 1e-6..1e5, then 3 halvings of the "
                       "log10 step around the best (CLIP's coarse-to-fine, 8 steps per decade)")
            if result.sweep else "given by --C",
            "sweep": result.sweep,
        },
        "convergence": {**result.convergence, "max_iter": result.settings.max_iter},
        "splits": result.splits.sizes(),
        "split_source": result.splits.source,
        "settings": vars(result.settings),
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "notes": result.notes,
        "provenance": provenance(info),
    }


def plot_confusion(result: FitResult, path: str) -> None:
    matrix = np.asarray(result.scores["confusion_matrix"])
    k = len(result.classes)
    size = max(4.5, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)  # colour = share of the true class
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    long_names = max(len(c) for c in result.classes) > 3
    ax.set_xticks(range(k), result.classes, rotation=45 if long_names else 0, ha="right" if long_names else "center")
    ax.set_yticks(range(k), result.classes)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                        color="white" if shown[i, j] > 0.5 else "black", fontsize=10 if k <= 10 else 7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    s = result.scores
    ax.set_title(f"Confusion matrix, {result.evaluated_on} split (n={s['n']})\n"
                 f"top-1 {s['top1']:.3f}, balanced accuracy {s['balanced_accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(result: FitResult, path: str) -> None:
    Cs = [r["C"] for r in result.sweep]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.semilogx(Cs, [r["val_top1"] for r in result.sweep], "o-", color="tab:blue", label="val top-1")
    ax.set_xlabel("C (inverse L2 regularisation strength)")
    ax.set_ylabel("validation top-1", color="tab:blue")
    ax.axvline(result.C, color="tab:green", linestyle="--", label=f"chosen C = {result.C:.3g}")
    loss = ax.twinx()
    loss.semilogx(Cs, [r["val_log_loss"] for r in result.sweep], "s:", color="tab:red", markersize=4,
                  label="val log-loss")
    loss.set_ylabel("validation log-loss", color="tab:red")
    unconverged = [r for r in result.sweep if not r["converged"]]
    if unconverged:
        ax.plot([r["C"] for r in unconverged], [r["val_top1"] for r in unconverged], "x", color="black",
                markersize=9, label="hit --max-iter")
    handles = ax.get_legend_handles_labels()[0] + loss.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title(f"Choosing C on the validation split ({len(Cs)} fits)")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_markdown(m: dict, has_sweep: bool) -> str:
    s = m["scores"]
    where = "test split" if m["evaluated_on"] == "test" else "validation split (it also chose C: optimistic)"
    top5 = f"{s['top5']:.4f}" if s["top5"] is not None else "n/a (fewer than 5 classes)"
    lines = [
        f"# Fit report: {os.path.basename(m['cache'])}",
        "",
        f"Backbone `{m['provenance']['backbone']}` ({m['provenance']['weights']}), layer "
        f"`{m['provenance']['layer']}`, {m['provenance']['dim']}-d features, {len(m['classes'])} classes.",
        "",
        "| | |",
        "|---|---|",
        f"| scored on | {where}, n = {s['n']} |",
        f"| top-1 | {s['top1']:.4f} |",
        f"| top-5 | {top5} |",
        f"| balanced accuracy | {s['balanced_accuracy']:.4f} |",
        f"| log-loss | {s['log_loss']:.4f} |",
        f"| chosen C | {m['C']:.4g} ({m['C_selection']['method']}) |",
        f"| splits | train {m['splits']['train']}, val {m['splits']['val']}, test {m['splits']['test']} |",
        f"| final fit | {m['convergence']['iterations']} lbfgs iterations, "
        f"{'converged' if m['convergence']['converged'] else 'NOT converged: raise --max-iter'} |",
        "",
        "Notes:",
        *[f"- {n}" for n in m["notes"]],
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
    ]
    if has_sweep:
        lines += ["![validation accuracy vs C](c_sweep.png)", ""]
    lines += ["## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, c in s["per_class"].items():
        lines.append(f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
    lines += ["", f"Reproduce: `{m['command']}`", ""]
    return "\n".join(lines)


# --- experiments --------------------------------------------------------------------------------

RESULT_COLUMNS = ["run", "cache", "C", "chosen_C", "class_weight", "normalize", "pca", "train_fraction", "repeat",
                  "seed", "n_train", "n_val", "n_test", "evaluated_on", "top1", "balanced_accuracy", "log_loss",
                  "val_top1", "val_log_loss", "converged", "fit_seconds", "command"]


def write_experiment(rows: list[dict], out_dir: str, command: str, backbones: dict[str, str]) -> str:
    """results.csv, summary.md, accuracy_vs_C.png and learning_curve.png, written all or nothing."""
    import csv

    from .experiment import best_per_cache, learning_curve

    with _new_folder(out_dir) as tmp:
        with open(os.path.join(tmp, "results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
        best = best_per_cache(rows)
        curve = learning_curve(rows)
        plot_accuracy_vs_C(rows, os.path.join(tmp, "accuracy_vs_C.png"))
        plot_learning_curve(curve, os.path.join(tmp, "learning_curve.png"))
        with open(os.path.join(tmp, "summary.md"), "w") as f:
            f.write(experiment_markdown(rows, best, curve, command, backbones))
    return out_dir


def _setting_label(row: dict, with_cache: bool) -> str:
    parts = [os.path.basename(row["cache"])] if with_cache else []
    parts.append(f"{row['normalize']}")
    if row["pca"] != "none":
        parts.append(f"pca {row['pca']}")
    if row["class_weight"] != "none":
        parts.append(f"{row['class_weight']} weights")
    return ", ".join(parts)


def plot_accuracy_vs_C(rows: list[dict], path: str) -> None:
    """Validation top-1 against C: one line per setting (and cache); C=auto runs show their sweep."""
    from .experiment import setting_key

    several_caches = len({r["cache"] for r in rows}) > 1
    top = max(r["train_fraction"] for r in rows)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["train_fraction"] == top and r["repeat"] == 0:
            groups.setdefault(setting_key(r), []).append(r)
    for i, members in enumerate(groups.values()):
        color = plt.cm.tab10(i % 10)
        label = _setting_label(members[0], several_caches)
        fixed = sorted((r for r in members if r["C"] != "auto"), key=lambda r: r["chosen_C"])
        if fixed:
            ax.semilogx([r["chosen_C"] for r in fixed], [r["val_top1"] for r in fixed], "o-", color=color,
                        label=label)
        for r in members:
            if r["C"] == "auto":
                ax.semilogx([s["C"] for s in r["_sweep"]], [s["val_top1"] for s in r["_sweep"]], ".--", color=color,
                            alpha=0.8, label=f"{label} (auto sweep)" if not fixed else None)
                ax.plot([r["chosen_C"]], [r["val_top1"]], "*", color=color, markersize=12)
    ax.set_xlabel("C (inverse L2 regularisation strength)")
    ax.set_ylabel("validation top-1")
    ax.set_title("Validation accuracy against C (stars: C chosen by auto)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning_curve(curve: list[dict], path: str) -> None:
    """Mean top-1 (error bars: std over repeats) against the number of training images."""
    several_caches = len({c["cache"] for c in curve}) > 1
    fig, ax = plt.subplots(figsize=(10, 4.8))
    groups: dict[tuple, list[dict]] = {}
    for c in curve:
        groups.setdefault((c["cache"], c["class_weight"], c["normalize"], c["pca"], c["C"]), []).append(c)
    for i, members in enumerate(groups.values()):
        members.sort(key=lambda c: c["train_fraction"])
        label = _setting_label(members[0], several_caches) + f", C={members[0]['C']}"
        ax.errorbar([c["n_labelled"] for c in members], [c["top1_mean"] for c in members],
                    yerr=[c["top1_std"] for c in members], fmt="o-", capsize=4, color=plt.cm.tab10(i % 10),
                    label=label)
    ax.set_xscale("log")
    ax.set_xlabel("labelled images used (the same stratified fraction of train and of val)")
    ax.set_ylabel("top-1 (mean ± std over repeats)")
    ax.set_title("Learning curve")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def experiment_markdown(rows, best, curve, command, backbones) -> str:
    evaluated = {r["evaluated_on"] for r in rows}
    where = "test" if evaluated == {"test"} else "test (val where a cache has no test split)"
    lines = [
        "# Experiments",
        "",
        f"{len(rows)} runs on {len(best)} cache(s), cached features only. Command: `{command}`",
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
        lines.append(f"| {os.path.basename(cache)} | {backbones.get(cache, '?')} | {c} | {r['class_weight']} | "
                     f"{r['normalize']} | {r['pca']} | {r['val_top1']:.4f} | {r['top1']:.4f} | "
                     f"{r['balanced_accuracy']:.4f} | {r['log_loss']:.4f} |")
    lines += ["", "Reproduce each as a full run (with its report and exported model):", ""]
    for cache, r in best.items():
        lines.append(f"- `{r['command']}`")
    lines += ["", "![validation accuracy against C](accuracy_vs_C.png)", "", "## Learning curve", "",
              "| cache | setting | C | fraction | labelled images (train + val) | top-1 mean ± std | repeats |",
              "|---|---|---|---|---|---|---|"]
    for c in sorted(curve, key=lambda c: (c["cache"], c["normalize"], str(c["pca"]), c["class_weight"], str(c["C"]),
                                           c["train_fraction"])):
        lines.append(f"| {os.path.basename(c['cache'])} | {_setting_label(c, False)} | {c['C']} | "
                     f"{c['train_fraction']:g} | {c['n_labelled']} | {c['top1_mean']:.4f} ± {c['top1_std']:.4f} | "
                     f"{c['repeats']} |")
    lines += ["", "![learning curve](learning_curve.png)", ""]
    return "\n".join(lines)
