"""How C should be chosen when the validation split is small: held-out validation vs k-fold CV.

From the real photos' EfficientNet-Lite0 features (hymenoptera: 245 train, 153 val images), n
labelled images per class are drawn from train (10 draws per n, seeded); `fit` carves its
validation split from them (stratified 20%) and C is chosen either on that split or by 5-fold
cross-validation on all n; the model refit on the n images is scored on the 153 untouched val
photos. The threshold MIN_VALIDATION_PER_CLASS in pipeline/fit.py comes from this table.

    .venv/bin/python benchmarks/small_validation.py [--cache cache/hymenoptera_lite0.h5]
(the cache: `transfer extract ../shared/data/hymenoptera --out cache/hymenoptera_lite0.h5 --backbone efficientnet_lite0`)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(ROOT / "cache" / "hymenoptera_lite0.h5"))
    parser.add_argument("--per-class", default="5,10,20,40,60,100")  # at most what train holds per class
    parser.add_argument("--draws", type=int, default=10)
    args = parser.parse_args()
    cache = pipeline.read_cache(args.cache)
    X, y = cache.features(dtype=np.float64), cache.labels
    held_out = "test" if (cache.split == "test").any() else "val"
    train, test = np.flatnonzero(cache.split == "train"), np.flatnonzero(cache.split == held_out)
    print(f"{args.cache}: {len(cache.classes)} classes; n per class drawn from train, scored on {len(test)} "
          f"{held_out} images")
    print(f"{'n/class':>8} {'val/class':>9} {'validation: test top-1':>24} {'5-fold CV: test top-1':>23} "
          f"{'CV better':>9} {'val worse by >2 imgs':>20}")
    for n in [int(v) for v in args.per_class.split(",")]:
        held, cv = [], []
        for draw in range(args.draws):
            rng = np.random.default_rng(draw)
            picked = np.concatenate([rng.choice(train[y[train] == c], n, replace=False) for c in range(len(cache.classes))])
            rows = np.concatenate([picked, test])
            split = ["train"] * len(picked) + ["test"] * len(test)
            data = (X[rows], y[rows], cache.classes, split)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                held.append(pipeline.fit(data, seed=draw, C_selection="validation").scores["top1"])
                cv.append(pipeline.fit(data, seed=draw, C_selection="cv").scores["top1"])
        held, cv = np.array(held), np.array(cv)
        val_per_class = n - int(round(0.8 * n)) if n >= 5 else 1
        print(f"{n:>8} {val_per_class:>9} {held.mean():>16.4f} ± {held.std():.4f} {cv.mean():>15.4f} ± {cv.std():.4f} "
              f"{int((cv > held).sum()):>5}/{args.draws} {int(((cv - held) * len(test) > 2).sum()):>16}/{args.draws}")


if __name__ == "__main__":
    main()
