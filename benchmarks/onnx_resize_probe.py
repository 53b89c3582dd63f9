"""Can ONNX hold the model's exact (Pillow-equal) resize? What each exporter does with it, measured.

    python benchmarks/onnx_resize_probe.py

Exports a module that resizes the short side to 256 (bicubic) and centre-crops 224 - what
EfficientNet-Lite0's model does before the network - with the legacy exporter (dynamo=False) and the
torch.export-based one (dynamo=True), at a fixed and at a dynamic input size, first with model.pt's
`pil_resize` and then with `resize_crop`; runs what exports under onnxruntime (CPU) and
compares its crops with Pillow's, bit for bit, at sizes from 1x1 to 2592x1944. Prints one line per try.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.backbones import Preprocessing  # noqa: E402
from pipeline.resize import VERTICAL_FIRST_IF_TALLER_CUT, pil_resize, pillow_pass_order, resize_crop  # noqa: E402

RESIZE, CROP = 256, 224
RULE = pillow_pass_order() == VERTICAL_FIRST_IF_TALLER_CUT
SIZES = [(1, 1), (40, 30), (224, 224), (256, 257), (300, 451), (451, 300), (375, 500), (1000, 260), (900, 300),
         (31, 2000), (1944, 2592), (2592, 1944)]


class PilResizeCrop(torch.nn.Module):
    """model.pt's resize and crop (TransferModel._resize_crop)."""

    def forward(self, x):
        h, w = x.shape[-2], x.shape[-1]
        nh, nw = (RESIZE, int(RESIZE * w / h)) if h <= w else (int(RESIZE * h / w), RESIZE)
        x = pil_resize(x, nh, nw, True, RULE)
        top, left = int(round((nh - CROP) / 2.0)), int(round((nw - CROP) / 2.0))
        return x[:, :, top:top + CROP, left:left + CROP]


class ExportableResizeCrop(torch.nn.Module):
    def forward(self, x):
        return resize_crop(x, RESIZE, CROP, True, RULE)


def pillow_crop(pixels: np.ndarray) -> np.ndarray:
    prep = Preprocessing(RESIZE, CROP, "bicubic", (0.5,) * 3, (0.5,) * 3)
    return prep.pil_transform()(Image.fromarray(pixels.transpose(1, 2, 0))).numpy()


def first_line(e: BaseException) -> str:
    """The innermost cause's type and first line (the ONNX exporter wraps torch.export's error)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"


def attempt(module: torch.nn.Module, dynamo: bool, dynamic: bool, folder: str) -> str:
    import onnxruntime as ort

    example = torch.randint(0, 256, (1, 3, 300, 451), dtype=torch.uint8)
    path = os.path.join(folder, f"{type(module).__name__}-{dynamo}-{dynamic}.onnx")
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                Dim = torch.export.Dim
                shapes = ({0: Dim("n", min=1), 2: Dim("h", min=1, max=65535), 3: Dim("w", min=1, max=65535)},) \
                    if dynamic else None
                torch.onnx.export(module, (example,), path, dynamo=True, dynamic_shapes=shapes, verbose=False,
                                  input_names=["images"])
            else:
                axes = {"images": {0: "n", 2: "h", 3: "w"}} if dynamic else None
                torch.onnx.export(module, (example,), path, dynamo=False, dynamic_axes=axes, input_names=["images"])
    except Exception as e:  # noqa: BLE001 - the failure is the measurement
        return f"export fails ({time.perf_counter() - started:.0f} s): {first_line(e)}"
    exported = f"exports in {time.perf_counter() - started:.0f} s"
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        return f"{exported}; onnxruntime cannot load it: {first_line(e)}"
    rng = np.random.default_rng(0)
    exact, wrong, failed = 0, [], []
    for h, w in SIZES if dynamic else [(300, 451)]:
        pixels = rng.integers(0, 256, size=(1, 3, h, w), dtype=np.uint8)
        try:
            got = session.run(None, {"images": pixels})[0]
        except Exception as e:  # noqa: BLE001
            failed.append(f"{h}x{w} ({first_line(e)[:60]})")
            continue
        if got.shape[1:] == (3, CROP, CROP) and np.array_equal(got[0], pillow_crop(pixels[0])):
            exact += 1
        else:
            wrong.append(f"{h}x{w}")
    tried = len(SIZES) if dynamic else 1
    result = f"{exported}; under onnxruntime equal to Pillow at {exact} of {tried} sizes"
    if wrong:
        result += f"; different at {', '.join(wrong)}"
    if failed:
        result += f"; fails at {', '.join(failed)}"
    return result


def main() -> None:
    print(f"torch {torch.__version__}; resize {RESIZE} bicubic, crop {CROP}; sizes tried: "
          f"{', '.join(f'{h}x{w}' for h, w in SIZES)}")
    with tempfile.TemporaryDirectory() as folder:
        for module in (PilResizeCrop(), ExportableResizeCrop()):
            for dynamo in (False, True):
                for dynamic in (False, True):
                    name = f"{type(module).__name__}, {'dynamo=True ' if dynamo else 'dynamo=False'}, " \
                           f"{'dynamic N/H/W' if dynamic else 'fixed 300x451'}"
                    print(f"{name}: {attempt(module, dynamo, dynamic, folder)}", flush=True)


if __name__ == "__main__":
    main()
