"""model.pt2's classify part with and without batch norm folded into the convolutions (`folding`), on one
batch of crops, alternating, in one process; and how far the folded probabilities move.

    python benchmarks/fold_speed.py [--backbone efficientnet_lite0] [--batch 16] [--rounds 5]

The program is the one `transfer export --format pt2` writes (pretrained backbone, a random head of 3
classes: the head does not change the speed), exported once; the folded copy is that program folded.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.backbones import load_backbone  # noqa: E402
from pipeline.shipping import folding, formats, parts  # noqa: E402
from pipeline.shipping.model import TransferModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    backbone = load_backbone(args.backbone)
    prep = backbone.preprocessing
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.normal(size=(3, backbone.dim)).astype(np.float32) * 0.05)
    model = TransferModel(backbone.network.eval(), weight, torch.zeros(3), False, prep, ["a", "b", "c"],
                          {}).eval()
    original = formats.image_program(model, fold=False)
    folded = copy.deepcopy(original)
    count = folding.fold_batch_norms(folded)
    classify = {name: parts.program_parts(p.module())[1] for name, p in (("unfolded", original), ("folded", folded))}
    crop = prep.crop
    crops = torch.from_numpy(rng.integers(0, 256, (args.batch, 3, crop, crop), dtype=np.uint8))
    print(f"{args.backbone}: {count} batch norms folded; batch of {args.batch} crops of {crop}; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in classify}
    with torch.inference_mode():
        outputs = {name: part(crops) for name, part in classify.items()}  # warm-up
        for r in range(args.rounds):
            for name, part in classify.items():
                started = time.perf_counter()
                part(crops)
                times[name].append(time.perf_counter() - started)
            print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)
    unfolded, done = (statistics.median(times[n]) for n in ("unfolded", "folded"))
    diff = float((outputs["folded"] - outputs["unfolded"]).abs().max())
    print(f"\nmedian: unfolded {args.batch / unfolded:.1f} img/s, folded {args.batch / done:.1f} img/s: "
          f"{unfolded / done:.2f}x; max |p diff| folded vs unfolded {diff:.1e}")


if __name__ == "__main__":
    main()
