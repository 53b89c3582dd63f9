"""`transfer predict` with each model format vs `transfer extract`: marginal images/s on the same real
photos (full size, mixed sizes), same backbone and precision, in one run.

    python benchmarks/predict_vs_extract.py [--small 100] [--rounds 1] [--backbone efficientnet_lite0] [--keep]

Marginal rate: each call runs on the first `--small` photos and on all of them; (all - small) /
(t_all - t_small) leaves out what a call costs whatever its size (imports, building the network or
loading the model file, the first batch's warm-up), so the figure is the per-photo rate a long job
sees. Rounds alternate extract, model.pt, model.onnx and model.pt2 (this machine's speed drifts between
minutes); the median of each one's rounds is reported with its ratio to extract's. The model files
come from `transfer fit` on the photos' own cache (the head's values do not change the speed).
Photos: ../shared/data/hymenoptera (train and val, 398).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "hymenoptera"


def linked_folder(files: list[Path], root: Path, dst: Path) -> Path:
    """A folder of symlinks to `files`, keeping their split/class layout under `root`."""
    for f in files:
        target = dst / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(f)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    parser.add_argument("--small", type=int, default=100, help="photos in the short call (default 100)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (caches, run, model files)")
    args = parser.parse_args()
    if not args.photos.is_dir():
        sys.exit(f"photos not found at {args.photos}")
    files = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    small = files[::max(1, len(files) // args.small)][:args.small]  # every k-th: both classes, both splits
    work = Path(tempfile.mkdtemp(prefix="predict-vs-extract-"))
    try:
        run(args, files, small, work)
    finally:
        if args.keep:
            print(f"kept {work} (the model files are in {work / 'run'})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args, files: list[Path], small: list[Path], work: Path) -> None:
    folders = {"small": linked_folder(small, args.photos, work / "small"),
               "all": linked_folder(files, args.photos, work / "all")}
    sizes = {"small": len(small), "all": len(files)}
    print(f"{len(files)} photos ({len(small)} in the short call), backbone {args.backbone}, "
          f"precision {args.precision}; torch threads {__import__('torch').get_num_threads()}", flush=True)

    cache = work / "all.h5"
    pipeline.extract(folders["all"], cache, backbone=args.backbone, precision=args.precision, progress=False)
    exported = pipeline.export(pipeline.fit(str(cache), work / "run", progress=False), formats="all", progress=False)
    models = {os.path.basename(p): pipeline.load_model(p, "cpu") for p in exported.paths.values()}
    print("precision inside the model files:", exported.precision, f"({exported.precision_why})", flush=True)

    def extract_seconds(which: str, k: int) -> float:
        started = time.perf_counter()
        pipeline.extract(folders[which], work / f"x-{which}-{k}.h5", backbone=args.backbone,
                         precision=args.precision, progress=False)
        return time.perf_counter() - started

    def predict_seconds(name: str, which: str) -> float:
        started = time.perf_counter()
        said = pipeline.predict(models[name], [folders[which]], progress=False)
        assert len(said) == sizes[which] and not [p for p in said if p.error], name
        return time.perf_counter() - started

    rates: dict[str, list[float]] = {"extract": [], **{name: [] for name in models}}
    for k in range(args.rounds):
        for name in rates:
            t = {which: (extract_seconds(which, k) if name == "extract" else predict_seconds(name, which))
                 for which in ("small", "all")}
            rate = (sizes["all"] - sizes["small"]) / (t["all"] - t["small"])
            rates[name].append(rate)
            print(f"round {k + 1}: {name:<10} {t['small']:6.1f} s for {sizes['small']}, {t['all']:6.1f} s for "
                  f"{sizes['all']}: {rate:5.1f} img/s marginal", flush=True)
    base = statistics.median(rates["extract"])
    print(f"\n{'':<12} {'img/s (median)':>15} {'vs extract':>11}")
    for name, r in rates.items():
        print(f"{name:<12} {statistics.median(r):>15.1f} {statistics.median(r) / base:>10.2f}x")


if __name__ == "__main__":
    main()
