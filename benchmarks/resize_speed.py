"""How fast is the exact (Pillow-equal) resize + centre crop in torch, against Pillow's own C?

    python benchmarks/resize_speed.py [--repeat 5] [--baseline 454b516] [--memory]

For a few real sizes (375x500, 1944x2592, 1x3000) and the real photos in ../shared/data/hymenoptera
(every 10th, summed; skipped when absent) times, with the EfficientNet-Lite0-like preprocessing (short
side to 256 bicubic, centre crop 224): Pillow's resize + crop (what extraction runs), the old
`pil_resize` + crop (model.pt's until now) and the old `resize_crop_exportable` (model.onnx / model.pt2's),
both read from the --baseline commit, and the new `resize_crop`: eager, TorchScript-scripted, in a
torch.export program (as model.pt2 runs it) and in ONNX under onnxruntime (as model.onnx). Each figure
is the best of --repeat runs after one warm-up; every result is checked equal to Pillow's.

--memory instead measures how much the resize of one image adds to the peak resident memory, each
method and size in a fresh process whose address space is capped (MEMORY_CAP beyond what it holds).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.backbones import Preprocessing  # noqa: E402
from pipeline.resize import VERTICAL_FIRST_IF_TALLER_CUT, crop_box, pillow_pass_order, resize_crop  # noqa: E402

RESIZE, CROP = 256, 224
RULE = pillow_pass_order() == VERTICAL_FIRST_IF_TALLER_CUT
PHOTOS = os.path.join(os.path.dirname(ROOT), "shared", "data", "hymenoptera")
DENSE_LIMIT = 2 * 2**30  # the old pil_resize's dense (out x in) float64 matrix: skipped above this
MEMORY_CAP = 4 * 2**30


def baseline_module(commit: str) -> types.ModuleType:
    """pipeline/resize.py as it was at `commit`."""
    source = subprocess.run(["git", "show", f"{commit}:pipeline/resize.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    module = types.ModuleType("old_resize")
    exec(compile(source, f"{commit}:pipeline/resize.py", "exec"), module.__dict__)
    return module


class ResizeCrop(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return resize_crop(images, RESIZE, CROP, True, RULE)


def export_both():
    """The new resize in one torch.export program with symbolic N, H, W, and that program as ONNX (proto)."""
    Dim = torch.export.Dim
    shapes = ({0: Dim("n", min=1), 2: Dim("h", min=1, max=65535), 3: Dim("w", min=1, max=65535)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        program = torch.export.export(ResizeCrop(), (torch.zeros(2, 3, 300, 451, dtype=torch.uint8),),
                                      dynamic_shapes=shapes)
        exported = time.perf_counter()
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=18, verbose=False)
    print(f"torch.export: {exported - started:.1f} s; ONNX conversion: {time.perf_counter() - exported:.1f} s")
    return program, onnx_program.model_proto


def onnx_runner(model):
    """model: an ONNX file's path or bytes -> a function running it in onnxruntime (CPU) on a uint8 tensor."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def methods(old, scripted, program, onnx):
    """name -> function: one (1, 3, H, W) uint8 image -> its (1, 3, CROP, CROP) crop."""

    def old_pil_resize(x):
        nh, nw, top, left = crop_box(x.shape[-2], x.shape[-1], RESIZE, CROP)
        return old.pil_resize(x, nh, nw, True, RULE)[..., top:top + CROP, left:left + CROP]

    return {
        "old pil_resize + crop (model.pt)": old_pil_resize,
        "old resize_crop_exportable, eager": lambda x: old.resize_crop_exportable(x, RESIZE, CROP, True, RULE),
        "new resize_crop, eager": lambda x: resize_crop(x, RESIZE, CROP, True, RULE),
        "new resize_crop, TorchScript": lambda x: scripted(x, RESIZE, CROP, True, RULE, False),
        "new resize_crop, torch.export program": program,
        "new resize_crop, ONNX in onnxruntime": onnx,
    }


def best(fn, repeat: int) -> tuple[float, object]:
    result = fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times), result


def bench(label: str, images: list[np.ndarray], table, repeat: int) -> None:
    """Times every method over `images` ((h, w, 3) uint8 each), summed; prints one line per method."""
    prep = Preprocessing(RESIZE, CROP, "bicubic", (0.5,) * 3, (0.5,) * 3)
    transform = prep.pil_transform()
    pil = [Image.fromarray(p) for p in images]
    tensors = [torch.from_numpy(p).permute(2, 0, 1).unsqueeze(0).contiguous() for p in images]
    pillow_time, expected = best(lambda: [transform(im) for im in pil], repeat)
    print(f"{label}: Pillow resize + crop {pillow_time:.4f} s", flush=True)
    for name, fn in table.items():
        if name.startswith("old pil_resize") and any(_dense_bytes(x) > DENSE_LIMIT for x in tensors):
            print(f"    {name:40s} skipped (its dense matrix would need > {DENSE_LIMIT / 2**30:.0f} GB)", flush=True)
            continue
        seconds, got = best(lambda: [fn(x) for x in tensors], repeat)
        exact = all(torch.equal(g[0], e) for g, e in zip(got, expected))
        print(f"    {name:40s} {seconds:8.4f} s  {seconds / pillow_time:7.1f} x Pillow"
              f"{'' if exact else '  DIFFERENT FROM PILLOW'}", flush=True)


def _dense_bytes(x: torch.Tensor) -> int:
    """The largest (out x in) float64 matrix the old pil_resize builds for this image."""
    h, w = x.shape[-2:]
    nh, nw, _, _ = crop_box(h, w, RESIZE, CROP)
    return max(nh * h, nw * w) * 8


def _status(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


def probe(method: str, height: int, width: int, baseline: str, onnx_path: str) -> None:
    """In a fresh process: the peak resident memory one resize adds (input and warm-up excluded)."""
    import resource

    if method == "onnx":
        fn = onnx_runner(onnx_path)
    elif method == "pt2":
        fn = torch.export.load(onnx_path[:-len(".onnx")] + ".pt2").module()
    else:
        old = baseline_module(baseline) if method.startswith("old") else None
        fn = {"old pil_resize": lambda x: methods(old, None, None, None)["old pil_resize + crop (model.pt)"](x),
              "old exportable": lambda x: old.resize_crop_exportable(x, RESIZE, CROP, True, RULE),
              "new": lambda x: resize_crop(x, RESIZE, CROP, True, RULE)}[method]
    fn(torch.zeros(1, 3, 30, 40, dtype=torch.uint8))  # threads, their arenas
    x = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    before = _status("VmRSS")
    limit = _status("VmSize") + MEMORY_CAP
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        fn(x)
    except (MemoryError, RuntimeError) as e:
        print(f"over the {MEMORY_CAP / 2**30:.0f} GB cap ({type(e).__name__})")
        return
    print(f"+{(_status('VmHWM') - before) / 2**20:.0f} MB")


def memory(baseline: str) -> None:
    import tempfile

    program, proto = export_both()
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = os.path.join(folder, "resize.onnx")
        with open(onnx_path, "wb") as f:
            f.write(proto.SerializeToString())
        torch.export.save(program, os.path.join(folder, "resize.pt2"))
        for h, w in [(1, 4000), (1944, 2592), (4000, 6000)]:
            print(f"{h}x{w} ({3 * h * w / 2**20:.0f} MB input): peak resident memory added by one resize", flush=True)
            for method, name in [("old pil_resize", "old pil_resize + crop"),
                                 ("old exportable", "old resize_crop_exportable, eager"),
                                 ("new", "new resize_crop, eager"), ("pt2", "new resize_crop, torch.export program"),
                                 ("onnx", "new resize_crop, onnxruntime")]:
                done = subprocess.run([sys.executable, __file__, "--probe", method, str(h), str(w), "--baseline",
                                       baseline, "--onnx", onnx_path], capture_output=True, text=True, cwd=ROOT)
                result = done.stdout.strip() or f"failed: {done.stderr.strip().splitlines()[-1:]}"
                print(f"    {name:40s} {result}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", default="454b516", help="the commit holding the old resize (default: the "
                                                              "last one before the banded resize)")
    parser.add_argument("--memory", action="store_true", help="measure memory instead of time")
    parser.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe[0], int(args.probe[1]), int(args.probe[2]), args.baseline, args.onnx)
    if args.memory:
        return memory(args.baseline)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Pillow {Image.__version__}; "
          f"resize {RESIZE} bicubic, crop {CROP}; pass order {pillow_pass_order()}; load average "
          f"{os.getloadavg()[0]:.2f} (other processes on these cores slow torch's many small parallel ops)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(resize_crop)
    program, proto = export_both()
    table = methods(baseline_module(args.baseline), scripted, program.module(), onnx_runner(proto.SerializeToString()))
    rng = np.random.default_rng(0)
    for h, w in [(375, 500), (1944, 2592), (1, 3000)]:
        bench(f"{h}x{w} random pixels", [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)], table, args.repeat)
    if os.path.isdir(PHOTOS):
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(PHOTOS) for f in fs if f.lower().endswith(".jpg"))
        photos = [np.array(Image.open(p).convert("RGB")) for p in paths[::10]]
        bench(f"{len(photos)} real photos (every 10th of {PHOTOS}), summed", photos, table, args.repeat)
    else:
        print(f"real photos: skipped ({PHOTOS} not found)")


if __name__ == "__main__":
    main()
