"""pipeline/cache/partial.py: the resumable partial file: allocated up front, committed row by row."""

from __future__ import annotations

import h5py
import numpy as np

from pipeline.cache import DONE, FAILED, PENDING
from tests.conftest import CACHE_PATHS as PATHS, make_partial, rows_features



def test_new_partial_has_every_row_pending_and_its_listing(tmp_path):
    part = make_partial(tmp_path)
    assert part.pending_rows().tolist() == [0, 1, 2, 3, 4]
    with h5py.File(part.path, "r") as f:
        assert f.attrs["state"] == "partial"
        assert list(f["paths"].asstr()[...]) == PATHS
        assert f["features"].shape == (5, 4)


def test_commit_marks_rows_and_readers_see_only_committed_ones(tmp_path):
    part = make_partial(tmp_path)
    with part:
        part.commit(np.array([0, 2]), rows_features([0, 2]), failed=[(1, "bad file")])
        # a second process reading while the writer holds the file open
        with h5py.File(part.path, "r", locking=False) as f:
            status = f["status"][...]
            assert status.tolist() == [DONE, FAILED, DONE, PENDING, PENDING]
            assert np.array_equal(f["features"][2], np.full(4, 2.5, dtype=np.float32))
            assert f["reasons"][1] == b"bad file"
    p = part.progress()
    assert (p.total, p.done, p.failed, p.finished) == (5, 2, 1, 3)
    assert part.pending_rows().tolist() == [3, 4]


def test_commit_never_overwrites_rows_outside_the_batch(tmp_path):
    part = make_partial(tmp_path)
    with part:
        part.commit(np.array([1]), rows_features([1]), [])
        part.commit(np.array([0, 2, 4]), rows_features([0, 2, 4]), [(3, "x")])
    with h5py.File(part.path, "r") as f:
        assert f["features"][1].tolist() == [1.5] * 4
        assert f["features"][4].tolist() == [4.5] * 4
