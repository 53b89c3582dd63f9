"""pipeline/extraction/update.py through `extract`: rerun on a changed folder, a cache is updated to exactly
what a fresh extraction of the new folder writes, and only new and changed files go through the
network."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline
from pipeline.backbones import Embedder
from pipeline.images import scan_image_folder
from tests.conftest import LITE, Stop, StopAfterFirstBatch, make_folder, run_cli, write_image

OPTIONS = {"backbone": "efficientnet_lite0", "weights": "random", "batch_size": 4, "workers": 0}


@pytest.fixture
def network_calls(monkeypatch) -> list[int]:
    """Images per call of the backbone: the wrapped network counts every image it sees."""
    calls: list[int] = []
    real = Embedder.__call__

    def counting(self, images):
        calls.append(int(images.shape[0]))
        return real(self, images)

    monkeypatch.setattr(Embedder, "__call__", counting)
    return calls


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A split folder of 9 images and one broken file, and its cache, extracted once."""
    root = make_folder(tmp_path_factory.mktemp("base") / "images", {"a": 2, "b": 2}, splits=("train", "val"))
    (root / "train" / "b" / "broken.png").write_bytes(b"not an image")
    write_image(root / "val" / "a" / "photo.bmp", 50, fmt="BMP")  # BMP: same pixel size, same file size
    out = root.parent / "base.h5"
    pipeline.extract(root, out, **OPTIONS)
    return root, out


@pytest.fixture(scope="module")
def fresh_everything(base, tmp_path_factory) -> tuple[Path, dict]:
    """A fresh extraction of the folder after every edit at once, and the features a fresh
    extraction gives each file content (sha256 of its bytes), from it and the base cache."""
    tmp = tmp_path_factory.mktemp("fresh")
    images, _ = copy_of(base, tmp)
    everything(images)
    out = tmp / "fresh.h5"
    pipeline.extract(images, out, **OPTIONS)
    by_content = {}
    for folder, cache in ((base[0], base[1]), (images, out)):
        c = pipeline.read_cache(cache)
        for row, p in enumerate(c.paths):
            by_content[hashlib.sha256((folder / p).read_bytes()).hexdigest()] = c.features([row])[0]
    return out, by_content


def copy_of(base, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the folder and of its cache, the copy recording the copied folder as its own (as the
    user's own cache does; a cache of a folder that moved is test_a_moved_image_folder_...)."""
    root, out = base
    shutil.copytree(root, tmp_path / "images")  # copy2: sizes and mtimes kept, as for the user's own folder
    shutil.copy2(out, tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        f.attrs["image_dir"] = str(tmp_path / "images")
        f.attrs["image_dir_bytes"] = np.void(os.fsencode(tmp_path / "images"))
    os.utime(tmp_path / "c.h5", ns=(out.stat().st_atime_ns, out.stat().st_mtime_ns))
    return tmp_path / "images", tmp_path / "c.h5"


def test_a_moved_image_folder_is_recorded_and_its_rows_kept(base, tmp_path, network_calls):
    """Rerun on the folder's new place: no image goes through the network, the rows stay as they
    were, and the cache now names the new folder (parity and thumbnails look there)."""
    root, out = base
    moved, cache = tmp_path / "moved", tmp_path / "c.h5"
    shutil.copytree(root, moved)  # sizes and mtimes kept: the same files elsewhere
    shutil.copy2(out, cache)
    summary = pipeline.extract(moved, cache, **OPTIONS)
    assert network_calls == [] and summary.update["new"] == summary.update["changed"] == 0
    assert any(f"now in {moved}" in note for note in summary.notes)
    before, after = contents(out), contents(cache)
    assert pipeline.read_cache(cache).image_dir == str(moved)
    for key in before:
        np.testing.assert_equal(after[key], before[key])
    assert pipeline.extract(moved, cache, **OPTIONS).state is pipeline.ExtractState.ALREADY_COMPLETE


def contents(path: Path) -> dict:
    c = pipeline.read_cache(path)
    return {"paths": c.path_bytes, "labels": [c.classes[i] for i in c.labels], "split": list(c.split),
            "classes": c.classes, "failed": c.failed, "features": c.features()}


def modify(path: Path, seed: int) -> None:
    """New pixels; an mtime that surely differs, as an editor's save gives."""
    before = path.stat().st_mtime_ns
    write_image(path, seed, size=(40, 30))
    os.utime(path, ns=(before + 10**9, before + 10**9))


def grow(images: Path) -> None:
    write_image(images / "train" / "c" / "new0.png", 100)  # a new class: old rows keep their class names
    write_image(images / "val" / "a" / "new1.png", 101)


def shrink(images: Path) -> None:
    (images / "train" / "a" / "img000.png").unlink()
    (images / "val" / "a" / "img001.png").unlink()


def change(images: Path) -> None:
    modify(images / "train" / "b" / "img000.png", 200)


def relabel(images: Path) -> None:
    (images / "train" / "b" / "from_a").mkdir()
    (images / "train" / "a" / "img001.png").rename(images / "train" / "b" / "from_a" / "img001.png")
    (images / "train" / "a" / "moved").mkdir()
    (images / "val" / "b" / "img000.png").rename(images / "train" / "a" / "moved" / "img000.png")  # split and class


def everything(images: Path) -> None:
    grow(images)
    shrink(images)
    change(images)
    relabel(images)
    write_image(images / "train" / "b" / "broken.png", 300, fmt="png")  # the broken file, fixed: changed


@pytest.mark.parametrize("edit, network, account", [
    (grow, 2, dict(reused=10, new=2, changed=0, removed=0, relabelled=0)),
    (shrink, 0, dict(reused=8, new=0, changed=0, removed=2, relabelled=0)),
    (change, 1, dict(reused=9, new=0, changed=1, removed=0, relabelled=0)),
    (relabel, 0, dict(reused=10, new=0, changed=0, removed=0, relabelled=2)),
    (everything, 4, dict(reused=6, new=2, changed=2, removed=2, relabelled=2)),
])
def test_an_update_equals_a_fresh_extraction_and_runs_only_new_and_changed_files(
        base, fresh_everything, tmp_path, network_calls, edit, network, account):
    images, out = copy_of(base, tmp_path)
    old = contents(out)
    edit(images)
    seen = {}
    summary = pipeline.extract(images, out, on_ready=lambda plan: seen.update(update=plan.update), **OPTIONS)
    assert sum(network_calls) == network  # exactly the new and changed images went through the network
    assert seen["update"] == summary.update == account
    assert summary.reused == account["reused"] and summary.processed == network

    # What a fresh extraction of the new folder holds: its listing's rows, in order, with the
    # features a fresh extraction gives each file's content (and, for all edits at once, literally).
    new = contents(out)
    listing = scan_image_folder(images)
    broken = [p for p in listing.paths if p == "train/b/broken.png" and edit is not everything]
    assert new["paths"] == [os.fsencode(p) for p in listing.paths if p not in broken]
    assert new["labels"] == [listing.classes[y] for p, y in zip(listing.paths, listing.labels) if p not in broken]
    assert new["split"] == [s for p, s in zip(listing.paths, listing.splits) if p not in broken]
    assert new["classes"] == listing.classes
    assert new["failed"] == [(p, "not a recognised image format") for p in broken]
    by_content = fresh_everything[1]
    expected = np.stack([by_content[hashlib.sha256((images / os.fsdecode(p)).read_bytes()).hexdigest()]
                         for p in new["paths"]])
    np.testing.assert_allclose(new["features"], expected, rtol=0, atol=1e-5)
    if edit is everything:
        ref = contents(fresh_everything[0])
        for key in ("paths", "labels", "split", "classes", "failed"):
            assert new[key] == ref[key], key
        np.testing.assert_allclose(new["features"], ref["features"], rtol=0, atol=1e-5)
    # Rows of unchanged files (moved ones too: same name, size and mtime) hold the old bytes exactly.
    moved = {b"train/b/from_a/img001.png": b"train/a/img001.png", b"train/a/moved/img000.png": b"val/b/img000.png"}
    old_rows = {p: i for i, p in enumerate(old["paths"])}
    equal = [np.array_equal(new["features"][i], old["features"][old_rows[moved.get(p, p)]])
             for i, p in enumerate(new["paths"]) if moved.get(p, p) in old_rows]
    assert sum(equal) == account["reused"] - len(broken)  # less the broken file's reused failure
    assert len(equal) - sum(equal) == (edit in (change, everything))  # the modified file: new features


def test_rerunning_on_an_unchanged_folder_keeps_the_file_and_a_touched_file_counts_as_changed(
        base, tmp_path, network_calls):
    images, out = copy_of(base, tmp_path)
    before = out.stat().st_mtime_ns
    assert pipeline.extract(images, out, **OPTIONS).state is pipeline.ExtractState.ALREADY_COMPLETE
    assert out.stat().st_mtime_ns == before and network_calls == []
    touched = images / "val" / "a" / "img000.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 1))
    summary = pipeline.extract(images, out, **OPTIONS)
    assert summary.update == dict(reused=9, new=0, changed=1, removed=0, relabelled=0) and sum(network_calls) == 1


def test_check_content_compares_bytes_not_size_and_mtime(base, tmp_path, network_calls):
    images, out = copy_of(base, tmp_path)
    touched, edited = images / "val" / "a" / "img000.png", images / "val" / "a" / "photo.bmp"
    os.utime(touched, ns=(0, touched.stat().st_mtime_ns + 5))  # same bytes, another mtime
    st = edited.stat()
    write_image(edited, 51, fmt="BMP")  # other pixels, same size; the old mtime put back: stat cannot see it
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert edited.stat().st_size == st.st_size
    summary = pipeline.extract(images, out, check_content=True, **OPTIONS)
    assert summary.update == dict(reused=9, new=0, changed=1, removed=0, relabelled=0) and sum(network_calls) == 1
    with h5py.File(out, "r") as f:  # the stored hash is the file's sha256, as `sha256sum` prints it
        i = list(f["paths"].asstr()[...]).index("val/a/photo.bmp")
        assert f["content_hash"][i].decode() == hashlib.sha256(edited.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    root = make_folder(tmp_path_factory.mktemp("small") / "images", {"a": 1, "b": 1})
    pipeline.extract(root, root.parent / "small.h5", **OPTIONS)
    return root, root.parent / "small.h5"


def test_overwrite_recomputes_everything(small, tmp_path, network_calls):
    images, out = copy_of(small, tmp_path)
    write_image(images / "a" / "new.png", 7)
    summary = pipeline.extract(images, out, overwrite=True, **OPTIONS)
    assert summary.update is None and summary.reused == 0 and sum(network_calls) == 3


def test_a_cache_without_file_stats_is_extracted_again_once_and_says_so(small, tmp_path, network_calls):
    images, out = copy_of(small, tmp_path)
    with h5py.File(out, "r+") as f:  # what a cache written before this feature holds
        for group in (f, f["failed"]):
            for name in ("sizes", "mtime_ns", "content_hash"):
                del group[name]
    write_image(images / "a" / "new.png", 7)
    summary = pipeline.extract(images, out, **OPTIONS)
    assert summary.update == dict(reused=0, new=1, changed=2, removed=0, relabelled=0)
    assert any("records no file sizes and mtimes" in n and "extracted again, once" in n for n in summary.notes)
    assert sum(network_calls) == 3
    network_calls.clear()
    write_image(images / "b" / "new.png", 8)  # from now on the cache knows its files
    assert pipeline.extract(images, out, **OPTIONS).update["reused"] == 3 and sum(network_calls) == 1


def test_the_cli_prints_the_account_before_the_work_starts(base, tmp_path):
    images, out = copy_of(base, tmp_path)
    grow(images)
    shrink(images)
    result = run_cli("extract", images, "--out", out, *LITE, "--batch-size", "4")
    assert result.code == 0, result.err
    assert f"updating {out}: reused 8, new 2, changed 0, removed 2, relabelled 0" in result.err
    assert result.err.index("updating") < result.err.index("extracting 2 of 10 images")
    assert "extracted 2 images (reused 8)" in result.out and "9 cached, 1 failed" in result.out


def test_a_different_backbone_is_still_refused(base, tmp_path):
    images, out = copy_of(base, tmp_path)
    grow(images)
    refused = run_cli("extract", images, "--out", out, *LITE, "--seed", "3")
    assert refused.code != 0 and "holds a different extraction (seed 0 vs 3)" in refused.err


def test_an_interrupted_extraction_of_an_older_folder_gives_its_committed_rows(small, tmp_path, network_calls):
    images = tmp_path / "images"
    shutil.copytree(small[0], images)
    write_image(images / "b" / "more.png", 9)
    out = tmp_path / "c.h5"

    with pytest.raises(Stop):
        pipeline.extract(images, out, progress=StopAfterFirstBatch(), **{**OPTIONS, "batch_size": 2})
    (images / "b" / "more.png").unlink()  # the folder changes before the rerun: the 2 rows done are kept
    write_image(images / "a" / "late.png", 10)
    network_calls.clear()
    summary = pipeline.extract(images, out, **OPTIONS)
    assert summary.update == dict(reused=2, new=1, changed=0, removed=0, relabelled=0) and sum(network_calls) == 1
    assert pipeline.read_cache(out).paths == ["a/img000.png", "a/late.png", "b/img000.png"]


def test_an_update_that_cannot_fit_beside_the_old_cache_is_refused_before_any_work(small, tmp_path, monkeypatch):
    images, out = copy_of(small, tmp_path)
    write_image(images / "a" / "new.png", 7)
    before = out.read_bytes()
    features = 3 * 1280 * 4
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=int(1.5 * features)))
    result = run_cli("extract", images, "--out", out, *LITE)
    assert result.code != 0 and "error: updating" in result.err and "stays readable until it is replaced" in result.err
    assert out.read_bytes() == before and not list(tmp_path.glob("c.h5.*"))


def test_the_plan_keys_rows_by_path_and_finds_moved_and_copied_files_by_name_size_and_mtime():
    from pipeline.cache import Entries
    from pipeline.images import ImageListing
    from pipeline.extraction.update import plan_update

    old = Entries("old.h5", "cache", [b"a/1.png", b"a/2.png", b"b/3.png", b"b/bad.png"], ["a", "a", "b", ""],
                  [None] * 4, np.array([10, 20, 30, 5]), np.array([1, 2, 3, 4]),
                  np.array(["h1", "h2", "h3", "h4"], dtype=object), np.array([0, 1, 2, -1]),
                  ["", "", "", "corrupt"], True, True)
    # a/2.png renamed over b/3.png (b/3.png now holds 2.png's bytes and stat); a/1.png copied with its
    # mtime (cp -p) to b/1.png; b/bad.png unchanged; c/9.png new.
    listing = ImageListing("root", ["a", "b", "c"], ["a/1.png", "b/1.png", "b/3.png", "b/bad.png", "c/9.png"],
                           np.array([0, 1, 1, 1, 2]), None, [], sizes=np.array([10, 10, 20, 5, 7]),
                           mtime_ns=np.array([1, 1, 2, 4, 9]))
    plan = plan_update(listing, [old])
    assert plan.source.tolist() == [0, 0, -1, 0, -1] and plan.entry.tolist()[:2] == [0, 0]
    assert vars(plan.counts) == dict(reused=3, new=1, changed=1, removed=1, relabelled=1)  # a/2.png: removed
    prefill = plan.prefill(listing, [old], np.arange(5))
    assert [(f, r.tolist(), s.tolist()) for f, r, s in prefill.copies] == [("old.h5", [0, 1], [0, 0])]
    assert prefill.failed == [(3, "corrupt")] and prefill.hashes == {0: "h1", 1: "h1", 3: "h4"}
    # By content, b/3.png is 2.png's bytes: found and reused, relabelled from a to b.
    hashes = np.array(["h1", "h1", "h2", "h4", "h9"], dtype=object)
    plan = plan_update(listing, [old], check_content=True, hashes=hashes)
    assert plan.source.tolist() == [0, 0, 0, 0, -1] and plan.entry[2] == 1
    assert vars(plan.counts) == dict(reused=4, new=1, changed=0, removed=0, relabelled=2)


def test_retry_failed_runs_only_the_failed_images_again_and_keeps_the_rest(tmp_path, monkeypatch, network_calls):
    """A transient read error fails one image; the file itself never changes (same size and
    mtime), so only --retry-failed gets it into the cache, without recomputing the others."""
    import pipeline.extraction.decode as images_mod  # where the extraction decodes its files

    root = make_folder(tmp_path / "images", {"a": 2, "b": 2}, splits=("train",))
    out = tmp_path / "c.h5"
    real = images_mod.decode_image

    def flaky(path):
        if path.endswith(os.path.join("train", "a", "img001.png")):
            raise images_mod.DecodeError("input/output error")
        return real(path)

    monkeypatch.setattr(images_mod, "decode_image", flaky)
    assert pipeline.extract(root, out, **OPTIONS).failures == [("train/a/img001.png", "input/output error")]
    monkeypatch.setattr(images_mod, "decode_image", real)
    before = contents(out)
    network_calls.clear()
    assert pipeline.extract(root, out, **OPTIONS).state is pipeline.ExtractState.ALREADY_COMPLETE
    summary = pipeline.extract(root, out, retry_failed=True, **OPTIONS)
    assert summary.failures == [] and summary.processed == 1 and network_calls == [1]
    assert summary.update == dict(reused=3, new=0, changed=1, removed=0, relabelled=0)
    after = contents(out)
    assert [p for p in after["paths"] if p not in before["paths"]] == [b"train/a/img001.png"]
    kept = [after["paths"].index(p) for p in before["paths"]]
    np.testing.assert_array_equal(after["features"][kept], before["features"])  # bit for bit
    result = run_cli("extract", root, "--out", out, "--backbone", "efficientnet_lite0", "--weights", "random",
                     "--retry-failed")
    assert result.code == 0 and "already holds this extraction" in result.out  # nothing failed any more
