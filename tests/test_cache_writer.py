"""pipeline/cache/writer.py: complete caches from arrays or from a stream of blocks."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from pipeline import fit, read_cache, write_cache
from pipeline.cache import listing_digest
from pipeline.errors import InputFileError, SettingError
from tests.conftest import blobs


def test_arrays_round_trip_with_provenance(tmp_path):
    X, y, classes = blobs(20, 3, 5)
    split = ["train", "val", "test", "train"] * 15
    paths = [f"{classes[y[i]]}/{i}.jpg" for i in range(60)]
    c = write_cache(tmp_path / "a.h5", X, y, classes=classes, split=split, paths=paths,
                    provenance={"backbone": "my_net", "layer": "pool5", "image_dir": "/data/photos"})
    again = read_cache(tmp_path / "a.h5")
    np.testing.assert_array_equal(again.features(), X)
    np.testing.assert_array_equal(again.labels, y)
    assert list(again.split) == split and again.paths == paths and again.classes == classes
    assert again.provenance["backbone"] == "my_net" and again.provenance["layer"] == "pool5"
    assert again.image_dir == "/data/photos" and again.dim == 5 and c.n == 60
    assert again.provenance["listing_sha256"] == listing_digest(classes, paths, y, split)
    assert again.provenance["state"] == "complete" and again.provenance["num_images"] == 60


def test_blocks_give_the_same_cache_as_one_array(tmp_path):
    X, y, classes = blobs(50, 2, 7)
    split = np.where(np.arange(100) % 5 == 0, "val", "train")
    whole = write_cache(tmp_path / "whole.h5", X, y, classes=classes, split=split)
    streamed = write_cache(tmp_path / "blocks.h5",
                           ((X[i:i + 13], y[i:i + 13], split[i:i + 13]) for i in range(0, 100, 13)), classes=classes)
    np.testing.assert_array_equal(streamed.features(), whole.features())
    np.testing.assert_array_equal(streamed.split, whole.split)
    assert streamed.paths == whole.paths
    assert streamed.provenance["listing_sha256"] == whole.provenance["listing_sha256"]


def test_a_written_cache_fits_like_any_other(tmp_path):
    X, y, classes = blobs(30, 2, 4, spread=0.5)
    path = write_cache(tmp_path / "c.h5", X, y, classes=classes).path
    assert fit(path, C=1.0).scores["top1"] == 1.0


@pytest.mark.parametrize("call, error, fragment", [
    (lambda p, X, y: write_cache(p, X, None, classes=["a", "b"]), SettingError, "labels (N,) are required"),
    (lambda p, X, y: write_cache(p, X, y + 5, classes=["a", "b"]), SettingError, "must be in 0..1"),
    (lambda p, X, y: write_cache(p, X, y, classes=[]), SettingError, "non-empty list of names"),
    (lambda p, X, y: write_cache(p, X, y[:3], classes=["a", "b"]), SettingError, "expected (10,)"),
    (lambda p, X, y: write_cache(p, X, y, classes=["a", "b"], split=["train"] * 9 + ["dev"]), SettingError,
     "unknown names ['dev']"),
    (lambda p, X, y: write_cache(p, X * np.nan, y, classes=["a", "b"]), SettingError, "non-finite"),
    (lambda p, X, y: write_cache(p, iter([(X, y), (X[:, :2], y)]), classes=["a", "b"]), SettingError,
     "block 1 has features of shape (10, 2); expected (b, 3)"),
    (lambda p, X, y: write_cache(p, iter([]), classes=["a", "b"]), SettingError, "no rows"),
    (lambda p, X, y: write_cache(p, X, y, classes=["a", "b"], paths=["x"] * 4), SettingError, "paths has 4 names"),
])
def test_bad_arrays_are_refused_and_nothing_is_left(tmp_path, call, error, fragment):
    X, y = np.ones((10, 3), np.float32), np.arange(10) % 2
    with pytest.raises(error) as caught:
        call(tmp_path / "bad.h5", X, y)
    assert fragment in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_an_existing_file_is_kept_unless_overwrite(tmp_path):
    X, y = np.ones((4, 2), np.float32), np.array([0, 1, 0, 1])
    write_cache(tmp_path / "c.h5", X, y, classes=["a", "b"])
    with pytest.raises(InputFileError, match="already exists"):
        write_cache(tmp_path / "c.h5", X * 2, y, classes=["a", "b"])
    assert read_cache(tmp_path / "c.h5").features()[0, 0] == 1
    assert write_cache(tmp_path / "c.h5", X * 2, y, classes=["a", "b"], overwrite=True).features()[0, 0] == 2


def test_a_failure_midway_leaves_no_cache(tmp_path):
    def blocks():
        yield np.ones((3, 2), np.float32), np.array([0, 1, 0])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path / "c.h5", blocks(), classes=["a", "b"])
    assert os.listdir(tmp_path) == []


def test_failed_rows_go_to_the_failed_group_with_their_labels_and_splits(tmp_path):
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    X[1] = np.nan  # an engine's row for an image it could not use: ignored
    written = write_cache(tmp_path / "f.h5", X, np.array([0, 1, 1, 0]), classes=["a", "b"],
                          split=["train", "val", "train", "val"], paths=["a/0.png", "b/1.png", "b/2.png", "a/3.png"],
                          failed=["", "corrupt image: truncated", "", ""])
    assert written.n == 3 and written.paths == ["a/0.png", "b/2.png", "a/3.png"]
    assert written.failed == [("b/1.png", "corrupt image: truncated")]
    assert written.provenance["num_listed"] == 4 and written.provenance["num_failed"] == 1
    with h5py.File(written.path, "r") as f:
        assert f["failed/labels"][...].tolist() == [1] and f["failed/split"].asstr()[...].tolist() == ["val"]
    every = write_cache(tmp_path / "all.h5", X[:2], np.array([0, 1]), classes=["a", "b"], paths=["x.png", "y.png"],
                        failed=["bad", "worse"])  # a part whose images all failed still records them
    assert every.n == 0 and len(every.failed) == 2
    with pytest.raises(SettingError, match="failed has 3 reasons for 4 labels"):
        write_cache(tmp_path / "g.h5", X, np.array([0, 1, 1, 0]), classes=["a", "b"], paths=list("abcd"),
                    failed=["", "", ""])
