"""pipeline/resize.py: Pillow's resize reproduced bit for bit by torch ops (and by TorchScript)."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.resize import HORIZONTAL_FIRST, VERTICAL_FIRST_IF_TALLER_CUT, pil_resize, pillow_pass_order
from tests.conftest import HYMENOPTERA

RULE = pillow_pass_order() == VERTICAL_FIRST_IF_TALLER_CUT  # whatever this Pillow does


@pytest.fixture(scope="module")
def scripted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(pil_resize)


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


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="real photos not found")
def test_equals_pillow_on_real_photos(scripted):
    for path in sorted(HYMENOPTERA.rglob("*.jp*g"))[::40]:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        out = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
        expected = np.asarray(image.resize(out[::-1], Image.BICUBIC))
        got = scripted(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous(), out[0], out[1], True,
                       RULE)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected), path.name


def test_batches_resize_each_image_alike():
    x = torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8)
    both = pil_resize(x, 20, 28, False)
    assert torch.equal(both[1], pil_resize(x[1], 20, 28, False))


def test_random_shapes_equal_the_installed_pillow(scripted):
    rng = np.random.default_rng(5)
    for _ in range(40):
        h, w, out_h, out_w = (int(v) for v in rng.integers(2, 300, size=4))
        pixels = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize((out_w, out_h), Image.BICUBIC))
        assert np.array_equal(scripted(torch.from_numpy(pixels), out_h, out_w, True, RULE).numpy(), expected), \
            (h, w, out_h, out_w)


def test_both_pass_orders_are_separable_resizes_in_the_stated_order():
    """Whichever order Pillow uses, each branch must be the two one-dimensional passes in that order."""
    from pipeline.resize import _resample_last, _vertical

    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(90, 40), dtype=np.uint8))
    horizontal_first = _vertical(_resample_last(x, 30, False), 20, False).to(torch.uint8)
    vertical_first = _resample_last(_vertical(x, 20, False), 30, False).to(torch.uint8)
    assert not torch.equal(horizontal_first, vertical_first)  # the order matters for these sizes
    assert torch.equal(pil_resize(x, 20, 30, False, vertical_first_rule=False), horizontal_first)
    assert torch.equal(pil_resize(x, 20, 30, False, vertical_first_rule=True), vertical_first)  # 70 > 2 x 10
    assert torch.equal(pil_resize(x, 80, 30, False, vertical_first_rule=True),  # 10 > 2 x 10 is false
                       _vertical(_resample_last(x, 30, False), 80, False).to(torch.uint8))


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
