"""Peak memory of `transfer extract` does not grow with the number of images (streaming writes).

Generates N and 10 x N photos-sized JPEGs (640x480), extracts each in a fresh process and prints
the peak RSS of the whole process tree for both, and their ratio (target: about 1).

    .venv/bin/python benchmarks/extract_memory.py [--n 150] [--backbone efficientnet_lite0]

The backbone does not change the shape of the result, only its constant: efficientnet_lite0 with
random weights keeps the 10x run to a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _rss import peak_rss  # noqa: E402


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = folder / f"class{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
        Image.fromarray(base).resize((640, 480), Image.BILINEAR).save(cls / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=150)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.n, 10 * args.n):
            images = Path(tmp) / f"images{n}"
            make_images(images, n)
            out = Path(tmp) / f"c{n}.h5"
            peak, seconds, _ = peak_rss([sys.executable, str(ROOT / "cli.py"), "extract", str(images), "--out",
                                         str(out), "--backbone", args.backbone, "--weights", "random"])
            results.append((n, peak, seconds, out.stat().st_size))
            print(f"{n:6d} images: peak RSS {peak / 2**20:7.1f} MiB  ({seconds:.0f} s, cache "
                  f"{out.stat().st_size / 2**20:.1f} MiB)")
    (n1, p1, _, s1), (n2, p2, _, s2) = results
    print(f"peak RSS ratio {n2} vs {n1} images: {p2 / p1:.3f}  (cache size ratio {s2 / s1:.1f}; target: RSS ratio ~1)")


if __name__ == "__main__":
    main()
