"""Pillow's antialiased resize and torchvision's centre crop, bit for bit, in torch ops.

Extraction resizes with Pillow (as torchvision's `weights.transforms()` does on PIL images, so our
features equal the reference ones). The exported models (model.pt, model.onnx, model.pt2) and the
GPU decode path must do the same with torch alone. Torch's own antialiased interpolation differs
from Pillow by 1-2 grey levels, which moved probabilities by up to 3e-2 with a random-weight
backbone (measured); no library ships an exact torch port, so this is one: the same filter
weights, the same 22-bit fixed point rounding and the same order of the two passes as Pillow's
libImaging/Resample.c. Each pass resamples only the lines the centre crop keeps (every output line
depends on its own weights alone, so this is exact), a group of outputs at a time by one matmul
over the window of input they read: memory O(input + output x window), never an (in x out) matrix.
The integer sums are done in float64: exact (they stay below 2**31, as in Pillow's int32). int32
matmuls (measured, 375x500 to 6000x4000) were no faster in eager torch on the CPU (within +-15%),
35-50% slower in onnxruntime, and torch has no int32 matmul on CUDA.

torchvision's Resize on a PIL image calls Image.resize with reducing_gap None, so Pillow's
`reduce()` is not part of the path reproduced here and there is deliberately no reduce step.

The order of the passes changed across Pillow releases: older ones always resample horizontally
first; Pillow 13 (at least) resamples vertically first when the height shrinks by more than twice
as many pixels as the width. `pillow_pass_order()` asks the installed Pillow which rule it follows.
"""

import functools
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

HORIZONTAL_FIRST = "horizontal-first"
VERTICAL_FIRST_IF_TALLER_CUT = "vertical-first-if-height-cut-exceeds-twice-width-cut"

# Numbers are written as literals below, since TorchScript reads no module-level ones: Resample.c's
# fixed point has PRECISION_BITS = 32 - 8 - 2 = 22 (1.0 is 4194304 = 1 << 22, a half 2097152).


# --- the rules, written once: sizes, pass order, weights, rounding ---------------------------------

def crop_box(height: int, width: int, resize: int, crop: int, squash: bool = False) -> Tuple[int, int, int, int]:
    """torchvision's Resize(resize) (or Resize([resize, resize]) when squash) then CenterCrop(crop) on
    an image of this size: the resized (height, width) and the crop's (top, left). Integer arithmetic,
    so height and width may be symbolic (torch.export)."""
    if squash:
        nh, nw = resize, resize
    else:
        if torch.jit.is_scripting():
            short = min(height, width)
        else:
            short = torch.sym_min(height, width)
        nh, nw = resize * height // short, resize * width // short  # == int(resize * long / short)
    return nh, nw, _centre_offset(nh, crop), _centre_offset(nw, crop)


def _centre_offset(size: int, crop: int) -> int:
    """int(round((size - crop) / 2.0)), Python's round half to even (CenterCrop), on integers."""
    d = size - crop
    return d // 2 + (d % 2) * ((d // 2) % 2)


def vertical_first(height: int, width: int, new_height: int, new_width: int) -> bool:
    """Pillow 13's pass order: vertical first when the height cut exceeds twice the width cut. Also
    takes 0-d tensors (then returns one), for torch.export's symbolic sizes."""
    cut_h, cut_w = height - new_height, width - new_width
    return (cut_h > 0) & (cut_h > 2 * cut_w)


def _filter(x: torch.Tensor, bicubic: bool) -> torch.Tensor:
    x = x.abs()
    if bicubic:  # Resample.c's bicubic_filter, a = -0.5
        a = -0.5
        near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        far = (((x - 5) * x + 8) * x - 4) * a
        return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))  # bilinear_filter (triangle)


def _span(count: int, in_size: int, out_size: int, bicubic: bool) -> int:
    """A bound on how many consecutive input positions `count` consecutive outputs read: their centres
    lie (count - 1) * scale apart and each reads centre +- support (+ rounding). Integer arithmetic."""
    taps = 2 if bicubic else 1
    return ((count - 1 + 2 * taps) * in_size + out_size - 1) // out_size + 2 * taps + 2


def _weights(in_size: int, out_size: int, first: int, count: int, bicubic: bool,
             group: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pillow's weights of outputs first..first+count-1 of an in_size -> out_size resample, laid out
    on windows of `group` consecutive outputs (Resample.c: precompute_coeffs, normalize_coeffs_8bpc).

    Returns start (G,) int64, each window's first input position (the xmin of its first output), and
    weights (G, group, L) float64 holding 22-bit fixed point integers for input positions start ..
    start + L - 1, zero outside each output's band [xmin, xmax); G = ceil(count / group). Always on
    the CPU: a GPU's fused multiply-adds or parallel cumsum could round differently from Pillow."""
    taps = 2 if bicubic else 1
    n = (count + group - 1) // group
    scale = torch.full((), in_size, dtype=torch.float64) / out_size
    filterscale = scale.clamp(min=1.0)
    support = taps * filterscale
    centre = ((torch.arange(n * group, dtype=torch.float64) + first + 0.5) * scale).view(n, group, 1)
    xmin = torch.floor(centre - support + 0.5).clamp(min=0.0)  # Pillow's (int) truncation; >= 0 here
    xmax = torch.floor(centre + support + 0.5).clamp(max=in_size)  # (before Pillow subtracts xmin)
    start = xmin[:, :1]
    position = start + torch.arange(_span(group, in_size, out_size, bicubic), dtype=torch.float64)
    w = _filter((position - centre + 0.5) * (1.0 / filterscale), bicubic)
    w = torch.where((position >= xmin) & (position < xmax), w, torch.zeros_like(w))
    total = torch.cumsum(w, dim=-1)[..., -1:]  # left to right as Pillow sums (adding zeros is exact)
    w = torch.where(total != 0.0, w / total, w)
    scaled = w * 4194304.0
    fixed = torch.where(w < 0, torch.ceil(scaled - 0.5), torch.floor(scaled + 0.5))  # (int)(-0.5 + x), (int)(0.5 + x)
    return start.flatten().long(), fixed


def _clip8(s: torch.Tensor) -> torch.Tensor:
    """Resample.c's clip8 of float64 sums (overwriting them; Pillow starts its sums at 1 << 21 instead):
    (s + 2**21) >> 22 clamped to 0..255, as uint8. Exact: s is an integer and the scaling a power of 2."""
    return s.add_(2097152.0).mul_(1.0 / 4194304.0).floor_().clamp_(0.0, 255.0).to(torch.uint8)


# --- resampling -------------------------------------------------------------------------------------

def _window(x: torch.Tensor, dim: int, index: torch.Tensor, by_index: bool) -> torch.Tensor:
    """Positions index[0], index[0] + 1, ... (index: (L,) consecutive) of x along dim: a view cut at the
    end of x or, where sizes are symbolic (torch.export cannot slice at a tensor's value), a gather
    clamped at the end. Positions past the end of x always have weight 0."""
    if by_index:
        return x.index_select(dim, index.clamp(max=x.shape[dim] - 1).to(x.device))
    begin = int(index[0])
    return x.narrow(dim, begin, min(index.shape[0], x.shape[dim] - begin))


def _resample(x: torch.Tensor, dim: int, start: torch.Tensor, weights: torch.Tensor, count: int,
              offset: torch.Tensor, by_index: bool) -> torch.Tensor:
    """One pass along `dim` (-1: horizontal, -2: vertical) of uint8 x, whose positions along dim are
    input positions offset, offset + 1, ...: -> `count` outputs along dim, uint8. start, weights: from
    `_weights`. Each group of outputs is one matmul over the window it reads; Resample.c's
    ImagingResampleHorizontal_8bpc / Vertical_8bpc sum each output's band: the same integer sums."""
    weights = weights.to(x.device)
    n, group, length = weights.shape
    index = (start - offset).view(-1, 1) + torch.arange(length)
    sums: List[torch.Tensor] = []
    for g in range(n):
        window = _window(x, dim, index[g], by_index).double()
        k = weights[g, :min(group, count - g * group), :window.shape[dim]]
        sums.append(torch.matmul(window, k.t()) if dim == -1 else torch.matmul(k, window))
    return _clip8(torch.cat(sums, dim))


def _two_passes(x: torch.Tensor, h_start: torch.Tensor, h_weights: torch.Tensor, v_start: torch.Tensor,
                v_weights: torch.Tensor, h_span: int, v_span: int, out_h: int, out_w: int,
                first_vertical: bool, by_index: bool) -> torch.Tensor:
    """(..., H, W) uint8 -> (..., out_h, out_w) uint8: the two passes in the given order. The first pass
    resamples only the lines the second one reads: from the start of its first window, h_span (columns)
    or v_span (rows) long."""
    if first_vertical:
        lo = h_start[0]
        y = _window(x, -1, lo + torch.arange(h_span), by_index)
        y = _first_pass(y, -2, v_start, v_weights, out_h, by_index)
        return _resample(y, -1, h_start, h_weights, out_w, lo, by_index)
    lo = v_start[0]
    y = _window(x, -2, lo + torch.arange(v_span), by_index)
    y = _first_pass(y, -1, h_start, h_weights, out_w, by_index)
    return _resample(y, -2, v_start, v_weights, out_h, lo, by_index)


def _first_pass(x: torch.Tensor, dim: int, start: torch.Tensor, weights: torch.Tensor, count: int,
                by_index: bool) -> torch.Tensor:
    """_resample of the whole image along dim; eagerly 512 lines across at a time (lines are independent),
    which keeps each window in the CPU's caches: 2-4x faster on 12-24 MP photos (measured)."""
    zero = torch.zeros_like(start[0])
    if by_index:
        return _resample(x, dim, start, weights, count, zero, by_index)
    across = -1 if dim == -2 else -2
    parts: List[torch.Tensor] = []
    for i in range(0, x.shape[across], 512):
        part = x.narrow(across, i, min(512, x.shape[across] - i))
        parts.append(_resample(part, dim, start, weights, count, zero, by_index))
    return torch.cat(parts, across)


def _resize_crop(x: torch.Tensor, nh: int, nw: int, top: int, left: int, out_h: int, out_w: int, bicubic: bool,
                 vertical_first_rule: bool) -> torch.Tensor:
    """(..., H, W) uint8 -> (..., out_h, out_w) uint8: rows top.. and columns left.. of Pillow's resize
    to (nh, nw), in Pillow's pass order (vertical_first_rule: Pillow 13's; False: always horizontal first)."""
    h, w = x.shape[-2], x.shape[-1]
    by_index = False
    if not torch.jit.is_scripting():
        by_index = _exporting(h, w)
    # Outputs per matmul (measured): eagerly 16, with 512-line chunks, keeps the windows in cache;
    # in an exported graph 32 makes fewer nodes (a faster export) and is faster in onnxruntime.
    group = 32 if by_index else 16
    h_start, h_weights = _weights(w, nw, left, out_w, bicubic, group)
    v_start, v_weights = _weights(h, nh, top, out_h, bicubic, group)
    h_span, v_span = _span(out_w, w, nw, bicubic), _span(out_h, h, nh, bicubic)
    if torch.jit.is_scripting():
        first_vertical = vertical_first_rule and vertical_first(h, w, nh, nw)
        return _two_passes(x, h_start, h_weights, v_start, v_weights, h_span, v_span, out_h, out_w, first_vertical,
                           False)
    return _eager_or_exported(x, (h_start, h_weights, v_start, v_weights), h_span, v_span, out_h, out_w,
                              vertical_first_rule, (h, w, nh, nw), by_index)


def _exporting(h, w) -> bool:
    """Whether the sizes are symbolic or torch.export traces: then windows are gathered by index."""
    return not (isinstance(h, int) and isinstance(w, int)) or torch.compiler.is_compiling()


def _eager_or_exported(x, weights, h_span, v_span, out_h, out_w, vertical_first_rule, sizes, by_index):
    """_two_passes eagerly or under torch.export, where symbolic sizes make torch.cond choose the pass
    order in the graph. (A function of its own because TorchScript compiles neither torch.cond nor
    closures, even in a branch it never takes.)"""
    if all(isinstance(v, int) for v in sizes) or not vertical_first_rule:
        first_vertical = vertical_first_rule and vertical_first(*sizes)
        return _two_passes(x, *weights, h_span, v_span, out_h, out_w, first_vertical, by_index)

    def order(first_vertical: bool):
        return lambda y, *w: _two_passes(y, *w, h_span, v_span, out_h, out_w, first_vertical, True).contiguous()

    return torch.cond(vertical_first(*(torch.full((), v) for v in sizes)), order(True), order(False), (x, *weights))


def resize_crop(images: torch.Tensor, resize: int, crop: int, bicubic: bool, vertical_first_rule: bool = True,
                squash: bool = False) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, crop, crop) uint8, equal to torchvision's Resize(resize) (both sides
    to resize when squash) on a PIL image, bilinear or bicubic, then CenterCrop(crop). Works eagerly
    on any device (the GPU decode path: stack same-size images), in TorchScript, and under
    torch.export with symbolic N, H and W (then ONNX). Any leading dimensions, any strides."""
    nh, nw, top, left = crop_box(images.shape[-2], images.shape[-1], resize, crop, squash)
    return _resize_crop(images, nh, nw, top, left, crop, crop, bicubic, vertical_first_rule)


def pil_resize(images: torch.Tensor, height: int, width: int, bicubic: bool,
               vertical_first_rule: bool = True) -> torch.Tensor:
    """(..., H, W) uint8 -> (..., height, width) uint8, equal to PIL's Image.resize((width, height))."""
    return _resize_crop(images, height, width, 0, 0, height, width, bicubic, vertical_first_rule)


@functools.lru_cache(maxsize=1)
def pillow_pass_order() -> str:
    """Which pass order the installed Pillow uses, found by resizing one small probe image."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 16), dtype=np.uint8)
    shown = np.asarray(Image.fromarray(pixels).resize((12, 20), Image.BILINEAR))
    probe = torch.from_numpy(pixels.copy())
    if np.array_equal(pil_resize(probe, 20, 12, False, True).numpy(), shown):
        return VERTICAL_FIRST_IF_TALLER_CUT
    if np.array_equal(pil_resize(probe, 20, 12, False, False).numpy(), shown):
        return HORIZONTAL_FIRST
    raise RuntimeError("the installed Pillow resizes in a way transfer does not know; model.pt cannot "
                       "reproduce its resize exactly")
