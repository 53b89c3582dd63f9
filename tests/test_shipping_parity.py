"""pipeline/shipping/parity.py: the sample of original images (unreadable ones replaced and said), zero images
checked recorded as not checked, and cached rows that are not their photo's features named."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.errors import TransferError
from pipeline.shipping import parity
from pipeline.shipping.export import ExportResult
from tests.conftest import write_image


def _cache(folder, n: int, precision: str = "fp32", features=None):
    names = [f"im{k:02d}.png".encode() for k in range(n)]
    for k, name in enumerate(names):
        write_image(folder / name.decode(), k, size=(12 + k, 10))
    features = np.random.default_rng(0).normal(size=(n, 4)) if features is None else features
    return SimpleNamespace(n=n, path_bytes=names, image_dir=str(folder), provenance={"precision": precision},
                           features=lambda rows, dtype=np.float32: features[rows].astype(dtype), dim=4)


class _Runner:
    """p = (mean of the first pixel / 255, 1 - that): what the whole file and its parts both give."""

    format = "torchscript"

    def images(self, x):
        return self.run(list(x))

    def prepare(self, image):
        return image[:, :1, :1].contiguous()

    def key(self, item):
        return None

    def run(self, items):
        m = np.array([float(i[:, 0, 0].float().mean()) / 255 for i in items])
        return np.stack([m, 1 - m], axis=1)


class _Reference:
    """scikit-learn's part: predict_proba of a row's features = the runner's p of that row's photo (the nearest
    known features' entry)."""

    def __init__(self, cache, runner):
        from PIL import Image

        self.known, self.p = [], []
        for row in range(cache.n):
            path = os.path.join(cache.image_dir, cache.path_bytes[row].decode())
            if os.path.exists(path):
                image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
                self.add(cache.features([row], np.float64)[0], runner.images(image[None])[0])

    def add(self, features, p):
        self.known.append(np.asarray(features, dtype=np.float64))
        self.p.append(p)

    def predict_proba(self, features):
        return np.stack([self.p[int(np.argmin([np.abs(k - f).sum() for k in self.known]))] for f in features])


def test_unreadable_images_are_replaced_by_readable_ones_and_said(tmp_path):
    cache = _cache(tmp_path, 20)
    reference = _Reference(cache, _Runner())
    os.remove(tmp_path / "im00.png")  # the first of the evenly spaced rows
    (tmp_path / "im10.png").write_bytes(b"not a png any more")
    sample = parity.sample_images(cache, None, fresh=False)
    assert len(sample.rows) == parity.PARITY_IMAGES and 0 not in sample.rows
    assert sorted(sample.unreadable) == [b"im00.png", b"im10.png"]
    assert len(set(sample.rows.tolist())) == len(sample.rows)
    assert "2 of the images sampled could not be read" in sample.lines()[0]
    assert "12 readable ones checked instead" in sample.lines()[0]
    result = parity.end_to_end(_Runner(), reference, cache, sample)
    assert result["images"] == 12 and result["unreadable"] == 2 and result["max_abs_diff"] < 1e-12


def test_no_readable_image_is_not_checked_and_says_so(tmp_path):
    cache = _cache(tmp_path, 5)
    cache.image_dir = str(tmp_path / "moved-away")
    sample = parity.sample_images(cache, None, fresh=False)
    result = parity.end_to_end(_Runner(), None, cache, sample)
    assert result["images"] == 0 and result["max_abs_diff"] is None and result["argmax_identical"] is None
    assert "none of the 5 images tried could be read under" in result["skipped"]
    exported = ExportResult(str(tmp_path / "model.pt"), "head.pt", {"torchscript": {"end_to_end": result}},
                            {"torchscript": str(tmp_path / "model.pt")})
    assert exported.warnings() == [f"model.pt was not checked on original images: {result['skipped']}"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_cached_row_that_is_not_its_photos_features_fails_and_is_named(tmp_path, monkeypatch, precision):
    """A photo replaced after extraction (same size and mtime): its cached row is far from the features of the
    photo now (cosine 0) while the model agrees with scikit-learn on those fresh features."""
    monkeypatch.setattr(parity, "_changed_images_hint", lambda cache, names: "")
    features = np.random.default_rng(1).normal(size=(6, 4))
    cache = _cache(tmp_path, 6, precision, features)
    sample = parity.sample_images(cache, None, fresh=False)
    sample.fresh = features[sample.rows].astype(np.float64)
    reference = _Reference(cache, _Runner())
    assert parity.end_to_end(_Runner(), reference, cache, sample)["cached_feature_cosine_min"] > 0.999
    p3 = reference.predict_proba(features[3:4])[0]
    features[3] = [-features[3, 1], features[3, 0], -features[3, 3], features[3, 2]]  # orthogonal to im03.png's
    reference.add(features[3], p3)  # and scikit-learn still gives the photo's probabilities: only the cosine tells
    with pytest.raises(TransferError) as raised:
        parity.end_to_end(_Runner(), reference, cache, sample)
    message = str(raised.value)
    assert "im03.png" in message and "cached features at cosine 0.0000 to the photo's" in message
    assert "the cached features of 1 of them are not their photo's now" in message
