"""Images per second on this CPU for model.pt (TorchScript), model.pt2 (torch.export) and model.onnx
(onnxruntime, CPU provider), on the same batch, in one run.

    python benchmarks/export_speed.py [--batch 16] [--rounds 3] [--aoti]

The model is the pretrained EfficientNet-Lite0 (offline weights) with a 2-class head; speed does not
depend on the head's values. The batch is real 500x375 photos from ../shared/data/hymenoptera/val
(random pixels of that size when the photos are absent): uint8 images in, probabilities out, so the
exact resize and crop inside each model are timed too. Each file is written by `pipeline.formats`
and loaded as `transfer predict` loads it. Rounds alternate the formats (this machine's speed drifts
between minutes); the median of each format's rounds is reported, with its ratio to model.pt.

--aoti also packages the torch.export program with AOTInductor (`aoti_compile_and_package`),
reporting the compile time and the packaged model's speed in the same rounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.shipping import formats  # noqa: E402
from pipeline.backbones import load_backbone  # noqa: E402
from pipeline.shipping.model import TransferModel  # noqa: E402
from pipeline.images import decode_image  # noqa: E402
from pipeline.shipping.formats import image_tensor  # noqa: E402
from pipeline.shipping.predict import load_model  # noqa: E402

VAL = ROOT.parent / "shared" / "data" / "hymenoptera" / "val"


def batch_of_photos(n: int) -> tuple[torch.Tensor, str]:
    """(n, 3, 375, 500) uint8: the val photos of that size (repeated if too few), or random pixels."""
    photos = [image_tensor(decode_image(str(p))) for p in sorted(VAL.rglob("*.jp*g"))] if VAL.is_dir() else []
    photos = [p for p in photos if tuple(p.shape) == (3, 375, 500)]
    if not photos:
        return torch.randint(0, 256, (n, 3, 375, 500), dtype=torch.uint8), "random pixels"
    return torch.stack([photos[i % len(photos)] for i in range(n)]), f"{min(n, len(photos))} distinct val photos"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--aoti", action="store_true", help="also time an AOTInductor package of model.pt2")
    args = parser.parse_args()

    backbone = load_backbone("efficientnet_lite0", "IMAGENET1K")
    torch.manual_seed(0)
    model = TransferModel(backbone.network, torch.randn(2, backbone.dim) * 0.05, torch.zeros(2), False,
                          backbone.preprocessing, ["ants", "bees"], {"format": "transfer.model",
                                                                     "classes": ["ants", "bees"]}).eval()
    images, what = batch_of_photos(args.batch)
    print(f"batch: {args.batch} images 375x500 ({what}); torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        runs, loaded = {}, {}
        program = formats.image_program(model)
        for fmt, suffix in formats.FORMATS.items():
            path = str(Path(folder) / f"model{suffix}")
            started = time.perf_counter()
            formats.write(fmt, model, path, program)
            written = time.perf_counter() - started
            loaded[fmt] = load_model(path, "cpu")
            runs[Path(path).name] = loaded[fmt].runner.images
            print(f"{Path(path).name}: written in {written:.1f} s (with torch.export: shared, not counted twice)")
        if args.aoti:
            started = time.perf_counter()
            package = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(folder) / "aoti.pt2"))
            print(f"AOTInductor package: compiled in {time.perf_counter() - started:.1f} s")
            compiled = torch._inductor.aoti_load_package(package)
            runs["aoti.pt2"] = lambda x: compiled(x).numpy()

        with torch.inference_mode():
            reference = runs["model.pt"](images)
            for name, run in runs.items():
                print(f"{name}: max |p - model.pt's p| {np.abs(run(images) - reference).max():.1e}")  # also a warm-up
            seconds = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    started = time.perf_counter()
                    run(images)
                    seconds[name].append(time.perf_counter() - started)
    base = args.batch / float(np.median(seconds["model.pt"]))
    print(f"\n{'file':<12} {'img/s (median)':>15} {'rounds':>24} {'vs model.pt':>12}")
    for name, s in seconds.items():
        rate = args.batch / float(np.median(s))
        rounds = ", ".join(f"{args.batch / x:.1f}" for x in s)
        print(f"{name:<12} {rate:>15.1f} {rounds:>24} {rate / base:>11.2f}x")


if __name__ == "__main__":
    main()
