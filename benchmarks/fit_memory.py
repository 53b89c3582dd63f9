"""Peak memory of `transfer fit` on a large cache, against the float64 feature matrix it must hold.

Writes a synthetic cache of N x D float32 features (default 50,000 x 4,096, 800 MB) in blocks,
then runs `transfer fit --no-export` in a fresh process and samples its peak RSS. The constant
(Python, NumPy, scikit-learn, h5py) is measured the same way on a 200-row cache. Target:
peak - constant <= 1.3 x (N x D x 8 bytes).

    .venv/bin/python benchmarks/fit_memory.py [--rows 50000] [--dim 4096] [--C 1.0|auto]
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

from _rss import peak_rss  # noqa: E402
import pipeline  # noqa: E402

CLASSES = 10


def write_cache(path: Path, rows: int, dim: int, seed: int = 0) -> None:
    """Gaussian classes, written block by block with `pipeline.write_cache` (never all in memory)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.15, size=(CLASSES, dim)).astype(np.float32)

    def blocks():
        for lo in range(0, rows, 2048):
            rows_here = np.arange(lo, min(lo + 2048, rows))
            labels = rows_here % CLASSES
            part_of = (rows_here // CLASSES) % 10  # 60/20/20, independent of the label
            split = np.where(part_of < 6, "train", np.where(part_of < 8, "val", "test"))
            yield centres[labels] + rng.normal(0, 1, size=(len(rows_here), dim)).astype(np.float32), labels, split

    pipeline.write_cache(path, blocks(), classes=[f"c{i}" for i in range(CLASSES)],
                         provenance={"backbone": "synthetic", "layer": "synthetic", "seed": seed})


def fit_peak(path: Path, C: str, tmp: str) -> tuple[int, float]:
    peak, seconds, _ = peak_rss([sys.executable, str(ROOT / "cli.py"), "fit", str(path), "--C", C, "--no-export",
                                 "--max-iter", "300", "--out", str(Path(tmp) / f"run-{path.stem}")])
    return peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--C", default="1.0", help="a fixed C (fast) or auto (the full sweep)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "small.h5", Path(tmp) / "large.h5"
        write_cache(small, 200, args.dim)
        write_cache(large, args.rows, args.dim)
        constant, _ = fit_peak(small, args.C, tmp)
        peak, seconds = fit_peak(large, args.C, tmp)
    matrix = args.rows * args.dim * 8
    print(f"float64 feature matrix {args.rows} x {args.dim}: {matrix / 2**30:.2f} GiB")
    print(f"constant (same fit on 200 rows): {constant / 2**20:.0f} MiB")
    print(f"peak RSS of the fit: {peak / 2**30:.2f} GiB  ({seconds:.0f} s, --C {args.C})")
    print(f"(peak - constant) / matrix = {(peak - constant) / matrix:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
