"""pipeline/resize.py: Pillow's resize (and torchvision's centre crop) reproduced bit for bit by torch ops,
eagerly, in TorchScript, in a torch.export program and in ONNX run by onnxruntime."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.backbones import Preprocessing
from pipeline.resize import (HORIZONTAL_FIRST, VERTICAL_FIRST_IF_TALLER_CUT, crop_box, pil_resize, pillow_pass_order,
                             resize_crop, vertical_first)
from tests.conftest import HYMENOPTERA, ROOT

RULE = pillow_pass_order() == VERTICAL_FIRST_IF_TALLER_CUT  # whatever this Pillow does


def _script(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(fn)


@pytest.fixture(scope="module")
def scripted():
    return _script(pil_resize)


@pytest.fixture(scope="module")
def scripted_crop():
    return _script(resize_crop)


def pillow_crop(pixels: np.ndarray, resize: int, crop: int, interpolation: str, mode: str = "shorter") -> torch.Tensor:
    """(h, w, 3) uint8 -> (3, crop, crop): what extraction does (torchvision Resize + CenterCrop on PIL)."""
    prep = Preprocessing(resize, crop, interpolation, (0.5,) * 3, (0.5,) * 3, resize_mode=mode)
    return prep.pil_transform()(Image.fromarray(pixels))


def batch(pixels: np.ndarray) -> torch.Tensor:
    """(h, w, 3) -> (1, 3, h, w) contiguous."""
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()


SIZES = [(1, 1), (5, 300), (300, 5), (257, 256), (256, 400), (224, 224), (1000, 37), (1200, 1600), (31, 2000),
         (900, 300), (600, 500)]


@pytest.mark.parametrize("resample, bicubic", [(Image.BILINEAR, False), (Image.BICUBIC, True)])
@pytest.mark.parametrize("height, width", SIZES)
def test_equals_pillow_exactly(scripted, resample, bicubic, height, width):
    rng = np.random.default_rng(height * 7 + width)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    for out_h, out_w in [(256, 341), (224, 224), (300, 17), (height, 256)]:
        expected = np.asarray(Image.fromarray(pixels).resize((out_w, out_h), resample))
        got = scripted(torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), out_h, out_w, bicubic, RULE)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected), (height, width, out_h, out_w)


# Sizes from 1x1 up to a camera photo: odd aspect ratios, thin strips (whose long side becomes up to
# 1,024,000 pixels), sizes that round, upscale, skip a pass or cut the height by far more than the width.
CROP_SIZES = [(1, 1), (2, 3), (5, 300), (300, 5), (224, 224), (233, 232), (256, 257), (375, 500), (500, 375),
              (900, 300), (1000, 260), (31, 2000), (1, 4000), (700, 2), (1944, 2592), (2592, 1944)]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("mode", ["shorter", "squash"])
def test_resize_crop_equals_pillow_eagerly_and_in_torchscript(scripted_crop, interpolation, mode):
    rng = np.random.default_rng(len(interpolation) + len(mode))
    bicubic, squash = interpolation == "bicubic", mode == "squash"
    for height, width in CROP_SIZES:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        expected = pillow_crop(pixels, 256, 224, interpolation, mode)
        assert torch.equal(resize_crop(batch(pixels), 256, 224, bicubic, RULE, squash)[0], expected), (height, width)
        assert torch.equal(scripted_crop(batch(pixels), 256, 224, bicubic, RULE, squash)[0], expected), (height, width)


def test_resize_crop_at_other_sizes_and_the_old_name():
    """Crops that are not a multiple of the 32 outputs per matmul, a crop as large as the resize."""
    rng = np.random.default_rng(3)
    for resize, crop in [(232, 224), (342, 299), (64, 64), (7, 5)]:
        for height, width in [(375, 500), (640, 61), (resize, resize + 1)]:
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            expected = pillow_crop(pixels, resize, crop, "bicubic")
            assert torch.equal(resize_crop(batch(pixels), resize, crop, True, RULE)[0], expected), (resize, crop)


def test_crop_box_is_torchvisions_rule():
    """Resize's int(size * long / short) and CenterCrop's int(round((new - crop) / 2.0)), half to even."""
    for height, width in [(1, 1), (3, 7), (375, 500), (500, 375), (1, 4000), (233, 232), (257, 256), (999, 1001)]:
        for resize, crop in [(256, 224), (232, 224), (255, 224), (342, 299)]:
            short, long = sorted((height, width))
            new_long = int(resize * long / short)
            nh, nw = (resize, new_long) if height <= width else (new_long, resize)
            expected = (nh, nw, int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0)))
            assert crop_box(height, width, resize, crop) == expected, (height, width, resize, crop)
            squashed = int(round((resize - crop) / 2.0))
            assert crop_box(height, width, resize, crop, squash=True) == (resize, resize, squashed, squashed)


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="real photos not found")
def test_equals_pillow_on_real_photos(scripted, scripted_crop):
    for path in sorted(HYMENOPTERA.rglob("*.jp*g"))[::40]:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        out = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
        expected = np.asarray(image.resize(out[::-1], Image.BICUBIC))
        pixels = np.asarray(image).copy()
        got = scripted(torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), out[0], out[1], True, RULE)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected), path.name
        crop = scripted_crop(batch(pixels), 256, 224, True, RULE, False)[0]
        assert torch.equal(crop, pillow_crop(pixels, 256, 224, "bicubic")), path.name


def test_batches_resize_each_image_alike():
    x = torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8)
    both = pil_resize(x, 20, 28, False)
    assert torch.equal(both[1], pil_resize(x[1], 20, 28, False))
    assert torch.equal(resize_crop(x, 30, 24, True)[1], resize_crop(x[1:], 30, 24, True)[0])
    turned = x.transpose(-1, -2)  # a view, as the decode path's EXIF rotation gives
    assert torch.equal(resize_crop(turned, 30, 24, True), resize_crop(turned.contiguous(), 30, 24, True))


def test_random_shapes_equal_the_installed_pillow(scripted):
    rng = np.random.default_rng(5)
    for _ in range(40):
        h, w, out_h, out_w = (int(v) for v in rng.integers(2, 300, size=4))
        pixels = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize((out_w, out_h), Image.BICUBIC))
        assert np.array_equal(scripted(torch.from_numpy(pixels), out_h, out_w, True, RULE).numpy(), expected), \
            (h, w, out_h, out_w)


def test_both_pass_orders_are_separable_resizes_in_the_stated_order():
    """Whichever order Pillow uses, each branch must be the two one-dimensional passes in that order
    (a resize along one axis only is that one pass)."""
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(90, 40), dtype=np.uint8))
    horizontal_first = pil_resize(pil_resize(x, 90, 30, False), 20, 30, False)
    vertical_first_ = pil_resize(pil_resize(x, 20, 40, False), 20, 30, False)
    assert not torch.equal(horizontal_first, vertical_first_)  # the order matters for these sizes
    assert torch.equal(pil_resize(x, 20, 30, False, vertical_first_rule=False), horizontal_first)
    assert torch.equal(pil_resize(x, 20, 30, False, vertical_first_rule=True), vertical_first_)  # 70 > 2 x 10
    assert torch.equal(pil_resize(x, 80, 30, False, vertical_first_rule=True),  # 10 > 2 x 10 is false
                       pil_resize(pil_resize(x, 90, 30, False), 80, 30, False))
    assert vertical_first(90, 40, 20, 30) and not vertical_first(90, 40, 80, 30) and not vertical_first(9, 4, 20, 30)


@pytest.mark.parametrize("rule, expected", [(True, VERTICAL_FIRST_IF_TALLER_CUT), (False, HORIZONTAL_FIRST)])
def test_the_pass_order_is_detected_from_pillow(monkeypatch, rule, expected):
    """A Pillow that resizes in either order is recognised as such; one that does neither is refused."""

    def pillow_like(self, size, resample=None):
        x = torch.from_numpy(np.asarray(self).copy())
        return Image.fromarray(pil_resize(x, size[1], size[0], resample == Image.BICUBIC, rule).numpy())

    monkeypatch.setattr(Image.Image, "resize", pillow_like)
    assert pillow_pass_order.__wrapped__() == expected
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, resample=None: Image.new("L", size))
    with pytest.raises(RuntimeError, match="resizes in a way transfer does not know"):
        pillow_pass_order.__wrapped__()


def test_resize_crop_follows_the_recorded_pass_order():
    """With the other Pillow's pass order it equals the full resize in that order, then the crop."""
    rng = np.random.default_rng(1)
    for height, width in [(900, 300), (1000, 260), (300, 900)]:  # tall cuts: the two orders differ
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        nh, nw, top, left = crop_box(height, width, 256, 224)
        for rule in (True, False):
            resized = pil_resize(batch(pixels), nh, nw, True, rule)
            assert torch.equal(resize_crop(batch(pixels), 256, 224, True, rule),
                               resized[..., top:top + 224, left:left + 224])


# --- torch.export and ONNX: one program for every input size --------------------------------------------

class ResizeCrop(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return resize_crop(images, 256, 224, True, RULE)


@pytest.fixture(scope="module")
def exported():
    """One torch.export program with symbolic N, H and W (what model.pt2 and model.onnx hold)."""
    Dim = torch.export.Dim
    shapes = ({0: Dim("n", min=1), 2: Dim("h", min=1, max=65535), 3: Dim("w", min=1, max=65535)},)
    example = torch.randint(0, 256, (2, 3, 300, 451), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(ResizeCrop(), (example,), dynamic_shapes=shapes)


# both pass orders, a thin strip, a camera photo; batches of 2 and 1
EXPORT_SIZES = [(2, 375, 500), (1, 900, 300), (1, 1, 4000), (2, 1000, 260), (1, 1944, 2592), (1, 7, 5)]


def test_exported_program_equals_pillow_at_any_size(exported):
    program = exported.module()
    rng = np.random.default_rng(11)
    for n, height, width in EXPORT_SIZES:
        pixels = rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)
        got = program(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
        for i in range(n):
            assert torch.equal(got[i], pillow_crop(pixels[i], 256, 224, "bicubic")), (n, height, width)


def test_onnx_equals_pillow_at_any_size(exported):
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(exported, dynamo=True, opset_version=18, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(12)
    for n, height, width in EXPORT_SIZES:
        pixels = rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)
        got = session.run(None, {name: np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))})[0]
        for i in range(n):
            assert np.array_equal(got[i], pillow_crop(pixels[i], 256, 224, "bicubic").numpy()), (n, height, width)


# --- memory ------------------------------------------------------------------------------------------------

MEMORY_BUDGET_MB = 512  # address space the resize may add, beyond torch's own and the input images
MEMORY_CHECK = r"""
import resource, sys
import torch
from pipeline.resize import resize_crop

def address_space():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))

resize_crop(torch.zeros(1, 3, 300, 400, dtype=torch.uint8), 256, 224, True)  # threads and their arenas
images = [torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8) for h, w in [(1, 4000), (4000, 1), (4000, 6000)]]
limit = address_space() + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for x in images:
    for bicubic in (False, True):
        for squash in (False, True):
            assert resize_crop(x, 256, 224, bicubic, True, squash).shape == (1, 3, 224, 224)
print("ok")
"""


def test_resize_memory_is_bounded_by_the_output():
    """A 1x4000 strip (resized to 256 x 1,024,000 by Pillow) and a 24 MP photo resize within a few hundred
    MB of address space: a subprocess under RLIMIT_AS, so that a regression fails instead of filling memory."""
    done = subprocess.run([sys.executable, "-c", MEMORY_CHECK, str(MEMORY_BUDGET_MB)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_resize_crop_on_a_gpu_equals_pillow():
    """The GPU decode path's use: same-size images stacked on the device (weights are made on the CPU)."""
    rng = np.random.default_rng(4)
    for height, width in [(375, 500), (900, 300), (1, 4000), (1944, 2592)]:
        pixels = rng.integers(0, 256, size=(2, height, width, 3), dtype=np.uint8)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().cuda()
        got = resize_crop(images, 256, 224, True, RULE).cpu()
        for i in range(2):
            assert torch.equal(got[i], pillow_crop(pixels[i], 256, 224, "bicubic")), (height, width)
