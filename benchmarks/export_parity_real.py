"""The three exported formats on the real photos: do model.onnx and model.pt2 decide as model.pt does?

    python benchmarks/export_parity_real.py [--cache cache/h.h5]

Extracts ../shared/data/hymenoptera with the pretrained EfficientNet-Lite0 (or reads --cache, such
an extraction), fits the head on the train photos only, exports model.pt, model.onnx and model.pt2
(each checked at export), and runs each file on every raw val photo, decoded once and given to each
format as is (the resize is inside every file). Prints top-1 per format, and for model.onnx
(onnxruntime, CPU) and model.pt2 (torch.export): argmax agreement with model.pt and max |p - p_pt|.
tests/test_formats.py::test_real_photos_onnx_and_pt2_agree_with_model_pt checks every fourth photo.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from pipeline.images import decode_image  # noqa: E402
from pipeline.shipping.formats import image_tensor  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hymenoptera"
# attributes write_cache sets itself (as tests/conftest.py's subset_cache leaves them out)
WRITER_OWNED = ("state", "num_images", "num_failed", "num_listed", "assembled", "format", "format_version",
                "listing_sha256", "classes", "dim")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=None, help="an efficientnet_lite0 extraction of the photos")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or str(Path(tmp) / "h.h5")
        if args.cache is None:
            pipeline.extract(str(DATA), cache, backbone="efficientnet_lite0")
        full = pipeline.read_cache(cache)
        train = np.flatnonzero(full.split == "train")
        pipeline.write_cache(Path(tmp) / "train.h5", full.features(train), full.labels[train], classes=full.classes,
                             paths=[full.paths[i] for i in train],
                             provenance={k: v for k, v in full.provenance.items() if k not in WRITER_OWNED})
        started = time.perf_counter()
        exported = pipeline.export(pipeline.fit(str(Path(tmp) / "train.h5")), Path(tmp) / "model", formats="all")
        print(f"export of all three formats, each checked: {time.perf_counter() - started:.0f} s")
        models = {fmt: pipeline.load_model(path, "cpu") for fmt, path in exported.paths.items()}
        files = sorted((DATA / "val").rglob("*.*"))
        probs = {fmt: [] for fmt in models}
        seconds = {fmt: 0.0 for fmt in models}
        for f in files:
            image = image_tensor(decode_image(str(f)))
            for fmt, model in models.items():
                started = time.perf_counter()
                probs[fmt].append(model.runner.run([model.runner.prepare(image)])[0])
                seconds[fmt] += time.perf_counter() - started
    truth = np.array([models["torchscript"].classes.index(f.parent.name) for f in files])
    reference = np.array(probs["torchscript"])
    print(f"{len(files)} raw val photos, one at a time")
    for fmt, p in probs.items():
        p = np.array(p)
        line = f"{Path(exported.paths[fmt]).name:<11} top-1 {np.mean(p.argmax(1) == truth):.4f}"
        if fmt != "torchscript":
            line += (f"  same argmax as model.pt on {int(np.sum(p.argmax(1) == reference.argmax(1)))}/{len(files)}"
                     f"  max |p - p_pt| {np.abs(p - reference).max():.1e}")
        print(f"{line}  ({len(files) / seconds[fmt]:.1f} img/s)")


if __name__ == "__main__":
    main()
