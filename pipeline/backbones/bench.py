"""`transfer backbones --bench`: how many images per second each backbone computes on this machine.

A short timed run of the network alone, as `extract` runs it (the same `Embedder`: channels_last,
autocast at the precision, normalization on the device), on random uint8 crops of the backbone's
input size. The architecture is what matters, not the weights, so random weights are used and
nothing is downloaded. Decoding and resizing photos are not included: `extract` adds them
(benchmarks/extract_throughput.py compares the network alone with extract end to end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from ..devices import resolve_device, resolve_precision
from ..progress import resolve
from ..settings import Interval, Options, validate
from .embedder import PRECISIONS, Embedder
from .registry import load_backbone

BATCH = {"cpu": 16, "cuda": 64}  # images per forward pass unless asked: extract's usual range on each
WARMUP_BATCHES = 1  # untimed: lazy initialisation, cuDNN's algorithm search, oneDNN's kernel choice
MIN_BATCHES = 2


@dataclass(frozen=True)
class BenchResult:
    """One backbone's speed: images/s over `batches` timed batches of `batch_size` (seconds in all)."""

    name: str
    device: str
    precision: str
    batch_size: int
    crop: int
    images_per_second: float
    batches: int
    seconds: float

    def line(self, width: int = 0) -> str:
        return (f"{self.name:<{width}}  {self.images_per_second:>8.1f} img/s  ({self.device}, {self.precision}, "
                f"batch {self.batch_size}, {self.crop}px, {self.batches} batches in {self.seconds:.1f} s)")


class BenchResults(list):
    """bench_backbones' BenchResult, one per backbone."""

    def lines(self) -> list[str]:
        width = max([len(r.name) for r in self] + [0])
        return [r.line(width) for r in self]


def bench_backbones(names, *, device: str = "auto", precision: str = "auto", batch_size: int | None = None,
          seconds: float = 5.0, layer: str | None = None, progress="auto") -> BenchResults:
    """Images per second of each backbone in `names` (as `--backbone` takes them) on `device` at
    `precision` (auto: what extract would choose), timed for about `seconds` each after one
    untimed batch. progress: one phase per backbone (see pipeline.progress).

    >>> [(r.name, round(r.images_per_second)) for r in bench_backbones(["resnet18", "efficientnet_lite0"])]
    """
    validate("seconds", seconds, [Interval(Real, 0, 600, closed="right")], "--seconds")
    validate("batch_size", batch_size, [None, Interval(Integral, 1, None)], "--batch-size")
    validate("precision", precision, [Options(("auto", *PRECISIONS))], "--precision")
    place = resolve_device(device)
    chosen = resolve_precision(precision, place).value
    size = batch_size or BATCH["cuda" if place.type == "cuda" else "cpu"]
    progress = resolve(progress)
    results = BenchResults()
    try:
        for name in names:
            backbone = load_backbone(name, weights="random", layer=layer)
            embedder = Embedder(backbone, place, chosen)
            crop = backbone.preprocessing.crop
            images = torch.randint(0, 256, (size, 3, crop, crop), dtype=torch.uint8)
            progress.phase(f"bench {name}", None, "batch")
            for _ in range(WARMUP_BATCHES):
                _run(embedder, images)
            done, started = 0, time.perf_counter()
            while done < MIN_BATCHES or time.perf_counter() - started < seconds:
                _run(embedder, images)
                done += 1
                progress.advance(1)
            elapsed = time.perf_counter() - started
            results.append(BenchResult(backbone.name, str(place), chosen, size, crop, done * size / elapsed, done,
                                       elapsed))
            del embedder, backbone
    finally:
        progress.close()
    return results


def _run(embedder: Embedder, images: torch.Tensor) -> None:
    out = embedder(images)
    if out.device.type == "cuda":
        torch.cuda.synchronize(out.device)  # the time of the work, not of its launch
