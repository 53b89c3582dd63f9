"""Extraction throughput on real photos, measured in one run (issue: extract, "Speed and memory"; #16).

Section `base` prints three figures and two ratios for VGG16 at 224x224 on ../shared/data/hymenoptera:
  (a) the limit: model forward alone on already decoded and cropped tensors, in our configuration
  (b) our end-to-end `transfer extract` (decode, resize, forward, HDF5 writes)
  (c) the naive loop of torchvision's transfer-learning tutorial (ImageFolder + default DataLoader,
      fp32, NCHW), producing the same features
Targets at fp32 on the 2-core CPU: b/a >= 0.95, b/c >= 1.4, features of b equal to c's.

Sections added by issue #16, each in alternating rounds (ratios are medians of per-round ratios):
  precision  VGG16 end to end, --precision bf16 vs fp32 (same batch): speed ratio, features' cosine
  lite0      pretrained EfficientNet-Lite0 on all photos, bf16 vs fp32: linear-probe val top-1 of each
  decode     --decode torch vs pil on this CPU: decode+resize+crop alone, crops bit-equal, and Lite0
             features of both paths
  probe      the CPU batch probe for VGG16, ResNet50 and Lite0 (bf16), and ResNet50 end to end at the
             probed batch vs batch 32
  overlap    Lite0 bf16: the share of the loop spent waiting for decoded images, decoding inline vs
             in a thread vs in one worker process

    .venv/bin/python benchmarks/extract_throughput.py [--only base,precision,lite0,decode,probe,overlap]
        [--limit N] [--precision bf16] [--device cuda]

Weights are random (seeded): pretrained VGG16 weights cannot be downloaded here, and speed does
not depend on their values.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.backbones import Embedder, load_backbone  # noqa: E402
from pipeline import extract, read_cache  # noqa: E402
from pipeline.extraction import decode as decoding  # noqa: E402
from pipeline.devices import resolve_precision  # noqa: E402
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


def base(args, folder: Path, tmp: str) -> None:
    device = torch.device(args.device)
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



# --- issue #16 ---------------------------------------------------------------------------------------

def cosine_rows(a: dict, b: dict) -> np.ndarray:
    common = sorted(set(a) & set(b))
    x = np.stack([a[p] for p in common]).astype(np.float64)
    y = np.stack([b[p] for p in common]).astype(np.float64)
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def run(folder: Path, out: Path, **options):
    """`pipeline.extract` into a fresh file: (summary, features by path)."""
    out.unlink(missing_ok=True)
    summary = extract(folder, out, **options)
    cached = read_cache(out)
    return summary, dict(zip(cached.paths, cached.features()))


def alternating(configs: dict, rounds: int, call) -> dict[str, list]:
    """call(name, config) for every config, the order reversed every other round."""
    results = {name: [] for name in configs}
    for r in range(rounds):
        for name in (list(configs) if r % 2 == 0 else list(reversed(configs))):
            results[name].append(call(name, configs[name]))
    return results


def precision_section(args, folder: Path, tmp: str) -> None:
    n = len(scan_image_folder(folder))
    configs = {"fp32": "fp32", "bf16": "bf16"}
    res = alternating(configs, args.rounds, lambda name, p: run(
        folder, Path(tmp) / f"p-{name}.h5", backbone="vgg16", weights="random", precision=p,
        batch_size=args.batch_size, device=args.device))
    ratio = np.median([b[0].images_per_second / f[0].images_per_second for b, f in zip(res["bf16"], res["fp32"])])
    c = cosine_rows(res["bf16"][-1][1], res["fp32"][-1][1])
    for name in configs:
        print(f"[precision] VGG16 {n} photos, --precision {name}, batch {args.batch_size}: "
              + ", ".join(f"{s.images_per_second:.2f}" for s, _ in res[name]) + " img/s by round")
    print(f"[precision] bf16 / fp32 end to end = {ratio:.2f}x (target >= 1.6); features cosine mean {c.mean():.6f}, "
          f"min {c.min():.6f} (target mean >= 0.999); auto here: {resolve_precision('auto', torch.device('cpu')).why}")


def lite0_section(args, tmp: str) -> None:
    import pipeline

    results = {}
    for p in ("fp32", "bf16"):
        summary, _ = run(DATA, Path(tmp) / f"l-{p}.h5", backbone="efficientnet_lite0", precision=p, batch_size=32,
                         device=args.device)
        fitted = pipeline.fit(str(Path(tmp) / f"l-{p}.h5"))
        cache = fitted.cache
        val = np.flatnonzero(cache.split == "val")
        results[p] = (fitted, fitted.pipeline.predict(cache.features(val, dtype=np.float64)), summary)
        print(f"[lite0] pretrained Lite0, {summary.done} photos, --precision {p}: val top-1 "
              f"{fitted.scores['top1']:.4f} (C {fitted.C:.3g}; {summary.images_per_second:.1f} img/s)")
    differ = int((results["fp32"][1] != results["bf16"][1]).sum())
    top1 = {p: r[0].scores["top1"] for p, r in results.items()}
    n_val = len(results["fp32"][1])
    print(f"[lite0] val top-1 fp32 {top1['fp32']:.4f} vs bf16 {top1['bf16']:.4f}: "
          f"{abs(top1['fp32'] - top1['bf16']) * n_val:.0f} image(s) apart of {n_val} (target <= 1); "
          f"{differ} val predictions differ")


def decode_section(args, tmp: str) -> None:
    listing = scan_image_folder(DATA)
    prep = load_backbone("vgg16", "random").preprocessing
    rows = list(range(len(listing)))

    def decode_only(name, decode):
        started = time.perf_counter()
        batches = list(decoding.batches(str(DATA), listing.paths, rows, prep, 32, 0, torch.device("cpu"), decode))
        return len(rows) / (time.perf_counter() - started), torch.cat([b.images for b in batches])

    res = alternating({"pil": "pil", "torch": "torch"}, args.rounds, decode_only)
    ratio = np.median([t[0] / p[0] for t, p in zip(res["torch"], res["pil"])])
    equal = torch.equal(res["torch"][-1][1], res["pil"][-1][1])
    for name in res:
        print(f"[decode] decode + resize + crop alone, --decode {name}, {len(rows)} photos: "
              + ", ".join(f"{r[0]:.1f}" for r in res[name]) + " img/s by round")
    print(f"[decode] torch / pil = {ratio:.3f}x on this CPU -> auto is {'torch' if ratio > 1 else 'pil'} here; "
          f"crops bit-equal: {equal}")
    feats = {d: run(DATA, Path(tmp) / f"d-{d}.h5", backbone="efficientnet_lite0", decode=d, batch_size=32,
                    device="cpu")[1] for d in ("pil", "torch")}
    c = cosine_rows(feats["torch"], feats["pil"])
    same = all(np.array_equal(feats["torch"][p], feats["pil"][p]) for p in feats["pil"])
    print(f"[decode] Lite0 features, torch vs pil decode, {len(c)} photos: cosine min {c.min():.7f} "
          f"(target >= 0.9999); bit-equal: {same}")


def probe_section(args, folder: Path, tmp: str) -> None:
    from pipeline import devices

    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu).value
    chosen = {}
    for name in ("vgg16", "resnet50", "efficientnet_lite0"):
        embedder = Embedder(load_backbone(name, "random"), cpu, precision)
        images = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8)
        probe = devices.probe_batch_size(lambda n: embedder(images[:n]))
        chosen[name] = probe.best
        print(f"[probe] {name} {precision}: batch {probe.best} in {probe.seconds:.1f} s; img/s by batch "
              + ", ".join(f"{n}: {r:.1f}" for n, r in probe.rates.items()))
    configs = {"probed": chosen["resnet50"], "32": 32}
    res = alternating(configs, args.rounds, lambda name, b: run(
        folder, Path(tmp) / f"b-{name}.h5", backbone="resnet50", weights="random", batch_size=b, device="cpu")[0])
    ratio = np.median([p.images_per_second / t.images_per_second for p, t in zip(res["probed"], res["32"])])
    n = len(scan_image_folder(folder))
    print(f"[probe] ResNet50 {precision} end to end on {n} photos, batch {chosen['resnet50']} (probed) / batch 32 = "
          f"{ratio:.2f}x (" + "; ".join(f"{k}: " + ", ".join(f"{s.images_per_second:.1f}" for s in v)
                                        for k, v in res.items()) + " img/s)")


def overlap_section(args, tmp: str) -> None:
    extract_module = sys.modules["pipeline.extraction.run"]  # where the loop asks for batches
    real = decoding.batches

    def one(name, _):
        prefetch, workers = name == "thread", (1 if name == "process" else 0)
        extract_module.decoding = types.SimpleNamespace(**{**vars(decoding), "batches": lambda *a, **k: real(
            *a, **{**k, "prefetch": prefetch})})
        cpu0, child0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            summary, _ = run(DATA, Path(tmp) / f"o-{name}.h5", backbone="efficientnet_lite0", batch_size=16,
                             workers=workers, device="cpu")
        finally:
            extract_module.decoding = decoding
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = time.process_time() - cpu0 + (child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime)
        loop = summary.processed / summary.images_per_second
        return summary.images_per_second, summary.input_seconds / loop, cpu / summary.processed

    res = alternating({"inline": 0, "thread": 0, "process": 0}, args.rounds, one)
    for name, rs in res.items():
        print(f"[overlap] Lite0 bf16 batch 16, decoding {name:7s}: " + "; ".join(
            f"{ips:.1f} img/s, waiting {share:.0%}, {cpu * 1e3:.0f} ms CPU/img" for ips, share, cpu in rs))
    for name in ("thread", "process"):
        ratio = np.median([o[0] / i[0] for o, i in zip(res[name], res["inline"])])
        print(f"[overlap] {name} / inline = {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="base,precision,lite0,decode,probe,overlap")
    parser.add_argument("--limit", type=int, default=None, help="use only N photos (default: all 398) in base, "
                                                                 "precision and probe")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--skip-tutorial", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the compared runs this many times")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"real photos not found at {DATA}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder = subset_folder(args.limit, Path(tmp))
        sections = {"base": lambda: base(args, folder, tmp), "precision": lambda: precision_section(args, folder, tmp),
                    "lite0": lambda: lite0_section(args, tmp), "decode": lambda: decode_section(args, tmp),
                    "probe": lambda: probe_section(args, folder, tmp), "overlap": lambda: overlap_section(args, tmp)}
        for name in args.only.split(","):
            sections[name]()


if __name__ == "__main__":
    main()
