"""Loading a model.pt2: plain `torch.export.load` vs the load `pipeline.load_model` does (each distinct
symbolic shape expression parsed once), alternating, in one process.

    python benchmarks/pt2_load.py MODEL.pt2 [--rounds 3]

Both read the same program (tests/test_shipping_formats.py checks it); the figure is the time of
`torch.export.load` alone, without the seal check or building the runner, median of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.shipping import formats  # noqa: E402


def timed_load(path: Path, once: bool) -> float:
    started = time.perf_counter()
    with open(path, "rb") as f:
        if once:
            with formats._expressions_parsed_once():
                torch.export.load(f)
        else:
            torch.export.load(f)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"plain": [], "parsed once": []}
    for r in range(args.rounds):
        for name in times:
            times[name].append(timed_load(args.model, name == "parsed once"))
            print(f"round {r + 1}: {name:12s} {times[name][-1]:.2f} s", flush=True)
    plain, once = (statistics.median(t) for t in times.values())
    print(f"\nmedian: plain torch.export.load {plain:.2f} s, parsed once {once:.2f} s: {plain / once:.1f}x faster")


if __name__ == "__main__":
    main()
