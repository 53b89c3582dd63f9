"""The plots people look at, as PNG files: a fit's confusion matrix and C sweep, an experiment's
accuracy against C and learning curve, the 2-D map of a cache's features.

Headless: matplotlib's Agg backend, files only, never a window.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from ..files import display_path  # noqa: E402


def plot_confusion(scores: dict, classes: list[str], evaluated_on: str, path: str) -> None:
    """The confusion matrix of `scores` (metrics.scores), coloured by the share of each true class."""
    matrix = np.asarray(scores["confusion_matrix"])
    k = len(classes)
    size = max(4.5, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)  # colour = share of the true class
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    names = [display_path(c) for c in classes]
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
    s = scores
    ax.set_title(f"Confusion matrix, {evaluated_on} split (n={s['n']})\n"
                 f"top-1 {s['top1']:.3f}, balanced accuracy {s['balanced_accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(sweep: list[dict], chosen: float, path: str) -> None:
    """Validation top-1 and log-loss against C for every C a sweep tried; `chosen` marked."""
    Cs = [r["C"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.semilogx(Cs, [r["val_top1"] for r in sweep], "o-", color="tab:blue", label="val top-1")
    ax.set_xlabel("C (inverse L2 regularisation strength)")
    ax.set_ylabel("validation top-1", color="tab:blue")
    ax.axvline(chosen, color="tab:green", linestyle="--", label=f"chosen C = {chosen:.3g}")
    loss = ax.twinx()
    loss.semilogx(Cs, [r["val_log_loss"] for r in sweep], "s:", color="tab:red", markersize=4,
                  label="val log-loss")
    loss.set_ylabel("validation log-loss", color="tab:red")
    unconverged = [r for r in sweep if not r["converged"]]
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


def setting_label(row: dict) -> str:
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
    settings = list(dict.fromkeys(setting_label(r) for r in rows))
    style = dict(zip(settings, _styles(len(settings))))
    autos = any(r["C"] == "auto" for r in rows)
    fig, axes, bottom = _facets(caches, len(settings) * (2 if autos else 1))
    for ax, cache in zip(axes, caches):
        mine = [r for r in rows if r["cache"] == cache and r["train_fraction"] == top and r["repeat"] == 0]
        for setting in settings:
            members = [r for r in mine if setting_label(r) == setting]
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
    settings = list(dict.fromkeys(f"{setting_label(c)}, C={c['C']}" for c in curve))
    style = dict(zip(settings, _styles(len(settings))))
    fig, axes, bottom = _facets(caches, len(settings))
    for ax, cache in zip(axes, caches):
        for setting in settings:
            members = sorted((c for c in curve if c["cache"] == cache and f"{setting_label(c)}, C={c['C']}" == setting),
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


def plot_map(cache, rows: np.ndarray, xy: np.ndarray, path: str, errors: set[int] = frozenset(),
             suspects: set[int] = frozenset()) -> None:
    """The 2-D map of `cache`'s rows (M,) at xy (M, 2), coloured by class, errors and suspects marked."""
    names = [display_path(c) for c in cache.classes]
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
