"""Time and peak memory of `transfer inspect` on a synthetic cache (default 10,000 x 1,280, 10 classes).

Target: under 30 s and under 1 GB peak RSS on this 2-core machine. The features are Gaussian
classes with 50 planted near-copies across splits; the image files do not exist, so the page gets
placeholders (decoding real thumbnails adds about 20 ms per image shown, at most ~100 images).

    .venv/bin/python benchmarks/inspect_speed.py [--rows 10000] [--dim 1280]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pipeline  # noqa: E402
from _rss import peak_rss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1280)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    labels = np.arange(args.rows) % 10
    centres = rng.normal(0, 1, size=(10, args.dim)).astype(np.float32)
    X = centres[labels] + rng.normal(0, 2, size=(args.rows, args.dim)).astype(np.float32)
    # 70/10/20 per class (a split drawn from i % 10, as the labels are, put whole classes in one split)
    split = np.array(["train"] * 7 + ["val"] + ["test"] * 2)[(np.arange(args.rows) // 10) % 10]
    test, train = np.flatnonzero(split == "test")[:50], np.flatnonzero(split == "train")[:50]
    X[test] = X[train] + rng.normal(0, 0.01, size=(50, args.dim)).astype(np.float32)  # near-copies of train rows
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "synthetic.h5"
        pipeline.write_cache(cache, X, labels, classes=[f"c{i}" for i in range(10)], split=split)
        del X
        peak, seconds, result = peak_rss([sys.executable, str(ROOT / "cli.py"), "inspect", str(cache),
                                          "--out", str(Path(tmp) / "look")])
    print(result.stdout.strip())
    print(f"transfer inspect on {args.rows} x {args.dim}: {seconds:.1f} s (target < 30 s), "
          f"peak RSS {peak / 2**20:.0f} MiB (target < 1024 MiB)")


if __name__ == "__main__":
    main()
