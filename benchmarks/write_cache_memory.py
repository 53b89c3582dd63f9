"""Peak memory of `pipeline.write_cache` fed a generator of blocks: a cache larger than memory.

Writes N x D float32 features (default 524,288 x 1,024 = 2 GiB) as blocks of 8,192 rows with
labels and splits, in a fresh process, and samples its peak RSS. Target: under 300 MB.

    .venv/bin/python benchmarks/write_cache_memory.py [--rows 524288] [--dim 1024]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _rss import peak_rss  # noqa: E402

WRITER = """
import sys
import numpy as np
sys.path.insert(0, {root!r})
import pipeline

rows, dim, block = {rows}, {dim}, 8192

def blocks():
    rng = np.random.default_rng(0)
    for lo in range(0, rows, block):
        b = min(block, rows - lo)
        labels = (np.arange(lo, lo + b) % 10).astype(np.int64)
        split = np.where(np.arange(lo, lo + b) % 5 == 0, "val", "train")
        yield rng.standard_normal((b, dim), dtype=np.float32), labels, split

cache = pipeline.write_cache({out!r}, blocks(), classes=[f"c{{i}}" for i in range(10)])
print(cache.n, cache.dim)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=524_288)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        out = os.path.join(tmp, "big.h5")
        code = WRITER.format(root=str(ROOT), rows=args.rows, dim=args.dim, out=out)
        peak, seconds, result = peak_rss([sys.executable, "-c", code])
        size = os.path.getsize(out)
    print(f"wrote {result.stdout.split()[0]} x {args.dim} float32 from a generator: {size / 2**30:.2f} GiB in {seconds:.0f} s")
    print(f"peak RSS of the writing process: {peak / 2**20:.0f} MiB  (target < 300 MB)")


if __name__ == "__main__":
    main()
