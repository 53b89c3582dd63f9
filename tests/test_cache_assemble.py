"""pipeline/cache/assemble.py: the finished cache, streamed from partial files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from pipeline import cache
from pipeline.cache import PartialCache
from pipeline.errors import TransferError
from tests.conftest import CACHE_LABELS as LABELS, CACHE_META as META, CACHE_PATHS as PATHS, make_partial, rows_features



def test_assemble_keeps_done_rows_in_order_and_lists_failures(tmp_path):
    part = make_partial(tmp_path)
    with part:
        part.commit(np.array([0, 1, 3, 4]), rows_features([0, 1, 3, 4]), [(2, "truncated")])
    out = str(tmp_path / "x.h5")
    info = cache.assemble([part.path], out, META)
    assert info.n == 4 and info.classes == ["a", "b"]
    with h5py.File(out, "r") as f:  # plain h5py, no project code
        assert f["features"][...][:, 0].tolist() == [0.5, 1.5, 3.5, 4.5]
        assert list(f["paths"].asstr()[...]) == ["train/a/0.png", "train/a/1.png", "val/a/3.png", "val/b/4.png"]
        assert f["labels"][...].tolist() == [0, 0, 0, 1]
        assert list(f["split"].asstr()[...]) == ["train", "train", "val", "val"]
        assert json.loads(f.attrs["classes"]) == ["a", "b"]
        assert f.attrs["state"] == "complete" and f.attrs["num_failed"] == 1
        assert list(f["failed/paths"].asstr()[...]) == ["train/b/2.png"]
        assert list(f["failed/reasons"].asstr()[...]) == ["truncated"]


def test_assemble_refuses_pending_rows_and_leaves_no_output(tmp_path):
    part = make_partial(tmp_path)
    out = tmp_path / "x.h5"
    with pytest.raises(TransferError, match="still pending"):
        cache.assemble([part.path], str(out), META)
    assert not out.exists()
    assert not list(tmp_path.glob("x.h5.assembling-*"))


def test_assemble_concatenates_shards_in_order(tmp_path):
    a = PartialCache.create(str(tmp_path / "a.partial"), META, np.arange(0, 2), PATHS[:2], LABELS[:2], None, 4)
    b = PartialCache.create(str(tmp_path / "b.partial"), META, np.arange(2, 5), PATHS[2:], LABELS[2:], None, 4)
    with a:
        a.commit(np.array([0, 1]), rows_features([0, 1]), [])
    with b:
        b.commit(np.array([0, 2]), rows_features([2, 4]), [(1, "x")])
    info = cache.assemble([a.path, b.path], str(tmp_path / "x.h5"), META)
    assert info.paths == ["train/a/0.png", "train/a/1.png", "train/b/2.png", "val/b/4.png"]
    assert info.features()[:, 0].tolist() == [0.5, 1.5, 2.5, 4.5]
    assert info.split is None and info.failed == [("val/a/3.png", "x")]


def test_shards_of_another_extraction_are_not_assembled(tmp_path):
    a = PartialCache.create(str(tmp_path / "a.partial"), META, np.arange(0, 2), PATHS[:2], LABELS[:2], None, 4)
    b = PartialCache.create(str(tmp_path / "b.partial"), {**META, "seed": 9}, np.arange(2, 5), PATHS[2:], LABELS[2:],
                            None, 4)
    for part, n in ((a, 2), (b, 3)):
        with part:
            part.commit(np.arange(n), rows_features(range(n)), [])
    with pytest.raises(TransferError, match="other settings .*seed 9 vs 0"):
        cache.assemble([a.path, b.path], str(tmp_path / "x.h5"), META)
    with pytest.raises(TransferError, match="do not cover the 6 listed images"):
        cache.assemble([a.path], str(tmp_path / "x.h5"), {**META, "num_listed": 6})
    assert not (tmp_path / "x.h5").exists()
