"""Where to put the leak threshold: how similar near-copies are, against how similar different photos are.

On the real ants/bees photos (EfficientNet-Lite0 features): (a) every val photo's highest cosine
similarity (mean-centred features) to any train photo - different photos, some of them of the same
insect species; (b) 40 train photos saved again lightly changed - JPEG quality 70, resized to 90%,
and both - and extracted, each against its original. A threshold must sit above (a) and below (b).

    .venv/bin/python benchmarks/inspect_threshold.py [--cache cache/hymenoptera_lite0.h5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from pipeline.images import decode_image  # noqa: E402
from pipeline.reports.inspection import LEAK_THRESHOLD, _unit, cache_mean, image_path  # noqa: E402

CHANGES = {"jpeg q70": lambda im: (im, 70), "resized 90%": lambda im: (im.resize((im.width * 9 // 10, im.height * 9 // 10)), 95),
           "resized 75% + q70": lambda im: (im.resize((im.width * 3 // 4, im.height * 3 // 4)), 70)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(ROOT / "cache" / "hymenoptera_lite0.h5"))
    parser.add_argument("--copies", type=int, default=40)
    args = parser.parse_args()
    cache = pipeline.read_cache(args.cache)
    mean = cache_mean(cache)
    train, val = np.flatnonzero(cache.split == "train"), np.flatnonzero(cache.split == "val")
    T, V = _unit(cache.features(train), mean), _unit(cache.features(val), mean)
    nearest = (V @ T.T).max(1)
    print(f"(a) different photos, each val photo's nearest train photo ({len(val)}): max {nearest.max():.4f}, "
          f"99th percentile {np.percentile(nearest, 99):.4f}, median {np.median(nearest):.4f}; "
          f"above the threshold {LEAK_THRESHOLD}: {int((nearest >= LEAK_THRESHOLD).sum())}")
    picked = train[np.linspace(0, len(train) - 1, args.copies).round().astype(int)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, change in CHANGES.items():
            folder = Path(tmp) / name.replace(" ", "_").replace("%", "").replace("+", "")
            for i, row in enumerate(picked):
                image, quality = change(decode_image(image_path(cache, row)))
                (folder / "x").mkdir(parents=True, exist_ok=True)
                image.save(folder / "x" / f"{i:03d}.jpg", quality=quality)
            (folder / "y").mkdir()
            Image.new("RGB", (32, 32)).save(folder / "y" / "pad.jpg")  # a second class folder
            out = folder.with_suffix(".h5")
            pipeline.extract(folder, out, backbone=cache.provenance["backbone"])
            copies = pipeline.read_cache(out)
            rows = np.flatnonzero(copies.labels == copies.classes.index("x"))
            C = _unit(copies.features(rows), mean)
            sims = (C * _unit(cache.features(picked), mean)).sum(1)
            print(f"(b) {name:<18} copies of {len(picked)} train photos vs their originals: min {sims.min():.4f}, "
                  f"median {np.median(sims):.4f}; found at {LEAK_THRESHOLD}: {int((sims >= LEAK_THRESHOLD).sum())}")


if __name__ == "__main__":
    main()
