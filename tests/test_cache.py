"""pipeline/cache.py: the partial working file, assembly into the final cache, and reading it back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipeline import cache
from pipeline.cache import DONE, FAILED, PENDING, PartialCache, WriterLock
from pipeline.errors import TransferError
from tests.conftest import ROOT, write_image

META = {"backbone": "toy", "weights": "random", "weights_sha256": "", "pretrained": False, "seed": 0,
        "layer": "toy", "dim": 4, "preprocessing": {"resize": 8, "crop": 8}, "precision": "fp32",
        "listing_sha256": "abc", "classes": ["a", "b"], "command": "transfer extract imgs --out x.h5"}
PATHS = ["train/a/0.png", "train/a/1.png", "train/b/2.png", "val/a/3.png", "val/b/4.png"]
LABELS = np.array([0, 0, 1, 0, 1])
SPLITS = ["train", "train", "train", "val", "val"]


def make_partial(tmp_path, n=5) -> PartialCache:
    return PartialCache.create(str(tmp_path / "x.h5.partial"), META, np.arange(n), PATHS[:n], LABELS[:n],
                               SPLITS[:n], dim=4)


def rows_features(rows):
    return np.stack([np.full(4, r + 0.5, dtype=np.float32) for r in rows])


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
    assert info.read_features()[:, 0].tolist() == [0.5, 1.5, 2.5, 4.5]
    assert info.splits is None and info.failed == [("val/a/3.png", "x")]


def test_read_features_into_float64_in_any_row_order(tmp_path):
    part = make_partial(tmp_path)
    with part:
        part.commit(np.arange(5), rows_features(range(5)), [])
    info = cache.assemble([part.path], str(tmp_path / "x.h5"), META)
    out = np.empty((3, 4), dtype=np.float64)
    got = info.read_features(np.array([4, 0, 2]), out=out)
    assert got is out and got.dtype == np.float64
    assert got[:, 0].tolist() == [4.5, 0.5, 2.5]


def test_non_finite_features_are_refused(tmp_path):
    part = make_partial(tmp_path)
    feats = rows_features(range(5))
    feats[3, 1] = np.nan
    with part:
        part.commit(np.arange(5), feats, [])
    info = cache.assemble([part.path], str(tmp_path / "x.h5"), META)
    with pytest.raises(TransferError, match="non-finite"):
        info.read_features()


@pytest.mark.parametrize("make, fragment", [
    (lambda p: None, "no feature cache at"),
    (lambda p: write_image(p, 1, fmt="PNG"), "not an HDF5 file"),
    (lambda p: h5py.File(p, "w").close(), "not a transfer feature cache"),
    (lambda p: p.mkdir(), "is a folder"),
])
def test_check_cache_explains_what_is_wrong(tmp_path, make, fragment):
    path = tmp_path / "thing.h5"
    make(path)
    with pytest.raises(TransferError, match=fragment):
        cache.check_cache(str(path))


def test_an_incomplete_cache_names_the_command_that_resumes_it(tmp_path):
    part = make_partial(tmp_path)
    with part:
        part.commit(np.array([0, 1]), rows_features([0, 1]), [])
    for path in (str(tmp_path / "x.h5"), part.path):
        with pytest.raises(TransferError) as info:
            cache.check_cache(path)
        assert "incomplete" in str(info.value) and "2 of 5" in str(info.value)
        assert "resume it with: transfer extract imgs --out x.h5" in str(info.value)


def test_an_unfinished_torchrun_job_is_reported_with_its_shards(tmp_path):
    meta = {**META, "world_size": 2, "command": "python cli.py extract imgs --out x.h5"}
    for rank, rows in ((0, [0, 1, 2]), (1, [3, 4])):
        part = PartialCache.create(str(tmp_path / f"x.h5.rank{rank:04d}-of-0002.partial"), meta,
                                   np.array(rows), [PATHS[i] for i in rows], LABELS[rows], None, 4)
        with part:
            part.commit(np.array([0]), rows_features([0]), [])
    with pytest.raises(TransferError) as info:
        cache.check_cache(str(tmp_path / "x.h5"))
    assert "stopped at 2 of 5 images" in str(info.value)
    assert "torchrun again with 2 processes" in str(info.value)


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


def test_newer_format_versions_are_refused(tmp_path):
    part = make_partial(tmp_path)
    with part:
        part.commit(np.arange(5), rows_features(range(5)), [])
    out = str(tmp_path / "x.h5")
    cache.assemble([part.path], out, META)
    with h5py.File(out, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(TransferError, match="format version 99"):
        cache.check_cache(out)


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = str(tmp_path / "x.h5")
    other = ("import sys; sys.path.insert(0, %r)\n"
             "from pipeline.cache import WriterLock\n"
             "from pipeline.errors import TransferError\n"
             "try:\n    WriterLock(%r).__enter__(); print('acquired')\n"
             "except TransferError as e:\n    print(e)\n") % (str(ROOT), out)
    with WriterLock(out):
        in_other_process = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True)
        assert f"another extract (pid {os.getpid()}) is writing {out}" in in_other_process.stdout
        with pytest.raises(TransferError, match="another extract .* is writing"):
            with WriterLock(out):  # and in this same process
                pass
    in_other_process = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True)
    assert in_other_process.stdout.strip() == "acquired"  # released: free again
    with WriterLock(out):
        pass
    assert not (tmp_path / "x.h5.lock").exists()


def test_listing_digest_sees_any_change_of_rows():
    base = cache.listing_digest(["a", "b"], PATHS, LABELS, SPLITS)
    assert base == cache.listing_digest(["a", "b"], list(PATHS), LABELS.copy(), list(SPLITS))
    assert base != cache.listing_digest(["a", "b"], PATHS[::-1], LABELS, SPLITS)
    assert base != cache.listing_digest(["a", "b"], PATHS, 1 - LABELS, SPLITS)
    assert base != cache.listing_digest(["a", "b"], PATHS, LABELS, None)


def test_display_path_escapes_undecodable_bytes():
    import os

    assert cache.display_path(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
    assert cache.display_path("café.png") == "café.png"
