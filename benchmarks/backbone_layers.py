"""The table of docs/backbones.md: EfficientNet-Lite0's features from its default layer, from two
earlier layers and flip-averaged, each extracted from the real ants/bees photos and fitted with
`transfer fit`'s defaults (C chosen on the validation split).

    .venv/bin/python benchmarks/backbone_layers.py [--photos ../shared/data/hymenoptera] [--out cache/layers]

Prints a Markdown table (val top-1, val log-loss, chosen C, extraction time) headed by the date,
the machine and the command. The photos have no test split, so the val scores are those of the
split that also chose C: optimistic for every row alike. Extraction times compare within one run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402

VARIANTS = [("default (global pool, penultimate)", {}),
            ("`--layer blocks.6` (last stage)", {"layer": "blocks.6"}),
            ("`--layer blocks.5`", {"layer": "blocks.5"}),
            ("`--tta flip`", {"tta": "flip"})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "hymenoptera"))
    parser.add_argument("--out", default=None, help="Folder for the caches [default: a temporary one].")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="backbone-layers-")
    os.makedirs(out, exist_ok=True)
    rows = []
    for label, options in VARIANTS:
        name = "-".join(f"{k}-{v}" for k, v in options.items()) or "default"
        cache = os.path.join(out, f"lite0-{name}.h5")
        summary = pipeline.extract(args.photos, cache, backbone="efficientnet_lite0", progress=False, **options)
        result = pipeline.fit(cache, progress=False)
        s = result.scores
        rows.append(f"| {label} | {result.head.weight.shape[1]} | {s['top1']:.3f} | {s['log_loss']:.3f} | "
                    f"{result.C:.2g} | {summary.seconds:.0f} s ({summary.images_per_second:.1f} img/s) |")
        print(f"{label}: scored on {result.evaluated_on}, n = {s['n']}", file=sys.stderr)
    cpu = platform.processor() or platform.machine()
    try:  # the CPU's model name ("AMD EPYC"); platform only knows the architecture on Linux
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    print(f"{datetime.date.today().isoformat()}, {os.cpu_count()} cores ({cpu}); {pipeline.version_line()}")
    print("`python benchmarks/backbone_layers.py`\n")
    print("| features | dim | val top-1 | val log-loss | chosen C | extract time (398 photos, same run) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
