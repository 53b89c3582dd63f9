"""pipeline/reports/inspection.py and `transfer inspect`: leaks, duplicates and suspect labels found from
the cached features alone, on the real photos with planted trouble."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import inspect, write_cache
from pipeline.reports.inspection import similar_pairs
from tests.conftest import assert_one_line_error, blobs, run_cli


def test_planted_leaks_duplicates_and_mislabels_are_found(planted, tmp_path):
    cache_path, facts = planted
    found = inspect(cache_path, tmp_path / "look")
    cache = found.cache
    pairs = {cache.paths[p.b].split("/")[-1]: (cache.paths[p.a].split("/")[-1], p.same_bytes) for p in found.leaks}
    for copy, original in zip(facts["exact"], facts["originals"][:3]):
        assert pairs[copy] == (original, True), copy
    for copy, original in zip(facts["changed"], facts["originals"][3:]):
        assert pairs[copy] == (original, False), copy
    assert len(found.leaks) == 6  # nothing else in the real photos is that close
    assert {cache.paths[p.b].split("/")[-1] for p in found.duplicates} == set(facts["exact"])
    top10 = [cache.paths[s.row] for s in found.suspects[:10]]
    assert len(set(top10) & set(facts["moved"])) >= 3, top10
    page = (tmp_path / "look" / "inspect.html").read_text()
    assert all(name in page for name in facts["exact"] + facts["changed"])
    assert (tmp_path / "look" / "map.png").stat().st_size > 10_000


def test_the_search_is_blockwise_and_exact(tmp_path, monkeypatch):
    import importlib

    inspection = importlib.import_module("pipeline.reports.inspection")
    monkeypatch.setattr(inspection, "BLOCK_ROWS", 7)  # many blocks on both sides
    X, y, classes = blobs(20, 2, 6, seed=3)
    X[25] = X[3] * 1.0001  # a near-copy in another block
    X[5] = X[3] * 0.9999  # and one in the same block
    c = write_cache(tmp_path / "c.h5", X, y, classes=classes)
    rows = np.arange(40)
    pairs = similar_pairs(c, rows, rows, 0.999, same_set=True)
    assert sorted((p.a, p.b) for p in pairs) == [(3, 5), (3, 25), (5, 25)]  # each pair once
    across = similar_pairs(c, np.arange(20, 40), np.arange(20), 0.999)
    assert sorted((p.a, p.b) for p in across) == [(3, 25), (5, 25)]  # (reference, query)


def test_a_moved_image_folder_gives_placeholders_and_one_warning(tmp_path):
    X, y, classes = blobs(10, 2, 4, seed=1)
    c = write_cache(tmp_path / "c.h5", X, y, classes=classes, provenance={"image_dir": str(tmp_path / "gone")})
    result = run_cli("inspect", c.path, "--out", tmp_path / "look", "--C", "1")
    assert result.code == 0, result.err
    warnings = [l for l in result.err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "could not be opened for thumbnails" in warnings[0]
    assert "image not found" in (tmp_path / "look" / "inspect.html").read_text()


@pytest.mark.parametrize("args, fragment", [
    (("--threshold", "1.5"), "threshold (--threshold) must be a number in (0, 1]"),
    (("--top", "0"), "top (--top) must be a whole number >= 1"),
    (("--C", "-1"), "C (--C) must be auto (None) or a number > 0"),
])
def test_bad_settings_get_one_line(tmp_path, args, fragment):
    X, y, classes = blobs(5, 2, 4)
    c = write_cache(tmp_path / "c.h5", X, y, classes=classes)
    assert_one_line_error(run_cli("inspect", c.path, "--out", tmp_path / "x", *args), fragment)
    assert not (tmp_path / "x").exists()
