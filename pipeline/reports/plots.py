"""The plots people look at, as PNG files: a fit's confusion matrix, C sweep and reliability
diagram, an experiment's accuracy against C and learning curve, the 2-D map of a cache's features.

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
    where = f"{evaluated_on} split" if evaluated_on in ("test", "val", "cv") else evaluated_on
    ax.set_title(f"Confusion matrix, {where} (n={s['n']})\n"
                 f"top-1 {s['top1']:.3f}, balanced accuracy {s['balanced_accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(sweep: list[dict], chosen: float, path: str, select: str = "top1") -> None:
    """Validation top-1 and log-loss against C for every C a sweep tried; `chosen` marked (by
    `select`: top-1 or log-loss)."""
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
    ax.set_title(f"Choosing C by validation {'top-1' if select == 'top1' else 'log-loss'} ({len(Cs)} fits)")
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


def _range(setters: list[float], context: list[float], window: float = 0.05) -> tuple[float, float]:
    """y-limits (inside [0, 1]) that show every value in `setters` (the points that matter), and
    the values of `context` (e.g. a C sweep's tail) only down to `window` below the best value."""
    if not setters and not context:
        return 0.0, 1.0
    high = max(setters + context)
    low = min(setters + [high - window])
    pad = max(0.005, 0.06 * (high - low))
    return max(0.0, low - pad), min(1.0, high + pad)


COLLAPSED_STYLE = {"marker": "v", "s": 70, "zorder": 5, "clip_on": False}


def _mark_collapsed(ax, xs: list[float], ys: list[float], low: float, color) -> bool:
    """Points of runs that predict one class: an open ring where they are, a triangle on the bottom
    edge when they lie below the range the other points set. Returns whether any was drawn."""
    if not xs:
        return False
    below = [y < low for y in ys]
    ax.scatter([x for x, b in zip(xs, below) if not b], [y for y, b in zip(ys, below) if not b], s=80,
               facecolors="none", edgecolors=color, linewidths=1.4, zorder=5)
    if any(below):
        ax.scatter([x for x, b in zip(xs, below) if b], [low] * sum(below), color=color, **COLLAPSED_STYLE)
    return True


def _collapsed_legend(ax) -> None:
    """One grey legend entry for the collapsed marks of every setting."""
    ax.scatter([], [], color="0.35", label="predicts one class (triangle: below the range)", **COLLAPSED_STYLE)


def plot_accuracy_vs_C(rows: list[dict], path: str) -> tuple[float, float]:
    """Validation top-1 against C, one panel per cache, one line per setting; C=auto runs show their
    sweep. The y-range follows the fixed-C fits and the Cs auto chose that predict more than one
    class (and a sweep down to 0.05 below the best); collapsed fits (one class for every image:
    accuracy = that class's share) are drawn as rings, or as triangles on the bottom edge when below
    that range. Returns the y-range."""
    top = max(r["train_fraction"] for r in rows)
    caches = list(dict.fromkeys(r["cache"] for r in rows))
    names = cache_labels(caches)
    settings = list(dict.fromkeys(setting_label(r) for r in rows))
    style = dict(zip(settings, _styles(len(settings))))
    autos = any(r["C"] == "auto" for r in rows)
    fig, axes, bottom = _facets(caches, len(settings) * (2 if autos else 1) + 1)
    lines = []  # (ax, xs, ys, collapsed flags, setting, kind)
    for ax, cache in zip(axes, caches):
        mine = [r for r in rows if r["cache"] == cache and r["train_fraction"] == top and r["repeat"] == 0]
        for setting in settings:
            members = [r for r in mine if setting_label(r) == setting]
            fixed = sorted((r for r in members if r["C"] != "auto"), key=lambda r: r["chosen_C"])
            if fixed:
                lines.append((ax, [r["chosen_C"] for r in fixed], [r["val_top1"] for r in fixed],
                              [r.get("val_classes_predicted", 2) == 1 for r in fixed], setting, "fixed"))
            for r in (r for r in members if r["C"] == "auto"):
                lines.append((ax, [s["C"] for s in r["_sweep"]], [s["val_top1"] for s in r["_sweep"]],
                              [s.get("classes_predicted", 2) == 1 for s in r["_sweep"]], setting, "sweep"))
                ax.plot([r["chosen_C"]], [r["val_top1"]], "*", color=style[setting]["color"], markersize=13, zorder=6)
    setters = [y for _, _, ys, flags, _, kind in lines if kind == "fixed" for y, f in zip(ys, flags) if not f]
    setters += [r["val_top1"] for r in rows if r["C"] == "auto" and r["train_fraction"] == top and r["repeat"] == 0
                and r.get("val_classes_predicted", 2) > 1]
    low, high = _range(setters, [y for _, _, ys, flags, _, kind in lines if kind == "sweep"
                                 for y, f in zip(ys, flags) if not f])
    marked = False
    for ax, xs, ys, flags, setting, kind in lines:
        color = style[setting]["color"]
        if kind == "fixed":
            ax.semilogx(xs, ys, marker="o", label=setting, **style[setting])
        else:
            ax.semilogx(xs, ys, marker=".", alpha=0.6, label=f"{setting} (auto sweep)", color=color, linestyle=":")
        marked |= _mark_collapsed(ax, [x for x, f in zip(xs, flags) if f], [y for y, f in zip(ys, flags) if f], low,
                                  color)
    if marked:
        _collapsed_legend(axes[0])
    for ax, cache in zip(axes, caches):
        ax.set_ylim(low, high)
        ax.set_title(names[cache], fontsize=10)
        ax.set_xlabel("C (inverse L2 regularisation strength)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("validation top-1")
    _finish_facets(fig, axes, bottom, "Validation accuracy against C (stars: chosen by C=auto)", path)
    return low, high


def _log_ticks(ax, values: list[float]) -> None:
    """Ticks at the values a curve was measured at, dropping any within 25% of the previous one
    (their labels would overlap), and no minor labels."""
    kept: list[float] = []
    for v in sorted(set(values)):
        if not kept or v >= 1.25 * kept[-1]:
            kept.append(v)
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(kept))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_learning_curve(curve: list[dict], path: str) -> list[float]:
    """Mean top-1 over repeats (line) and its spread (band: mean ± std) against the images the head
    learned from, one panel per cache; the y-range follows the runs that did not collapse. Returns
    the x ticks labelled (the first panel's)."""
    caches = list(dict.fromkeys(c["cache"] for c in curve))
    names = cache_labels(caches)
    settings = list(dict.fromkeys(f"{setting_label(c)}, C={c['C']}" for c in curve))
    style = dict(zip(settings, _styles(len(settings))))
    fig, axes, bottom = _facets(caches, len(settings) + 1)
    drawn = []
    for ax, cache in zip(axes, caches):
        for setting in settings:
            members = sorted((c for c in curve if c["cache"] == cache and f"{setting_label(c)}, C={c['C']}" == setting),
                             key=lambda c: c["train_fraction"])
            if members:
                drawn.append((ax, setting, members))
    low, high = _range([v for _, _, members in drawn for c in members if not c["collapsed"]
                        for v in (c["top1_mean"] - c["top1_std"], c["top1_mean"] + c["top1_std"])], [])
    marked = False
    for ax, setting, members in drawn:
        xs = [c["n_labelled"] for c in members]
        mean = np.array([c["top1_mean"] for c in members])
        std = np.array([c["top1_std"] for c in members])
        color = style[setting]["color"]
        ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.18, linewidth=0)
        ax.plot(xs, mean, marker="o", label=setting, **style[setting])
        flagged = [(x, m) for x, m, c in zip(xs, mean, members) if c["collapsed"]]
        marked |= _mark_collapsed(ax, [x for x, _ in flagged], [m for _, m in flagged], low, color)
    if marked:
        _collapsed_legend(axes[0])
    for ax, cache in zip(axes, caches):
        ax.set_xscale("log")
        _log_ticks(ax, [c["n_labelled"] for a, _, members in drawn if a is ax for c in members])
        ax.set_ylim(low, high)
        ax.set_title(names[cache], fontsize=10)
        ax.set_xlabel("labelled images the head learned from (log scale)")
        ax.grid(True, which="major", alpha=0.3)
    scored = {(c["n_scored"], tuple(c["scored_images"])) for c in curve}
    where = (f"every point scored on the same {next(iter(scored))[0]} images" if len(scored) == 1 else
             "points scored on different images: see summary.md")
    axes[0].set_ylabel("top-1 (line: mean, band: ± std over repeats)")
    ticks = list(axes[0].xaxis.get_major_locator().tick_values(0, 0))
    _finish_facets(fig, axes, bottom, f"Learning curve ({where})", path)
    return ticks


def plot_reliability(calibration: dict, where: str, path: str) -> tuple[float, float]:
    """Reliability diagram of a head's predictions before and after calibration: per bin of the top
    probability, accuracy against mean top probability (marker area: the bin's images), the
    diagonal where they agree, ECE in the legend; below, how many predictions fall in each bin.
    Returns the legend's top and the lowest panel's bottom (its x label included), both in display
    units from the figure's bottom: the legend covers nothing when the first is below the second."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6.4, 7.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    shown = [("before", calibration.get("before_label", "uncalibrated"), "tab:red", "s")]
    if calibration["method"] != "none":
        shown.append(("after", f"temperature T = {calibration['temperature']:.3g}", "tab:blue", "o"))
    bar = 0.9 / 15 / len(shown)  # 15 bins (calibration.ECE_BINS), the series side by side in each
    for i, (key, label, color, marker) in enumerate(shown):
        table = calibration[key]["reliability"]
        total = max(sum(table["count"]), 1)
        sizes = [20 + 400 * c / total for c in table["count"]]
        ax.plot(table["confidence"], table["accuracy"], color=color, linewidth=1, alpha=0.4)
        ax.scatter(table["confidence"], table["accuracy"], s=sizes, color=color, marker=marker, alpha=0.75,
                   label=f"{label}: ECE {calibration[key]['ece']:.3f}, log-loss {calibration[key]['log_loss']:.3f}")
        centres = [(lo + hi) / 2 + (i - (len(shown) - 1) / 2) * bar for lo, hi in zip(table["low"], table["high"])]
        hist.bar(centres, table["count"], width=bar, color=color, alpha=0.6)
    low = min([0.5] + [c for key, *_ in shown for c in calibration[key]["reliability"]["low"]])
    ax.set_xlim(low, 1.0)
    ax.set_ylim(min([low] + [a for key, *_ in shown for a in calibration[key]["reliability"]["accuracy"]]) - 0.02, 1.02)
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(f"Reliability on the {where}\n(n = {sum(calibration['before']['reliability']['count'])}, "
                 "15 bins of the top probability)", fontsize=10)
    # Below both panels: inside either, it hid points (accuracy 1.0 at low confidence) or tall bars.
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=1, frameon=False)
    ax.grid(True, alpha=0.3)
    hist.set_xlabel("top probability (confidence)")
    hist.set_ylabel("images")
    hist.set_ylim(0, 1.1 * max(c for key, *_ in shown for c in calibration[key]["reliability"]["count"]))
    hist.grid(True, alpha=0.3)
    fig.tight_layout(rect=(0, 0.01 + 0.022 * len(ax.get_legend_handles_labels()[1]), 1, 1))
    fig.savefig(path, dpi=120)
    renderer = fig.canvas.get_renderer()
    extents = fig.legends[0].get_window_extent(renderer).y1, hist.get_tightbbox(renderer).y0
    plt.close(fig)
    return extents


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
