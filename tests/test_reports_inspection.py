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


def test_identical_features_are_near_identical_pairs_even_when_every_row_is_the_same(tmp_path):
    """Mean-centred, identical rows are all zero vectors (cosine 0 before): they are duplicates by definition."""
    X, y, classes = blobs(3, 2, 4)
    X[:] = X[0]
    c = write_cache(tmp_path / "c.h5", X, y, classes=classes, split=["train", "train", "test"] * 2)
    found = inspect(c)
    assert sorted((p.a, p.b) for p in found.leaks) == [(a, b) for a in (0, 1, 3, 4) for b in (2, 5)]
    assert all(p.similarity == pytest.approx(1.0) for p in found.leaks)
    X[1] += 1.0  # one row differs: the rest still pair up with each other, not with it
    c = write_cache(tmp_path / "d.h5", X, y, classes=classes)
    pairs = similar_pairs(c, np.arange(6), np.arange(6), 0.99, same_set=True)
    assert sorted((p.a, p.b) for p in pairs) == [(a, b) for a in (0, 2, 3, 4, 5) for b in (0, 2, 3, 4, 5) if a < b]


def test_a_moved_image_folder_gives_placeholders_and_one_warning(tmp_path):
    X, y, classes = blobs(10, 2, 4, seed=1)
    c = write_cache(tmp_path / "c.h5", X, y, classes=classes, provenance={"image_dir": str(tmp_path / "gone")})
    result = run_cli("inspect", c.path, "--out", tmp_path / "look", "--C", "1")
    assert result.code == 0, result.err
    warnings = [l for l in result.err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "could not be opened for thumbnails" in warnings[0]
    assert "image not found" in (tmp_path / "look" / "inspect.html").read_text()
    assert (tmp_path / "look" / "label_issues.csv").read_text().startswith("rank,path,split,given,p_given,")


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


def test_confident_learning_flags_a_label_another_class_claims_not_a_coin_flip():
    from pipeline.reports.inspection import confident_issues

    proba = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.5, 0.5, 0.0],  # labelled 0; the last a coin flip
                      [0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.85, 0.15, 0.0],  # labelled 1; the last claimed by 0
                      [0.05, 0.15, 0.8], [0.1, 0.0, 0.9], [0.25, 0.7, 0.05]])  # labelled 2; the last claimed by 1
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    found, thresholds, suggested, margin = confident_issues(proba, y)
    np.testing.assert_allclose(thresholds, [(0.9 + 0.8 + 0.5) / 3, (0.9 + 0.8 + 0.15) / 3, (0.8 + 0.9 + 0.05) / 3])
    assert list(found) == [5, 8]  # ranked by margin: -0.70, then -0.65; the 0.50/0.50 image is not suspect
    assert list(suggested[found]) == [0, 1] and margin[5] == pytest.approx(-0.7)


@pytest.fixture
def mislabelled(tmp_path):
    """120 images in 3 classes, train/val/test; 8 train or val labels changed to the next class."""
    X, y, classes = blobs(40, 3, 8, seed=5, spread=2.5)
    split = np.array(["train", "train", "val", "test"] * 30)
    flipped = [i for i in range(0, 120, 7) if split[i] != "test"][:8]
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1) % 3
    c = write_cache(tmp_path / "c.h5", X, noisy, classes=classes, split=list(split),
                    paths=[f"{s}/{classes[k]}/{i}.png" for i, (s, k) in enumerate(zip(split, noisy))])
    return c, flipped


def test_fit_and_inspect_find_the_same_suspects_over_train_and_val(mislabelled):
    """One definition: the same rows, C (the one fit chooses), folds and rule."""
    from threadpoolctl import threadpool_limits

    import pipeline
    from pipeline.reports.inspection import inspect_fit

    c, flipped = mislabelled
    with threadpool_limits(1):
        fitted = inspect_fit(pipeline.fit(c))
        looked = inspect(c)
    assert fitted.suspects == looked.suspects and len(looked.suspects) >= 5
    assert len({s.row for s in looked.suspects} & set(flipped)) >= 5
    assert {c.split[s.row] for s in looked.suspects} == {"train", "val"}
    assert [s.margin for s in looked.suspects] == sorted(s.margin for s in looked.suspects)
    assert "over the 90 train+val images" in looked.suspect_method
    assert "as `transfer fit` chooses it" in looked.suspect_method
