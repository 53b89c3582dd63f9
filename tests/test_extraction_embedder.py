"""pipeline/extraction/embedder.py: `pipeline.Embedder` gives extract's features for the same files
(encoded bytes or decoded pixels), fails one row (never the batch) on a bad image, passes columns
through, and pickles as options only (each worker loads its own network)."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
from PIL import Image

import pipeline
from pipeline import read_cache
from pipeline.cache import identity
from pipeline.errors import SettingError, TransferError


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def embedder() -> pipeline.Embedder:
    return pipeline.Embedder("efficientnet_lite0", "random", batch_size=4, precision="fp32")


def test_bytes_and_pixels_give_extracts_features_and_a_bad_image_fails_its_row_only(tiny_lite0, embedder):
    root, out = tiny_lite0
    cache = read_cache(out)
    files = [root / p for p in cache.paths] + [root / "train" / "cat" / "broken.png"]
    batch = {"bytes": np.array([f.read_bytes() for f in files], dtype=object),
             "path": np.array([str(f) for f in files], dtype=object), "label": np.arange(len(files))}
    got = embedder(batch)
    assert set(got) == {"path", "label", "embedding", "error"}  # the image column is dropped
    assert got["embedding"].dtype == np.float32 and got["embedding"].shape == (len(files), cache.dim)
    assert list(got["path"]) == list(batch["path"]) and np.array_equal(got["label"], batch["label"])
    assert list(got["error"][:-1]) == [""] * cache.n
    assert got["error"][-1] == "not a recognised image format" == cache.failed[0][1]  # extract's reason
    assert np.isnan(got["embedding"][-1]).all()
    assert cosines(got["embedding"][:-1], cache.features()).min() >= 0.999999
    # Decoded pixels (what ray.data.read_images gives) take the same path from the RGB image on.
    pixels = {"image": np.array([np.asarray(Image.open(f).convert("RGB")) for f in files[:3]] + [np.zeros((0, 3))],
                                dtype=object)}
    decoded = embedder(pixels)
    np.testing.assert_allclose(decoded["embedding"][:3], got["embedding"][:3], rtol=0, atol=1e-5)
    assert decoded["error"][3].startswith("expected encoded bytes or a uint8 image")


def test_it_pickles_as_options_loads_once_and_records_extracts_provenance(tiny_lite0, embedder):
    fresh = pipeline.Embedder("efficientnet_lite0", "random")
    assert len(pickle.dumps(fresh)) < 2000  # nothing loaded yet
    embedder({"bytes": np.array([(tiny_lite0[0] / "val" / "dog" / "img002.png").read_bytes()], dtype=object)})
    runner = embedder.runner()
    assert embedder.runner() is runner  # the network is loaded once per process
    assert len(pickle.dumps(embedder)) < 2000  # ... and never travels to a worker
    recorded = read_cache(tiny_lite0[1]).provenance
    assert identity(embedder.provenance(), ("listing_sha256",)) == identity(recorded, ("listing_sha256",))


def test_content_hashes_and_its_errors_are_one_line(tiny_lite0):
    e = pipeline.Embedder("efficientnet_lite0", "random", hashes=True)
    data = (tiny_lite0[0] / "val" / "dog" / "img002.png").read_bytes()
    assert e({"bytes": [data]})["content_hash"][0] == hashlib.sha256(data).hexdigest()
    with pytest.raises(SettingError, match="has none of the columns bytes, image"):
        e({"jpg": [data]})
    with pytest.raises(TransferError, match="unknown backbone"):
        pipeline.Embedder("no_such_net")
    with pytest.raises(SettingError, match="precision must be one of"):
        pipeline.Embedder("efficientnet_lite0", precision="fp8")
