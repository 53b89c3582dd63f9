"""Listing + reading N tiny images as a folder tree vs as tar shards (WebDataset), same run.

    python benchmarks/shards_vs_folder.py [--images 20000] [--shards 20] [--rounds 3]

Writes N small JPEGs (32x32, ~1 KB) under CLASS folders in a temporary folder and packs the same
files (with a .cls label each) into S uncompressed tar shards. Then, in alternating rounds, times
what an extraction does before decoding: the listing (`images.scan_image_folder` vs
`extraction.webdataset.read_shards`, which reads tar headers and the .cls members) and reading
every image's bytes (open + read per file vs sequential reads inside each shard). Prints files/s
for each and their ratio; the best round of each is kept. The page cache is warm after the first
round: on a network file system, where each open and stat is a round trip, the gap is larger.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.extraction.webdataset import read_shards  # noqa: E402
from pipeline.images import scan_image_folder  # noqa: E402

CLASSES = 10


def make_data(folder: Path, n: int, shards: int) -> tuple[Path, str]:
    rng = np.random.default_rng(0)
    images = folder / "images"
    names = []
    for i in range(n):
        cls = f"class{i % CLASSES:02d}"
        path = images / cls / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(pixels).save(path, quality=90)
        names.append(f"{cls}/{i:06d}.jpg")
    order = rng.permutation(n)  # shards mix the classes, as real shards do
    for s, chunk in enumerate(np.array_split(order, shards)):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tar:
            for i in chunk:
                tar.add(images / names[i], arcname=names[i])
                label = names[i].split("/")[0].encode()
                info = tarfile.TarInfo(names[i][:-4] + ".cls")
                info.size = len(label)
                tar.addfile(info, io.BytesIO(label))
    return images, str(folder / f"shard-{{000000..{shards - 1:06d}}}.tar")


def folder_round(images: Path) -> tuple[float, float, int]:
    t = time.perf_counter()
    listing = scan_image_folder(images)
    listed = time.perf_counter()
    total = 0
    for p in listing.paths:
        with open(os.path.join(listing.root, p), "rb") as f:
            total += len(f.read())
    return listed - t, time.perf_counter() - listed, total


def shards_round(spec: str) -> tuple[float, float, int]:
    t = time.perf_counter()
    listing = read_shards(spec)
    listed = time.perf_counter()
    total = 0
    order = np.lexsort((listing.offsets, listing.shard_of))  # what the extraction loop does: shard by shard
    current, f = None, None
    for i in order.tolist():
        shard = listing.shards[int(listing.shard_of[i])]
        if shard != current:
            if f:
                f.close()
            f, current = open(shard, "rb"), shard
        f.seek(int(listing.offsets[i]))
        total += len(f.read(int(listing.lengths[i])))
    if f:
        f.close()
    return listed - t, time.perf_counter() - listed, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shards-vs-folder-") as tmp:
        t = time.perf_counter()
        images, spec = make_data(Path(tmp), args.images, args.shards)
        print(f"wrote {args.images} images ({CLASSES} classes) and {args.shards} shards in {time.perf_counter() - t:.0f} s")
        best = {"folder": (np.inf, np.inf), "shards": (np.inf, np.inf)}
        for r in range(args.rounds):
            runs = [("folder", lambda: folder_round(images)), ("shards", lambda: shards_round(spec))]
            for name, run in runs if r % 2 == 0 else runs[::-1]:
                listing_s, reading_s, total = run()
                best[name] = (min(best[name][0], listing_s), min(best[name][1], reading_s))
                print(f"round {r}: {name:6s} listing {listing_s:6.2f} s, reading {reading_s:6.2f} s ({total / 2**20:.1f} MB)")
        n = args.images
        for name, (listing_s, reading_s) in best.items():
            print(f"{name:6s}: listing {n / listing_s:9,.0f} files/s, reading {n / reading_s:9,.0f} files/s, "
                  f"both {n / (listing_s + reading_s):9,.0f} files/s")
        f, s = best["folder"], best["shards"]
        print(f"shards / folder: listing {f[0] / s[0]:.2f}x, reading {f[1] / s[1]:.2f}x, "
              f"both {(f[0] + f[1]) / (s[0] + s[1]):.2f}x (higher: shards faster)")


if __name__ == "__main__":
    main()
