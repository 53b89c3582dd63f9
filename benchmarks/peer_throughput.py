"""Peers: `transfer extract` against img2vec-pytorch and the PyTorch tutorial loop, same weights (issue #16).

For each network (VGG16, ResNet50, EfficientNet-Lite0), on the same real photos, files to features:
  ours-default  `pipeline.extract` as a user runs it: --precision auto, CPU batch probed, --decode auto
  ours-fp32     the same with --precision fp32
  img2vec-one   img2vec_pytorch.Img2Vec.get_vec(image), one PIL image at a time (its README's usage)
  img2vec-list  Img2Vec.get_vec([images]), lists of 32
  tutorial      the transfer-learning tutorial's ImageFolder + DataLoader(batch 32) + fp32 NCHW loop
All five run the same weights (img2vec's model constructors are handed our network). The methods run
in alternating rounds (the order reversed every round) and each ratio is the median of the per-round
ratios, so that drift of this shared machine cancels out. Targets: ours-fp32 >= 1.3x img2vec-one,
ours-default >= 2x img2vec-one. img2vec squashes images to 224x224 without a crop, so only speeds are
compared, not features.

    pip install --no-deps img2vec_pytorch      # its own requirements (torch, torchvision, numpy) are ours
    .venv/bin/python benchmarks/peer_throughput.py [--limit 96] [--rounds 2] [--models vgg16,resnet50,efficientnet_lite0]

VGG16 and ResNet50 weights are random (seeded; pretrained ones cannot be downloaded here); Lite0's are
the pretrained ones. Speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import devices, extract  # noqa: E402
from pipeline.backbones import load_backbone  # noqa: E402
from pipeline.images import scan_image_folder  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hymenoptera"
WEIGHTS = {"vgg16": "random", "resnet50": "random", "efficientnet_lite0": None}
IMG2VEC_NAME = {"vgg16": "vgg16", "resnet50": "resnet50", "efficientnet_lite0": "efficientnet_b0"}


def subset(limit: int | None, tmp: Path) -> Path:
    """`limit` photos spread evenly over the listing (symlinks, same layout), or all of them."""
    if limit is None:
        return DATA
    listing = scan_image_folder(DATA)
    for rel in listing.paths[:: max(1, len(listing) // limit)][:limit]:
        (tmp / "photos" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "photos" / rel).symlink_to(DATA / rel)
    return tmp / "photos"


class Lite0ForImg2Vec(nn.Module):
    """timm's Lite0 with img2vec's EfficientNet interface: `.features` ends at the 1280x7x7 map."""

    def __init__(self, timm_model: nn.Module, classifier: nn.Module):
        super().__init__()
        m = timm_model
        self.features = nn.Sequential(m.conv_stem, m.bn1, m.blocks, m.conv_head, m.bn2)
        self.pool, self.classifier = nn.AdaptiveAvgPool2d(1), classifier

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def full_model(name: str) -> nn.Module:
    """Our backbone with its last layer put back: the whole network img2vec expects, our weights."""
    backbone = load_backbone(name, WEIGHTS[name], 0)
    if name == "vgg16":  # img2vec reads classifier[-2]: fc7 after its ReLU (and Dropout), as ours
        backbone.network.classifier = nn.Sequential(*backbone.network.classifier, backbone.last_layer)
        return backbone.network.eval()
    if name == "resnet50":
        backbone.network.fc = backbone.last_layer
        return backbone.network.eval()
    return Lite0ForImg2Vec(backbone.network, backbone.last_layer).eval()


def img2vec_for(name: str):
    """img2vec_pytorch.Img2Vec built around our network (its constructors would download weights)."""
    from img2vec_pytorch import img_to_vec

    constructor = {"vgg16": "vgg16_bn", "resnet50": "resnet50", "efficientnet_lite0": "efficientnet_b0"}[name]
    saved = getattr(img_to_vec, constructor)
    setattr(img_to_vec, constructor, lambda weights=None: full_model(name))
    try:
        return img_to_vec.Img2Vec(cuda=False, model=IMG2VEC_NAME[name])
    finally:
        setattr(img_to_vec, constructor, saved)


def files_of(folder: Path) -> list[Path]:
    listing = scan_image_folder(folder)
    return [folder / p for p in listing.paths]


def run_img2vec_one(img2vec, files: list[Path]) -> float:
    started = time.perf_counter()
    for f in files:
        img2vec.get_vec(Image.open(f).convert("RGB"))
    return len(files) / (time.perf_counter() - started)


def run_img2vec_list(img2vec, files: list[Path], batch: int = 32) -> float:
    started = time.perf_counter()
    for i in range(0, len(files), batch):
        img2vec.get_vec([Image.open(f).convert("RGB") for f in files[i:i + batch]])
    return len(files) / (time.perf_counter() - started)


def run_tutorial(name: str, network: nn.Module, folder: Path) -> float:
    """https://pytorch.org/tutorials/beginner/transfer_learning_tutorial.html, used to embed."""
    prep = load_backbone(name, "random").preprocessing
    preprocess = transforms.Compose([transforms.Resize(prep.resize, interpolation=transforms.InterpolationMode(
        prep.interpolation)), transforms.CenterCrop(prep.crop), transforms.ToTensor(),
        transforms.Normalize(prep.mean, prep.std)])
    splits = [s for s in ("train", "val", "test") if (folder / s).is_dir()] or [""]
    count, started = 0, time.perf_counter()
    for split in splits:
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder / split), preprocess), batch_size=32)
        with torch.no_grad():
            for x, _ in loader:
                network(x)
                count += len(x)
    return count / (time.perf_counter() - started)


def run_ours(name: str, folder: Path, out: Path, **options) -> tuple[float, dict]:
    out.unlink(missing_ok=True)
    summary = extract(folder, out, backbone=name, weights=WEIGHTS[name], **options)
    return summary.images_per_second, {"batch": summary.batch_size, "precision": summary.precision,
                                       "decode": summary.decode}


def bench(name: str, folder: Path, tmp: Path, rounds: int) -> dict[str, float]:
    files = files_of(folder)
    img2vec = img2vec_for(name)
    trunk = load_backbone(name, WEIGHTS[name], 0).network.eval()
    # Ours once before timing: the CPU batch probe runs (and is remembered) outside the rounds; on a
    # run this short extract would skip it (devices.PROBE_MIN_IMAGES), a user's long run would not.
    devices.PROBE_MIN_IMAGES = 0
    _, settings = run_ours(name, folder, tmp / "warm.h5")
    _, settings32 = run_ours(name, folder, tmp / "warm32.h5", precision="fp32")
    print(f"{name}: {len(files)} photos; ours-default = {settings}, ours-fp32 batch {settings32['batch']}", flush=True)
    methods = {
        "ours-default": lambda: run_ours(name, folder, tmp / "a.h5")[0],
        "ours-fp32": lambda: run_ours(name, folder, tmp / "b.h5", precision="fp32")[0],
        "img2vec-one": lambda: run_img2vec_one(img2vec, files),
        "img2vec-list": lambda: run_img2vec_list(img2vec, files),
        "tutorial": lambda: run_tutorial(name, trunk, folder),
    }
    rates: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for m in order:
            rates[m].append(methods[m]())
        print(f"  round {r + 1}: " + ", ".join(f"{m} {rates[m][-1]:.2f}" for m in methods) + " img/s", flush=True)
    ratios = {f"{a} / {b}": float(np.median([x / y for x, y in zip(rates[a], rates[b])]))
              for a in ("ours-default", "ours-fp32") for b in ("img2vec-one", "img2vec-list", "tutorial")}
    for k, v in ratios.items():
        print(f"  {k:32s} {v:5.2f}x", flush=True)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=96, help="photos per method and round (default 96; 0: all 398)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", default="vgg16,resnet50,efficientnet_lite0")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"real photos not found at {DATA}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians over {args.rounds} alternating rounds")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = subset(args.limit or None, Path(tmp))
        for name in args.models.split(","):
            results[name] = bench(name, folder, Path(tmp), args.rounds)
    print("\n| network | ours-default / img2vec-one | ours-fp32 / img2vec-one | ours-default / img2vec-list | "
          "ours-default / tutorial |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ours-default / img2vec-one']:.2f}x | {r['ours-fp32 / img2vec-one']:.2f}x | "
              f"{r['ours-default / img2vec-list']:.2f}x | {r['ours-default / tutorial']:.2f}x |")


if __name__ == "__main__":
    main()
