"""pipeline/extraction/manifest.py: a CSV/JSONL list of path,label[,split] extracts to the same cache as the
equivalent folder tree; its problems get one line each."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.backbones import Embedder
from pipeline.images import scan_image_folder
from pipeline.extraction.manifest import read_manifest
from tests.conftest import LITE, ROOT, assert_one_line_error, make_folder, run_cli, write_image

OPTIONS = {"backbone": "efficientnet_lite0", "weights": "random", "batch_size": 4, "workers": 0}


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    """A train/val/test folder tree of 6 images, extracted from the folder once."""
    root = make_folder(tmp_path_factory.mktemp("tree") / "images", {"ant": 1, "bee": 1},
                       splits=("train", "val", "test"))
    out = root.parent / "folder.h5"
    pipeline.extract(root, out, **OPTIONS)
    return root, out


def manifest_rows(root: Path) -> list[list[str]]:
    """The tree as manifest rows, shuffled, one path absolute and one written with ./"""
    listing = scan_image_folder(root)
    rows = [[p, listing.classes[y], s, f"by {i}"] for i, (p, y, s) in enumerate(zip(listing.paths, listing.labels,
                                                                                     listing.splits))]
    rows[0][0] = str(root / rows[0][0])
    rows[1][0] = "./" + rows[1][0]
    random.Random(0).shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def from_manifest(tree) -> Path:
    """The same tree extracted from a shuffled manifest of it, with an extra column."""
    root, _ = tree
    manifest = write_csv(root / "list.csv", ["path", "label", "split", "photographer"], manifest_rows(root))
    out = root.parent / "manifest.h5"
    pipeline.extract(manifest=manifest, out=out, **OPTIONS)
    return out


def test_a_manifest_with_splits_gives_the_same_cache_as_the_folder_tree(tree, from_manifest):
    root, folder_cache = tree
    out = from_manifest
    a, b = pipeline.read_cache(folder_cache), pipeline.read_cache(out)
    assert b.path_bytes == a.path_bytes and b.classes == a.classes and list(b.split) == list(a.split)
    assert np.array_equal(b.labels, a.labels) and b.failed == a.failed == [] and b.image_dir == a.image_dir
    np.testing.assert_allclose(b.features(), a.features(), rtol=0, atol=1e-5)
    assert b.provenance["listing_sha256"] != a.provenance["listing_sha256"]  # the extra column is part of it
    by_path = {str((root / r[0]).resolve().relative_to(root)): r[3] for r in manifest_rows(root)}
    assert list(b.columns) == ["photographer"]
    assert list(b.columns["photographer"]) == [by_path[p] for p in b.paths]


def test_jsonl_lists_what_csv_lists(tmp_path):
    make_folder(tmp_path / "images", {"x": 2, "y": 1})
    rows = [["x/img000.png", "x", "t1"], ["y/img000.png", "y", "t2"], ["x/img001.png", "x", "t3"]]
    from_csv = read_manifest(write_csv(tmp_path / "images" / "m.csv", ["path", "label", "note"], rows))
    jsonl = tmp_path / "images" / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps({"label": r[1], "path": r[0], "note": r[2]}) for r in rows) + "\n")
    from_jsonl = read_manifest(jsonl)
    for listing in (from_csv, from_jsonl):
        assert listing.paths == ["x/img000.png", "x/img001.png", "y/img000.png"] and listing.splits is None
        assert listing.labels.tolist() == [0, 0, 1] and listing.extras == {"note": ["t1", "t3", "t2"]}
        assert listing.root == str(tmp_path / "images") and listing.failures == {}


def test_duplicates_and_missing_files_are_failed_rows_with_one_line_each(tmp_path):
    root = make_folder(tmp_path / "images", {"x": 2, "y": 1})
    manifest = write_csv(root / "m.csv", ["path", "label"], [
        ["x/img000.png", "x"], ["x/img001.png", "x"], ["y/img000.png", "y"],
        ["x/./img000.png", "y"],  # the same file again, even with another label: the first line keeps it
        ["gone.png", "y"]])
    result = run_cli("extract", "--manifest", manifest, "--out", tmp_path / "c.h5", *LITE)
    assert result.code == 0, result.err
    notes = [line for line in result.err.splitlines() if line.startswith("note: manifest line")]
    assert notes == ["note: manifest line 5: x/img000.png: duplicate: the manifest lists this file on line 2 too",
                     "note: manifest line 6: gone.png: file not found (listed in the manifest)"]
    c = pipeline.read_cache(tmp_path / "c.h5")
    assert c.paths == ["x/img000.png", "x/img001.png", "y/img000.png"] and c.labels.tolist() == [0, 0, 1]
    assert c.failed == [("gone.png", "file not found (listed in the manifest)"),
                        ("x/img000.png", "duplicate: the manifest lists this file on line 2 too")]


@pytest.mark.parametrize("name, text, fragments", [
    ("m.csv", "x/img000.png,x\n", ("header required", "has no 'path'")),
    ("m.csv", "path,label,split\nx/img000.png,x,training\n", ("line 2: unknown split 'training'", "train, val, test")),
    ("m.csv", "path,label\nx/img000.png, \n", ("line 2: empty label",)),
    ("m.csv", "path,label\nx/img000.png,x,extra\n", ("line 2: 3 fields, expected 2",)),
    ("m.csv", "", ("is empty",)),
    ("m.jsonl", '{"path": "x/img000.png"}\n', ("has no 'label'",)),
    ("m.jsonl", "not json\n", ("line 1 is not JSON",)),
    ("m.txt", "path,label\n", ("must end in .csv or .jsonl",)),
    ("m.jsonl", '{"path": "x/img000.png", "label": null}\n', ("line 1: label null is not text",)),  # was: class null
    ("m.jsonl", '{"path": "x/img000.png", "label": true}\n', ("line 1: label true is not text",)),
    ("m.jsonl", '{"path": "x/img000.png", "label": ["ants", "bees"]}\n', ("label [\"ants\", \"bees\"] is not text",)),
    ("m.jsonl", '{"path": 7, "label": "x"}\n', ("line 1: path 7 is not text",)),
])
def test_bad_manifests_get_one_clear_line_and_leave_nothing(tmp_path, name, text, fragments):
    make_folder(tmp_path / "images", {"x": 1})
    (tmp_path / "images" / name).write_text(text)
    result = run_cli("extract", "--manifest", tmp_path / "images" / name, "--out", tmp_path / "c.h5", *LITE)
    assert_one_line_error(result, *fragments)
    assert not list(tmp_path.glob("c.h5*"))


def test_labels_are_text_spaces_are_said_and_names_that_are_not_utf8_can_be_listed(tmp_path):
    """Numbers are class names (with a note); 'ants ' and 'ants' are one class, said once; a manifest
    holding a file name's raw bytes lists that very file, and notes show them as \\xNN."""
    raw = b"caf\xff.png"
    write_image(tmp_path / "x" / "a.png", 1)
    write_image(Path(os.fsdecode(bytes(tmp_path / "x") + b"/" + raw)), 2)
    (tmp_path / "m.jsonl").write_bytes(b'{"path": "x/a.png", "label": 3}\n{"path": "x/' + raw + b'", "label": "ants "}\n'
                                       b'{"path": "gone\xff.png", "label": "ants"}\n')
    listing = read_manifest(tmp_path / "m.jsonl")
    assert listing.classes == ["3", "ants"] and listing.labels.tolist() == [0, 1, 1]
    assert [os.fsencode(p) for p in listing.paths] == [b"x/a.png", b"gone\xff.png", b"x/" + raw]  # folder order
    assert listing.sizes[2] > 0 and list(listing.failures) == [1]  # found by its bytes; the missing one failed
    notes = "\n".join(listing.notes)
    assert "label 'ants ' is taken as 'ants'" in notes and "labels given as numbers are class names: 3" in notes
    assert "gone\\xff.png" in notes and "\\udc" not in notes


def test_both_or_neither_of_folder_and_manifest_is_refused(tmp_path):
    make_folder(tmp_path / "images", {"x": 1})
    write_csv(tmp_path / "m.csv", ["path", "label"], [["images/x/img000.png", "x"]])
    assert_one_line_error(run_cli("extract", tmp_path / "images", "--manifest", tmp_path / "m.csv",
                                  "--out", tmp_path / "c.h5"), "not both")
    assert_one_line_error(run_cli("extract", "--out", tmp_path / "c.h5"), "either an image folder")


def test_a_manifest_update_relabels_without_the_network(tree, from_manifest, tmp_path, monkeypatch):
    root, _ = tree
    images, out = tmp_path / "images", tmp_path / "m.h5"
    shutil.copytree(root, images)  # sizes and mtimes kept
    shutil.copy2(from_manifest, out)
    rows = manifest_rows(images)
    manifest = images / "list.csv"
    before = pipeline.read_cache(out)
    before_paths, before_features = before.paths, before.features()  # read now: the update replaces the file
    calls = []
    real = Embedder.__call__
    monkeypatch.setattr(Embedder, "__call__", lambda self, x: calls.append(len(x)) or real(self, x))
    relabelled = next(r for r in rows if r[2] == "val" and r[1] == "ant")
    relabelled[1] = "wasp"  # a label changes in the manifest only: no file moves
    write_image(images / "extra.png", 99)
    rows.append(["extra.png", "bee", "train", "new one"])
    write_csv(manifest, ["path", "label", "split", "photographer"], rows)
    summary = pipeline.extract(manifest=manifest, out=out, **OPTIONS)
    assert summary.update == dict(reused=6, new=1, changed=0, removed=0, relabelled=1) and sum(calls) == 1
    after = pipeline.read_cache(out)
    assert after.classes == ["ant", "bee", "wasp"] and "new one" in list(after.columns["photographer"])
    i, j = after.paths.index("val/ant/img000.png"), before_paths.index("val/ant/img000.png")
    assert after.classes[after.labels[i]] == "wasp"
    assert np.array_equal(after.features([i]), before_features[[j]])  # the same bytes, the new label


def test_the_documented_manifest_example_reads_as_documented(tmp_path):
    text = (ROOT / "docs" / "extraction.md").read_text()
    example = re.search(r"```csv\n(.*?)```", text[text.index("**Manifests.**"):], re.S).group(1)
    data = tmp_path / "data"
    for line in example.splitlines()[1:]:
        path = line.split(",")[0]
        if not path.startswith("/"):
            write_image(data / path, len(line))
    (data / "labels.csv").write_text(example)
    listing = read_manifest(data / "labels.csv")
    assert listing.classes == ["cat", "dog"] and listing.splits == ["train", "train", "val", "test"]
    assert listing.paths == ["images/0001.jpg", "images/0002.jpg", "images/0003.jpg", "/mnt/extra/0004.jpg"]
    assert listing.extras == {"photographer": ["ann", "bob", "ann", "carl"]}
    assert listing.failures == {3: "file not found (listed in the manifest)"}  # /mnt/extra is not on this machine
