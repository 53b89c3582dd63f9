"""pipeline/cache/reader.py: read_cache: finished caches only, features in blocks, damage named."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline import cache, read_cache, write_cache
from pipeline.cache import PartialCache
from pipeline.errors import IncompleteCacheError, InputFileError
from tests.conftest import (CACHE_LABELS as LABELS, CACHE_META as META, CACHE_PATHS as PATHS, make_partial,
                            rows_features, write_image)



def test_read_features_into_float64_in_any_row_order(tmp_path):
    part = make_partial(tmp_path)
    with part:
        part.commit(np.arange(5), rows_features(range(5)), [])
    info = cache.assemble([part.path], str(tmp_path / "x.h5"), META)
    out = np.empty((3, 4), dtype=np.float64)
    got = info.features(np.array([4, 0, 2]), out=out)
    assert got is out and got.dtype == np.float64
    assert got[:, 0].tolist() == [4.5, 0.5, 2.5]


def test_non_finite_features_are_refused(tmp_path):
    part = make_partial(tmp_path)
    feats = rows_features(range(5))
    feats[3, 1] = np.nan
    with part:
        part.commit(np.arange(5), feats, [])
    info = cache.assemble([part.path], str(tmp_path / "x.h5"), META)
    with pytest.raises(InputFileError, match="non-finite"):
        info.features()


@pytest.mark.parametrize("make, fragment", [
    (lambda p: None, "no feature cache at"),
    (lambda p: write_image(p, 1, fmt="PNG"), "not an HDF5 file"),
    (lambda p: h5py.File(p, "w").close(), "not a transfer feature cache"),
    (lambda p: p.mkdir(), "is a folder"),
])
def test_check_cache_explains_what_is_wrong(tmp_path, make, fragment):
    path = tmp_path / "thing.h5"
    make(path)
    with pytest.raises(InputFileError, match=fragment):
        cache.check_cache(str(path))


def test_an_incomplete_cache_names_the_command_that_resumes_it(tmp_path):
    part = make_partial(tmp_path)
    with part:
        part.commit(np.array([0, 1]), rows_features([0, 1]), [])
    for path in (str(tmp_path / "x.h5"), part.path):
        with pytest.raises(IncompleteCacheError) as info:
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
    with pytest.raises(IncompleteCacheError) as info:
        cache.check_cache(str(tmp_path / "x.h5"))
    assert "stopped at 2 of 5 images" in str(info.value)
    assert "torchrun again with 2 processes" in str(info.value)


def test_newer_format_versions_are_refused(tmp_path):
    part = make_partial(tmp_path)
    with part:
        part.commit(np.arange(5), rows_features(range(5)), [])
    out = str(tmp_path / "x.h5")
    cache.assemble([part.path], out, META)
    with h5py.File(out, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(InputFileError, match="format version 99"):
        cache.check_cache(out)


def _written(tmp_path, n=300, dim=3, split=True):
    X = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    y = np.arange(n) % 2
    splits = (["train", "val", "test"] * n)[:n] if split else None
    return write_cache(tmp_path / "w.h5", X, y, classes=["a", "b"], split=splits), X, y


@pytest.mark.parametrize("rows", [None, np.array([299, 0, 5, 5, 150]), np.arange(0, 300, 37), np.arange(10, 12)])
def test_blocks_cover_the_rows_asked_for_in_bounded_pieces(tmp_path, rows):
    c, X, _ = _written(tmp_path)
    wanted = np.arange(300) if rows is None else rows
    got = np.full((len(wanted), 3), -1.0, dtype=np.float32)
    sizes = []
    for idx, block in c.blocks(rows, block_rows=8):
        sizes.append(len(idx))
        got[idx] = block
    assert max(sizes) <= 8
    np.testing.assert_array_equal(got, X[wanted])
    np.testing.assert_array_equal(c.features(rows, dtype=np.float64), X[wanted].astype(np.float64))


def test_a_cache_knows_its_rows_and_says_what_it_holds(tmp_path):
    c, X, y = _written(tmp_path)
    assert (c.n, c.dim, c.classes) == (300, 3, ["a", "b"])
    np.testing.assert_array_equal(c.labels, y)
    assert list(c.split[:3]) == ["train", "val", "test"] and c.paths[0] == "row00000000"
    assert c.path_bytes[1] == b"row00000001" and c.failed == []
    assert "300 rows x 3, 2 classes" in repr(c) and "train 100 val 100 test 100" in repr(c)


@pytest.mark.parametrize("edit, fragment", [
    (lambda f: f.attrs.__setitem__("classes", "not json"), "attribute 'classes' must be a JSON list"),
    (lambda f: f.attrs.__setitem__("classes", '["a", "a"]'), "repeat a name"),
    (lambda f: f["labels"].__setitem__(3, 7), "must be in 0..1 (one per class); found 7"),
    (lambda f: f.attrs.__setitem__("dim", 5), "attribute 'dim' is 5 but features have 3 columns"),
    (lambda f: f["split"].__setitem__(0, "holdout"), "unknown names ['holdout']"),
    (lambda f: f.attrs.__setitem__("format_version", "one"), "attribute 'format_version' is 'one'"),
])
def test_hand_edited_caches_are_refused_naming_the_bad_attribute(tmp_path, edit, fragment):
    c, _, _ = _written(tmp_path, n=30)
    with h5py.File(c.path, "r+") as f:
        edit(f)
    with pytest.raises(InputFileError) as caught:
        read_cache(c.path)
    assert fragment in str(caught.value)


def test_a_cache_replaced_after_it_was_opened_is_refused_not_mixed(tmp_path):
    """A Cache reads one file throughout: after `extract` replaced it, its labels (read at open) would
    no longer match the new file's rows, so reading features or paths is refused in one line."""
    import pipeline
    from tests.conftest import blobs, make_cache

    X, y, classes = blobs(10, 2, 4)
    path = make_cache(tmp_path / "c.h5", X, y, classes)
    opened = read_cache(path)
    write_cache(path, X[::-1] + 1, y[::-1], classes=classes, overwrite=True)  # the same size, rows reversed
    for read in (lambda: opened.features(), lambda: opened.paths, lambda: pipeline.fit(opened)):
        with pytest.raises(InputFileError, match="was replaced or changed since it was opened"):
            read()
    np.testing.assert_array_equal(read_cache(path).features(), X[::-1] + 1)  # a fresh open reads the new file


def test_float_labels_and_row_numbers_are_refused_everywhere(tmp_path):
    """The rule of write_cache (labels are class indices) for arrays given to fit and for row numbers."""
    import pipeline
    from pipeline.errors import SettingError
    from tests.conftest import blobs

    X, y, classes = blobs(6, 2, 4)
    with pytest.raises(SettingError, match="labels of the arrays must be integers"):
        pipeline.fit((X, y + 0.7, classes))
    with pytest.raises(SettingError, match="labels of write_cache.s block 0 must be integers"):
        write_cache(tmp_path / "c.h5", X, y + 0.7, classes=classes)
    cache_ = write_cache(tmp_path / "c.h5", X, y, classes=classes)
    with pytest.raises(SettingError, match="row numbers must be integers"):
        cache_.features([1.5])
    assert cache_.features([1, 0]).shape == (2, 4) and cache_.features(np.array([], dtype=np.int64)).shape == (0, 4)


def test_huge_finite_features_are_one_line_in_fit_and_inspect(tmp_path):
    """3e38 is finite, but its square is not: fit and inspect failed with "unexpected LinAlgError"."""
    from pipeline.errors import SettingError
    from tests.conftest import assert_one_line_error, blobs, make_cache, run_cli

    X, y, classes = blobs(12, 2, 4)
    path = make_cache(tmp_path / "c.h5", X, y, classes)
    with h5py.File(path, "r+") as f:  # as a hand-made or damaged file holds them
        f["features"][3, 1] = 3e38
    for command in ("fit", "inspect"):
        result = run_cli(command, path, "--out", tmp_path / command, "--C", "1")
        assert_one_line_error(result, "features of magnitude 3e+38, over the 1e+12")
        assert not (tmp_path / command).exists()
    with pytest.raises(SettingError, match="features of magnitude 3e\\+38"):
        write_cache(tmp_path / "w.h5", np.where(X == X[3, 1], 3e38, X), y, classes=classes)
