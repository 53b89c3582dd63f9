"""GPU check: every GPU-only path of `transfer`, run once, in one command, with one table (issue #16).

On a machine with a GPU (well inside 8 minutes on an H100; no network needed):

    PYTHONPATH=. python benchmarks/gpu_check.py --out $OUT [--photos DIR]

(a device machine receives only the checkout: copy ../shared/data/hymenoptera (46 MB) into a folder
of the checkout that .git/info/exclude ignores, carry it, and pass it as --photos)

Here, on the CPU, the same steps in well under a minute (tests/test_gpu_check.py runs it):

    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --limit 8 --out /tmp/gpu-check

Steps, each a row of the table (and of gpu_check.json / gpu_check.md under --out):
  1. the real photos (../shared/data/hymenoptera) extracted on the CPU in fp32: the reference;
  2. the same on the device in bf16, with --decode pil and --decode torch (decode_jpeg on the device):
     img/s, GPU utilization, the share of the loop spent waiting for decoded images, and the
     features' cosine to the CPU fp32 reference and between the two decode paths;
  3. the device resize (pipeline/extraction/decode.py) on Pillow-decoded pixels vs Pillow's resize: bit for bit;
     nvJPEG's pixels vs libjpeg-turbo's (reported);
  4. a row's features in another batch (batch 64 vs the default) agree within the README's tolerance;
  5. a synthetic set of 10,000 JPEGs written here (random sizes from 333x500 to 1280x960), both
     decode paths in alternating rounds: img/s, GPU utilization, decode share, cosine between paths;
  6. fit + export on the device cache (export checks model.pt against scikit-learn on the CPU);
  7. model.pt loaded onto the device and run on the real photos, vs model.pt on the CPU.
Any check out of its bound makes the exit code 1. Weights are random (seeded; no download).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from pipeline import devices  # noqa: E402
from pipeline.extraction import decode as decoding  # noqa: E402
from pipeline.images import decode_image, scan_image_folder  # noqa: E402
from pipeline.shipping.formats import image_tensor  # noqa: E402

# The real photos: ../shared beside a developer's checkout, or shared/ inside it (the device machines
# receive only the checkout: copy the photos into an ignored folder of it and pass --photos).
DATA = next((p for p in (ROOT.parent / "shared" / "data" / "hymenoptera", ROOT / "shared" / "data" / "hymenoptera")
             if p.is_dir()), ROOT.parent / "shared" / "data" / "hymenoptera")
SIZES = [(640, 480), (500, 375), (800, 600), (480, 640), (1024, 768), (375, 500), (333, 500), (1280, 960)]
PRECISION_COSINE_MEAN, PRECISION_COSINE_MIN = 0.999, 0.99  # bf16 on the device vs fp32 on the CPU
DECODE_COSINE_MEAN, DECODE_COSINE_MIN = 0.9999, 0.999  # --decode torch vs pil, same device and precision
BATCH_COSINE_MIN = 0.9999  # README: a row computed in another batch
MODEL_PT_TOLERANCE = 1e-2  # model.pt on the device (fp32, TF32 convolutions allowed) vs on the CPU
STARTED = time.perf_counter()


class Report:
    """The table: rows of (step, what, figure, bound, ok); written to --out after every row."""

    def __init__(self, out: Path, env: dict):
        self.out, self.env, self.rows, self.started = out, env, [], time.perf_counter()

    def add(self, step: str, what: str, figure: str, bound: str = "", ok: bool | None = None, **data) -> None:
        self.rows.append({"step": step, "what": what, "figure": figure, "bound": bound, "ok": ok, **data})
        mark = "" if ok is None else ("ok" if ok else "FAIL")
        print(f"[{time.perf_counter() - self.started:6.1f} s] {step:10s} {what}: {figure} {bound} {mark}", flush=True)
        self.write()

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["ok"] is False]

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps({"environment": self.env, "rows": self.rows,
                                                              "seconds": time.perf_counter() - self.started}, indent=1))
        lines = ["| step | what | figure | bound | check |", "|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['what']} | {r['figure']} | {r['bound']} | "
                  f"{'' if r['ok'] is None else ('ok' if r['ok'] else '**FAIL**')} |" for r in self.rows]
        (self.out / "gpu_check.md").write_text("\n".join(
            [f"{k}: {v}" for k, v in self.env.items()] + ["", *lines, ""]))

    def table(self) -> str:
        width = max(len(r["what"]) for r in self.rows)
        return "\n".join(f"{r['step']:10s} {r['what']:{width}s}  {r['figure']:42s} {r['bound']:18s} "
                         f"{'' if r['ok'] is None else ('ok' if r['ok'] else 'FAIL')}" for r in self.rows)


class Utilization:
    """Samples GPU utilization (%) every 0.2 s while running: torch.cuda.utilization (pynvml), else
    nvidia-smi; `summary()` gives 'mean% (max%)', or why it could not be read."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.why = device, [], ""
        self._stop = threading.Event()
        self._read = self._reader()

    def _reader(self):
        if self.device.type != "cuda":
            self.why = "n/a on the CPU"
            return None
        try:
            torch.cuda.utilization(self.device)
            return lambda: torch.cuda.utilization(self.device)
        except Exception:  # noqa: BLE001 - pynvml missing or NVML unusable: try nvidia-smi
            pass
        smi = shutil.which("nvidia-smi")
        if smi is None:
            self.why = "unavailable (no pynvml, no nvidia-smi)"
            return None
        index = str(self.device.index or 0)

        def read():
            out = subprocess.run([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", index],
                                 capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
        return read

    def __enter__(self):
        if self._read is not None:
            threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self):
        while not self._stop.wait(0.2):
            try:
                self.samples.append(float(self._read()))
            except Exception:  # noqa: BLE001
                self.why = "read failed"
                return

    def __exit__(self, *exc):
        self._stop.set()

    def summary(self) -> str:
        if not self.samples:
            return self.why or "no samples"
        return f"{np.mean(self.samples):.0f}% (max {max(self.samples):.0f}%)"


def build_backbones_once() -> None:
    """VGG16's random initialisation takes seconds: build each backbone once, hand out copies."""
    extract_module = importlib.import_module("pipeline.extraction.plan")
    real, built = extract_module.load_backbone, {}

    def cached(name, weights=None, seed=0, **kwargs):
        key = (name, weights, seed, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = real(name, weights, seed, **kwargs)
        return copy.deepcopy(built[key])

    extract_module.load_backbone = cached


def real_subset(limit: int | None, tmp: Path) -> Path:
    """The real photos, or `limit` of them spread evenly over every split and class (symlinks)."""
    if limit is None:
        return ARGS.photos
    listing = scan_image_folder(ARGS.photos)
    groups: dict[tuple, list[str]] = {}
    for path, label, split in zip(listing.paths, listing.labels, listing.splits or [""] * len(listing)):
        groups.setdefault((split, int(label)), []).append(path)
    per_group = max(1, limit // len(groups))
    for paths in groups.values():
        for rel in paths[:: max(1, len(paths) // per_group)][:per_group]:
            (tmp / "real" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "real" / rel).symlink_to(ARGS.photos / rel)
    return tmp / "real"


def _write_jpeg(job) -> None:
    from PIL import Image

    path, seed = job
    w, h = SIZES[seed % len(SIZES)]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pixels = (rng.uniform(30, 220, 3) + 40 * np.sin(xx[..., None] / rng.uniform(5, 60))
              * np.cos(yy[..., None] / rng.uniform(5, 60)) + rng.normal(0, 6, (h, w, 3)))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def synthetic_set(n: int, tmp: Path) -> Path:
    """n JPEGs in two classes, written in parallel."""
    root = tmp / "synthetic"
    jobs = []
    for i in range(n):
        folder = root / ("a" if i % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{i:05d}.jpg"), i))
    with multiprocessing.get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
        pool.map(_write_jpeg, jobs, chunksize=64)
    return root


def run_extract(folder: Path, out: Path, device: str, **options) -> dict:
    """One `pipeline.extract`; returns its summary figures and features by path."""
    if time.perf_counter() - STARTED > ARGS.max_seconds:
        raise TimeoutError(f"--max-seconds {ARGS.max_seconds} spent; the remaining runs were skipped")
    with Utilization(torch.device(device)) as util:
        summary = pipeline.extract(folder, out, device=device, backbone=ARGS.backbone, weights="random",
                                   workers=ARGS.workers, **options)
    cached = pipeline.read_cache(out)
    loop = summary.processed / summary.images_per_second if summary.images_per_second else float("nan")
    return {"ips": summary.images_per_second, "share": summary.input_seconds / loop if loop else float("nan"),
            "util": util.summary(), "features": dict(zip(cached.paths, cached.features())),
            "failed": summary.failed, "batch": summary.batch_size, "precision": summary.precision,
            "decode": summary.decode}


def cosines(a: dict, b: dict) -> np.ndarray:
    common = sorted(set(a) & set(b))
    x = np.stack([a[p] for p in common]).astype(np.float64)
    y = np.stack([b[p] for p in common]).astype(np.float64)
    return (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)


def check_cosine(report: Report, step: str, what: str, a: dict, b: dict, mean_bound: float, min_bound: float) -> None:
    c = cosines(a, b)
    ok = len(c) == len(a) == len(b) and c.mean() >= mean_bound and c.min() >= min_bound
    report.add(step, what, f"cosine mean {c.mean():.6f}, min {c.min():.6f} ({len(c)} rows)",
               f">= {mean_bound} / {min_bound}", bool(ok), cosine_mean=float(c.mean()), cosine_min=float(c.min()))


def speed_row(report: Report, step: str, what: str, r: dict) -> None:
    report.add(step, what, f"{r['ips']:.1f} img/s, GPU {r['util']}, decode share {r['share']:.0%}",
               f"batch {r['batch']}", None, images_per_second=r["ips"], decode_share=r["share"], gpu_utilization=r["util"])


def check_resize(report: Report, folder: Path, device: torch.device) -> None:
    """The device resize on Pillow-decoded pixels == Pillow's resize; nvJPEG pixels vs libjpeg-turbo's."""
    prep = importlib.import_module("pipeline.extraction.plan").load_backbone(ARGS.backbone, "random").preprocessing
    transform = prep.pil_transform()
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:64]
    equal, pixel_diff = 0, []
    for p in paths:
        image = decode_image(str(p))
        crop = decoding.resize_crop([image_tensor(image).to(device)], prep)[0].cpu()
        equal += bool(torch.equal(crop, transform(image)))
        encoded = decoding.read_jpeg(str(p))
        if encoded is not None:
            x = decoding.decode_jpegs([encoded.data], device)[0]
            if x is not None:
                x = decoding.orient(x, encoded.orientation).cpu()
                ref = image_tensor(image)
                if x.shape == ref.shape:
                    pixel_diff.append((x.int() - ref.int()).abs().float().mean().item())
                else:
                    pixel_diff.append(float("inf"))
    report.add("resize", "device resize vs Pillow, bit for bit", f"{equal} of {len(paths)} crops equal",
               "all", equal == len(paths))
    report.add("resize", "decode_jpeg pixels vs Pillow's (mean |diff| per image)",
               f"max {max(pixel_diff, default=0):.3f}, mean {np.mean(pixel_diff or [0]):.3f} grey levels",
               "(reported)", None)


def check_model_pt(report: Report, model_path: str, folder: Path, device: torch.device) -> None:
    """model.pt on the device vs on the CPU, on up to 16 photos (one by one: their sizes differ)."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:16]
    on_device = torch.jit.load(model_path, map_location=str(device))
    on_cpu = torch.jit.load(model_path, map_location="cpu") if device.type != "cpu" else None
    worst, same, seconds = 0.0, True, 0.0
    with torch.inference_mode():
        for p in paths:
            x = image_tensor(decode_image(str(p))).unsqueeze(0)
            started = time.perf_counter()
            got = on_device(x.to(device)).double().cpu()
            seconds += time.perf_counter() - started
            if on_cpu is None:
                continue
            expected = on_cpu(x).double()
            worst = max(worst, float((got - expected).abs().max()))
            top2 = expected.sort(dim=1).values[0, -2:]
            if top2[1] - top2[0] > 2 * MODEL_PT_TOLERANCE:
                same &= bool(got.argmax() == expected.argmax())
    speed = f"{len(paths) / seconds:.1f} img/s one by one (TorchScript specializes on each new size)"
    if on_cpu is None:
        report.add("model.pt", f"model.pt on the CPU, {len(paths)} photos", speed, "(ran)", True)
        return
    report.add("model.pt", f"model.pt on {device} vs on the CPU, {len(paths)} photos",
               f"max |p diff| {worst:.1e}, same argmax {same}; {speed}", f"<= {MODEL_PT_TOLERANCE:.0e}",
               worst <= MODEL_PT_TOLERANCE and same, max_abs_diff=worst)


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--photos", type=Path, default=DATA, help=f"the real photos (default: {DATA})")
    parser.add_argument("--limit", type=int, default=None, help="real photos to use (default: all 398); also caps "
                                                                 "the synthetic set")
    parser.add_argument("--synthetic", type=int, default=10_000, help="synthetic JPEGs to write and extract")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: extract's)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two decode paths")
    parser.add_argument("--max-seconds", type=float, default=420,
                        help="no extraction starts after this (the rest is reported as skipped, a failure)")
    ARGS = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation notices
    device = torch.device(ARGS.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU visible; run with --device cpu to check the script itself", file=sys.stderr)
        return 2
    ARGS.photos = ARGS.photos.resolve()
    if not ARGS.photos.is_dir():
        print(f"error: real photos not found at {ARGS.photos}; pass --photos DIR", file=sys.stderr)
        return 2
    n_synthetic = min(ARGS.synthetic, ARGS.limit) if ARGS.limit else ARGS.synthetic
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
           "cpu_cores": os.cpu_count(), "backbone": ARGS.backbone,
           "precision auto here": devices.resolve_precision("auto", device).why,
           "decode auto here": decoding.resolve_decode("auto", device).why}
    report = Report(Path(ARGS.out), env)
    build_backbones_once()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        steps = [("photos", lambda: photos_steps(report, tmp, device)),
                 ("synthetic", lambda: synthetic_steps(report, tmp, device, n_synthetic))]
        for name, step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - one failing step still leaves the others' rows
                report.add(name, "step raised", f"{type(e).__name__}: {' '.join(str(e).split())[:150]}", "", False,
                           traceback=traceback.format_exc())
    if device.type == "cuda":
        report.env["max_gpu_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    report.env["seconds"] = round(time.perf_counter() - report.started, 1)
    report.write()
    print("\n" + report.table())
    print(f"\n{len(report.failed)} check(s) failed; {report.env['seconds']} s; results in {ARGS.out}")
    return 1 if report.failed else 0


def photos_steps(report: Report, tmp: Path, device: torch.device) -> None:
    folder = real_subset(ARGS.limit, tmp)
    n = len(scan_image_folder(folder))
    reference = run_extract(folder, tmp / "cpu.h5", "cpu", precision="fp32", decode="pil", batch_size=32)
    speed_row(report, "photos", f"{n} real photos, CPU fp32 (the reference)", reference)
    runs = {}
    for decode in ("pil", "torch"):
        runs[decode] = run_extract(folder, tmp / f"{decode}.h5", str(device), precision="bf16",
                                   decode=decode)
        speed_row(report, "photos", f"{n} real photos, {device} bf16, --decode {decode}", runs[decode])
        check_cosine(report, "photos", f"--decode {decode}: bf16 on {device} vs CPU fp32", runs[decode]["features"],
                     reference["features"], PRECISION_COSINE_MEAN, PRECISION_COSINE_MIN)
        report.add("photos", f"--decode {decode}: failed images", f"{runs[decode]['failed']} "
                   f"(CPU reference {reference['failed']})", "equal", runs[decode]["failed"] == reference["failed"])
    check_cosine(report, "photos", "--decode torch vs pil (same device, bf16)", runs["torch"]["features"],
                 runs["pil"]["features"], DECODE_COSINE_MEAN, DECODE_COSINE_MIN)
    equal = all(np.array_equal(runs["torch"]["features"][p], runs["pil"]["features"][p]) for p in runs["pil"]["features"])
    report.add("photos", "--decode torch vs pil, features bit-equal", str(equal), "(reported)", None)
    other = 64 if n > 64 else 3
    again = run_extract(folder, tmp / "batch.h5", str(device), precision="bf16", decode="torch",
                        batch_size=other)
    c = cosines(again["features"], runs["torch"]["features"])
    same = all(np.array_equal(again["features"][p], f) for p, f in runs["torch"]["features"].items())
    report.add("batch", f"rows in batches of {other} vs {runs['torch']['batch']}",
               f"cosine min {c.min():.7f}; bit-equal {same}", f">= {BATCH_COSINE_MIN}",
               bool(c.min() >= BATCH_COSINE_MIN), cosine_min=float(c.min()))
    check_resize(report, folder, device)
    cache_path = tmp / "torch.h5"
    result = pipeline.fit(str(cache_path), C=1.0)
    exported = pipeline.export(result, str(tmp / "model"))
    e = exported.parity["torchscript"]["end_to_end"]
    report.add("export", f"fit (top-1 {result.scores['top1']:.3f} on {result.evaluated_on}) + export",
               f"model.pt vs scikit-learn on {e['images']} photos: max |p diff| {e['max_abs_diff']:.1e}; "
               f"cached bf16 cosine >= {e.get('cached_feature_cosine_min', float('nan')):.4f}",
               f"<= {e['tolerance']:.0e}", True, parity=exported.parity)
    check_model_pt(report, exported.model_path, folder, device)


def synthetic_steps(report: Report, tmp: Path, device: torch.device, n: int) -> None:
    started = time.perf_counter()
    folder = synthetic_set(n, tmp)
    report.add("synthetic", f"{n} JPEGs written", f"{time.perf_counter() - started:.1f} s", "", None)
    rounds: dict[str, list[dict]] = {"pil": [], "torch": []}
    for r in range(ARGS.rounds):
        for decode in (("pil", "torch") if r % 2 == 0 else ("torch", "pil")):
            out = tmp / f"syn-{decode}.h5"
            out.unlink(missing_ok=True)
            rounds[decode].append(run_extract(folder, out, str(device), precision="bf16",
                                              decode=decode))
            speed_row(report, "synthetic", f"round {r + 1}, {device} bf16, --decode {decode}", rounds[decode][-1])
    ratio = np.median([t["ips"] / p["ips"] for t, p in zip(rounds["torch"], rounds["pil"])])
    report.add("synthetic", "--decode torch / pil throughput (median over rounds)", f"{ratio:.2f}x", "(reported)",
               None, ratio=float(ratio))
    check_cosine(report, "synthetic", "--decode torch vs pil (same device, bf16)", rounds["torch"][-1]["features"],
                 rounds["pil"][-1]["features"], DECODE_COSINE_MEAN, DECODE_COSINE_MIN)


if __name__ == "__main__":
    sys.exit(main())
