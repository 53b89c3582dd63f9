"""pipeline/extraction/webdataset.py: tar shards give the cache their files give as a folder (rows,
labels, splits, failures, listing digest, features), a corrupt member fails alone, a killed run
resumes, each torchrun rank reads whole shards, and bad shard lists stop in one line."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline import read_cache
from pipeline.cache import identity
from pipeline.devices import Place
from pipeline.errors import SettingError
from pipeline.extraction import webdataset
from tests.conftest import LITE, ROOT, Stop, StopAfterFirstBatch, assert_one_line_error, run_cli

OPTIONS = dict(backbone=LITE[1], weights=LITE[3], batch_size=4, precision="fp32")
FP32 = ("--batch-size", "4", "--precision", "fp32")


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tiny_lite0, tmp_path_factory) -> Path:
    """The tiny folder packed as {train,val}-{000,001}.tar in a shuffled order: each image with a
    .cls (its class) and a .json ({"label": class, "split": split}); one sample has no label."""
    root, _ = tiny_lite0
    folder = tmp_path_factory.mktemp("shards")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    order = np.random.default_rng(0).permutation(len(files))
    for split in ("train", "val"):
        mine = [files[i] for i in order if files[i].startswith(split + "/")]
        for k, members in enumerate((mine[::2], mine[1::2])):
            with tarfile.open(folder / f"{split}-{k:03d}.tar", "w") as tar:
                for name in members:
                    key, cls = name[:-4], name.split("/")[1]
                    add(tar, name, (root / name).read_bytes())
                    add(tar, key + ".cls", cls.encode())
                    add(tar, key + ".json", json.dumps({"label": cls, "split": split}).encode())
                if k == 0 and split == "train":
                    add(tar, "stray/unlabelled.png", (root / files[0]).read_bytes())
    return folder


def assert_same_as_folder(got, single) -> None:
    assert identity(got.provenance) == identity(single.provenance)  # the listing digest too
    assert got.path_bytes == single.path_bytes and np.array_equal(got.labels, single.labels)
    assert list(got.split) == list(single.split) and got.failed == single.failed  # the corrupt member fails alone
    a, b = got.features(), single.features()
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.999999


def test_shards_give_the_cache_of_the_same_files_as_a_folder(tiny_lite0, shards, tmp_path):
    out = tmp_path / "wds.h5"
    result = run_cli("extract", "--webdataset", f"train={shards}/train-{{000..001}}.tar",
                     "--webdataset", f"val={shards}/val-{{000..001}}.tar", "--out", out, *LITE, *FP32)
    assert result.code == 0, result.err
    assert "12 cached, 1 failed" in result.out
    assert "skipped (no label (its .cls member)): train-000.tar:stray/unlabelled" in result.out
    got = read_cache(out)
    assert_same_as_folder(got, read_cache(tiny_lite0[1]))
    assert got.provenance["webdataset"][0].endswith("train-000.tar") and got.provenance["decode"] == "pil"


def test_a_killed_run_resumes_by_shard_with_labels_and_splits_from_json(tiny_lite0, shards, tmp_path):
    out = tmp_path / "json.h5"
    spec = f"{shards}/{{train,val}}-{{000..001}}.tar"
    keys = dict(label_key="json:label", split_key="json:split")
    with pytest.raises(Stop):
        pipeline.extract(None, out, webdataset=spec, **keys, **OPTIONS, progress=StopAfterFirstBatch())
    assert not out.exists() and out.with_name("json.h5.partial").exists()
    summary = pipeline.extract(None, out, webdataset=spec, **keys, **OPTIONS)
    assert summary.resumed_from == 4 and summary.processed == 9  # the first batch is not read again
    assert_same_as_folder(read_cache(out), read_cache(tiny_lite0[1]))


def test_each_rank_reads_whole_shards_and_the_ranks_cover_every_image():
    shard_of = np.array([2, 0, 0, 1, 3, 3, 3, 1, 0, 2])  # listing order interleaves the shards
    listing = webdataset.ShardListing(root="/", classes=["a"], paths=[str(i) for i in range(10)],
                                      labels=np.zeros(10, np.int64), splits=None, skipped=[],
                                      sizes=np.zeros(10, np.int64), mtime_ns=np.zeros(10, np.int64),
                                      shards=["s0", "s1", "s2", "s3"], shard_of=shard_of)
    for world in (1, 2, 3, 4, 6):
        mine = [webdataset.my_positions(listing, Place(r, world)) for r in range(world)]
        assert np.array_equal(np.sort(np.concatenate(mine)), np.arange(10))
        owners = [{int(shard_of[p]) for p in m} for m in mine]
        assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])


def test_brace_patterns_and_bad_shard_lists_stop_in_one_line(shards, tmp_path):
    assert webdataset.expand("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert webdataset.expand("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    with pytest.raises(SettingError, match="runs backwards"):
        webdataset.expand("{5..1}.tar")
    gz = tmp_path / "z.tar"
    with tarfile.open(gz, "w:gz") as tar:
        add(tar, "a/x.png", b"png")
    assert_one_line_error(run_cli("extract", "--webdataset", gz, "--out", tmp_path / "c.h5", *LITE),
                          "is compressed", "plain .tar")
    assert_one_line_error(run_cli("extract", "--webdataset", f"{shards}/train-{{000..002}}.tar",
                                  "--out", tmp_path / "c.h5", *LITE), "train-002.tar does not exist")
    assert_one_line_error(run_cli("extract", shards, "--webdataset", f"{shards}/train-000.tar",
                                  "--out", tmp_path / "c.h5", *LITE), "not both")
    assert_one_line_error(run_cli("extract", "--webdataset", f"{shards}/train-000.tar", "--label-key", "json:",
                                  "--out", tmp_path / "c.h5", *LITE), "--label-key 'json:'")


def test_a_truncated_shard_lists_what_it_holds_and_fails_the_cut_member(tiny_lite0, shards, tmp_path):
    root = tiny_lite0[0]
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        for name in ("val/cat/img000.png", "val/cat/img001.png", "val/dog/img000.png"):
            add(tar, name[:-4] + ".cls", name.split("/")[1].encode())  # the label before the image this time
            add(tar, name, (root / name).read_bytes())
    with tarfile.open(whole) as tar:
        last = tar.getmember(name)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:last.offset_data + last.size // 2])
    listing = webdataset.read_shards([str(cut)])
    assert len(listing) == 3 and listing.notes and "unreadable after" in listing.notes[0]
    summary = pipeline.extract(None, tmp_path / "cut.h5", webdataset=str(cut), **OPTIONS)
    assert summary.done == 2 and summary.failed == 1 and "truncated member" in summary.failures[0][1]


TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this python")
def test_two_torchrun_ranks_split_the_shards_and_assemble_the_same_cache(tiny_lite0, shards, tmp_path):
    out = tmp_path / "two.h5"
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", str(ROOT / "cli.py"), "extract",
                           "--webdataset", f"train={shards}/train-{{000..001}}.tar",
                           "--webdataset", f"val={shards}/val-{{000..001}}.tar", "--out", str(out), *LITE, *FP32],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "2 ranks" in proc.stderr and not list(tmp_path.glob("two.h5.*"))
    assert_same_as_folder(read_cache(out), read_cache(tiny_lite0[1]))


def test_the_listing_marks_duplicates_skips_what_is_no_sample_and_never_trusts_names(tmp_path):
    for k in range(2):
        with tarfile.open(tmp_path / f"d-{k}.tar", "w") as tar:
            add(tar, "./a/x.jpg", b"jpeg?")  # the same image name in both shards
            add(tar, "./a/x.cls", b"cat")
            add(tar, f"/abs/y{k}.png", b"png?")  # absolute names stay inside the listing
            add(tar, f"/abs/y{k}.cls", b" dog\n")
            add(tar, f"notes{k}.txt", b"no image here")
    listing = webdataset.read_shards(f"{tmp_path}/d-{{0..1}}.tar")
    assert listing.paths == ["a/x.jpg", "a/x.jpg", "abs/y0.png", "abs/y1.png"] and listing.classes == ["cat", "dog"]
    assert list(listing.failures) == [1] and listing.failures[1].startswith("duplicate: shard d-0.tar")
    assert [why for _, why in listing.skipped] == ["no image member"] * 2
    assert listing.shard_of.tolist() == [0, 1, 0, 1] and listing.sizes.tolist() == [5, 5, 4, 4]
