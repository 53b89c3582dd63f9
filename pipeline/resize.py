"""Pillow's antialiased resize, bit for bit, in TorchScript-compatible torch ops.

Extraction resizes with Pillow (as torchvision's `weights.transforms()` does on PIL images, so our
features equal the reference ones). model.pt must do the same resize with torch alone. Torch's own
antialiased interpolation differs from Pillow by 1-2 grey levels, which moved probabilities by up
to 3e-2 with a random-weight backbone (measured); no library ships an exact torch port, so this
is one: the same filter weights, the same 22-bit fixed point rounding and the same order of the two
passes as Pillow's libImaging/Resample.c. Integer arithmetic is done in float64, which is exact here.

The order of the passes changed across Pillow releases: older ones always resample horizontally
first; Pillow 13 (at least) resamples vertically first when the height shrinks by more than twice
as many pixels as the width. `pillow_pass_order()` asks the installed Pillow which rule it follows.
"""

import functools
import math

import numpy as np
import torch

HORIZONTAL_FIRST = "horizontal-first"
VERTICAL_FIRST_IF_TALLER_CUT = "vertical-first-if-height-cut-exceeds-twice-width-cut"

def _filter(x: torch.Tensor, bicubic: bool) -> torch.Tensor:
    x = x.abs()
    if bicubic:  # Pillow's bicubic, a = -0.5
        a = -0.5
        near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        far = (((x - 5) * x + 8) * x - 4) * a
        return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))  # bilinear (triangle)


def coefficients(in_size: int, out_size: int, bicubic: bool) -> torch.Tensor:
    """(out_size, in_size) float64: Pillow's fixed-point weights (integers, sum ~ 2**22 per row)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = (2.0 if bicubic else 1.0) * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centre = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    xmin = torch.trunc(centre - support + 0.5).clamp(min=0.0)
    xmax = torch.trunc(centre + support + 0.5).clamp(max=float(in_size)) - xmin
    k = torch.arange(ksize, dtype=torch.float64).unsqueeze(0)
    valid = k < xmax.unsqueeze(1)
    w = _filter((k + xmin.unsqueeze(1) - centre.unsqueeze(1) + 0.5) * (1.0 / filterscale), bicubic)
    w = torch.where(valid, w, torch.zeros_like(w))
    total = torch.cumsum(w, dim=1)[:, -1:]  # summed left to right, as Pillow does
    w = torch.where(total != 0.0, w / total, w)
    fixed = torch.where(w < 0, torch.trunc(-0.5 + w * 4194304.0), torch.trunc(0.5 + w * 4194304.0))
    columns = (k + xmin.unsqueeze(1)).long()
    rows = torch.arange(out_size).unsqueeze(1).expand(-1, ksize)
    dense = torch.zeros(out_size, in_size + ksize, dtype=torch.float64)
    dense[rows[valid], columns[valid]] = fixed[valid]
    return dense[:, :in_size]


def _resample_last(x: torch.Tensor, out_size: int, bicubic: bool, block_size: int = 32) -> torch.Tensor:
    """Resample the last dimension of x (..., n) holding 0..255 -> (..., out_size) float64 0..255.

    Works on `block_size` output columns at a time, each reading only its band of the input."""
    weights = coefficients(x.shape[-1], out_size, bicubic).to(x.device)
    blocks = []
    for start in range(0, out_size, block_size):
        block = weights[start:start + block_size]
        used = torch.nonzero(block.abs().sum(0)).flatten()
        lo, hi = int(used[0]), int(used[-1]) + 1
        s = torch.matmul(x[..., lo:hi].double(), block[:, lo:hi].t())
        blocks.append(torch.floor((s + 2097152.0) / 4194304.0).clamp(0.0, 255.0))  # Pillow's clip8
    return torch.cat(blocks, dim=-1)


def _vertical(x: torch.Tensor, height: int, bicubic: bool) -> torch.Tensor:
    return _resample_last(x.transpose(-1, -2), height, bicubic).transpose(-1, -2)


def pil_resize(images: torch.Tensor, height: int, width: int, bicubic: bool,
               vertical_first_rule: bool = True) -> torch.Tensor:
    """(..., H, W) uint8 -> (..., height, width) uint8, equal to PIL's Image.resize((width, height)).

    vertical_first_rule: follow Pillow 13's pass order (see the module docstring); False for the
    older always-horizontal-first order."""
    in_h, in_w = images.shape[-2], images.shape[-1]
    cut_h, cut_w = in_h - height, in_w - width
    x = images
    if vertical_first_rule and cut_h > 0 and cut_h > cut_w * 2:
        x = _vertical(x, height, bicubic)
        if width != in_w:
            x = _resample_last(x, width, bicubic)
    else:
        if width != in_w:
            x = _resample_last(x, width, bicubic)
        if height != in_h:
            x = _vertical(x, height, bicubic)
    return x.to(torch.uint8)


@functools.lru_cache(maxsize=1)
def pillow_pass_order() -> str:
    """Which pass order the installed Pillow uses, found by resizing one small probe image."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 16), dtype=np.uint8)
    shown = np.asarray(Image.fromarray(pixels).resize((12, 20), Image.BILINEAR))
    probe = torch.from_numpy(pixels.copy())
    if np.array_equal(pil_resize(probe, 20, 12, False, True).numpy(), shown):
        return VERTICAL_FIRST_IF_TALLER_CUT
    if np.array_equal(pil_resize(probe, 20, 12, False, False).numpy(), shown):
        return HORIZONTAL_FIRST
    raise RuntimeError("the installed Pillow resizes in a way transfer does not know; model.pt cannot "
                       "reproduce its resize exactly")


# --- the same resize and centre crop for torch.export and ONNX ---------------------------------------
# `pil_resize` picks each block's band of input with `nonzero` and builds its weights by boolean
# indexing: data-dependent shapes, which torch.export cannot trace with a symbolic image size
# (and which onnxruntime has no NonZero kernel for in float64). The version below computes the same
# Pillow weights from the shapes alone, gathers the taps by index, and resamples only the output
# rows and columns the centre crop keeps (each pass treats every line on its own, so this is exact).

def _band(in_size, out_size, first: int, count: int, bicubic: bool, device: torch.device):
    """Pillow's fixed-point weights for outputs first..first+count-1 of an in_size -> out_size resample.

    Returns index (count, K) int64 into the input and weights (count, K) float64 (integers); in_size
    and out_size may be symbolic (torch.export), so the ceil in Pillow's `ksize` is done on integers."""
    taps = 2 if bicubic else 1
    ksize = torch.sym_max((taps * in_size + out_size - 1) // out_size, taps) * 2 + 1
    scale = torch.full((), in_size, dtype=torch.float64, device=device) / out_size
    filterscale = scale.clamp(min=1.0)
    support = taps * filterscale
    centre = (torch.arange(count, dtype=torch.float64, device=device) + first + 0.5) * scale
    xmin = torch.floor(centre - support + 0.5).clamp(min=0.0)  # Pillow's (int) truncation, >= 0 here
    xmax = torch.floor(centre + support + 0.5).clamp(max=in_size) - xmin
    k = torch.arange(ksize, dtype=torch.float64, device=device).unsqueeze(0)
    w = _filter((k + xmin.unsqueeze(1) - centre.unsqueeze(1) + 0.5) * (1.0 / filterscale), bicubic)
    w = torch.where(k < xmax.unsqueeze(1), w, torch.zeros_like(w))
    total = torch.cumsum(w, dim=1)[:, -1:]  # summed left to right, as Pillow does
    w = torch.where(total != 0.0, w / total, w)
    scaled = w * 4194304.0
    fixed = torch.where(w < 0, torch.ceil(scaled - 0.5), torch.floor(scaled + 0.5))  # (int) of -0.5+x / 0.5+x
    index = (k + xmin.unsqueeze(1)).clamp(max=in_size - 1).long()  # taps past xmax have weight 0
    return index, fixed


def _resample_band(x: torch.Tensor, out_size, first, count: int, bicubic: bool) -> torch.Tensor:
    """(..., n) uint8 -> (..., count) uint8: outputs first..first+count-1 of resampling the last dim to out_size."""
    index, weights = _band(x.shape[-1], out_size, first, count, bicubic, x.device)
    s = (x[..., index].double() * weights).sum(-1)  # integer sums, exact in float64
    return torch.floor((s + 2097152.0) / 4194304.0).clamp(0.0, 255.0).to(torch.uint8)  # Pillow's clip8


def _centre_offset(size, crop: int):
    """int(round((size - crop) / 2)) with Python's round half to even (torchvision's CenterCrop), on integers."""
    d = size - crop
    return d // 2 + (d % 2) * ((d // 2) % 2)


def resize_crop_exportable(images: torch.Tensor, resize: int, crop: int, bicubic: bool,
                           vertical_first_rule: bool = True) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, crop, crop) uint8: the short side to `resize` with Pillow's resize,
    then the centre crop; equal to `pil_resize` + crop, but traceable by torch.export with symbolic N, H, W."""
    h, w = images.shape[-2], images.shape[-1]
    short = torch.sym_min(h, w)
    nh, nw = resize * h // short, resize * w // short  # == int(resize * long / short), torchvision's rule
    top, left = _centre_offset(nh, crop), _centre_offset(nw, crop)

    def horizontal_first(x: torch.Tensor) -> torch.Tensor:
        y = _resample_band(x, nw, left, crop, bicubic)
        return _resample_band(y.transpose(-1, -2), nh, top, crop, bicubic).transpose(-1, -2).contiguous()

    def vertical_first(x: torch.Tensor) -> torch.Tensor:
        y = _resample_band(x.transpose(-1, -2), nh, top, crop, bicubic).transpose(-1, -2)
        return _resample_band(y, nw, left, crop, bicubic)

    if not vertical_first_rule:
        return horizontal_first(images)
    cut_h, cut_w = h - nh, w - nw
    if isinstance(cut_h, int):  # eager: concrete sizes (torch.cond would go through torch.compile)
        return vertical_first(images) if cut_h > 0 and cut_h > 2 * cut_w else horizontal_first(images)
    cut_h, cut_w = torch.full((), cut_h), torch.full((), cut_w)  # symbolic sizes: the choice goes in the graph
    return torch.cond((cut_h > 0) & (cut_h > 2 * cut_w), vertical_first, horizontal_first, (images,))
