"""Incremental update vs fresh extraction, measured in one run (issue #15).

Generates N photo-sized JPEGs in 10 classes, extracts them (fresh), adds K more, and reruns the
same `extract` command, which updates the cache. Prints both wall times and their ratio.
Target: updating a 2,000-image VGG16 fp32 cache after adding 20 images takes < 5% of the fresh
extraction of the 2,000.

    .venv/bin/python benchmarks/extract_update.py [--images 2000] [--add 20] [--backbone vgg16]

Both runs are the command a user types (`python cli.py extract ...`, a new process each, start-up
included). Weights are random (seeded): pretrained VGG16 weights cannot be downloaded here, and
speed does not depend on their values. The update's reused rows are checked bit-equal to the
fresh cache's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import read_cache  # noqa: E402


def write_photo(path: Path, seed: int) -> None:
    """A 500x375 JPEG (quality 90) with smooth colour and fine texture: about the size of a
    photo in ImageNet (~110 KB), so decoding and reading cost what they cost for real photos."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500]
    base = rng.uniform(0, 255, 3) + xx[..., None] * rng.uniform(-0.3, 0.3, 3) + yy[..., None] * rng.uniform(-0.3, 0.3, 3)
    pixels = base + rng.normal(0, 18, (375, 500, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)


def extract(images: Path, out: Path, backbone: str) -> tuple[float, str]:
    command = [sys.executable, str(ROOT / "cli.py"), "extract", str(images), "--out", str(out),
               "--backbone", backbone, "--weights", "random", "--precision", "fp32"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return seconds, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--add", type=int, default=20)
    parser.add_argument("--backbone", default="vgg16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images, out = Path(tmp) / "photos", Path(tmp) / "photos.h5"
        for i in range(args.images):
            write_photo(images / f"class{i % 10}" / f"{i:05d}.jpg", i)
        size = sum(p.stat().st_size for p in images.rglob("*.jpg")) / args.images / 1024
        print(f"{args.images} JPEGs of 500x375, {size:.0f} KB on average; {args.backbone} fp32, random weights")

        fresh_s, _ = extract(images, out, args.backbone)
        fresh = read_cache(out)
        old_features, old_paths = fresh.features(), fresh.paths
        print(f"(a) fresh extraction of {args.images}: {fresh_s:.1f} s ({args.images / fresh_s:.2f} img/s end to end)")

        for i in range(args.add):
            write_photo(images / f"class{i % 10}" / f"new{i:05d}.jpg", 10**6 + i)
        update_s, log = extract(images, out, args.backbone)
        account = next(line for line in log.splitlines() if line.startswith("updating "))
        print(f"(b) update after adding {args.add}: {update_s:.1f} s; {account.split(': ', 1)[1]}")

        updated = read_cache(out)
        row = {p: i for i, p in enumerate(updated.paths)}
        rows = [row[p] for p in old_paths]
        assert updated.n == args.images + args.add
        assert np.array_equal(updated.features(rows), old_features), "reused rows differ from the fresh cache"
        print(f"b/a = {update_s / fresh_s:.4f} (target < 0.05); reused rows bit-equal to the fresh cache")


if __name__ == "__main__":
    main()
