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
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from . import head as head_mod  # noqa: E402
from .errors import InputFileError  # noqa: E402
from .files import display_path, make_folder_for, remove_stale_temporaries, temporary_name  # noqa: E402
from .fit import FitResult  # noqa: E402


def default_run_dir(cache_path: str, root: str = "reports") -> str:
    """A new, empty folder `root/<cache name>-<time>[-N]`, created now so that runs started in the
    same second (or in parallel) never pick the same one; the run replaces it when complete."""
    stem = os.path.splitext(os.path.basename(cache_path))[0]
    return reserve_folder(os.path.join(root, f"{stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}"))


def reserve_folder(base: str) -> str:
    """Create `base` (or `base-2`, `base-3`, ... when taken) empty and return it; mkdir is atomic."""
    make_folder_for(base)
    for n in range(1, 10_000):
        candidate = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
    raise InputFileError(f"no free folder name next to {display_path(base)}")


def release_if_empty(folder: str) -> None:
    """Remove a reserved folder that a failed or interrupted run left empty."""
    try:
        os.rmdir(folder)
    except OSError:
        pass  # not empty (the run was written) or already gone


def check_new_folder(out_dir: str) -> None:
    """Refuse, before any work, a destination that exists and is not an empty folder."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise InputFileError(f"{out_dir} already exists and is not empty; choose another --out")


@contextlib.contextmanager
def new_folder(out_dir: str):
    """Yields a temporary folder that becomes `out_dir` only if the block completes: a folder named
    like a run is always a whole run. Refuses to replace a non-empty folder."""
    check_new_folder(out_dir)
    make_folder_for(out_dir)
    remove_stale_temporaries(out_dir)
    tmp = temporary_name(out_dir)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_fit_run(result: FitResult, run_dir: str, command: str) -> str:
    """Write the whole run folder (sets result.run_dir); returns its path."""
    with new_folder(run_dir) as tmp:
        joblib.dump(result.pipeline, os.path.join(tmp, "model.joblib"))
        result.head.meta["command"] = command
        head_mod.save(result.head, tmp)
        metrics = metrics_doc(result, command)
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        plot_confusion(result, os.path.join(tmp, "confusion_matrix.png"))
        if result.sweep:
            plot_sweep(result, os.path.join(tmp, "c_sweep.png"))
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(display_path(report_markdown(metrics, bool(result.sweep), result.cache.path is not None)))
        if result.cache.path is not None:  # the page shows images: it needs a cache of image files
            from .pages import write_fit_page

            result.warnings += write_fit_page(result, tmp)
    result.run_dir = run_dir
    return run_dir


def metrics_doc(result: FitResult, command: str) -> dict:
    return {
        "cache": result.head.meta["provenance"]["cache"],
        "command": command,
        "classes": result.classes,
        "evaluated_on": result.evaluated_on,
        "scores": result.scores,
        "C": result.C,
        "C_selection": {
            "method": (("pooled out-of-fold top-1 of stratified k-fold cross-validation on train+val"
                        if _by_cv(result) else "validation top-1") +
                       " (ties: lower log-loss) over decades 1e-6..1e5, then 3 halvings of the "
                       "log10 step around the best (CLIP's coarse-to-fine, 8 steps per decade)")
            if result.sweep else "given by --C",
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


def plot_confusion(result: FitResult, path: str) -> None:
    matrix = np.asarray(result.scores["confusion_matrix"])
    k = len(result.classes)
    size = max(4.5, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)  # colour = share of the true class
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    names = [display_path(c) for c in result.classes]
    long_names = max(len(c) for c in names) > 3
    ax.set_xticks(range(k), names, rotation=45 if long_names else 0, ha="right" if long_names else "center")
    ax.set_yticks(range(k), names)
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


def report_markdown(m: dict, has_sweep: bool, has_page: bool = True) -> str:
    s = m["scores"]
    where = {"test": "test split", "val": "validation split (it also chose C: optimistic)",
             "cv": "cross-validated train+val predictions (they also chose C: optimistic)"}[m["evaluated_on"]]
    top5 = f"{s['top5']:.4f}" if s["top5"] is not None else "n/a (fewer than 5 classes)"
    lines = [
        f"# Fit report: {os.path.basename(m['cache'] or 'arrays in memory')}",
        "",
        f"Backbone `{m['provenance']['backbone']}` ({m['provenance']['weights']}), layer "
        f"`{m['provenance']['layer']}`, {m['provenance']['dim']}-d features, {len(m['classes'])} classes.",
        "",
        *(["The images behind these numbers - worst errors, leaks across splits, suspect labels, a map of the "
            "data - are in [report.html](report.html).", ""] if has_page else []),
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
        *_failed_lines(m["failed_images"]),
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
    ]
    if has_sweep:
        lines += ["![validation accuracy vs C](c_sweep.png)", ""]
    lines += ["## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, c in s["per_class"].items():
        lines.append(f"| {_cell(name)} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
    lines += ["", f"Reproduce: `{m['command']}`", ""]
    return "\n".join(lines)


def _by_cv(result: FitResult) -> bool:
    return any(n.startswith("C chosen by stratified") for n in result.notes)


def _failed_lines(failed: dict) -> list[str]:
    if not failed["count"]:
        return []
    shown = "; ".join(f"`{_cell(f['path'])}` ({_cell(f['reason'])})" for f in failed["first"][:5])
    more = f"; ... {failed['count'] - 5} more in metrics.json and the cache" if failed["count"] > 5 else ""
    return [f"- {failed['count']} images could not be used and are not in these scores: {shown}{more}"]


def _cell(text: str) -> str:
    """Any text as one markdown table cell: no line breaks, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


# --- experiments --------------------------------------------------------------------------------

RESULT_COLUMNS = ["run", "cache", "C", "chosen_C", "class_weight", "normalize", "pca", "train_fraction", "repeat",
                  "seed", "n_train", "n_val", "n_test", "evaluated_on", "top1", "balanced_accuracy", "log_loss",
                  "val_top1", "val_log_loss", "converged", "fit_seconds", "command"]


def write_experiment(rows: list[dict], out_dir: str, command: str, backbones: dict[str, str]) -> str:
    """results.csv, summary.md, accuracy_vs_C.png and learning_curve.png, written all or nothing."""
    import csv

    from .experiment import best_per_cache, learning_curve

    with new_folder(out_dir) as tmp:
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
            f.write(display_path(experiment_markdown(rows, best, curve, command, backbones)))
    return out_dir


def _setting_label(row: dict) -> str:
    parts = [f"{row['normalize']}"]
    if row["pca"] != "none":
        parts.append(f"pca {row['pca']}")
    if row["class_weight"] != "none":
        parts.append(f"{row['class_weight']} weights")
    return ", ".join(parts)


def cache_labels(paths) -> dict[str, str]:
    """Each cache path -> its shortest trailing part that no other path shares (a/x.h5 vs b/x.h5)."""
    parts = {p: os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths}
    labels = {}
    for p, mine in parts.items():
        for k in range(1, len(mine) + 1):
            tail = mine[-k:]
            if all(other[-k:] != tail for q, other in parts.items() if q != p):
                break
        labels[p] = display_path(os.path.join(*tail))
    return labels


def _styles(n: int) -> list[dict]:
    """n distinct line styles: 20 colours, then the same colours dashed, dotted, ..."""
    dashes = ["-", "--", ":", "-."]
    return [{"color": plt.cm.tab20(i % 20), "linestyle": dashes[(i // 20) % 4]} for i in range(n)]


def _facets(caches: list[str], legend_entries: int):
    """One panel per cache, side by side, with room below for a legend of `legend_entries` lines."""
    n = len(caches)
    legend_rows = -(-legend_entries // 3)
    height = 4.2 + 0.22 * legend_rows
    fig, axes = plt.subplots(1, n, figsize=(max(7.5, 5.2 * n), height), sharey=True, squeeze=False)
    return fig, list(axes[0]), 0.22 * legend_rows / height + 0.04


def _finish_facets(fig, axes, bottom: float, title: str, path: str) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_C(rows: list[dict], path: str) -> None:
    """Validation top-1 against C, one panel per cache, one line per setting; C=auto runs show their sweep."""
    top = max(r["train_fraction"] for r in rows)
    caches = list(dict.fromkeys(r["cache"] for r in rows))
    names = cache_labels(caches)
    settings = list(dict.fromkeys(_setting_label(r) for r in rows))
    style = dict(zip(settings, _styles(len(settings))))
    autos = any(r["C"] == "auto" for r in rows)
    fig, axes, bottom = _facets(caches, len(settings) * (2 if autos else 1))
    for ax, cache in zip(axes, caches):
        mine = [r for r in rows if r["cache"] == cache and r["train_fraction"] == top and r["repeat"] == 0]
        for setting in settings:
            members = [r for r in mine if _setting_label(r) == setting]
            fixed = sorted((r for r in members if r["C"] != "auto"), key=lambda r: r["chosen_C"])
            if fixed:
                ax.semilogx([r["chosen_C"] for r in fixed], [r["val_top1"] for r in fixed], marker="o",
                            label=setting, **style[setting])
            for r in (r for r in members if r["C"] == "auto"):
                ax.semilogx([s["C"] for s in r["_sweep"]], [s["val_top1"] for s in r["_sweep"]], marker=".",
                            alpha=0.6, label=f"{setting} (auto sweep)", color=style[setting]["color"], linestyle=":")
                ax.plot([r["chosen_C"]], [r["val_top1"]], "*", color=style[setting]["color"], markersize=13)
        ax.set_title(names[cache], fontsize=10)
        ax.set_xlabel("C (inverse L2 regularisation strength)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("validation top-1")
    _finish_facets(fig, axes, bottom, "Validation accuracy against C (stars: the C chosen by auto)", path)


def plot_learning_curve(curve: list[dict], path: str) -> None:
    """Mean top-1 (error bars: std over repeats) against labelled images, one panel per cache."""
    caches = list(dict.fromkeys(c["cache"] for c in curve))
    names = cache_labels(caches)
    settings = list(dict.fromkeys(f"{_setting_label(c)}, C={c['C']}" for c in curve))
    style = dict(zip(settings, _styles(len(settings))))
    fig, axes, bottom = _facets(caches, len(settings))
    for ax, cache in zip(axes, caches):
        for setting in settings:
            members = sorted((c for c in curve if c["cache"] == cache and f"{_setting_label(c)}, C={c['C']}" == setting),
                             key=lambda c: c["train_fraction"])
            if members:
                ax.errorbar([c["n_labelled"] for c in members], [c["top1_mean"] for c in members],
                            yerr=[c["top1_std"] for c in members], marker="o", capsize=4, label=setting,
                            **style[setting])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(names[cache], fontsize=10)
        ax.set_xlabel("labelled images (train + val, same stratified fraction)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("top-1 (mean ± std over repeats)")
    _finish_facets(fig, axes, bottom, "Learning curve", path)


def experiment_markdown(rows, best, curve, command, backbones) -> str:
    names = cache_labels(dict.fromkeys(r["cache"] for r in rows))
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
        lines.append(f"| {names[cache]} | {backbones.get(cache, '?')} | {c} | {r['class_weight']} | "
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
        lines.append(f"| {names[c['cache']]} | {_setting_label(c)} | {c['C']} | "
                     f"{c['train_fraction']:g} | {c['n_labelled']} | {c['top1_mean']:.4f} ± {c['top1_std']:.4f} | "
                     f"{c['repeats']} |")
    lines += ["", "![learning curve](learning_curve.png)", ""]
    return "\n".join(lines)
