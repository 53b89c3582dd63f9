"""pipeline/extraction/run.py through the `transfer extract` command: the cache a user gets, and every
bad input answered with one clear line."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from pipeline import read_cache
from pipeline.backbones import load_backbone
from pipeline.devices import resolve_precision
from tests.conftest import LITE, Stop, StopAfterFirstBatch, assert_one_line_error, make_folder, run_cli


def test_cache_holds_features_labels_paths_splits_and_provenance(tmp_path):
    images = make_folder(tmp_path / "images", {"apple": 2, "banana": 1}, splits=("train", "val"))
    out = tmp_path / "new" / "fruit.h5"  # a missing output folder is created, as by every command
    result = run_cli("extract", images, "--out", out, *LITE, "--batch-size", "4")
    assert result.code == 0, result.err
    assert "extracted 6 images" in result.out and "img/s" in result.out and "6 cached, 0 failed" in result.out
    assert f"cache: {out}" in result.out
    speed = next(line for line in result.out.splitlines() if line.startswith("speed: "))
    assert "img/s over the" in speed and "loading the network" in speed and "writing the cache" in speed
    with h5py.File(out, "r") as f:  # the format as documented: plain h5py reads it
        assert f["features"].shape == (6, 1280) and f["features"].dtype == np.float32
        assert f["labels"][...].tolist() == [0, 0, 1, 0, 0, 1]
        assert list(f["paths"].asstr()[...])[:3] == ["train/apple/img000.png", "train/apple/img001.png",
                                                     "train/banana/img000.png"]
        assert list(f["split"].asstr()[...]) == ["train"] * 3 + ["val"] * 3
        a = f.attrs
        assert json.loads(a["classes"]) == ["apple", "banana"]
        assert a["backbone"] == "efficientnet_lite0" and a["weights"] == "random" and not a["pretrained"]
        assert json.loads(a["preprocessing"])["interpolation"] == "bicubic"
        auto = resolve_precision("auto", torch.device("cpu"))  # bf16 where the CPU computes it natively
        assert a["precision"] == auto.value and a["precision_choice"] == auto.why
        assert a["batch_size"] == 4 and a["batch_choice"] == "asked for" and a["decode"] == "pil"
        assert a["torch_version"] == torch.__version__
        assert a["format_version"] == 1 and a["created"] and a["layer"].startswith("global_pool")
        assert "torchvision_version" in a and a["num_images"] == 6 and a["num_failed"] == 0
    assert not list(out.parent.glob("fruit.h5.*"))  # no partial, lock or temporary left behind


def test_features_match_the_backbone_run_directly(tmp_path, tiny_folder):
    out = tmp_path / "c.h5"
    assert run_cli("extract", tiny_folder, "--out", out, *LITE, "--precision", "fp32").code == 0
    b = load_backbone("efficientnet_lite0", "random")
    from pipeline.images import decode_image

    x = torch.stack([b.preprocessing.pil_transform()(decode_image(str(tiny_folder / "cat" / "img000.png")))])
    with torch.inference_mode():
        expected = b.network(b.preprocessing.normalize(x)).numpy()
    np.testing.assert_allclose(read_cache(out).features([0]), expected, rtol=1e-4, atol=1e-5)


def test_rerunning_the_same_command_does_nothing(tmp_path, tiny_folder):
    out = tmp_path / "c.h5"
    assert run_cli("extract", tiny_folder, "--out", out, *LITE).code == 0
    before = out.stat().st_mtime_ns
    again = run_cli("extract", tiny_folder, "--out", out, *LITE)
    assert again.code == 0 and "already holds this extraction" in again.out
    assert out.stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_cache_from_other_settings_is_refused_unless_overwrite(tmp_path, tiny_folder):
    out = tmp_path / "c.h5"
    assert run_cli("extract", tiny_folder, "--out", out, *LITE, "--precision", "fp32").code == 0
    kept = run_cli("extract", tiny_folder, "--out", out, *LITE)  # --precision auto keeps the cache's precision
    assert kept.code == 0 and "already holds this extraction" in kept.out, kept.err
    refused = run_cli("extract", tiny_folder, "--out", out, "--backbone", "efficientnet_lite0", "--weights", "random",
                      "--seed", "1")
    assert_one_line_error(refused, "holds a different extraction", "seed 0 vs 1", "--overwrite")
    refused = run_cli("extract", tiny_folder, "--out", out, *LITE, "--precision", "bf16")
    assert_one_line_error(refused, "precision fp32 vs bf16")
    replaced = run_cli("extract", tiny_folder, "--out", out, *LITE, "--precision", "bf16", "--overwrite")
    assert replaced.code == 0, replaced.err
    assert read_cache(out).provenance["precision"] == "bf16"


@pytest.mark.parametrize("setup, args, fragments", [
    (None, ("{tmp}/missing", "--out", "{tmp}/c.h5"), ("does not exist",)),
    (None, ("", "--out", "{tmp}/c.h5"), ("no image folder given (an empty name)",)),
    ("empty", ("{tmp}/images", "--out", "{tmp}/c.h5"), ("has no class folders",)),
    ("empty_class", ("{tmp}/images", "--out", "{tmp}/c.h5"), ("has no images",)),
    ("ok", ("{tmp}/images", "--out", "{tmp}/c.h5", "--backbone", "vgg17"), ("unknown backbone 'vgg17'",)),
    ("ok", ("{tmp}/images", "--out", "{tmp}/lite.pth/c.h5"), ("cannot create the output folder",)),
    ("ok", ("{tmp}/images", "--out", "{tmp}/c.h5", "--backbone", "vgg11", "--weights", "{tmp}/lite.pth"),
     ("does not fit vgg11",)),
    ("ok", ("{tmp}/images", "--out", "{tmp}/c.h5", "--batch-size", "0"), ("--batch-size",)),
    ("ok", ("{tmp}/images", "--out", "{tmp}/c.h5", "--precision", "fp64"), ("fp64",)),
    ("ok", ("{tmp}/images", "--out", "{tmp}/c.h5", "--bogus"), ("No such option '--bogus'",)),
    ("ok", ("{tmp}/images",), ("Missing option '--out'",)),
])
def test_bad_input_gets_one_clear_line_and_leaves_nothing(tmp_path, setup, args, fragments):
    if setup == "empty":
        (tmp_path / "images").mkdir()
    elif setup == "empty_class":
        make_folder(tmp_path / "images", {"a": 1})
        (tmp_path / "images" / "b").mkdir()
    elif setup == "ok":
        make_folder(tmp_path / "images", {"a": 1})
        torch.save(load_backbone("efficientnet_lite0", "random").network.state_dict(), tmp_path / "lite.pth")
    result = run_cli("extract", *[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(result, *fragments)
    assert not list(tmp_path.glob("c.h5*"))


def test_an_empty_out_is_refused_before_any_work(tmp_path, tiny_folder):
    """`--out ''` named the current folder: the whole extraction ran, then failed, leaving ./.partial."""
    for args in (("--out", ""), ("--out", "c.h5", "--manifest", "")):
        result = run_cli("extract", *(() if "--manifest" in args else (tiny_folder,)), *args, *LITE, cwd=tmp_path)
        assert_one_line_error(result, "is empty; give a file or folder name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("extract", tmp_path / "missing", "--out", tmp_path / "c.h5", "--debug")
    assert result.code != 0 and "Traceback" in result.err and "does not exist" in result.err


def test_an_unfinished_extraction_with_other_settings_is_not_discarded(tmp_path, tiny_folder):
    out = tmp_path / "c.h5"
    from pipeline import cache, extract

    with pytest.raises(Stop):
        extract(tiny_folder, out, backbone="efficientnet_lite0", weights="random", batch_size=2, workers=0,
                command="the-first-command", progress=StopAfterFirstBatch())
    assert cache.PartialCache(str(out) + ".partial").progress().finished == 2
    refused = run_cli("extract", tiny_folder, "--out", out, *LITE, "--seed", "5")
    assert_one_line_error(refused, "unfinished extraction with other settings", "the-first-command", "--overwrite")
    resumed = run_cli("extract", tiny_folder, "--out", out, *LITE, "--batch-size", "2")
    assert resumed.code == 0 and "resumed after 2" in resumed.out, resumed.err


@pytest.mark.slow
@pytest.mark.parametrize("precision, min_cosine", [("bf16", 0.9999), ("fp32", 0.999999)])
def test_a_rows_features_barely_depend_on_the_batch_it_was_computed_in(tmp_path, precision, min_cosine):
    """The README's promise for torchrun slices, incremental updates and a resume with another
    --batch-size: rows computed in other batches agree within the stated cosine."""
    images = make_folder(tmp_path / "images", {"a": 4, "b": 3})
    rows = []
    for batch in (2, 5):
        out = tmp_path / f"b{batch}.h5"
        result = run_cli("extract", images, "--out", out, *LITE, "--precision", precision, "--batch-size", batch)
        assert result.code == 0, result.err
        rows.append(read_cache(out).features().astype(np.float64))
    a, b = rows
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= min_cosine


def test_the_summary_says_what_its_time_and_its_rate_cover():
    """The time is the whole run; the rate is over the extraction loop only: both said, adding up."""
    from pipeline.extraction.run import ExtractState, ExtractSummary

    summary = ExtractSummary(out="cache/photos.h5", state=ExtractState.WRITTEN, total=398, done=398, failed=0,
                             resumed_from=0, processed=398, seconds=23.0, images_per_second=398 / 13.6,
                             out_bytes=2 << 20, skipped=[], input_seconds=0.68, setup_seconds=8.0, loop_seconds=13.6,
                             batch_probed=True)
    first, speed, cache = summary.lines()
    assert first == "extracted 398 images in 23.0 s: 398 cached, 0 failed"
    assert speed == ("speed: 29.3 img/s over the 13.6 s of the extraction loop (5% of it waiting for decoded "
                     "images); before it 8.0 s loading the network and probing the batch size, after it 1.4 s "
                     "writing the cache")
    assert cache.startswith("cache: cache/photos.h5 (")
