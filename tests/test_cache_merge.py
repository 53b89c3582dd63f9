"""pipeline/cache/merge.py: parts written anywhere merge into the cache one extraction writes (rows,
labels, splits, failures, provenance), parts extracted differently are refused in one line, and
`fit` reads a list of parts as the merged cache, without merging."""

from __future__ import annotations

import os

import numpy as np
import pytest

import pipeline
from pipeline import head, merge_caches, read_cache, write_cache
from pipeline.cache import PartsCache, identity
from pipeline.errors import IncompatibleCachesError
from tests.conftest import LITE, assert_one_line_error, blobs, run_cli

PART_ONLY = ("state", "num_images", "num_failed", "num_listed", "assembled", "format", "format_version",
             "listing_sha256", "classes", "dim")


def split_into_parts(source, folder, k: int, seed: int = 0) -> list[str]:
    """`source`'s rows and failed files, shuffled and written as k parts with write_cache(failed=),
    as engine workers write them (each with every class, in no particular order)."""
    features = source.features()
    names = list(map(os.fsdecode, source.path_bytes)) + [p for p, _ in source.failed]
    reasons = [""] * source.n + [r for _, r in source.failed]
    meta = {key: value for key, value in source.provenance.items() if key not in PART_ONLY}
    with_failed = np.concatenate([features, np.full((len(source.failed), source.dim), np.nan, np.float32)])
    failed_labels = [source.classes.index(p.split("/")[1]) for p, _ in source.failed]  # CLASS from SPLIT/CLASS/...
    labels = np.concatenate([source.labels, np.array(failed_labels, dtype=np.int64)])
    splits = list(source.split) + [p.split("/")[0] for p, _ in source.failed]
    parts = []
    for i, rows in enumerate(np.array_split(np.random.default_rng(seed).permutation(len(names)), k)):
        parts.append(str(folder / f"part-{i:03d}.h5"))
        write_cache(parts[-1], with_failed[rows], labels[rows], classes=source.classes, split=[splits[r] for r in rows],
                    paths=[names[r] for r in rows], failed=[reasons[r] for r in rows], provenance=meta)
    return parts


def test_parts_merge_into_the_cache_a_single_extraction_writes(tiny_lite0, tmp_path):
    root, out = tiny_lite0
    single = read_cache(out)
    parts = split_into_parts(single, tmp_path, 3)
    merged = merge_caches(parts, tmp_path / "merged.h5")
    assert identity(merged.provenance) == identity(single.provenance)  # listing digest included
    assert merged.classes == single.classes and merged.image_dir == single.image_dir
    assert merged.path_bytes == single.path_bytes and np.array_equal(merged.labels, single.labels)
    assert list(merged.split) == list(single.split) and merged.failed == single.failed
    np.testing.assert_array_equal(merged.features(), single.features())
    assert merged.provenance["merged_from"] == ["part-000.h5", "part-001.h5", "part-002.h5"]
    # `extract` itself takes the merged cache for its own: nothing left to do.
    again = pipeline.extract(root, tmp_path / "merged.h5", backbone=LITE[1], weights=LITE[3], batch_size=4,
                             precision="fp32")
    assert again.state is pipeline.ExtractState.ALREADY_COMPLETE and again.done == single.n
    # Read in place, the parts are the same rows.
    view = PartsCache(parts)
    assert view.path_bytes == single.path_bytes and view.failed == single.failed
    np.testing.assert_array_equal(view.features(np.array([5, 0, 11])), single.features(np.array([5, 0, 11])))


def test_parts_of_another_backbone_or_sharing_a_file_are_refused_in_one_line(tmp_path):
    X, y, classes = blobs(6, 2, 4)
    a = tmp_path / "a.h5"
    write_cache(a, X, y, classes=classes, paths=[f"{i}.png" for i in range(12)], provenance={"backbone": "resnet18"})
    b = tmp_path / "b.h5"
    write_cache(b, X, y, classes=classes, paths=[f"b{i}.png" for i in range(12)], provenance={"backbone": "vgg16"})
    result = run_cli("merge", a, b, "--out", tmp_path / "m.h5")
    assert_one_line_error(result, "cannot merge", "b.h5", "backbone resnet18 vs vgg16")
    assert not (tmp_path / "m.h5").exists()
    c = tmp_path / "c.h5"
    write_cache(c, X[:2], y[:2], classes=classes, paths=["11.png", "x.png"], provenance={"backbone": "resnet18"})
    assert_one_line_error(run_cli("merge", a, c, "--out", tmp_path / "m.h5"), "11.png is in", "disjoint")
    with pytest.raises(IncompatibleCachesError, match="different image folders"):
        write_cache(c, X[:2], y[:2], classes=classes, paths=["y.png", "x.png"], overwrite=True,
                    provenance={"backbone": "resnet18", "image_dir": "/elsewhere"})
        merge_caches([a, c], tmp_path / "m.h5")
    assert_one_line_error(run_cli("merge", a, "--out", a, "--overwrite"), "is one of the parts")


def test_fit_on_a_list_of_parts_is_the_fit_on_their_merged_cache(tmp_path):
    X, y, classes = blobs(40, 3, 8, seed=3, spread=2.0)
    split = np.array(["train", "val", "test", "train"] * 30)
    names = [f"{split[i]}/{classes[y[i]]}/{i:04d}.png" for i in range(len(y))]
    parts = []
    for i, rows in enumerate(np.array_split(np.random.default_rng(1).permutation(len(y)), 3)):
        parts.append(tmp_path / f"part-{i}.h5")
        write_cache(parts[-1], X[rows], y[rows], classes=classes, split=split[rows], paths=[names[r] for r in rows])
    merged = merge_caches(parts, tmp_path / "merged.h5")
    for solver in ("streamed", "sklearn"):
        on_parts = pipeline.fit([str(p) for p in parts], solver=solver, C=0.5)
        on_merged = pipeline.fit(merged.path, solver=solver, C=0.5)
        np.testing.assert_array_equal(on_parts.head.weight, on_merged.head.weight)
        assert on_parts.scores == on_merged.scores
    result = run_cli("fit", *parts, "--out", tmp_path / "run", "--solver", "streamed", "--no-export")
    assert result.code == 0, result.err
    recorded = head.load(str(tmp_path / "run")).meta["provenance"]["cache"]
    assert recorded == [str(p.resolve()) for p in parts]
