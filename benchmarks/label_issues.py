"""Suspect labels against labels flipped on purpose: precision and recall of `transfer fit`'s and
`transfer inspect`'s list (reports.inspection.label_issues), next to cleanlab's find_label_issues
on the same out-of-fold probabilities.

10% of the train+val labels are flipped (to another class drawn at random), seeded; C is chosen as
`transfer fit` chooses it on the noisy cache (`inspection.auto_C`), the out-of-fold probabilities
are those of `inspection.out_of_fold` (stratified 5-fold), and then:

  ours                       inspection.confident_issues: given label below its class's threshold
                             and another class above its own (cleanlab's thresholds)
  cleanlab default           cleanlab.filter.find_label_issues(labels, pred_probs)
                             (filter_by="prune_by_noise_rate")
  cleanlab confident_learning  find_label_issues(..., filter_by="confident_learning")

Two caches: the real ants/bees photos' EfficientNet-Lite0 features (398 images, 2 classes;
extracted into --workdir unless --cache names one), and synthetic 10-class Gaussian features
(1,000 x 64, overlapping like real ones). --seeds draws of the flipped labels each.

    pip install '.[bench]'        # cleanlab
    python benchmarks/label_issues.py [--cache cache/hymenoptera_lite0.h5] [--seeds 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from pipeline.cache import ArrayCache  # noqa: E402
from pipeline.reports.inspection import auto_C, confident_issues, labelled_rows, out_of_fold  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "hymenoptera"
FLIPPED = 0.10


def hymenoptera(cache: str | None, workdir: Path) -> ArrayCache:
    if cache is None:
        cache = str(workdir / "hymenoptera_lite0.h5")
        if not Path(cache).exists():
            subprocess.run([sys.executable, str(ROOT / "cli.py"), "extract", str(PHOTOS), "--out", cache,
                            "--backbone", "efficientnet_lite0"], check=True)
    c = pipeline.read_cache(cache)
    return ArrayCache(c.features(), c.labels, c.classes, c.split)


def synthetic(seed: int = 0) -> ArrayCache:
    """1,000 images in 10 classes, 64-d: class centres N(0, 0.35^2) per feature plus N(0, 1) noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(1000) % 10
    X = rng.normal(0, 0.35, (10, 64))[y] + rng.standard_normal((1000, 64))
    split = np.where(rng.permutation(1000) % 5 == 0, "val", "train")  # 20% val, classes mixed
    return ArrayCache(X.astype(np.float32), y, [f"c{k}" for k in range(10)], split)


def flip(cache: ArrayCache, seed: int) -> tuple[ArrayCache, np.ndarray]:
    """A copy with FLIPPED of the train+val labels changed to another class; the flipped rows."""
    rng = np.random.default_rng(seed)
    rows = labelled_rows(cache)
    flipped = np.sort(rng.choice(rows, size=int(round(FLIPPED * len(rows))), replace=False))
    labels = cache.labels.copy()
    k = len(cache.classes)
    labels[flipped] = (labels[flipped] + rng.integers(1, k, size=len(flipped))) % k
    return ArrayCache(cache.features(), labels, cache.classes, cache.split), flipped


def score(found: np.ndarray, flipped: np.ndarray) -> tuple[float, float, int]:
    hits = len(np.intersect1d(found, flipped))
    return (hits / len(found) if len(found) else float("nan")), hits / len(flipped), len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None, help="the real photos' Lite0 cache (default: extracted into --workdir)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    from cleanlab.filter import find_label_issues  # the reference, from the bench extra

    work = Path(args.workdir or tempfile.mkdtemp(prefix="label-issues-"))
    work.mkdir(parents=True, exist_ok=True)
    datasets = {"hymenoptera (Lite0, 2 classes)": hymenoptera(args.cache, work),
                "synthetic (10 classes)": synthetic()}
    print("| data | flips | C (fit's choice) | list | found | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    for name, clean in datasets.items():
        totals: dict[str, list] = {}
        Cs = []
        for seed in range(args.seeds):
            noisy, flipped = flip(clean, seed)
            C = auto_C(noisy)
            Cs.append(C)
            rows, proba, _, _ = out_of_fold(noisy, labelled_rows(noisy), C)
            y = noisy.labels[rows]
            lists = {"ours (confident learning, ranked by margin)": rows[confident_issues(proba, y)[0]],
                     "cleanlab find_label_issues (default)": rows[find_label_issues(y, proba)],
                     "cleanlab find_label_issues (confident_learning)":
                         rows[find_label_issues(y, proba, filter_by="confident_learning")]}
            for label, found in lists.items():
                totals.setdefault(label, []).append(score(found, flipped))
        for label, results in totals.items():
            p, r, n = (np.array(v, dtype=float) for v in zip(*results))
            print(f"| {name} | {len(flipped)} | {np.median(Cs):.3g} (median of {len(Cs)}) | {label} | "
                  f"{n.mean():.1f} | {np.nanmean(p):.3f} ± {np.nanstd(p):.3f} | {r.mean():.3f} ± {r.std():.3f} |")


if __name__ == "__main__":
    main()
