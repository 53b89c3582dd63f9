"""Extraction throughput on real photos, measured in one run (issue: extract, "Speed and memory").

Prints three figures and two ratios for VGG16 at 224x224 on ../shared/data/hymenoptera:
  (a) the limit: model forward alone on already decoded and cropped tensors, in our configuration
  (b) our end-to-end `transfer extract` (decode, resize, forward, HDF5 writes)
  (c) the naive loop of torchvision's transfer-learning tutorial (ImageFolder + default DataLoader,
      fp32, NCHW), producing the same features
Targets at fp32 on the 2-core CPU: b/a >= 0.95, b/c >= 1.4, features of b equal to c's.

    .venv/bin/python benchmarks/extract_throughput.py [--limit N] [--precision bf16] [--device cuda]

Weights are random (seeded): pretrained VGG16 weights cannot be downloaded here, and speed does
not depend on their values.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backbones import Embedder, load_backbone  # noqa: E402
from pipeline import extract, read_cache  # noqa: E402
from pipeline.images import decode_image, scan_image_folder  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hymenoptera"


def subset_folder(limit: int | None, tmp: Path) -> Path:
    """The photos, or the first `limit` of them (symlinked, same layout)."""
    if limit is None:
        return DATA
    listing = scan_image_folder(DATA)
    step = max(1, len(listing) // limit)
    for rel in listing.paths[::step][:limit]:
        (tmp / "photos" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "photos" / rel).symlink_to(DATA / rel)
    return tmp / "photos"


def forward_only(folder: Path, batch: int, device: torch.device, precision: str, ours: bool = True) -> float:
    """Images per second of the forward pass alone on tensors decoded beforehand: (a) in our
    configuration (channels_last, the precision asked for) or, with ours=False, plain fp32 NCHW."""
    backbone = load_backbone("vgg16", "random")
    transform = backbone.preprocessing.pil_transform()
    listing = scan_image_folder(folder)
    crops = torch.stack([transform(decode_image(str(folder / p))) for p in listing.paths])
    if ours:
        embed = Embedder(backbone, device, precision)
    else:
        network = backbone.network.to(device)

        def embed(x):
            with torch.inference_mode():
                return network(backbone.preprocessing.normalize(x.to(device)))
    embed(crops[:batch])  # warm-up (and cuDNN autotuning)
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(crops), batch):
        embed(crops[i:i + batch]).cpu()
    sync(device)
    return len(crops) / (time.perf_counter() - start)


class _Clock:
    """A progress sink that timestamps every committed batch, for a steady-state rate."""

    def __init__(self):
        self.marks = []  # (time, images so far)
        self.count = 0

    def start(self, total, already):
        pass

    def advance(self, n):
        self.count += n
        self.marks.append((time.perf_counter(), self.count))


def steady_rate(marks: list[tuple[float, int]]) -> float:
    """Images per second after the first batch (which pays one-off kernel set-up in every loop)."""
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0)


def ours(folder: Path, out: Path, batch: int, device: str, precision: str, workers: int | None):
    """(b): the real command's library call. Also times every network call inside that same run,
    which gives the compute limit without drift between separate measurements.

    Returns (end-to-end rate, in-run forward-only rate, whole-loop rate, features by path, workers),
    the first two after the first batch (which pays one-off kernel set-up in every loop)."""
    clock, forward = _Clock(), []
    real_call = Embedder.__call__

    def timed_call(self, images):
        t = time.perf_counter()
        result = real_call(self, images)
        sync(result.device)
        forward.append((time.perf_counter() - t, len(images)))
        return result

    Embedder.__call__ = timed_call
    try:
        summary = extract(folder, out, backbone="vgg16", weights="random", batch_size=batch, device=device,
                          precision=precision, workers=workers, progress=clock)
    finally:
        Embedder.__call__ = real_call
    cached = read_cache(out)
    features = dict(zip(cached.paths, cached.features()))
    in_run_forward = sum(n for _, n in forward[1:]) / sum(t for t, _ in forward[1:])
    return steady_rate(clock.marks), in_run_forward, summary.images_per_second, features, summary.workers


def tutorial(folder: Path, batch: int, device: torch.device) -> tuple[float, float, dict]:
    """(c): https://pytorch.org/tutorials/beginner/transfer_learning_tutorial.html, used to embed."""
    model = torchvision.models.vgg16(weights=None)
    model.load_state_dict(load_backbone("vgg16", "random").network.state_dict(), strict=False)
    model.classifier = model.classifier[:-1]
    model.eval().to(device)
    preprocess = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    splits = [s for s in ("train", "val", "test") if (folder / s).is_dir()] or [""]
    features, marks, count = {}, [], 0
    start = time.perf_counter()
    for split in splits:
        data = datasets.ImageFolder(str(folder / split), preprocess)
        loader = torch.utils.data.DataLoader(data, batch_size=batch)
        rows = []
        with torch.no_grad():
            for x, _ in loader:
                rows.append(model(x.to(device)).cpu().numpy())
                count += len(x)
                marks.append((time.perf_counter(), count))
        for (path, _), row in zip(data.samples, np.concatenate(rows)):
            features[str(Path(path).relative_to(folder))] = row
    sync(device)
    return steady_rate(marks), count / (time.perf_counter() - start), features


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="use only N photos (default: all 398)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--skip-tutorial", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="alternate (b) and (c) this many times")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"real photos not found at {DATA}")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = subset_folder(args.limit, Path(tmp))
        n = len(scan_image_folder(folder))
        print(f"{n} photos, vgg16 224x224, batch {args.batch_size}, {args.precision} on {device}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        a = forward_only(folder, args.batch_size, device, args.precision)
        print(f"(a) forward only, decoded tensors : {a:7.2f} img/s  (separate pass, our configuration)")
        rounds = []
        for r in range(args.rounds):
            out = Path(tmp) / f"c{r}.h5"
            b, a_in_run, b_loop, ours_features, workers = ours(folder, out, args.batch_size, args.device,
                                                               args.precision, args.workers)
            print(f"round {r + 1}: (b) transfer extract {b:6.2f} img/s (whole loop {b_loop:.2f}; forward alone "
                  f"inside it {a_in_run:.2f}; {workers} decode workers)   b/a = {b / a_in_run:.3f}")
            c, c_loop, tutorial_features = (None, None, None) if args.skip_tutorial else tutorial(
                folder, args.batch_size, device)
            if c:
                print(f"         (c) tutorial loop    {c:6.2f} img/s (whole loop {c_loop:.2f})   b/c = {b / c:.3f}")
            rounds.append((b, a_in_run, c))
        b = float(np.median([r[0] for r in rounds]))
        ratio_a = float(np.median([r[0] / r[1] for r in rounds]))
        print(f"b/a = {ratio_a:.3f}  median over rounds (target >= 0.95; a = the forward calls inside the same run)")
        print(f"b/a = {b / a:.3f}  against the separate pass (includes drift between passes)")
        if args.skip_tutorial:
            return
        ratio_c = float(np.median([r[0] / r[2] for r in rounds]))
        d = forward_only(folder, args.batch_size, device, "fp32", ours=False)
        print(f"b/c = {ratio_c:.3f}  median over rounds (target >= 1.4)")
        print(f"(d) forward only, fp32 NCHW       : {d:7.2f} img/s  -> ceiling for b/c on this machine: a/d = "
              f"{a / d:.3f}")
        common = sorted(set(ours_features) & set(tutorial_features))  # ImageFolder skips .gif
        x = np.stack([ours_features[p] for p in common])
        y = np.stack([tutorial_features[p] for p in common])
        diff = np.abs(x - y).max()
        scale = np.abs(y).max()
        close = np.allclose(x, y, rtol=1e-4, atol=1e-5 * scale)
        print(f"features b vs c on {len(common)} common photos: max |diff| {diff:.2e} (max |feature| {scale:.2e}); "
              f"equal within fp32 tolerance: {close}")


if __name__ == "__main__":
    main()
